//! Files between a client and the server, both ways, the way result files
//! travel (PROTOCOL.md §7.7): input files uploaded under the server's
//! credit, stored files downloaded with a window of reads in flight (the
//! client's credit), each resumable from what is already there and
//! verified against its SHA-256. Used by `ots-submit` and by ots-worker,
//! which fetches a task's input files with its own key.

use super::{Client, ClientError};
use crate::protocol::{Body, Header, InputFile, TaskId};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Bytes per read when downloading (the server's cap per `get_*`).
pub const READ_BYTES: u64 = crate::protocol::limits::MAX_READ_BYTES;
/// Reads in flight while downloading: the client's credit.
pub const READ_WINDOW: usize = 8;
/// Bytes per chunk when uploading an input file.
pub const CHUNK_BYTES: u64 = 1024 * 1024;

/// What is downloaded.
#[derive(Clone, Debug)]
pub enum Source {
    Result { task: TaskId, name: String },
    Input { sha256: String },
}

/// Progress of one transfer, for a bar or a line.
pub trait Progress {
    fn start(&mut self, what: &str, size: u64, from: u64);
    fn advance(&mut self, bytes: u64);
    fn finish(&mut self);
}

/// No progress shown.
pub struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: u64, _: u64) {}
    fn advance(&mut self, _: u64) {}
    fn finish(&mut self) {}
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError + '_ {
    move |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// SHA-256 and size of a local file, read once (off the async threads).
pub async fn hash_file(path: &Path) -> Result<(String, u64), ClientError> {
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut f = std::fs::File::open(&p).map_err(io_err(&p))?;
        let mut h = Sha256::new();
        let n = std::io::copy(&mut f, &mut h).map_err(io_err(&p))?;
        Ok((hex::encode(h.finalize()), n))
    })
    .await
    .map_err(|e| ClientError::Protocol(format!("hashing thread failed: {e}")))?
}

impl Client {
    async fn send_with_raw(&mut self, body: Body, raw: Option<Bytes>) -> Result<(), ClientError> {
        let header = Header::best_effort(body.class(), None);
        let mut frames = crate::protocol::encode(&header, &body, raw);
        if let Some(channel) = self.channel.as_mut() {
            frames = channel.seal(&frames);
        }
        // The socket's queue is bounded: a full one is waited out here
        // (this is the client's own upload; nothing else waits on it).
        let deadline = tokio::time::Instant::now() + self.timeout;
        let msg = crate::transport::to_message(frames);
        loop {
            match crate::transport::send_bounded(&mut self.socket, msg.clone(), self.timeout).await
            {
                Ok(()) => return Ok(()),
                Err(crate::transport::TransportError::PeerBusy)
                    if tokio::time::Instant::now() < deadline =>
                {
                    // The queue drains into TCP; wait a moment rather
                    // than spin on it.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(_) => {
                    return Err(ClientError::Unreachable {
                        endpoint: self.endpoint.clone(),
                        timeout: self.timeout,
                    })
                }
            }
        }
    }

