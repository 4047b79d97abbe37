//! The file desk: result files written, hashed, verified and made durable,
//! and stored files read for clients, on a thread of its own so the event
//! loop never waits for a disk. The scheduler decides (who may send what,
//! how much credit, which limits); the desk only does the I/O it is told
//! and reports back.
//!
//! An upload is written to `tasks/<task>/incoming/<attempt>/<name>` and
//! hashed as its bytes arrive, in order; at the end its SHA-256 is
//! compared with the sender's, the file is synced and renamed to
//! `tasks/<task>/files/<name>` in one step, so a stored file is always
//! whole. After a server restart the incoming copy is still there: its
//! length is how much the server has, and its prefix is hashed once more
//! (reading, not receiving) before the upload continues.

use crate::protocol::{CaseCounts, FailingCase, FileInfo, TaskId};
use crate::server::store::cases::{CaseAbout, CaseSink};
use crate::server::store::safe_relative_path;
use crate::server::verdict::MAX_JUNIT_BYTES;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Which upload a job is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UploadKey {
    /// A result file of a task attempt, from its worker.
    Result {
        task: TaskId,
        attempt: u32,
        name: String,
    },
    /// An input file, named by its SHA-256 (checked to be 64 hex digits
    /// by the codec), from a client, uploaded by `owner` (the user's
    /// allow-listed name, or empty without security): each user uploads
    /// into an incoming copy of its own.
    Input { sha256: String, owner: String },
}

/// What a client reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadSource {
    Result { task: TaskId, name: String },
    Input { sha256: String },
}

/// What the desk is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub enum FileJob {
    /// Opens the incoming copy (creating it if absent); answers its length.
    Open { key: UploadKey },
    /// Appends `data` at `offset`, which is where the incoming copy ends.
    Write {
        key: UploadKey,
        offset: u64,
        data: Bytes,
    },
    /// Compares the SHA-256 of all `size` bytes with the sender's, then
    /// syncs and renames into place (or removes the copy on a mismatch).
    Finish {
        key: UploadKey,
        size: u64,
        sha256: String,
        /// Stored with the test cases of a JUnit result file.
        about: crate::server::store::cases::CaseAbout,
    },
    /// Removes the incoming copy (the upload was refused or its task ended).
    Discard { key: UploadKey },
    /// Removes a task's folder: its log, result files and incoming copies
    /// (the retention policy).
    Prune { task: TaskId },
    /// Finds a line or a text in a task's log for a client
    /// ([`crate::server::store::logindex`]).
    FindInLog {
        peer: Bytes,
        request: u64,
        task: TaskId,
        find: crate::protocol::logfind::LogFind,
    },
    /// Reads up to `max` bytes of a stored file for a client.
    Read {
        peer: Bytes,
        request: u64,
        source: ReadSource,
        offset: u64,
        max: u64,
    },
}

/// Why the desk could not do a job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeskError {
    #[error("result file name {0:?} is not a relative path inside the results folder")]
    BadName(String),
    /// Disk full, permissions, I/O error: the text names the path and the cause.
    #[error("{0}")]
    Io(String),
    #[error("has {have} bytes, not the {size} announced")]
    Short { have: u64, size: u64 },
    #[error("SHA-256 {actual} of the bytes received differs from the sender's {expected}")]
    Mismatch { expected: String, actual: String },
    #[error("write at offset {offset} but the incoming copy ends at {have}")]
    OutOfOrder { offset: u64, have: u64 },
    #[error("no such file")]
    NotFound,
}

/// A verified, stored result file and, for JUnit XML, what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub info: FileInfo,
    pub junit: Option<Result<Option<CaseCounts>, String>>,
    /// Its first failing cases (at most `FAILING_CASES_SHOWN`).
    pub failing: Vec<FailingCase>,
    /// Its cases could not be recorded in the database (why), or some
    /// were cut by a bound (how many): said in the task's reason.
    pub cases_note: Option<String>,
}

/// What the desk did.
#[derive(Debug)]
pub enum FileDone {
    Opened {
        key: UploadKey,
        have: Result<u64, DeskError>,
    },
    Written {
        key: UploadKey,
        have: Result<u64, DeskError>,
    },
    Finished {
        key: UploadKey,
        result: Result<Stored, DeskError>,
    },
    Read {
        peer: Bytes,
        request: u64,
        offset: u64,
        result: Result<(Vec<u8>, bool), DeskError>,
    },
    Found {
        peer: Bytes,
        request: u64,
        result: Result<crate::protocol::logfind::LogFinding, DeskError>,
    },
}

struct Incoming {
    file: File,
    hasher: Sha256,
    /// Bytes in the file, all of them hashed.
    have: u64,
}

