//! The retention policy: ended testruns keep their result files and logs
//! for `retention.max_age_hours` and, all together, up to
//! `retention.max_bytes` (oldest removed first). What goes is removed by
//! the file desk (off the loop); the testrun's record stays, marked with
//! what was pruned, when and why (status, the audit log, the server log).
//! Each tick looks only at the oldest retained testruns, so its cost does
//! not grow with how many are kept.

use super::*;
use crate::server::store::files::FileJob;

/// Testruns pruned per tick at most (the rest at the next ones).
const PRUNE_PER_TICK: usize = 64;

/// Ended testruns whose files and logs are still kept, oldest first, and
/// their bytes together: the policy's decision looks at the front only.
/// The bytes are those counted when each testrun was kept, given back
/// when it is pruned.
#[derive(Debug, Default)]
pub(super) struct Retained {
    runs: BTreeSet<(u64, RunId)>,
    bytes: u64,
}

impl Retained {
    /// `run`, ended at `ended_ms`, is kept from now on with `bytes`.
    pub(super) fn keep(&mut self, ended_ms: u64, run: &RunId, bytes: u64) {
        if self.runs.insert((ended_ms, run.clone())) {
            self.bytes = self.bytes.saturating_add(bytes);
        }
    }

    /// The oldest kept testrun if the policy prunes it now, and why;
    /// it is no longer kept (its bytes go with [`Retained::pruned`]).
    fn next_to_prune(
        &mut self,
        now_ms: u64,
        max_age_ms: u64,
        max_bytes: u64,
    ) -> Option<(RunId, String)> {
        let (ended, run) = self.runs.first().cloned()?;
        let age_ms = now_ms.saturating_sub(ended);
        let reason = if age_ms > max_age_ms {
            format!(
                "ended {} h ago, past retention.max_age_hours = {}",
                age_ms / 3_600_000,
                max_age_ms / 3_600_000
            )
        } else if self.bytes > max_bytes {
            format!(
                "the kept result files and logs ({} bytes) exceeded retention.max_bytes = {max_bytes}; oldest testruns go first",
                self.bytes
            )
        } else {
            return None;
        };
        self.runs.remove(&(ended, run.clone()));
        Some((run, reason))
    }

    /// A pruned testrun's bytes are no longer kept.
    fn pruned(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

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
        self.pending.runs.insert(run.clone());
        self.retained.keep(ended, run, bytes);
    }

    /// From the tick: prunes the oldest ended testruns while they are
    /// older than the age limit or the kept bytes exceed the size limit.
    pub(super) fn apply_retention(&mut self, now: Instant) {
        let now_ms = self.wall_ms(now);
        let max_age_ms = u64::try_from(self.cfg.retention_age.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..PRUNE_PER_TICK {
            let Some((run, reason)) =
                self.retained
                    .next_to_prune(now_ms, max_age_ms, self.cfg.retention_bytes)
            else {
                return;
            };
            self.prune(&run, reason);
        }
    }

    fn prune(&mut self, run: &RunId, reason: String) {
        let bytes = self.run_bytes(run);
        self.retained.pruned(bytes);
        let tasks = self.runs[run].tasks.clone();
        for id in &tasks {
            if let Some(t) = self.tasks.get_mut(id) {
                let files: u64 = t.files.iter().map(|f| f.size).sum();
                self.stored_bytes = self.stored_bytes.saturating_sub(files);
                t.files.clear();
                t.log_bytes = 0;
                self.pending.tasks.insert(id.clone());
                self.pending.pruned_tasks.push(id.clone());
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
        self.pending.runs.insert(run.clone());
        self.count("runs_pruned", 1);
        self.count("bytes_pruned", bytes);
        info!(run = %run, bytes, %reason, "retention: pruned the testrun's result files and logs");
        self.audit(
            self.latest,
            "server",
            "-",
            "prune",
            &format!("run {run}: {bytes} bytes; {reason}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::Retained;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn the_oldest_goes_first_by_age_then_by_size() {
        let mut kept = Retained::default();
        kept.keep(10 * HOUR, &"r2".into(), 300);
        kept.keep(5 * HOUR, &"r1".into(), 200);
        kept.keep(5 * HOUR, &"r1".into(), 200); // kept once
        assert_eq!(kept.bytes, 500);
        // Nothing is old or too large: nothing goes.
        assert!(kept.next_to_prune(12 * HOUR, 24 * HOUR, 1000).is_none());
        // r1 is past the age; r2 is not.
        let (run, why) = kept.next_to_prune(30 * HOUR, 24 * HOUR, 1000).unwrap();
        assert_eq!(run, "r1");
        assert!(why.contains("max_age_hours"), "{why}");
        kept.pruned(200);
        assert!(kept.next_to_prune(30 * HOUR, 24 * HOUR, 1000).is_none());
        // Over the size limit: the oldest goes whatever its age.
        let (run, why) = kept.next_to_prune(30 * HOUR, 24 * HOUR, 100).unwrap();
        assert_eq!(run, "r2");
        assert!(why.contains("max_bytes"), "{why}");
        kept.pruned(300);
        assert_eq!(kept.bytes, 0);
        assert!(kept.next_to_prune(u64::MAX, 0, 0).is_none());
    }
}
