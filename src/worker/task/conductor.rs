//! Runs the conductor: the configured argv template filled from the task
//! (no shell), in its own process group and a fresh working folder, with
//! stdout and stderr streamed line by line, an execution timeout and cancel
//! that kill the whole process group (TERM, grace, KILL).

use crate::protocol::logtext::{PackedLines, PackedText};
use crate::protocol::{DeviceProps, Outcome, Stream, TaskSpec};
use crate::worker::task::channel::LogFull;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

/// Longest log line kept; longer lines are cut and marked.
pub const MAX_LINE_BYTES: usize = crate::protocol::limits::MAX_LINE_BYTES / 4;

/// Why the conductor's command line could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("unknown placeholder {{{0}}} in conductor.command")]
    Unknown(String),
    #[error("unterminated placeholder in conductor.command argument {0:?}")]
    Unterminated(String),
    #[error("the testrun has no option {0:?}, which conductor.command uses as {{option:{0}}}")]
    MissingOption(String),
    #[error("the testrun has no secret {0:?}, which conductor.command uses as {{secret:{0}}}")]
    MissingSecret(String),
    #[error("{{packages...}} must be an argument of its own, not part of {0:?}")]
    SpreadNotAlone(String),
    #[error("conductor.command uses {{console}}, but this worker has no console ([serial] port) or it could not be re-exported")]
    NoConsole,
}

const PLACEHOLDERS: &[&str] = &[
    "image",
    "packages",
    "results_dir",
    "inputs_dir",
    "console",
    "work_dir",
    "task_id",
    "run_id",
    "attempt",
    "timeout",
    "device_group",
    "device_name",
    "device_id",
];

/// Checks one argument template at configuration time.
pub fn check_template(arg: &str) -> Result<(), String> {
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| TemplateError::Unterminated(arg.into()).to_string())?;
        let name = &rest[start + 1..start + end];
        let known = PLACEHOLDERS.contains(&name)
            || name.strip_prefix("option:").is_some_and(|o| !o.is_empty())
            || name.strip_prefix("secret:").is_some_and(|o| !o.is_empty())
            || (name == "packages..." && arg == "{packages...}");
        if name == "packages..." && arg != "{packages...}" {
            return Err(TemplateError::SpreadNotAlone(arg.into()).to_string());
        }
        if !known {
            return Err(TemplateError::Unknown(name.into()).to_string());
        }
        rest = &rest[start + end + 1..];
    }
    Ok(())
}

/// Everything a placeholder can refer to.
pub struct TaskContext<'a> {
    pub spec: &'a TaskSpec,
    pub device: &'a DeviceProps,
    pub work_dir: &'a Path,
    pub results_dir: &'a Path,
    /// The task's input files (empty folder if the testrun has none).
    pub inputs_dir: &'a Path,
    /// The device's console re-exported for the conductor, if the worker
    /// has one.
    pub console: Option<&'a Path>,
}

/// Fills the argv template. Each template argument stays one argument
/// (`{packages...}` expands to one per package), so values with spaces or
/// shell characters are passed through untouched.
pub fn expand(template: &[String], ctx: &TaskContext) -> Result<Vec<String>, TemplateError> {
    let mut argv = Vec::new();
    for arg in template {
        if arg == "{packages...}" {
            argv.extend(ctx.spec.packages.iter().cloned());
            continue;
        }
        let mut out = String::new();
        let mut rest = arg.as_str();
        while let Some(start) = rest.find('{') {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find('}')
                .ok_or_else(|| TemplateError::Unterminated(arg.clone()))?;
            let name = &rest[start + 1..start + end];
            let value = match name {
                "image" => ctx.spec.image.clone(),
                "packages" => ctx.spec.packages.join(","),
                "results_dir" => ctx.results_dir.display().to_string(),
                "inputs_dir" => ctx.inputs_dir.display().to_string(),
                "console" => match ctx.console {
                    Some(p) => p.display().to_string(),
                    None => return Err(TemplateError::NoConsole),
                },
                "work_dir" => ctx.work_dir.display().to_string(),
                "task_id" => ctx.spec.task.clone(),
                "run_id" => ctx.spec.run.clone(),
                "attempt" => ctx.spec.attempt.to_string(),
                "timeout" => ctx.spec.timeout_secs.to_string(),
                "device_group" => ctx.device.devicegroup.clone(),
                "device_name" => ctx.device.devicename.clone().unwrap_or_default(),
                "device_id" => ctx.device.deviceid.clone().unwrap_or_default(),
                other => match (other.strip_prefix("option:"), other.strip_prefix("secret:")) {
                    (Some(opt), _) => ctx
                        .spec
                        .options
                        .get(opt)
                        .cloned()
                        .ok_or_else(|| TemplateError::MissingOption(opt.into()))?,
                    (_, Some(secret)) => ctx
                        .spec
                        .secrets
                        .get(secret)
                        .cloned()
                        .ok_or_else(|| TemplateError::MissingSecret(secret.into()))?,
                    _ => return Err(TemplateError::Unknown(other.into())),
                },
            };
            out.push_str(&value);
            rest = &rest[start + end + 1..];
        }
        out.push_str(rest);
        argv.push(out);
    }
    Ok(argv)
}

