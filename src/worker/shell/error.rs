//! Every way the worker can fail to run or have to stop, each naming what
//! to fix; the binary chooses the exit status.

use std::path::PathBuf;

/// Why the worker could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] crate::settings::ConfigError),
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::worker::state::WorkerStateError),
    #[error("worker name {name:?} refused by the server: {message}")]
    NameInUse { name: String, message: String },
    #[error("the server does not allow this worker's key to register as {name:?} with its device: {message}; the key's name in the server's workers.d must match `name`, and its device the pin there (NAME.device, or its first registration)")]
    Forbidden { name: String, message: String },
    #[error("security: {0}")]
    Security(#[from] crate::security::SecurityError),
    /// The session could not be saved: the worker stops so that nothing
    /// is acknowledged that is not durable (ots-worker exits 74).
    #[error("storage error: cannot save the worker's state: {0}; stopping so that nothing is acknowledged that is not durable (free space or fix the state directory's disk, then restart)")]
    Save(crate::worker::state::WorkerStateError),
}
