//! The `ots-submit` command line: argument definitions and each
//! sub-command, printing for people (or JSON with `--json`). Returns the
//! process exit status; see [`super::exit`].

use crate::client::follow::{follow, FollowItem};
use crate::client::transfer::{Progress, Silent, Source};
use crate::client::{exit, Client, ClientError};
use crate::delivery::ranges::describe;
use crate::protocol::{
    DeviceSpec, Distribution, HealthAction, Priority, ProgressState, RunState, RunStatus,
    TestrunRequest, Verdict,
};
use crate::security::{Credentials, KeyPair, PublicKey};
use crate::text::{ago_short as ago, escape_controls};
use clap::{Args, Parser, Subcommand};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Submit testruns to an ots server and watch them.
#[derive(Debug, Parser)]
#[command(name = "ots-submit", version, after_help = EXIT_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_HELP: &str = "Exit status: 0 PASS, 1 FAIL, 2 ERROR, 3 cancelled, 64 usage error, \
65 refused by the server (e.g. no worker for the device), 69 server unreachable, \
70 local lab failed, 74 cannot write fetched files, 76 protocol error, \
77 the server refused our key or our role may not do this, 78 our own key files are missing or unusable.";

/// Where the server is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Server control endpoint, or a comma-separated list of the servers
    /// that may lead (a leader and its standby): the first that answers
    /// is used, and a reconnect tries them all.
    #[arg(long, env = "OTS_SERVER", default_value = "tcp://127.0.0.1:5555")]
    pub server: String,
    /// `noise` (authenticate with --key, pin --server-key) or `none` (a
    /// server configured with security = "none").
    #[arg(long, env = "OTS_SECURITY", default_value = "noise")]
    pub security: crate::security::SecurityMode,
    /// Our private key (`ots-submit keygen`) [default:
    /// ~/.config/ots/me.key].
    #[arg(long, env = "OTS_KEY")]
    pub key: Option<PathBuf>,
    /// The server's public key [default: ~/.config/ots/server.pub, else
    /// /etc/ots/server.pub]. (`OTS_SERVER_KEY` is the server's own
    /// private key, to ots-server only.)
    #[arg(long, env = "OTS_PINNED_SERVER_KEY")]
    pub server_key: Option<PathBuf>,
    /// Give up on an unanswered request after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `$XDG_CONFIG_HOME/ots` or `~/.config/ots`: where a user's key lives.
fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("ots")
}

impl Conn {
    /// Our key and the pinned server key, or a clear error saying what
    /// to create.
    pub fn credentials(&self) -> Result<Credentials, ClientError> {
        if self.security == crate::security::SecurityMode::None {
            return Ok(Credentials::None);
        }
        // `me.key` as `ots-submit keygen ~/.config/ots/me` writes it (an
        // older default, `key.key`, is still found).
        let key = self.key.clone().unwrap_or_else(|| {
            let me = config_dir().join("me.key");
            let old = config_dir().join("key.key");
            if !me.exists() && old.exists() {
                old
            } else {
                me
            }
        });
        let server_key = self.server_key.clone().unwrap_or_else(|| {
            let mine = config_dir().join("server.pub");
            let system = PathBuf::from("/etc/ots/server.pub");
            if !mine.exists() && system.exists() {
                system
            } else {
                mine
            }
        });
        let key = KeyPair::read(&key).map_err(|e| {
            ClientError::Credentials(format!(
                "{e}\n  create one with `ots-submit keygen {}` and ask the server's admin to put its .pub file into users.d/ (or pass --key; --security none for a server without security)",
                key.with_extension("").display()
            ))
        })?;
        let server = PublicKey::read(&server_key).map_err(|e| {
            ClientError::Credentials(format!(
                "{e}\n  get the server's public key (server.pub) from its admin and pass it with --server-key (OTS_PINNED_SERVER_KEY) or put it at {}",
                server_key.display()
            ))
        })?;
        Ok(Credentials::Noise { key, server })
    }

