//! `[limits]` of `conf/server.toml` and the scheduler's and sockets'
//! limits made of it.

use crate::settings::{invalid, ConfigError};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[limits]` of `conf/server.toml`: every bound on what a peer can make
/// the server hold or do. README's Limits table says what a peer sees at
/// each one.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerLimits {
    /// Connections per endpoint (control, events), handshaking or not.
    /// Also capped at start to fit the process's file descriptor limit.
    pub max_connections: usize,
    /// A connection must finish the ZMTP handshake within this.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub handshake_timeout_ms: u64,
    /// A control connection that sends nothing for this long is closed
    /// (workers heartbeat every second, clients poll every second).
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub idle_timeout_ms: u64,
    /// Messages queued to one peer; past it, sends to it are dropped and
    /// counted (`send_dropped_peer_busy`), never waited for.
    pub peer_send_queue: usize,
    /// …and bytes queued to one peer (the memory a peer that stops
    /// reading can hold); past it, the same.
    pub peer_send_queue_bytes: usize,
    /// Received messages waiting for the scheduler; when full, reading
    /// pauses (TCP back-pressure), fairly across peers.
    pub inbound_queue: usize,
    /// …and their bytes: what a burst from many workers can hold in the
    /// server's memory however large their messages are.
    pub inbound_queue_bytes: usize,
    /// Unfinished tasks in all; a submit past it gets `limit_reached`.
    pub max_open_tasks: usize,
    /// …and per user (with security): a user's submit past its own quota
    /// is refused naming it; held below `max_open_tasks` (lowered to
    /// `max_open_tasks - 1` if set higher), so no single user can fill the
    /// server's bound.
    pub max_open_tasks_per_owner: usize,
    /// Unfinished testruns per user.
    pub max_open_runs_per_owner: usize,
    /// Stored log bytes per task attempt; lines past it are dropped and
    /// counted.
    pub max_task_log_bytes: u64,
    /// Separate runs of received log line numbers per task attempt.
    pub max_log_gaps: usize,
    /// Largest result file, and all result files of one task attempt.
    pub max_file_bytes: u64,
    pub max_task_file_bytes: u64,
    /// All stored result files together (the result area's quota): an
    /// offer that would exceed it is refused before any byte is sent.
    pub max_stored_file_bytes: u64,
    /// Credit one upload gets at most: bytes a worker may send ahead of
    /// what the server has written.
    pub file_window_bytes: u64,
    /// Credit all uploads together hold at most: the memory between the
    /// sockets and the disk, whatever the number of uploads.
    pub file_buffer_bytes: u64,
    /// Worker refusals of one task (busy, expired) before it ends in ERROR.
    pub max_refusals: u32,
    /// Worker names the registry holds; a new name past it is refused.
    pub max_workers: usize,
}

impl Default for ServerLimits {
    fn default() -> Self {
        let s = crate::server::scheduler::SchedulerLimits::default();
        let t = crate::transport::SocketLimits::default();
        ServerLimits {
            max_connections: t.max_connections,
            handshake_timeout_ms: t.handshake_timeout.as_millis() as u64,
            idle_timeout_ms: 120_000,
            peer_send_queue: t.peer_send_queue,
            peer_send_queue_bytes: t.peer_send_bytes,
            inbound_queue: 4096,
            inbound_queue_bytes: 16 * 1024 * 1024,
            max_open_tasks: s.max_open_tasks,
            max_open_tasks_per_owner: s.max_open_tasks_per_owner,
            max_open_runs_per_owner: s.max_open_runs_per_owner,
            max_task_log_bytes: s.max_task_log_bytes,
            max_log_gaps: s.max_log_gaps,
            max_file_bytes: s.max_file_bytes,
            max_task_file_bytes: s.max_task_file_bytes,
            max_stored_file_bytes: s.max_stored_file_bytes,
            file_window_bytes: s.file_window_bytes,
            file_buffer_bytes: s.file_buffer_bytes,
            max_refusals: s.max_refusals,
            max_workers: s.max_workers,
        }
    }
}

impl ServerLimits {
    pub fn scheduler(&self) -> crate::server::scheduler::SchedulerLimits {
        crate::server::scheduler::SchedulerLimits {
            max_open_tasks: self.max_open_tasks,
            // Below the server's bound whatever is configured: no single
            // user may fill it.
            max_open_tasks_per_owner: self
                .max_open_tasks_per_owner
                .min(self.max_open_tasks.saturating_sub(1).max(1)),
            max_open_runs_per_owner: self.max_open_runs_per_owner,
            max_task_log_bytes: self.max_task_log_bytes,
            max_log_gaps: self.max_log_gaps,
            max_file_bytes: self.max_file_bytes,
            max_task_file_bytes: self.max_task_file_bytes,
            max_stored_file_bytes: self.max_stored_file_bytes,
            file_window_bytes: self.file_window_bytes,
            file_buffer_bytes: self.file_buffer_bytes,
            max_refusals: self.max_refusals,
            max_workers: self.max_workers,
        }
    }

    pub fn sockets(&self) -> crate::transport::SocketLimits {
        crate::transport::SocketLimits {
            max_message_bytes: crate::transport::MAX_WIRE_MESSAGE_BYTES,
            max_connections: self.max_connections,
            handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
            peer_send_queue: self.peer_send_queue,
            peer_send_bytes: self.peer_send_queue_bytes,
        }
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let positive: [(&'static str, u64); 18] = [
            ("limits.max_workers", self.max_workers as u64),
            (
                "limits.peer_send_queue_bytes",
                self.peer_send_queue_bytes as u64,
            ),
            ("limits.max_connections", self.max_connections as u64),
            ("limits.handshake_timeout_ms", self.handshake_timeout_ms),
            ("limits.idle_timeout_ms", self.idle_timeout_ms),
            ("limits.peer_send_queue", self.peer_send_queue as u64),
            ("limits.inbound_queue", self.inbound_queue as u64),
            (
                "limits.inbound_queue_bytes",
                self.inbound_queue_bytes as u64,
            ),
            ("limits.max_open_tasks", self.max_open_tasks as u64),
            (
                "limits.max_open_tasks_per_owner",
                self.max_open_tasks_per_owner as u64,
            ),
            (
                "limits.max_open_runs_per_owner",
                self.max_open_runs_per_owner as u64,
            ),
            ("limits.max_task_log_bytes", self.max_task_log_bytes),
            ("limits.max_log_gaps", self.max_log_gaps as u64),
            ("limits.max_file_bytes", self.max_file_bytes),
            ("limits.max_task_file_bytes", self.max_task_file_bytes),
            ("limits.max_stored_file_bytes", self.max_stored_file_bytes),
            ("limits.file_window_bytes", self.file_window_bytes),
            ("limits.file_buffer_bytes", self.file_buffer_bytes),
        ];
        for (key, v) in positive {
            if v == 0 {
                return Err(invalid(key, v, "must be at least 1"));
            }
        }
        if self.max_file_bytes > crate::protocol::limits::MAX_FILE_BYTES {
            return Err(invalid(
                "limits.max_file_bytes",
                self.max_file_bytes,
                format!(
                    "must be at most {} (the protocol's limit)",
                    crate::protocol::limits::MAX_FILE_BYTES
                ),
            ));
        }
        Ok(())
    }
}
