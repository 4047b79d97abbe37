//! When a queued task may start, and for which worker it waits: the
//! queue played forward from now. Pure: the scheduler passes the workers
//! of a routing key (free, busy for how long, or away and why), the
//! queued tasks in dispatch order with the workers each must avoid (its
//! failed attempts), and the spread of recent durations; each task gets
//! the worker that frees up first among those it may use, and that
//! worker is then taken for the task's own expected duration.
//!
//! Times are ranges (shortest, mean, longest of the recent durations), or
//! unknown when there is no duration to go by: an estimate never says
//! "~0 s" for a task that waits behind one whose length nobody knows.

/// Recent durations of one kind of task (ms): shortest, mean, longest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spread {
    pub low: u64,
    pub mean: u64,
    pub high: u64,
}

impl Spread {
    /// The spread of `samples`; none without any.
    pub fn of(samples: impl IntoIterator<Item = u64>) -> Option<Spread> {
        let (mut n, mut sum, mut low, mut high) = (0u64, 0u64, u64::MAX, 0u64);
        for s in samples {
            n += 1;
            sum = sum.saturating_add(s);
            low = low.min(s);
            high = high.max(s);
        }
        (n > 0).then(|| Spread {
            low,
            mean: sum / n,
            high,
        })
    }

    /// What is left of it after `elapsed` ms (an overrun: nothing left
    /// by the record, but at least the rest is not known to be short).
    fn after(self, elapsed: u64) -> Range {
        Range {
            low: self.low.saturating_sub(elapsed),
            mean: self.mean.saturating_sub(elapsed),
            high: self.high.saturating_sub(elapsed),
        }
    }
}

/// From now (ms): earliest, expected, latest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    pub low: u64,
    pub mean: u64,
    pub high: u64,
}

impl Range {
    fn plus(self, s: Spread) -> Range {
        Range {
            low: self.low.saturating_add(s.low),
            mean: self.mean.saturating_add(s.mean),
            high: self.high.saturating_add(s.high),
        }
    }
}

/// What a worker of the key is doing, as far as a queued task cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Doing {
    /// Idle, healthy, undrained, not leased: takes a task now.
    Free,
    /// Running `task` for `elapsed` ms; `spread`: how long such tasks
    /// take (none: unknown).
    Busy {
        task: String,
        elapsed_ms: u64,
        spread: Option<Spread>,
    },
    /// Takes no task (drained, bad, leased, lost, stopped…).
    Away,
}

/// A worker of the key.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub name: String,
    pub doing: Doing,
}

/// A queued task, in dispatch order.
#[derive(Clone, Debug)]
pub struct Queued<'a> {
    pub id: &'a str,
    /// Workers its retries exclude.
    pub avoid: &'a [String],
    /// How long it is expected to take (none: unknown).
    pub spread: Option<Spread>,
}

/// What one queued task waits for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Estimate {
    /// The worker expected to take it, and what that worker runs before
    /// it (now, or a task ahead of it in this queue).
    pub worker: String,
    pub busy_with: Option<String>,
    /// When it may start (from now); none when a duration it depends on
    /// is unknown.
    pub starts: Option<Range>,
    /// The workers it may use for this attempt (not away, not avoided).
    pub could_run_on: Vec<String>,
}

/// Workers listed in `could_run_on` at most.
pub const LISTED: usize = 64;

