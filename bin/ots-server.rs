//! `ots-server`: binds the control and events sockets and serves until
//! SIGTERM or SIGINT.

use clap::{Parser, Subcommand};
use ots::server::config::ServerConfig;
use ots::server::{Fatal, Server, ServerError};
use std::path::PathBuf;
use std::process::ExitCode;

/// The ots server: accepts testruns and hands tasks to workers.
#[derive(Debug, Parser)]
#[command(name = "ots-server", version)]
struct Args {
    /// Configuration file (TOML): /etc/ots/server.toml as installed (the
    /// source tree's conf/server.toml documents every key).
    #[arg(long)]
    config: Option<PathBuf>,
    /// ROUTER endpoint, e.g. tcp://0.0.0.0:5555 (overrides `control`).
    #[arg(long)]
    control: Option<String>,
    /// PUB endpoint, e.g. tcp://0.0.0.0:5556 (overrides `events`).
    #[arg(long)]
    events: Option<String>,
    /// State directory (overrides `state_dir`).
    #[arg(long)]
    state_dir: Option<PathBuf>,
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
        /// Path without extension, e.g. /etc/ots/server.
        base: PathBuf,
    },
    /// Make a secured lab to try by hand in DIR: keys for the server, the
    /// workers and you, allow-lists, DIR/server.toml, DIR/worker.toml and
    /// DIR/env (for ots-submit). Nothing outside DIR is read or written;
    /// running it again keeps the keys.
    Lab {
        dir: PathBuf,
        /// Worker names to make keys for.
        #[arg(long, value_delimiter = ',', default_value = "w1,w2")]
        workers: Vec<String>,
        /// Your user name (role admin).
        #[arg(long, default_value = "me")]
        user: String,
        /// The server's control endpoint.
        #[arg(long, default_value = "tcp://127.0.0.1:5555")]
        control: String,
        /// The server's events endpoint.
        #[arg(long, default_value = "tcp://127.0.0.1:5556")]
        events: String,
    },
    /// Write the man page and shell completions under DIR (install step).
    #[command(hide = true)]
    GenDocs { dir: PathBuf },
}

/// sysexits EX_CONFIG.
const EXIT_CONFIG: u8 = 78;
/// sysexits EX_UNAVAILABLE: could not bind or open state.
const EXIT_UNAVAILABLE: u8 = 69;
/// sysexits EX_SOFTWARE: the serving loop ended abnormally.
const EXIT_SOFTWARE: i32 = 70;
/// sysexits EX_IOERR: state could not be committed (or a helper that
/// writes it is gone): nothing more is acknowledged.
const EXIT_IOERR: i32 = 74;
/// sysexits EX_TEMPFAIL: a leader lost its lease; systemd starts it
/// again, and it comes back as a standby.
const EXIT_DEPOSED: i32 = 75;

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
    if let Some(Cmd::Lab {
        dir,
        workers,
        user,
        control,
        events,
    }) = &args.command
    {
        return match ots::setup::lab(dir, workers, user, control, events) {
            Ok(lab) => {
                ots::outln!("lab in {}:", lab.dir.display());
                ots::outln!("  ots-server --config {}", lab.server_config.display());
                for w in workers {
                    ots::outln!(
                        "  ots-worker --config {} --name {w} --state-dir {}",
                        lab.worker_config.display(),
                        lab.dir.join(w).display()
                    );
                }
                ots::outln!(
                    "  . {}   # then ots-submit talks to it as {user}",
                    lab.env.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                ots::errln!("ots-server: lab: {e}");
                ExitCode::from(73)
            }
        };
    }
    if let Some(Cmd::Keygen { base }) = &args.command {
        return ExitCode::from(ots::security::keys::keygen_command("ots-server", base));
    }
    ots::fatal::exit_on_panic("ots-server");
    ots::durable::private_by_default();
    let overrides = [
        ("control", args.control),
        ("events", args.events),
        ("state_dir", args.state_dir.map(|p| p.display().to_string())),
    ];
    let cfg = match ServerConfig::load(args.config.as_deref(), &overrides) {
        Ok(cfg) if args.check_config => {
            let files: Vec<&std::path::Path> = args.config.as_deref().into_iter().collect();
            for line in ots::settings::explain(&cfg, "OTS_SERVER", &files, &overrides) {
                ots::outln!("{line}");
            }
            return check_server(&cfg).await;
        }
        Ok(cfg) => cfg,
        Err(e) => {
            ots::errln!("ots-server: configuration error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    ots::logging::init(&cfg.log_level);
    match Server::run(cfg, ots::shutdown::requested()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ (ServerError::Stopped(_) | ServerError::Task(_))) => {
            ots::errln!("ots-server: {e}");
            let code = match e {
                ServerError::Stopped(Fatal::Deposed { .. }) => EXIT_DEPOSED,
                ServerError::Stopped(Fatal::Commit(_) | Fatal::DeskGone | Fatal::NotifierGone) => {
                    EXIT_IOERR
                }
                _ => EXIT_SOFTWARE,
            };
            // At once, as the serving loop stopped: the sockets close with
            // the process, and no task of the runtime is waited for.
            std::process::exit(code)
        }
        Err(e) if e.is_configuration() => {
            ots::errln!("ots-server: cannot start: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            ots::errln!("ots-server: cannot start: {e}");
            ExitCode::from(EXIT_UNAVAILABLE)
        }
    }
}

/// `--check-config`: every problem a start would refuse (exit 78) or an
/// allow-list entry it would skip, each naming its file.
async fn check_server(cfg: &ServerConfig) -> ExitCode {
    if cfg.security == ots::security::SecurityMode::Noise {
        if let Ok(loaded) = ots::security::AllowList::load(&cfg.workers_dir, &cfg.users_dir) {
            ots::outln!("allow-lists: {} identities allowed", loaded.list.len());
        }
    }
    let mut problems = cfg.problems();
    // The database is part of the configuration: a start would connect.
    if let Some(pg) = cfg.postgres() {
        match pg.probe(std::time::Duration::from_secs(5)).await {
            Ok(target) => ots::outln!("database: connected to {target}"),
            Err(e) => problems.push(ots::settings::Problem::fatal(format!(
                "setting `database`: {e}"
            ))),
        }
    }
    ots::settings::report_problems(&problems)
}
