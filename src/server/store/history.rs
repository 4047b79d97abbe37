//! History read from the database, on demand and off the serving loop:
//! the scheduler holds only what is alive (unfinished testruns, workers,
//! uploads, followers, the outbox) and asks here for ended testruns —
//! their rows for `status`, `logs`, `fetch` and the dashboard, a page of
//! the `runs` list, the oldest ones retention prunes.
//!
//! A testrun row carries the columns it is found by ([`RunIndex`],
//! schema 7), so a list is an indexed query that decodes no bodies, and a
//! start loads the live rows only. [`SqliteHistory`] reads the embedded
//! database on a connection of its own (WAL: readers never wait for the
//! writer); `pg::history` does the same on PostgreSQL.

use super::db::StateError;
use crate::protocol::RunSummary;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use std::path::{Path, PathBuf};

pub use super::index::{sql_int, state_token, verdict_token, RunIndex};

/// Testruns a list looks at, at most (the newest below its cursor).
pub const LIST_WINDOW: u64 = 10_000;

/// One page of the `runs` list: testruns numbered `newest` and below
/// (no more than [`LIST_WINDOW`] numbers down), newest first, filtered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunQuery {
    pub newest: u64,
    pub state: Option<String>,
    pub owner: Option<String>,
    pub verdict: Option<String>,
    pub devicegroup: Option<String>,
    pub limit: u32,
}

impl RunQuery {
    pub(crate) fn lowest(&self) -> u64 {
        self.newest.saturating_sub(LIST_WINDOW - 1).max(1)
    }

    pub(crate) fn group_pattern(&self) -> Option<String> {
        self.devicegroup.as_ref().map(|g| format!(",{g},"))
    }
}

/// What the scheduler asks of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recall {
    /// The rows of these testruns and of their tasks.
    Runs(Vec<String>),
    /// A page of the `runs` list.
    List(RunQuery),
    /// The rows of the `n` testruns that ended first of those that keep
    /// their files and logs, and when the next one ended.
    OldestKept(usize),
    /// The rows of the newest `n` ended leases.
    EndedLeases(usize),
    /// A page of a testrun's test cases.
    Cases(super::cases::CaseQuery),
    /// Results across testruns (`super::results`).
    Results(super::results::ResultQuery),
}

/// One question, numbered by the scheduler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecallJob {
    pub ticket: u64,
    /// The scheduler's recall epoch when it asked: rows read before a
    /// change to a recalled testrun are read again.
    pub epoch: u64,
    pub recall: Recall,
}

/// Rows read: testruns and their tasks, as stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    pub runs: Vec<(String, Vec<u8>)>,
    pub tasks: Vec<(String, Vec<u8>)>,
    /// [`Recall::OldestKept`]: when the first testrun past those ended.
    pub next_kept_ms: Option<u64>,
}

/// What the history answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Found {
    Rows(Rows),
    List(Vec<RunSummary>),
    Cases(Vec<crate::protocol::TestCase>),
    Results(super::results::ResultFound),
}

/// The answer to a [`RecallJob`].
#[derive(Debug)]
pub struct Recalled {
    pub ticket: u64,
    pub epoch: u64,
    /// The database error, as its one line says it.
    pub found: Result<Found, String>,
}

/// A read-only connection to the embedded state database.
pub struct SqliteHistory {
    conn: Connection,
    path: PathBuf,
    /// The files folder (task logs, for `log` known-issue rules).
    logs: Option<PathBuf>,
}

impl SqliteHistory {
    /// Opens the database file `path` for reading (the server has it
    /// open and migrated already).
    pub fn open(path: &Path) -> Result<SqliteHistory, StateError> {
        let path = path.to_path_buf();
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .and_then(|c| {
            c.busy_timeout(std::time::Duration::from_secs(5))?;
            Ok(c)
        })
        .map_err(|source| StateError::Sqlite {
            path: path.clone(),
            source,
        })?;
        Ok(SqliteHistory {
            conn,
            path,
            logs: None,
        })
    }

    /// Reads task logs below `files` for `log` known-issue rules.
    pub fn with_logs(mut self, files: &Path) -> SqliteHistory {
        self.logs = Some(files.to_path_buf());
        self
    }

