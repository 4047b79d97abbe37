//! The lab's usage series in the state database (schema 10): written in
//! the scheduler's commits as additions ([`crate::server::usage`]), read
//! by the history reader for the report and the charts (through
//! [`super::results::SqlRows`], one SQL for both backends).

use super::index::sql_int;
use super::sql::{SqlParam, SqlRows, SqlValue};
use crate::protocol::results::{
    DeviceTime, LabPoint, OwnerLine, Report, UsageLine, WorkerHour, MAX_MATRIX_CASES,
    MAX_MATRIX_WORKERS,
};
use crate::server::usage::UsageRows;

const MINUTE: &str = "INSERT INTO lab_minutes (minute, devicegroup, workers, busy, idle, leased,
         broken, queued, wait_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
     ON CONFLICT (minute, devicegroup) DO UPDATE SET workers = excluded.workers,
         busy = excluded.busy, idle = excluded.idle, leased = excluded.leased,
         broken = excluded.broken, queued = excluded.queued, wait_ms = excluded.wait_ms";
const HOUR: &str = "INSERT INTO usage_hours (hour, worker, devicegroup, busy_ms, idle_ms,
         leased_ms, broken_ms, offline_ms, tasks, passed, failed, infra_errors)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
     ON CONFLICT (hour, worker, devicegroup) DO UPDATE SET
         busy_ms = usage_hours.busy_ms + excluded.busy_ms,
         idle_ms = usage_hours.idle_ms + excluded.idle_ms,
         leased_ms = usage_hours.leased_ms + excluded.leased_ms,
         broken_ms = usage_hours.broken_ms + excluded.broken_ms,
         offline_ms = usage_hours.offline_ms + excluded.offline_ms,
         tasks = usage_hours.tasks + excluded.tasks,
         passed = usage_hours.passed + excluded.passed,
         failed = usage_hours.failed + excluded.failed,
         infra_errors = usage_hours.infra_errors + excluded.infra_errors";
const OWNER: &str = "INSERT INTO owner_hours (hour, owner, devicegroup, busy_ms, leased_ms)
     VALUES (?1, ?2, ?3, ?4, ?5)
     ON CONFLICT (hour, owner, devicegroup) DO UPDATE SET
         busy_ms = owner_hours.busy_ms + excluded.busy_ms,
         leased_ms = owner_hours.leased_ms + excluded.leased_ms";
const FORGET: [&str; 3] = [
    "DELETE FROM lab_minutes WHERE minute < ?1",
    "DELETE FROM usage_hours WHERE hour < ?1",
    "DELETE FROM owner_hours WHERE hour < ?1",
];

/// Each statement of a commit's usage rows with its parameters.
pub(crate) fn statements(rows: &UsageRows) -> Vec<(&'static str, Vec<SqlParam>)> {
    let i = |v: u64| SqlParam::Int(sql_int(v));
    let t = |v: &str| SqlParam::Text(Some(v.to_string()));
    let mut out = Vec::new();
    for m in &rows.minutes {
        out.push((
            MINUTE,
            vec![
                i(m.minute_ms),
                t(&m.group),
                i(m.workers),
                i(m.busy),
                i(m.idle),
                i(m.leased),
                i(m.broken),
                i(m.queued),
                i(m.wait_max_ms),
            ],
        ));
    }
    for h in &rows.hours {
        out.push((
            HOUR,
            vec![
                i(h.hour_ms),
                t(&h.worker),
                t(&h.group),
                i(h.time.busy_ms),
                i(h.time.idle_ms),
                i(h.time.leased_ms),
                i(h.time.broken_ms),
                i(h.time.offline_ms),
                i(h.time.tasks),
                i(h.time.passed),
                i(h.time.failed),
                i(h.time.infra_errors),
            ],
        ));
    }
    for o in &rows.owners {
        out.push((
            OWNER,
            vec![
                i(o.hour_ms),
                t(&o.owner),
                t(&o.group),
                i(o.busy_ms),
                i(o.leased_ms),
            ],
        ));
    }
    if let Some((minutes, hours)) = rows.forget_before {
        out.push((FORGET[0], vec![i(minutes)]));
        out.push((FORGET[1], vec![i(hours)]));
        out.push((FORGET[2], vec![i(hours)]));
    }
    out
}

