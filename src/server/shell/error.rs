//! Every way the server can fail to start or have to stop, each naming
//! what to fix; [`ServerError::is_configuration`] tells a mistake a
//! restart does not fix from a resource that may come back. The binary
//! chooses the exit status.

use crate::server::store::StoreError;
use crate::transport::TransportError;
use std::path::PathBuf;

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error(transparent)]
    Notify(#[from] crate::notify::config::NotifyConfigError),
    #[error(
        "state directory {path}: {source}{}",
        crate::durable::access_hint(path, source)
    )]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    State(#[from] crate::server::store::db::StateError),
    #[error("security: {0}")]
    Security(#[from] crate::security::SecurityError),
    #[error(transparent)]
    Web(#[from] crate::web::WebError),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("state database {path}: {source}; restore a backup or move the state directory away")]
    Restore {
        path: PathBuf,
        source: crate::server::scheduler::RestoreError,
    },
    /// The serving loop stopped by itself.
    #[error(transparent)]
    Stopped(#[from] Fatal),
    #[error("the serving loop ended abnormally: {0}")]
    Task(tokio::task::JoinError),
}

/// Why a serving server stops by itself: nothing it does after this
/// could be trusted (acknowledged without being durable, or sent by a
/// server that no longer leads).
#[derive(Debug, thiserror::Error)]
pub enum Fatal {
    /// A leader lost its lease: it acts no more (with PostgreSQL the
    /// server becomes a standby in the same process: `Server::run`).
    #[error("stepped down: {reason}")]
    Deposed { reason: String },
    /// The turn's changes could not be committed: nothing more is
    /// acknowledged (ots-server exits 74 with SQLite; with PostgreSQL it
    /// steps down to standby in the same process).
    #[error("storage error: cannot commit server state: {0}; stopped so that nothing is acknowledged that is not durable")]
    Commit(Box<crate::server::store::db::StateError>),
    #[error("the file desk thread is gone; stopped so that a restart brings it back")]
    DeskGone,
    #[error("the notification sender is gone; stopped so that a restart brings it back (the outbox is durable)")]
    NotifierGone,
    #[error("the history reader is gone; stopped so that a restart brings it back")]
    HistoryGone,
}

impl ServerError {
    /// A mistake in the configuration or the files' ownership that a
    /// restart does not fix (ots-server exits 78, so systemd does not
    /// restart it in a loop), as opposed to a resource that may come
    /// back (exit 69).
    pub fn is_configuration(&self) -> bool {
        let denied = |e: &std::io::Error| e.kind() == std::io::ErrorKind::PermissionDenied;
        match self {
            ServerError::Config(_)
            | ServerError::Notify(_)
            | ServerError::Security(_)
            | ServerError::Web(crate::web::WebError::Tls { .. }) => true,
            ServerError::StateDir { source, .. } => denied(source),
            ServerError::State(crate::server::store::db::StateError::Lock { source, .. }) => {
                denied(source)
            }
            ServerError::State(crate::server::store::db::StateError::DatabaseConfig { .. }) => true,
            // Wrong password or database name: a restart does not fix it.
            ServerError::State(crate::server::store::db::StateError::Postgres {
                source, ..
            }) => {
                use tokio_postgres::error::SqlState;
                matches!(
                    source.code(),
                    Some(c) if *c == SqlState::INVALID_PASSWORD
                        || *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                        || *c == SqlState::INVALID_CATALOG_NAME
                )
            }
            _ => false,
        }
    }
}