/// Hides a testrun's secret values in text a conductor prints (and in
/// what the worker logs about the task): each occurrence becomes
/// `[secret:NAME]`. Longest secrets first, so one that contains another is
/// masked whole. A secret split across two output lines is not matched.
#[derive(Clone, Debug, Default)]
pub struct Masker {
    secrets: Vec<(String, String)>,
}

impl Masker {
    pub fn new(secrets: &std::collections::BTreeMap<String, String>) -> Self {
        let mut secrets: Vec<(String, String)> = secrets
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| (v.clone(), format!("[secret:{k}]")))
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
        Masker { secrets }
    }

    /// True if `bytes` contain a secret (then the lines are masked one by
    /// one; otherwise they are packed as they are).
    pub fn needs_mask(&self, bytes: &[u8]) -> bool {
        self.secrets
            .iter()
            .any(|(v, _)| memchr::memmem::find(bytes, v.as_bytes()).is_some())
    }

    pub fn mask(&self, text: String) -> String {
        let mut out = text;
        for (value, shown) in &self.secrets {
            if out.contains(value.as_str()) {
                out = out.replace(value.as_str(), shown);
            }
        }
        out
    }

    /// The environment variables carrying the secrets:
    /// `OTS_SECRET_<NAME>`, NAME upper-cased with `-` and `.` as `_`.
    pub fn env(secrets: &std::collections::BTreeMap<String, String>) -> Vec<(String, String)> {
        secrets
            .iter()
            .map(|(k, v)| {
                let name: String = k
                    .chars()
                    .map(|c| match c {
                        '-' | '.' => '_',
                        c => c.to_ascii_uppercase(),
                    })
                    .collect();
                (format!("OTS_SECRET_{name}"), v.clone())
            })
            .collect()
    }
}

/// Why the task ends early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    Running,
    /// The server cancelled the task.
    Cancel,
}

/// How to run one conductor.
pub struct Run {
    pub argv: Vec<String>,
    pub work_dir: PathBuf,
    pub timeout: Duration,
    pub kill_grace: Duration,
    /// Extra environment for the conductor.
    pub env: Vec<(String, String)>,
    /// Where to note the conductor's process group, so a restarted worker
    /// can kill what its predecessor left running.
    pub pgid_file: Option<PathBuf>,
    /// Hides the testrun's secrets in what the conductor prints.
    pub masker: Masker,
    /// Set when the server's log of the task is full: output is then
    /// counted, not packed.
    pub log_full: LogFull,
}

