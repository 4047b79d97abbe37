//! The `ots-submit` command line: argument definitions and each
//! sub-command, printing for people (or JSON with `--json`). Returns the
//! process exit status; see [`crate::client::exit`].
//!
//! - `conn`: the connection flags every command shares, exit statuses.
//! - `args`: what a testrun is asked with, and the parsers of its values.
//! - `run`: `run`, `wait`, `status`: submitting, following, summing up.
//! - `manage`: cancel, drain, health, notifications, leader, web, audit,
//!   whoami.
//! - `lists`: runs, queue, workers, logs.
//! - `fetch`: result files to a folder, with progress.

mod args;
mod complete;
mod conn;
mod fetch;
mod leases;
mod lists;
mod manage;
mod results;
mod run;

use crate::cli::args::{RunArgs, RunStateArg};
use crate::cli::conn::fail;
pub use crate::cli::conn::{hoist_global_options, Conn};
use crate::cli::fetch::fetch_cmd;
use crate::cli::lists::{cases, logs, queue, runs, workers};
use crate::cli::manage::{
    audit, cancel, drain, health, leader, notifications, notify_retry, web, whoami,
};
use crate::cli::run::{run, status, wait};
use crate::client::exit;
use crate::protocol::{HealthAction, LeaseAction};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Submit testruns to an ots server and watch them.
#[derive(Debug, Parser)]
#[command(name = "ots-submit", version, after_help = EXIT_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

pub(crate) const EXIT_HELP: &str = "Exit status: 0 PASS, 1 FAIL, 2 ERROR, 3 cancelled, 64 usage error, \
65 refused by the server (e.g. no worker for the device), 69 server unreachable, \
70 local lab failed, 74 cannot write fetched files, 76 protocol error, \
77 the server refused our key or our role may not do this, 78 our own key files are missing or unusable.";

