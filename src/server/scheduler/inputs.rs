//! Input files from clients (PROTOCOL.md §7.7): offered, uploaded under
//! the same credit as result files, stored once per content, owned by the
//! users who uploaded them (a submit names only its user's inputs), and
//! read back by workers; and the client reads of stored files.

use super::uploads::*;
use super::*;
use crate::protocol::logfind::{LogFind, LogFinding};
use crate::server::store::files::{DeskError, FileJob, ReadSource, UploadKey};

/// An input file upload and the client connection it answers to.
#[derive(Debug)]
pub(super) struct InputUpload {
    pub(super) upload: Upload,
    pub(super) peer: PeerId,
    /// The offer's request id: every answer carries it.
    pub(super) request: u64,
}

/// Input files in transfer at once (all clients), at most.
pub const MAX_INPUT_UPLOADS: usize = 64;

/// Input files one user has in transfer at once, at most: one user cannot
/// take every upload slot.
pub const MAX_INPUT_UPLOADS_PER_USER: usize = 16;

/// Client reads of stored files with the desk at once, at most (each up
/// to 1 MiB): more are answered `limit_reached`, retried by clients.
pub const MAX_READS_IN_FLIGHT: usize = 16;
/// `find_in_log`s one user may have on the desk at once (of the reads
/// above): one user's searches never hold every read.
pub const MAX_FINDS_PER_USER: usize = 4;

impl<S: Store> Scheduler<S> {
    pub(super) fn tell_client(&mut self, peer: &PeerId, request: u64, sha256: &str, what: Tell) {
        let sha256 = sha256.to_string();
        let body = match what {
            Tell::Credit {
                have,
                until,
                resume,
            } => Body::InputCredit {
                request,
                sha256,
                have,
                until,
                resume,
            },
            Tell::Stored { size, sha256 } => Body::InputStored {
                request,
                sha256,
                size,
            },
            Tell::Refused { code, message } => Body::Error {
                request: Some(request),
                code,
                message,
                seq: None,
            },
        };
        self.send(peer, None, body, None);
    }

    /// The input files on disk at start (what submits may refer to).
    pub fn set_stored_inputs(&mut self, inputs: Vec<(String, u64)>) {
        for (sha, size) in inputs {
            if self.stored_inputs.insert(sha, size).is_none() {
                self.stored_bytes = self.stored_bytes.saturating_add(size);
            }
        }
    }

    /// Who input files belong to on `peer`: its user (security on), or
    /// everyone alike (security off: every request is allowed).
    pub(super) fn input_owner(&self, peer: &PeerId) -> String {
        self.owner(peer).unwrap_or_default()
    }

    /// Whether the user on `peer` may name stored input `sha256` in a
    /// submit: it uploaded the bytes itself, or it is an operator or
    /// admin (who may read every input back anyway), or security is off.
    pub(super) fn may_use_input(&self, peer: &PeerId, sha256: &str) -> bool {
        !self.cfg.secure
            || self
                .caller_role(peer)
                .is_some_and(|r| r >= crate::security::Role::Operator)
            || self
                .input_owners
                .get(sha256)
                .is_some_and(|o| o.contains(&self.input_owner(peer)))
    }

    pub(super) fn add_input_owner(&mut self, sha256: &str, owner: &str) {
        if self
            .input_owners
            .entry(sha256.to_string())
            .or_default()
            .insert(owner.to_string())
        {
            self.pending
                .input_owners
                .push((sha256.to_string(), owner.to_string()));
        }
    }

