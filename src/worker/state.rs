//! The worker's durable state: its session id, the outbox of
//! unacknowledged mandatory messages (result files included) and the task
//! it owns, in SQLite under its state directory. A worker restarted after a
//! task finished still delivers that task's report and files; one restarted
//! in the middle of a task reports it as interrupted.
//!
//! Saving is a diff against what was last written, in one transaction,
//! before the shell acts on the session's output.

use crate::delivery::outbox::SavedMessage;
use crate::delivery::DedupWindow;
use crate::durable::{lock_dir, open_sqlite, LockFailure, OpenFailure};
use crate::protocol::Body;
use crate::worker::session::{SavedSession, SavedSlot};
use nix::fcntl::Flock;
use rusqlite::{params, Connection, OptionalExtension};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

const SCHEMA_VERSION: i64 = 1;

/// seq, task, attempt, body, raw — as stored.
type OutboxRow = (i64, Option<String>, Option<u32>, Vec<u8>, Option<Vec<u8>>);

/// Why the worker's state directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WorkerStateError {
    #[error("worker state directory {0} is in use by another ots-worker; give each worker its own --state-dir")]
    Locked(PathBuf),
    #[error("worker state directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("worker state {path} is not an ots worker database ({reason}); move it away")]
    Foreign { path: PathBuf, reason: String },
    #[error("worker state {path}: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("worker state {path}: {what} is corrupt ({reason}); move the state directory away")]
    Corrupt {
        path: PathBuf,
        what: String,
        reason: String,
    },
}

/// The open, locked worker database.
pub struct WorkerStore {
    conn: Connection,
    path: PathBuf,
    _lock: Flock<File>,
    /// What is on disk now, to write only differences.
    saved_seqs: BTreeSet<u64>,
    saved_slot: Option<Vec<u8>>,
    saved_meta: Vec<(String, String)>,
}

impl WorkerStore {
    /// Locks and opens `dir/worker.db`; returns the saved session, if any.
    pub fn open(dir: &Path) -> Result<(WorkerStore, Option<SavedSession>), WorkerStateError> {
        let io = |source| WorkerStateError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = match lock_dir(dir) {
            Ok(l) => l,
            Err(LockFailure::Held(_)) => return Err(WorkerStateError::Locked(dir.to_path_buf())),
            Err(LockFailure::Io(e)) => return Err(io(e)),
        };
        let path = dir.join("worker.db");
        let sql = |source| WorkerStateError::Sqlite {
            path: path.clone(),
            source,
        };
        let (conn, tables) = match open_sqlite(&path) {
            Ok(opened) => opened,
            Err(OpenFailure::NotSqlite) => {
                return Err(WorkerStateError::Foreign {
                    path,
                    reason: "not a SQLite database".into(),
                })
            }
            Err(OpenFailure::Sqlite(e)) => return Err(sql(e)),
        };
        let mut store = WorkerStore {
            conn,
            path: path.clone(),
            _lock: lock,
            saved_seqs: BTreeSet::new(),
            saved_slot: None,
            saved_meta: Vec::new(),
        };
        if tables.is_empty() {
            store
                .conn
                .execute_batch(&format!(
                    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
                     CREATE TABLE outbox (seq INTEGER PRIMARY KEY, task TEXT, attempt INTEGER, body BLOB NOT NULL, raw BLOB);
                     CREATE TABLE slot (id INTEGER PRIMARY KEY CHECK (id = 1), body BLOB NOT NULL);
                     INSERT INTO meta VALUES ('schema_version', '{SCHEMA_VERSION}');"
                ))
                .map_err(sql)?;
            return Ok((store, None));
        }
        if !tables.iter().any(|t| t == "meta") {
            return Err(WorkerStateError::Foreign {
                path,
                reason: format!("tables {tables:?} but no meta table"),
            });
        }
        let saved = store.load()?;
        Ok((store, saved))
    }

    fn corrupt(&self, what: impl Into<String>, reason: impl ToString) -> WorkerStateError {
        WorkerStateError::Corrupt {
            path: self.path.clone(),
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    fn load(&mut self) -> Result<Option<SavedSession>, WorkerStateError> {
        let path = self.path.clone();
        let sql = |source| WorkerStateError::Sqlite {
            path: path.clone(),
            source,
        };
        let meta: Vec<(String, String)> = self
            .conn
            .prepare("SELECT key, value FROM meta ORDER BY key")
            .and_then(|mut s| s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
            .map_err(sql)?;
        let get = |k: &str| {
            meta.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let version: i64 = get("schema_version")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.corrupt("meta.schema_version", "missing"))?;
        if version != SCHEMA_VERSION {
            return Err(WorkerStateError::Foreign {
                path: self.path.clone(),
                reason: format!("schema version {version}, this ots-worker knows {SCHEMA_VERSION}"),
            });
        }
        let Some(session_id) = get("session") else {
            return Ok(None); // created, never saved
        };
        let next_seq = get("next_seq")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| self.corrupt("meta.next_seq", "missing or not a number"))?;
        let server_dedup: DedupWindow = match get("server_dedup") {
            Some(h) => hex::decode(&h)
                .map_err(|e| e.to_string())
                .and_then(|b| rmp_serde::from_slice(&b).map_err(|e| e.to_string()))
                .map_err(|e| self.corrupt("meta.server_dedup", e))?,
            None => DedupWindow::default(),
        };
        let rows: Vec<OutboxRow> = self
            .conn
            .prepare("SELECT seq, task, attempt, body, raw FROM outbox ORDER BY seq")
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect()
            })
            .map_err(sql)?;
        let mut outbox = Vec::new();
        for (seq, task, attempt, body, raw) in rows {
            let body: Body = rmp_serde::from_slice(&body)
                .map_err(|e| self.corrupt(format!("outbox message {seq}"), e))?;
            outbox.push(SavedMessage {
                seq: seq as u64,
                task,
                attempt,
                body,
                raw: raw.map(Into::into),
            });
        }
        let slot_bytes: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT body FROM slot WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(sql)?;
        let slot: Option<SavedSlot> = match &slot_bytes {
            Some(b) => {
                Some(rmp_serde::from_slice(b).map_err(|e| self.corrupt("the current task", e))?)
            }
            None => None,
        };
        self.saved_seqs = outbox.iter().map(|m| m.seq).collect();
        self.saved_slot = slot_bytes;
        let server_session = get("server_session");
        self.saved_meta = meta;
        Ok(Some(SavedSession {
            session_id,
            next_seq,
            outbox,
            slot,
            server_session,
            server_dedup,
        }))
    }

