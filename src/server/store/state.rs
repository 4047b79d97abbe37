//! Where the server's state lives: the embedded SQLite in the state
//! directory (the default) or PostgreSQL (`database = "postgresql://…"`).
//! Both take the same [`Changes`] batches and give back the same
//! [`Snapshot`]; the scheduler never knows which one it has.

use super::db::{Changes, Db, Snapshot, StateError};
use super::history::SqliteHistory;
use super::pg::history::PgHistory;
use super::pg::{PgDb, PgSettings};
use std::path::Path;

pub enum StateStore {
    Sqlite(Db),
    /// `files_dir` (the state directory unless set) holds logs, result
    /// and input files and the audit log; servers sharing the database
    /// share it (a shared filesystem for servers on several machines). It
    /// is not locked: the lease makes one writer. It records which
    /// database it belongs to (`database`), so a server pointed at
    /// another one is refused.
    Postgres(Box<PgDb>),
}

/// Inside `files_dir`: the id of the PostgreSQL database whose files it
/// holds.
pub const DATABASE_MARKER: &str = "database";

impl StateStore {
    /// Opens the configured store (migrating its schema).
    /// SQLite lives in `state_dir`; with PostgreSQL, `files_dir` (which
    /// servers sharing the database share) records the database's id, and
    /// one of another database is refused.
    pub async fn open(
        state_dir: &Path,
        files_dir: &Path,
        pg: Option<&PgSettings>,
    ) -> Result<StateStore, StateError> {
        match pg {
            None => Ok(StateStore::Sqlite(Db::open(state_dir)?)),
            Some(settings) => {
                let db = PgDb::open(settings).await?;
                let marker = files_dir.join(DATABASE_MARKER);
                match std::fs::read_to_string(&marker) {
                    Ok(id) if id.trim() == db.database_id() => {}
                    Ok(id) => {
                        return Err(StateError::Foreign {
                            path: marker,
                            reason: format!(
                                "this files_dir (state_dir unless set) holds the files of another PostgreSQL database (id {}; {} has {}): use the files_dir of {}, or another one",
                                id.trim(),
                                db.target(),
                                db.database_id(),
                                db.target()
                            ),
                        })
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        let tmp = files_dir.join(format!(".{DATABASE_MARKER}.{}", std::process::id()));
                        std::fs::write(&tmp, format!("{}\n", db.database_id()))
                            .and_then(|()| std::fs::rename(&tmp, &marker))
                            .map_err(|source| StateError::Marker {
                                path: marker.clone(),
                                source,
                            })?;
                    }
                    Err(source) => return Err(StateError::Marker { path: marker, source }),
                }
                Ok(StateStore::Postgres(Box::new(db)))
            }
        }
    }

    pub async fn load(&self) -> Result<Snapshot, StateError> {
        match self {
            StateStore::Sqlite(db) => db.load(),
            StateStore::Postgres(db) => db.load().await,
        }
    }

    /// A reader of the history on a connection of its own (the serving
    /// loop's commits never wait for it).
    pub async fn history_reader(&self) -> Result<HistoryReader, StateError> {
        match self {
            StateStore::Sqlite(db) => Ok(HistoryReader::Sqlite(SqliteHistory::open(db.path())?)),
            StateStore::Postgres(db) => Ok(HistoryReader::Postgres(Box::new(
                PgHistory::open(db.settings()).await?,
            ))),
        }
    }

    /// Where the file desk records test cases: a connection of its own.
    pub async fn case_sink(&self) -> Result<Box<dyn super::cases::CaseSink>, StateError> {
        match self {
            StateStore::Sqlite(db) => Ok(Box::new(super::cases::SqliteCases::open(db.path())?)),
            StateStore::Postgres(db) => Ok(Box::new(
                super::pg::history::PgCases::open(db.settings()).await?,
            )),
        }
    }

    /// Durable when it returns.
    pub async fn commit(&mut self, changes: &Changes) -> Result<(), StateError> {
        match self {
            StateStore::Sqlite(db) => db.commit(changes),
            StateStore::Postgres(db) => db.commit(changes).await,
        }
    }

    /// What the database connection counted since the last call
    /// (reconnects and commits that waited for one; PostgreSQL only).
    pub fn take_counters(&mut self) -> Vec<(&'static str, u64)> {
        match self {
            StateStore::Sqlite(_) => Vec::new(),
            StateStore::Postgres(db) => db.take_counters().to_vec(),
        }
    }

    /// On PostgreSQL: waits (standby) until this server holds the lease,
    /// then fences its commits; the epoch and when it was granted. On
    /// SQLite the state directory's lock already makes one server.
    pub async fn lead(
        &mut self,
        holder: &str,
        address: &str,
        policy: crate::server::lease::LeasePolicy,
        waiting: impl FnMut(Option<&super::pg::LeaseView>),
    ) -> Result<Option<(i64, std::time::Instant)>, StateError> {
        match self {
            StateStore::Sqlite(_) => Ok(None),
            StateStore::Postgres(db) => db.lead(holder, address, policy, waiting).await.map(Some),
        }
    }

    /// The database file, or `PostgreSQL user@host:port/db`.
    pub fn describe(&self) -> String {
        match self {
            StateStore::Sqlite(db) => db.path().display().to_string(),
            StateStore::Postgres(db) => format!("PostgreSQL {}", db.target()),
        }
    }
}

/// Reads the history ([`super::history`]) of either backend.
pub enum HistoryReader {
    Sqlite(SqliteHistory),
    Postgres(Box<PgHistory>),
}

impl HistoryReader {
    /// Reads task logs below the files folder `files` (for `log`
    /// known-issue rules).
    pub fn with_logs(self, files: &std::path::Path) -> HistoryReader {
        match self {
            HistoryReader::Sqlite(h) => HistoryReader::Sqlite(h.with_logs(files)),
            HistoryReader::Postgres(h) => HistoryReader::Postgres(Box::new(h.with_logs(files))),
        }
    }
}
