//! The device's power (`[power]` of `worker.toml`): the argument vectors
//! run for `on`, `off`, `cycle` and `status`, each bounded in time and in
//! the output read back, and the state read back after every action —
//! so `status` says what the device is, not what was last asked
//! (pdudaemon alone cannot tell, pdudaemon#97).

use crate::protocol::PowerAction;
use crate::worker::config::PowerConfig;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// Output of a power command read back, at most.
const MAX_OUTPUT: usize = 4096;

/// What a power action did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PowerOutcome {
    pub ok: bool,
    /// `on`, `off` or `unknown`.
    pub state: String,
    pub message: String,
}

/// `on`/`off` from a status command's output (its first word).
pub fn parse_state(output: &str) -> &'static str {
    match output
        .split_whitespace()
        .next()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("on" | "1" | "true") => "on",
        Some("off" | "0" | "false") => "off",
        _ => "unknown",
    }
}

/// Reads what fits, then drains the rest so the command never blocks on
/// a full pipe.
async fn read_some<R: tokio::io::AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) {
    let mut limited = r.take(MAX_OUTPUT as u64);
    let _ = limited.read_to_end(buf).await;
    let _ = tokio::io::copy(limited.into_inner(), &mut tokio::io::sink()).await;
}

/// Runs `argv` within `timeout`: its exit status and the start of its
/// output (stdout, then stderr), or why it could not run.
async fn run(argv: &[String], timeout: Duration) -> Result<(bool, String), String> {
    let Some((program, args)) = argv.split_first() else {
        return Err("no command configured".into());
    };
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {program:?}: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let work = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        tokio::join!(
            read_some(&mut stdout, &mut out),
            read_some(&mut stderr, &mut err)
        );
        let status = child.wait().await;
        (status, out, err)
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => Err(format!(
            "{program:?} still running after {} ([power] timeout), killed",
            humantime::format_duration(timeout)
        )),
        Ok((status, out, err)) => {
            let status = status.map_err(|e| format!("cannot wait for {program:?}: {e}"))?;
            let mut text = String::from_utf8_lossy(&out).trim().to_string();
            let err = String::from_utf8_lossy(&err).trim().to_string();
            if !err.is_empty() {
                if !text.is_empty() {
                    text.push_str("; ");
                }
                text.push_str(&err);
            }
            if !status.success() {
                return Ok((false, format!("{program:?} failed ({status}): {text}")));
            }
            Ok((true, text))
        }
    }
}

/// Carries out `action` and reads the state back.
pub async fn act(cfg: &PowerConfig, action: PowerAction) -> PowerOutcome {
    let timeout = Duration::from_millis(cfg.timeout_ms.max(1));
    let mut ok = true;
    let mut message = String::new();
    let step = |result: Result<(bool, String), String>, message: &mut String| match result {
        Ok((true, _)) => true,
        Ok((false, why)) | Err(why) => {
            *message = why;
            false
        }
    };
    let argv = |v: &Vec<String>, key: &str| {
        if v.is_empty() {
            Err(format!("this worker has no [power] {key} command"))
        } else {
            Ok(())
        }
    };
    match action {
        PowerAction::Status => {}
        PowerAction::On | PowerAction::Off => {
            let (v, key) = if action == PowerAction::On {
                (&cfg.on, "on")
            } else {
                (&cfg.off, "off")
            };
            ok = match argv(v, key) {
                Ok(()) => step(run(v, timeout).await, &mut message),
                Err(why) => step(Err(why), &mut message),
            };
        }
        PowerAction::Cycle if !cfg.cycle.is_empty() => {
            ok = step(run(&cfg.cycle, timeout).await, &mut message);
        }
        PowerAction::Cycle => {
            ok = match (argv(&cfg.off, "off"), argv(&cfg.on, "on")) {
                (Ok(()), Ok(())) => {
                    step(run(&cfg.off, timeout).await, &mut message) && {
                        tokio::time::sleep(Duration::from_millis(cfg.cycle_delay_ms)).await;
                        step(run(&cfg.on, timeout).await, &mut message)
                    }
                }
                (Err(why), _) | (_, Err(why)) => step(Err(why), &mut message),
            };
        }
    }
    let state = if cfg.status.is_empty() {
        if message.is_empty() && action == PowerAction::Status {
            message = "this worker has no [power] status command: its state is unknown".into();
        }
        "unknown".to_string()
    } else {
        match run(&cfg.status, timeout).await {
            Ok((true, out)) => parse_state(&out).to_string(),
            Ok((false, why)) | Err(why) => {
                if message.is_empty() {
                    message = format!("cannot read the state back: {why}");
                }
                if action == PowerAction::Status {
                    ok = false;
                }
                "unknown".to_string()
            }
        }
    };
    PowerOutcome { ok, state, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_is_the_first_word() {
        assert_eq!(parse_state("ON\n"), "on");
        assert_eq!(parse_state(" off port 3"), "off");
        assert_eq!(parse_state("1"), "on");
        assert_eq!(parse_state(""), "unknown");
        assert_eq!(parse_state("error: no such port"), "unknown");
    }

    #[tokio::test]
    async fn a_cycle_is_off_then_on_and_the_state_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let sh = |cmd: String| vec!["sh".to_string(), "-c".to_string(), cmd];
        let cfg = PowerConfig {
            on: sh(format!(
                "echo on >> {0}.log; echo on > {0}",
                state.display()
            )),
            off: sh(format!(
                "echo off >> {0}.log; echo off > {0}",
                state.display()
            )),
            cycle: Vec::new(),
            status: sh(format!("cat {}", state.display())),
            cycle_delay_ms: 10,
            timeout_ms: 10_000,
        };
        let out = act(&cfg, PowerAction::Cycle).await;
        assert_eq!(
            (out.ok, out.state.as_str()),
            (true, "on"),
            "{}",
            out.message
        );
        let log = std::fs::read_to_string(format!("{}.log", state.display())).unwrap();
        assert_eq!(log, "off\non\n");
        let out = act(&cfg, PowerAction::Off).await;
        assert_eq!(out.state, "off");
        let none = act(&PowerConfig::default().normalized(), PowerAction::On).await;
        assert!(
            !none.ok && none.message.contains("no [power] on command"),
            "{none:?}"
        );
        assert_eq!(none.state, "unknown");
    }
}
