//! What the next commit writes: every task, testrun and worker changed
//! since the last one, the rows to remove, the history to append, the
//! rows to move aside. A change is marked where it happens and taken, all
//! at once, by [`super::Scheduler::take_changes`]; so a commit costs what
//! the batch changed, never the size of the state. Log accounting alone
//! (lines stored) is the exception: best-effort lines are written with a
//! commit at most [`LOG_ACCOUNTING_EVERY`] apart, not once per log batch
//! (a crash loses at most that much accounting, and those lines then
//! count as lost: over-reported, never hidden).

use super::persist::RestoreError;
use crate::protocol::{RunId, TaskId};
use crate::server::store::db::HistoryRow;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// How far apart log accounting alone is committed.
pub(super) const LOG_ACCOUNTING_EVERY: Duration = Duration::from_millis(200);

#[derive(Debug)]
pub(super) struct Pending {
    /// Tasks changed (state, log, files, flags): only these are encoded.
    pub(super) tasks: BTreeSet<TaskId>,
    /// Tasks whose only change is log accounting, and when those were
    /// last moved into `tasks`.
    log_only: BTreeSet<TaskId>,
    log_flushed_at: Instant,
    /// Testruns changed.
    pub(super) runs: BTreeSet<RunId>,
    /// Workers whose stored row may have changed (messages from them,
    /// their task changing).
    pub(super) workers: BTreeSet<String>,
    /// Workers removed from the registry.
    pub(super) removed_workers: Vec<String>,
    /// Tasks pruned (out of the files index).
    pub(super) pruned_tasks: Vec<TaskId>,
    /// Input owners added: (sha256, user).
    pub(super) input_owners: Vec<(String, String)>,
    /// Task state changes.
    pub(super) history: Vec<HistoryRow>,
    /// Stored rows that could not be restored, to move aside.
    pub(super) quarantined: Vec<RestoreError>,
}

impl Pending {
    /// Whether the next commits write something of `task` still.
    pub(super) fn has_task(&self, task: &TaskId) -> bool {
        self.tasks.contains(task) || self.log_only.contains(task)
    }

    pub(super) fn new(now: Instant) -> Self {
        Pending {
            tasks: BTreeSet::new(),
            log_only: BTreeSet::new(),
            log_flushed_at: now,
            runs: BTreeSet::new(),
            workers: BTreeSet::new(),
            removed_workers: Vec::new(),
            pruned_tasks: Vec::new(),
            input_owners: Vec::new(),
            history: Vec::new(),
            quarantined: Vec::new(),
        }
    }

    /// Only the task's log accounting changed.
    pub(super) fn task_log(&mut self, task: &TaskId) {
        self.log_only.insert(task.clone());
    }

    /// The tasks this commit writes: whole rows, their log accounting
    /// included (so none of them waits for it any more).
    pub(super) fn take_tasks(&mut self) -> BTreeSet<TaskId> {
        let tasks = std::mem::take(&mut self.tasks);
        if !self.log_only.is_empty() {
            self.log_only.retain(|t| !tasks.contains(t));
        }
        tasks
    }

    /// Log accounting goes with this commit if the last one that carried
    /// it is [`LOG_ACCOUNTING_EVERY`] ago.
    pub(super) fn due_log_accounting(&mut self, now: Instant) {
        if !self.log_only.is_empty()
            && now.saturating_duration_since(self.log_flushed_at) >= LOG_ACCOUNTING_EVERY
        {
            self.log_flushed_at = now;
            let mut logs = std::mem::take(&mut self.log_only);
            self.tasks.append(&mut logs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_accounting_alone_waits_for_its_interval() {
        let t0 = Instant::now();
        let mut p = Pending::new(t0);
        p.task_log(&"r1.1".into());
        p.due_log_accounting(t0 + LOG_ACCOUNTING_EVERY / 2);
        assert!(p.tasks.is_empty(), "not yet");
        p.due_log_accounting(t0 + LOG_ACCOUNTING_EVERY);
        assert_eq!(p.tasks.len(), 1);
        assert!(p.log_only.is_empty());
        p.task_log(&"r1.2".into());
        p.due_log_accounting(t0 + LOG_ACCOUNTING_EVERY * 3 / 2);
        assert_eq!(
            p.tasks.len(),
            1,
            "the interval counts from the last carried"
        );
    }
}
