//! The task's response channel as worker code sees it: opened when the
//! worker accepts a task, consumed by [`ResponseChannel::finish`]. Because
//! `finish` takes the channel by value, posting after teardown does not
//! compile — the bug class the old OTS kept re-introducing.
//!
//! Everything goes through one FIFO to the session, so every line logged
//! before `finish()` is queued before the final report.

use crate::protocol::logtext::PackedText;
use crate::protocol::{Outcome, Stream, TaskId};
use tokio::sync::mpsc;

/// A result file found in the task's results folder when the conductor
/// ended: uploaded from there, never read whole into memory.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultFile {
    /// Relative, `/`-separated path below the results folder.
    pub name: String,
    pub size: u64,
    /// Modification time (ns since the epoch), to notice later changes.
    pub mtime_ns: u64,
}

/// What a running task tells the worker session.
#[derive(Clone, Debug, PartialEq)]
pub enum TaskEvent {
    /// Lines of one stream numbered from `first` (a pipe read's worth
    /// from the conductor, or one line), packed as the server stores them.
    Log {
        task: TaskId,
        attempt: u32,
        first: u64,
        text: PackedText,
    },
    /// Raw console output of a lease's hold at `offset` (best effort).
    ConsoleBytes {
        task: TaskId,
        attempt: u32,
        offset: u64,
        bytes: bytes::Bytes,
    },
    /// A power action of a lease's hold is done (mandatory).
    PowerDone {
        task: TaskId,
        attempt: u32,
        id: u64,
        action: crate::protocol::PowerAction,
        state: String,
        ok: bool,
        message: String,
    },
    Finished {
        task: TaskId,
        attempt: u32,
        outcome: Outcome,
        /// Lines the task produced (the last seq handed out).
        log_lines: u64,
        files: Vec<ResultFile>,
    },
}

/// What the server asks of a lease's hold (in the order it arrived).
#[derive(Clone, Debug, PartialEq)]
pub enum HoldCommand {
    /// Bytes typed into the console by `by`.
    Input {
        by: String,
        stream: String,
        offset: u64,
        bytes: bytes::Bytes,
    },
    Power {
        id: u64,
        action: crate::protocol::PowerAction,
        by: String,
    },
}

impl ResponseChannel {
    /// The task and attempt this channel reports for.
    pub fn ids(&self) -> (TaskId, u32) {
        (self.task.clone(), self.attempt)
    }

    /// Hands an event other than log lines to the session (a hold's
    /// console bytes and power answers), in order with the lines.
    pub fn event(&self, event: TaskEvent) {
        let _ = self.tx.send(event);
    }
}

/// The open channel of one task.
///
/// Posting, then finishing, compiles:
///
/// ```
/// use ots::protocol::{Outcome, Stream};
/// use ots::worker::channel::ResponseChannel;
/// let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
/// let mut channel = ResponseChannel::open("r1.1".into(), 1, tx);
/// channel.log(Stream::Stdout, "last words".into());
/// channel.finish(Outcome::default(), Vec::new());
/// ```
///
/// Posting after `finish()` does not:
///
/// ```compile_fail
/// use ots::protocol::{Outcome, Stream};
/// use ots::worker::channel::ResponseChannel;
/// let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
/// let mut channel = ResponseChannel::open("r1.1".into(), 1, tx);
/// channel.finish(Outcome::default(), Vec::new());
/// channel.log(Stream::Stdout, "too late".into()); // error: use of moved value
/// ```
pub struct ResponseChannel {
    task: TaskId,
    attempt: u32,
    tx: mpsc::UnboundedSender<TaskEvent>,
    next_seq: u64,
    finished: bool,
    budget: Option<LogBudget>,
    /// Lines dropped because the budget was spent (numbered all the same,
    /// so the server reports them as lost: stored + lost = produced).
    dropped: u64,
    log_full: LogFull,
    /// Lines numbered but not handed over because the server's log of the
    /// task is full (lost in the accounting, as the server expects).
    not_sent_full: u64,
}

/// Set once the server said the task's log is full (`log_full`): from
/// then on the task's output is still read (a conductor must never block
/// on a pipe nobody reads) but only counted, not packed, handed over,
/// sealed or sent. Shared by the session's shell, the response channel
/// and the conductor's pipe readers.
#[derive(Clone, Debug, Default)]
pub struct LogFull(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl LogFull {
    pub fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What packed lines cost against a [`LogBudget`]: their text plus what a
/// queued piece costs besides (event, ids).
pub fn charge(text: &PackedText) -> usize {
    text.text.len() + PIECE_OVERHEAD
}

/// Memory a queued piece of log takes besides its text, roughly.
pub const PIECE_OVERHEAD: usize = 128;

/// Log text in flight between all running tasks and the session, bounded
/// in bytes: a conductor that prints faster than lines can be delivered
/// loses lines (counted, and reported as gaps), never the worker's memory.
///
/// It also carries back-pressure: while the worker is connected and the
/// lines waiting to be sent (the session's backlog, because the server
/// reads slower than the conductor prints) plus those in flight pass half
/// the limit, the task runner waits before taking more from the conductor,
/// which then waits on its pipe. So a fast conductor is slowed to the pace
/// of delivery instead of losing lines; only while the server is away do
/// lines queue up to the limit and then go oldest-first (counted).
#[derive(Clone, Debug)]
pub struct LogBudget {
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes of log waiting in the session to be sent, while connected.
    backlog: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    room: std::sync::Arc<tokio::sync::Notify>,
    limit: usize,
}

impl LogBudget {
    pub fn new(limit: usize) -> Self {
        LogBudget {
            in_flight: Default::default(),
            backlog: Default::default(),
            room: Default::default(),
            limit,
        }
    }

    fn pressed(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.in_flight
            .load(Ordering::Acquire)
            .saturating_add(self.backlog.load(Ordering::Acquire))
            > self.limit / 2
    }

    /// The session's backlog of unsent log bytes (0 while disconnected:
    /// then nothing waits, lines queue and the oldest go).
    pub fn set_backlog(&self, bytes: usize) {
        self.backlog
            .store(bytes, std::sync::atomic::Ordering::Release);
        if !self.pressed() {
            self.room.notify_waiters();
        }
    }

    /// Lines taken into the session's buffer: no longer in flight, but
    /// part of the backlog until the next [`Self::set_backlog`].
    pub fn buffered(&self, bytes: usize) {
        use std::sync::atomic::Ordering;
        let _ = self
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                Some(n.saturating_sub(bytes))
            });
        self.backlog.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Waits while delivery is behind (see the type's documentation).
    pub async fn wait_for_room(&self) {
        loop {
            let notified = self.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.pressed() {
                return;
            }
            notified.await;
        }
    }

    /// Takes `bytes` from the budget; false if that would exceed it.
    fn take(&self, bytes: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                n.checked_add(bytes).filter(|&m| m <= self.limit)
            })
            .is_ok()
    }
}