    /// Connects (and authenticates) to the server.
    pub async fn connect(&self) -> Result<Client, ClientError> {
        Client::connect(&self.server, self.connect_timeout, &self.credentials()?).await
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new key pair: BASE.key (private, mode 0600) and BASE.pub.
    Keygen {
        /// Path without extension, e.g. ~/.config/ots/me.
        base: PathBuf,
    },
    /// Write the man page and shell completions under DIR (install step).
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
    /// Submit a testrun; prints its id (and, with --wait, its verdict).
    Run(RunArgs),
    /// Wait for a testrun submitted earlier; exit status as for `run --wait`.
    Wait {
        run: String,
        /// Stream the tasks' log lines too.
        #[arg(long)]
        follow: bool,
        /// Afterwards, download the result files here.
        #[arg(long)]
        fetch: Option<PathBuf>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show a testrun's state, tasks and verdicts.
    Status {
        run: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a testrun: queued tasks at once, running ones TERM → KILL.
    Cancel {
        run: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// List the workers the server knows: state, task, last heard,
    /// version, drained.
    Workers {
        #[command(flatten)]
        conn: Conn,
    },
    /// List recent testruns, newest first: state, verdict, owner, age.
    Runs {
        /// Only testruns in this state (queued, running, finished, cancelled).
        #[arg(long)]
        state: Option<RunStateArg>,
        /// Only testruns of this owner.
        #[arg(long)]
        owner: Option<String>,
        /// At most this many (1–1000).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
        limit: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show the queued tasks per routing key, with position and age.
    Queue {
        #[command(flatten)]
        conn: Conn,
    },
    /// Drain a worker: it finishes its task and takes no new one
    /// (operator, admin). `--undo` puts it back to work.
    Drain {
        worker: String,
        #[arg(long)]
        undo: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Sign in to the web dashboard: asks the server (over this key's
    /// Noise connection) for a single-use link, valid 60 s, printed as
    /// the last line and opened with $BROWSER if that is set.
    Web {
        #[command(flatten)]
        conn: Conn,
    },
    /// Which of the servers in --server leads: each endpoint is asked at
    /// once; the leader answers with its lease (epoch, since when), a
    /// standby answers `not_leader` naming the leader it knows. Exits 0
    /// when one leads, 69 when none does.
    Leader {
        #[command(flatten)]
        conn: Conn,
    },
    /// List notification deliveries (webhooks, mail), newest first: the
    /// event, where it goes, state, attempts, last result, next try; for
    /// an operator, each target's standing first (failing since, alert).
    Notifications {
        /// Only this testrun's.
        #[arg(long)]
        run: Option<String>,
        /// Only failed ones.
        #[arg(long)]
        failed: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Send a notification again now, with the same id, whatever its
    /// state (operator, admin). The id is the first column of
    /// `notifications`.
    NotifyRetry {
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// A worker's device health and its history: why it is good,
    /// suspect, bad, in maintenance or retired.
    Health {
        worker: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Run a health check on a worker now (operator, admin): it goes
    /// before any other task; pass makes it good, fail bad.
    Check {
        worker: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Put a worker into maintenance (`on`: no tasks, no checks) or take
    /// it out (`off`: unknown until its health check passes) (operator,
    /// admin).
    Maintenance {
        worker: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
        /// Why: kept in its health history and the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Retire a worker: out of service for good (operator, admin);
    /// `maintenance WORKER off` brings it back.
    Retire {
        worker: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Put a drained worker back to work (operator, admin).
    Undrain {
        worker: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the server's audit log: registrations, refusals, submits,
    /// cancels, drains, revocations (admin).
    Audit {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show who the server takes this key for, and its role.
    Whoami {
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the stored logs of a testrun's tasks.
    Logs {
        run: String,
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
        /// Print the log as stored, control characters included (by
        /// default they are shown escaped, so a log cannot drive the
        /// terminal).
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Download a testrun's result files into DIR/<task>/.
    Fetch {
        run: String,
        dir: PathBuf,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub conn: Conn,
    /// Device spec: "devicegroup:X [devicename:Y] [deviceid:Z]"; several
    /// separated by ';' run the packages on each spec in parallel, e.g.
    /// "devicegroup:a; devicegroup:b devicename:x" (the verdict is over
    /// all).
    #[arg(long, required_unless_present = "local")]
    pub device: Option<String>,
    /// Image URL or path for the conductor to flash.
    #[arg(long, required_unless_present = "local")]
    pub image: Option<String>,
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
fn local_image(image: String) -> String {
    let path = Path::new(&image);
    let mut sent = image.clone();
    if !image.contains("://") && path.is_relative() && path.exists() {
        if let Ok(abs) = std::fs::canonicalize(path) {
            sent = abs.display().to_string();
        }
    }
    // A worker under its systemd unit (PrivateTmp=yes) has a /tmp of its
    // own: a path there names nothing it can see.
    let local = sent.strip_prefix("file://").unwrap_or(&sent);
    if local.starts_with("/tmp/") || local.starts_with("/var/tmp/") {
        eprintln!(
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

/// Parses `90s`, `30m`, `2h`, `500ms` or plain seconds; refuses values
/// that do not fit (no overflow, whatever is typed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // A bare number is seconds; anything else as humantime reads it
    // (250ms, 90s, 30m, 2h, 1h 30m, 2d).
    if let Ok(n) = text.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 90s, 30m, 2h or 1h 30m ({e})"))
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
fn parse_secret(text: &str) -> Result<(String, String), String> {
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
                eprintln!(
                    "ots-submit: warning: the value of --secret {k} is on the command line, where every local user can read it (/proc/PID/cmdline, ps); use --secret {k}=@FILE, --secret {k}=- (standard input) or --secret {k} with {} set",
                    secret_env_name(&k)
                );
            }
            Ok((k, v))
        }
    }
}

fn parse_input(text: &str) -> Result<(String, PathBuf), String> {
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

fn parse_option(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

fn fail(e: &ClientError) -> i32 {
    // The message may quote what a server sent: shown escaped.
    eprintln!("ots-submit: {}", escape_controls(&e.to_string()));
    e.exit_code()
}

/// Runs a parsed command line; returns the exit status.
pub async fn main(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Keygen { base } => {
            return i32::from(crate::security::keys::keygen_command("ots-submit", &base))
        }
        Command::GenDocs { dir } => {
            use clap::CommandFactory;
            return match crate::docs::generate(Cli::command(), &dir) {
                Ok(()) => exit::PASS,
                Err(e) => {
                    eprintln!("ots-submit: cannot write into {}: {e}", dir.display());
                    exit::IO
                }
            };
        }
        Command::Run(args) => return run(args).await,
        Command::Wait {
            run,
            follow,
            fetch,
            conn,
        } => return wait(&conn, &run, follow, fetch.as_deref()).await,
        Command::Status { run, conn } => status(&conn, &run).await,
        Command::Cancel { run, conn } => cancel(&conn, &run).await,
        Command::Workers { conn } => workers(&conn).await,
        Command::Runs {
            state,
            owner,
            limit,
            conn,
        } => runs(&conn, state.map(RunStateArg::into), owner, limit).await,
        Command::Queue { conn } => queue(&conn).await,
        Command::Drain { worker, undo, conn } => drain(&conn, &worker, !undo).await,
        Command::Undrain { worker, conn } => drain(&conn, &worker, false).await,
        Command::Health { worker, conn } => health(&conn, &worker, None, "").await,
        Command::Web { conn } => web(&conn).await,
        Command::Leader { conn } => leader(&conn).await,
        Command::Notifications { run, failed, conn } => {
            notifications(&conn, run.as_deref(), failed).await
        }
        Command::NotifyRetry { id, conn } => notify_retry(&conn, &id).await,
        Command::Check { worker, conn } => {
            health(&conn, &worker, Some(HealthAction::Check), "").await
        }
        Command::Maintenance {
            worker,
            state,
            reason,
            conn,
        } => {
            let action = if state == "on" {
                HealthAction::MaintenanceOn
            } else {
                HealthAction::MaintenanceOff
            };
            health(&conn, &worker, Some(action), &reason).await
        }
        Command::Retire {
            worker,
            reason,
            conn,
        } => health(&conn, &worker, Some(HealthAction::Retire), &reason).await,
        Command::Audit { conn } => audit(&conn).await,
        Command::Whoami { conn } => whoami(&conn).await,
        Command::Logs {
            run,
            task,
            raw,
            conn,
        } => logs(&conn, &run, task.as_deref(), raw).await,
        Command::Fetch { run, dir, conn } => fetch_cmd(&conn, &run, &dir).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

fn verdict_exit(status: &RunStatus) -> i32 {
    match (status.state, status.verdict) {
        (RunState::Cancelled, _) => exit::CANCELLED,
        (_, Some(Verdict::Pass)) => exit::PASS,
        (_, Some(Verdict::Fail)) => exit::FAIL,
        _ => exit::ERROR,
    }
}

async fn run(mut args: RunArgs) -> i32 {
    let device = args
        .device
        .clone()
        .unwrap_or_else(|| "devicegroup:example".into());
    let mut specs = Vec::new();
    for part in device.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        match DeviceSpec::parse(part) {
            Ok(d) => specs.push(d),
            Err(e) => {
                eprintln!("ots-submit: --device: {e}");
                return exit::USAGE;
            }
        }
    }
    if specs.is_empty() {
        eprintln!("ots-submit: --device: no device spec given; write e.g. \"devicegroup:n900\"");
        return exit::USAGE;
    }
    let device = specs.remove(0);
    let more_devices = specs;
    let mut lab = None;
    if args.local {
        match crate::local::Lab::start(&device, args.local_workers, args.conductor.clone()).await {
            Ok(l) => {
                args.conn.server = l.control().to_string();
                args.conn.security = crate::security::SecurityMode::Noise;
                args.conn.key = Some(l.user_key());
                args.conn.server_key = Some(l.server_key());
                if !args.conn.json {
                    println!(
                        "local lab: server {} with {} worker(s) for {}, state in {}",
                        l.control(),
                        args.local_workers,
                        device,
                        l.state_dir().display()
                    );
                }
                lab = Some(l);
            }
            Err(e) => {
                eprintln!("ots-submit: cannot start the local lab: {e}");
                return exit::SOFTWARE;
            }
        }
        args.wait = true;
        if args.image.is_none() {
            args.image = Some(crate::local::example_image().display().to_string());
        }
        if let Some(image) = args.image.as_deref().filter(|i| !i.contains("://")) {
            if !Path::new(image).exists() {
                eprintln!("ots-submit: --image {image}: no such file here (with --local the workers run on this machine and read the image from this path)");
                lab.take().expect("just started").shutdown().await;
                return exit::USAGE;
            }
        }
        if args.packages.is_empty() {
            args.packages = vec!["smoke".into(), "network".into(), "storage".into()];
        }
    }
    let code = submit_and_watch(&args, device, more_devices).await;
    if let Some(lab) = lab {
        lab.shutdown().await;
    }
    code
}

async fn submit_and_watch(args: &RunArgs, device: DeviceSpec, devices: Vec<DeviceSpec>) -> i32 {
    let testrun = TestrunRequest {
        device,
        devices,
        image: local_image(args.image.clone().unwrap_or_default()),
        packages: args.packages.clone(),
        distribution: args.distribution,
        timeout_secs: args.timeout.as_secs(),
        options: args.options.iter().cloned().collect::<BTreeMap<_, _>>(),
        queue_anyway: args.queue_anyway,
        secrets: args.secrets.iter().cloned().collect::<BTreeMap<_, _>>(),
        inputs: Vec::new(),
        owner: None,
        priority: args.priority,
        notify: args.notify.clone(),
    };
    let mut testrun = testrun;
    let mut client = match args.conn.connect().await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    for (name, path) in &args.inputs {
        let mut progress = progress_for(args.conn.json, "uploading");
        match client.upload_input(name, path, progress.as_mut()).await {
            Ok(input) => testrun.inputs.push(input),
            Err(e) => {
                eprintln!("ots-submit: input file {}: {e}", path.display());
                return e.exit_code();
            }
        }
    }
    let (run, tasks) = match client.submit(testrun).await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let json = args.conn.json;
    let wait = args.wait || args.follow || args.fetch.is_some();
    if !wait {
        if json {
            println!("{}", serde_json::json!({ "run": run, "tasks": tasks }));
        } else {
            println!("{run}");
        }
        return exit::PASS;
    }
    if json {
        println!(
            "{}",
            typed(
                "submitted",
                serde_json::json!({ "run": run, "tasks": tasks })
            )
        );
    } else {
        println!("testrun {run} submitted: {} task(s)", tasks.len());
    }
    watch(
        &mut client,
        &args.conn,
        &run,
        args.follow,
        args.fetch.as_deref(),
    )
    .await
}

async fn wait(conn: &Conn, run: &str, logs: bool, fetch_dir: Option<&Path>) -> i32 {
    let mut client = match conn.connect().await {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    watch(&mut client, conn, &run.to_string(), logs, fetch_dir).await
}

/// Follows a testrun to its end, prints the summary, fetches results;
/// returns the exit status for its verdict.
async fn watch(
    client: &mut Client,
    conn: &Conn,
    run: &String,
    logs: bool,
    fetch_dir: Option<&Path>,
) -> i32 {
    let json = conn.json;
    let started = Instant::now();
    let status = follow(client, run, logs, |item| print_item(&item, started, json)).await;
    let status = match status {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if json {
        println!(
            "{}",
            typed(
                "status",
                serde_json::to_value(&status).expect("status serialises")
            )
        );
    } else {
        print_summary(&status);
    }
    if let Some(dir) = fetch_dir {
        // In JSON mode the status line above already lists the files.
        let report = if json {
            FetchReport::Quiet
        } else {
            FetchReport::Text
        };
        if let Err(e) = fetch(client, &status, dir, report).await {
            return fail(&e);
        }
    }
    verdict_exit(&status)
}

/// One JSON Lines record of the streaming commands (`run --wait`,
/// `--follow`, `wait` with `--json`): `value`'s fields and `type` (one of
/// `submitted`, `event`, `log`, `status`).
fn typed(kind: &str, value: serde_json::Value) -> String {
    let mut map = match value {
        serde_json::Value::Object(m) => m,
        other => {
            let mut m = serde_json::Map::new();
            m.insert("value".into(), other);
            m
        }
    };
    map.insert("type".into(), serde_json::Value::String(kind.to_string()));
    serde_json::Value::Object(map).to_string()
}

fn print_item(item: &FollowItem, started: Instant, json: bool) {
    let t = started.elapsed().as_secs_f32();
    match item {
        FollowItem::Event(e) if json => println!(
            "{}",
            typed("event", serde_json::to_value(e).expect("event serialises"))
        ),
        FollowItem::Event(e) => {
            let what = match e.state {
                ProgressState::Queued => "queued".to_string(),
                ProgressState::Dispatched => {
                    format!("dispatched to {}", e.worker.as_deref().unwrap_or("?"))
                }
                ProgressState::Running => "running".to_string(),
                ProgressState::Requeued => {
                    format!(
                        "re-queued: {}",
                        escape_controls(e.reason.as_deref().unwrap_or(""))
                    )
                }
                ProgressState::Finished => format!(
                    "{}: {}",
                    e.verdict.map_or("ended".to_string(), |v| v.to_string()),
                    escape_controls(e.reason.as_deref().unwrap_or(""))
                ),
                ProgressState::Cancelled => {
                    format!(
                        "cancelled: {}",
                        escape_controls(e.reason.as_deref().unwrap_or(""))
                    )
                }
                ProgressState::RunFinished => format!(
                    "testrun finished: {}",
                    e.verdict
                        .map_or("no verdict".to_string(), |v| v.to_string())
                ),
                ProgressState::RunCancelled => "testrun cancelled".to_string(),
            };
            match &e.task {
                Some(task) => println!("[{t:6.1}s] {task} {what}"),
                None => println!("[{t:6.1}s] {what}"),
            }
        }
        FollowItem::Lines { task, lines } => {
            for l in lines {
                if json {
                    println!(
                        "{}",
                        typed(
                            "log",
                            serde_json::json!({ "task": task, "seq": l.seq, "stream": l.stream, "text": l.text })
                        )
                    );
                } else {
                    let source = match l.stream {
                        crate::protocol::Stream::Serial => "[serial] ",
                        crate::protocol::Stream::Stderr => "[stderr] ",
                        _ => "",
                    };
                    println!("  {task} | {source}{}", escape_controls(&l.text));
                }
            }
        }
        FollowItem::Missed { task, lines } => {
            eprintln!("  {task} | ({lines} live log lines not received here; `ots-submit logs` shows what the server stored)");
        }
        FollowItem::ServerAway(e) => {
            eprintln!("ots-submit: {e}; the server went away, waiting for it to come back (Ctrl-C to stop waiting)")
        }
        FollowItem::ServerBack => eprintln!("ots-submit: the server is back; still following"),
        FollowItem::NoLiveEvents(e) => {
            eprintln!("ots-submit: no live events ({e}); polling the server instead")
        }
    }
}

fn print_summary(status: &RunStatus) {
    for t in &status.tasks {
        let verdict = match (t.state, t.verdict) {
            (crate::protocol::TaskState::Cancelled, _) => "CANCELLED".to_string(),
            (_, Some(v)) => v.to_string(),
            (s, None) => format!("{s:?}").to_uppercase(),
        };
        let on = match &t.device {
            Some(d) => format!(" on {d}"),
            None => String::new(),
        };
        println!(
            "task {}{on} [{}] {} — {} (worker {}, attempt {})",
            t.task,
            t.packages.join(","),
            verdict,
            escape_controls(t.reason.as_deref().unwrap_or("")),
            t.worker.as_deref().unwrap_or("-"),
            t.attempts
        );
        if let Some(w) = &t.waiting {
            let could = if w.workers_total == 0 {
                "no registered worker has this device".to_string()
            } else {
                let shown: Vec<String> = w
                    .workers
                    .iter()
                    .map(|x| {
                        format!(
                            "{} ({})",
                            escape_controls(&x.name),
                            escape_controls(&x.doing)
                        )
                    })
                    .collect();
                let more = w.workers_total.saturating_sub(w.workers.len() as u64);
                format!(
                    "could run on {}{}",
                    shown.join(", "),
                    if more > 0 {
                        format!(" and {more} more")
                    } else {
                        String::new()
                    }
                )
            };
            let estimate = match w.estimate_ms {
                Some(ms) => format!("; may start in about {}", ago(ms)),
                None => String::new(),
            };
            println!(
                "    waiting: position {} under {} ({} of the same owner and {} of others ahead); {could}{estimate}",
                w.position, w.key, w.ahead_own, w.ahead_others
            );
        }
        if !t.log_gaps.is_empty() {
            let lost: u64 = t.log_gaps.iter().map(|(a, b)| b - a + 1).sum();
            println!(
                "    {lost} log lines lost, seq {} (of {} produced; never arrived at the server)",
                describe(&t.log_gaps),
                t.log_lines_produced.unwrap_or(0)
            );
        }
    }
    let verdict = match (status.state, status.verdict) {
        (RunState::Cancelled, _) => "CANCELLED".to_string(),
        (_, Some(v)) => v.to_string(),
        (s, None) => format!("{s:?}").to_uppercase(),
    };
    println!("testrun {}: {verdict}", status.run);
}

/// "2026-11-26 13:47:14.123" (UTC) for a Unix time in ms.
fn datetime(ms: u64) -> String {
    crate::clock::human(ms)
}

fn print_history(status: &RunStatus) {
    for t in &status.tasks {
        println!("history of {} (UTC):", t.task);
        for h in &t.history {
            let state = format!("{:?}", h.state).to_lowercase();
            let mut line = format!(
                "    {}  {state:<10} attempt {}",
                datetime(h.at_ms),
                h.attempt
            );
            if let Some(w) = &h.worker {
                line.push_str(&format!("  worker {w}"));
            }
            if let Some(r) = &h.reason {
                line.push_str(&format!("  {}", escape_controls(r)));
            }
            println!("{line}");
        }
    }
}

async fn status(conn: &Conn, run: &str) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let status = client.status(&run.to_string()).await?;
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("status serialises")
        );
    } else {
        println!(
            "testrun {} for {} image {}: {:?}",
            status.run, status.device, status.image, status.state
        );
        print_summary(&status);
        print_history(&status);
        if let Some(p) = &status.pruned {
            println!(
                "result files and logs pruned at {} UTC ({} bytes): {}",
                datetime(p.at_ms),
                p.bytes,
                escape_controls(&p.reason)
            );
        }
        let interesting: Vec<String> = status
            .counters
            .iter()
            .filter(|(k, _)| {
                k.starts_with("orphan")
                    || k.contains("lost")
                    || k.contains("malformed")
                    || k.contains("version")
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !interesting.is_empty() {
            println!("server counters: {}", interesting.join(" "));
        }
    }
    Ok(
        if matches!(status.state, RunState::Finished | RunState::Cancelled) {
            verdict_exit(&status)
        } else {
            exit::PASS
        },
    )
}

async fn cancel(conn: &Conn, run: &str) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let before = client.status(&run.to_string()).await?;
    if matches!(before.state, RunState::Finished | RunState::Cancelled) {
        let how = match (before.state, before.verdict) {
            (RunState::Cancelled, _) => "was already cancelled".to_string(),
            (_, Some(v)) => format!("already finished with verdict {v}"),
            _ => "already finished".to_string(),
        };
        if conn.json {
            println!(
                "{}",
                serde_json::to_string(&before).expect("status serialises")
            );
        } else {
            println!("testrun {run} {how}; nothing to cancel");
        }
        return Ok(exit::PASS);
    }
    let status = client.cancel(&run.to_string()).await?;
    if conn.json {
        println!(
            "{}",
            serde_json::to_string(&status).expect("status serialises")
        );
    } else {
        let queued = before
            .tasks
            .iter()
            .filter(|t| t.state == crate::protocol::TaskState::Queued)
            .count();
        let running = before
            .tasks
            .iter()
            .filter(|t| !t.state.is_final() && t.state != crate::protocol::TaskState::Queued)
            .count();
        println!(
            "cancel requested for {}: {queued} queued task(s) cancelled, {running} running task(s) being stopped",
            status.run
        );
    }
    Ok(exit::PASS)
}

async fn drain(conn: &Conn, worker: &str, drain: bool) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let w = client.drain(worker, drain).await?;
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&w).expect("worker serialises")
        );
    } else if drain {
        println!(
            "worker {} drained: {}",
            w.name,
            match &w.task {
                Some(t) => format!("it finishes task {t}, then takes no new one"),
                None => "it takes no new task".into(),
            }
        );
    } else {
        println!("worker {} takes tasks again", w.name);
    }
    Ok(exit::PASS)
}

fn delivery_line(d: &crate::protocol::NotificationInfo) -> String {
    let next = match d.next_ms {
        Some(ms) if d.state == "pending" => {
            let now = crate::protocol::limits::unix_ms_now();
            if ms <= now {
                "now".to_string()
            } else {
                format!("in {}", ago(ms - now))
            }
        }
        _ => "-".to_string(),
    };
    format!(
        "{:<36} {:<21} {:<7} {:<9} {:>8} {:<24} {:<10} {}",
        d.id,
        serde_json::to_value(d.event)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        d.run.as_deref().unwrap_or("-"),
        d.state,
        d.attempts,
        escape_controls(d.last.as_deref().unwrap_or("-"))
            .chars()
            .take(24)
            .collect::<String>(),
        next,
        escape_controls(&d.target)
    )
}

async fn notifications(conn: &Conn, run: Option<&str>, failed: bool) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let (deliveries, targets) = client.notifications(run, failed).await?;
    if conn.json {
        let v = serde_json::json!({ "deliveries": deliveries, "targets": targets });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("notifications serialise")
        );
        return Ok(exit::PASS);
    }
    if !targets.is_empty() {
        println!(
            "{:<20} {:<8} {:>7} {:>9} {:>8}  {:<20} LAST ERROR",
            "TARGET", "KIND", "PENDING", "IN FLIGHT", "FAILURES", "FAILING SINCE"
        );
        for t in &targets {
            let since = match t.failing_since_ms {
                Some(ms) => format!(
                    "{}{}",
                    ago(crate::protocol::limits::unix_ms_now().saturating_sub(ms)),
                    if t.alert { " ago ALERT" } else { " ago" }
                ),
                None => "-".into(),
            };
            println!(
                "{:<20} {:<8} {:>7} {:>9} {:>8}  {:<20} {}",
                t.name,
                t.kind,
                t.pending,
                t.in_flight,
                t.failures,
                since,
                escape_controls(t.last_error.as_deref().unwrap_or("-"))
            );
        }
        println!();
    }
    if deliveries.is_empty() {
        println!(
            "no {}notifications{}",
            if failed { "failed " } else { "" },
            run.map(|r| format!(" for {r}")).unwrap_or_default()
        );
    } else {
        println!(
            "{:<36} {:<21} {:<7} {:<9} {:>8} {:<24} {:<10} TARGET",
            "ID", "EVENT", "RUN", "STATE", "ATTEMPTS", "LAST", "NEXT"
        );
        for d in &deliveries {
            println!("{}", delivery_line(d));
        }
    }
    Ok(exit::PASS)
}

async fn notify_retry(conn: &Conn, id: &str) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let d = client.retry_notification(id).await?;
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&d).expect("notification serialises")
        );
    } else {
        println!(
            "notification {} to {} is sent again now (attempt {})",
            d.id,
            escape_controls(&d.target),
            d.attempts + 1
        );
    }
    Ok(exit::PASS)
}

/// What one endpoint answered `leader`.
#[derive(serde::Serialize)]
struct Standing {
    endpoint: String,
    /// `leader` (it answered), `no answer` or `refused`.
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    server: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lease: Option<crate::protocol::LeaseInfo>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn leader(conn: &Conn) -> Result<i32, ClientError> {
    let credentials = conn.credentials()?;
    let endpoints = crate::settings::endpoints(&conn.server);
    if endpoints.is_empty() || endpoints.len() > 16 {
        eprintln!(
            "ots-submit: --server {:?} (or OTS_SERVER): give 1 to 16 endpoints, comma-separated",
            conn.server
        );
        return Ok(exit::USAGE);
    }
    let asked = endpoints.iter().map(|ep| {
        let credentials = credentials.clone();
        async move {
            match Client::connect(ep, conn.connect_timeout, &credentials).await {
                Ok(c) => {
                    let (server, lease) = c.leader();
                    Standing {
                        endpoint: ep.clone(),
                        state: "leader",
                        server: Some(server.to_string()),
                        lease: lease.cloned(),
                        error: None,
                    }
                }
                // A standby's own words (the endpoint is printed already).
                Err(ClientError::Refused {
                    code: crate::protocol::ErrorCode::NotLeader,
                    message,
                }) => Standing {
                    endpoint: ep.clone(),
                    state: "standby",
                    server: None,
                    lease: None,
                    error: Some(
                        message
                            .strip_prefix(&format!("{ep}: "))
                            .unwrap_or(&message)
                            .to_string(),
                    ),
                },
                Err(e) => Standing {
                    endpoint: ep.clone(),
                    state: if matches!(e, ClientError::Unreachable { .. }) {
                        "no answer"
                    } else {
                        "refused"
                    },
                    server: None,
                    lease: None,
                    error: Some(e.to_string()),
                },
            }
        }
    });
    let standings = futures::future::join_all(asked).await;
    let leaders = standings.iter().filter(|s| s.state == "leader").count();
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&standings).expect("standings serialise")
        );
    } else {
        let now = now_ms();
        for s in &standings {
            let what = match (&s.lease, &s.server, &s.error) {
                (Some(l), Some(server), _) => format!(
                    "leader  epoch {}  since {} ({} ago)  server {}",
                    l.epoch,
                    crate::clock::iso(l.since_ms),
                    ago(now.saturating_sub(l.since_ms)),
                    escape_controls(server)
                ),
                (None, Some(server), _) => format!(
                    "serving alone (state in SQLite, no lease)  server {}",
                    escape_controls(server)
                ),
                (_, None, Some(e)) if s.state == "no answer" => {
                    format!("no answer: down or unreachable ({})", escape_controls(e))
                }
                (_, None, Some(e)) if s.state == "standby" => escape_controls(e).to_string(),
                (_, _, e) => format!("refused: {}", escape_controls(e.as_deref().unwrap_or("?"))),
            };
            println!("{}  {what}", s.endpoint);
        }
    }
    Ok(if leaders > 0 {
        exit::PASS
    } else {
        exit::UNREACHABLE
    })
}

async fn web(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let (url, expires_ms) = client.web_login().await?;
    if conn.json {
        let v = serde_json::json!({ "url": url, "expires_ms": expires_ms });
        println!("{v}");
        return Ok(exit::PASS);
    }
    if let Some(browser) = std::env::var_os("BROWSER").filter(|b| !b.is_empty()) {
        // Like xdg-open: the browser gets the link as its argument; it is
        // not waited for (it may stay open for the whole session).
        match std::process::Command::new(&browser)
            .arg(&url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(_) => eprintln!("opened with $BROWSER ({})", browser.to_string_lossy()),
            Err(e) => eprintln!(
                "could not start $BROWSER ({}): {e}; open the link yourself",
                browser.to_string_lossy()
            ),
        }
    }
    eprintln!(
        "open this link within 60 s (it works once; until {} UTC):",
        datetime(expires_ms)
    );
    println!("{url}");
    Ok(exit::PASS)
}

async fn health(
    conn: &Conn,
    worker: &str,
    action: Option<HealthAction>,
    reason: &str,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let (w, history) = client.worker_health(worker, action, reason).await?;
    if conn.json {
        let v = serde_json::json!({ "worker": w, "history": history });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("report serialises")
        );
        return Ok(exit::PASS);
    }
    match action {
        Some(HealthAction::Check) => println!(
            "health check of {} queued: it runs before any other task",
            w.name
        ),
        Some(_) => println!("worker {} is now {}", w.name, w.health),
        None => {}
    }
    println!(
        "{}: {} since {} UTC: {}",
        w.name,
        w.health,
        datetime(w.health_since_ms),
        escape_controls(&w.health_reason)
    );
    if w.drained {
        println!(
            "drained (it stays drained whatever its health: ots-submit undrain {})",
            w.name
        );
    }
    if action.is_none() {
        println!("history (oldest first):");
        for c in &history {
            let what = if c.from == c.to {
                format!("{}", c.to)
            } else {
                format!("{} -> {}", c.from, c.to)
            };
            println!(
                "  {} UTC  {:<24} {}",
                datetime(c.at_ms),
                what,
                escape_controls(&c.reason)
            );
        }
    }
    Ok(exit::PASS)
}

async fn audit(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let text = client.audit().await?;
    let text = String::from_utf8_lossy(&text);
    if conn.json {
        // JSON Lines, as the server keeps them.
        print!("{}", escape_controls(&text));
        return Ok(exit::PASS);
    }
    // For people: the date, who, from where, what.
    for line in text.lines() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(v) => println!(
                "{} UTC  {:<24} {:<22} {:<10} {}",
                datetime(v["at_ms"].as_u64().unwrap_or(0)),
                escape_controls(v["identity"].as_str().unwrap_or("-")),
                escape_controls(v["address"].as_str().unwrap_or("-")),
                escape_controls(v["event"].as_str().unwrap_or("-")),
                escape_controls(v["detail"].as_str().unwrap_or(""))
            ),
            Err(_) => println!("{}", escape_controls(line)),
        }
    }
    Ok(exit::PASS)
}

async fn whoami(conn: &Conn) -> Result<i32, ClientError> {
    let client = conn.connect().await?;
    match client.identity() {
        Some(crate::security::Identity::User { name, role }) => {
            println!("user {name}, role {}", role.as_str())
        }
        Some(crate::security::Identity::Worker { name, .. }) => println!("worker {name}"),
        None => println!("anonymous (the server runs with security = \"none\")"),
    }
    Ok(exit::PASS)
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

/// "12s", "5m", "3h", "2d": how long ago, for people.

fn now_ms() -> u64 {
    crate::protocol::limits::unix_ms_now()
}

async fn runs(
    conn: &Conn,
    state: Option<RunState>,
    owner: Option<String>,
    limit: u32,
) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let runs = client.runs(state, owner, limit).await?;
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&runs).expect("runs serialise")
        );
        return Ok(exit::PASS);
    }
    if runs.is_empty() {
        println!("no testruns");
        return Ok(exit::PASS);
    }
    println!(
        "{:<8} {:<10} {:<8} {:<12} {:>5} {:>8}  DEVICE",
        "RUN", "STATE", "VERDICT", "OWNER", "TASKS", "AGE"
    );
    let now = now_ms();
    for r in runs {
        println!(
            "{:<8} {:<10} {:<8} {:<12} {:>5} {:>8}  {}",
            r.run,
            format!("{:?}", r.state).to_lowercase(),
            r.verdict.map_or("-".to_string(), |v| v.to_string()),
            escape_controls(r.owner.as_deref().unwrap_or("-")),
            r.tasks,
            if r.submitted_ms == 0 {
                "?".to_string()
            } else {
                ago(now.saturating_sub(r.submitted_ms))
            },
            r.device
        );
    }
    Ok(exit::PASS)
}

async fn queue(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let queues = client.queue().await?;
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&queues).expect("queues serialise")
        );
        return Ok(exit::PASS);
    }
    if queues.is_empty() {
        println!("nothing queued");
        return Ok(exit::PASS);
    }
    println!(
        "{:<24} {:>4} {:<14} {:<8} {:<12} {:>8} {:>9}  AHEAD (OWN / OTHERS)",
        "ROUTING KEY", "POS", "TASK", "RUN", "OWNER", "WAITING", "STARTS IN"
    );
    for q in queues {
        for t in &q.tasks {
            println!(
                "{:<24} {:>4} {:<14} {:<8} {:<12} {:>8} {:>9}  {} / {}",
                q.key,
                t.position,
                t.task,
                t.run,
                escape_controls(t.owner.as_deref().unwrap_or("-")),
                ago(t.age_ms),
                t.estimate_ms
                    .map_or("?".to_string(), |ms| format!("~{}", ago(ms))),
                t.ahead_own,
                t.ahead_others
            );
        }
        if q.length > q.tasks.len() as u64 {
            println!("{:<24} … {} more", q.key, q.length - q.tasks.len() as u64);
        }
        // Why they wait: who could take them, and what each is doing.
        if q.workers_total == 0 {
            println!(
                "{:<24} waiting for a worker with this device: none is registered",
                q.key
            );
        } else {
            let shown: Vec<String> = q
                .workers
                .iter()
                .map(|w| {
                    format!(
                        "{} ({})",
                        escape_controls(&w.name),
                        escape_controls(&w.doing)
                    )
                })
                .collect();
            let more = q.workers_total.saturating_sub(q.workers.len() as u64);
            println!(
                "{:<24} could run on: {}{}",
                q.key,
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(exit::PASS)
}

async fn workers(conn: &Conn) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let workers = client.workers().await?;
    if conn.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&workers).expect("workers serialise")
        );
    } else if workers.is_empty() {
        println!("no workers registered");
    } else {
        println!(
            "{:<20} {:<8} {:<11} {:<7} {:<14} {:>10} {:<10} {:<12} DEVICE",
            "NAME", "STATE", "HEALTH", "DRAINED", "TASK", "LAST HEARD", "VERSION", "CONSOLE"
        );
        for w in workers {
            let pinned = match &w.pinned {
                Some(p) => format!(" (may serve: {})", escape_controls(p)),
                None => String::new(),
            };
            println!(
                "{:<20} {:<8} {:<11} {:<7} {:<14} {:>10} {:<10} {:<12} {}{pinned}",
                w.name,
                format!("{:?}", w.state).to_lowercase(),
                w.health.as_str(),
                if w.drained { "yes" } else { "no" },
                w.task.as_deref().unwrap_or("-"),
                format!("{} ago", ago(w.last_heard_ms_ago)),
                escape_controls(w.version.as_deref().unwrap_or("-")),
                match w.console.as_deref() {
                    None => "-".to_string(),
                    Some("ok") => "ok".to_string(),
                    Some(_) => "unavailable".to_string(),
                },
                w.device
            );
        }
    }
    Ok(exit::PASS)
}