/// Writes them in an SQLite transaction.
pub(crate) fn sqlite_write(
    tx: &rusqlite::Transaction<'_>,
    rows: &UsageRows,
) -> Result<(), rusqlite::Error> {
    for (sql, params) in statements(rows) {
        let values = params.into_iter().map(|p| match p {
            SqlParam::Int(v) => rusqlite::types::Value::Integer(v),
            SqlParam::Text(Some(t)) => rusqlite::types::Value::Text(t),
            SqlParam::Text(None) => rusqlite::types::Value::Null,
        });
        tx.prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(values))?;
    }
    Ok(())
}

const GROUPS: &str = "SELECT devicegroup, CAST(SUM(busy_ms) AS BIGINT), CAST(SUM(idle_ms) AS BIGINT), CAST(SUM(leased_ms) AS BIGINT),
         CAST(SUM(broken_ms) AS BIGINT), CAST(SUM(offline_ms) AS BIGINT), CAST(SUM(tasks) AS BIGINT), CAST(SUM(passed) AS BIGINT), CAST(SUM(failed) AS BIGINT), CAST(SUM(infra_errors) AS BIGINT)
     FROM usage_hours WHERE hour >= ?1 AND (CAST(?2 AS TEXT) IS NULL OR devicegroup = ?2)
     GROUP BY devicegroup ORDER BY devicegroup";
const DEVICES: &str = "SELECT worker, devicegroup, CAST(SUM(busy_ms) AS BIGINT), CAST(SUM(idle_ms) AS BIGINT), CAST(SUM(leased_ms) AS BIGINT),
         CAST(SUM(broken_ms) AS BIGINT), CAST(SUM(offline_ms) AS BIGINT), CAST(SUM(tasks) AS BIGINT), CAST(SUM(passed) AS BIGINT), CAST(SUM(failed) AS BIGINT), CAST(SUM(infra_errors) AS BIGINT)
     FROM usage_hours WHERE hour >= ?1 AND (CAST(?2 AS TEXT) IS NULL OR devicegroup = ?2)
     GROUP BY worker, devicegroup ORDER BY devicegroup, worker";
const OWNERS: &str = "SELECT owner, devicegroup, CAST(SUM(busy_ms) AS BIGINT), CAST(SUM(leased_ms) AS BIGINT)
     FROM owner_hours WHERE hour >= ?1 AND (CAST(?2 AS TEXT) IS NULL OR devicegroup = ?2)
       AND (CAST(?3 AS TEXT) IS NULL OR owner = ?3)
     GROUP BY owner, devicegroup ORDER BY CAST(SUM(busy_ms) AS BIGINT) + CAST(SUM(leased_ms) AS BIGINT) DESC, owner";
const LAB: &str = "SELECT (minute / ?2) * ?2, devicegroup, CAST(AVG(workers) AS DOUBLE PRECISION), CAST(AVG(busy) AS DOUBLE PRECISION), CAST(AVG(idle) AS DOUBLE PRECISION),
         CAST(AVG(leased) AS DOUBLE PRECISION), CAST(AVG(broken) AS DOUBLE PRECISION), CAST(AVG(queued) AS DOUBLE PRECISION), CAST(MAX(wait_ms) AS BIGINT)
     FROM lab_minutes WHERE minute >= ?1 AND (CAST(?3 AS TEXT) IS NULL OR devicegroup = ?3)
     GROUP BY (minute / ?2) * ?2, devicegroup ORDER BY 1, 2";
