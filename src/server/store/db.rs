//! The server's durable state: SQLite (bundled, WAL) in the state directory,
//! guarded by an exclusive lock so two servers never share it.
//!
//! Rows hold MessagePack-encoded entities the scheduler produces
//! ([`Changes`]) and restores from ([`Snapshot`]); the scheduler never does
//! I/O itself. The schema is versioned; older versions are migrated on
//! open, newer ones refused.

use crate::durable::{lock_dir, open_sqlite, LockFailure, OpenFailure};
use nix::fcntl::Flock;
use rusqlite::{params, Connection, OptionalExtension};
use std::fs::File;
use std::path::{Path, PathBuf};

/// The schema this build writes. History of versions:
/// 1: meta, runs, tasks, workers.
/// 2: task_history (every state change) and files (result file index).
/// 3: quarantine (rows that could not be restored).
/// 4: input_owners (who uploaded each stored input file).
/// 5: notifications (the outbox: one row per delivery).
/// 6: lease (one leader among servers sharing a PostgreSQL database).
/// 7: the columns a testrun is found by (`index::RunIndex`) and their indexes:
///    history is read from the database, not held in memory.
/// 8: cases (every test case of every JUnit result file).
/// 9: series: a testrun's series and image, a case's run number, series,
///    worker and device group (`compare`, `case_history`, triage).
/// 10: the lab's usage series (per group and minute, per worker and
///    hour, per owner and hour); where the log shows a failing case; a
///    result file's case names and statuses in one row (`compare`).
pub const SCHEMA_VERSION: i64 = 10;