    /// `input_offer` and `input_end` from a client. Inputs are owned
    /// (PROTOCOL.md §7.7): an offer of content this user stored before is
    /// answered `input_stored` at once; any other offer — content nobody
    /// stored, or content another user stored — is answered exactly like
    /// a new upload and must carry every byte (checked against the
    /// SHA-256 as it streams, then stored once), so an offer reveals
    /// nothing about other users' files. Uploads are per user and
    /// content: only the same user resumes or takes one over.
    pub(super) fn on_input_offer(
        &mut self,
        peer: &PeerId,
        request: u64,
        sha256: String,
        size: u64,
        end: bool,
    ) {
        let owner = self.input_owner(peer);
        let owns = self
            .input_owners
            .get(&sha256)
            .is_some_and(|o| o.contains(&owner))
            || (!self.cfg.secure && self.stored_inputs.contains_key(&sha256));
        if owns {
            if let Some(stored) = self.stored_inputs.get(&sha256).copied() {
                // The same content this user uploaded before: stored once.
                let answer = if stored == size {
                    Tell::Stored {
                        size,
                        sha256: sha256.clone(),
                    }
                } else {
                    Tell::Refused {
                        code: ErrorCode::Invalid,
                        message: format!(
                            "input file {sha256} is stored with {stored} bytes; offered with {size}"
                        ),
                    }
                };
                self.tell_client(peer, request, &sha256, answer);
                return;
            }
        }
        let key = UploadKey::Input {
            sha256: sha256.clone(),
            owner: owner.clone(),
        };
        match self.input_uploads.get_mut(&key) {
            Some(i) if i.upload.size != size => {
                let message = format!(
                    "input file {sha256} is being uploaded with {} bytes; offered with {size}",
                    i.upload.size
                );
                self.tell_client(
                    peer,
                    request,
                    &sha256,
                    Tell::Refused {
                        code: ErrorCode::Invalid,
                        message,
                    },
                );
                return;
            }
            // The same user on a new connection: it takes its own upload
            // over (nobody else's: the key holds the owner).
            Some(i) => {
                i.peer = peer.clone();
                i.request = request;
            }
            None => {
                let mine = self
                    .input_uploads
                    .keys()
                    .filter(|k| matches!(k, UploadKey::Input { owner: o, .. } if *o == owner))
                    .count();
                let refusal = if self.input_uploads.len() >= MAX_INPUT_UPLOADS {
                    Some((
                        ErrorCode::LimitReached,
                        format!("{MAX_INPUT_UPLOADS} input files are being uploaded; retry later"),
                    ))
                } else if mine >= MAX_INPUT_UPLOADS_PER_USER {
                    Some((
                        ErrorCode::LimitReached,
                        format!("you are uploading {MAX_INPUT_UPLOADS_PER_USER} input files already; finish those first"),
                    ))
                } else {
                    self.size_refusal(&format!("input file {sha256}"), size)
                };
                if let Some((code, message)) = refusal {
                    self.count("inputs_refused", 1);
                    self.tell_client(peer, request, &sha256, Tell::Refused { code, message });
                    return;
                }
                self.input_uploads.insert(
                    key.clone(),
                    InputUpload {
                        upload: Upload {
                            size,
                            ..Upload::default()
                        },
                        peer: peer.clone(),
                        request,
                    },
                );
                self.start_upload(&key, size);
            }
        }
        self.offered(&key, size, end.then_some(sha256));
    }

    /// `input_chunk` from a client: taken only from the connection the
    /// upload answers to.
    pub(super) fn on_input_chunk(
        &mut self,
        now: Instant,
        peer: &PeerId,
        sha256: String,
        offset: u64,
        data: Bytes,
    ) {
        let key = UploadKey::Input {
            sha256,
            owner: self.input_owner(peer),
        };
        if self.input_uploads.get(&key).is_none_or(|i| i.peer != *peer) {
            self.count("file_chunks_unexpected", 1);
            return;
        }
        self.on_chunk(now, &key, offset, data);
    }

    /// `get_input`: a stored input file, read by the desk.
    pub(super) fn read_input(
        &mut self,
        peer: &PeerId,
        request: u64,
        sha256: String,
        offset: u64,
        max: u64,
    ) -> Result<(), (ErrorCode, String)> {
        if !self.stored_inputs.contains_key(&sha256) {
            return Err((
                ErrorCode::BadRequest,
                format!("no input file {sha256} is stored on this server"),
            ));
        }
        self.read_file(peer, request, ReadSource::Input { sha256 }, offset, max)
    }

    /// Whether the desk may take one more client read (a file read or a
    /// log search): refused, and counted, past `MAX_READS_IN_FLIGHT`.
    fn read_slot(&mut self) -> Result<(), (ErrorCode, String)> {
        if self.reads_in_flight >= MAX_READS_IN_FLIGHT {
            self.count("file_reads_busy", 1);
            return Err((
                ErrorCode::LimitReached,
                format!("server busy: {MAX_READS_IN_FLIGHT} file reads in progress; retry"),
            ));
        }
        Ok(())
    }

