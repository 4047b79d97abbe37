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

/// Starts the reader. The questions out are bounded by the scheduler
/// (`history.max_reads`, one retention read).
pub(super) fn spawn(reader: HistoryReader) -> Channels {
    let (jobs_tx, mut jobs) = mpsc::unbounded_channel::<RecallJob>();
    let (done_tx, done) = mpsc::unbounded_channel::<Recalled>();
    match reader {
        HistoryReader::Sqlite(h) => {
            let spawned = std::thread::Builder::new()
                .name("ots-history".into())
                .spawn(move || {
                    while let Some(job) = jobs.blocking_recv() {
                        let found = h.recall(&job.recall).map_err(|e| {
                            error!(error = %e, "storage error: cannot read history from the state database");
                            e.to_string()
                        });
                        let answer = Recalled {
                            ticket: job.ticket,
                            epoch: job.epoch,
                            found,
                        };
                        if done_tx.send(answer).is_err() {
                            return; // the serving loop ended
                        }
                    }
                });
            if let Err(e) = spawned {
                // Without the thread the questions go unanswered: the
                // loop notices the closed channel and stops (restart).
                error!(error = %e, "cannot start the history reader thread");
            }
        }
        HistoryReader::Postgres(mut h) => {
            tokio::spawn(async move {
                while let Some(job) = jobs.recv().await {
                    let found = h.recall(&job.recall).await.map_err(|e| {
                        error!(error = %e, "storage error: cannot read history from the state database");
                        e.to_string()
                    });
                    let answer = Recalled {
                        ticket: job.ticket,
                        epoch: job.epoch,
                        found,
                    };
                    if done_tx.send(answer).is_err() {
                        return;
                    }
                }
            });
        }
    }
    (jobs_tx, done)
}
