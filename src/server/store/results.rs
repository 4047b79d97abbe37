//! Results across testruns read from the state database — `compare`,
//! `case_history`, `list_flaky` and the triage of a testrun that ended —
//! written once for both backends: the queries are plain SQL with `?n`
//! placeholders (made `$n` for PostgreSQL) run through [`SqlRows`], and
//! what the rows mean is decided by [`crate::server::results`].
//!
//! Every query finds its rows by an index: a testrun's cases by
//! `cases_run`, a case's results by `cases_history (name, num, status)`,
//! a series' testruns by `runs_series (series, num)`. Nothing reads a
//! whole table.

use crate::protocol::results::{CaseHistory, CaseRun, FlakyCase, MAX_FLAKY_LISTED};
use crate::protocol::{CaseStatus, RunId, TaskId};
use crate::server::results::{self, CaseRow, Compare, KnownRules, Triage, WindowRow};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of a task's log (its end) a `log` known-issue rule looks at.
pub const KNOWN_LOG_BYTES: u64 = 1 << 20;
/// Testruns of a series the flakiness and device evidence is read from
/// at most.
pub const MAX_WINDOW_RUNS: u32 = 200;

/// A question about results.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResultQuery {
    Compare(CompareQuery),
    History(HistoryQuery),
    Flaky(FlakyQuery),
    /// The utilisation report (`owner`: only that owner's line).
    Report {
        since_ms: u64,
        devicegroup: Option<String>,
        owner: Option<String>,
    },
    /// The device groups' minutes, one point per step.
    Lab {
        since_ms: u64,
        step_ms: u64,
        devicegroup: Option<String>,
    },
    /// A worker's hours.
    Worker {
        worker: String,
        since_ms: u64,
    },
    /// Cases × workers over a series' newest finished testruns.
    Matrix {
        series: String,
        runs: u32,
        owner: Option<String>,
    },
}

/// `compare`, and the triage of a testrun that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompareQuery {
    pub run: RunId,
    /// Chosen; none: the series' last finished testrun before `run`.
    pub base: Option<RunId>,
    /// Only testruns of this owner count as base and evidence (a user
    /// who may see only their own testruns).
    pub owner: Option<String>,
    /// Testruns of the series the evidence is read from (this one and
    /// those before it).
    pub window_runs: u32,
    pub known: Arc<KnownRules>,
}

/// `case_history`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    pub case: String,
    pub series: Option<String>,
    pub devicegroup: Option<String>,
    pub owner: Option<String>,
    pub limit: u32,
}

/// `list_flaky`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlakyQuery {
    pub devicegroup: Option<String>,
    pub owner: Option<String>,
    /// The newest finished testruns looked at.
    pub window_runs: u32,
}

/// What a results question answered.
#[derive(Clone, Debug, PartialEq)]
pub enum ResultFound {
    /// The testrun is not in the database (never stored, or not a testrun).
    NoRun(RunId),
    Compared(Box<Triage>),
    History(CaseHistory),
    Flaky(Vec<FlakyCase>),
    Report(crate::protocol::results::Report),
    Lab(Vec<crate::protocol::results::LabPoint>),
    Worker(String, Vec<crate::protocol::results::WorkerHour>),
    Matrix(crate::protocol::results::SeriesMatrix),
}

pub use super::sql::{SqlParam, SqlRows, SqlValue};

fn text(v: &Option<String>) -> SqlParam {
    SqlParam::Text(v.clone())
}
fn int(v: u64) -> SqlParam {
    SqlParam::Int(super::index::sql_int(v))
}
fn s(v: &str) -> SqlParam {
    SqlParam::Text(Some(v.to_string()))
}

const RUN: &str = "SELECT num, series FROM runs WHERE id = ?1 AND kind = 'r'";
const BASE: &str = "SELECT id FROM runs WHERE series = ?1 AND num < ?2 AND kind = 'r'
     AND state = 'finished' AND (CAST(?3 AS TEXT) IS NULL OR owner = ?3)
     ORDER BY num DESC LIMIT 1";
const WINDOW_LOW: &str = "SELECT num FROM runs WHERE series = ?1 AND num <= ?2 AND kind = 'r'
     AND (CAST(?3 AS TEXT) IS NULL OR owner = ?3) ORDER BY num DESC LIMIT 1 OFFSET ?4";
