//! What a testrun is asked with (`ots-submit run`), and the parsers of
//! the values its flags take.

use crate::cli::conn::{parse_duration, Conn};
use crate::protocol::{Distribution, Priority, RunState};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Device spec: "devicegroup:X [devicename:Y] [deviceid:Z]"; several
    /// separated by ';' run the packages on each spec in parallel, e.g.
    /// "devicegroup:a; devicegroup:b devicename:x" (the verdict is over
    /// all).
    #[arg(long, required_unless_present_any = ["local", "lease"])]
    pub device: Option<String>,
    /// Run at once on the device of this lease, which you hold (no queue;
    /// its console stays open). The device spec is the lease's.
    #[arg(long, conflicts_with = "local")]
    pub lease: Option<String>,
    /// Image URL or path for the conductor to flash.
    #[arg(long, required_unless_present = "local")]
    pub image: Option<String>,
    /// The series its results are compared with (`compare`, `history`,
    /// regressions in its notification); default: one named after its
    /// device specs, packages and options.
    #[arg(long)]
    pub series: Option<String>,
    /// Test packages, comma-separated.
    #[arg(long, value_delimiter = ',', required_unless_present = "local")]
    pub packages: Vec<String>,
    /// default: one task; perpackage: one task per package.
    #[arg(long, default_value = "default")]
    pub distribution: Distribution,
    /// Execution timeout of each task (e.g. 90s, 30m, 2h).
    #[arg(long, default_value = "30m", value_parser = parse_task_timeout)]
    pub timeout: Duration,
    /// Extra option for the conductor, KEY=VALUE (repeatable).
    #[arg(long = "option", value_parser = parse_option)]
    pub options: Vec<(String, String)>,
    /// Secret option (repeatable): KEY=@FILE (the file's content), KEY=-
    /// (a line from standard input), KEY alone (the environment variable
    /// OTS_SECRET_KEY), or KEY=VALUE (visible to every local user in
    /// /proc/PID/cmdline: warned about on a terminal). Only the worker
    /// running a task gets it (`{secret:KEY}`, `OTS_SECRET_KEY`); never in
    /// status, events, logs or the audit log. Needs a secured server.
    #[arg(long = "secret", value_parser = parse_secret)]
    pub secrets: Vec<(String, String)>,
    /// Input file for the conductor, PATH or NAME=PATH (repeatable): uploaded
    /// before the submit (once per content), found by every task under
    /// `{inputs_dir}/NAME` (NAME defaults to PATH's file name).
    #[arg(long = "input", value_parser = parse_input)]
    pub inputs: Vec<(String, PathBuf)>,
    /// Wait for the verdict, showing task state changes.
    #[arg(long)]
    pub wait: bool,
    /// Like --wait, and stream the tasks' log lines too.
    #[arg(long)]
    pub follow: bool,
    /// After the testrun, download its result files here (implies --wait).
    #[arg(long)]
    pub fetch: Option<PathBuf>,
    /// Queue even if no known worker has a matching device.
    #[arg(long)]
    pub queue_anyway: bool,
    /// Order among your own queued tasks: low, normal, high (high needs
    /// role operator or admin). Other users' tasks are ordered by fair
    /// share, not by priority.
    #[arg(long, value_enum, default_value_t = Priority::Normal)]
    pub priority: Priority,
    /// Who is told when the testrun ends (repeatable, at most 4): a
    /// notification target the server's operator configured, by name;
    /// `mailto:ADDR`; or a webhook URL the server's `notify.allow_urls`
    /// allows. `ots-submit notifications --run R` shows the deliveries.
    #[arg(long = "notify", value_name = "NAME|mailto:ADDR|URL")]
    pub notify: Vec<String>,
    /// Start an embedded server and local workers, run the example
    /// conductor, and tear it all down afterwards.
    #[arg(long)]
    pub local: bool,
    /// Number of local workers (with --local).
    #[arg(long, default_value_t = 2)]
    pub local_workers: usize,
    /// Conductor program for the local workers (with --local).
    #[arg(long)]
    pub conductor: Option<PathBuf>,
}

/// An image given as a relative path that exists here is sent as an
/// absolute path: the conductor runs in a working folder of its own.
/// URLs and anything that does not exist locally go as they are.
pub(crate) fn local_image(image: String, to_lab_workers: bool) -> String {
    let path = Path::new(&image);
    let mut sent = image.clone();
    if !image.contains("://") && path.is_relative() && path.exists() {
        if let Ok(abs) = std::fs::canonicalize(path) {
            sent = abs.display().to_string();
        }
    }
    // A worker under its systemd unit (PrivateTmp=yes) has a /tmp of its
    // own: a path there names nothing it can see. (`run --local`'s
    // workers are this process's: they see it.)
    let local = sent.strip_prefix("file://").unwrap_or(&sent);
    if to_lab_workers && (local.starts_with("/tmp/") || local.starts_with("/var/tmp/")) {
        crate::errln!(
            "ots-submit: warning: image {sent} is in a temporary folder; a worker run by its systemd unit (PrivateTmp=yes) has a /tmp of its own and will not find it — put images in a folder the workers share, or pass a URL"
        );
    }
    sent
}