/// The SQL flavour a migration is written for: both backends share one
/// schema, one list of versions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// The statements that bring the schema from `version - 1` to `version`
/// (1..=[`SCHEMA_VERSION`]): the same tables and columns on both
/// backends, only the type names differ.
pub fn migration(version: i64, dialect: Dialect) -> String {
    let sql = match version {
        1 => {
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
              CREATE TABLE runs (id TEXT PRIMARY KEY, body {blob} NOT NULL);
              CREATE TABLE tasks (id TEXT PRIMARY KEY, run TEXT NOT NULL, body {blob} NOT NULL);
              CREATE TABLE workers (name TEXT PRIMARY KEY, body {blob} NOT NULL);"
        }
        2 => {
            "CREATE TABLE task_history ({serial} task TEXT NOT NULL, at_ms {int} NOT NULL,
                  state TEXT NOT NULL, attempt {int} NOT NULL, worker TEXT, reason TEXT);
              CREATE INDEX task_history_task ON task_history (task);
              CREATE TABLE files (task TEXT NOT NULL, name TEXT NOT NULL, size {int} NOT NULL,
                  sha256 TEXT NOT NULL, PRIMARY KEY (task, name));"
        }
        3 => {
            "CREATE TABLE quarantine (tbl TEXT NOT NULL, key TEXT NOT NULL, body {blob},
                  reason TEXT NOT NULL, at_ms {int} NOT NULL);"
        }
        // Inputs stored before version 4 have no owner: only operators
        // may name them until a user uploads them again.
        4 => {
            "CREATE TABLE input_owners (sha256 TEXT NOT NULL, owner TEXT NOT NULL,
                  PRIMARY KEY (sha256, owner));"
        }
        5 => {
            "CREATE TABLE notifications (id TEXT PRIMARY KEY, run TEXT, body {blob} NOT NULL);
              CREATE INDEX notifications_run ON notifications (run);"
        }
        // Used on PostgreSQL only (an SQLite state directory is locked
        // by one server); there for one schema.
        6 => {
            "CREATE TABLE lease (id {int} PRIMARY KEY, holder TEXT NOT NULL, epoch {int} NOT NULL,
                  expires_ms {int} NOT NULL, since_ms {int} NOT NULL, address TEXT NOT NULL);"
        }
        // Rows written before it have no index (num is NULL): the first
        // start after the migration loads them once and writes them back
        // with it (`Snapshot::runs` includes them).
        7 => {
            "ALTER TABLE runs ADD COLUMN num {int};
              ALTER TABLE runs ADD COLUMN kind TEXT;
              ALTER TABLE runs ADD COLUMN state TEXT;
              ALTER TABLE runs ADD COLUMN verdict TEXT;
              ALTER TABLE runs ADD COLUMN owner TEXT;
              ALTER TABLE runs ADD COLUMN groups TEXT;
              ALTER TABLE runs ADD COLUMN live {int};
              ALTER TABLE runs ADD COLUMN ended_ms {int};
              ALTER TABLE runs ADD COLUMN kept_bytes {int};
              ALTER TABLE runs ADD COLUMN summary {blob};
              CREATE INDEX runs_by_number ON runs (kind, num);
              CREATE INDEX runs_live ON runs (live);
              CREATE INDEX runs_unindexed ON runs (id) WHERE num IS NULL;
              CREATE INDEX runs_kept ON runs (ended_ms, num, kept_bytes) WHERE kept_bytes IS NOT NULL;
              CREATE INDEX tasks_run ON tasks (run);"
        }
        // Written by the file desk as it stores a result file (off the
        // serving loop), read by `list_cases`.
        8 => {
            "CREATE TABLE cases (task TEXT NOT NULL, attempt {int} NOT NULL, file TEXT NOT NULL,
                  seq {int} NOT NULL, run TEXT NOT NULL, suite TEXT NOT NULL, name TEXT NOT NULL,
                  status TEXT NOT NULL, duration_ms {int}, message TEXT,
                  PRIMARY KEY (task, attempt, file, seq));
              CREATE INDEX cases_run ON cases (run, status);
              CREATE INDEX cases_name ON cases (name);"
        }
        // Cases written before it get their run's number (from its id);
        // their series, worker and group stay unknown (NULL).
        9 => {
            "ALTER TABLE runs ADD COLUMN series TEXT;
              ALTER TABLE runs ADD COLUMN image TEXT;
              CREATE INDEX runs_series ON runs (series, num);
              ALTER TABLE cases ADD COLUMN num {int};
              ALTER TABLE cases ADD COLUMN series TEXT;
              ALTER TABLE cases ADD COLUMN worker TEXT;
              ALTER TABLE cases ADD COLUMN devicegroup TEXT;
              UPDATE cases SET num = CAST(substr(run, 2) AS {int});
              DROP INDEX cases_name;
              CREATE INDEX cases_history ON cases (name, num, status);
"
        }
        // The lab's usage series (`server::usage`), kept bounded.
        10 => {
            "CREATE TABLE lab_minutes (minute {int} NOT NULL, devicegroup TEXT NOT NULL,
                  workers {int} NOT NULL, busy {int} NOT NULL, idle {int} NOT NULL,
                  leased {int} NOT NULL, broken {int} NOT NULL, queued {int} NOT NULL,
                  wait_ms {int} NOT NULL, PRIMARY KEY (minute, devicegroup));
              CREATE TABLE usage_hours (hour {int} NOT NULL, worker TEXT NOT NULL,
                  devicegroup TEXT NOT NULL, busy_ms {int} NOT NULL, idle_ms {int} NOT NULL,
                  leased_ms {int} NOT NULL, broken_ms {int} NOT NULL, offline_ms {int} NOT NULL,
                  tasks {int} NOT NULL, passed {int} NOT NULL, failed {int} NOT NULL,
                  infra_errors {int} NOT NULL, PRIMARY KEY (hour, worker, devicegroup));
              CREATE INDEX usage_hours_worker ON usage_hours (worker, hour);
              CREATE TABLE owner_hours (hour {int} NOT NULL, owner TEXT NOT NULL,
                  devicegroup TEXT NOT NULL, busy_ms {int} NOT NULL, leased_ms {int} NOT NULL,
                  PRIMARY KEY (hour, owner, devicegroup));
              ALTER TABLE cases ADD COLUMN log_offset {int};
              CREATE TABLE case_sets (task TEXT NOT NULL, attempt {int} NOT NULL,
                  file TEXT NOT NULL, run TEXT NOT NULL, body {blob} NOT NULL,
                  PRIMARY KEY (task, attempt, file));
              CREATE INDEX case_sets_run ON case_sets (run);"
        }
        _ => unreachable!("no migration to version {version}"),
    };
    let (blob, int, serial) = match dialect {
        // SQLite keeps the insertion order in `rowid`.
        Dialect::Sqlite => ("BLOB", "INTEGER", ""),
        Dialect::Postgres => ("BYTEA", "BIGINT", "seq BIGSERIAL PRIMARY KEY,"),
    };
    sql.replace("{blob}", blob)
        .replace("{int}", int)
        .replace("{serial}", serial)
}