/// A testrun's cases: what triage needs of most is their name and
/// status, read from the index `cases_run` alone (it covers them);
/// message, worker and group of the failing ones come apart.
const CASES: &str = "SELECT task, attempt, name,
         CASE status WHEN 'pass' THEN 0 WHEN 'fail' THEN 1 WHEN 'error' THEN 2 ELSE 3 END
     FROM cases WHERE run = ?1";
/// A testrun's result files' cases, one row per file (`case_sets`).
const CASE_SETS: &str = "SELECT task, attempt, body FROM case_sets WHERE run = ?1";
const FAILING_CASES: &str = "SELECT task, attempt, name, message, worker, devicegroup
     FROM cases WHERE run = ?1 AND status IN ('fail', 'error')";
const WINDOW: &str = "SELECT c.num, c.run, c.status, c.worker, c.devicegroup, r.image
     FROM cases c JOIN runs r ON r.id = c.run
     WHERE c.name = ?1 AND c.num BETWEEN ?2 AND ?3 AND c.series = ?4
       AND (CAST(?5 AS TEXT) IS NULL OR r.owner = ?5)";
const LAST_PASSED: &str = "SELECT c.run FROM cases c JOIN runs r ON r.id = c.run
     WHERE c.name = ?1 AND c.num < ?2 AND c.status = 'pass' AND c.series = ?3
       AND (CAST(?4 AS TEXT) IS NULL OR r.owner = ?4)
     ORDER BY c.num DESC LIMIT 1";
const HISTORY: &str = "SELECT c.run, c.task, c.attempt, c.status, c.duration_ms, c.message,
         c.worker, c.devicegroup, r.image, c.series, r.ended_ms
     FROM cases c JOIN runs r ON r.id = c.run
     WHERE c.name = ?1 AND (CAST(?2 AS TEXT) IS NULL OR c.series = ?2)
       AND (CAST(?3 AS TEXT) IS NULL OR c.devicegroup = ?3)
       AND (CAST(?4 AS TEXT) IS NULL OR r.owner = ?4)
     ORDER BY c.num DESC, c.task, c.attempt DESC LIMIT ?5";
const HISTORY_LAST_PASS: &str = "SELECT c.num, c.run FROM cases c JOIN runs r ON r.id = c.run
     WHERE c.name = ?1 AND c.status = 'pass' AND (CAST(?2 AS TEXT) IS NULL OR c.series = ?2)
       AND (CAST(?3 AS TEXT) IS NULL OR c.devicegroup = ?3)
       AND (CAST(?4 AS TEXT) IS NULL OR r.owner = ?4)
     ORDER BY c.num DESC LIMIT 1";
const HISTORY_FIRST_FAIL: &str = "SELECT c.run FROM cases c JOIN runs r ON r.id = c.run
     WHERE c.name = ?1 AND c.status IN ('fail', 'error') AND c.num > ?5
       AND (CAST(?2 AS TEXT) IS NULL OR c.series = ?2)
       AND (CAST(?3 AS TEXT) IS NULL OR c.devicegroup = ?3)
       AND (CAST(?4 AS TEXT) IS NULL OR r.owner = ?4)
     ORDER BY c.num LIMIT 1";
const NEWEST_FINISHED: &str = "SELECT id, num FROM runs WHERE kind = 'r' AND state = 'finished'
     AND (CAST(?1 AS TEXT) IS NULL OR instr(groups, ?1) > 0)
     AND (CAST(?2 AS TEXT) IS NULL OR owner = ?2)
     ORDER BY num DESC LIMIT ?3";
const FAILING_IN: &str = "SELECT c.name, c.series, c.worker, r.image
     FROM cases c JOIN runs r ON r.id = c.run WHERE c.run = ?1 AND c.status IN ('fail', 'error')
       AND (CAST(?2 AS TEXT) IS NULL OR c.devicegroup = ?2)";
const PASSED_SINCE: &str = "SELECT c.series, r.image, COUNT(*) FROM cases c
     JOIN runs r ON r.id = c.run
     WHERE c.name = ?1 AND c.num >= ?2 AND c.status = 'pass'
       AND (CAST(?3 AS TEXT) IS NULL OR c.devicegroup = ?3)
       AND (CAST(?4 AS TEXT) IS NULL OR r.owner = ?4)
     GROUP BY c.series, r.image";

