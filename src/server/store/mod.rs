//! The server's store: what the core writes and reads back, kept apart
//! from its state. This file holds the [`Store`] port — task logs (one
//! folder per task under the files folder) and the audit log — behind a
//! trait so the scheduler stays free of I/O and its unit tests run
//! against [`MemoryStore`].
//!
//! - [`files`]: the file desk, result and input files off the loop.
//! - [`db`], [`pg`], [`state`]: the durable state in SQLite or
//!   PostgreSQL, one schema, the same batches.

pub mod cases;
pub mod db;
pub mod files;
pub mod history;
pub mod index;
pub mod logindex;
pub mod pg;
pub mod results;
pub mod sql;
pub mod state;
pub mod usage;

use crate::protocol::{LogLine, Stream, TaskId};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the store could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("result file name {0:?} is absolute, empty or climbs out of the results folder")]
    BadFileName(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Checks a worker-supplied result file name (the protocol's rule,
/// [`crate::protocol::check::relative_path`]) and gives the path to join.
pub fn safe_relative_path(name: &str) -> Result<PathBuf, StoreError> {
    crate::protocol::check::relative_path(name)
        .ok_or_else(|| StoreError::BadFileName(name.to_string()))
}

pub use crate::protocol::logtext::{prefix, render_into, render_line, rendered_len};

/// Storage of task logs and the audit log.
pub trait Store {
    /// Appends lines to the task's log.
    fn append_log(&mut self, task: &TaskId, lines: &[LogLine]) -> Result<(), StoreError>;
    /// Appends packed lines (already in the stored form, without the
    /// stream's prefix: [`crate::protocol::logtext`]).
    fn append_log_packed(
        &mut self,
        task: &TaskId,
        parts: &[(Stream, &[u8])],
    ) -> Result<(), StoreError>;
    /// Reads up to `max` bytes of the task's log; returns bytes and eof.
    fn read_log(&self, task: &TaskId, offset: u64, max: u64)
        -> Result<(Vec<u8>, bool), StoreError>;
    /// Reads the last `max` bytes at most of the task's log; returns
    /// where they start and the bytes.
    fn read_log_tail(&self, task: &TaskId, max: u64) -> Result<(u64, Vec<u8>), StoreError>;
    /// Appends one line (JSON, no newline) to the append-only audit log.
    fn append_audit(&mut self, line: &str) -> Result<(), StoreError>;
    /// Reads up to `max` bytes of the audit log; returns bytes and eof.
    fn read_audit(&self, offset: u64, max: u64) -> Result<(Vec<u8>, bool), StoreError>;
    /// The audit log's length in bytes.
    fn audit_len(&self) -> Result<u64, StoreError>;
    /// At a start: cuts the task's log back to its last whole line (a
    /// write cut short by a crash or a full disk); returns the bytes cut.
    fn repair_log(&mut self, _task: &TaskId) -> Result<u64, StoreError> {
        Ok(0)
    }
}

/// Task folders on disk: `<root>/tasks/<task>/log` and `…/files/<name>`.
pub struct DiskStore {
    root: PathBuf,
    /// Open append handles of recently written task logs, with their
    /// index's marker (none: a log from before the index).
    logs: HashMap<TaskId, (File, PathBuf, Option<logindex::Marker>)>,
    /// The audit log, opened for appending at its first line.
    audit: Option<File>,
}

/// Task logs kept open for appending at most.
const OPEN_LOGS: usize = 256;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn read_range(path: &Path, offset: u64, max: u64) -> Result<(Vec<u8>, bool), StoreError> {
    let mut f = File::open(path).map_err(io("cannot open", path))?;
    let len = f.metadata().map_err(io("cannot stat", path))?.len();
    f.seek(SeekFrom::Start(offset.min(len)))
        .map_err(io("cannot seek", path))?;
    let mut buf = Vec::new();
    f.take(max)
        .read_to_end(&mut buf)
        .map_err(io("cannot read", path))?;
    let eof = offset + buf.len() as u64 >= len;
    Ok((buf, eof))
}

impl DiskStore {
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let tasks = root.join("tasks");
        fs::create_dir_all(&tasks).map_err(io("cannot create", &tasks))?;
        Ok(DiskStore {
            root: root.to_path_buf(),
            logs: HashMap::new(),
            audit: None,
        })
    }

    fn task_dir(&self, task: &TaskId) -> PathBuf {
        self.root.join("tasks").join(task)
    }
}

impl Store for DiskStore {
    fn append_log(&mut self, task: &TaskId, lines: &[LogLine]) -> Result<(), StoreError> {
        let size: usize = lines.iter().map(|l| rendered_len(l) as usize).sum();
        let mut text = Vec::with_capacity(size);
        for line in lines {
            render_into(&mut text, line);
        }
        self.append_stored(task, &text)
    }

    fn append_log_packed(
        &mut self,
        task: &TaskId,
        parts: &[(Stream, &[u8])],
    ) -> Result<(), StoreError> {
        // Standard output has no prefix: its text is written as it came.
        if let [(Stream::Stdout, text)] = parts {
            return self.append_stored(task, text);
        }
        self.append_stored(task, &packed_stored_form(parts))
    }

    fn read_log(
        &self,
        task: &TaskId,
        offset: u64,
        max: u64,
    ) -> Result<(Vec<u8>, bool), StoreError> {
        let path = self.task_dir(task).join("log");
        if !path.exists() {
            return Ok((Vec::new(), true));
        }
        read_range(&path, offset, max)
    }

    fn read_log_tail(&self, task: &TaskId, max: u64) -> Result<(u64, Vec<u8>), StoreError> {
        let path = self.task_dir(task).join("log");
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, Vec::new())),
            Err(e) => return Err(io("cannot stat", &path)(e)),
        };
        let start = len.saturating_sub(max);
        let (bytes, _) = read_range(&path, start, len - start)?;
        Ok((start, bytes))
    }

    fn append_audit(&mut self, line: &str) -> Result<(), StoreError> {
        let path = self.root.join("audit.log");
        if self.audit.is_none() {
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o640)
                .open(&path)
                .map_err(io("cannot open", &path))?;
            self.audit = Some(f);
        }
        let f = self.audit.as_mut().expect("just opened");
        // One write per line: O_APPEND keeps lines whole.
        let mut text = String::with_capacity(line.len() + 1);
        text.push_str(line);
        text.push('\n');
        f.write_all(text.as_bytes())
            .map_err(io("cannot append to", &path))
    }

    fn repair_log(&mut self, task: &TaskId) -> Result<u64, StoreError> {
        self.logs.remove(task);
        DiskStore::cut_torn_line(&self.task_dir(task).join("log"))
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        let path = self.root.join("audit.log");
        match fs::metadata(&path) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(io("cannot stat", &path)(e)),
        }
    }

    fn read_audit(&self, offset: u64, max: u64) -> Result<(Vec<u8>, bool), StoreError> {
        let path = self.root.join("audit.log");
        if !path.exists() {
            return Ok((Vec::new(), true));
        }
        read_range(&path, offset, max)
    }
}