/// A table whose rows may be quarantined, and its key column: names come
/// from this list, never from a peer, before they reach SQL.
pub(crate) fn quarantinable(table: &str) -> Option<(&'static str, &'static str)> {
    match table {
        "runs" => Some(("runs", "id")),
        "tasks" => Some(("tasks", "id")),
        "workers" => Some(("workers", "name")),
        "notifications" => Some(("notifications", "id")),
        _ => None,
    }
}

/// Name of the database file inside the state directory.
pub const DB_FILE: &str = "ots.db";
/// Name of the lock file inside the state directory.
pub const LOCK_FILE: &str = "lock";

/// Why the state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state directory {path} is in use by another ots-server ({holder}); stop it or use another --state-dir")]
    Locked { path: PathBuf, holder: String },
    #[error(
        "cannot lock state directory {path} (its file `lock`): {source}{}",
        crate::durable::access_hint(path, source)
    )]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an ots state database ({reason}); move it away or use another --state-dir"
    )]
    Foreign { path: PathBuf, reason: String },
    #[error("{path} has schema version {found}, newer than this ots-server supports ({SCHEMA_VERSION}); run a newer ots-server")]
    TooNew { path: PathBuf, found: i64 },
    #[error("state database {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "state database PostgreSQL {target}: {source}{}",
        postgres_hint(source)
    )]
    Postgres {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("PostgreSQL {target}: this server's lease (epoch {epoch}) was taken over (now epoch {now}, held by {holder}): it does not act any more")]
    Deposed {
        target: String,
        epoch: i64,
        now: i64,
        holder: String,
    },
    #[error(
        "state directory {path}: cannot record which PostgreSQL database it belongs to: {source}{}",
        crate::durable::access_hint(path, source)
    )]
    Marker {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration `database` = {url:?}: {reason}")]
    DatabaseConfig { url: String, reason: String },
    #[error("state database {path}: {table} row {key:?} is corrupt ({reason}); restore a backup or move the state directory away")]
    CorruptRow {
        path: PathBuf,
        table: &'static str,
        key: String,
        reason: String,
    },
}

/// What to do about a PostgreSQL error, when it says.
fn postgres_hint(e: &tokio_postgres::Error) -> String {
    use tokio_postgres::error::SqlState;
    let code = e.code();
    if e.is_closed() {
        "; the connection is gone: check that PostgreSQL runs and is reachable, then restart ots-server".into()
    } else if code == Some(&SqlState::INVALID_PASSWORD)
        || code == Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    {
        "; check the user and its password (database_password_file, PGPASSWORD) and pg_hba.conf"
            .into()
    } else if code == Some(&SqlState::INVALID_CATALOG_NAME) {
        "; create the database first (createdb) or name another in `database`".into()
    } else if code == Some(&SqlState::QUERY_CANCELED) {
        "; a statement ran past database_statement_timeout: the database is overloaded or locked"
            .into()
    } else {
        String::new()
    }
}

/// One task state change, kept forever for `status` and post-mortems.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryRow {
    pub task: String,
    pub at_ms: u64,
    pub state: String,
    pub attempt: u32,
    pub worker: Option<String>,
    pub reason: Option<String>,
}

