//! The retention policy: ended testruns keep their result files and logs
//! for `retention.max_age_hours` and, all together, up to
//! `retention.max_bytes` (oldest removed first). What goes is removed by
//! the file desk (off the loop); the testrun's record stays, marked with
//! what was pruned, when and why (status, the audit log, the server log).
//! The scheduler holds only the sum of what is kept and when the oldest
//! kept testrun ended; when the policy is due it reads the oldest ones
//! from the database (`recall`), at most [`PRUNE_PER_TICK`] at a time, so
//! its memory and each step's cost do not grow with how many are kept.

use super::*;
use crate::server::store::files::FileJob;

/// Testruns pruned per read at most (the rest at the next ones).
const PRUNE_PER_TICK: usize = 64;

/// What is kept, in sums: the bytes of every ended testrun's files and
/// logs (counted when it ended, given back when it is pruned), and when
/// the oldest of them ended (a lower bound: none when nothing is kept).
#[derive(Debug, Default)]
pub(super) struct Retained {
    bytes: u64,
    oldest_ms: Option<u64>,
}

impl Retained {
    /// At a start: the sums the database gave.
    pub(super) fn restore(&mut self, bytes: u64, oldest_ms: Option<u64>) {
        self.bytes = bytes;
        self.oldest_ms = oldest_ms;
    }

    /// A testrun that ended at `ended_ms` keeps `bytes` from now on.
    fn keep(&mut self, ended_ms: u64, bytes: u64) {
        self.bytes = self.bytes.saturating_add(bytes);
        self.oldest_ms = Some(self.oldest_ms.map_or(ended_ms, |o| o.min(ended_ms)));
    }

    /// A pruned testrun's bytes are no longer kept.
    fn pruned(&mut self, bytes: u64) {
        self.bytes = self.bytes.saturating_sub(bytes);
    }
}

/// Why the policy prunes a testrun that ended at `ended_ms` now, if it
/// does: past the age, or while everything kept exceeds the size.
fn prune_reason(
    ended_ms: u64,
    now_ms: u64,
    max_age_ms: u64,
    bytes: u64,
    max_bytes: u64,
) -> Option<String> {
    let age_ms = now_ms.saturating_sub(ended_ms);
    if age_ms > max_age_ms {
        Some(format!(
            "ended {} h ago, past retention.max_age_hours = {}",
            age_ms / 3_600_000,
            max_age_ms / 3_600_000
        ))
    } else if bytes > max_bytes {
        Some(format!(
            "the kept result files and logs ({bytes} bytes) exceeded retention.max_bytes = {max_bytes}; oldest testruns go first"
        ))
    } else {
        None
    }
}

impl<S: Store> Scheduler<S> {
    /// Bytes of result files and logs a testrun holds.
    pub(super) fn run_bytes(&self, run: &RunId) -> u64 {
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
    /// the policy; it stays in memory while it is among the last
    /// `history.cache_runs` to end.
    pub(super) fn retain(&mut self, run: &RunId) {
        let now_ms = self.wall_ms(self.latest);
        let bytes = self.run_bytes(run);
        let r = self.runs.get_mut(run).expect("run");
        let ended = *r.ended_ms.get_or_insert(now_ms);
        self.pending.runs.insert(run.clone());
        self.retained.keep(ended, bytes);
        if self.recall.kept_asked {
            let e = self.recall.ended_since_asked.get_or_insert(ended);
            *e = (*e).min(ended);
        }
        self.recall.cached.push_back(run.clone());
    }

    fn max_age_ms(&self) -> u64 {
        u64::try_from(self.cfg.retention_age.as_millis()).unwrap_or(u64::MAX)
    }

    /// From the tick: when the oldest kept testrun is past the age or the
    /// kept bytes past the size, reads the oldest ones to prune.
    pub(super) fn apply_retention(&mut self, now: Instant) {
        if self.recall.kept_asked {
            return;
        }
        let Some(oldest) = self.retained.oldest_ms else {
            return;
        };
        let due = prune_reason(
            oldest,
            self.wall_ms(now),
            self.max_age_ms(),
            self.retained.bytes,
            self.cfg.retention_bytes,
        );
        if due.is_some() {
            self.ask_oldest_kept(PRUNE_PER_TICK);
        }
    }

    /// The oldest kept testruns, read back in the order they ended: each
    /// is pruned while the policy says so; the first it keeps is the
    /// oldest kept from now on.
    pub(super) fn prune_recalled(&mut self, now: Instant, order: &[RunId], next_ms: Option<u64>) {
        let now_ms = self.wall_ms(now);
        let max_age_ms = self.max_age_ms();
        let mut oldest = next_ms;
        for run in order {
            let Some(r) = self.runs.get(run) else {
                continue;
            };
            let (Some(ended), None) = (r.ended_ms, &r.pruned) else {
                continue;
            };
            match prune_reason(
                ended,
                now_ms,
                max_age_ms,
                self.retained.bytes,
                self.cfg.retention_bytes,
            ) {
                Some(reason) => self.prune(run, reason),
                None => {
                    oldest = Some(ended);
                    break;
                }
            }
        }
        if let Some(e) = self.recall.ended_since_asked.take() {
            oldest = Some(oldest.map_or(e, |o| o.min(e)));
        }
        self.retained.oldest_ms = oldest;
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
        // Rows of it read before this change are stale: read again.
        self.recall.epoch += 1;
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
    use super::{prune_reason, Retained};

    const HOUR: u64 = 3_600_000;

    #[test]
    fn the_oldest_goes_by_age_then_by_size() {
        // Nothing old or too large: nothing goes.
        assert!(prune_reason(10 * HOUR, 12 * HOUR, 24 * HOUR, 500, 1000).is_none());
        let why = prune_reason(5 * HOUR, 30 * HOUR, 24 * HOUR, 500, 1000).unwrap();
        assert!(why.contains("max_age_hours"), "{why}");
        let why = prune_reason(10 * HOUR, 30 * HOUR, 24 * HOUR, 500, 100).unwrap();
        assert!(why.contains("max_bytes"), "{why}");
        assert!(prune_reason(u64::MAX, 0, 0, 0, 0).is_none());
    }

    #[test]
    fn the_sums_follow_what_is_kept() {
        let mut kept = Retained::default();
        kept.keep(10 * HOUR, 300);
        kept.keep(5 * HOUR, 200);
        assert_eq!((kept.bytes, kept.oldest_ms), (500, Some(5 * HOUR)));
        kept.pruned(200);
        kept.pruned(900);
        assert_eq!(kept.bytes, 0, "never below nothing");
    }
}
