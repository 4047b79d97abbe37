//! Accounting of best-effort lines: which sequence numbers arrived, and
//! therefore exactly which ranges never did.

use std::collections::BTreeMap;

/// A set of u64 kept as disjoint inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqRanges {
    /// start → end, inclusive, non-overlapping, non-adjacent.
    ranges: BTreeMap<u64, u64>,
    count: u64,
}

impl SeqRanges {
    /// Adds `seq`; returns false if it was already present.
    pub fn insert(&mut self, seq: u64) -> bool {
        self.insert_range(seq, seq)
    }

    /// True if any number of `first..=last` is held.
    pub fn overlaps(&self, first: u64, last: u64) -> bool {
        self.ranges
            .range(..=last)
            .next_back()
            .is_some_and(|(_, &e)| e >= first)
    }

    /// True if `first..=last` would join a run held (adjacent to it).
    pub fn joins(&self, first: u64, last: u64) -> bool {
        first.checked_sub(1).is_some_and(|b| self.contains(b))
            || last.checked_add(1).is_some_and(|a| self.contains(a))
    }

    /// Adds the whole range `first..=last` (first ≤ last); returns false,
    /// adding nothing, if any of it is already present. Costs one lookup
    /// on each side, whatever the range's length.
    pub fn insert_range(&mut self, first: u64, last: u64) -> bool {
        if first > last || self.overlaps(first, last) {
            return false;
        }
        let mut start = first;
        let mut end = last;
        if let Some((&s, &e)) = self.ranges.range(..first).next_back() {
            if e.checked_add(1) == Some(first) {
                start = s;
                self.ranges.remove(&s);
            }
        }
        if let Some(next) = last.checked_add(1) {
            if let Some(&e) = self.ranges.get(&next) {
                end = e;
                self.ranges.remove(&next);
            }
        }
        self.ranges.insert(start, end);
        self.count += last - first + 1;
        true
    }

    /// Separate runs of numbers held.
    pub fn runs(&self) -> usize {
        self.ranges.len()
    }

    /// True if `seq` is held.
    pub fn contains(&self, seq: u64) -> bool {
        self.ranges
            .range(..=seq)
            .next_back()
            .is_some_and(|(_, &e)| seq <= e)
    }

    /// How many numbers are present.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The inclusive ranges within `1..=upto` that are absent.
    pub fn missing(&self, upto: u64) -> Vec<(u64, u64)> {
        let mut gaps = Vec::new();
        let mut next = 1;
        for (&s, &e) in &self.ranges {
            if s > upto {
                break;
            }
            if s > next {
                gaps.push((next, s - 1));
            }
            next = e.saturating_add(1);
        }
        if next <= upto {
            gaps.push((next, upto));
        }
        gaps
    }
}

/// Byte ranges of a file received so far, sorted and merged: chunks can
/// arrive out of order after resends; in order they stay one range.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ByteRanges(Vec<(u64, u64)>);

impl ByteRanges {
    /// Records bytes `start..end`.
    pub fn insert(&mut self, start: u64, end: u64) {
        let at = self.0.partition_point(|&(s, _)| s < start);
        self.0.insert(at, (start, end));
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(self.0.len());
        for &(s, e) in &self.0 {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.0 = merged;
    }

    /// Separate ranges held.
    pub fn runs(&self) -> usize {
        self.0.len()
    }

    /// True if `start..end` touches or overlaps a range already held (so
    /// inserting it opens no new range).
    pub fn extends(&self, start: u64, end: u64) -> bool {
        self.0.iter().any(|&(s, e)| start <= e && end >= s)
    }

    /// Bytes covered (overlaps counted once).
    pub fn covered(&self) -> u64 {
        self.0.iter().map(|(s, e)| e - s).sum()
    }
}

/// Formats gaps for people: "1200–1236, 1300".
pub fn describe(gaps: &[(u64, u64)]) -> String {
    gaps.iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}–{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_insert_whole_merge_with_neighbours_and_refuse_overlaps() {
        let mut r = SeqRanges::default();
        assert!(r.insert_range(10, 19));
        assert!(r.insert_range(1, 5));
        assert!(!r.insert_range(5, 9), "overlaps 5");
        assert!(r.joins(6, 9));
        assert!(!r.joins(30, 40));
        assert!(r.insert_range(6, 9));
        assert_eq!((r.len(), r.runs()), (19, 1));
        assert!(r.overlaps(19, 25) && !r.overlaps(20, 25));
        assert_eq!(r.missing(25), vec![(20, 25)]);
    }

    #[test]
    fn byte_ranges_merge_in_any_order_and_count_overlaps_once() {
        let mut r = ByteRanges::default();
        r.insert(20, 30);
        r.insert(0, 10);
        assert_eq!(r.covered(), 20);
        r.insert(5, 25); // overlaps both
        assert_eq!(r.covered(), 30);
        r.insert(30, 40);
        assert_eq!(r, ByteRanges(vec![(0, 40)]));
    }

    #[test]
    fn missing_ranges_are_exact() {
        let mut r = SeqRanges::default();
        for s in (1..=10).chain(15..=20).chain([12]) {
            assert!(r.insert(s));
        }
        assert!(!r.insert(12));
        assert_eq!(r.len(), 17);
        assert_eq!(r.missing(22), vec![(11, 11), (13, 14), (21, 22)]);
        assert_eq!(describe(&r.missing(22)), "11, 13–14, 21–22");
        assert!(r.insert(11));
        assert_eq!(r.missing(20), vec![(13, 14)]);
    }
}
