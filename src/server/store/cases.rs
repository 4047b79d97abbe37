//! Test cases in the state database (schema 8, table `cases`): written by
//! the file desk as it stores a JUnit result file — off the serving loop,
//! in transactions of [`CHUNK`] rows so the loop's commits never wait
//! long for the writer — and read by the history reader for
//! `list_cases`. A file's cases are replaced whole when it is stored
//! again (a resumed upload after a restart), so writing is idempotent.

use super::db::StateError;
use super::index::sql_int;
use crate::protocol::{CaseStatus, TaskId, TestCase};
use crate::server::cases::Case;
use rusqlite::{params, Connection};
use std::path::{Path, PathBuf};

/// Rows per transaction on SQLite: one holds the database's one write
/// lock, which the serving loop's commit waits for (each row updates
/// three indexes; 500 keep the wait to a few milliseconds).
pub const CHUNK: usize = 500;
/// Rows per statement on PostgreSQL (its commits do not wait for them).
pub const PG_CHUNK: usize = 4000;

/// What the scheduler knows of a result file's task attempt, stored
/// with each of its cases: what `case_history` and triage group by.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CaseAbout {
    pub series: Option<String>,
    pub worker: Option<String>,
    pub devicegroup: Option<String>,
}

/// Where the desk records the cases of a stored result file.
pub trait CaseSink: Send {
    fn record(
        &mut self,
        task: &TaskId,
        attempt: u32,
        file: &str,
        about: &CaseAbout,
        cases: &[Case],
    ) -> Result<(), StateError>;
}

/// The number of a testrun id (`r12` → 12; 0 if it has none).
pub fn num_of(run: &str) -> u64 {
    run.get(1..).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A result file's cases as one value (table `case_sets`): for each
/// case its status (0 pass, 1 fail, 2 error, 3 skip), the length of its
/// name (2 bytes, big-endian; names are at most 512 bytes) and the name.
/// `compare` reads two testruns of 100 000 cases as a few rows.
pub fn encode_set(cases: &[Case]) -> Vec<u8> {
    let mut out = Vec::with_capacity(cases.iter().map(|c| c.name.len() + 3).sum());
    for c in cases {
        let name = crate::text::clip_bytes(&c.name, usize::from(u16::MAX));
        out.push(match c.status {
            CaseStatus::Pass => 0,
            CaseStatus::Fail => 1,
            CaseStatus::Error => 2,
            CaseStatus::Skip => 3,
        });
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name.as_bytes());
    }
    out
}

/// The (status, name) pairs of an [`encode_set`] value; a damaged tail
/// is left out.
pub fn decode_set(bytes: &[u8]) -> Vec<(CaseStatus, String)> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 3 {
        let status = match rest[0] {
            0 => CaseStatus::Pass,
            1 => CaseStatus::Fail,
            2 => CaseStatus::Error,
            _ => CaseStatus::Skip,
        };
        let len = usize::from(u16::from_be_bytes([rest[1], rest[2]]));
        let Some(name) = rest.get(3..3 + len) else {
            break;
        };
        out.push((status, String::from_utf8_lossy(name).into_owned()));
        rest = &rest[3 + len..];
    }
    out
}

/// The testrun of a task id (`r12.3` → `r12`).
pub fn run_of(task: &str) -> &str {
    task.rsplit_once('.').map_or(task, |(run, _)| run)
}

/// The embedded database, on a connection of the desk's own.
pub struct SqliteCases {
    conn: Connection,
    path: PathBuf,
}

impl SqliteCases {
    pub fn open(path: &Path) -> Result<SqliteCases, StateError> {
        let conn = Connection::open(path).map_err(|source| StateError::Sqlite {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(SqliteCases {
            conn,
            path: path.to_path_buf(),
        })
    }
}

impl CaseSink for SqliteCases {
    fn record(
        &mut self,
        task: &TaskId,
        attempt: u32,
        file: &str,
        about: &CaseAbout,
        cases: &[Case],
    ) -> Result<(), StateError> {
        let path = self.path.clone();
        let sql = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        let run = run_of(task);
        self.conn
            .execute(
                "DELETE FROM cases WHERE task = ?1 AND attempt = ?2 AND file = ?3",
                params![task, attempt, file],
            )
            .map_err(sql)?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO case_sets (task, attempt, file, run, body)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![task, attempt, file, run, encode_set(cases)],
            )
            .map_err(sql)?;
        for (c, chunk) in cases.chunks(CHUNK).enumerate() {
            let tx = self.conn.transaction().map_err(sql)?;
            {
                let mut insert = tx
                    .prepare_cached(
                        "INSERT OR REPLACE INTO cases (task, attempt, file, seq, run, suite, name,
                             status, duration_ms, message, num, series, worker, devicegroup,
                             log_offset)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
                    )
                    .map_err(sql)?;
                for (i, case) in chunk.iter().enumerate() {
                    insert
                        .execute(params![
                            task,
                            attempt,
                            file,
                            sql_int((c * CHUNK + i) as u64),
                            run,
                            case.suite.as_ref(),
                            case.name,
                            case.status.as_str(),
                            case.duration_ms.map(sql_int),
                            case.message,
                            sql_int(num_of(run)),
                            about.series,
                            about.worker,
                            about.devicegroup,
                            case.log_offset.map(sql_int),
                        ])
                        .map_err(sql)?;
                }
            }
            tx.commit().map_err(sql)?;
            // The pages just written are copied into the database here,
            // on the desk's thread, so the serving loop's next commit
            // does not meet a long write-ahead log to checkpoint (seen:
            // its tick 100–280 ms late while 100 000 cases were written).
            self.conn
                .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                .map_err(sql)?;
        }
        Ok(())
    }
}

