//! Triage of a testrun's test cases against its series, as plain data:
//! the history reader fetches rows (`store::results`) and this decides
//! what they mean — regressions, fixes, flakes, device-specific failures,
//! known issues — with no I/O, so the rules are tested on their own.
//!
//! The rules (README "Results"):
//! - A case is the same case in two testruns when it has the same name in
//!   the task of the same number (`r12.2` and `r15.2`); a task's cases
//!   are those of its last attempt.
//! - **Known issue**: a failure whose name, message or task log matches
//!   a rule's pattern carries the rule's label.
//! - **Device-specific**: in the window (the series' last runs), every
//!   failure of the case in its device group was on one worker — at
//!   least [`DEVICE_MIN_FAILURES`] of them, one now — and another worker
//!   of the group passed it. It counts against that worker's health.
//! - **Flaky**: in the window it passed and failed on one image, or in
//!   this testrun it failed on one attempt and passed on another.
//! - **Regression**: failing now, not failing in the base, and none of
//!   the above. Failing in both and none of the above: still failing.

use crate::protocol::results::{
    CaseChange, CompareTotals, Comparison, KnownOn, KnownRule, MAX_COMPARED_LISTED, MAX_TRIAGED,
};
use crate::protocol::{CaseStatus, RunId, TaskId};
// Keyed by peers' case names: a randomised hash that is fast on short
// strings (SipHash made `compare` of 100 000 cases twice as slow).
use ahash::AHashMap;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One stored case of a testrun, as the triage reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseRow {
    pub task: TaskId,
    pub attempt: u32,
    pub name: String,
    pub status: CaseStatus,
    pub message: Option<String>,
    pub worker: Option<String>,
    pub devicegroup: Option<String>,
}

/// One stored result of a case in the window before a testrun.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowRow {
    pub num: u64,
    pub run: RunId,
    pub name: String,
    pub status: CaseStatus,
    pub worker: Option<String>,
    pub devicegroup: Option<String>,
    pub image: Option<String>,
}

/// Failures on one worker, at least, before a case counts as failing
/// because of that device (one failure is as likely a flake).
pub const DEVICE_MIN_FAILURES: u64 = 2;

/// Known-issue rules with their patterns compiled.
#[derive(Clone, Debug, Default)]
pub struct KnownRules {
    rules: Vec<(KnownRule, regex::Regex)>,
}

impl PartialEq for KnownRules {
    fn eq(&self, other: &Self) -> bool {
        self.list().eq(other.list())
    }
}
impl Eq for KnownRules {}

/// Compiled size a known-issue pattern may take (a hostile pattern
/// cannot make the server build a huge automaton).
const PATTERN_SIZE_LIMIT: usize = 1 << 20;

/// Compiles a known-issue pattern, or says why it is not one.
pub fn compile_pattern(pattern: &str) -> Result<regex::Regex, String> {
    if pattern.is_empty() || pattern.len() > crate::protocol::results::MAX_KNOWN_PATTERN_BYTES {
        return Err(format!(
            "a pattern is 1–{} bytes",
            crate::protocol::results::MAX_KNOWN_PATTERN_BYTES
        ));
    }
    regex::RegexBuilder::new(pattern)
        .size_limit(PATTERN_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("{pattern:?} is not a regular expression: {e}"))
}

impl KnownRules {
    /// Rules whose patterns compile (each was checked when it was added
    /// or the configuration loaded); any other is left out.
    pub fn new(rules: impl IntoIterator<Item = KnownRule>) -> KnownRules {
        KnownRules {
            rules: rules
                .into_iter()
                .filter_map(|r| compile_pattern(&r.pattern).ok().map(|re| (r, re)))
                .collect(),
        }
    }

    pub fn list(&self) -> impl Iterator<Item = &KnownRule> {
        self.rules.iter().map(|(r, _)| r)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether any rule looks at task logs.
    pub fn reads_logs(&self) -> bool {
        self.rules.iter().any(|(r, _)| r.on == KnownOn::Log)
    }

    /// The label of the first rule a failing case matches.
    pub fn label(&self, case: &CaseRow, log: Option<&str>) -> Option<String> {
        self.rules.iter().find_map(|(rule, re)| {
            let hit = match rule.on {
                KnownOn::Name => re.is_match(&case.name),
                KnownOn::Message => case.message.as_deref().is_some_and(|m| re.is_match(m)),
                KnownOn::Log => log.is_some_and(|l| re.is_match(l)),
            };
            hit.then(|| rule.label.clone())
        })
    }
}

/// The number of a task within its testrun (`r12.3` → `3`).
pub fn task_number(task: &str) -> &str {
    task.rsplit_once('.').map_or("", |(_, n)| n)
}

/// A case of one testrun: its last attempt, and whether another attempt
/// had the other outcome (failed, then passed on a retry).
#[derive(Clone, Copy, Debug)]
pub struct Final<'a> {
    pub row: &'a CaseRow,
    pub flipped: bool,
}

