//! When messages arrive and how far the server's clock is from ours:
//! dispatch expiry counts from arrival, corrected for the transit time
//! the server's timestamps show.

use std::collections::VecDeque;
use std::time::Instant;

/// When a message came off the socket, by both of the worker's clocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub at: Instant,
    /// Worker wall clock, Unix ms.
    pub wall_ms: u64,
}

/// Heartbeats observed to estimate how far a dispatch travelled.
pub(super) const CLOCK_WINDOW: usize = 32;

/// The difference between the worker's and the server's wall clocks as
/// heartbeats show it: `worker wall at arrival − server wall at send`,
/// the smallest of the last [`CLOCK_WINDOW`] heartbeats. That is the clock
/// skew plus the fastest transit, so a dispatch's extra delay in transit
/// is `arrival − sent − offset`, whatever the skew: two clocks 60 s apart
/// do not make fresh dispatches look stale, and a dispatch that waited in
/// a socket buffer while the worker was stopped does.
#[derive(Clone, Debug, Default)]
pub(super) struct ClockOffset {
    samples: VecDeque<i128>,
}

impl ClockOffset {
    pub(super) fn observe(&mut self, arrived_ms: u64, sent_ms: u64) {
        if self.samples.len() == CLOCK_WINDOW {
            self.samples.pop_front();
        }
        self.samples
            .push_back(i128::from(arrived_ms) - i128::from(sent_ms));
    }

    /// Estimated delay in transit beyond the fastest, in ms (0 if unknown).
    pub(super) fn transit_ms(&self, arrived_ms: u64, sent_ms: u64) -> u64 {
        let Some(offset) = self.samples.iter().min() else {
            return 0;
        };
        if sent_ms == 0 {
            return 0;
        }
        let extra = i128::from(arrived_ms) - i128::from(sent_ms) - offset;
        u64::try_from(extra.max(0)).unwrap_or(u64::MAX)
    }
}
