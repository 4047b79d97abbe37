//! What lists show of leases: the caller's (or everyone's, and the last
//! that ended), each as `leases` carries it.

use super::*;

impl<S: Store> Scheduler<S> {
    /// `list_leases`: the caller's waiting and held leases; `all`: every
    /// user's (a submit user: its own), with the last ended ones.
    pub(in crate::server::scheduler) fn list_leases(
        &self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        all: bool,
    ) -> Reply {
        let me = self.owner(peer);
        let sees_all =
            !self.cfg.secure || self.caller_role(peer).is_some_and(|r| r >= Role::Operator);
        let mine = |r: &Testrun| {
            !self.cfg.secure
                || r.request.owner == me
                || me.as_ref().is_some_and(|m| {
                    r.request
                        .lease
                        .as_ref()
                        .is_some_and(|t| t.shared.contains(m))
                })
        };
        let mut leases: Vec<DeviceLease> = self
            .leases
            .live
            .keys()
            .filter(|id| {
                let r = &self.runs[*id];
                mine(r) || (all && sees_all)
            })
            .map(|id| self.lease_info(now, id))
            .collect();
        if all {
            // The newest ended ones (read from the database before this
            // request was handled: `recall`), newest first.
            let mut ended: Vec<(u64, &LeaseId)> = self
                .runs
                .range::<str, _>((
                    std::ops::Bound::Included("l"),
                    std::ops::Bound::Excluded("m"),
                ))
                .filter(|(id, r)| !self.leases.live.contains_key(*id) && r.request.lease.is_some())
                .filter(|(_, r)| sees_all || mine(r))
                .filter_map(|(id, _)| Some((id[1..].parse().ok()?, id)))
                .collect();
            ended.sort_unstable_by(|a, b| b.cmp(a));
            leases.extend(
                ended
                    .into_iter()
                    .take(LISTED_ENDED)
                    .map(|(_, id)| self.lease_info(now, id)),
            );
        }
        Ok(Body::Leases { request, leases })
    }

    /// A lease as lists show it.
    pub(in crate::server::scheduler) fn lease_info(
        &self,
        now: Instant,
        id: &LeaseId,
    ) -> DeviceLease {
        let r = &self.runs[id];
        let terms = r.request.lease.clone().unwrap_or_default();
        let live = self.leases.live.get(id);
        let task = r.tasks.first().and_then(|t| self.tasks.get(t));
        let state = match (live, r.state) {
            (Some(_), RunState::Queued) => LeaseState::Waiting,
            (Some(_), _) => LeaseState::Held,
            (None, _) => LeaseState::Ended,
        };
        let position = (state == LeaseState::Waiting)
            .then(|| task.and_then(|t| self.waiting_of(id).get(&t.id).map(|w| w.position)))
            .flatten();
        DeviceLease {
            lease: id.clone(),
            state,
            holder: r.request.owner.clone(),
            device: r.request.device.clone(),
            worker: task.and_then(|t| t.worker.clone()),
            reason: terms.reason.clone(),
            priority: r.request.priority,
            requested_ms: r.submitted_ms,
            granted_ms: terms.granted_ms,
            until_ms: terms.until_ms,
            ended_ms: (state == LeaseState::Ended)
                .then_some(r.ended_ms.or(terms.until_ms))
                .flatten(),
            ended: terms.ended.clone(),
            duration_ms: terms.duration_ms,
            idle_ms: live.map(|l| now.saturating_duration_since(l.hold.heard).as_millis() as u64),
            position,
            shared: terms.shared.clone(),
            consoles: live.map_or(0, |l| l.consoles.len() as u32),
        }
    }

    /// Holders that hold `[leases] held_per_user` leases already: their
    /// waiting leases are not granted until one ends (empty, at no cost,
    /// without leases).
    pub(in crate::server::scheduler) fn holders_at_limit(&self) -> HashSet<String> {
        if self.leases.live.is_empty() {
            return HashSet::new();
        }
        let mut held: HashMap<&str, usize> = HashMap::new();
        for (id, l) in &self.leases.live {
            let granted = self
                .runs
                .get(id)
                .is_some_and(|r| r.state != RunState::Queued);
            if let (true, Some(h)) = (granted, l.holder.as_deref()) {
                *held.entry(h).or_default() += 1;
            }
        }
        held.into_iter()
            .filter(|(_, n)| *n >= self.cfg.leases.held_per_user)
            .map(|(h, _)| h.to_string())
            .collect()
    }
}

/// Is `t` a waiting lease whose holder is at the limit?
pub(in crate::server::scheduler) fn over_held_limit(
    runs: &BTreeMap<RunId, Testrun>,
    t: &Task,
    at_limit: &HashSet<String>,
) -> bool {
    !at_limit.is_empty()
        && is_lease_id(&t.run)
        && runs
            .get(&t.run)
            .and_then(|r| r.request.owner.as_deref())
            .is_some_and(|o| at_limit.contains(o))
}