/// Runs the conductor to its end, sending every output line to `lines`.
/// `stop` switching to [`Stop::Cancel`] ends it early with the TERM → KILL
/// escalation. Never panics; a conductor that cannot start is an
/// [`Outcome`] with `failure` set.
pub async fn run(
    run: Run,
    lines: mpsc::Sender<PackedText>,
    mut stop: watch::Receiver<Stop>,
) -> Outcome {
    let Some((program, args)) = run.argv.split_first() else {
        return Outcome {
            failure: Some("conductor.command is empty".into()),
            ..Outcome::default()
        };
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&run.work_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    // systemd's notification socket and watchdog belong to ots-worker,
    // not to what it runs.
    for k in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
        command.env_remove(k);
    }
    for (k, v) in &run.env {
        command.env(k, v);
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                failure: Some(format!("cannot start {program:?}: {e}")),
                ..Outcome::default()
            }
        }
    };
    let pgid = Pid::from_raw(child.id().map(|p| p as i32).unwrap_or(0));
    if let Some(path) = &run.pgid_file {
        if let Err(e) = std::fs::write(path, pgid.as_raw().to_string()) {
            let _ = lines
                .send(PackedText::line(
                    Stream::Worker,
                    &format!("cannot note the process group in {}: {e}", path.display()),
                ))
                .await;
        }
    }
    let readers = [
        tokio::spawn(pump(
            child.stdout.take(),
            Stream::Stdout,
            run.masker.clone(),
            lines.clone(),
            run.log_full.clone(),
        )),
        tokio::spawn(pump(
            child.stderr.take(),
            Stream::Stderr,
            run.masker.clone(),
            lines.clone(),
            run.log_full.clone(),
        )),
    ];

    let mut outcome = Outcome::default();
    let deadline = tokio::time::sleep(run.timeout);
    tokio::pin!(deadline);
    let status = tokio::select! {
        status = child.wait() => Some(status),
        _ = &mut deadline => {
            outcome.timed_out = true;
            None
        }
        _ = stop.wait_for(|s| *s == Stop::Cancel) => {
            outcome.cancelled = true;
            None
        }
    };
    if outcome.timed_out {
        let _ = lines
            .send(PackedText::line(
                Stream::Worker,
                &format!(
                    "execution timeout after {} s: terminating the conductor's process group",
                    run.timeout.as_secs()
                ),
            ))
            .await;
    } else if outcome.cancelled {
        let _ = lines
            .send(PackedText::line(
                Stream::Worker,
                "task cancelled: terminating the conductor's process group",
            ))
            .await;
    }
    let status = match status {
        Some(status) => status,
        None => {
            signal_group(pgid, Signal::SIGTERM);
            match tokio::time::timeout(run.kill_grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    let _ = lines.send(PackedText::line(Stream::Worker, &format!("conductor still running {} ms after SIGTERM: killing its process group", run.kill_grace.as_millis()))).await;
                    signal_group(pgid, Signal::SIGKILL);
                    child.wait().await
                }
            }
        }
    };
    // Nothing of the task outlives it: TERM-ignoring grandchildren included.
    if signal_group(pgid, Signal::SIGKILL) {
        debug!(
            pgid = pgid.as_raw(),
            "killed processes left in the conductor's process group"
        );
    }
    for r in readers {
        // The pipes close once every process holding them is gone.
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    match status {
        Ok(status) => {
            outcome.exit_code = status.code();
            outcome.signal = status.signal();
        }
        Err(e) => outcome.failure = Some(format!("cannot wait for the conductor: {e}")),
    }
    outcome
}

/// Kills the process group noted in `pgid_file` by a previous worker
/// process, if it still exists. Returns true if something was killed.
pub fn kill_leftover(pgid_file: &Path) -> bool {
    let Some(pgid) = std::fs::read_to_string(pgid_file)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    else {
        return false;
    };
    signal_group(Pid::from_raw(pgid), Signal::SIGKILL)
}

/// Sends `signal` to the process group; true if it still existed.
fn signal_group(pgid: Pid, signal: Signal) -> bool {
    if pgid.as_raw() <= 1 {
        return false;
    }
    match killpg(pgid, signal) {
        Ok(()) => true,
        Err(nix::errno::Errno::ESRCH) => false,
        Err(e) => {
            warn!(pgid = pgid.as_raw(), %signal, error = %e, "cannot signal the conductor's process group");
            false
        }
    }
}