const WORKER: &str = "SELECT hour, CAST(SUM(busy_ms) AS BIGINT), CAST(SUM(idle_ms) AS BIGINT), CAST(SUM(leased_ms) AS BIGINT), CAST(SUM(broken_ms) AS BIGINT),
         CAST(SUM(offline_ms) AS BIGINT), CAST(SUM(tasks) AS BIGINT), CAST(SUM(passed) AS BIGINT), CAST(SUM(failed) AS BIGINT), CAST(SUM(infra_errors) AS BIGINT)
     FROM usage_hours WHERE worker = ?1 AND hour >= ?2 GROUP BY hour ORDER BY hour";

fn n(v: &SqlValue) -> u64 {
    match v {
        SqlValue::Int(i) => i.and_then(|i| u64::try_from(i).ok()).unwrap_or(0),
        SqlValue::Text(t) => t
            .as_deref()
            .and_then(|t| t.parse::<f64>().ok())
            .map_or(0, |f| f.max(0.0) as u64),
        SqlValue::Bytes(_) => 0,
    }
}

fn f(v: &SqlValue) -> f64 {
    match v {
        SqlValue::Int(i) => i.unwrap_or(0) as f64,
        SqlValue::Text(t) => t.as_deref().and_then(|t| t.parse().ok()).unwrap_or(0.0),
        SqlValue::Bytes(_) => 0.0,
    }
}

fn s(v: &SqlValue) -> String {
    match v {
        SqlValue::Text(t) => t.clone().unwrap_or_default(),
        SqlValue::Int(i) => i.map(|i| i.to_string()).unwrap_or_default(),
        SqlValue::Bytes(_) => String::new(),
    }
}

fn line(name: String, group: String, r: &[SqlValue]) -> UsageLine {
    UsageLine {
        name,
        devicegroup: group,
        time: device_time(r),
    }
}

/// The nine sums every usage query selects, in `DeviceTime`'s order.
fn device_time(r: &[SqlValue]) -> DeviceTime {
    DeviceTime {
        busy_ms: n(&r[0]),
        idle_ms: n(&r[1]),
        leased_ms: n(&r[2]),
        broken_ms: n(&r[3]),
        offline_ms: n(&r[4]),
        tasks: n(&r[5]),
        passed: n(&r[6]),
        failed: n(&r[7]),
        infra_errors: n(&r[8]),
    }
}

fn text(v: &Option<String>) -> SqlParam {
    SqlParam::Text(v.clone())
}

/// `get_report`: since `since_ms`, of one group or all; owners only
/// `owner` when given (a `submit` user sees its own line).
pub async fn report<D: SqlRows>(
    db: &D,
    since_ms: u64,
    group: &Option<String>,
    owner: &Option<String>,
) -> Result<Report, D::Error> {
    let since = SqlParam::Int(sql_int(since_ms));
    let groups = db
        .rows(GROUPS, &[since.clone(), text(group)])
        .await?
        .iter()
        .map(|r| line(s(&r[0]), String::new(), &r[1..]))
        .collect();
    let devices = db
        .rows(DEVICES, &[since.clone(), text(group)])
        .await?
        .iter()
        .map(|r| line(s(&r[0]), s(&r[1]), &r[2..]))
        .collect();
    let owners = db
        .rows(OWNERS, &[since, text(group), text(owner)])
        .await?
        .iter()
        .map(|r| OwnerLine {
            owner: s(&r[0]),
            devicegroup: s(&r[1]),
            busy_ms: n(&r[2]),
            leased_ms: n(&r[3]),
        })
        .collect();
    Ok(Report {
        since_ms,
        groups,
        devices,
        owners,
    })
}

