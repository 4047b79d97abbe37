//! Where the server's state lives: the embedded SQLite in the state
//! directory (the default) or PostgreSQL (`database = "postgresql://…"`).
//! Both take the same [`Changes`] batches and give back the same
//! [`Snapshot`]; the scheduler never knows which one it has.

use super::db::{Changes, Db, Snapshot, StateError};
use super::pg::{PgDb, PgSettings};
use std::path::Path;

pub enum StateStore {
    Sqlite(Db),
    Postgres {
        db: PgDb,
        /// The state directory stays locked: logs and result files live
        /// there, and two servers must not write them at once.
        _lock: nix::fcntl::Flock<std::fs::File>,
    },
}

impl StateStore {
    /// Opens the configured store (migrating its schema).
    pub async fn open(state_dir: &Path, pg: Option<&PgSettings>) -> Result<StateStore, StateError> {
        match pg {
            None => Ok(StateStore::Sqlite(Db::open(state_dir)?)),
            Some(settings) => {
                let lock = super::db::lock(state_dir)?;
                Ok(StateStore::Postgres {
                    db: PgDb::open(settings).await?,
                    _lock: lock,
                })
            }
        }
    }

    pub async fn load(&self) -> Result<Snapshot, StateError> {
        match self {
            StateStore::Sqlite(db) => db.load(),
            StateStore::Postgres { db, .. } => db.load().await,
        }
    }

    /// Durable when it returns.
    pub async fn commit(&mut self, changes: &Changes) -> Result<(), StateError> {
        match self {
            StateStore::Sqlite(db) => db.commit(changes),
            StateStore::Postgres { db, .. } => db.commit(changes).await,
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
    ) -> Result<Option<(i64, std::time::Instant)>, StateError> {
        match self {
            StateStore::Sqlite(_) => Ok(None),
            StateStore::Postgres { db, .. } => db.lead(holder, address, policy).await.map(Some),
        }
    }

    /// The database file, or `PostgreSQL user@host:port/db`.
    pub fn describe(&self) -> String {
        match self {
            StateStore::Sqlite(db) => db.path().display().to_string(),
            StateStore::Postgres { db, .. } => format!("PostgreSQL {}", db.target()),
        }
    }
}