/// Answers one results question. `logs`: the files folder (task logs,
/// for `log` known-issue rules).
pub async fn answer<D: SqlRows>(
    db: &D,
    q: &ResultQuery,
    logs: Option<&Path>,
) -> Result<ResultFound, D::Error> {
    match q {
        ResultQuery::Compare(q) => compare(db, q, logs).await,
        ResultQuery::History(q) => history(db, q).await.map(ResultFound::History),
        ResultQuery::Flaky(q) => flaky(db, q).await.map(ResultFound::Flaky),
        ResultQuery::Report {
            since_ms,
            devicegroup,
            owner,
        } => super::usage::report(db, *since_ms, devicegroup, owner)
            .await
            .map(ResultFound::Report),
        ResultQuery::Lab {
            since_ms,
            step_ms,
            devicegroup,
        } => super::usage::lab_series(db, *since_ms, *step_ms, devicegroup)
            .await
            .map(ResultFound::Lab),
        ResultQuery::Worker { worker, since_ms } => {
            super::usage::worker_series(db, worker, *since_ms)
                .await
                .map(|h| ResultFound::Worker(worker.clone(), h))
        }
        ResultQuery::Matrix {
            series,
            runs,
            owner,
        } => super::usage::matrix(db, series, *runs, owner)
            .await
            .map(ResultFound::Matrix),
    }
}

/// A testrun's number and series.
struct RunFacts {
    num: u64,
    series: String,
}

async fn facts<D: SqlRows>(db: &D, run: &str) -> Result<Option<RunFacts>, D::Error> {
    Ok(db.rows(RUN, &[s(run)]).await?.first().map(|r| RunFacts {
        num: r[0].int().unwrap_or(0),
        series: r[1].text().unwrap_or_default(),
    }))
}

/// A status as [`CASES`] reads it.
fn status_of(code: Option<u64>) -> CaseStatus {
    match code {
        Some(0) => CaseStatus::Pass,
        Some(1) => CaseStatus::Fail,
        Some(2) => CaseStatus::Error,
        _ => CaseStatus::Skip,
    }
}

/// The cases of the rows of `case_sets` (task, attempt, set).
fn set_rows(sets: Vec<Vec<SqlValue>>) -> Vec<CaseRow> {
    let mut out = Vec::new();
    for mut set in sets {
        let task = set[0].take_text().unwrap_or_default();
        let attempt = set[1].int().unwrap_or(0).min(u64::from(u32::MAX)) as u32;
        let body = set[2].take_bytes().unwrap_or_default();
        for (status, name) in crate::server::store::cases::decode_set(&body) {
            out.push(CaseRow {
                task: task.clone(),
                attempt,
                name,
                status,
                message: None,
                worker: None,
                devicegroup: None,
            });
        }
    }
    out
}

/// The cases of each of `runs`, read at once (a network database gets
/// the questions together).
async fn cases_of<D: SqlRows>(db: &D, runs: &[&str]) -> Result<Vec<Vec<CaseRow>>, D::Error> {
    let attempt = |v: &SqlValue| v.int().unwrap_or(0).min(u64::from(u32::MAX)) as u32;
    let asks: Vec<Vec<SqlParam>> = runs.iter().map(|r| vec![s(r)]).collect();
    let failing = db.rows_each(FAILING_CASES, &asks).await?;
    let sets = db.rows_each(CASE_SETS, &asks).await?;
    let mut out = Vec::with_capacity(runs.len());
    for ((failing, sets), run) in failing.into_iter().zip(sets).zip(runs) {
        let mut details: HashMap<(String, u32, String), [Option<String>; 3]> = HashMap::new();
        for mut r in failing {
            let key = (
                r[0].take_text().unwrap_or_default(),
                attempt(&r[1]),
                r[2].take_text().unwrap_or_default(),
            );
            details
                .entry(key)
                .or_insert([r[3].take_text(), r[4].take_text(), r[5].take_text()]);
        }
        // Cases stored before their sets were (schema 9): row by row.
        let mut rows = if sets.is_empty() {
            db.rows(CASES, &[s(run)])
                .await?
                .into_iter()
                .map(|mut r| CaseRow {
                    task: r[0].take_text().unwrap_or_default(),
                    attempt: attempt(&r[1]),
                    name: r[2].take_text().unwrap_or_default(),
                    status: status_of(r[3].int()),
                    message: None,
                    worker: None,
                    devicegroup: None,
                })
                .collect()
        } else {
            set_rows(sets)
        };
        for row in rows.iter_mut().filter(|r| r.status.failed()) {
            if let Some([m, w, g]) =
                details.remove(&(row.task.clone(), row.attempt, row.name.clone()))
            {
                (row.message, row.worker, row.devicegroup) = (m, w, g);
            }
        }
        out.push(rows);
    }
    Ok(out)
}