    /// Answers one question.
    pub fn recall(&self, recall: &Recall) -> Result<Found, StateError> {
        let sql = |source| StateError::Sqlite {
            path: self.path.clone(),
            source,
        };
        match recall {
            Recall::Runs(ids) => self.rows(ids).map(Found::Rows).map_err(sql),
            Recall::List(q) => self.list(q).map(Found::List).map_err(sql),
            Recall::Cases(q) => super::cases::sqlite_cases(&self.conn, q)
                .map(Found::Cases)
                .map_err(sql),
            Recall::Results(q) => {
                let db = Sqlite(&self.conn);
                now_or_never(super::results::answer(&db, q, self.logs.as_deref()))
                    .map(Found::Results)
                    .map_err(sql)
            }
            Recall::OldestKept(n) => {
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "SELECT id, ended_ms FROM runs WHERE kept_bytes IS NOT NULL
                         ORDER BY ended_ms, num LIMIT ?1",
                    )
                    .map_err(sql)?;
                let found: Vec<(String, Option<i64>)> = stmt
                    .query_map(params![sql_int(*n as u64 + 1)], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .map_err(sql)?
                    .collect::<Result<_, _>>()
                    .map_err(sql)?;
                let next = found
                    .get(*n)
                    .and_then(|(_, at)| at.map(|v| u64::try_from(v).unwrap_or(0)));
                let ids: Vec<String> = found.into_iter().take(*n).map(|(id, _)| id).collect();
                let mut rows = self.rows(&ids).map_err(sql)?;
                rows.next_kept_ms = next;
                Ok(Found::Rows(rows))
            }
            Recall::EndedLeases(n) => {
                let mut stmt = self
                    .conn
                    .prepare_cached(
                        "SELECT id FROM runs WHERE kind = 'l' AND live = 0 ORDER BY num DESC LIMIT ?1",
                    )
                    .map_err(sql)?;
                let ids: Vec<String> = stmt
                    .query_map(params![sql_int(*n as u64)], |r| r.get(0))
                    .map_err(sql)?
                    .collect::<Result<_, _>>()
                    .map_err(sql)?;
                self.rows(&ids).map(Found::Rows).map_err(sql)
            }
        }
    }

    fn rows(&self, ids: &[String]) -> Result<Rows, rusqlite::Error> {
        let mut rows = Rows::default();
        let mut run = self
            .conn
            .prepare_cached("SELECT body FROM runs WHERE id = ?1")?;
        let mut tasks = self
            .conn
            .prepare_cached("SELECT id, body FROM tasks WHERE run = ?1")?;
        for id in ids {
            let Some(body) = run
                .query_row(params![id], |r| r.get::<_, Vec<u8>>(0))
                .optional()?
            else {
                continue;
            };
            rows.runs.push((id.clone(), body));
            for t in tasks.query_map(params![id], |r| Ok((r.get(0)?, r.get(1)?)))? {
                rows.tasks.push(t?);
            }
        }
        Ok(rows)
    }

    fn list(&self, q: &RunQuery) -> Result<Vec<RunSummary>, rusqlite::Error> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, summary FROM runs
             WHERE kind = 'r' AND num BETWEEN ?1 AND ?2
               AND (?3 IS NULL OR state = ?3) AND (?4 IS NULL OR owner = ?4)
               AND (?5 IS NULL OR verdict = ?5) AND (?6 IS NULL OR instr(groups, ?6) > 0)
             ORDER BY num DESC LIMIT ?7",
        )?;
        let rows = stmt.query_map(
            params![
                sql_int(q.lowest()),
                sql_int(q.newest),
                q.state,
                q.owner,
                q.verdict,
                q.group_pattern(),
                i64::from(q.limit)
            ],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, Option<Vec<u8>>>(1)?)),
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, summary) = row?;
            if let Some(s) = summary_of(&id, summary.as_deref()) {
                out.push(s);
            }
        }
        Ok(out)
    }
}

/// The embedded database as [`super::results::SqlRows`]: its queries
/// never wait, so their futures finish at the first poll.
struct Sqlite<'a>(&'a Connection);

impl super::results::SqlRows for Sqlite<'_> {
    type Error = rusqlite::Error;
    async fn rows(
        &self,
        sql: &str,
        params: &[super::results::SqlParam],
    ) -> Result<Vec<Vec<super::results::SqlValue>>, rusqlite::Error> {
        use super::results::{SqlParam, SqlValue};
        use rusqlite::types::{Value, ValueRef};
        let mut stmt = self.0.prepare_cached(sql)?;
        let values = params.iter().map(|p| match p {
            SqlParam::Int(i) => Value::Integer(*i),
            SqlParam::Text(Some(t)) => Value::Text(t.clone()),
            SqlParam::Text(None) => Value::Null,
        });
        let columns = stmt.column_count();
        let rows = stmt.query_map(rusqlite::params_from_iter(values), |r| {
            (0..columns)
                .map(|i| {
                    Ok(match r.get_ref(i)? {
                        ValueRef::Integer(v) => SqlValue::Int(Some(v)),
                        ValueRef::Null => SqlValue::Int(None),
                        ValueRef::Text(t) => {
                            SqlValue::Text(Some(String::from_utf8_lossy(t).into_owned()))
                        }
                        ValueRef::Real(f) => SqlValue::Text(Some(f.to_string())),
                        ValueRef::Blob(b) => SqlValue::Bytes(Some(b.to_vec())),
                    })
                })
                .collect::<Result<Vec<_>, rusqlite::Error>>()
        })?;
        rows.collect()
    }
}

/// The output of a future that never waits (the SQLite queries).
fn now_or_never<T>(f: impl std::future::Future<Output = T>) -> T {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("an SQLite query never waits"),
    }
}

/// A stored summary; one that does not decode is left out of the list
/// (and said in the server log: its testrun's `status` names the cause).
pub(crate) fn summary_of(id: &str, bytes: Option<&[u8]>) -> Option<RunSummary> {
    match rmp_serde::from_slice::<RunSummary>(bytes?) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(run = %id, error = %e, "state database: the runs list entry of this testrun does not decode; left out of the list");
            None
        }
    }
}
