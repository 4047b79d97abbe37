//! Who gets a dashboard connection when they are scarce. A connection is
//! *anonymous* until a request on it carries a valid session (or a
//! trusted proxy's user), then *signed in* as that user. The limits keep
//! one user, one address or a crowd of strangers from taking the rest:
//!
//! - anonymous connections together at most [`MAX_ANONYMOUS`]; past it, a
//!   new connection ends the oldest anonymous one of the address that
//!   holds the most (a slowloris's half-sent heads go first, a browser's
//!   fresh connection gets in and stays);
//! - signed-in connections at most `MAX_CONNECTIONS − MAX_ANONYMOUS`, of
//!   one user at most [`MAX_CONNECTIONS_PER_USER`], of submit users
//!   together at most [`MAX_SUBMIT_CONNECTIONS`]: a connection past them
//!   stays anonymous (and so may be ended for a newcomer);
//! - one address at most [`MAX_CONNECTIONS_PER_ADDRESS`] (trusted proxies
//!   exempt: everyone behind them shares their address); past it, that
//!   address's oldest anonymous connection ends, or the new one is
//!   refused.
//!
//! [`Rooms`] is the I/O-free bookkeeping; [`Door`] adds the handles that
//! end a connection's task.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::oneshot;

/// Open dashboard connections at most.
pub const MAX_CONNECTIONS: usize = 512;
/// Connections without a session at most (see the module).
pub const MAX_ANONYMOUS: usize = 128;
/// Signed-in connections of one user at most.
pub const MAX_CONNECTIONS_PER_USER: usize = 64;
/// Signed-in connections of submit users together at most.
pub const MAX_SUBMIT_CONNECTIONS: usize = 320;
/// Connections from one address at most (trusted proxies exempt).
pub const MAX_CONNECTIONS_PER_ADDRESS: usize = 64;

/// Whom a signed-in connection counts for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Occupant {
    pub user: String,
    pub submit: bool,
}

struct Entry {
    addr: IpAddr,
    occupant: Option<Occupant>,
    opened: Instant,
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its address holds its share, all signed in.
    Address,
    /// Every connection is signed in.
    Full,
}

/// The bookkeeping (I/O-free).
#[derive(Default)]
pub struct Rooms {
    entries: HashMap<u64, Entry>,
    next: u64,
    per_address: HashMap<IpAddr, usize>,
    per_user: HashMap<String, usize>,
    anonymous: usize,
    submits: usize,
    exempt: Vec<IpAddr>,
}