/// The desk's state: the open incoming copies. Used directly (and
/// synchronously) by the scheduler's unit tests; by the server through
/// [`spawn`].
pub struct Desk {
    root: PathBuf,
    open: HashMap<UploadKey, Incoming>,
    /// Where the test cases of stored JUnit files go (none: counted only).
    cases: Option<Box<dyn CaseSink>>,
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> DeskError {
    let hint = if e.raw_os_error() == Some(28) {
        " (disk full: free space in the state directory)"
    } else {
        ""
    };
    DeskError::Io(format!("cannot {what} {}: {e}{hint}", path.display()))
}

/// Open incoming copies at most; more are closed and reopened (and
/// re-hashed) when written again. The scheduler keeps the number of
/// uploads with credit far below this.
const MAX_OPEN: usize = 4096;

impl Desk {
    pub fn new(root: &Path) -> Desk {
        Desk {
            root: root.to_path_buf(),
            open: HashMap::new(),
            cases: None,
        }
    }

    /// A desk that records the test cases of the JUnit files it stores.
    pub fn with_cases(root: &Path, sink: Box<dyn CaseSink>) -> Desk {
        Desk {
            cases: Some(sink),
            ..Desk::new(root)
        }
    }

    fn task_dir(&self, task: &TaskId) -> PathBuf {
        self.root.join("tasks").join(task)
    }

    fn incoming_path(&self, key: &UploadKey) -> Result<PathBuf, DeskError> {
        match key {
            UploadKey::Result {
                task,
                attempt,
                name,
            } => {
                let rel = safe_relative_path(name).map_err(|_| DeskError::BadName(name.clone()))?;
                Ok(self
                    .task_dir(task)
                    .join("incoming")
                    .join(attempt.to_string())
                    .join(rel))
            }
            // The owner's name is hex-encoded: whatever it holds, it
            // never becomes a path of its own.
            UploadKey::Input { sha256, owner } => Ok(self
                .root
                .join("inputs")
                .join("incoming")
                .join(format!("{sha256}-{}", hex::encode(owner)))),
        }
    }

    fn dest_path(&self, key: &UploadKey) -> Result<PathBuf, DeskError> {
        match key {
            UploadKey::Result { task, name, .. } => self.stored_path(task, name),
            UploadKey::Input { sha256, .. } => Ok(self.input_path(sha256)),
        }
    }

    fn input_path(&self, sha256: &str) -> PathBuf {
        self.root.join("inputs").join(sha256)
    }

    fn stored_path(&self, task: &TaskId, name: &str) -> Result<PathBuf, DeskError> {
        let rel = safe_relative_path(name).map_err(|_| DeskError::BadName(name.to_string()))?;
        Ok(self.task_dir(task).join("files").join(rel))
    }