/// Entities changed since the last commit, already encoded.
#[derive(Debug, Default)]
pub struct Changes {
    /// (id, body, the columns it is found by).
    pub runs: Vec<(String, Vec<u8>, super::index::RunIndex)>,
    pub tasks: Vec<(String, String, Vec<u8>)>,
    pub workers: Vec<(String, Vec<u8>)>,
    pub history: Vec<HistoryRow>,
    /// (task, name, size, sha256): the index of stored result files.
    pub files: Vec<(String, String, u64, String)>,
    pub meta: Vec<(String, String)>,
    /// (table, key, reason): rows to move into the quarantine table.
    pub quarantine: Vec<(&'static str, String, String)>,
    /// Workers removed from the registry (their key is no longer allowed).
    pub removed_workers: Vec<String>,
    /// Tasks whose result files were pruned (retention): out of the index.
    pub pruned_tasks: Vec<String>,
    /// (sha256, user): a user uploaded a stored input file.
    pub input_owners: Vec<(String, String)>,
    /// (id, run, body): notification deliveries made or changed.
    pub notifications: Vec<(String, Option<String>, Vec<u8>)>,
    /// Deliveries forgotten (ended long enough ago).
    pub removed_notifications: Vec<String>,
    /// The lab's usage series: rows to add, rows to forget.
    pub usage: crate::server::usage::UsageRows,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
            && self.tasks.is_empty()
            && self.workers.is_empty()
            && self.history.is_empty()
            && self.files.is_empty()
            && self.meta.is_empty()
            && self.quarantine.is_empty()
            && self.removed_workers.is_empty()
            && self.pruned_tasks.is_empty()
            && self.input_owners.is_empty()
            && self.notifications.is_empty()
            && self.removed_notifications.is_empty()
            && self.usage.is_empty()
    }
}

/// What a restart loads: the live state, never the history. Ended
/// testruns stay in the database (the history reader reads them on
/// demand); of them only sums come back.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Unfinished testruns, and rows written before schema 7 (no index
    /// yet: loaded once, written back with it).
    pub runs: Vec<(String, Vec<u8>)>,
    /// The tasks of those testruns.
    pub tasks: Vec<(String, Vec<u8>)>,
    /// Bytes of result files and logs the ended, unpruned (indexed)
    /// testruns keep, and when the oldest of them ended.
    pub kept_bytes: u64,
    pub oldest_kept_ms: Option<u64>,
    /// Bytes of the stored result files of ended tasks (the file index).
    pub file_bytes: u64,
    /// The highest testrun number stored.
    pub highest_run: u64,
    pub workers: Vec<(String, Vec<u8>)>,
    pub meta: Vec<(String, String)>,
    /// (sha256, user) of every stored input file's uploaders.
    pub input_owners: Vec<(String, String)>,
    /// (id, body) of every notification delivery kept.
    pub notifications: Vec<(String, Vec<u8>)>,
}

/// The open, locked state database.
pub struct Db {
    conn: Connection,
    path: PathBuf,
    _lock: Flock<File>,
}

pub(crate) fn lock(dir: &Path) -> Result<Flock<File>, StateError> {
    lock_dir(dir).map_err(|failure| match failure {
        LockFailure::Held(holder) => StateError::Locked {
            path: dir.to_path_buf(),
            holder,
        },
        LockFailure::Io(source) => StateError::Lock {
            path: dir.to_path_buf(),
            source,
        },
    })
}

impl Db {
    /// Locks `dir`, opens (or creates) the database and migrates it.
    pub fn open(dir: &Path) -> Result<Db, StateError> {
        let lock = lock(dir)?;
        let path = dir.join(DB_FILE);
        let sql = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        let (conn, tables) = match open_sqlite(&path) {
            Ok(opened) => opened,
            Err(OpenFailure::NotSqlite) => {
                return Err(StateError::Foreign {
                    path,
                    reason: "not a SQLite database".into(),
                })
            }
            Err(OpenFailure::Sqlite(e)) => return Err(sql(e)),
        };
        let mut db = Db {
            conn,
            path,
            _lock: lock,
        };
        let version = if tables.is_empty() {
            0
        } else if !tables.iter().any(|t| t == "meta") {
            return Err(StateError::Foreign {
                path: db.path.clone(),
                reason: format!("SQLite database with tables {tables:?} but no ots meta table"),
            });
        } else {
            db.schema_version()?
        };
        if version > SCHEMA_VERSION {
            return Err(StateError::TooNew {
                path: db.path.clone(),
                found: version,
            });
        }
        db.migrate(version)?;
        Ok(db)
    }