/// Parses a task's execution timeout: whole seconds from 1 s to the
/// protocol's limit (7 days), so what the server gets is what was asked.
pub fn parse_task_timeout(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    let max = crate::protocol::limits::MAX_TIMEOUT_SECS;
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "{text:?}: a task timeout is whole seconds (e.g. 2s, 90s, 30m)"
        ));
    }
    if d.as_secs() == 0 || d.as_secs() > max {
        return Err(format!(
            "{text:?}: a task timeout must be from 1s to {}h ({max} s)",
            max / 3600
        ));
    }
    Ok(d)
}

/// The environment variable `--secret KEY` reads: `OTS_SECRET_` and the
/// key upper-cased, `-` and `.` as `_` (the name the conductor sees it
/// under on the worker, too).
pub fn secret_env_name(key: &str) -> String {
    format!(
        "OTS_SECRET_{}",
        key.to_ascii_uppercase().replace(['-', '.'], "_")
    )
}

/// A `--secret` value, kept off the command line (and out of `ps` and
/// shell history) unless given literally: `KEY=@FILE`, `KEY=-` (one line
/// of standard input, in the order given), `KEY` (from
/// [`secret_env_name`]), or `KEY=VALUE`.
pub(crate) fn parse_secret(text: &str) -> Result<(String, String), String> {
    use std::io::IsTerminal;
    if !text.contains('=') {
        let (k, _) = parse_option(&format!("{text}=x"))
            .map_err(|_| format!("--secret {text:?}: not a valid KEY"))?;
        let var = secret_env_name(&k);
        return std::env::var(&var).map(|v| (k.clone(), v)).map_err(|_| {
            format!("--secret {k}: the environment variable {var} is not set (or not UTF-8)")
        });
    }
    let (k, v) = parse_option(text).map_err(|_| {
        format!(
            "--secret {:?} is not KEY=@FILE, KEY=-, KEY or KEY=VALUE",
            text.split('=').next().unwrap_or("")
        )
    })?;
    if v == "-" {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("--secret {k}=-: cannot read standard input: {e}"))?;
        return Ok((k, line.trim_end_matches(['\n', '\r']).to_string()));
    }
    match v.strip_prefix('@') {
        Some(path) => {
            let value =
                std::fs::read_to_string(path).map_err(|e| format!("--secret {k}=@{path}: {e}"))?;
            Ok((k, value.trim_end_matches('\n').to_string()))
        }
        None => {
            if std::io::stdin().is_terminal() || std::io::stderr().is_terminal() {
                crate::errln!(
                    "ots-submit: warning: the value of --secret {k} is on the command line, where every local user can read it (/proc/PID/cmdline, ps); use --secret {k}=@FILE, --secret {k}=- (standard input) or --secret {k} with {} set",
                    secret_env_name(&k)
                );
            }
            Ok((k, v))
        }
    }
}

pub(crate) fn parse_input(text: &str) -> Result<(String, PathBuf), String> {
    // NAME=PATH when NAME is a relative name and PATH a file; otherwise
    // the whole text is the path (which may contain '=' itself).
    let named = text.split_once('=').filter(|(n, p)| {
        crate::protocol::check::relative_path(n).is_some() && Path::new(p).is_file()
    });
    let (name, path) = match named {
        Some((n, p)) => (n.to_string(), PathBuf::from(p)),
        None => {
            let path = PathBuf::from(text);
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("--input {text:?}: not a file path"))?
                .to_string();
            (name, path)
        }
    };
    if crate::protocol::check::relative_path(&name).is_none() {
        return Err(format!(
            "--input {text:?}: the name {name:?} must be a relative path without '..'"
        ));
    }
    if !path.is_file() {
        return Err(format!(
            "--input {text:?}: {} is not a readable file",
            path.display()
        ));
    }
    Ok((name, path))
}

pub(crate) fn parse_option(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// `--state` of `runs`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum RunStateArg {
    Queued,
    Running,
    Finished,
    Cancelled,
}

impl From<RunStateArg> for RunState {
    fn from(a: RunStateArg) -> RunState {
        match a {
            RunStateArg::Queued => RunState::Queued,
            RunStateArg::Running => RunState::Running,
            RunStateArg::Finished => RunState::Finished,
            RunStateArg::Cancelled => RunState::Cancelled,
        }
    }
}
