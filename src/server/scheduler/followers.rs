//! Who follows which testrun: each connection follows at most one (a new
//! follow replaces the old), each testrun has at most
//! [`MAX_FOLLOWERS_PER_RUN`] followers, and the two maps always agree —
//! a connection listed under a testrun is the one that testrun's entry
//! names, and no testrun is listed without followers. Without I/O; the
//! scheduler sends what followers are told.

use super::PeerId;
use crate::protocol::RunId;
use std::collections::HashMap;

/// Connections following one testrun at most: past it, `follow` is
/// refused (`limit_reached`) and the client polls `status` instead.
pub const MAX_FOLLOWERS_PER_RUN: usize = 64;

#[derive(Debug, Default)]
pub(super) struct Followers {
    /// Per testrun: its followers, and whether each wants its log lines.
    by_run: HashMap<RunId, HashMap<PeerId, bool>>,
    /// The testrun each following connection follows.
    by_peer: HashMap<PeerId, RunId>,
}

impl Followers {
    /// `peer` follows `run` from now on (and no other testrun); false when
    /// `run` has [`MAX_FOLLOWERS_PER_RUN`] followers already (the peer
    /// then follows nothing).
    pub(super) fn follow(&mut self, peer: &PeerId, run: &RunId, logs: bool) -> bool {
        self.unfollow(peer);
        let followers = self.by_run.entry(run.clone()).or_default();
        if followers.len() >= MAX_FOLLOWERS_PER_RUN {
            return false;
        }
        followers.insert(peer.clone(), logs);
        self.by_peer.insert(peer.clone(), run.clone());
        true
    }

    /// `peer` follows nothing (a closed connection, a new follow).
    pub(super) fn unfollow(&mut self, peer: &PeerId) {
        let Some(run) = self.by_peer.remove(peer) else {
            return;
        };
        if let Some(f) = self.by_run.get_mut(&run) {
            f.remove(peer);
            if f.is_empty() {
                self.by_run.remove(&run);
            }
        }
    }

    /// Whether anyone follows `run`.
    pub(super) fn has(&self, run: &RunId) -> bool {
        self.by_run.contains_key(run)
    }

    /// Who is told about `run`: every follower, or for a log line those
    /// that asked for logs.
    pub(super) fn of(&self, run: &RunId, is_log: bool) -> Vec<PeerId> {
        self.by_run.get(run).map_or_else(Vec::new, |followers| {
            followers
                .iter()
                .filter(|(_, logs)| !is_log || **logs)
                .map(|(p, _)| p.clone())
                .collect()
        })
    }

    #[cfg(test)]
    fn agree(&self) -> bool {
        self.by_run.values().all(|f| !f.is_empty())
            && self.by_peer.len() == self.by_run.values().map(HashMap::len).sum::<usize>()
            && self
                .by_peer
                .iter()
                .all(|(p, r)| self.by_run.get(r).is_some_and(|f| f.contains_key(p)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn peer(n: usize) -> PeerId {
        Bytes::from(format!("peer{n}"))
    }

    #[test]
    fn a_connection_follows_one_testrun_and_the_maps_agree() {
        let mut f = Followers::default();
        let (r1, r2) = ("r1".to_string(), "r2".to_string());
        assert!(f.follow(&peer(1), &r1, true));
        assert!(f.follow(&peer(2), &r1, false));
        assert_eq!(f.of(&r1, true), vec![peer(1)]);
        assert_eq!(f.of(&r1, false).len(), 2);
        // A new follow replaces the old one.
        assert!(f.follow(&peer(1), &r2, true));
        assert_eq!(f.of(&r1, false), vec![peer(2)]);
        assert_eq!(f.of(&r2, false), vec![peer(1)]);
        f.unfollow(&peer(2));
        assert!(f.of(&r1, false).is_empty());
        assert!(f.agree());
        assert!(
            !f.by_run.contains_key(&r1),
            "no testrun listed without followers"
        );
    }

    #[test]
    fn a_full_testrun_refuses_one_more_and_a_follower_may_follow_it_again() {
        let mut f = Followers::default();
        let run = "r1".to_string();
        for n in 0..MAX_FOLLOWERS_PER_RUN {
            assert!(f.follow(&peer(n), &run, false));
        }
        assert!(!f.follow(&peer(1000), &run, false));
        assert!(f.of(&run, false).len() == MAX_FOLLOWERS_PER_RUN);
        // Following it again frees its own place first.
        assert!(f.follow(&peer(3), &run, true));
        assert_eq!(f.of(&run, true), vec![peer(3)]);
        assert!(f.agree());
    }
}
