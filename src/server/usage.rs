//! What the lab's devices did with their time, as plain data: the
//! scheduler shows [`Usage`] what each worker is doing at every tick and
//! tells it when a task ends; it keeps a bounded series the state
//! database stores — per device group and minute (workers busy, idle,
//! leased, broken; tasks queued and the longest wait), per worker and
//! hour (milliseconds in each state, tasks, passes, failures,
//! infrastructure errors) and per owner, group and hour (device time
//! used) — for the lab's charts and `ots-submit report`.
//!
//! Time is counted between two observations, at most [`MAX_STEP_MS`]
//! at a time: a server that was stopped does not count the gap as any
//! state. Rows leave once a minute, as additions to what is stored
//! (a restart loses at most the minute not yet committed).

use crate::protocol::results::DeviceTime;
use std::collections::BTreeMap;

/// Longest stretch between two observations counted (a tick is due
/// every heartbeat).
pub const MAX_STEP_MS: u64 = 10_000;
/// Per-minute rows kept (8 days, for the 7-day charts).
pub const KEEP_MINUTES_MS: u64 = 8 * 24 * 3600 * 1000;
/// Per-hour rows kept (400 days, for yearly reports).
pub const KEEP_HOURS_MS: u64 = 400 * 24 * 3600 * 1000;

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 3_600_000;

/// What a worker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doing {
    /// Running a task of a testrun.
    Busy,
    /// Connected, healthy, nothing to do.
    Idle,
    /// Held by a lease (a person has the board).
    Leased,
    /// Suspect, bad, in maintenance or retired: not taking tasks.
    Broken,
    /// Lost or stopped.
    Offline,
}

/// One worker as observed.
#[derive(Clone, Debug)]
pub struct WorkerNow<'a> {
    pub name: &'a str,
    pub group: &'a str,
    pub doing: Doing,
    /// Whose testrun or lease it serves (busy or leased).
    pub owner: Option<&'a str>,
}

/// One device group's queue as observed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueNow {
    pub group: String,
    pub queued: u64,
    pub wait_max_ms: u64,
}

/// A device group in one minute.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MinuteRow {
    pub minute_ms: u64,
    pub group: String,
    pub workers: u64,
    pub busy: u64,
    pub idle: u64,
    pub leased: u64,
    pub broken: u64,
    pub queued: u64,
    pub wait_max_ms: u64,
}

/// What a worker did in one hour (additions since the last rows).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HourRow {
    pub hour_ms: u64,
    pub worker: String,
    pub group: String,
    pub time: DeviceTime,
}

/// Device time an owner used in one hour, on one group (additions).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnerRow {
    pub hour_ms: u64,
    pub owner: String,
    pub group: String,
    pub busy_ms: u64,
    pub leased_ms: u64,
}

/// Rows for the next commit, and what to forget.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsageRows {
    pub minutes: Vec<MinuteRow>,
    pub hours: Vec<HourRow>,
    pub owners: Vec<OwnerRow>,
    /// Delete minute rows before this and hour rows before the second.
    pub forget_before: Option<(u64, u64)>,
}

impl UsageRows {
    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
            && self.hours.is_empty()
            && self.owners.is_empty()
            && self.forget_before.is_none()
    }
}

/// How a task ended, for its worker's hour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    Passed,
    Failed,
    /// The device or infrastructure failed.
    Infrastructure,
    /// Anything else (cancelled, error of the test itself).
    Other,
}

/// The accumulator.
#[derive(Debug, Default)]
pub struct Usage {
    /// How often the hours' additions leave (0: once a minute).
    flush_ms: u64,
    flushed_ms: u64,
    last_ms: Option<u64>,
    minute: Option<u64>,
    hour: Option<u64>,
    hours: BTreeMap<String, HourRow>,
    /// Workers whose task ended since the last observation, with its
    /// owner: counted busy for that step (a task shorter than a tick is
    /// never seen running).
    ended: BTreeMap<String, Option<String>>,
    owners: BTreeMap<(String, String), OwnerRow>,
    ready: UsageRows,
}

impl Usage {
    /// Rows leave every `flush_ms` (at least a second; by default once a
    /// minute) and at each new minute.
    pub fn with_flush(flush_ms: u64) -> Usage {
        Usage {
            flush_ms: flush_ms.max(1000),
            ..Usage::default()
        }
    }