/// `get_lab_series`: per group, one point per `step_ms`.
pub async fn lab_series<D: SqlRows>(
    db: &D,
    since_ms: u64,
    step_ms: u64,
    group: &Option<String>,
) -> Result<Vec<LabPoint>, D::Error> {
    let rows = db
        .rows(
            LAB,
            &[
                SqlParam::Int(sql_int(since_ms)),
                SqlParam::Int(sql_int(step_ms.max(60_000))),
                text(group),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| LabPoint {
            at_ms: n(&r[0]),
            devicegroup: s(&r[1]),
            workers: f(&r[2]),
            busy: f(&r[3]),
            idle: f(&r[4]),
            leased: f(&r[5]),
            broken: f(&r[6]),
            queued: f(&r[7]),
            wait_max_ms: n(&r[8]),
        })
        .collect())
}

/// `get_worker_series`: the worker's hours since `since_ms`.
pub async fn worker_series<D: SqlRows>(
    db: &D,
    worker: &str,
    since_ms: u64,
) -> Result<Vec<WorkerHour>, D::Error> {
    let rows = db
        .rows(
            WORKER,
            &[
                SqlParam::Text(Some(worker.to_string())),
                SqlParam::Int(sql_int(since_ms)),
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| WorkerHour {
            hour_ms: n(&r[0]),
            time: device_time(&r[1..]),
        })
        .collect())
}

const SERIES_RUNS: &str = "SELECT id, num FROM runs WHERE series = ?1 AND kind = 'r'
     AND state = 'finished' AND (CAST(?2 AS TEXT) IS NULL OR owner = ?2)
     ORDER BY num DESC LIMIT ?3";
const MATRIX: &str = "SELECT name, worker, SUM(CASE WHEN status = 'pass' THEN 1 ELSE 0 END),
         SUM(CASE WHEN status IN ('fail', 'error') THEN 1 ELSE 0 END)
     FROM cases WHERE run = ?1 GROUP BY name, worker";

/// `get_series_matrix`: cases × workers over the series' newest
/// finished testruns, the cases that failed most first.
pub async fn matrix<D: SqlRows>(
    db: &D,
    series: &str,
    runs: u32,
    owner: &Option<String>,
) -> Result<crate::protocol::results::SeriesMatrix, D::Error> {
    use std::collections::{BTreeMap, BTreeSet};
    let ids: Vec<String> = db
        .rows(
            SERIES_RUNS,
            &[
                SqlParam::Text(Some(series.to_string())),
                text(owner),
                SqlParam::Int(i64::from(runs)),
            ],
        )
        .await?
        .iter()
        .map(|r| s(&r[0]))
        .collect();
    let asks: Vec<Vec<SqlParam>> = ids
        .iter()
        .map(|id| vec![SqlParam::Text(Some(id.clone()))])
        .collect();
    let mut cells: BTreeMap<String, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    let mut workers: BTreeSet<String> = BTreeSet::new();
    for rows in db.rows_each(MATRIX, &asks).await? {
        for r in rows {
            let (name, worker) = (s(&r[0]), s(&r[1]));
            let (p, fl) = (n(&r[2]), n(&r[3]));
            let entry = cells.entry(name).or_default();
            let c = entry.entry(worker.clone()).or_default();
            c.0 += p;
            c.1 += fl;
            workers.insert(worker);
        }
    }
    let workers: Vec<String> = workers.into_iter().take(MAX_MATRIX_WORKERS).collect();
    let mut rows: Vec<(u64, crate::protocol::results::MatrixRow)> = cells
        .into_iter()
        .filter_map(|(name, by)| {
            let failed: u64 = by.values().map(|c| c.1).sum();
            (failed > 0).then(|| {
                (
                    failed,
                    crate::protocol::results::MatrixRow {
                        name,
                        cells: workers
                            .iter()
                            .map(|w| by.get(w).copied().unwrap_or((0, 0)))
                            .collect(),
                    },
                )
            })
        })
        .collect();
    rows.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.name.cmp(&b.1.name)));
    Ok(crate::protocol::results::SeriesMatrix {
        series: series.to_string(),
        runs: ids,
        workers,
        cases: rows
            .into_iter()
            .take(MAX_MATRIX_CASES)
            .map(|(_, r)| r)
            .collect(),
    })
}
