//! The session's log buffer: lines from the conductor held (bounded in
//! lines and bytes, the oldest shed and counted when full), packed into
//! batches of at most [`MAX_LOG_BATCH_BYTES`](super::MAX_LOG_BATCH_BYTES),
//! and batches the socket would not take put back in order.

use crate::delivery::Policy;
use crate::protocol::logtext::{PackedText, MAX_LOG_PARTS};
use crate::protocol::*;
use crate::worker::session::{Action, Session, MAX_LOG_BATCH_BYTES};
use crate::worker::task::channel::charge;
use bytes::Bytes;
use std::time::Instant;

/// Packed lines of one task waiting to be sent, numbered from `first`.
#[derive(Debug)]
pub(super) struct Piece {
    pub(super) task: TaskId,
    pub(super) attempt: u32,
    pub(super) first: u64,
    pub(super) text: PackedText,
}

impl Session {
    /// A message the shell could not send because the server's queue was
    /// full: a best-effort one is dropped here and counted.
    /// Log batches the socket could not take (the server reads slower than
    /// the conductor prints), in the order they were made: their lines go
    /// back to the front of the buffer, to be sent at the next flush. The
    /// buffer's bounds still hold (the oldest go first, counted).
    pub fn requeue_unsent_logs(&mut self, now: Instant, batches: Vec<(Body, Option<Bytes>)>) {
        for (body, raw) in batches.into_iter().rev() {
            let Body::LogPacked {
                task,
                attempt,
                parts,
            } = body
            else {
                continue;
            };
            if !self.is_current(&task, attempt) {
                continue; // the task was closed meanwhile; dropped on purpose
            }
            if self.slot.as_ref().is_some_and(|s| s.log_full) {
                let lines: u64 = parts.iter().map(|p| u64::from(p.count)).sum();
                self.stats.log_lines_not_sent_log_full += lines;
                continue;
            }
            let raw = raw.unwrap_or_default();
            let mut end = raw.len();
            for p in parts.into_iter().rev() {
                let start = end.saturating_sub(p.bytes as usize);
                let piece = Piece {
                    task: task.clone(),
                    attempt,
                    first: p.first,
                    text: PackedText {
                        stream: p.stream,
                        count: p.count,
                        text: raw[start..end].to_vec(),
                    },
                };
                end = start;
                self.log_bytes += charge(&piece.text);
                self.log_lines += piece.text.count as usize;
                self.logs.push_front(piece);
            }
        }
        self.shed_oldest_logs(0, 0);
        if !self.logs.is_empty() {
            self.oldest_log_at = Some(now);
        }
    }

    pub fn note_unsent(&mut self, body: &Body) {
        self.stats.unsent_dropped += 1;
        if let Body::LogPacked { task, parts, .. } = body {
            let lines: u64 = parts.iter().map(|p| u64::from(p.count)).sum();
            self.stats.log_lines_dropped += lines;
            *self.dropped_per_task.entry(task.clone()).or_default() += lines;
        }
    }

    /// Something from the running task.
    /// Drops the oldest buffered lines (each counted, and reported as lost)
    /// until `lines` more lines of `bytes` more bytes fit the buffer's
    /// bounds.
    pub(super) fn shed_oldest_logs(&mut self, lines: usize, bytes: usize) {
        while !self.logs.is_empty()
            && (self.log_lines + lines > self.cfg.log_buffer_lines
                || self.log_bytes + bytes > self.cfg.log_buffer_bytes)
        {
            if let Some(old) = self.logs.pop_front() {
                let n = old.text.count as usize;
                self.log_bytes -= charge(&old.text);
                self.log_lines -= n;
                self.stats.log_lines_dropped += n as u64;
                *self.dropped_per_task.entry(old.task).or_default() += n as u64;
            }
        }
    }

    /// Queues one log line for sending. Bounded in lines and in bytes: the
    /// oldest go first, and each one dropped is counted (the server
    /// reports the gap).
    pub(super) fn buffer_log(&mut self, now: Instant, piece: Piece) {
        let (lines, bytes) = (piece.text.count as usize, charge(&piece.text));
        self.shed_oldest_logs(lines, bytes);
        self.log_bytes += bytes;
        self.log_lines += lines;
        self.logs.push_back(piece);
        self.oldest_log_at.get_or_insert(now);
    }

    pub(super) fn flush_logs(&mut self, now: Instant, actions: &mut Vec<Action>, all: bool) {
        let due = all
            || self.log_lines >= self.cfg.log_batch_lines
            || self
                .oldest_log_at
                .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.log_batch_delay);
        if !due {
            return;
        }
        while let Some(front) = self.logs.front() {
            let (task, attempt) = (front.task.clone(), front.attempt);
            // One message: pieces of this channel, up to the batch size;
            // a piece continuing the one before it (same stream, next
            // line number) extends its part.
            let mut parts: Vec<LogPart> = Vec::new();
            let mut raw: Vec<u8> = Vec::new();
            while let Some(p) = self.logs.front() {
                if p.task != task || p.attempt != attempt {
                    break;
                }
                let fits = raw.len() + p.text.text.len() <= MAX_LOG_BATCH_BYTES;
                let continues = parts.last().is_some_and(|l| {
                    l.stream == p.text.stream
                        && l.last() + 1 == p.first
                        && l.count.checked_add(p.text.count).is_some()
                });
                if !parts.is_empty() && (!fits || (!continues && parts.len() >= MAX_LOG_PARTS)) {
                    break;
                }
                let p = self.logs.pop_front().expect("front");
                self.log_bytes -= charge(&p.text);
                self.log_lines -= p.text.count as usize;
                raw.extend_from_slice(&p.text.text);
                match parts.last_mut() {
                    Some(l) if continues => {
                        l.count += p.text.count;
                        l.bytes += p.text.text.len() as u32;
                    }
                    _ => parts.push(LogPart {
                        first: p.first,
                        count: p.text.count,
                        stream: p.text.stream,
                        bytes: p.text.text.len() as u32,
                    }),
                }
            }
            let body = Body::LogPacked {
                task: task.clone(),
                attempt,
                parts,
            };
            let raw = Some(Bytes::from(raw));
            if self.cfg.delivery.log == Policy::GuaranteeNothing {
                self.send(
                    now,
                    actions,
                    Header::best_effort(Class::Log, Some(&task)),
                    body,
                    raw,
                );
            } else {
                self.deliver(now, &task, attempt, body, raw);
            }
            if !all && self.log_lines < self.cfg.log_batch_lines {
                break;
            }
        }
        self.oldest_log_at = if self.logs.is_empty() {
            None
        } else {
            Some(now)
        };
    }

    pub fn buffered_log_bytes(&self) -> usize {
        self.log_bytes
    }

    pub fn buffered_log_lines(&self) -> usize {
        self.log_lines
    }
}