async fn compare<D: SqlRows>(
    db: &D,
    q: &CompareQuery,
    logs: Option<&Path>,
) -> Result<ResultFound, D::Error> {
    let Some(run) = facts(db, &q.run).await? else {
        return Ok(ResultFound::NoRun(q.run.clone()));
    };
    let base = match &q.base {
        Some(b) => match facts(db, b).await? {
            Some(_) => Some(b.clone()),
            None => return Ok(ResultFound::NoRun(b.clone())),
        },
        None => db
            .rows(BASE, &[s(&run.series), int(run.num), text(&q.owner)])
            .await?
            .first()
            .and_then(|r| r[0].text()),
    };
    let mut both = match &base {
        Some(b) => cases_of(db, &[&q.run, b]).await?,
        None => cases_of(db, &[&q.run]).await?,
    };
    let base_cases = if both.len() > 1 {
        both.pop().unwrap_or_default()
    } else {
        Vec::new()
    };
    let cases = both.pop().unwrap_or_default();
    let window_runs = q.window_runs.clamp(1, MAX_WINDOW_RUNS);
    let low = db
        .rows(
            WINDOW_LOW,
            &[
                s(&run.series),
                int(run.num),
                text(&q.owner),
                int(u64::from(window_runs) - 1),
            ],
        )
        .await?
        .first()
        .and_then(|r| r[0].int())
        .unwrap_or(0);
    let names = results::failing_names(&cases);
    let asks: Vec<Vec<SqlParam>> = names
        .iter()
        .map(|name| {
            vec![
                s(name),
                int(low),
                int(run.num),
                s(&run.series),
                text(&q.owner),
            ]
        })
        .collect();
    let mut window = Vec::new();
    for (name, rows) in names.iter().zip(db.rows_each(WINDOW, &asks).await?) {
        for r in rows {
            window.push(WindowRow {
                num: r[0].int().unwrap_or(0),
                run: r[1].text().unwrap_or_default(),
                name: name.clone(),
                status: r[2].status(),
                worker: r[3].text(),
                devicegroup: r[4].text(),
                image: r[5].text(),
            });
        }
    }
    let tails = if q.known.reads_logs() {
        log_tails(&cases, logs)
    } else {
        HashMap::new()
    };
    let mut triage = results::compare(Compare {
        run: q.run.clone(),
        base,
        series: run.series.clone(),
        cases,
        base_cases,
        window: &window,
        known: &q.known,
        logs: &tails,
    });
    let asks: Vec<Vec<SqlParam>> = (triage.comparison.regressions.iter())
        .map(|c| vec![s(&c.name), int(run.num), s(&run.series), text(&q.owner)])
        .collect();
    let found = db.rows_each(LAST_PASSED, &asks).await?;
    for (change, rows) in triage.comparison.regressions.iter_mut().zip(found) {
        change.last_passed = rows.first().and_then(|r| r[0].text());
    }
    Ok(ResultFound::Compared(Box::new(triage)))
}

/// The end of each failing task's log (for `log` rules); a log that
/// cannot be read matches nothing.
fn log_tails(cases: &[CaseRow], logs: Option<&Path>) -> HashMap<TaskId, String> {
    let Some(root) = logs else {
        return HashMap::new();
    };
    let tasks: BTreeSet<&str> = cases
        .iter()
        .filter(|c| c.status.failed())
        .map(|c| c.task.as_str())
        .collect();
    let mut out = HashMap::new();
    for task in tasks
        .into_iter()
        .take(crate::protocol::results::MAX_TRIAGED)
    {
        // Task ids come from the database, written by this server; still
        // checked before they become a path.
        if !crate::protocol::limits::is_safe_id(task) {
            continue;
        }
        let path: PathBuf = root.join("tasks").join(task).join("log");
        if let Ok(text) = read_tail(&path, KNOWN_LOG_BYTES) {
            out.insert(task.to_string(), text);
        }
    }
    out
}