/// The stored form of packed parts: each line with its stream's prefix.
pub fn packed_stored_form(parts: &[(Stream, &[u8])]) -> Vec<u8> {
    let size: usize = parts
        .iter()
        .map(|(s, t)| t.len() + prefix(*s).len() * memchr::memchr_iter(b'\n', t).count())
        .sum();
    let mut out = Vec::with_capacity(size);
    for (stream, text) in parts {
        let p = prefix(*stream).as_bytes();
        if p.is_empty() {
            out.extend_from_slice(text);
            continue;
        }
        for line in crate::protocol::logtext::lines(text) {
            out.extend_from_slice(p);
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out
}

impl DiskStore {
    /// Appends bytes in the stored form to the task's log (one write).
    fn append_stored(&mut self, task: &TaskId, text: &[u8]) -> Result<(), StoreError> {
        if !self.logs.contains_key(task) {
            let dir = self.task_dir(task);
            fs::create_dir_all(&dir).map_err(io("cannot create", &dir))?;
            let path = dir.join("log");
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io("cannot open", &path))?;
            let idx = dir.join("log.idx");
            let marker = logindex::Marker::recover(&path, &idx).map_err(io("cannot read", &idx))?;
            if self.logs.len() >= OPEN_LOGS {
                self.logs.clear(); // simple bound; reopening is cheap
            }
            self.logs.insert(task.clone(), (f, path, marker));
        }
        let (f, path, marker) = self.logs.get_mut(task).expect("just opened");
        let before = f.metadata().map_err(io("cannot stat", path))?.len();
        // The index's mark goes first: a mark past a torn end is cut at
        // the next open, a line without a mark is only counted.
        if let Some(mark) = marker.as_mut().and_then(|m| m.note(before, text, now_ms())) {
            let idx = path.with_file_name("log.idx");
            if let Err(e) = logindex::append_mark(&idx, &mark) {
                // Not fatal to the log: the lines are stored, found by
                // counting from an earlier mark.
                tracing::warn!(task = %task, path = %idx.display(), error = %e, "cannot append to a log's index; its lines are counted from the previous mark");
            }
        }
        if let Err(e) = f.write_all(text) {
            // A full disk takes part of a write: cut it back so the log
            // holds whole lines only (the scheduler counts these as not
            // stored). Truncating frees space, so it works on a full disk.
            let cut = f.set_len(before);
            self.logs.remove(task);
            if let Err(cut) = cut {
                tracing::error!(task = %task, error = %cut, "cannot cut a partly written log line back; it is cut at the next start");
            }
            return Err(io("cannot append to", &self.task_dir(task).join("log"))(e));
        }
        Ok(())
    }

    /// Cuts a log that does not end with a whole line (a write cut short
    /// by a crash or a full disk) back to its last newline; returns the
    /// bytes cut.
    fn cut_torn_line(path: &Path) -> Result<u64, StoreError> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io("cannot open", path)(e)),
        };
        let len = f.metadata().map_err(io("cannot stat", path))?.len();
        // Look back for the last newline, a chunk at a time (a line is at
        // most ~192 KiB, so this reads little).
        let mut end = len;
        let mut chunk = vec![0u8; 64 * 1024];
        while end > 0 {
            let start = end.saturating_sub(chunk.len() as u64);
            let n = (end - start) as usize;
            f.seek(SeekFrom::Start(start))
                .map_err(io("cannot seek", path))?;
            f.read_exact(&mut chunk[..n])
                .map_err(io("cannot read", path))?;
            if let Some(i) = memchr::memrchr(b'\n', &chunk[..n]) {
                let keep = start + i as u64 + 1;
                if keep < len {
                    f.set_len(keep).map_err(io("cannot truncate", path))?;
                    f.sync_all().map_err(io("cannot sync", path))?;
                }
                return Ok(len - keep);
            }
            end = start;
        }
        if len > 0 {
            f.set_len(0).map_err(io("cannot truncate", path))?;
        }
        Ok(len)
    }
}

