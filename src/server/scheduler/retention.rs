//! The retention policy: ended testruns keep their result files and logs
//! for `retention.max_age_hours` and, all together, up to
//! `retention.max_bytes` (oldest removed first). What goes is removed by
//! the file desk (off the loop); the testrun's record stays, marked with
//! what was pruned, when and why (status, the audit log, the server log).
//! Each tick looks only at the oldest retained testruns, so its cost does
//! not grow with how many are kept.

use super::*;
use crate::server::files::FileJob;

/// Testruns pruned per tick at most (the rest at the next ones).
const PRUNE_PER_TICK: usize = 64;

impl<S: Store> Scheduler<S> {
    /// Bytes of result files and logs a testrun holds.
    fn run_bytes(&self, run: &RunId) -> u64 {
        self.runs[run]
            .tasks
            .iter()
            .filter_map(|t| self.tasks.get(t))
            .map(|t| {
                t.files
                    .iter()
                    .map(|f| f.size)
                    .fold(t.log_bytes, u64::saturating_add)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// A testrun ended: its files and logs are kept from now on, under
    /// the policy.
    pub(super) fn retain(&mut self, run: &RunId) {
        let now_ms = self.wall_ms(self.latest);
        let bytes = self.run_bytes(run);
        let r = self.runs.get_mut(run).expect("run");
        let ended = *r.ended_ms.get_or_insert(now_ms);
        self.touched_runs.insert(run.clone());
        if self.retained.insert((ended, run.clone())) {
            self.retained_bytes = self.retained_bytes.saturating_add(bytes);
        }
    }

    /// From the tick: prunes the oldest ended testruns while they are
    /// older than the age limit or the kept bytes exceed the size limit.
    pub(super) fn apply_retention(&mut self, now: Instant) {
        let now_ms = self.wall_ms(now);
        let max_age_ms = u64::try_from(self.cfg.retention_age.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..PRUNE_PER_TICK {
            let Some((ended, run)) = self.retained.first().cloned() else {
                return;
            };
            let age_ms = now_ms.saturating_sub(ended);
            let reason = if age_ms > max_age_ms {
                format!(
                    "ended {} h ago, past retention.max_age_hours = {}",
                    age_ms / 3_600_000,
                    max_age_ms / 3_600_000
                )
            } else if self.retained_bytes > self.cfg.retention_bytes {
                format!(
                    "the kept result files and logs ({} bytes) exceeded retention.max_bytes = {}; oldest testruns go first",
                    self.retained_bytes, self.cfg.retention_bytes
                )
            } else {
                return;
            };
            self.retained.remove(&(ended, run.clone()));
            self.prune(&run, reason);
        }
    }

    fn prune(&mut self, run: &RunId, reason: String) {
        let bytes = self.run_bytes(run);
        self.retained_bytes = self.retained_bytes.saturating_sub(bytes);
        let tasks = self.runs[run].tasks.clone();
        for id in &tasks {
            if let Some(t) = self.tasks.get_mut(id) {
                let files: u64 = t.files.iter().map(|f| f.size).sum();
                self.stored_bytes = self.stored_bytes.saturating_sub(files);
                t.files.clear();
                t.log_bytes = 0;
                self.touched.insert(id.clone());
                self.pruned_tasks.push(id.clone());
                self.out
                    .push(Output::File(FileJob::Prune { task: id.clone() }));
            }
        }
        let pruned = Pruned {
            at_ms: self.wall_ms(self.latest),
            bytes,
            reason: reason.clone(),
        };
        if let Some(r) = self.runs.get_mut(run) {
            r.pruned = Some(pruned);
        }
        self.touched_runs.insert(run.clone());
        self.count("runs_pruned", 1);
        self.count("bytes_pruned", bytes);
        info!(run = %run, bytes, %reason, "retention: pruned the testrun's result files and logs");
        self.audit(
            "server",
            "-",
            "prune",
            &format!("run {run}: {bytes} bytes; {reason}"),
        );
    }
}