#[derive(Debug, Subcommand)]
// The command line is parsed once; the size of its largest variant
// (`run`'s many options) costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
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
    /// List a testrun's test cases (from its JUnit result files): status,
    /// name, duration and the failure's first line.
    Cases {
        run: String,
        /// Only failing cases (fail, error).
        #[arg(long)]
        failed: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Compare a testrun's test cases with an earlier one (default: the
    /// last finished testrun of its series): regressions, fixed, still
    /// failing, flaky, device-specific, known issues, new and removed.
    /// Exit status 1 when there are regressions.
    Compare(results::CompareArgs),
    /// One test case's results over time: status per testrun, with
    /// device, worker, image, duration; when it last passed and first
    /// failed.
    History(results::HistoryArgs),
    /// Test cases that passed and failed on one series and image among
    /// the recent finished testruns, with the evidence.
    Flaky(results::FlakyArgs),
    /// What the devices did: per device group and device, busy, idle,
    /// leased, broken and offline time, task attempts and infrastructure
    /// errors; per owner, device hours.
    Report(results::ReportArgs),
    /// Known-issue rules: failures they match carry a label and are not
    /// regressions.
    Known {
        #[command(subcommand)]
        action: results::KnownCommand,
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
    /// Candidates for shell completion, one per line (the completion
    /// scripts call it): KIND is runs, tasks, workers or leases.
    #[command(hide = true)]
    Complete {
        kind: String,
        #[arg(default_value = "")]
        prefix: String,
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
    /// Reserve one device matching SPEC ("devicegroup:X [devicename:Y]
    /// [deviceid:Z]") for a person: prints the lease id (l12). It waits
    /// in the same fair-share queue as tasks; `leases` shows it.
    Reserve {
        spec: String,
        /// How long it holds once granted (within your role's maximum).
        #[arg(long, default_value = "1h", value_parser = crate::cli::conn::parse_duration)]
        duration: std::time::Duration,
        /// Why: shown to everyone in `leases`, kept in the audit log.
        #[arg(long, default_value = "")]
        reason: String,
        /// Wait until it is granted, showing its place in the queue.
        #[arg(long)]
        wait: bool,
        /// Keep it alive until interrupted (Ctrl-C releases it): for a CI
        /// job whose steps use the device.
        #[arg(long)]
        keep: bool,
        #[arg(long, value_enum, default_value_t = crate::protocol::Priority::Normal)]
        priority: crate::protocol::Priority,
        /// Queue even if no known worker has a matching device.
        #[arg(long)]
        queue_anyway: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Your leases, waiting and held; `--all`: everyone's (a submit user:
    /// its own) with the ones that ended.
    Leases {
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// End a lease: its consoles close, its device is checked before the
    /// next task. `--force`: someone else's (operator, admin).
    Release {
        lease: String,
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Conn,
    },
    /// Hold a lease DURATION from now (within your role's maximum).
    Renew {
        lease: String,
        #[arg(long, value_parser = crate::cli::conn::parse_duration)]
        duration: Option<std::time::Duration>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Share a lease's console with a user (read only), or stop sharing.
    Lease {
        #[arg(value_parser = ["share", "unshare"])]
        what: String,
        lease: String,
        user: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Power the leased device on or off, cycle it, or read its state
    /// (the holder, or an operator). Prints the state read back.
    Power {
        lease: String,
        #[arg(value_enum)]
        action: crate::protocol::PowerAction,
        #[command(flatten)]
        conn: Conn,
    },
    /// Attach to a leased device's serial console: first what it printed
    /// in the last --since, then everything live. On a terminal, raw mode
    /// (`~.` at a line's start leaves); from a pipe, stdin goes to the
    /// device and the device to stdout, until stdin ends and the output
    /// has been quiet for --linger.
    Console {
        lease: String,
        #[arg(long, default_value = "60s", value_parser = crate::cli::conn::parse_duration)]
        since: std::time::Duration,
        #[arg(long, default_value = "2s", value_parser = crate::cli::conn::parse_duration)]
        linger: std::time::Duration,
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

/// Runs a parsed command line; returns the exit status.
pub async fn main(cli: Cli) -> i32 {
    let result = match cli.command {
        Command::Keygen { base } => {
            return i32::from(crate::security::keys::keygen_command("ots-submit", &base))
        }
        Command::GenDocs { dir } => {
            use clap::CommandFactory;
            let made = crate::docs::generate(Cli::command(), &dir)
                .and_then(|()| complete::add_to_scripts(&dir));
            return match made {
                Ok(()) => exit::PASS,
                Err(e) => {
                    crate::errln!("ots-submit: cannot write into {}: {e}", dir.display());
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
        Command::Cases { run, failed, conn } => cases(&conn, &run, failed).await,
        Command::Compare(args) => results::compare(args).await,
        Command::History(args) => results::history(args).await,
        Command::Flaky(args) => results::flaky(args).await,
        Command::Known { action } => results::known(action).await,
        Command::Report(args) => results::report(args).await,
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
        Command::Complete { kind, prefix, conn } => {
            return complete::complete(conn, &kind, &prefix).await
        }
        Command::Logs {
            run,
            task,
            raw,
            conn,
        } => logs(&conn, &run, task.as_deref(), raw).await,
        Command::Fetch { run, dir, conn } => fetch_cmd(&conn, &run, &dir).await,
        Command::Reserve {
            spec,
            duration,
            reason,
            wait,
            keep,
            priority,
            queue_anyway,
            conn,
        } => {
            let a = leases::ReserveArgs {
                spec,
                duration,
                reason,
                wait,
                keep,
                priority,
                queue_anyway,
            };
            leases::reserve(&conn, a).await
        }
        Command::Leases { all, conn } => leases::leases(&conn, all).await,
        Command::Release { lease, force, conn } => {
            leases::act(&conn, &lease, LeaseAction::Release, force, None, None).await
        }
        Command::Renew {
            lease,
            duration,
            conn,
        } => leases::act(&conn, &lease, LeaseAction::Renew, false, duration, None).await,
        Command::Lease {
            what,
            lease,
            user,
            conn,
        } => {
            let action = if what == "share" {
                LeaseAction::Share
            } else {
                LeaseAction::Unshare
            };
            leases::act(&conn, &lease, action, false, None, Some(user)).await
        }
        Command::Power {
            lease,
            action,
            conn,
        } => leases::power(&conn, &lease, action).await,
        Command::Console {
            lease,
            since,
            linger,
            conn,
        } => leases::console(&conn, &lease, since, linger).await,
    };
    match result {
        Ok(code) => code,
        Err(e) => fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::args::*;
    use super::conn::*;
    use super::run::*;
    use crate::text::escape_controls;
    use std::time::Duration;

    #[test]
    fn history_times_are_utc_clock_times() {
        assert_eq!(crate::clock::time_of_day(1_700_000_000_123), "22:13:20.123");
        assert_eq!(datetime(1_700_000_000_123), "2023-11-14 22:13:20.123");
        assert_eq!(datetime(0), "1970-01-01 00:00:00.000");
        assert_eq!(datetime(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn a_server_is_host_port_or_tcp_and_anything_else_is_named() {
        use crate::cli::conn::parse_server;
        assert_eq!(
            parse_server("127.0.0.1:25555").unwrap(),
            "tcp://127.0.0.1:25555"
        );
        assert_eq!(
            parse_server("tcp://a:1, b.example:2").unwrap(),
            "tcp://a:1,tcp://b.example:2"
        );
        assert_eq!(parse_server("[::1]:5555").unwrap(), "tcp://[::1]:5555");
        assert!(parse_server("ipc:///tmp/x")
            .unwrap_err()
            .contains("tcp only"));
        assert!(parse_server("localhost").unwrap_err().contains("HOST:PORT"));
        assert!(parse_server("host:port").unwrap_err().contains("HOST:PORT"));
        assert!(parse_server(":5555").is_err());
    }

    #[test]
    fn connection_options_before_the_subcommand_are_read_after_it() {
        use clap::Parser;
        let args = |s: &str| {
            s.split(' ')
                .map(std::ffi::OsString::from)
                .collect::<Vec<_>>()
        };
        let moved = hoist_global_options(args(
            "ots-submit --server h:1 --json --key=k runs --limit 5",
        ));
        assert_eq!(
            moved,
            args("ots-submit runs --limit 5 --server h:1 --json --key=k")
        );
        let cli = super::Cli::try_parse_from(moved).unwrap();
        let super::Command::Runs { conn, .. } = cli.command else {
            panic!("not runs")
        };
        assert_eq!((conn.server.as_str(), conn.json), ("tcp://h:1", true));
        // Before a `--`; nothing else moves; a lone option is clap's to refuse.
        assert_eq!(
            hoist_global_options(args("p --json logs t -- x")),
            args("p logs t --json -- x")
        );
        assert_eq!(
            hoist_global_options(args("p runs --json")),
            args("p runs --json")
        );
        assert_eq!(hoist_global_options(args("p --server")), args("p --server"));
        assert!(super::Cli::try_parse_from(hoist_global_options(args("p --bogus runs"))).is_err());
    }

    #[test]
    fn usage_lines_name_only_what_is_required() {
        use clap::CommandFactory;
        let mut cli = super::Cli::command();
        cli.build();
        for sub in cli.get_subcommands_mut() {
            let usage = sub.render_usage().to_string();
            for optional in [
                "--server <",
                "--key <",
                "--server-key <",
                "--security <",
                "--json",
            ] {
                assert!(!usage.contains(optional), "{usage}");
            }
        }
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