async fn logs(conn: &Conn, run: &str, only: Option<&str>, raw: bool) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let status = client.status(&run.to_string()).await?;
    if let Some(task) = only {
        if !status.tasks.iter().any(|t| t.task == task) {
            let known: Vec<&str> = status.tasks.iter().map(|t| t.task.as_str()).collect();
            eprintln!(
                "ots-submit: testrun {run} has no task {task:?} (its tasks: {})",
                known.join(", ")
            );
            return Ok(exit::USAGE);
        }
    }
    let mut all = BTreeMap::new();
    for t in status
        .tasks
        .iter()
        .filter(|t| only.is_none_or(|o| o == t.task))
    {
        let text = client.read_all(&t.task, None).await?;
        let text = String::from_utf8_lossy(&text).into_owned();
        if conn.json {
            all.insert(t.task.clone(), text);
        } else {
            println!("==== {} [{}] ====", t.task, t.packages.join(","));
            if raw {
                print!("{text}");
            } else {
                print!("{}", escape_controls(&text));
            }
        }
    }
    if conn.json {
        println!("{}", serde_json::to_string(&all).expect("logs serialise"));
    }
    Ok(exit::PASS)
}

async fn fetch_cmd(conn: &Conn, run: &str, dir: &Path) -> Result<i32, ClientError> {
    let mut client = conn.connect().await?;
    let status = client.status(&run.to_string()).await?;
    let report = if conn.json {
        FetchReport::Json
    } else {
        FetchReport::Text
    };
    fetch(&mut client, &status, dir, report).await?;
    Ok(exit::PASS)
}