    /// Waits for the next message answering `request` (an error becomes
    /// `Refused`); `None` past the deadline.
    async fn answer_to(
        &mut self,
        request: u64,
    ) -> Result<Option<(Body, Option<Bytes>)>, ClientError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let Some(env) = self.recv_envelope(deadline).await? else {
                return Ok(None);
            };
            match env.body.request() {
                Some(r) if r == request => {
                    if let Body::Error { code, message, .. } = env.body {
                        return Err(ClientError::Refused { code, message });
                    }
                    return Ok(Some((env.body, env.raw)));
                }
                _ => {} // late answers to earlier requests
            }
        }
    }

    /// Uploads the local file at `path` as an input file (stored once per
    /// content: a file the server has is not sent again; an upload cut
    /// short continues where the server's copy ends).
    pub async fn upload_input(
        &mut self,
        name: &str,
        path: &Path,
        progress: &mut (dyn Progress + Send),
    ) -> Result<InputFile, ClientError> {
        let (sha256, size) = hash_file(path).await?;
        let mut file = std::fs::File::open(path).map_err(io_err(path))?;
        let request = self.next_request;
        self.next_request += 1;
        let offer = Body::InputOffer {
            request,
            sha256: sha256.clone(),
            size,
        };
        self.send_with_raw(offer.clone(), None).await?;
        let mut next = 0u64;
        let mut until = 0u64;
        let mut started = false;
        let mut stalls = 0;
        loop {
            let Some((body, _)) = self.answer_to(request).await? else {
                // Nothing for a whole timeout: ask again where it stands.
                stalls += 1;
                if stalls > 3 {
                    return Err(ClientError::Unreachable {
                        endpoint: self.endpoint.clone(),
                        timeout: self.timeout,
                    });
                }
                self.send_with_raw(offer.clone(), None).await?;
                continue;
            };
            stalls = 0;
            match body {
                Body::InputStored { size: stored, .. } => {
                    if !started {
                        progress.start(name, size, size);
                    }
                    progress.finish();
                    if stored != size {
                        return Err(ClientError::Protocol(format!(
                            "the server stored {stored} bytes of input {name}, not {size}"
                        )));
                    }
                    return Ok(InputFile {
                        name: name.to_string(),
                        size,
                        sha256,
                    });
                }
                Body::InputCredit {
                    have,
                    until: u,
                    resume,
                    ..
                } => {
                    if resume {
                        next = have.min(size);
                        if !started {
                            progress.start(name, size, next);
                            started = true;
                        }
                    }
                    until = until.max(u.min(size));
                    if resume && next == size {
                        let end = Body::InputEnd {
                            request,
                            sha256: sha256.clone(),
                            size,
                        };
                        self.send_with_raw(end, None).await?;
                        continue;
                    }
                    let mut sent_any = false;
                    while next < until {
                        let len = CHUNK_BYTES.min(until - next);
                        let mut buf = vec![0u8; len as usize];
                        file.seek(SeekFrom::Start(next)).map_err(io_err(path))?;
                        file.read_exact(&mut buf).map_err(io_err(path))?;
                        let chunk = Body::InputChunk {
                            request,
                            sha256: sha256.clone(),
                            offset: next,
                        };
                        self.send_with_raw(chunk, Some(Bytes::from(buf))).await?;
                        next += len;
                        progress.advance(len);
                        sent_any = true;
                    }
                    if sent_any && next == size {
                        let end = Body::InputEnd {
                            request,
                            sha256: sha256.clone(),
                            size,
                        };
                        self.send_with_raw(end, None).await?;
                    }
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected input_credit or input_stored, got {}",
                        other.kind()
                    )))
                }
            }
        }
    }

    /// Downloads `source` from byte `from` to `size` with up to
    /// [`READ_WINDOW`] reads in flight, handing the bytes to `sink` in
    /// order. A read the server is too busy for is asked again.
    pub async fn download(
        &mut self,
        source: &Source,
        from: u64,
        size: u64,
        sink: &mut (dyn FnMut(&Bytes) -> Result<(), ClientError> + Send),
    ) -> Result<(), ClientError> {
        let mut next = from; // next offset to ask for
        let mut done = from; // bytes handed to the sink
        let mut asked: BTreeMap<u64, u64> = BTreeMap::new(); // request → offset
        let mut arrived: BTreeMap<u64, Bytes> = BTreeMap::new(); // offset → bytes
        let mut again: Vec<u64> = Vec::new(); // offsets to ask for again
        while done < size {
            while asked.len() < READ_WINDOW && (next < size || !again.is_empty()) {
                let offset = again.pop().unwrap_or_else(|| {
                    let o = next;
                    next = (next + READ_BYTES).min(size);
                    o
                });
                let request = self.next_request;
                self.next_request += 1;
                let max = READ_BYTES.min(size - offset);
                let body = match source {
                    Source::Result { task, name } => Body::GetFile {
                        request,
                        task: task.clone(),
                        name: name.clone(),
                        offset,
                        max,
                    },
                    Source::Input { sha256 } => Body::GetInput {
                        request,
                        sha256: sha256.clone(),
                        offset,
                        max,
                    },
                };
                self.send_with_raw(body, None).await?;
                asked.insert(request, offset);
            }
            let deadline = tokio::time::Instant::now() + self.timeout;
            let Some(env) = self.recv_envelope(deadline).await? else {
                return Err(ClientError::Unreachable {
                    endpoint: self.endpoint.clone(),
                    timeout: self.timeout,
                });
            };
            let Some(offset) = env.body.request().and_then(|r| asked.remove(&r)) else {
                continue; // not ours (a late answer)
            };
            match env.body {
                Body::Data { .. } => {
                    let raw = env.raw.unwrap_or_default();
                    let want = READ_BYTES.min(size - offset);
                    if (raw.len() as u64) < want {
                        return Err(ClientError::Protocol(format!(
                            "the server sent {} bytes at offset {offset}, expected {want}: the file is shorter than its {size} bytes",
                            raw.len()
                        )));
                    }
                    arrived.insert(offset, raw.slice(..want as usize));
                }
                Body::Error {
                    code: crate::protocol::ErrorCode::LimitReached,
                    ..
                } => {
                    // The server has enough reads in flight: a short pause,
                    // then ask again (not a synchronisation).
                    again.push(offset);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Body::Error { code, message, .. } => {
                    return Err(ClientError::Refused { code, message })
                }
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected data, got {}",
                        other.kind()
                    )))
                }
            }
            while let Some(bytes) = arrived.remove(&done) {
                sink(&bytes)?;
                done += bytes.len() as u64;
            }
        }
        Ok(())
    }

    /// Downloads `source` (`size` bytes, `sha256`) to `path`: resumes a
    /// `.part` file left by an interrupted download, verifies the whole
    /// file's hash, then renames it into place. A complete file already
    /// at `path` with the right hash is not downloaded again. Returns the
    /// bytes downloaded.
    pub async fn download_to(
        &mut self,
        source: &Source,
        size: u64,
        sha256: &str,
        path: &Path,
        progress: &mut (dyn Progress + Send),
    ) -> Result<u64, ClientError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        if path.is_file() && hash_file(path).await? == (sha256.to_string(), size) {
            return Ok(0);
        }
        let part = part_path(path);
        for attempt in 0..2 {
            // What an earlier, interrupted download left: hashed again,
            // kept if it is not longer than the file.
            let mut hasher = Sha256::new();
            let mut have = 0u64;
            if attempt == 0 {
                if let Ok(mut f) = std::fs::File::open(&part) {
                    have = std::io::copy(&mut f, &mut hasher).map_err(io_err(&part))?;
                }
                if have > size {
                    hasher = Sha256::new();
                    have = 0;
                }
            }
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&part)
                .map_err(io_err(&part))?;
            out.set_len(have).map_err(io_err(&part))?;
            out.seek(SeekFrom::Start(have)).map_err(io_err(&part))?;
            let what = match source {
                Source::Result { task, name } => format!("{task}/{name}"),
                Source::Input { sha256 } => format!("input {}", &sha256[..12.min(sha256.len())]),
            };
            progress.start(&what, size, have);
            let part_ref = part.clone();
            let hashing = Hashing::start(hasher)?;
            let mut written = have;
            let mut sink = |bytes: &Bytes| {
                out.write_all(bytes).map_err(io_err(&part_ref))?;
                let before = written;
                written += bytes.len() as u64;
                // A large download goes to disk as it comes, not all at
                // the final sync.
                crate::durable::flush_behind(&out, before, written);
                hashing.add(bytes.clone());
                progress.advance(bytes.len() as u64);
                Ok(())
            };
            let fetched = self.download(source, have, size, &mut sink).await;
            let actual = hashing.finish()?;
            fetched?;
            out.sync_all().map_err(io_err(&part))?;
            progress.finish();
            if actual == sha256 {
                std::fs::rename(&part, path).map_err(io_err(path))?;
                return Ok(size - have);
            }
            // Damaged in transit or on disk: once more from the start.
            let _ = std::fs::remove_file(&part);
            if attempt == 1 {
                return Err(ClientError::Protocol(format!(
                    "{} arrived with SHA-256 {actual}, expected {sha256} (twice); not kept",
                    path.display()
                )));
            }
        }
        unreachable!("returns within two attempts")
    }
}