/// A case's identity within its testrun: (task number, name).
pub type CaseKey<'a> = (&'a str, &'a str);

/// Each case of a testrun by (task number, name), its last attempt.
pub fn finals(rows: &[CaseRow]) -> AHashMap<CaseKey<'_>, Final<'_>> {
    let mut last: AHashMap<&str, u32> = AHashMap::new();
    for r in rows {
        let a = last.entry(r.task.as_str()).or_insert(0);
        *a = (*a).max(r.attempt);
    }
    let mut out: AHashMap<CaseKey<'_>, Final<'_>> = AHashMap::with_capacity(rows.len());
    let mut earlier: Vec<(CaseKey<'_>, CaseStatus)> = Vec::new();
    for r in rows {
        let key = (task_number(&r.task), r.name.as_str());
        if Some(&r.attempt) == last.get(r.task.as_str()) {
            out.insert(
                key,
                Final {
                    row: r,
                    flipped: false,
                },
            );
        } else {
            earlier.push((key, r.status));
        }
    }
    for (key, status) in earlier {
        if let Some(f) = out.get_mut(&key) {
            f.flipped |= status != CaseStatus::Skip
                && f.row.status != CaseStatus::Skip
                && status.failed() != f.row.status.failed();
        }
    }
    out
}

/// What the window says of each case name: whether it is flaky or
/// device-specific, and why.
#[derive(Default)]
struct Evidence {
    /// image → (passed, failed)
    by_image: BTreeMap<String, (u64, u64)>,
    /// (group, worker) → (passed, failed)
    by_worker: BTreeMap<(String, String), (u64, u64)>,
}

fn gather(window: &[WindowRow]) -> AHashMap<&str, Evidence> {
    let mut out: AHashMap<&str, Evidence> = AHashMap::new();
    for w in window {
        if w.status == CaseStatus::Skip {
            continue;
        }
        let e = out.entry(w.name.as_str()).or_default();
        let bump = |(p, f): &mut (u64, u64)| {
            if w.status.failed() {
                *f += 1
            } else {
                *p += 1
            }
        };
        if let Some(i) = &w.image {
            bump(e.by_image.entry(i.clone()).or_default());
        }
        if let Some(wk) = &w.worker {
            bump(
                e.by_worker
                    .entry((w.devicegroup.clone().unwrap_or_default(), wk.clone()))
                    .or_default(),
            );
        }
    }
    out
}

impl Evidence {
    fn flaky(&self) -> Option<String> {
        self.by_image
            .iter()
            .find(|(_, (p, f))| *p > 0 && *f > 0)
            .map(|(image, (p, f))| {
                format!("passed {p} and failed {f} times on image {image} in the window")
            })
    }

    /// The worker every failure in `group` was on, when another worker
    /// of the group passed the case.
    fn device_specific(&self, group: &str, worker: &str) -> Option<String> {
        let in_group = || self.by_worker.iter().filter(|((g, _), _)| g == group);
        let failing: BTreeSet<&str> = in_group()
            .filter(|(_, (_, f))| *f > 0)
            .map(|((_, w), _)| w.as_str())
            .collect();
        let passing: Vec<&str> = in_group()
            .filter(|((_, w), (p, _))| *p > 0 && w != worker)
            .map(|((_, w), _)| w.as_str())
            .collect();
        let fails = in_group()
            .find(|((_, w), _)| w == worker)
            .map_or(0, |(_, (_, f))| *f);
        if failing.len() != 1
            || !failing.contains(worker)
            || passing.is_empty()
            || fails < DEVICE_MIN_FAILURES
        {
            return None;
        }
        Some(format!(
            "failed {fails} times in the window, only on {worker}; passed on {} ({group})",
            passing.join(", ")
        ))
    }
}

/// What triage found beyond the comparison: workers a device-specific
/// failure counts against, with the case.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Triage {
    pub comparison: Comparison,
    pub suspects: Vec<(String, String)>,
}

/// The inputs of one comparison.
pub struct Compare<'a> {
    pub run: RunId,
    pub base: Option<RunId>,
    pub series: String,
    pub cases: Vec<CaseRow>,
    pub base_cases: Vec<CaseRow>,
    pub window: &'a [WindowRow],
    pub known: &'a KnownRules,
    /// The tail of each failing task's log (for `on = "log"` rules).
    pub logs: &'a HashMap<TaskId, String>,
}