/// Downloads every result file of `status` into `dir/<task>/<name>`,
/// verifying each against its SHA-256.
async fn fetch(
    client: &mut Client,
    status: &RunStatus,
    dir: &Path,
    report: FetchReport,
) -> Result<(), ClientError> {
    let mut count = 0;
    let mut bytes = 0u64;
    let mut downloaded = 0u64;
    let started = std::time::Instant::now();
    for t in &status.tasks {
        for f in &t.files {
            let rel = crate::protocol::check::relative_path(&f.name).ok_or_else(|| {
                ClientError::Protocol(format!(
                    "result file name {:?} is not a safe relative path; not fetched",
                    f.name
                ))
            })?;
            let path = dir.join(&t.task).join(rel);
            let source = Source::Result {
                task: t.task.clone(),
                name: f.name.clone(),
            };
            let mut progress = progress_for(!matches!(report, FetchReport::Text), "fetching");
            downloaded += client
                .download_to(&source, f.size, &f.sha256, &path, progress.as_mut())
                .await?;
            count += 1;
            bytes += f.size;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    match report {
        FetchReport::Json => {
            let summary = serde_json::json!({
                "files": count,
                "bytes": bytes,
                "downloaded": downloaded,
                "seconds": secs,
                "dir": dir,
            });
            println!("{summary}");
        }
        FetchReport::Text => println!(
            "fetched {count} result file(s), {bytes} bytes ({downloaded} downloaded now, {:.1} MB/s), verified, into {}",
            downloaded as f64 / secs.max(1e-6) / 1e6,
            dir.display()
        ),
        FetchReport::Quiet => {}
    }
    Ok(())
}

/// A progress bar on a terminal, plain lines on stderr otherwise, nothing
/// with `--json`.
fn progress_for(quiet: bool, verb: &'static str) -> Box<dyn Progress + Send> {
    use std::io::IsTerminal;
    if quiet {
        Box::new(Silent)
    } else if std::io::stderr().is_terminal() {
        Box::new(Bar { bar: None, verb })
    } else {
        Box::new(Lines {
            verb,
            what: String::new(),
            started: std::time::Instant::now(),
            bytes: 0,
            from: 0,
        })
    }
}

/// An indicatif bar with bytes, rate and ETA.
struct Bar {
    bar: Option<indicatif::ProgressBar>,
    verb: &'static str,
}

impl Progress for Bar {
    fn start(&mut self, what: &str, size: u64, from: u64) {
        let bar = indicatif::ProgressBar::new(size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("a valid template")
            .progress_chars("=> "),
        );
        bar.set_message(format!("{} {what}", self.verb));
        bar.set_position(from);
        self.bar = Some(bar);
    }
    fn advance(&mut self, bytes: u64) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }
    fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish();
        }
    }
}

