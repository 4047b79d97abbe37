//! What the session keeps across restarts (in worker.db): its id, the
//! next sequence number, the outbox of mandatory messages, the current
//! task and its pending report.

use super::Slot;
use crate::delivery::{DedupWindow, Outbox};
use crate::protocol::*;
use crate::worker::session::{Session, SessionConfig, Upload};
use std::time::Instant;

/// The task a worker owns, as saved to disk.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedSlot {
    pub spec: TaskSpec,
    pub finished: bool,
    pub aborted: bool,
    /// The final report, while result files are still being uploaded.
    #[serde(default)]
    pub report: Option<PendingReport>,
    #[serde(default)]
    pub uploads: Vec<Upload>,
}

/// What the final report will say, kept until the files are delivered.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PendingReport {
    pub outcome: Outcome,
    pub log_lines: u64,
}

/// Everything of a session that must survive a worker restart.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedSession {
    pub session_id: String,
    pub next_seq: u64,
    pub outbox: Vec<crate::delivery::outbox::SavedMessage>,
    pub slot: Option<SavedSlot>,
    pub server_session: Option<String>,
    pub server_dedup: DedupWindow,
}

impl Session {
    /// The state to save so a restarted worker continues this session.
    pub fn saved(&self) -> SavedSession {
        SavedSession {
            session_id: self.session_id.clone(),
            next_seq: self.outbox.next_seq(),
            // A bye is never carried into the next start.
            outbox: self
                .outbox
                .entries()
                .filter(|(_, p)| !matches!(p.body, Body::Bye { .. }))
                .map(|(seq, p)| crate::delivery::outbox::SavedMessage {
                    seq,
                    task: p.task.clone(),
                    attempt: p.attempt,
                    body: p.body.clone(),
                    raw: p.raw.clone(),
                })
                .collect(),
            slot: self.slot.as_ref().map(|s| SavedSlot {
                // Secrets stay in memory: a restarted worker reports the
                // task interrupted and never needs them again.
                spec: TaskSpec {
                    hold: None,
                    on_lease: None,
                    secrets: Default::default(),
                    ..s.spec.clone()
                },
                finished: s.finished,
                aborted: s.aborted,
                report: s.report.clone(),
                uploads: s.uploads.clone(),
            }),
            server_session: self.server_session.clone(),
            server_dedup: self.server_dedup.clone(),
        }
    }

    /// Continues a saved session after a restart. Returns the session and,
    /// if the worker died while a conductor ran, that task's (id, attempt):
    /// the caller reports it as interrupted.
    pub fn restore(
        cfg: SessionConfig,
        name: String,
        device: DeviceProps,
        now: Instant,
        saved: SavedSession,
    ) -> (Self, Option<(TaskId, u32)>) {
        let mut s = Session::new(cfg, name, saved.session_id, device, now);
        s.outbox = Outbox::restore(s.cfg.retry.clone(), saved.next_seq, saved.outbox);
        s.server_session = saved.server_session;
        s.server_dedup = saved.server_dedup;
        let interrupted = saved
            .slot
            .as_ref()
            .filter(|slot| !slot.finished)
            .map(|slot| (slot.spec.task.clone(), slot.spec.attempt));
        s.slot = saved.slot.map(|slot| Slot {
            spec: slot.spec,
            aborted: slot.aborted,
            finished: slot.finished,
            report: slot.report,
            uploads: slot.uploads,
            stopped_for_exit: false,
            log_full: false,
        });
        (s, interrupted)
    }
}