    pub fn run(&mut self, job: FileJob) -> Option<FileDone> {
        Some(match job {
            FileJob::Open { key } => {
                let have = self.open(&key).map(|i| i.have);
                FileDone::Opened { key, have }
            }
            FileJob::Write { key, offset, data } => {
                let have = self.write(&key, offset, &data);
                FileDone::Written { key, have }
            }
            FileJob::Finish {
                key,
                size,
                sha256,
                about,
            } => {
                let result = self.finish(&key, size, sha256, &about);
                FileDone::Finished { key, result }
            }
            FileJob::Prune { task } => {
                let dir = self.task_dir(&task);
                if let Err(e) = fs::remove_dir_all(&dir) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(dir = %dir.display(), error = %e, "retention: cannot remove a task's folder");
                    }
                }
                return None;
            }
            FileJob::Discard { key } => {
                self.open.remove(&key);
                if let Ok(path) = self.incoming_path(&key) {
                    let _ = fs::remove_file(path);
                }
                return None;
            }
            FileJob::FindInLog {
                peer,
                request,
                task,
                find,
            } => FileDone::Found {
                peer,
                request,
                result: super::logindex::find(&self.task_dir(&task), &find).map_err(|e| {
                    match e.kind() {
                        std::io::ErrorKind::NotFound => DeskError::NotFound,
                        _ => io_error("search the log in", &self.task_dir(&task), e),
                    }
                }),
            },
            FileJob::Read {
                peer,
                request,
                source,
                offset,
                max,
            } => FileDone::Read {
                peer,
                request,
                offset,
                result: self.read(&source, offset, max),
            },
        })
    }

    /// The incoming copy, opened and hashed up to its end if it was not
    /// open (first offer, or after a server restart).
    fn open(&mut self, key: &UploadKey) -> Result<&mut Incoming, DeskError> {
        if !self.open.contains_key(key) {
            let path = self.incoming_path(key)?;
            if let Some(parent) = path.parent() {
                fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
            }
            let mut file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_error("open", &path, e))?;
            let mut hasher = Sha256::new();
            let have =
                std::io::copy(&mut file, &mut hasher).map_err(|e| io_error("read", &path, e))?;
            file.seek(SeekFrom::Start(have))
                .map_err(|e| io_error("seek", &path, e))?;
            if self.open.len() >= MAX_OPEN {
                self.open.clear();
            }
            self.open
                .insert(key.clone(), Incoming { file, hasher, have });
        }
        Ok(self.open.get_mut(key).expect("just opened"))
    }

    fn write(&mut self, key: &UploadKey, offset: u64, data: &[u8]) -> Result<u64, DeskError> {
        let path = self.incoming_path(key)?;
        let incoming = self.open(key)?;
        if offset != incoming.have {
            return Err(DeskError::OutOfOrder {
                offset,
                have: incoming.have,
            });
        }
        if let Err(e) = incoming.file.write_all(data) {
            // Whatever part was written is cut off again, so the copy
            // stays exactly what was hashed.
            let have = incoming.have;
            let _ = incoming.file.set_len(have);
            let _ = incoming.file.seek(SeekFrom::Start(have));
            return Err(io_error("write", &path, e));
        }
        incoming.hasher.update(data);
        let before = incoming.have;
        incoming.have += data.len() as u64;
        crate::durable::flush_behind(&incoming.file, before, incoming.have);
        Ok(incoming.have)
    }

    fn finish(
        &mut self,
        key: &UploadKey,
        size: u64,
        sha256: String,
        about: &CaseAbout,
    ) -> Result<Stored, DeskError> {
        let incoming_path = self.incoming_path(key)?;
        let dest = self.dest_path(key)?;
        let have = self.open(key)?.have;
        if have != size {
            return Err(DeskError::Short { have, size });
        }
        let Incoming { file, hasher, .. } = self.open.remove(key).expect("opened above");
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            let _ = fs::remove_file(&incoming_path);
            return Err(DeskError::Mismatch {
                expected: sha256,
                actual,
            });
        }
        file.sync_all()
            .map_err(|e| io_error("sync", &incoming_path, e))?;
        drop(file);
        let parent = dest.parent().expect("below the task folder");
        fs::create_dir_all(parent).map_err(|e| io_error("create", parent, e))?;
        self.place(&incoming_path, &dest)?;
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
        let name = match key {
            UploadKey::Result { name, .. } => name.clone(),
            UploadKey::Input { sha256, .. } => sha256.clone(),
        };
        let info = FileInfo { name, size, sha256 };
        match key {
            UploadKey::Result { task, attempt, .. } if info.name.ends_with(".xml") => {
                Ok(self.read_junit(task, *attempt, &dest, info, about))
            }
            _ => Ok(Stored {
                info,
                junit: None,
                failing: Vec::new(),
                cases_note: None,
            }),
        }
    }

    /// What a stored XML result file says: its counts, its first failing
    /// cases, and all its cases recorded (bounded; cut ones counted).
    fn read_junit(
        &mut self,
        task: &TaskId,
        attempt: u32,
        dest: &Path,
        info: FileInfo,
        about: &CaseAbout,
    ) -> Stored {
        let name = info.name.clone();
        let mut xml = Vec::new();
        let parsed = File::open(dest)
            .and_then(|f| f.take(MAX_JUNIT_BYTES).read_to_end(&mut xml))
            .map_err(|e| format!("result file {name}: cannot read: {e}"))
            .and_then(|_| {
                crate::server::cases::parse(&xml, &crate::server::cases::CaseBounds::default())
                    .map_err(|e| format!("result file {name}: {e}"))
            });
        let mut stored = Stored {
            junit: Some(
                parsed
                    .as_ref()
                    .map(|c| c.as_ref().map(|c| c.counts))
                    .map_err(Clone::clone),
            ),
            info,
            failing: Vec::new(),
            cases_note: None,
        };
        let Ok(Some(mut cases)) = parsed else {
            return stored;
        };
        mark_log_offsets(&self.task_dir(task).join("log"), &mut cases.cases);
        stored.failing = cases
            .cases
            .iter()
            .filter(|c| c.status.failed())
            .take(crate::protocol::limits::FAILING_CASES_SHOWN)
            .map(|c| FailingCase {
                name: c.name.clone(),
                status: c.status,
                message: c.message.clone(),
                log_offset: c.log_offset,
            })
            .collect();
        if cases.cases_cut > 0 || cases.fields_cut > 0 {
            stored.cases_note = Some(format!(
                "{name}: {} test cases past the bound of {} not recorded, {} names or messages cut",
                cases.cases_cut,
                crate::server::cases::CaseBounds::default().max_cases,
                cases.fields_cut
            ));
        }
        if let Some(sink) = self.cases.as_mut() {
            if let Err(e) = sink.record(task, attempt, &name, about, &cases.cases) {
                tracing::error!(task = %task, file = %name, error = %e, "storage error: cannot record the result file's test cases; its verdict stands, `cases` lacks them");
                stored.cases_note = Some(format!("{name}: test cases not recorded: {e}"));
            }
        }
        stored
    }

    /// Puts the verified incoming copy in place as `dest` and keeps the
    /// copy: it is removed only once the scheduler has committed that the
    /// file is stored (a `Discard` delivered after the commit). A crash —
    /// or a failover — between the two leaves the copy whole, and a server
    /// that never learnt the file was stored resumes the upload from its
    /// full length rather than from zero. `dest` is replaced in one step
    /// (a hard link made beside the copy, renamed over it); where the
    /// filesystem has no hard links the copy itself is renamed, as before.
    fn place(&self, incoming: &Path, dest: &Path) -> Result<(), DeskError> {
        // `incoming/.placing` (`inputs/incoming/.placing`) can be no
        // upload's copy: attempts are numbers, inputs SHA-256 names.
        let beside = self.placing_path(incoming);
        let _ = fs::remove_file(&beside);
        match fs::hard_link(incoming, &beside) {
            Ok(()) => {
                fs::rename(&beside, dest).map_err(|e| io_error("rename into", dest, e))?;
                // Placed already (a resend after a crash): `dest` is the
                // same file, and renaming a link onto its twin does
                // nothing, so the link beside is removed here.
                let _ = fs::remove_file(&beside);
                Ok(())
            }
            // No hard links here (EPERM is what filesystems without them,
            // such as some FUSE and vfat mounts, answer).
            Err(e)
                if e.kind() == std::io::ErrorKind::Unsupported
                    || e.raw_os_error() == Some(nix::errno::Errno::EPERM as i32) =>
            {
                fs::rename(incoming, dest).map_err(|e| io_error("rename into", dest, e))
            }
            Err(e) => Err(io_error("link", &beside, e)),
        }
    }

    fn placing_path(&self, incoming: &Path) -> PathBuf {
        let mut dir = incoming;
        while let Some(parent) = dir.parent() {
            if parent.file_name().is_some_and(|n| n == "incoming") {
                return parent.join(".placing");
            }
            dir = parent;
        }
        unreachable!("every incoming copy is below an incoming folder")
    }

    fn read(
        &self,
        source: &ReadSource,
        offset: u64,
        max: u64,
    ) -> Result<(Vec<u8>, bool), DeskError> {
        let path = match source {
            ReadSource::Result { task, name } => self.stored_path(task, name)?,
            ReadSource::Input { sha256 } => self.input_path(sha256),
        };
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(DeskError::NotFound),
            Err(e) => return Err(io_error("open", &path, e)),
        };
        let len = f.metadata().map_err(|e| io_error("stat", &path, e))?.len();
        let start = offset.min(len);
        f.seek(SeekFrom::Start(start))
            .map_err(|e| io_error("seek", &path, e))?;
        let mut buf = Vec::with_capacity(max.min(len - start) as usize);
        f.take(max)
            .read_to_end(&mut buf)
            .map_err(|e| io_error("read", &path, e))?;
        let eof = start + buf.len() as u64 >= len;
        Ok((buf, eof))
    }
}