/// One line when a transfer starts and one when it ends (not a terminal).
struct Lines {
    verb: &'static str,
    what: String,
    started: std::time::Instant,
    bytes: u64,
    from: u64,
}

impl Progress for Lines {
    fn start(&mut self, what: &str, size: u64, from: u64) {
        self.what = what.to_string();
        self.started = std::time::Instant::now();
        self.bytes = 0;
        self.from = from;
        if from > 0 {
            eprintln!("{} {what}: {size} bytes, resuming at {from}", self.verb);
        } else {
            eprintln!("{} {what}: {size} bytes", self.verb);
        }
    }
    fn advance(&mut self, bytes: u64) {
        self.bytes += bytes;
    }
    fn finish(&mut self) {
        let secs = self.started.elapsed().as_secs_f64().max(1e-6);
        eprintln!(
            "{} {}: done, {} bytes in {secs:.2} s ({:.1} MB/s)",
            self.verb,
            self.what,
            self.bytes,
            self.bytes as f64 / secs / 1e6
        );
    }
}

/// How `fetch` reports what it downloaded.
#[derive(Clone, Copy)]
enum FetchReport {
    Text,
    Json,
    Quiet,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_times_are_utc_clock_times() {
        assert_eq!(crate::clock::time_of_day(1_700_000_000_123), "22:13:20.123");
        assert_eq!(datetime(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(datetime(0), "1970-01-01 00:00:00.000");
        assert_eq!(datetime(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn durations_parse_like_an_operator_writes_them() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_duration("9999999999999999h").is_err());
        assert!(parse_duration("18446744073709551616s").is_err());
    }

    #[test]
    fn task_timeouts_are_whole_seconds_within_the_protocol_limit() {
        assert_eq!(parse_task_timeout("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(
            parse_task_timeout("168h").unwrap(),
            Duration::from_secs(604_800)
        );
        for bad in [
            "0s",
            "1500ms",
            "169h",
            "18446744073709551615s",
            "9999999999999999h",
        ] {
            let e = parse_task_timeout(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn control_characters_are_escaped_for_the_terminal() {
        assert_eq!(escape_controls("plain\ttab"), "plain\ttab");
        assert_eq!(escape_controls("a\u{1b}[2Jb\u{7}"), "a\\x1b[2Jb\\x07");
        assert_eq!(escape_controls("x\u{9b}y"), "x\\u{9b}y");
    }
}