impl ResponseChannel {
    pub fn open(task: TaskId, attempt: u32, tx: mpsc::UnboundedSender<TaskEvent>) -> Self {
        ResponseChannel {
            task,
            attempt,
            tx,
            next_seq: 1,
            finished: false,
            budget: None,
            dropped: 0,
            log_full: LogFull::default(),
            not_sent_full: 0,
        }
    }

    /// The flag that says the server's log of this task is full.
    pub fn with_log_full(mut self, log_full: LogFull) -> Self {
        self.log_full = log_full;
        self
    }

    /// Bounds the log text this channel may have in flight.
    pub fn with_budget(mut self, budget: LogBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Waits while log delivery is behind ([`LogBudget`]).
    pub async fn wait_for_room(&self) {
        if let Some(b) = &self.budget {
            b.wait_for_room().await;
        }
    }

    /// Lines dropped so far because the log budget was spent.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    pub fn task(&self) -> &TaskId {
        &self.task
    }

    /// Posts one log line (best-effort delivery, numbered for accounting).
    pub fn log(&mut self, stream: Stream, text: String) {
        self.log_packed(PackedText::line(stream, &text));
    }

    /// Posts packed lines in one hand-over to the session: numbered from
    /// the next line number on, or, if the log budget is spent, counted
    /// as dropped (and reported as lost).
    pub fn log_packed(&mut self, text: PackedText) {
        if text.count == 0 {
            return;
        }
        let first = self.next_seq;
        self.next_seq += u64::from(text.count);
        if self.log_full.is_set() {
            self.not_sent_full += u64::from(text.count);
            return;
        }
        if self.budget.as_ref().is_some_and(|b| !b.take(charge(&text))) {
            self.dropped += u64::from(text.count);
            return;
        }
        // The session outlives every channel; a closed receiver means
        // the worker is shutting down and nothing can be delivered.
        let _ = self.tx.send(TaskEvent::Log {
            task: self.task.clone(),
            attempt: self.attempt,
            first,
            text,
        });
    }

    /// Posts the final report and closes the channel.
    pub fn finish(mut self, outcome: Outcome, files: Vec<ResultFile>) {
        self.send_finished(outcome, files);
    }

    fn send_finished(&mut self, outcome: Outcome, files: Vec<ResultFile>) {
        self.finished = true;
        if self.dropped > 0 {
            tracing::warn!(task = %self.task, dropped = self.dropped, "the conductor printed faster than its log could be delivered: log lines dropped at the worker (reported as lost)");
        }
        if self.not_sent_full > 0 {
            tracing::warn!(task = %self.task, not_sent = self.not_sent_full, "the server's log of this task was full (limits.max_task_log_bytes): log lines counted, not sent (reported as lost)");
        }
        let _ = self.tx.send(TaskEvent::Finished {
            task: self.task.clone(),
            attempt: self.attempt,
            outcome,
            log_lines: self.next_seq - 1,
            files,
        });
    }
}

impl Drop for ResponseChannel {
    /// A channel dropped without `finish()` (a bug or a panic in the task
    /// runner) still ends the task, as an error the operator can see.
    fn drop(&mut self) {
        if !self.finished {
            self.send_finished(
                Outcome {
                    failure: Some("worker bug: task channel dropped without a final report".into()),
                    ..Outcome::default()
                },
                Vec::new(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_before_finish_come_first_and_are_counted() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut ch = ResponseChannel::open("r.1".into(), 1, tx);
        ch.log(Stream::Stdout, "a".into());
        ch.log(Stream::Stderr, "b".into());
        ch.finish(Outcome::default(), Vec::new());
        assert!(matches!(
            rx.try_recv().unwrap(),
            TaskEvent::Log { first: 1, .. }
        ));
        assert!(matches!(
            rx.try_recv().unwrap(),
            TaskEvent::Log { first: 2, .. }
        ));
        assert!(matches!(
            rx.try_recv().unwrap(),
            TaskEvent::Finished { log_lines: 2, .. }
        ));
        assert!(
            rx.try_recv().is_err(),
            "finish must send exactly one report"
        );
    }

    #[test]
    fn dropping_an_unfinished_channel_reports_a_failure() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        drop(ResponseChannel::open("r.1".into(), 1, tx));
        match rx.try_recv().unwrap() {
            TaskEvent::Finished { outcome, .. } => assert!(outcome.failure.is_some()),
            other => panic!("unexpected {other:?}"),
        }
    }
}