/// A download's SHA-256, computed on a thread of its own while the bytes
/// arrive: hashing is the largest cost of a fetch (about 0.6 s of CPU per
/// GiB), and on the receiving thread it came on top of decrypting and
/// writing. At most [`Hashing::QUEUED`] chunks wait for it; past that the
/// receiving thread waits, so memory stays bounded whatever the pace.
struct Hashing {
    chunks: std::sync::mpsc::SyncSender<Bytes>,
    thread: std::thread::JoinHandle<String>,
}

impl Hashing {
    const QUEUED: usize = 4;

    fn start(mut hasher: Sha256) -> Result<Hashing, ClientError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(Self::QUEUED);
        let thread = std::thread::Builder::new()
            .name("ots-fetch-hash".into())
            .spawn(move || {
                for chunk in rx {
                    hasher.update(&chunk);
                }
                hex::encode(hasher.finalize())
            })
            .map_err(|e| ClientError::Hashing(format!("no thread for it: {e}")))?;
        Ok(Hashing { chunks: tx, thread })
    }

    fn add(&self, chunk: Bytes) {
        let tx = &self.chunks;
        match tx.try_send(chunk) {
            Ok(()) => {}
            Err(std::sync::mpsc::TrySendError::Full(chunk)) => {
                // The hasher is behind: wait for it (back-pressure), off
                // the runtime's worker threads where there are any.
                let multi = tokio::runtime::Handle::try_current().is_ok_and(|h| {
                    h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
                });
                if multi {
                    let _ = tokio::task::block_in_place(|| tx.send(chunk));
                } else {
                    let _ = tx.send(chunk);
                }
            }
            // The thread is gone (it panicked): `finish` says so.
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => {}
        }
    }

    /// The hex digest of everything added.
    fn finish(self) -> Result<String, ClientError> {
        drop(self.chunks); // ends the thread's loop
        self.thread
            .join()
            .map_err(|_| ClientError::Hashing("its thread panicked".into()))
    }
}

/// Where an unfinished download of `path` is kept.
pub fn part_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    path.with_file_name(name)
}