/// Bytes of a task's log (its end) searched for where its failing cases ran.
const LOG_SCAN_BYTES: u64 = 16 << 20;
/// Failing cases of a file looked up in the log, at most.
const LOG_SCAN_CASES: usize = 1000;

/// Where the log shows each failing case: the start of the first line
/// naming it (its name after the last `::`, as pytest, ctest and go test
/// print it; names shorter than 4 bytes match too much and are not
/// looked for). A log that cannot be read marks nothing.
fn mark_log_offsets(log: &Path, cases: &mut [crate::server::cases::Case]) {
    let Ok(mut f) = File::open(log) else { return };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return;
    };
    let start = len.saturating_sub(LOG_SCAN_BYTES);
    let mut text = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_err()
        || f.take(LOG_SCAN_BYTES).read_to_end(&mut text).is_err()
    {
        return;
    }
    for case in cases
        .iter_mut()
        .filter(|c| c.status.failed())
        .take(LOG_SCAN_CASES)
    {
        let short = case.name.rsplit("::").next().unwrap_or(&case.name);
        if short.len() < 4 {
            continue;
        }
        if let Some(at) = memchr::memmem::find(&text, short.as_bytes()) {
            let line = memchr::memrchr(b'\n', &text[..at]).map_or(0, |n| n + 1);
            case.log_offset = Some(start + line as u64);
        }
    }
}