    /// Counts the time since the last observation in each worker's
    /// state; at a new minute, makes the minute's rows (`queues` is asked
    /// only then).
    pub fn observe<'a>(
        &mut self,
        now_ms: u64,
        workers: impl Iterator<Item = WorkerNow<'a>> + Clone,
        queues: impl FnOnce() -> Vec<QueueNow>,
    ) {
        let step = self
            .last_ms
            .map_or(0, |last| now_ms.saturating_sub(last))
            .min(MAX_STEP_MS);
        self.last_ms = Some(self.last_ms.map_or(now_ms, |l| l.max(now_ms)));
        let hour = now_ms / HOUR_MS * HOUR_MS;
        let ended = std::mem::take(&mut self.ended);
        if step > 0 {
            for mut w in workers.clone() {
                if let (Doing::Idle | Doing::Broken, Some(owner)) = (w.doing, ended.get(w.name)) {
                    w.doing = Doing::Busy;
                    w.owner = owner.as_deref();
                }
                let row = self.hour_row(hour, w.name, w.group);
                let slot = match w.doing {
                    Doing::Busy => &mut row.time.busy_ms,
                    Doing::Idle => &mut row.time.idle_ms,
                    Doing::Leased => &mut row.time.leased_ms,
                    Doing::Broken => &mut row.time.broken_ms,
                    Doing::Offline => &mut row.time.offline_ms,
                };
                *slot = slot.saturating_add(step);
                if let (Some(owner), Doing::Busy | Doing::Leased) = (w.owner, w.doing) {
                    let o = self
                        .owners
                        .entry((owner.to_string(), w.group.to_string()))
                        .or_insert_with(|| OwnerRow {
                            hour_ms: hour,
                            owner: owner.to_string(),
                            group: w.group.to_string(),
                            ..OwnerRow::default()
                        });
                    o.hour_ms = hour;
                    if w.doing == Doing::Busy {
                        o.busy_ms = o.busy_ms.saturating_add(step);
                    } else {
                        o.leased_ms = o.leased_ms.saturating_add(step);
                    }
                }
            }
        }
        let minute = now_ms / MINUTE_MS * MINUTE_MS;
        let flush_ms = if self.flush_ms == 0 {
            MINUTE_MS
        } else {
            self.flush_ms
        };
        let due = now_ms.saturating_sub(self.flushed_ms) >= flush_ms;
        if self.minute == Some(minute) && !due {
            return;
        }
        // A minute's row is written again at each flush within it (the
        // latest sample wins), so a chart has the current minute too.
        self.minute = Some(minute);
        self.flushed_ms = now_ms;
        self.minute_rows(minute, workers, queues());
        self.flush();
        if self.hour != Some(hour) {
            self.hour = Some(hour);
            self.ready.forget_before = Some((
                minute.saturating_sub(KEEP_MINUTES_MS),
                hour.saturating_sub(KEEP_HOURS_MS),
            ));
        }
    }

    /// A task of `owner` ended on `worker`.
    pub fn task_ended(
        &mut self,
        now_ms: u64,
        worker: &str,
        group: &str,
        owner: Option<&str>,
        how: Ended,
    ) {
        self.ended
            .insert(worker.to_string(), owner.map(str::to_string));
        let row = self.hour_row(now_ms / HOUR_MS * HOUR_MS, worker, group);
        row.time.tasks += 1;
        match how {
            Ended::Passed => row.time.passed += 1,
            Ended::Failed => row.time.failed += 1,
            Ended::Infrastructure => row.time.infra_errors += 1,
            Ended::Other => {}
        }
    }

    /// The rows ready for the commit (made once a minute).
    pub fn take_rows(&mut self) -> UsageRows {
        std::mem::take(&mut self.ready)
    }

    fn hour_row(&mut self, hour: u64, worker: &str, group: &str) -> &mut HourRow {
        let row = self
            .hours
            .entry(worker.to_string())
            .or_insert_with(|| HourRow {
                hour_ms: hour,
                worker: worker.to_string(),
                group: group.to_string(),
                ..HourRow::default()
            });
        if row.hour_ms != hour || row.group != group {
            // A new hour (or the worker's group changed): what was
            // counted leaves with the next rows, the new hour starts.
            let done = std::mem::replace(
                row,
                HourRow {
                    hour_ms: hour,
                    worker: worker.to_string(),
                    group: group.to_string(),
                    ..HourRow::default()
                },
            );
            if done.time != DeviceTime::default() {
                self.ready.hours.push(done);
            }
        }
        self.hours.get_mut(worker).expect("just made")
    }

    fn minute_rows<'a>(
        &mut self,
        minute: u64,
        workers: impl Iterator<Item = WorkerNow<'a>>,
        queues: Vec<QueueNow>,
    ) {
        let mut groups: BTreeMap<&str, MinuteRow> = BTreeMap::new();
        let new = |group: &str| MinuteRow {
            minute_ms: minute,
            group: group.to_string(),
            ..MinuteRow::default()
        };
        for w in workers {
            let g = groups.entry(w.group).or_insert_with(|| new(w.group));
            g.workers += 1;
            match w.doing {
                Doing::Busy => g.busy += 1,
                Doing::Idle => g.idle += 1,
                Doing::Leased => g.leased += 1,
                Doing::Broken => g.broken += 1,
                Doing::Offline => {}
            }
        }
        let mut rows: Vec<MinuteRow> = groups.into_values().collect();
        for q in queues {
            match rows.iter_mut().find(|r| r.group == q.group) {
                Some(r) => {
                    r.queued = q.queued;
                    r.wait_max_ms = q.wait_max_ms;
                }
                None => rows.push(MinuteRow {
                    queued: q.queued,
                    wait_max_ms: q.wait_max_ms,
                    ..new(&q.group)
                }),
            }
        }
        self.ready.minutes.extend(rows);
    }

    /// What was counted so far leaves with the next rows (as additions).
    fn flush(&mut self) {
        for row in self.hours.values_mut() {
            if row.time != DeviceTime::default() {
                let counted = std::mem::take(&mut row.time);
                self.ready.hours.push(HourRow {
                    time: counted,
                    ..row.clone()
                });
            }
        }
        for o in std::mem::take(&mut self.owners).into_values() {
            self.ready.owners.push(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w<'a>(name: &'a str, doing: Doing, owner: Option<&'a str>) -> WorkerNow<'a> {
        WorkerNow {
            name,
            group: "g",
            doing,
            owner,
        }
    }

    #[test]
    fn time_is_counted_per_state_and_leaves_once_a_minute() {
        let mut u = Usage::default();
        let lab = [
            w("w1", Doing::Busy, Some("ann")),
            w("w2", Doing::Idle, None),
            w("w3", Doing::Leased, Some("bob")),
        ];
        let queues = || {
            vec![QueueNow {
                group: "g".into(),
                queued: 4,
                wait_max_ms: 30_000,
            }]
        };
        // First observation at 10:00:00.5: a minute row, nothing counted.
        let t0 = 36_000_000 + 500;
        u.observe(t0, lab.iter().cloned(), queues);
        let first = u.take_rows();
        assert_eq!(first.minutes.len(), 1);
        assert_eq!(
            (
                first.minutes[0].busy,
                first.minutes[0].idle,
                first.minutes[0].leased,
                first.minutes[0].queued
            ),
            (1, 1, 1, 4)
        );
        assert!(first.hours.is_empty());
        // Each second for a minute: nothing leaves until the minute turns.
        for s in 1..60 {
            u.observe(t0 + s * 1000, lab.iter().cloned(), || unreachable!());
            assert!(u.take_rows().is_empty());
        }
        u.task_ended(t0 + 59_000, "w1", "g", Some("ann"), Ended::Passed);
        u.observe(t0 + 60_000, lab.iter().cloned(), queues);
        let rows = u.take_rows();
        let by = |name: &str| {
            rows.hours
                .iter()
                .find(|h| h.worker == name)
                .unwrap()
                .clone()
        };
        assert_eq!(
            (
                by("w1").time.busy_ms,
                by("w1").time.tasks,
                by("w1").time.passed
            ),
            (60_000, 1, 1)
        );
        assert_eq!(by("w2").time.idle_ms, 60_000);
        assert_eq!(by("w3").time.leased_ms, 60_000);
        let ann = rows.owners.iter().find(|o| o.owner == "ann").unwrap();
        assert_eq!(ann.busy_ms, 60_000);
        // Additions: the next minute's rows count only the next minute.
        for s in 61..120 {
            u.observe(t0 + s * 1000, lab.iter().cloned(), || unreachable!());
        }
        u.observe(t0 + 120_000, lab.iter().cloned(), queues);
        let rows = u.take_rows();
        assert!(rows.hours.iter().all(|h| h.time.total_ms() == 60_000));
    }

    #[test]
    fn a_task_shorter_than_a_tick_still_counts_as_busy_for_its_owner() {
        let mut u = Usage::with_flush(1000);
        let idle = [w("w1", Doing::Idle, None)];
        u.observe(10_000, idle.iter().cloned(), Vec::new);
        u.task_ended(10_400, "w1", "g", Some("bob"), Ended::Passed);
        u.observe(11_000, idle.iter().cloned(), Vec::new);
        let rows = u.take_rows();
        let h = rows.hours.iter().find(|h| h.worker == "w1").unwrap();
        assert_eq!((h.time.busy_ms, h.time.idle_ms, h.time.tasks), (1000, 0, 1));
        assert_eq!(rows.owners[0].owner, "bob");
    }

    #[test]
    fn a_stopped_server_does_not_count_the_gap() {
        let mut u = Usage::default();
        let lab = [w("w1", Doing::Busy, None)];
        u.observe(0, lab.iter().cloned(), Vec::new);
        u.observe(3_600_000 * 5, lab.iter().cloned(), Vec::new);
        let rows = u.take_rows();
        let total: u64 = rows.hours.iter().map(|h| h.time.busy_ms).sum();
        assert_eq!(total, MAX_STEP_MS);
        assert!(rows.forget_before.is_some());
    }

    #[test]
    fn a_new_hour_closes_the_old_ones_row() {
        let mut u = Usage::default();
        let lab = [w("w1", Doing::Idle, None)];
        let h = 3_600_000;
        u.observe(h - 5_000, lab.iter().cloned(), Vec::new);
        u.take_rows();
        u.observe(h - 1_000, lab.iter().cloned(), Vec::new);
        u.observe(h + 1_000, lab.iter().cloned(), Vec::new);
        let rows = u.take_rows();
        let hours: Vec<(u64, u64)> = rows
            .hours
            .iter()
            .map(|r| (r.hour_ms, r.time.idle_ms))
            .collect();
        assert_eq!(hours, [(0, 4_000), (h, 2_000)]);
    }
}