async fn pump(
    stream: Option<impl AsyncRead + Unpin>,
    which: Stream,
    masker: Masker,
    lines: mpsc::Sender<PackedText>,
    log_full: LogFull,
) {
    let Some(stream) = stream else { return };
    // The lines of one read go on together, packed as the server stores
    // them: one hand-over per pipe read, and no allocation per line (a
    // conductor printing a million short lines would otherwise spend the
    // worker's time in the allocator).
    let mut reader = BufReader::with_capacity(PIPE_READ_BYTES, stream);
    let mut packed = PackedLines::of(which);
    // Counting only (the server's log is full), and whether bytes after
    // the last newline wait for one (a line the end of the stream ends).
    let (mut counting, mut open_line) = (false, false);
    let needs_mask = |b: &[u8]| masker.needs_mask(b);
    let mask = |t: String| masker.mask(t);
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) => {
                packed.finish(&needs_mask, &mask);
                let (mut count, text) = packed.take();
                if counting && open_line {
                    count += 1;
                }
                if count > 0 {
                    let _ = lines
                        .send(PackedText {
                            stream: which,
                            count,
                            text,
                        })
                        .await;
                }
                return;
            }
            Ok(chunk) => chunk,
            Err(e) => {
                let _ = lines
                    .send(PackedText::line(
                        Stream::Worker,
                        &format!("cannot read conductor {which:?}: {e}"),
                    ))
                    .await;
                return;
            }
        };
        let used = chunk.len();
        if log_full.is_set() {
            // Nothing of it will be stored: the lines are only numbered,
            // by their newlines (a partial line's newline completes it;
            // a line over the length limit is not cut into pieces here),
            // and handed over as a count without text.
            if !counting {
                counting = true;
                open_line = packed.discard_partial();
            }
            let count = chunk.iter().filter(|&&b| b == b'\n').count() as u32;
            open_line = match chunk.last() {
                Some(&last) if count > 0 => last != b'\n',
                Some(_) => true,
                None => open_line,
            };
            reader.consume(used);
            if count > 0
                && lines
                    .send(PackedText {
                        stream: which,
                        count,
                        text: Vec::new(),
                    })
                    .await
                    .is_err()
            {
                return;
            }
            continue;
        }
        packed.push(chunk, &needs_mask, &mask);
        reader.consume(used);
        let (count, text) = packed.take();
        if count > 0
            && lines
                .send(PackedText {
                    stream: which,
                    count,
                    text,
                })
                .await
                .is_err()
        {
            return;
        }
    }
}

/// Bytes read from a conductor's pipe at once.
const PIPE_READ_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn spec() -> TaskSpec {
        let mut options = BTreeMap::new();
        options.insert("flavour".to_string(), "with space; rm -rf /".to_string());
        TaskSpec {
            hold: None,
            on_lease: None,
            task: "r-1.2".into(),
            run: "r-1".into(),
            attempt: 1,
            image: "file:///tmp/x.img".into(),
            packages: vec!["a".into(), "b".into()],
            timeout_secs: 60,
            options,
            ttl_ms: 1000,
            sent_ms: 0,
            secrets: Default::default(),
            inputs: Default::default(),
            health_check: false,
            recover: false,
        }
    }

    #[test]
    fn placeholders_become_single_arguments_without_a_shell() {
        let spec = spec();
        let device = DeviceProps::parse("devicegroup:g devicename:n").unwrap();
        let ctx = TaskContext {
            spec: &spec,
            device: &device,
            work_dir: Path::new("/w"),
            results_dir: Path::new("/w/results"),
            inputs_dir: Path::new("/w/inputs"),
            console: None,
        };
        let t: Vec<String> = [
            "run",
            "--img={image}",
            "{packages}",
            "{packages...}",
            "{option:flavour}",
            "{task_id}@{device_group}.{device_name}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            expand(&t, &ctx).unwrap(),
            vec![
                "run",
                "--img=file:///tmp/x.img",
                "a,b",
                "a",
                "b",
                "with space; rm -rf /",
                "r-1.2@g.n"
            ]
        );
        let bad = vec!["{option:missing}".to_string()];
        assert_eq!(
            expand(&bad, &ctx),
            Err(TemplateError::MissingOption("missing".into()))
        );
    }

    #[test]
    fn templates_are_checked_at_configuration_time() {
        assert!(check_template("{image}").is_ok());
        assert!(check_template("--x={option:foo}").is_ok());
        assert!(check_template("{imgae}")
            .unwrap_err()
            .contains("unknown placeholder"));
        assert!(check_template("{image")
            .unwrap_err()
            .contains("unterminated"));
        assert!(check_template("x{packages...}").is_err());
    }
}