    fn sql(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        |source| StateError::Sqlite {
            path: self.path.clone(),
            source,
        }
    }

    fn schema_version(&self) -> Result<i64, StateError> {
        let v: Option<String> = self
            .conn
            .query_row(
                "SELECT value FROM meta WHERE key = 'schema_version'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql())?;
        let v = v.ok_or_else(|| StateError::Foreign {
            path: self.path.clone(),
            reason: "meta table without a schema_version".into(),
        })?;
        v.parse().map_err(|_| StateError::Foreign {
            path: self.path.clone(),
            reason: format!("schema_version {v:?} is not a number"),
        })
    }

    /// Brings the schema from `from` to [`SCHEMA_VERSION`], one step per
    /// version, each in its own transaction.
    fn migrate(&mut self, from: i64) -> Result<(), StateError> {
        let path = self.path.clone();
        let sql = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        for version in from + 1..=SCHEMA_VERSION {
            let tx = self.conn.transaction().map_err(sql)?;
            tx.execute_batch(&migration(version, Dialect::Sqlite))
                .map_err(sql)?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![version.to_string()],
            )
            .map_err(sql)?;
            tx.commit().map_err(sql)?;
            if from > 0 {
                tracing::info!(path = %self.path.display(), version, "state database migrated");
            }
        }
        Ok(())
    }

