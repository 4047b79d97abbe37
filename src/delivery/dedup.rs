//! Receiver side of mandatory delivery: apply each (session, seq) once.

use std::collections::BTreeSet;

/// How far ahead of the last consecutive mandatory seq a peer may number
/// (messages in flight at once). Both ends refuse numbers beyond it, which
/// bounds every dedup window to this many entries.
pub const DEDUP_AHEAD: u64 = 1 << 16;

/// Remembers which sequence numbers of one sender session were applied.
/// Everything at or below `floor` was applied; `above` holds applied numbers
/// beyond a gap (a resend can arrive after later messages).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DedupWindow {
    floor: u64,
    above: BTreeSet<u64>,
}

impl DedupWindow {
    /// Every seq up to this one has been recorded.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// True if `seq` was already applied.
    pub fn seen(&self, seq: u64) -> bool {
        seq <= self.floor || self.above.contains(&seq)
    }

    /// Records `seq` as applied. Returns false if it already was.
    pub fn record(&mut self, seq: u64) -> bool {
        if self.seen(seq) {
            return false;
        }
        self.above.insert(seq);
        while self.above.remove(&(self.floor + 1)) {
            self.floor += 1;
        }
        true
    }

    /// Number of applied messages beyond the contiguous floor (bounded by
    /// the sender's outbox size).
    pub fn pending_gaps(&self) -> usize {
        self.above.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_seq_is_applied_once_in_any_order() {
        let mut w = DedupWindow::default();
        assert!(w.record(2));
        assert!(w.record(1));
        assert!(!w.record(2));
        assert!(!w.record(1));
        assert!(w.record(4));
        assert_eq!(w.pending_gaps(), 1);
        assert!(w.record(3));
        assert_eq!(w.pending_gaps(), 0);
        assert!(w.seen(4) && !w.seen(5));
    }
}