    /// Writes what changed since the last save, in one transaction.
    pub fn save(&mut self, s: &SavedSession) -> Result<(), WorkerStateError> {
        let mut meta = vec![
            ("next_seq".to_string(), s.next_seq.to_string()),
            ("schema_version".to_string(), SCHEMA_VERSION.to_string()),
            (
                "server_dedup".to_string(),
                hex::encode(rmp_serde::to_vec_named(&s.server_dedup).expect("dedup serialises")),
            ),
            ("session".to_string(), s.session_id.clone()),
        ];
        if let Some(server) = &s.server_session {
            meta.push(("server_session".to_string(), server.clone()));
        }
        meta.sort();
        let slot = s
            .slot
            .as_ref()
            .map(|slot| rmp_serde::to_vec_named(slot).expect("slot serialises"));
        let seqs: BTreeSet<u64> = s.outbox.iter().map(|m| m.seq).collect();
        if meta == self.saved_meta && slot == self.saved_slot && seqs == self.saved_seqs {
            return Ok(());
        }
        let path = self.path.clone();
        let sql = |source| WorkerStateError::Sqlite {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(sql)?;
        for m in s
            .outbox
            .iter()
            .filter(|m| !self.saved_seqs.contains(&m.seq))
        {
            let body = rmp_serde::to_vec_named(&m.body).expect("body serialises");
            tx.execute(
                "INSERT OR REPLACE INTO outbox (seq, task, attempt, body, raw) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![m.seq as i64, m.task, m.attempt, body, m.raw.as_deref()],
            )
            .map_err(sql)?;
        }
        for seq in self.saved_seqs.difference(&seqs) {
            tx.execute("DELETE FROM outbox WHERE seq = ?1", params![*seq as i64])
                .map_err(sql)?;
        }
        if slot != self.saved_slot {
            match &slot {
                Some(b) => tx.execute(
                    "INSERT OR REPLACE INTO slot (id, body) VALUES (1, ?1)",
                    params![b],
                ),
                None => tx.execute("DELETE FROM slot", []),
            }
            .map_err(sql)?;
        }
        if meta != self.saved_meta {
            for (k, v) in &meta {
                tx.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                    params![k, v],
                )
                .map_err(sql)?;
            }
        }
        tx.commit().map_err(sql)?;
        self.saved_seqs = seqs;
        self.saved_slot = slot;
        self.saved_meta = meta;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TaskSpec;

    fn saved(seqs: &[u64], slot: bool) -> SavedSession {
        SavedSession {
            session_id: "s1".into(),
            next_seq: seqs.iter().max().map_or(1, |m| m + 1),
            outbox: seqs
                .iter()
                .map(|&seq| SavedMessage {
                    seq,
                    task: Some("r1.1".into()),
                    attempt: Some(1),
                    body: Body::Ready,
                    raw: Some(bytes::Bytes::from_static(b"chunk")),
                })
                .collect(),
            slot: slot.then(|| SavedSlot {
                spec: TaskSpec {
                    hold: None,
                    on_lease: None,
                    task: "r1.1".into(),
                    run: "r1".into(),
                    attempt: 1,
                    image: "i".into(),
                    packages: vec!["p".into()],
                    timeout_secs: 5,
                    options: Default::default(),
                    ttl_ms: 1000,
                    sent_ms: 0,
                    secrets: Default::default(),
                    inputs: Default::default(),
                    health_check: false,
                    recover: false,
                },
                finished: true,
                aborted: false,
                report: None,
                uploads: Vec::new(),
            }),
            server_session: Some("srv".into()),
            server_dedup: DedupWindow::default(),
        }
    }

    #[test]
    fn the_outbox_and_task_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (mut store, none) = WorkerStore::open(dir.path()).unwrap();
            assert!(none.is_none());
            store.save(&saved(&[3, 4, 5], true)).unwrap();
            store.save(&saved(&[4, 5], true)).unwrap(); // 3 acked
        }
        let (_store, back) = WorkerStore::open(dir.path()).unwrap();
        let back = back.unwrap();
        assert_eq!(back, saved(&[4, 5], true));
    }

    #[test]
    fn two_workers_cannot_share_a_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = WorkerStore::open(dir.path()).unwrap();
        assert!(matches!(
            WorkerStore::open(dir.path()),
            Err(WorkerStateError::Locked(_))
        ));
    }
}