impl Rooms {
    pub fn new(exempt: Vec<IpAddr>) -> Self {
        Rooms {
            exempt,
            ..Default::default()
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn anonymous(&self) -> usize {
        self.anonymous
    }

    /// Signed-in connections of `user` now.
    pub fn of_user(&self, user: &str) -> usize {
        self.per_user.get(user).copied().unwrap_or(0)
    }

    /// The anonymous connection to end: of `addr` if given, else of the
    /// address holding the most anonymous connections (so a stranger
    /// opening many never ends a browser's one fresh connection); the
    /// oldest of them.
    fn oldest_anonymous(&self, addr: Option<IpAddr>) -> Option<u64> {
        let addr = addr.or_else(|| {
            let mut held: HashMap<IpAddr, (usize, Instant)> = HashMap::new();
            for e in self.entries.values().filter(|e| e.occupant.is_none()) {
                let h = held.entry(e.addr).or_insert((0, e.opened));
                h.0 += 1;
                h.1 = h.1.min(e.opened);
            }
            held.into_iter()
                .max_by(|(_, a), (_, b)| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
                .map(|(a, _)| a)
        })?;
        self.entries
            .iter()
            .filter(|(_, e)| e.occupant.is_none() && e.addr == addr)
            .min_by_key(|(id, e)| (e.opened, **id))
            .map(|(id, _)| *id)
    }

    /// A new connection from `addr` at `now`: its id and the connections
    /// to end to make room for it, or why it is refused.
    pub fn admit(&mut self, addr: IpAddr, now: Instant) -> Result<(u64, Vec<u64>), Refusal> {
        let mut evict = Vec::new();
        if !self.exempt.contains(&addr)
            && self.per_address.get(&addr).copied().unwrap_or(0) >= MAX_CONNECTIONS_PER_ADDRESS
        {
            let id = self.oldest_anonymous(Some(addr)).ok_or(Refusal::Address)?;
            self.leave(id);
            evict.push(id);
        }
        if self.anonymous >= MAX_ANONYMOUS || self.entries.len() >= MAX_CONNECTIONS {
            let id = self.oldest_anonymous(None).ok_or(Refusal::Full)?;
            self.leave(id);
            evict.push(id);
        }
        let id = self.next;
        self.next += 1;
        self.entries.insert(
            id,
            Entry {
                addr,
                occupant: None,
                opened: now,
            },
        );
        *self.per_address.entry(addr).or_insert(0) += 1;
        self.anonymous += 1;
        Ok((id, evict))
    }

    /// A request on connection `id` carried a session of `who`: the
    /// connection counts as that user's from now on, if the user's and
    /// the submit users' shares allow; otherwise it stays anonymous.
    pub fn sign_in(&mut self, id: u64, who: Occupant) {
        let signed_in = self.entries.len() - self.anonymous;
        let Some(e) = self.entries.get(&id) else {
            return;
        };
        if e.occupant.as_ref() == Some(&who) {
            return;
        }
        if e.occupant.is_some()
            || self.of_user(&who.user) >= MAX_CONNECTIONS_PER_USER
            || (who.submit && self.submits >= MAX_SUBMIT_CONNECTIONS)
            || signed_in >= MAX_CONNECTIONS - MAX_ANONYMOUS
        {
            return;
        }
        *self.per_user.entry(who.user.clone()).or_insert(0) += 1;
        self.submits += usize::from(who.submit);
        self.anonymous -= 1;
        self.entries.get_mut(&id).expect("checked").occupant = Some(who);
    }

    /// Connection `id` closed (or was ended).
    pub fn leave(&mut self, id: u64) {
        let Some(e) = self.entries.remove(&id) else {
            return;
        };
        if let Some(n) = self.per_address.get_mut(&e.addr) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&e.addr);
            }
        }
        match e.occupant {
            None => self.anonymous -= 1,
            Some(o) => {
                self.submits -= usize::from(o.submit);
                if let Some(n) = self.per_user.get_mut(&o.user) {
                    *n -= 1;
                    if *n == 0 {
                        self.per_user.remove(&o.user);
                    }
                }
            }
        }
    }
}

/// The rooms and the handles that end connections.
pub struct Door {
    inner: Mutex<(Rooms, HashMap<u64, oneshot::Sender<()>>)>,
}

/// A connection's place: given back when dropped.
pub struct Ticket {
    door: Arc<Door>,
    pub id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut inner = self.door.inner.lock().expect("door");
        inner.0.leave(self.id);
        inner.1.remove(&self.id);
    }
}

impl Door {
    pub fn new(exempt: Vec<IpAddr>) -> Arc<Door> {
        Arc::new(Door {
            inner: Mutex::new((Rooms::new(exempt), HashMap::new())),
        })
    }

    /// Lets a connection from `addr` in: its ticket, and what ends it
    /// when a newcomer needs its place; or why not. Returns how many
    /// connections were ended for it.
    pub fn admit(
        self: &Arc<Self>,
        addr: IpAddr,
    ) -> Result<(Ticket, oneshot::Receiver<()>, usize), Refusal> {
        let mut inner = self.inner.lock().expect("door");
        let (id, evicted) = inner.0.admit(addr, Instant::now())?;
        for old in &evicted {
            if let Some(end) = inner.1.remove(old) {
                let _ = end.send(());
            }
        }
        let (tx, rx) = oneshot::channel();
        inner.1.insert(id, tx);
        Ok((
            Ticket {
                door: self.clone(),
                id,
            },
            rx,
            evicted.len(),
        ))
    }

    /// See [`Rooms::sign_in`].
    pub fn sign_in(&self, id: u64, who: Occupant) {
        self.inner.lock().expect("door").0.sign_in(id, who);
    }

    /// (open, anonymous) connections now.
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("door");
        (inner.0.len(), inner.0.anonymous())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn user(name: &str, submit: bool) -> Occupant {
        Occupant {
            user: name.into(),
            submit,
        }
    }

