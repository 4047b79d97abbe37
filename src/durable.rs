//! What the server's and the worker's durable state share: an exclusive
//! lock on the state directory, keeping it private, and opening a SQLite
//! file in WAL mode while telling a database from anything else.

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

/// For a permission error on `path`: who owns it and who we are, and what
/// to do — so the one log line names the fix, not only the symptom.
pub fn access_hint(path: &Path, error: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    if error.kind() != std::io::ErrorKind::PermissionDenied {
        return String::new();
    }
    let me = nix::unistd::geteuid();
    let Some((at, meta)) = path
        .ancestors()
        .find_map(|a| std::fs::metadata(a).ok().map(|m| (a.to_path_buf(), m)))
    else {
        return String::new();
    };
    format!(
        " ({} is owned by uid {} with mode {:o}; this process runs as uid {me}: `chown -R {me} {}` or run as its owner)",
        at.display(),
        meta.uid(),
        meta.mode() & 0o7777,
        at.display()
    )
}

/// Whether this process runs as a systemd service (which sets its umask
/// and state directory mode itself: `UMask=0027`, `StateDirectoryMode=0750`,
/// so that the `ots` group may read).
fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
}

/// Makes everything this process creates private, whatever umask it was
/// started with (the usual 022 would leave databases, logs, result files,
/// inputs and caches readable by every local user): others get nothing,
/// and outside systemd the group nothing either (0600 files, 0700
/// folders); under systemd the unit's group keeps read access (0640,
/// 0750). Never loosens a stricter umask. The binaries call it first.
pub fn private_by_default() {
    use nix::sys::stat::{umask, Mode};
    let tighter = if under_systemd() { 0o027 } else { 0o077 };
    let old = umask(Mode::empty());
    umask(old | Mode::from_bits_truncate(tighter));
}

/// Takes `dir` away from others (and, outside systemd, from the group):
/// a state directory made before, or by a process with a looser umask,
/// keeps what is below it unreachable to them.
pub fn make_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o7777;
    let closed = if under_systemd() { 0o007 } else { 0o077 };
    if mode & closed != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & !closed))?;
        tracing::info!(dir = %dir.display(), was = format!("{mode:o}"), now = format!("{:o}", mode & !closed), "state directory made private");
    }
    Ok(())
}

/// Takes the exclusive lock `dir/lock` for as long as the returned value
/// lives, and writes our pid into it for whoever tries next. The directory
/// is made private first ([`make_private`]).
pub fn lock_dir(dir: &Path) -> Result<Flock<File>, LockFailure> {
    make_private(dir).map_err(LockFailure::Io)?;
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

/// Bytes of a large file written per step of [`flush_behind`].
pub const FLUSH_BEHIND_BYTES: u64 = 8 * 1024 * 1024;

/// Keeps a large file being written from piling up in the page cache:
/// each time the file grows past a multiple of [`FLUSH_BEHIND_BYTES`]
/// (from `before` to `after` bytes), writeback of the step just completed
/// starts, and the one before it is waited for. Without it, a 1 GiB
/// result file sat dirty until its final `fsync`, and every commit of the
/// server's SQLite state on the same ext4 disk waited behind that
/// writeback (data=ordered), holding the replies of everyone: ping answers
/// of 55–75 ms in `cargo bench --bench files` on disk. Advisory only:
/// errors are ignored here (the final `sync_all` reports them) and tmpfs
/// ignores it.
pub fn flush_behind(file: &File, before: u64, after: u64) {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let step = FLUSH_BEHIND_BYTES;
    if after / step == before / step {
        return;
    }
    let done = (after / step) * step; // end of the step just completed
    let (Ok(start), Ok(len)) = (i64::try_from(done - step), i64::try_from(step)) else {
        return;
    };
    let range = |offset: i64, flags: libc::c_uint| {
        // SAFETY: a plain system call on a descriptor `file` keeps open;
        // no memory is passed.
        unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) }
    };
    let _ = range(start, libc::SYNC_FILE_RANGE_WRITE);
    if start >= len {
        let _ = range(
            start - len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        );
    }
}
