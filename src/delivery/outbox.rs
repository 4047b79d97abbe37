//! Sender side of mandatory delivery: keep every mandatory message until
//! the receiver acknowledges it, resend with randomized exponential backoff
//! (`backon`), and resend everything in order after a reconnect.

use crate::protocol::{Body, Class, Header, TaskId, PROTOCOL_VERSION};
use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Resend timing of unacknowledged mandatory messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// First resend after this long without an ack.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub initial_ms: u64,
    /// Each further resend waits this factor longer…
    pub factor: f32,
    /// …up to this cap.
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub cap_ms: u64,
    /// Randomize each delay (up to double it) so many senders do not resend in step.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial_ms: 1000,
            factor: 2.0,
            cap_ms: 16_000,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    fn backoff(&self) -> ExponentialBackoff {
        let mut b = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.initial_ms))
            .with_factor(self.factor)
            .with_max_delay(Duration::from_millis(self.cap_ms))
            .without_max_times();
        if self.jitter {
            b = b.with_jitter();
        }
        b.build()
    }
}

/// One message waiting for its ack.
#[derive(Debug)]
pub struct Pending {
    pub class: Class,
    pub task: Option<TaskId>,
    /// The attempt of `task` the message belongs to: each attempt is a
    /// channel of its own, closed on its own.
    pub attempt: Option<u32>,
    pub body: Body,
    pub raw: Option<Bytes>,
    /// When to (re)send; `None`: at the next opportunity.
    due: Option<Instant>,
    /// Under the give-up policy: when to stop trying.
    deadline: Option<Instant>,
    backoff: ExponentialBackoff,
    /// How many times it was sent.
    pub sends: u32,
}

/// The outbox of one sender session.
#[derive(Debug)]
pub struct Outbox {
    policy: RetryPolicy,
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
}

/// A pending message as saved to disk.
#[derive(Debug, Clone, PartialEq)]
pub struct SavedMessage {
    pub seq: u64,
    pub task: Option<TaskId>,
    pub attempt: Option<u32>,
    pub body: Body,
    pub raw: Option<Bytes>,
}

/// A message to put on the wire now.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub header: Header,
    pub body: Body,
    pub raw: Option<Bytes>,
}

impl Outbox {
    pub fn new(policy: RetryPolicy) -> Self {
        Outbox {
            policy,
            next_seq: 1,
            pending: BTreeMap::new(),
        }
    }

    /// Queues a mandatory message; returns its sequence number.
    pub fn push(
        &mut self,
        task: Option<TaskId>,
        attempt: Option<u32>,
        body: Body,
        raw: Option<Bytes>,
    ) -> u64 {
        self.push_until(task, attempt, body, raw, None)
    }