/// In-memory store for unit tests of the scheduler.
#[derive(Default)]
pub struct MemoryStore {
    pub logs: HashMap<TaskId, Vec<u8>>,
    pub audit: Vec<u8>,
}

fn slice(data: &[u8], offset: u64, max: u64) -> (Vec<u8>, bool) {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(max as usize).min(data.len());
    (data[start..end].to_vec(), end >= data.len())
}

impl Store for MemoryStore {
    fn append_log(&mut self, task: &TaskId, lines: &[LogLine]) -> Result<(), StoreError> {
        let log = self.logs.entry(task.clone()).or_default();
        for line in lines {
            render_into(log, line);
        }
        Ok(())
    }

    fn append_log_packed(
        &mut self,
        task: &TaskId,
        parts: &[(Stream, &[u8])],
    ) -> Result<(), StoreError> {
        let log = self.logs.entry(task.clone()).or_default();
        log.extend_from_slice(&packed_stored_form(parts));
        Ok(())
    }

    fn read_log(
        &self,
        task: &TaskId,
        offset: u64,
        max: u64,
    ) -> Result<(Vec<u8>, bool), StoreError> {
        Ok(self
            .logs
            .get(task)
            .map(|l| slice(l, offset, max))
            .unwrap_or((Vec::new(), true)))
    }

    fn append_audit(&mut self, line: &str) -> Result<(), StoreError> {
        self.audit.extend_from_slice(line.as_bytes());
        self.audit.push(b'\n');
        Ok(())
    }

    fn read_audit(&self, offset: u64, max: u64) -> Result<(Vec<u8>, bool), StoreError> {
        Ok(slice(&self.audit, offset, max))
    }

    fn audit_len(&self) -> Result<u64, StoreError> {
        Ok(self.audit.len() as u64)
    }

    fn read_log_tail(&self, task: &TaskId, max: u64) -> Result<(u64, Vec<u8>), StoreError> {
        let log = self.logs.get(task).map_or(&[][..], Vec::as_slice);
        let start = (log.len() as u64).saturating_sub(max);
        Ok((start, log[start as usize..].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_lines_escape_what_could_forge_a_line_and_their_length_is_exact() {
        for (stream, text) in [
            (Stream::Stdout, "plain"),
            (Stream::Stderr, "a\nb\\c\rd"),
            (Stream::Worker, "é\u{1b}[2J"),
        ] {
            let line = LogLine {
                seq: 1,
                stream,
                text: text.into(),
            };
            let r = render_line(&line);
            assert_eq!(r.len() as u64, rendered_len(&line), "{r:?}");
            assert_eq!(r.matches('\n').count(), 1, "{r:?}");
        }
    }

    #[test]
    fn traversal_and_absolute_names_are_refused() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
            "a\0b",
        ] {
            assert!(safe_relative_path(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            safe_relative_path("pkg/result.xml").unwrap(),
            PathBuf::from("pkg/result.xml")
        );
    }
}