/// The input files stored under `root` (their SHA-256 names and sizes):
/// what submits may refer to, read once at start.
pub fn stored_inputs(root: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = fs::read_dir(root.join("inputs")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let meta = e.metadata().ok()?;
            let hex =
                name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            (meta.is_file() && hex).then_some((name, meta.len()))
        })
        .collect()
}

/// Runs a desk on its own thread: jobs in, results out. Unbounded
/// channels, because the scheduler bounds what it hands out (bytes of
/// chunks by the credit pool, reads by its output budget).
pub fn spawn(
    root: &Path,
    cases: Option<Box<dyn CaseSink>>,
) -> (
    mpsc::UnboundedSender<FileJob>,
    mpsc::UnboundedReceiver<FileDone>,
) {
    let mut desk = Desk::new(root);
    desk.cases = cases;
    crate::jobs::spawn("ots-files", move |job| desk.run(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> UploadKey {
        UploadKey::Result {
            task: "r1.1".into(),
            attempt: 1,
            name: name.into(),
        }
    }

    #[test]
    fn an_upload_resumes_after_a_restart_and_is_verified_once_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"hello world, in two halves";
        let sha = hex::encode(Sha256::digest(data));
        let mut desk = Desk::new(dir.path());
        assert_eq!(desk.open(&key("a/b.txt")).unwrap().have, 0);
        assert_eq!(desk.write(&key("a/b.txt"), 0, &data[..10]).unwrap(), 10);
        // A resend of what is there is refused, not written twice.
        assert!(matches!(
            desk.write(&key("a/b.txt"), 0, &data[..10]),
            Err(DeskError::OutOfOrder { have: 10, .. })
        ));
        // The server restarts: a new desk finds the copy and its prefix.
        let mut desk = Desk::new(dir.path());
        assert_eq!(desk.open(&key("a/b.txt")).unwrap().have, 10);
        desk.write(&key("a/b.txt"), 10, &data[10..]).unwrap();
        let stored = desk
            .finish(
                &key("a/b.txt"),
                data.len() as u64,
                sha.clone(),
                &Default::default(),
            )
            .unwrap();
        assert_eq!(stored.info.sha256, sha);
        let path = dir.path().join("tasks/r1.1/files/a/b.txt");
        assert_eq!(fs::read(path).unwrap(), data);
        // The copy stays until the stored file is committed: a server
        // that restarts before that finds it whole, not empty.
        let mut again = Desk::new(dir.path());
        assert_eq!(again.open(&key("a/b.txt")).unwrap().have, data.len() as u64);
        again
            .finish(
                &key("a/b.txt"),
                data.len() as u64,
                sha.clone(),
                &Default::default(),
            )
            .unwrap();
        assert!(again
            .run(FileJob::Discard {
                key: key("a/b.txt")
            })
            .is_none());
        assert!(!dir.path().join("tasks/r1.1/incoming/1/a/b.txt").exists());
        assert!(!dir.path().join("tasks/r1.1/incoming/.placing").exists());
        assert_eq!(
            fs::read(dir.path().join("tasks/r1.1/files/a/b.txt")).unwrap(),
            data
        );
        let source = ReadSource::Result {
            task: "r1.1".into(),
            name: "a/b.txt".into(),
        };
        let (bytes, eof) = desk.read(&source, 6, 5).unwrap();
        assert_eq!((&bytes[..], eof), (&b"world"[..], false));
    }

    #[test]
    fn a_mismatch_removes_the_copy_and_a_bad_name_never_becomes_a_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut desk = Desk::new(dir.path());
        desk.write(&key("x.bin"), 0, b"abc").unwrap();
        let wrong = hex::encode(Sha256::digest(b"abd"));
        assert!(matches!(
            desk.finish(&key("x.bin"), 3, wrong, &Default::default()),
            Err(DeskError::Mismatch { .. })
        ));
        assert_eq!(desk.open(&key("x.bin")).unwrap().have, 0);
        assert!(matches!(
            desk.write(&key("../../etc/passwd"), 0, b"x"),
            Err(DeskError::BadName(_))
        ));
        assert!(matches!(
            desk.finish(&key("x.bin"), 3, String::new(), &Default::default()),
            Err(DeskError::Short { have: 0, size: 3 })
        ));
    }
}
