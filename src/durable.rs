//! What the server's and the worker's durable state share: an exclusive
//! lock on the state directory, and opening a SQLite file in WAL mode while
//! telling a database from anything else.

use nix::fcntl::{Flock, FlockArg};
use rusqlite::Connection;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// Why a state directory could not be locked.
#[derive(Debug)]
pub enum LockFailure {
    /// Another process holds it; what it wrote into the lock file.
    Held(String),
    Io(std::io::Error),
}

/// Takes the exclusive lock `dir/lock` for as long as the returned value
/// lives, and writes our pid into it for whoever tries next.
pub fn lock_dir(dir: &Path) -> Result<Flock<File>, LockFailure> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(dir.join("lock"))
        .map_err(LockFailure::Io)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut locked) => {
            locked.set_len(0).map_err(LockFailure::Io)?;
            locked.rewind().map_err(LockFailure::Io)?;
            write!(locked, "pid {}", std::process::id()).map_err(LockFailure::Io)?;
            Ok(locked)
        }
        Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(LockFailure::Held(if holder.is_empty() {
                "unknown pid".into()
            } else {
                holder
            }))
        }
        Err((_, errno)) => Err(LockFailure::Io(std::io::Error::from(errno))),
    }
}

/// Why a state database could not be opened.
#[derive(Debug)]
pub enum OpenFailure {
    /// The file exists but is not a SQLite database.
    NotSqlite,
    Sqlite(rusqlite::Error),
}

/// Opens `path` (creating it if missing) in WAL mode; returns the
/// connection and the names of the tables it already has.
pub fn open_sqlite(path: &Path) -> Result<(Connection, Vec<String>), OpenFailure> {
    let conn = Connection::open(path).map_err(OpenFailure::Sqlite)?;
    // The first real read tells a SQLite file from anything else.
    let tables: Vec<String> = match conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
    {
        Ok(t) => t,
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::NotADatabase =>
        {
            return Err(OpenFailure::NotSqlite)
        }
        Err(e) => return Err(OpenFailure::Sqlite(e)),
    };
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(OpenFailure::Sqlite)?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(OpenFailure::Sqlite)?;
    Ok((conn, tables))
}
