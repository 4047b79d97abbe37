//! The result file reader: reads chunks of result files for their uploads
//! and hashes them as it goes, on a thread of its own so the worker's
//! event loop (heartbeats, logs) never waits for a disk. Each file is
//! hashed once, in order, while it is sent; a read that starts past what
//! was hashed (an upload resumed after a restart) hashes the gap first,
//! reading, not sending.

use crate::worker::session::{ReadDone, ReadRequest};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Where a result file of a task attempt lives.
pub fn results_dir(state_dir: &Path, task: &str, attempt: u32) -> PathBuf {
    state_dir
        .join("tasks")
        .join(format!("{task}-attempt{attempt}"))
        .join("results")
}

/// Modification time of a file in ns since the epoch (0 if before it).
pub fn mtime_ns(meta: &std::fs::Metadata) -> u64 {
    let secs = u64::try_from(meta.mtime()).unwrap_or(0);
    secs.saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(meta.mtime_nsec()).unwrap_or(0))
}

struct Current {
    key: (String, u32, String),
    file: File,
    hasher: Sha256,
    hashed: u64,
}

/// Test hook: flip the byte at this offset of the first chunk that holds
/// it (after hashing the true bytes), to prove the server notices.
/// Only read when `OTS_TEST_CORRUPT_UPLOAD_AT` is set.
struct Corruption {
    at: Option<u64>,
}

pub struct Reader {
    state_dir: PathBuf,
    current: Option<Current>,
    corrupt: Corruption,
}

const HASH_BUF: usize = 1024 * 1024;

impl Reader {
    pub fn new(state_dir: &Path) -> Reader {
        Reader {
            state_dir: state_dir.to_path_buf(),
            current: None,
            corrupt: Corruption {
                at: std::env::var("OTS_TEST_CORRUPT_UPLOAD_AT")
                    .ok()
                    .and_then(|v| v.parse().ok()),
            },
        }
    }

    pub fn read(&mut self, req: &ReadRequest) -> Result<(Bytes, Option<String>), String> {
        let key = (req.task.clone(), req.attempt, req.name.clone());
        if self.current.as_ref().is_none_or(|c| c.key != key) {
            self.current = None;
            let rel = crate::protocol::check::relative_path(&req.name)
                .ok_or_else(|| format!("result file name {:?} is not a relative path", req.name))?;
            let path = results_dir(&self.state_dir, &req.task, req.attempt).join(rel);
            // Never through a symlink a conductor left behind.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            self.current = Some(Current {
                key,
                file,
                hasher: Sha256::new(),
                hashed: 0,
            });
        }
        let c = self.current.as_mut().expect("opened above");
        let meta = c
            .file
            .metadata()
            .map_err(|e| format!("cannot stat result file {}: {e}", req.name))?;
        if !meta.is_file() {
            return Err(format!("result file {} is not a regular file", req.name));
        }
        if meta.len() != req.size || mtime_ns(&meta) != req.mtime_ns {
            return Err(format!(
                "result file {} changed on disk after the task finished ({} bytes when collected, {} now; or modified since): not sent, so nothing mixed is stored",
                req.name,
                req.size,
                meta.len()
            ));
        }
        let end = req.offset.saturating_add(req.len).min(req.size);
        // Hash what comes before this read, if a resume skipped it.
        let mut buf = Vec::new();
        while c.hashed < req.offset.min(req.size) {
            buf.resize(HASH_BUF, 0);
            let n = (req.offset - c.hashed).min(HASH_BUF as u64) as usize;
            c.file
                .read_exact_at(&mut buf[..n], c.hashed)
                .map_err(|e| format!("cannot read result file {}: {e}", req.name))?;
            c.hasher.update(&buf[..n]);
            c.hashed += n as u64;
        }
        let len = end.saturating_sub(req.offset) as usize;
        let mut data = read_exact_at_uninit(&c.file, len, req.offset)
            .map_err(|e| format!("cannot read result file {}: {e}", req.name))?;
        if req.offset == c.hashed {
            c.hasher.update(&data);
            c.hashed = end;
        }
        let digest = (c.hashed == req.size).then(|| hex::encode(c.hasher.clone().finalize()));
        if let Some(at) = self.corrupt.at {
            if (req.offset..end).contains(&at) {
                data[(at - req.offset) as usize] ^= 0xff;
                self.corrupt.at = None;
            }
        }
        Ok((Bytes::from(data), digest))
    }
}

/// Reads exactly `len` bytes at `offset` into a new buffer the kernel
/// fills: no zeroing first (a chunk is up to 1 MiB, and zeroing it cost
/// the worker about 0.07 s of CPU per GiB uploaded).
fn read_exact_at_uninit(file: &File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut data: Vec<u8> = Vec::with_capacity(len);
    while data.len() < len {
        let at = offset
            .checked_add(data.len() as u64)
            .and_then(|o| i64::try_from(o).ok())
            .ok_or_else(|| std::io::Error::other("offset past what a file can hold"))?;
        let spare = data.spare_capacity_mut();
        // SAFETY: pread writes at most `spare.len()` bytes into the spare
        // capacity (valid, writable memory this Vec owns) and returns how
        // many it wrote; only those are then counted as initialised.
        let n = unsafe {
            nix::libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at)
        };
        match n {
            n if n > 0 => {
                // SAFETY: the first `n` spare bytes were just written.
                unsafe { data.set_len(data.len() + n as usize) }
            }
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(data)
}

/// Runs a reader on its own thread. Unbounded channels: the session asks
/// for at most its read-ahead window at a time.
pub fn spawn(
    state_dir: &Path,
) -> (
    mpsc::UnboundedSender<ReadRequest>,
    mpsc::UnboundedReceiver<ReadDone>,
) {
    let mut reader = Reader::new(state_dir);
    crate::jobs::spawn("ots-file-reader", move |req: ReadRequest| {
        let result = reader.read(&req);
        Some(ReadDone {
            task: req.task,
            attempt: req.attempt,
            name: req.name,
            offset: req.offset,
            epoch: req.epoch,
            result,
        })
    })
}