/// Plays the queue forward. `None` for a task no worker may take (every
/// worker away or avoided). Cost: (tasks + workers) × log(workers), plus
/// each task's avoided workers.
pub fn plan(workers: &[Candidate], tasks: &[Queued<'_>]) -> Vec<Option<Estimate>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Per usable worker (sorted by name): when it is free (None:
    // unknown) and with what.
    let mut slots: Vec<(&str, Option<Range>, Option<String>)> = workers
        .iter()
        .filter_map(|w| match &w.doing {
            Doing::Free => Some((w.name.as_str(), Some(Range::default()), None)),
            Doing::Busy {
                task,
                elapsed_ms,
                spread,
            } => Some((
                w.name.as_str(),
                spread.map(|s| s.after(*elapsed_ms)),
                Some(task.clone()),
            )),
            Doing::Away => None,
        })
        .collect();
    slots.sort_by(|a, b| a.0.cmp(b.0));
    // The first free on top: known times before unknown ones, then by name.
    let rank =
        |free: &Option<Range>, k: usize| Reverse((free.map_or((1u8, 0u64), |r| (0, r.mean)), k));
    let mut heap: BinaryHeap<_> = slots
        .iter()
        .enumerate()
        .map(|(k, s)| rank(&s.1, k))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        let avoided = |k: usize| t.avoid.iter().any(|a| a == slots[k].0);
        let mut skipped = Vec::new();
        let mut best = None;
        while let Some(Reverse((key, k))) = heap.pop() {
            if avoided(k) {
                skipped.push(Reverse((key, k)));
            } else {
                best = Some(k);
                break;
            }
        }
        heap.extend(skipped);
        let Some(k) = best else {
            out.push(None);
            continue;
        };
        let (name, free, busy_with) = slots[k].clone();
        let could_run_on = (0..slots.len())
            .filter(|&u| !avoided(u))
            .take(LISTED)
            .map(|u| slots[u].0.to_string())
            .collect();
        out.push(Some(Estimate {
            worker: name.to_string(),
            busy_with,
            starts: free,
            could_run_on,
        }));
        // The worker is then busy with this task for its expected time.
        slots[k].1 = match (free, t.spread) {
            (Some(f), Some(s)) => Some(f.plus(s)),
            _ => None,
        };
        slots[k].2 = Some(t.id.to_string());
        heap.push(rank(&slots[k].1, k));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn busy(name: &str, task: &str, elapsed_ms: u64, spread: Option<Spread>) -> Candidate {
        Candidate {
            name: name.into(),
            doing: Doing::Busy {
                task: task.into(),
                elapsed_ms,
                spread,
            },
        }
    }

    fn free(name: &str) -> Candidate {
        Candidate {
            name: name.into(),
            doing: Doing::Free,
        }
    }

    #[test]
    fn a_task_whose_retries_exclude_two_of_three_workers_waits_for_the_third() {
        let s = Spread::of([80_000, 90_000, 100_000]).unwrap();
        let workers = [free("w1"), busy("w2", "r1.1", 30_000, Some(s)), free("w3")];
        let avoid = ["w3".to_string(), "w1".to_string()];
        let plan = plan(
            &workers,
            &[Queued {
                id: "r2.1",
                avoid: &avoid,
                spread: Some(s),
            }],
        );
        let e = plan[0].as_ref().unwrap();
        assert_eq!(
            (e.worker.as_str(), e.busy_with.as_deref()),
            ("w2", Some("r1.1"))
        );
        assert_eq!(e.could_run_on, ["w2"]);
        assert_eq!(
            e.starts,
            Some(Range {
                low: 50_000,
                mean: 60_000,
                high: 70_000
            })
        );
    }

    #[test]
    fn tasks_behind_long_ones_wait_their_turn_and_unknown_stays_unknown() {
        let s = Spread::of([90_000]).unwrap();
        let workers = [
            busy("w1", "r1.1", 0, Some(s)),
            Candidate {
                name: "w2".into(),
                doing: Doing::Away,
            },
        ];
        let q = [
            Queued {
                id: "r2.1",
                avoid: &[],
                spread: Some(s),
            },
            Queued {
                id: "r2.2",
                avoid: &[],
                spread: None,
            },
            Queued {
                id: "r3.1",
                avoid: &[],
                spread: Some(s),
            },
        ];
        let p = plan(&workers, &q);
        let starts: Vec<Option<u64>> = p
            .iter()
            .map(|e| e.as_ref().unwrap().starts.map(|r| r.mean))
            .collect();
        assert_eq!(starts, [Some(90_000), Some(180_000), None]);
        assert_eq!(p[1].as_ref().unwrap().busy_with.as_deref(), Some("r2.1"));
        // No worker it may use: said, not guessed.
        let only_away = [Candidate {
            name: "w2".into(),
            doing: Doing::Away,
        }];
        assert_eq!(plan(&only_away, &q[..1]), [None]);
    }
}