    /// Hands a client's read to the desk, within the bound on reads in
    /// flight.
    pub(super) fn read_file(
        &mut self,
        peer: &PeerId,
        request: u64,
        source: ReadSource,
        offset: u64,
        max: u64,
    ) -> Result<(), (ErrorCode, String)> {
        self.read_slot()?;
        self.reads_in_flight += 1;
        self.file_job(FileJob::Read {
            peer: peer.clone(),
            request,
            source,
            offset,
            max,
        });
        Ok(())
    }

    /// The per-file limit and the store's quota, for any upload.
    pub(super) fn size_refusal(&self, what: &str, size: u64) -> Option<(ErrorCode, String)> {
        let limits = &self.cfg.limits;
        if size > limits.max_file_bytes {
            return Some((
                ErrorCode::LimitReached,
                format!(
                    "{what} is {size} bytes, over the server's limit of {} (limits.max_file_bytes)",
                    limits.max_file_bytes
                ),
            ));
        }
        if self
            .stored_bytes
            .saturating_add(self.uploading_bytes)
            .saturating_add(size)
            > limits.max_stored_file_bytes
        {
            return Some((
                ErrorCode::StorageFailed,
                format!(
                    "{what} does not fit: the server's file area would exceed {} bytes (limits.max_stored_file_bytes; {} stored, {} being uploaded); free space or raise the limit",
                    limits.max_stored_file_bytes, self.stored_bytes, self.uploading_bytes
                ),
            ));
        }
        None
    }

    /// A `find_in_log`, handed to the file desk like a read (and bounded
    /// with the reads).
    pub(super) fn find_in_log(
        &mut self,
        peer: &PeerId,
        request: u64,
        task: TaskId,
        find: LogFind,
    ) -> Result<(), (ErrorCode, String)> {
        self.read_slot()?;
        let user = self.input_owner(peer);
        if self.finds.values().filter(|u| **u == user).count() >= MAX_FINDS_PER_USER {
            self.count("log_finds_busy", 1);
            return Err((
                ErrorCode::LimitReached,
                format!("you have {MAX_FINDS_PER_USER} log searches in progress; retry when one is answered"),
            ));
        }
        self.finds.insert((peer.clone(), request), user);
        self.reads_in_flight += 1;
        self.file_job(FileJob::FindInLog {
            peer: peer.clone(),
            request,
            task,
            find,
        });
        Ok(())
    }

    /// The desk's answer to a `find_in_log`.
    pub(super) fn answer_find(
        &mut self,
        peer: &PeerId,
        request: u64,
        result: Result<LogFinding, DeskError>,
    ) {
        self.reads_in_flight = self.reads_in_flight.saturating_sub(1);
        self.finds.remove(&(peer.clone(), request));
        match result {
            Ok(found) => self.send(peer, None, Body::LogFound { request, found }, None),
            Err(DeskError::NotFound) => self.send_error(
                peer,
                Some(request),
                ErrorCode::UnknownTask,
                "the task has no log yet".into(),
            ),
            Err(e) => {
                error!(error = %e, "a task log could not be searched");
                self.send_error(peer, Some(request), ErrorCode::StorageFailed, e.to_string())
            }
        }
    }

    /// The connection of an input upload closed: its unused credit goes
    /// back to the pool and the upload is forgotten (the incoming copy
    /// stays on disk: a new offer resumes from it).
    pub(super) fn forget_input_uploads(&mut self, peer: &PeerId) {
        let gone: Vec<UploadKey> = self
            .input_uploads
            .iter()
            .filter(|(_, i)| i.peer == *peer && !i.upload.finishing)
            .map(|(key, _)| key.clone())
            .collect();
        for key in gone {
            self.release_upload(&key);
        }
        self.feed_starved();
    }

    /// A client's read of a stored file, answered from the desk.
    pub(super) fn answer_read(
        &mut self,
        peer: &PeerId,
        request: u64,
        offset: u64,
        result: Result<(Vec<u8>, bool), DeskError>,
    ) {
        match result {
            // `send` counts the bytes against the output budget.
            Ok((bytes, eof)) => self.send(
                peer,
                None,
                Body::Data {
                    request,
                    offset,
                    eof,
                },
                Some(Bytes::from(bytes)),
            ),
            Err(DeskError::NotFound) => self.send_error(
                peer,
                Some(request),
                ErrorCode::UnknownTask,
                "no such file".into(),
            ),
            Err(e) => {
                error!(error = %e, "stored file could not be read");
                self.send_error(peer, Some(request), ErrorCode::StorageFailed, e.to_string())
            }
        }
    }
}