    /// Queues a mandatory message that is given up at `deadline` if still
    /// unacknowledged then (the give-up policy).
    pub fn push_until(
        &mut self,
        task: Option<TaskId>,
        attempt: Option<u32>,
        body: Body,
        raw: Option<Bytes>,
        deadline: Option<Instant>,
    ) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.pending.insert(
            seq,
            Pending {
                class: body.class(),
                task,
                attempt,
                body,
                raw,
                due: None,
                deadline,
                backoff: self.policy.backoff(),
                sends: 0,
            },
        );
        seq
    }

    /// Messages to send now (first sends and resends), in sequence order.
    pub fn due(&mut self, now: Instant) -> Vec<Outgoing> {
        self.due_unless(now, |_| false)
    }

    /// As [`Self::due`], leaving out (not counting as sent) the messages
    /// `hold` says must wait (a final report whose task still has log
    /// lines queued before it).
    pub fn due_unless(&mut self, now: Instant, hold: impl Fn(&Pending) -> bool) -> Vec<Outgoing> {
        let mut out = Vec::new();
        for (&seq, p) in self.pending.iter_mut() {
            if p.due.is_some_and(|d| d > now) || hold(p) {
                continue;
            }
            let delay = p
                .backoff
                .next()
                .unwrap_or(Duration::from_millis(self.policy.cap_ms));
            p.due = Some(now + delay);
            p.sends += 1;
            out.push(Outgoing {
                header: Header {
                    v: PROTOCOL_VERSION,
                    class: p.class,
                    mandatory: true,
                    seq,
                    task: p.task.clone(),
                    epoch: None,
                },
                body: p.body.clone(),
                raw: p.raw.clone(),
            });
        }
        out
    }

    /// `seq` was not sent after all (the shell held it back to keep it
    /// behind log lines that the socket could not take): due again at the
    /// next opportunity, its backoff not advanced by a send that did not
    /// happen.
    pub fn unsend(&mut self, seq: u64) {
        if let Some(p) = self.pending.get_mut(&seq) {
            p.due = None;
            p.sends = p.sends.saturating_sub(1);
        }
    }

    /// Removes `seq` without it having been delivered (the receiver
    /// refused it), returning what it was.
    pub fn take(&mut self, seq: u64) -> Option<Pending> {
        self.pending.remove(&seq)
    }

    /// The receiver acknowledged `seq`. Returns false for an unknown seq
    /// (a duplicate ack).
    pub fn ack(&mut self, seq: u64) -> bool {
        self.pending.remove(&seq).is_some()
    }

    /// The receiver closed `task` (one attempt of it, or every attempt for
    /// `None`): drop everything for it. Returns how many messages were dropped.
    pub fn drop_task(&mut self, task: &str, attempt: Option<u32>) -> usize {
        let before = self.pending.len();
        self.pending.retain(|_, p| {
            !(p.task.as_deref() == Some(task) && (attempt.is_none() || p.attempt == attempt))
        });
        before - self.pending.len()
    }

    /// Removes and returns the messages whose give-up deadline passed.
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, Pending)> {
        let expired: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(&seq, _)| seq)
            .collect();
        expired
            .into_iter()
            .filter_map(|seq| self.pending.remove(&seq).map(|p| (seq, p)))
            .collect()
    }

    /// After a reconnect: everything pending goes out again at once, in
    /// order, with a fresh backoff.
    pub fn resend_all(&mut self) {
        for p in self.pending.values_mut() {
            p.due = None;
            p.backoff = self.policy.backoff();
        }
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// The sequence number the next pushed message gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Pending messages in sequence order, for saving them to disk.
    pub fn entries(&self) -> impl Iterator<Item = (u64, &Pending)> {
        self.pending.iter().map(|(&seq, p)| (seq, p))
    }

    /// Rebuilds an outbox saved to disk: the same sequence numbers, sent
    /// again at the first opportunity.
    pub fn restore(policy: RetryPolicy, next_seq: u64, saved: Vec<SavedMessage>) -> Self {
        let mut outbox = Outbox::new(policy);
        for m in saved {
            outbox.next_seq = outbox.next_seq.max(m.seq + 1);
            outbox.pending.insert(
                m.seq,
                Pending {
                    class: m.body.class(),
                    task: m.task,
                    attempt: m.attempt,
                    body: m.body,
                    raw: m.raw,
                    due: None,
                    deadline: None,
                    backoff: outbox.policy.backoff(),
                    sends: 0,
                },
            );
        }
        outbox.next_seq = outbox.next_seq.max(next_seq);
        outbox
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// True if a message for `task` is still unacknowledged.
    pub fn has_task(&self, task: &str) -> bool {
        self.pending
            .values()
            .any(|p| p.task.as_deref() == Some(task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial_ms: 100,
            factor: 2.0,
            cap_ms: 400,
            jitter: false,
        }
    }

    #[test]
    fn unacked_messages_are_resent_with_growing_delay_until_acked() {
        let t0 = Instant::now();
        let mut outbox = Outbox::new(policy());
        let seq = outbox.push(Some("r.1".into()), Some(1), Body::Ready, None);
        assert_eq!(outbox.due(t0).len(), 1);
        assert!(outbox.due(t0 + Duration::from_millis(99)).is_empty());
        assert_eq!(outbox.due(t0 + Duration::from_millis(100)).len(), 1);
        // second delay is 200 ms (f32 arithmetic in backon: allow 1 ms)
        assert!(outbox.due(t0 + Duration::from_millis(299)).is_empty());
        assert_eq!(
            outbox.due(t0 + Duration::from_millis(301))[0].header.seq,
            seq
        );
        assert!(outbox.ack(seq));
        assert!(!outbox.ack(seq));
        assert!(outbox.due(t0 + Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn resend_all_sends_everything_in_order_and_drop_task_forgets() {
        let t0 = Instant::now();
        let mut outbox = Outbox::new(policy());
        let a = outbox.push(Some("r.1".into()), Some(1), Body::Ready, None);
        let b = outbox.push(Some("r.2".into()), Some(1), Body::Ready, None);
        let c = outbox.push(Some("r.1".into()), Some(1), Body::Ready, None);
        assert_eq!(outbox.due(t0).len(), 3);
        outbox.resend_all();
        let seqs: Vec<u64> = outbox.due(t0).iter().map(|o| o.header.seq).collect();
        assert_eq!(seqs, vec![a, b, c]);
        assert_eq!(outbox.drop_task("r.1", None), 2);
        assert_eq!(outbox.len(), 1);
        assert!(outbox.has_task("r.2"));
    }

    #[test]
    fn give_up_policy_drops_a_message_at_its_deadline() {
        let t0 = Instant::now();
        let mut outbox = Outbox::new(policy());
        let keep = outbox.push(None, None, Body::Ready, None);
        let drop = outbox.push_until(
            None,
            None,
            Body::Ready,
            None,
            Some(t0 + Duration::from_secs(5)),
        );
        assert!(outbox.expire(t0 + Duration::from_secs(4)).is_empty());
        let gone = outbox.expire(t0 + Duration::from_secs(5));
        assert_eq!(gone.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![drop]);
        assert!(!outbox.ack(drop));
        assert!(outbox.ack(keep));
    }
}
