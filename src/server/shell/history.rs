//! The history reader: answers the scheduler's questions about ended
//! testruns ([`crate::server::store::history`]) on a database connection
//! of its own, off the serving loop — a thread for SQLite, a task for
//! PostgreSQL — one question at a time, in the order asked. Questions are
//! handed over after the turn's commit, so each reads what the turns
//! before it wrote.

use crate::server::store::history::{RecallJob, Recalled};
use crate::server::store::state::HistoryReader;
use tokio::sync::mpsc;
use tracing::error;

/// Where questions go, and where answers come back.
pub(super) type Channels = (
    mpsc::UnboundedSender<RecallJob>,
    mpsc::UnboundedReceiver<Recalled>,
);

/// The answer to `job`; a failed read is logged here, once, by the
/// reader (the scheduler tells whoever waited).
fn answer(
    job: &RecallJob,
    found: Result<crate::server::store::history::Found, crate::server::store::db::StateError>,
) -> Recalled {
    Recalled {
        ticket: job.ticket,
        epoch: job.epoch,
        found: found.map_err(|e| {
            error!(error = %e, "storage error: cannot read history from the state database");
            e.to_string()
        }),
    }
}

/// Starts the reader. The questions out are bounded by the scheduler
/// (`history.max_reads`, one retention read).
pub(super) fn spawn(reader: HistoryReader) -> Channels {
    match reader {
        HistoryReader::Sqlite(h) => crate::jobs::spawn("ots-history", move |job: RecallJob| {
            Some(answer(&job, h.recall(&job.recall)))
        }),
        HistoryReader::Postgres(mut h) => {
            let (jobs_tx, mut jobs) = mpsc::unbounded_channel::<RecallJob>();
            let (done_tx, done) = mpsc::unbounded_channel::<Recalled>();
            tokio::spawn(async move {
                while let Some(job) = jobs.recv().await {
                    let found = h.recall(&job.recall).await;
                    if done_tx.send(answer(&job, found)).is_err() {
                        return; // the serving loop ended
                    }
                }
            });
            (jobs_tx, done)
        }
    }
}