fn read_tail(path: &Path, max: u64) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut bytes = Vec::new();
    f.take(max).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

async fn history<D: SqlRows>(db: &D, q: &HistoryQuery) -> Result<CaseHistory, D::Error> {
    let filters = [
        s(&q.case),
        text(&q.series),
        text(&q.devicegroup),
        text(&q.owner),
    ];
    let with = |extra: SqlParam| {
        let mut p = filters.to_vec();
        p.push(extra);
        p
    };
    let runs = db
        .rows(HISTORY, &with(SqlParam::Int(i64::from(q.limit))))
        .await?
        .iter()
        .map(|r| CaseRun {
            run: r[0].text().unwrap_or_default(),
            task: r[1].text().unwrap_or_default(),
            attempt: r[2].int().unwrap_or(0).min(u64::from(u32::MAX)) as u32,
            status: r[3].status(),
            duration_ms: r[4].int(),
            message: r[5].text(),
            worker: r[6].text(),
            devicegroup: r[7].text(),
            image: r[8].text(),
            series: r[9].text(),
            ended_ms: r[10].int(),
        })
        .collect();
    let last = db.rows(HISTORY_LAST_PASS, &filters).await?;
    let last_passed = last.first().and_then(|r| r[1].text());
    let after = last.first().and_then(|r| r[0].int()).unwrap_or(0);
    let first_failed = db
        .rows(HISTORY_FIRST_FAIL, &with(int(after)))
        .await?
        .first()
        .and_then(|r| r[0].text());
    Ok(CaseHistory {
        case: q.case.clone(),
        runs,
        last_passed,
        first_failed,
    })
}

async fn flaky<D: SqlRows>(db: &D, q: &FlakyQuery) -> Result<Vec<FlakyCase>, D::Error> {
    let pattern = q.devicegroup.as_ref().map(|g| format!(",{g},"));
    let newest = db
        .rows(
            NEWEST_FINISHED,
            &[
                SqlParam::Text(pattern),
                text(&q.owner),
                int(u64::from(q.window_runs.clamp(1, MAX_WINDOW_RUNS))),
            ],
        )
        .await?;
    let low = newest.last().and_then(|r| r[1].int()).unwrap_or(0);
    // (name, series, image) → failing runs (newest first) and workers.
    type Key = (String, String, String);
    let mut failing: BTreeMap<Key, (Vec<RunId>, BTreeSet<String>)> = BTreeMap::new();
    for r in &newest {
        let run = r[0].text().unwrap_or_default();
        for c in db
            .rows(FAILING_IN, &[s(&run), text(&q.devicegroup)])
            .await?
        {
            let key = (
                c[0].text().unwrap_or_default(),
                c[1].text().unwrap_or_default(),
                c[3].text().unwrap_or_default(),
            );
            if failing.len() >= crate::protocol::results::MAX_TRIAGED && !failing.contains_key(&key)
            {
                continue;
            }
            let entry = failing.entry(key).or_default();
            if entry.0.last() != Some(&run) {
                entry.0.push(run.clone());
            }
            if let Some(w) = c[2].text() {
                entry.1.insert(w);
            }
        }
    }
    let mut out = Vec::new();
    let names: BTreeSet<&str> = failing.keys().map(|(n, _, _)| n.as_str()).collect();
    for name in names {
        let passed = db
            .rows(
                PASSED_SINCE,
                &[s(name), int(low), text(&q.devicegroup), text(&q.owner)],
            )
            .await?;
        for p in passed {
            let (series, image) = (
                p[0].text().unwrap_or_default(),
                p[1].text().unwrap_or_default(),
            );
            let key = (name.to_string(), series, image);
            let Some((failed_in, workers)) = failing.get(&key) else {
                continue;
            };
            let (_, series, image) = key;
            out.push(FlakyCase {
                name: name.to_string(),
                series,
                image,
                passed: p[2].int().unwrap_or(0),
                failed: failed_in.len() as u64,
                failed_in: failed_in.iter().take(10).cloned().collect(),
                workers: workers.iter().cloned().collect(),
            });
        }
    }
    out.sort_by(|a, b| b.failed.cmp(&a.failed).then(a.name.cmp(&b.name)));
    out.truncate(MAX_FLAKY_LISTED);
    Ok(out)
}