/// Sorts a testrun's cases against its base.
pub fn compare(input: Compare<'_>) -> Triage {
    let now = finals(&input.cases);
    let before = finals(&input.base_cases);
    let evidence = gather(input.window);
    let mut c = Comparison {
        run: input.run.clone(),
        base: input.base.clone(),
        series: input.series.clone(),
        ..Comparison::default()
    };
    let mut t = CompareTotals {
        cases: now.len() as u64,
        base_cases: before.len() as u64,
        ..CompareTotals::default()
    };
    let has_base = c.base.is_some();
    let mut suspects = Vec::new();
    let mut triaged = 0usize;
    let mut unchecked = 0u64;
    // In the order the rows came (no sort of every case); each case once,
    // at the row of its last attempt.
    for r in &input.cases {
        let key = (task_number(&r.task), r.name.as_str());
        let Some(&f) = now.get(&key).filter(|f| std::ptr::eq(f.row, r)) else {
            continue;
        };
        let base = before.get(&key).map(|b| b.row.status);
        if base.is_none() && has_base {
            push(&mut c.new_cases, &mut t.new_cases, || {
                change_of(f.row, base)
            });
        }
        if !f.row.status.failed() {
            if f.flipped {
                push(&mut c.flaky, &mut t.flaky, || CaseChange {
                    evidence: Some("failed, then passed on an automatic retry".into()),
                    ..change_of(f.row, base)
                });
            } else if base.is_some_and(CaseStatus::failed) {
                push(&mut c.fixed, &mut t.fixed, || change_of(f.row, base));
            }
            continue;
        }
        let checked = triaged < MAX_TRIAGED;
        triaged += 1;
        if !checked {
            unchecked += 1;
        }
        let e = evidence.get(f.row.name.as_str());
        let group = f.row.devicegroup.as_deref().unwrap_or("");
        let known = checked
            .then(|| {
                input
                    .known
                    .label(f.row, input.logs.get(&f.row.task).map(String::as_str))
            })
            .flatten();
        let device = match (checked, e, f.row.worker.as_deref()) {
            (true, Some(e), Some(w)) => e.device_specific(group, w).map(|why| (w, why)),
            _ => None,
        };
        let flaky = || {
            f.flipped
                .then(|| "failed on one attempt and passed on another".to_string())
                .or_else(|| e.filter(|_| checked).and_then(Evidence::flaky))
        };
        if let Some(label) = known {
            push(&mut c.known, &mut t.known, || CaseChange {
                known: Some(label),
                ..change_of(f.row, base)
            });
        } else if let Some((worker, why)) = device {
            suspects.push((worker.to_string(), f.row.name.clone()));
            push(&mut c.device_specific, &mut t.device_specific, || {
                CaseChange {
                    evidence: Some(why),
                    ..change_of(f.row, base)
                }
            });
        } else if let Some(why) = flaky() {
            push(&mut c.flaky, &mut t.flaky, || CaseChange {
                evidence: Some(why),
                ..change_of(f.row, base)
            });
        } else if base.is_some_and(CaseStatus::failed) {
            push(&mut c.still_failing, &mut t.still_failing, || {
                change_of(f.row, base)
            });
        } else {
            push(&mut c.regressions, &mut t.regressions, || {
                change_of(f.row, base)
            });
        }
    }
    if has_base {
        let gone = input.base_cases.iter().filter_map(|r| {
            let k = (task_number(&r.task), r.name.as_str());
            before
                .get(&k)
                .filter(|b| std::ptr::eq(b.row, r) && !now.contains_key(&k))
        });
        for b in gone {
            push(&mut c.removed_cases, &mut t.removed_cases, || CaseChange {
                status: None,
                ..change_of(b.row, Some(b.row.status))
            });
        }
    }
    c.totals = t;
    let mut notes = Vec::new();
    if c.base.is_none() {
        notes.push(format!(
            "no earlier finished testrun of series {} to compare with: every failure counts as a regression",
            c.series
        ));
    }
    if unchecked > 0 {
        notes.push(format!(
            "{unchecked} failing cases past the first {MAX_TRIAGED} were not checked for known issues, flakiness or one device"
        ));
    }
    if !notes.is_empty() {
        c.note = Some(notes.join("; "));
    }
    Triage {
        comparison: c,
        suspects,
    }
}

/// Counts a case in a list, and lists it while the list has room (the
/// change is made only then).
fn push(list: &mut Vec<CaseChange>, total: &mut u64, change: impl FnOnce() -> CaseChange) {
    *total += 1;
    if list.len() < MAX_COMPARED_LISTED {
        list.push(change());
    }
}

fn change_of(row: &CaseRow, base: Option<CaseStatus>) -> CaseChange {
    CaseChange {
        name: row.name.clone(),
        task: row.task.clone(),
        status: Some(row.status),
        base_status: base,
        message: row.message.clone(),
        worker: row.worker.clone(),
        known: None,
        evidence: None,
        last_passed: None,
    }
}

/// The names of a testrun's failing cases the window is read for (at
/// most [`MAX_TRIAGED`]), in the order `compare` checks them.
pub fn failing_names(rows: &[CaseRow]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for r in rows.iter().filter(|r| r.status.failed()) {
        if seen.insert(r.name.as_str()) {
            let name = r.name.as_str();
            out.push(name.to_string());
            if out.len() >= MAX_TRIAGED {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "results_tests.rs"]
mod tests;
