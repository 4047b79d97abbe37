//! `ots-worker`: one per device under test; runs until SIGTERM or SIGINT.

use clap::{Parser, Subcommand};
use ots::worker::config::WorkerConfig;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio::sync::watch;

/// The ots worker: takes tasks for one device and runs its conductor.
#[derive(Debug, Parser)]
#[command(name = "ots-worker", version)]
struct Args {
    /// Configuration file (TOML): /etc/ots/worker.toml as installed (the
    /// source tree's conf/worker.toml documents every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Logical worker name, unique per server (overrides `name`).
    #[arg(long)]
    name: Option<String>,
    /// Server control endpoint (overrides `server`).
    #[arg(long)]
    server: Option<String>,
    /// Server events endpoint (overrides `events`).
    #[arg(long)]
    events: Option<String>,
    /// Device: "devicegroup:X [devicename:Y] [deviceid:Z]" (overrides `device`).
    #[arg(long)]
    device: Option<String>,
    /// State directory (overrides `state_dir`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Per-instance configuration layered over --config, if it exists
    /// (ots-worker@NAME: /etc/ots/worker.d/NAME.toml names its device).
    #[arg(long)]
    instance_config: Option<PathBuf>,
    /// Print the effective configuration, each value with where it came
    /// from (default, file, env, flag), and exit: 0 if valid, 78 if not.
    #[arg(long)]
    check_config: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Write a new key pair: BASE.key (private, mode 0600) and BASE.pub.
    Keygen {
        /// Path without extension, e.g. /etc/ots/worker.
        base: PathBuf,
    },
    /// Write the man page and shell completions under DIR (install step).
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
}

/// sysexits EX_CONFIG.
const EXIT_CONFIG: u8 = 78;
/// sysexits EX_CANTCREAT: the state directory is unusable.
const EXIT_CANTCREAT: u8 = 73;
/// sysexits EX_IOERR: the session could not be saved while running.
const EXIT_IOERR: u8 = 74;

/// sysexits EX_TEMPFAIL: the server refused the worker's name because
/// another live worker has it. Temporary: once the other one is gone (or
/// renamed), a restart registers.
const EXIT_NAME_IN_USE: u8 = 75;

#[tokio::main]
async fn main() -> ExitCode {
    let args: Args = match ots::docs::parse_daemon_args() {
        Ok(a) => a,
        Err(code) => return code,
    };
    if let Some(Cmd::GenDocs { dir }) = &args.command {
        use clap::CommandFactory;
        return ots::docs::gen_docs_command(Args::command(), dir);
    }
    if let Some(Cmd::Keygen { base }) = &args.command {
        return ExitCode::from(ots::security::keys::keygen_command("ots-worker", base));
    }
    ots::fatal::exit_on_panic("ots-worker");
    ots::durable::private_by_default();
    let overrides = [
        ("name", args.name),
        ("server", args.server),
        ("events", args.events),
        ("device", args.device),
        ("state_dir", args.state_dir.map(|p| p.display().to_string())),
    ];
    let cfg = match WorkerConfig::load_layered(
        args.config.as_deref(),
        args.instance_config.as_deref(),
        &overrides,
    ) {
        Ok(cfg) if args.check_config => {
            let files: Vec<&std::path::Path> = args
                .config
                .as_deref()
                .into_iter()
                .chain(args.instance_config.as_deref().filter(|p| p.exists()))
                .collect();
            for line in ots::settings::explain(&cfg, "OTS_WORKER", &files, &overrides) {
                ots::outln!("{line}");
            }
            return ots::settings::report_problems(&cfg.problems());
        }
        Ok(cfg) => cfg,
        Err(e) => {
            ots::errln!("ots-worker: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    ots::logging::init(&cfg.log_level);
    let (stop, stop_rx) = watch::channel(ots::shutdown::Stop::Run);
    // SIGHUP (systemctl reload): the configuration is read and checked
    // again; a running worker applies it at its next start, and says
    // which settings changed (or what is wrong with the new file).
    let running_cfg = serde_json::to_value(&cfg).unwrap_or_default();
    let (config, instance) = (args.config.clone(), args.instance_config.clone());
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            match WorkerConfig::load_layered(config.as_deref(), instance.as_deref(), &overrides) {
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: the configuration on disk is not valid; the running worker keeps its own — fix it before the next restart")
                }
                Ok(new) => {
                    let new = serde_json::to_value(&new).unwrap_or_default();
                    let changed = changed_keys("", &running_cfg, &new);
                    if changed.is_empty() {
                        tracing::info!("SIGHUP: configuration unchanged");
                    } else {
                        tracing::warn!(changed = %changed.join(", "), "SIGHUP: configuration valid; these settings change at the next restart (systemctl restart), none is applied to a running task");
                    }
                }
            }
        }
    });
    let worker = tokio::spawn(ots::worker::run(cfg, stop_rx));
    // The first SIGTERM/SIGINT stops gracefully (stop_policy), a second
    // one at once.
    tokio::spawn(async move {
        let mut asked = ots::shutdown::Stop::Run;
        loop {
            ots::shutdown::requested().await;
            asked = asked.escalate();
            if stop.send(asked).is_err() {
                return;
            }
        }
    });
    let result = worker.await;
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            ots::errln!("ots-worker: {e}");
            match e {
                ots::worker::WorkerError::Config(_) => ExitCode::from(EXIT_CONFIG),
                ots::worker::WorkerError::StateDir { .. } | ots::worker::WorkerError::State(_) => {
                    ExitCode::from(EXIT_CANTCREAT)
                }
                ots::worker::WorkerError::NameInUse { .. } => ExitCode::from(EXIT_NAME_IN_USE),
                ots::worker::WorkerError::Save(_) => ExitCode::from(EXIT_IOERR),
                // A key file problem, or a key the server allows under
                // another name: fixing it takes an operator, not a restart.
                ots::worker::WorkerError::Security(_)
                | ots::worker::WorkerError::Forbidden { .. } => ExitCode::from(EXIT_CONFIG),
            }
        }
        Err(e) => {
            ots::errln!("ots-worker: worker task failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Dotted keys whose values differ between two configurations.
fn changed_keys(prefix: &str, a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            keys.into_iter()
                .flat_map(|k| {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    changed_keys(
                        &p,
                        x.get(k).unwrap_or(&serde_json::Value::Null),
                        y.get(k).unwrap_or(&serde_json::Value::Null),
                    )
                })
                .collect()
        }
        _ if a == b => Vec::new(),
        _ => vec![prefix.to_string()],
    }
}