/// Which cases `list_cases` asks for: those of each task's final attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaseQuery {
    pub attempts: Vec<(TaskId, u32)>,
    /// Failing ones only (fail, error).
    pub failed: bool,
    pub offset: u64,
    pub limit: u32,
}

/// The SQL of a [`CaseQuery`] with `$n`/`?n` placeholders from `first`:
/// (task, attempt) pairs, then limit and offset.
pub(crate) fn case_sql(q: &CaseQuery, dollar: bool) -> String {
    let p = |n: usize| {
        if dollar {
            format!("${n}")
        } else {
            format!("?{n}")
        }
    };
    let pairs: Vec<String> = (0..q.attempts.len())
        .map(|i| format!("(task = {} AND attempt = {})", p(2 * i + 1), p(2 * i + 2)))
        .collect();
    let n = 2 * q.attempts.len();
    format!(
        "SELECT task, file, suite, name, status, duration_ms, message, log_offset FROM cases
         WHERE ({}) {} ORDER BY task, file, seq LIMIT {} OFFSET {}",
        if pairs.is_empty() {
            "1 = 0".to_string()
        } else {
            pairs.join(" OR ")
        },
        if q.failed {
            "AND status IN ('fail', 'error')"
        } else {
            ""
        },
        p(n + 1),
        p(n + 2)
    )
}

/// A row of [`case_sql`] as read: task, file, suite, name, status,
/// duration, message, log offset.
pub(crate) type CaseColumns = (
    String,
    String,
    String,
    String,
    String,
    Option<i64>,
    Option<String>,
    Option<i64>,
);

/// A row read back.
pub(crate) fn case_of(
    (task, file, suite, name, status, duration_ms, message, log_offset): CaseColumns,
) -> TestCase {
    TestCase {
        task,
        file,
        suite,
        name,
        status: CaseStatus::from_word(&status).unwrap_or(CaseStatus::Error),
        duration_ms: duration_ms.map(|d| u64::try_from(d).unwrap_or(0)),
        message,
        log_offset: log_offset.and_then(|o| u64::try_from(o).ok()),
    }
}

/// `list_cases` on the embedded database.
pub(crate) fn sqlite_cases(
    conn: &Connection,
    q: &CaseQuery,
) -> Result<Vec<TestCase>, rusqlite::Error> {
    let mut stmt = conn.prepare(&case_sql(q, false))?;
    let mut values: Vec<rusqlite::types::Value> = Vec::new();
    for (task, attempt) in &q.attempts {
        values.push(task.clone().into());
        values.push(i64::from(*attempt).into());
    }
    values.push(i64::from(q.limit).into());
    values.push(sql_int(q.offset).into());
    let rows = stmt.query_map(rusqlite::params_from_iter(values), |r| {
        Ok(case_of((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
            r.get(7)?,
        )))
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_set_reads_back_as_written_and_a_damaged_tail_is_left_out() {
        let case = |name: &str, status| Case {
            suite: std::sync::Arc::from("s"),
            name: name.into(),
            status,
            duration_ms: None,
            message: None,
            log_offset: None,
        };
        let cases = [
            case("m::a", CaseStatus::Pass),
            case("m::b[ü]", CaseStatus::Fail),
            case("", CaseStatus::Skip),
            case("m::e", CaseStatus::Error),
        ];
        let set = encode_set(&cases);
        let back = decode_set(&set);
        let want: Vec<(CaseStatus, String)> =
            cases.iter().map(|c| (c.status, c.name.clone())).collect();
        assert_eq!(back, want);
        assert_eq!(decode_set(&set[..set.len() - 2]), want[..3]);
        assert!(decode_set(&[9]).is_empty());
    }
}