    #[test]
    fn strangers_end_each_other_never_the_signed_in() {
        let t0 = Instant::now();
        let mut r = Rooms::new(vec![]);
        // alice signs in on one connection.
        let (alice, _) = r.admit(ip(1), t0).unwrap();
        r.sign_in(alice, user("alice", true));
        // A flood of half-open connections from many addresses.
        let mut ended = 0;
        for i in 0..5000u32 {
            let t = t0 + Duration::from_millis(u64::from(i));
            let (_, evicted) = r
                .admit(IpAddr::from([11, 0, (i / 60) as u8, 1]), t)
                .unwrap();
            assert!(!evicted.contains(&alice));
            ended += evicted.len();
        }
        assert_eq!(r.anonymous(), MAX_ANONYMOUS);
        assert!(ended >= 5000 - MAX_ANONYMOUS);
        // A newcomer still gets in, and alice's is there.
        let (bob, _) = r.admit(ip(2), t0 + Duration::from_secs(10)).unwrap();
        r.sign_in(bob, user("bob", false));
        assert_eq!(r.of_user("alice"), 1);
        assert_eq!(r.of_user("bob"), 1);
    }

    #[test]
    fn a_browsers_fresh_connection_outlives_a_flood_from_fewer_addresses_than_slots() {
        let t0 = Instant::now();
        let mut r = Rooms::new(vec![]);
        for i in 0..MAX_ANONYMOUS as u32 {
            r.admit(IpAddr::from([14, 0, 0, (i % 50) as u8]), t0)
                .unwrap();
        }
        // alice connects and is slow to send her head…
        let (alice, _) = r.admit(ip(7), t0 + Duration::from_millis(1)).unwrap();
        // …while the flood goes on.
        for i in 0..10_000u32 {
            let t = t0 + Duration::from_millis(2 + u64::from(i));
            let (_, evicted) = r
                .admit(IpAddr::from([14, 0, 0, (i % 50) as u8]), t)
                .unwrap();
            assert!(!evicted.contains(&alice), "round {i}");
        }
        r.sign_in(alice, user("alice", true));
        assert_eq!(r.of_user("alice"), 1);
    }

    #[test]
    fn one_user_and_one_address_hold_bounded_shares() {
        let t0 = Instant::now();
        let mut r = Rooms::new(vec![ip(9)]);
        // mallory signs in on ever more connections from many addresses.
        for i in 0..1000u32 {
            let t = t0 + Duration::from_millis(u64::from(i));
            let (id, _) = r
                .admit(IpAddr::from([12, 0, (i / 50) as u8, 1]), t)
                .unwrap();
            r.sign_in(id, user("mallory", true));
        }
        assert_eq!(r.of_user("mallory"), MAX_CONNECTIONS_PER_USER);
        // One address: its oldest stranger goes, then it is refused.
        let mut r = Rooms::new(vec![ip(9)]);
        for i in 0..MAX_CONNECTIONS_PER_ADDRESS {
            let (id, _) = r.admit(ip(3), t0).unwrap();
            r.sign_in(id, user(&format!("u{i}"), true));
        }
        assert_eq!(r.admit(ip(3), t0), Err(Refusal::Address));
        // A trusted proxy is exempt.
        for _ in 0..MAX_CONNECTIONS_PER_ADDRESS + 10 {
            r.admit(ip(9), t0).unwrap();
        }
        let mut r = Rooms::new(vec![]);
        let (first, _) = r.admit(ip(4), t0).unwrap();
        for _ in 1..MAX_CONNECTIONS_PER_ADDRESS {
            r.admit(ip(4), t0 + Duration::from_secs(1)).unwrap();
        }
        let (_, evicted) = r.admit(ip(4), t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(evicted, vec![first]);
    }

    #[test]
    fn submit_users_leave_room_for_operators_and_leaving_gives_back() {
        let t0 = Instant::now();
        let mut r = Rooms::new(vec![]);
        let mut ids = Vec::new();
        for i in 0..400u32 {
            let (id, _) = r
                .admit(IpAddr::from([13, 0, (i / 50) as u8, 1]), t0)
                .unwrap();
            r.sign_in(id, user(&format!("s{}", i / 50), true));
            ids.push(id);
        }
        assert_eq!(r.len() - r.anonymous(), MAX_SUBMIT_CONNECTIONS);
        let (ops, _) = r.admit(ip(5), t0).unwrap();
        r.sign_in(ops, user("ops", false));
        assert_eq!(r.of_user("ops"), 1);
        for id in ids {
            r.leave(id);
        }
        r.leave(ops);
        assert!(r.is_empty());
        assert_eq!(r.anonymous(), 0);
        assert!(r.per_user.is_empty() && r.per_address.is_empty() && r.submits == 0);
    }
}
