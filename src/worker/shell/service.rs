//! How `ots-worker` starts: the configuration checked, the state
//! directory and the saved session opened (a task the previous process
//! left running is reported interrupted), the console started; then the
//! loop ([`crate::worker::shell::serving`]) runs until the worker stops. Every
//! way it can fail is a [`WorkerError`]; the binary chooses the exit
//! status.

use crate::protocol::Outcome;
use crate::security::Credentials;
use crate::shutdown::Stop;
use crate::worker::config::WorkerConfig;
use crate::worker::session::{Session, SessionConfig};
pub use crate::worker::shell::error::WorkerError;
use crate::worker::shell::link::{Dialer, Inbound};
use crate::worker::shell::serving::{Parts, Serving, Sources, INBOUND_QUEUE};
use crate::worker::state::WorkerStore;
use crate::worker::task::attempt_dir;
use crate::worker::task::channel::{LogBudget, TaskEvent};
use crate::worker::task::conductor;
use crate::worker::task::console::Console;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// Runs a worker until `shutdown` says stop: [`Stop::Gracefully`] by
/// `stop_policy` (no new task; the running one finished or stopped,
/// delivered, then `bye`), [`Stop::Now`] at once.
pub async fn run(cfg: WorkerConfig, shutdown: watch::Receiver<Stop>) -> Result<(), WorkerError> {
    cfg.validate()?;
    let device = cfg.device_props()?;
    let credentials = cfg.credentials()?;
    for warning in cfg.secret_argv_warnings() {
        warn!("{warning}");
    }
    if let Credentials::Noise { key, .. } = &credentials {
        info!(key = %key.public, "security on: this worker's public key (the server needs it in workers.d/{}.pub)", cfg.name);
    } else {
        warn!("security = \"none\": the server is not authenticated and nothing is encrypted; use this in a closed lab only");
    }
    let tasks_dir = cfg.state_dir.join("tasks");
    std::fs::create_dir_all(&tasks_dir).map_err(|source| WorkerError::StateDir {
        path: tasks_dir.clone(),
        source,
    })?;
    let (mut store, saved) = WorkerStore::open(&cfg.state_dir)?;
    let now = Instant::now();
    let session_cfg = SessionConfig {
        heartbeat: cfg.heartbeat(),
        liveness: cfg.liveness,
        log_buffer_lines: cfg.log_buffer_lines,
        log_buffer_bytes: cfg.log_buffer_bytes,
        log_batch_lines: cfg.log_batch_lines,
        log_batch_delay: Duration::from_millis(cfg.log_batch_ms),
        retry: cfg.retry.clone(),
        delivery: cfg.delivery.clone(),
        on_server_lost: cfg.on_server_lost,
        file_chunk_bytes: cfg.file_chunk_bytes,
        file_window_bytes: cfg.file_window_bytes,
    };
    let (task_tx, task_rx) = mpsc::unbounded_channel::<TaskEvent>();
    // Bounds the log bytes between the conductors and the session: the
    // channel above holds at most this much log text, whatever the
    // conductor's rate (lines over it are dropped and counted).
    let log_budget = LogBudget::new(cfg.log_buffer_bytes);
    let session = match saved {
        Some(saved) => {
            let pending = saved.outbox.len();
            let (session, interrupted) =
                Session::restore(session_cfg, cfg.name.clone(), device.clone(), now, saved);
            info!(
                pending,
                "continuing the saved session: unacknowledged messages will be delivered"
            );
            if let Some((task, attempt)) = interrupted {
                let dir = attempt_dir(&cfg, &task, attempt);
                if conductor::kill_leftover(&dir.join("conductor.pgid")) {
                    warn!(task = %task, "killed the conductor the previous worker process left running");
                }
                warn!(task = %task, attempt, "the worker restarted while this task ran: reporting it as interrupted");
                let _ = task_tx.send(TaskEvent::Finished {
                    task,
                    attempt,
                    outcome: Outcome {
                        interrupted: true,
                        failure: Some(
                            "interrupted: the worker restarted while the conductor ran".into(),
                        ),
                        ..Outcome::default()
                    },
                    log_lines: 0,
                    files: Vec::new(),
                });
            }
            session
        }
        None => Session::new(
            session_cfg,
            cfg.name.clone(),
            format!("{:016x}", rand::random::<u64>()),
            device.clone(),
            now,
        ),
    };
    let session_id = session.saved().session_id;
    store.save(&session.saved())?;
    info!(worker = %cfg.name, device = %device, server = %cfg.server, session = %session_id, "worker starting");

    let (inbound_tx, inbound_rx) = mpsc::channel::<Inbound>(INBOUND_QUEUE);
    let dialer = Dialer::new(&cfg, now)?;
    let (reads, reads_done) = crate::worker::task::reader::spawn(&cfg.state_dir);
    let console = start_console(&cfg).map_err(|source| WorkerError::StateDir {
        path: cfg.state_dir.join("console"),
        source,
    })?;
    let mut ticker = tokio::time::interval(Duration::from_millis(cfg.log_batch_ms.clamp(5, 100)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sources = Sources {
        task_events: task_rx,
        inbound: inbound_rx,
        reads_done,
        ticker,
        stop: shutdown,
        stop_open: true,
    };
    let serving = Serving::new(Parts {
        cfg,
        credentials,
        console,
        device,
        session,
        store,
        log_budget,
        task_events: task_tx,
        reads,
        inbound: inbound_tx,
        dialer,
    });
    serving.run(&mut sources).await
}

/// The device's console, read from now on (boot output included).
fn start_console(cfg: &WorkerConfig) -> std::io::Result<Option<Console>> {
    if cfg.serial.port.is_empty() {
        return Ok(None);
    }
    Console::start(&cfg.serial, &cfg.state_dir).map(Some)
}