    /// Writes `changes` in one transaction; when this returns, they are durable.
    pub fn commit(&mut self, changes: &Changes) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let path = self.path.clone();
        let sql = |source| StateError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        {
            let mut run = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO runs (id, body, num, kind, state, verdict, owner, groups,
                         live, ended_ms, kept_bytes, summary, series, image)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .map_err(sql)?;
            for (id, body, x) in &changes.runs {
                run.execute(params![
                    id,
                    body,
                    super::index::sql_int(x.num),
                    x.kind,
                    x.state,
                    x.verdict,
                    x.owner,
                    x.groups,
                    i64::from(x.live),
                    x.ended_ms.map(super::index::sql_int),
                    x.kept_bytes.map(super::index::sql_int),
                    x.summary,
                    x.series,
                    x.image,
                ])
                .map_err(sql)?;
            }
            let mut task = tx
                .prepare_cached("INSERT OR REPLACE INTO tasks (id, run, body) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            for (id, run, body) in &changes.tasks {
                task.execute(params![id, run, body]).map_err(sql)?;
            }
            let mut worker = tx
                .prepare_cached("INSERT OR REPLACE INTO workers (name, body) VALUES (?1, ?2)")
                .map_err(sql)?;
            for (name, body) in &changes.workers {
                worker.execute(params![name, body]).map_err(sql)?;
            }
            let mut removed = tx
                .prepare_cached("DELETE FROM workers WHERE name = ?1")
                .map_err(sql)?;
            for name in &changes.removed_workers {
                removed.execute(params![name]).map_err(sql)?;
            }
            let mut history = tx
                .prepare_cached(
                    "INSERT INTO task_history (task, at_ms, state, attempt, worker, reason)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(sql)?;
            for h in &changes.history {
                history
                    .execute(params![
                        h.task,
                        h.at_ms as i64,
                        h.state,
                        h.attempt,
                        h.worker,
                        h.reason
                    ])
                    .map_err(sql)?;
            }
            let mut file = tx
                .prepare_cached("INSERT OR REPLACE INTO files (task, name, size, sha256) VALUES (?1, ?2, ?3, ?4)")
                .map_err(sql)?;
            for (task, name, size, sha) in &changes.files {
                file.execute(params![task, name, *size as i64, sha])
                    .map_err(sql)?;
            }
            let mut pruned = tx
                .prepare_cached("DELETE FROM files WHERE task = ?1")
                .map_err(sql)?;
            for task in &changes.pruned_tasks {
                pruned.execute(params![task]).map_err(sql)?;
            }
            let mut owner = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO input_owners (sha256, owner) VALUES (?1, ?2)",
                )
                .map_err(sql)?;
            for (sha, user) in &changes.input_owners {
                owner.execute(params![sha, user]).map_err(sql)?;
            }
            let mut note = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO notifications (id, run, body) VALUES (?1, ?2, ?3)",
                )
                .map_err(sql)?;
            for (id, run, body) in &changes.notifications {
                note.execute(params![id, run, body]).map_err(sql)?;
            }
            let mut forgotten = tx
                .prepare_cached("DELETE FROM notifications WHERE id = ?1")
                .map_err(sql)?;
            for id in &changes.removed_notifications {
                forgotten.execute(params![id]).map_err(sql)?;
            }
            let mut meta = tx
                .prepare_cached("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)")
                .map_err(sql)?;
            for (k, v) in &changes.meta {
                meta.execute(params![k, v]).map_err(sql)?;
            }
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            for (table, key, reason) in &changes.quarantine {
                let Some((table, column)) = quarantinable(table) else {
                    continue;
                };
                tx.execute(
                    &format!(
                        "INSERT INTO quarantine (tbl, key, body, reason, at_ms)
                         SELECT ?1, {column}, body, ?2, ?3 FROM {table} WHERE {column} = ?4"
                    ),
                    params![table, reason, now_ms, key],
                )
                .map_err(sql)?;
                tx.execute(
                    &format!("DELETE FROM {table} WHERE {column} = ?1"),
                    params![key],
                )
                .map_err(sql)?;
            }
        }
        super::usage::sqlite_write(&tx, &changes.usage).map_err(sql)?;
        tx.commit().map_err(sql)
    }

    /// Reads every stored entity.
    pub fn load(&self) -> Result<Snapshot, StateError> {
        let sql = self.sql();
        let pairs = |query: &str| -> Result<Vec<(String, Vec<u8>)>, StateError> {
            let mut stmt = self.conn.prepare(query).map_err(&sql)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(&sql)?;
            rows.collect::<Result<_, _>>().map_err(&sql)
        };
        let sum = |query: &str| -> Result<Option<i64>, StateError> {
            self.conn.query_row(query, [], |r| r.get(0)).map_err(&sql)
        };
        let mut snap = Snapshot {
            runs: pairs(super::index::LIVE_RUNS)?,
            tasks: pairs(super::index::LIVE_TASKS)?,
            kept_bytes: sum(super::index::KEPT_BYTES)?.unwrap_or(0).max(0) as u64,
            oldest_kept_ms: sum(super::index::OLDEST_KEPT)?.map(|v| v.max(0) as u64),
            file_bytes: sum(super::index::FILE_BYTES)?.unwrap_or(0).max(0) as u64,
            highest_run: sum(super::index::HIGHEST_RUN)?.unwrap_or(0).max(0) as u64,
            workers: pairs("SELECT name, body FROM workers")?,
            meta: Vec::new(),
            input_owners: Vec::new(),
            notifications: pairs("SELECT id, body FROM notifications")?,
        };
        let mut stmt = self
            .conn
            .prepare("SELECT sha256, owner FROM input_owners")
            .map_err(&sql)?;
        snap.input_owners = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(&sql)?
            .collect::<Result<_, _>>()
            .map_err(&sql)?;
        let mut stmt = self
            .conn
            .prepare("SELECT key, value FROM meta")
            .map_err(&sql)?;
        snap.meta = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(&sql)?
            .collect::<Result<_, _>>()
            .map_err(&sql)?;
        Ok(snap)
    }

    /// The recorded state changes of one task, oldest first.
    pub fn history(&self, task: &str) -> Result<Vec<HistoryRow>, StateError> {
        let sql = self.sql();
        let mut stmt = self
            .conn
            .prepare("SELECT task, at_ms, state, attempt, worker, reason FROM task_history WHERE task = ?1 ORDER BY rowid")
            .map_err(&sql)?;
        let rows = stmt
            .query_map(params![task], |r| {
                Ok(HistoryRow {
                    task: r.get(0)?,
                    at_ms: r.get::<_, i64>(1)? as u64,
                    state: r.get(2)?,
                    attempt: r.get(3)?,
                    worker: r.get(4)?,
                    reason: r.get(5)?,
                })
            })
            .map_err(&sql)?;
        rows.collect::<Result<_, _>>().map_err(&sql)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs raw SQL; for tests that fake older or damaged databases.
    #[doc(hidden)]
    pub fn execute_batch(&self, sql: &str) -> Result<(), StateError> {
        self.conn.execute_batch(sql).map_err(self.sql())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_directory_gets_the_current_schema_and_round_trips_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(dir.path()).unwrap();
        let mut c = Changes::default();
        c.runs.push((
            "r1".into(),
            vec![1, 2, 3],
            super::super::index::RunIndex {
                num: 1,
                kind: "r".into(),
                live: true,
                ..Default::default()
            },
        ));
        c.tasks.push(("r1.1".into(), "r1".into(), vec![4]));
        c.history.push(HistoryRow {
            task: "r1.1".into(),
            at_ms: 5,
            state: "queued".into(),
            attempt: 0,
            worker: None,
            reason: None,
        });
        c.input_owners.push(("ab".repeat(32), "alice".into()));
        db.commit(&c).unwrap();
        drop(db);
        let db = Db::open(dir.path()).unwrap();
        let snap = db.load().unwrap();
        assert_eq!(snap.runs, vec![("r1".to_string(), vec![1, 2, 3])]);
        assert_eq!(snap.tasks.len(), 1);
        assert_eq!(db.history("r1.1").unwrap().len(), 1);
        assert_eq!(snap.input_owners, vec![("ab".repeat(32), "alice".into())]);
        assert!(snap
            .meta
            .iter()
            .any(|(k, v)| k == "schema_version" && v == &SCHEMA_VERSION.to_string()));
    }

    #[test]
    fn a_second_server_on_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Db::open(dir.path()).unwrap();
        let e = Db::open(dir.path()).err().expect("second open must fail");
        assert!(matches!(e, StateError::Locked { .. }), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
    }

    #[test]
    fn an_older_schema_is_migrated_and_a_newer_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = Connection::open(dir.path().join(DB_FILE)).unwrap();
            conn.execute_batch(
                "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE runs (id TEXT PRIMARY KEY, body BLOB NOT NULL);
                 CREATE TABLE tasks (id TEXT PRIMARY KEY, run TEXT NOT NULL, body BLOB NOT NULL);
                 CREATE TABLE workers (name TEXT PRIMARY KEY, body BLOB NOT NULL);
                 INSERT INTO meta VALUES ('schema_version', '1');
                 INSERT INTO runs VALUES ('old', x'00');",
            )
            .unwrap();
        }
        let db = Db::open(dir.path()).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(
            db.load().unwrap().runs.len(),
            1,
            "rows survive the migration"
        );
        db.execute_batch("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
            .unwrap();
        drop(db);
        let e = Db::open(dir.path()).err().unwrap();
        assert!(matches!(e, StateError::TooNew { found: 99, .. }), "{e}");
    }

    #[test]
    fn garbage_and_foreign_databases_are_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DB_FILE), vec![0x42u8; 8192]).unwrap();
        let e = Db::open(dir.path()).err().unwrap();
        assert!(matches!(e, StateError::Foreign { .. }), "{e}");
        assert!(e.to_string().contains("not a SQLite database"), "{e}");

        let dir = tempfile::tempdir().unwrap();
        Connection::open(dir.path().join(DB_FILE))
            .unwrap()
            .execute_batch("CREATE TABLE photos (id INTEGER);")
            .unwrap();
        let e = Db::open(dir.path()).err().unwrap();
        assert!(e.to_string().contains("no ots meta table"), "{e}");
    }
}
