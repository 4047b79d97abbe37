//! Who is signed in to the dashboard: single-use sign-in links minted for
//! an identity that authenticated over Noise (`ots-submit web`), and the
//! sessions they turn into. I/O-free, with the clock passed in; the shell
//! tells it the users the allow-lists grant, with their keys, after every
//! reload, and a session whose user went, changed role or changed key
//! ends at that moment: a session is bound to the key that asked for its
//! link, not only to a name.
//!
//! No user locks others out: each user holds at most
//! [`MAX_SESSIONS_PER_USER`] sessions and [`MAX_LINKS_PER_USER`] waiting
//! links (a new one replaces that user's oldest), submit users together
//! hold at most [`MAX_SUBMIT_SESSIONS`] and [`MAX_SUBMIT_LINKS`], and an
//! operator or admin who finds the table full replaces the oldest submit
//! user's session or link.
//!
//! Secrets (link tokens, session cookies) are 32 random bytes shown as
//! hex; the tables are keyed by their SHA-256, so a lookup's timing says
//! nothing about a secret's bytes.

use crate::security::{Identity, PublicKey, Role};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A sign-in link is valid this long, once.
pub const LINK_VALID: Duration = Duration::from_secs(60);
/// A session ends this long after sign-in, whatever happens.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Sessions at most; a sign-in past it is refused (expired ones go first).
pub const MAX_SESSIONS: usize = 1000;
/// Sessions of submit users, together, at most: the rest is kept for
/// operators and admins.
pub const MAX_SUBMIT_SESSIONS: usize = 900;
/// Sessions of one user at most; a sign-in past it ends that user's
/// oldest session.
pub const MAX_SESSIONS_PER_USER: usize = 16;
/// Sign-in links not yet used, at most…
pub const MAX_LINKS: usize = 100;
/// …of submit users together…
pub const MAX_SUBMIT_LINKS: usize = 80;
/// …and of one user (a new link replaces that user's oldest).
pub const MAX_LINKS_PER_USER: usize = 4;

/// What the allow-lists grant a user name: its role and its key.
pub type Grants = HashMap<String, (Role, PublicKey)>;

/// A signed-in browser's identity, as a request sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Viewer {
    /// Who it acts as; none without security (the closed lab: everything
    /// is allowed, by the operator's word).
    pub identity: Option<Identity>,
    /// The token state-changing requests must carry.
    pub csrf: String,
    /// The session's key in the table (for logout and live streams).
    pub key: [u8; 32],
}

impl Viewer {
    /// `user:NAME`, or `local` without security.
    pub fn label(&self) -> String {
        self.identity
            .as_ref()
            .map_or_else(|| "local".to_string(), Identity::label)
    }

    pub fn name(&self) -> &str {
        self.identity.as_ref().map_or("local", Identity::name)
    }

    /// The role it acts with (admin without security).
    pub fn role(&self) -> Role {
        role_of(&self.identity)
    }

    /// A submit user (the shares kept apart from operators' count it).
    pub fn is_submit(&self) -> bool {
        submit_user(&self.identity)
    }
}

/// Whether `identity` is a user of role submit (none without security).
fn submit_user(identity: &Option<Identity>) -> bool {
    identity.is_some() && role_of(identity) == Role::Submit
}

fn role_of(identity: &Option<Identity>) -> Role {
    match identity {
        Some(Identity::User { role, .. }) => *role,
        Some(Identity::Worker { .. }) => Role::Submit,
        None => Role::Admin,
    }
}

/// Why a sign-in did not give a session.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("this sign-in link is unknown, used already or older than 60 s: run `ots-submit web` again for a new one")]
    Unknown,
    #[error("the dashboard has {MAX_SESSIONS} sessions already ({MAX_SUBMIT_SESSIONS} for submit users): sign out elsewhere, or wait until old sessions expire")]
    Full,
    #[error("the user this link was issued to is no longer allowed (its key or role changed): run `ots-submit web` again")]
    Revoked,
}

/// Who a link or session belongs to: the identity and the key it
/// authenticated with (none without security).
#[derive(Clone, Debug)]
struct Holder {
    identity: Option<Identity>,
    key: Option<PublicKey>,
}

impl Holder {
    /// The name per-user limits count by; none without security (one
    /// anonymous operator: nobody to lock out).
    fn user(&self) -> Option<&str> {
        self.identity.as_ref().map(Identity::name)
    }

    fn submit(&self) -> bool {
        submit_user(&self.identity)
    }
}

struct Link {
    holder: Holder,
    expires: Instant,
    /// Minted as the how-manieth: the oldest goes first, also among
    /// links of one instant.
    order: u64,
}

struct Session {
    holder: Holder,
    csrf: String,
    expires: Instant,
    /// Opened as the how-manieth (see [`Link::order`]).
    order: u64,
}

/// The sign-in links and sessions.
pub struct Sessions {
    links: HashMap<[u8; 32], Link>,
    sessions: HashMap<[u8; 32], Session>,
    /// What the allow-lists grant; none without security (nothing to
    /// revoke by).
    users: Option<Grants>,
    /// Sessions ended because their user went or changed role or key.
    pub revoked: u64,
    /// Sign-ins refused (unknown or used link, full table).
    pub refused: u64,
    /// Sessions and links ended to make room: a user's oldest past its
    /// own limit, or a submit user's for an operator.
    pub replaced: u64,
    /// The next link's or session's [`Link::order`].
    next_order: u64,
}

fn key_of(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Whether `holder` is still what the allow-lists grant.
fn granted(users: &Option<Grants>, holder: &Holder) -> bool {
    match (users, &holder.identity) {
        (None, _) => true,
        (Some(users), Some(Identity::User { name, role })) => users
            .get(name)
            .is_some_and(|(r, k)| r == role && holder.key.as_ref().is_none_or(|key| key == k)),
        (Some(_), _) => false,
    }
}

/// The oldest entry among `entries` that `pick` selects, by `order`.
fn oldest<'a, T>(
    entries: impl Iterator<Item = (&'a [u8; 32], &'a T)>,
    pick: impl Fn(&T) -> bool,
    order: impl Fn(&T) -> u64,
) -> Option<[u8; 32]>
where
    T: 'a,
{
    entries
        .filter(|(_, e)| pick(e))
        .min_by_key(|(_, e)| order(e))
        .map(|(k, _)| *k)
}

impl Sessions {
    pub fn new(users: Option<Grants>) -> Self {
        Sessions {
            links: HashMap::new(),
            sessions: HashMap::new(),
            users,
            revoked: 0,
            refused: 0,
            replaced: 0,
            next_order: 0,
        }
    }

    /// Sessions now (signed in, not expired at the last sweep).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Sessions of user `name` now.
    pub fn sessions_of(&self, name: &str) -> usize {
        self.sessions
            .values()
            .filter(|s| s.holder.user() == Some(name))
            .count()
    }

    /// Forgets expired links and sessions.
    pub fn sweep(&mut self, now: Instant) {
        self.links.retain(|_, l| l.expires > now);
        self.sessions.retain(|_, s| s.expires > now);
    }

    /// A new single-use link for `identity`, which authenticated with
    /// `key`; `secret` is 32 random bytes. Returns the token to put into
    /// the link.
    pub fn mint_link(
        &mut self,
        now: Instant,
        identity: Option<Identity>,
        key: Option<PublicKey>,
        secret: [u8; 32],
    ) -> Result<String, String> {
        self.sweep(now);
        let holder = Holder { identity, key };
        // The user's own oldest link goes first.
        if let Some(user) = holder.user() {
            let mine = self
                .links
                .values()
                .filter(|l| l.holder.user() == Some(user))
                .count();
            if mine >= MAX_LINKS_PER_USER {
                let old = oldest(
                    self.links.iter(),
                    |l| l.holder.user() == Some(user),
                    |l| l.order,
                );
                self.links.remove(&old.expect("the user has links"));
                self.replaced += 1;
            }
        }
        let submits = self.links.values().filter(|l| l.holder.submit()).count();
        let room = if holder.submit() {
            submits < MAX_SUBMIT_LINKS && self.links.len() < MAX_LINKS
        } else {
            self.links.len() < MAX_LINKS || self.evict_submit_link()
        };
        if !room {
            self.refused += 1;
            return Err(format!(
                "{MAX_LINKS} dashboard sign-in links ({MAX_SUBMIT_LINKS} of submit users) are waiting to be used; try again within a minute"
            ));
        }
        let token = hex::encode(secret);
        self.next_order += 1;
        self.links.insert(
            key_of(&token),
            Link {
                holder,
                expires: now + LINK_VALID,
                order: self.next_order,
            },
        );
        Ok(token)
    }

    fn evict_submit_link(&mut self) -> bool {
        match oldest(self.links.iter(), |l| l.holder.submit(), |l| l.order) {
            Some(k) => {
                self.links.remove(&k);
                self.replaced += 1;
                true
            }
            None => false,
        }
    }

    fn evict_submit_session(&mut self) -> bool {
        match oldest(self.sessions.iter(), |s| s.holder.submit(), |s| s.order) {
            Some(k) => {
                self.sessions.remove(&k);
                self.replaced += 1;
                true
            }
            None => false,
        }
    }

    /// Turns a link's token into a session (the link is used up either
    /// way); `secret` and `csrf` are random bytes for the cookie and the
    /// CSRF token. Returns the cookie value and the viewer.
    pub fn sign_in(
        &mut self,
        now: Instant,
        token: &str,
        secret: [u8; 32],
        csrf: [u8; 16],
    ) -> Result<(String, Viewer), SignInError> {
        self.sweep(now);
        let Some(link) = self.links.remove(&key_of(token)) else {
            self.refused += 1;
            return Err(SignInError::Unknown);
        };
        if !granted(&self.users, &link.holder) {
            self.refused += 1;
            return Err(SignInError::Revoked);
        }
        self.open(now, link.holder, secret, csrf)
    }

    /// Who a link's token would sign in as, without using it (the
    /// confirmation page names the user); none if it is not valid.
    pub fn link_holder(&self, now: Instant, token: &str) -> Option<Option<Identity>> {
        let link = self.links.get(&key_of(token))?;
        (link.expires > now && granted(&self.users, &link.holder))
            .then(|| link.holder.identity.clone())
    }

    fn open(
        &mut self,
        now: Instant,
        holder: Holder,
        secret: [u8; 32],
        csrf: [u8; 16],
    ) -> Result<(String, Viewer), SignInError> {
        // The user's own oldest session goes first.
        if let Some(user) = holder.user() {
            if self.sessions_of(user) >= MAX_SESSIONS_PER_USER {
                let old = oldest(
                    self.sessions.iter(),
                    |s| s.holder.user() == Some(user),
                    |s| s.order,
                );
                self.sessions.remove(&old.expect("the user has sessions"));
                self.replaced += 1;
            }
        }
        let submits = self.sessions.values().filter(|s| s.holder.submit()).count();
        let room = if holder.submit() {
            submits < MAX_SUBMIT_SESSIONS && self.sessions.len() < MAX_SESSIONS
        } else {
            self.sessions.len() < MAX_SESSIONS || self.evict_submit_session()
        };
        if !room {
            self.refused += 1;
            return Err(SignInError::Full);
        }
        let cookie = hex::encode(secret);
        let key = key_of(&cookie);
        let csrf = hex::encode(csrf);
        let identity = holder.identity.clone();
        self.next_order += 1;
        self.sessions.insert(
            key,
            Session {
                holder,
                csrf: csrf.clone(),
                expires: now + SESSION_MAX_AGE,
                order: self.next_order,
            },
        );
        Ok((
            cookie,
            Viewer {
                identity,
                csrf,
                key,
            },
        ))
    }

    /// The viewer a session cookie stands for, if it is valid now.
    pub fn viewer(&self, now: Instant, cookie: &str) -> Option<Viewer> {
        let key = key_of(cookie);
        self.session(now, &key)
    }

    /// The viewer of a session by its key, if it is still valid.
    pub fn session(&self, now: Instant, key: &[u8; 32]) -> Option<Viewer> {
        let s = self.sessions.get(key)?;
        (s.expires > now).then(|| Viewer {
            identity: s.holder.identity.clone(),
            csrf: s.csrf.clone(),
            key: *key,
        })
    }

    /// Ends a session (sign out).
    pub fn sign_out(&mut self, key: &[u8; 32]) {
        self.sessions.remove(key);
    }

    /// The allow-lists were read again: sessions and links of users who
    /// went, or whose role or key changed, end now. Returns how many
    /// sessions.
    pub fn set_users(&mut self, users: Grants) -> usize {
        let users = Some(users);
        let before = self.sessions.len();
        self.sessions.retain(|_, s| granted(&users, &s.holder));
        self.links.retain(|_, l| granted(&users, &l.holder));
        self.users = users;
        let ended = before - self.sessions.len();
        self.revoked += ended as u64;
        ended
    }

    /// The role the allow-lists grant `name` now (trusted-proxy mode).
    pub fn role_of(&self, name: &str) -> Option<Role> {
        match &self.users {
            None => Some(Role::Admin),
            Some(u) => u.get(name).map(|(role, _)| *role),
        }
    }

    /// Whether security is on (sessions carry identities).
    pub fn secure(&self) -> bool {
        self.users.is_some()
    }
}

/// A path of this dashboard: `/…`, not `//host` or `/\host` (which a
/// browser reads as another site), printable ASCII, at most 1024 bytes.
pub fn local_path(p: &str) -> bool {
    p.starts_with('/')
        && !p.starts_with("//")
        && !p.starts_with("/\\")
        && p.len() <= 1024
        && p.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PublicKey {
        PublicKey([n; 32])
    }

    fn user(name: &str, role: Role) -> Option<Identity> {
        Some(Identity::User {
            name: name.into(),
            role,
        })
    }

    fn lab() -> Sessions {
        Sessions::new(Some(HashMap::from([
            ("ann".to_string(), (Role::Submit, key(1))),
            ("ops".to_string(), (Role::Operator, key(2))),
            ("mal".to_string(), (Role::Submit, key(3))),
        ])))
    }

    /// A secret from a number (distinct per number).
    fn secret(n: u64) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[..8].copy_from_slice(&n.to_be_bytes());
        b
    }

    fn sign_in_as(
        s: &mut Sessions,
        t: Instant,
        name: &str,
        role: Role,
        k: u8,
        n: u64,
    ) -> Result<String, SignInError> {
        let token = s
            .mint_link(t, user(name, role), Some(key(k)), secret(n))
            .map_err(|_| SignInError::Full)?;
        s.sign_in(t, &token, secret(n + 1_000_000), [0; 16])
            .map(|(c, _)| c)
    }

    #[test]
    fn a_link_signs_in_once_within_its_minute() {
        let t0 = Instant::now();
        let mut s = lab();
        let token = s
            .mint_link(t0, user("ann", Role::Submit), Some(key(1)), [1; 32])
            .unwrap();
        assert_eq!(s.link_holder(t0, &token), Some(user("ann", Role::Submit)));
        let (cookie, viewer) = s.sign_in(t0, &token, [2; 32], [3; 16]).unwrap();
        assert_eq!(viewer.name(), "ann");
        assert_eq!(s.viewer(t0, &cookie), Some(viewer));
        // Used up.
        assert_eq!(
            s.sign_in(t0, &token, [4; 32], [5; 16]),
            Err(SignInError::Unknown)
        );
        // Expired.
        let late = s
            .mint_link(t0, user("ann", Role::Submit), Some(key(1)), [6; 32])
            .unwrap();
        assert_eq!(
            s.sign_in(t0 + LINK_VALID, &late, [7; 32], [8; 16]),
            Err(SignInError::Unknown)
        );
        // Guessing does not work, and is counted.
        assert_eq!(
            s.sign_in(t0, &"00".repeat(32), [9; 32], [9; 16]),
            Err(SignInError::Unknown)
        );
        assert_eq!(s.refused, 3);
    }

    #[test]
    fn sessions_end_after_twelve_hours_and_on_sign_out() {
        let t0 = Instant::now();
        let mut s = lab();
        let token = s
            .mint_link(t0, user("ops", Role::Operator), Some(key(2)), [1; 32])
            .unwrap();
        let (cookie, v) = s.sign_in(t0, &token, [2; 32], [3; 16]).unwrap();
        assert!(s
            .viewer(t0 + SESSION_MAX_AGE - Duration::from_secs(1), &cookie)
            .is_some());
        assert!(s.viewer(t0 + SESSION_MAX_AGE, &cookie).is_none());
        s.sign_out(&v.key);
        assert!(s.viewer(t0, &cookie).is_none());
    }

    #[test]
    fn a_removed_or_replaced_key_or_changed_role_ends_the_session_at_once() {
        let t0 = Instant::now();
        let mut s = lab();
        let ann = sign_in_as(&mut s, t0, "ann", Role::Submit, 1, 1).unwrap();
        let ops = sign_in_as(&mut s, t0, "ops", Role::Operator, 2, 2).unwrap();
        let mal = sign_in_as(&mut s, t0, "mal", Role::Submit, 3, 3).unwrap();
        let pending = s
            .mint_link(t0, user("ann", Role::Submit), Some(key(1)), [7; 32])
            .unwrap();
        // ann's key removed, ops demoted, mal's key replaced by another.
        let ended = s.set_users(HashMap::from([
            ("ops".to_string(), (Role::Submit, key(2))),
            ("mal".to_string(), (Role::Submit, key(9))),
        ]));
        assert_eq!(ended, 3);
        for c in [&ann, &ops, &mal] {
            assert!(s.viewer(t0, c).is_none());
        }
        assert!(s.sign_in(t0, &pending, [8; 32], [9; 16]).is_err());
        assert_eq!(s.revoked, 3);
        // The new key signs in.
        assert!(sign_in_as(&mut s, t0, "mal", Role::Submit, 9, 4).is_ok());
    }

    #[test]
    fn one_user_holds_a_bounded_share_and_locks_nobody_out() {
        let t0 = Instant::now();
        let mut s = lab();
        // mal signs in again and again: its oldest sessions go.
        let first = sign_in_as(&mut s, t0, "mal", Role::Submit, 3, 0).unwrap();
        for i in 1..200u64 {
            let t = t0 + Duration::from_millis(i);
            sign_in_as(&mut s, t, "mal", Role::Submit, 3, i * 10).unwrap();
        }
        assert_eq!(s.sessions_of("mal"), MAX_SESSIONS_PER_USER);
        assert!(s.viewer(t0, &first).is_none(), "the oldest went first");
        // mal's links: at most four wait; the fifth replaces the oldest.
        let links: Vec<String> = (0..10u64)
            .map(|i| {
                s.mint_link(
                    t0,
                    user("mal", Role::Submit),
                    Some(key(3)),
                    secret(5000 + i),
                )
                .unwrap()
            })
            .collect();
        assert!(s.sign_in(t0, &links[0], secret(1), [0; 16]).is_err());
        assert!(s.sign_in(t0, &links[9], secret(2), [0; 16]).is_ok());
        // ann and ops still sign in.
        assert!(sign_in_as(&mut s, t0, "ann", Role::Submit, 1, 7000).is_ok());
        assert!(sign_in_as(&mut s, t0, "ops", Role::Operator, 2, 8000).is_ok());
        assert!(s.replaced > 0);
    }

    #[test]
    fn submit_users_together_leave_room_for_operators() {
        let t0 = Instant::now();
        let mut users: Grants = (0..100)
            .map(|i| (format!("u{i}"), (Role::Submit, key(1))))
            .collect();
        users.insert("ops".into(), (Role::Operator, key(2)));
        let mut s = Sessions::new(Some(users));
        let mut n = 0u64;
        'fill: for i in 0..100 {
            for _ in 0..MAX_SESSIONS_PER_USER {
                n += 1;
                if sign_in_as(&mut s, t0, &format!("u{i}"), Role::Submit, 1, n).is_err() {
                    break 'fill;
                }
            }
        }
        assert_eq!(s.len(), MAX_SUBMIT_SESSIONS);
        assert_eq!(
            sign_in_as(&mut s, t0, "u99", Role::Submit, 1, 1_000_000),
            Err(SignInError::Full)
        );
        for i in 0..MAX_SESSIONS - MAX_SUBMIT_SESSIONS + 5 {
            // Past the operators' own room, ops replaces submit sessions
            // (and, past its own limit, its own oldest).
            assert!(sign_in_as(
                &mut s,
                t0,
                "ops",
                Role::Operator,
                2,
                2_000_000 + i as u64 * 2
            )
            .is_ok());
        }
    }

    #[test]
    fn the_tables_are_bounded() {
        let t0 = Instant::now();
        let mut s = Sessions::new(None);
        for i in 0..MAX_LINKS {
            s.mint_link(t0, None, None, secret(i as u64)).unwrap();
        }
        assert!(s.mint_link(t0, None, None, [0xff; 32]).is_err());
        let tokens: Vec<String> = (0..MAX_LINKS)
            .map(|i| hex::encode(secret(i as u64)))
            .collect();
        for (i, t) in tokens.iter().enumerate() {
            s.sign_in(t0, t, secret(10_000 + i as u64), [0; 16])
                .unwrap();
        }
        for i in MAX_LINKS..MAX_SESSIONS {
            let h = Holder {
                identity: None,
                key: None,
            };
            s.open(t0, h, secret(20_000 + i as u64), [0; 16]).unwrap();
        }
        let h = || Holder {
            identity: None,
            key: None,
        };
        assert_eq!(
            s.open(t0, h(), [0xee; 32], [0; 16]).unwrap_err(),
            SignInError::Full
        );
        // Expired ones make room.
        s.sweep(t0 + SESSION_MAX_AGE);
        assert!(s
            .open(t0 + SESSION_MAX_AGE, h(), [0xee; 32], [0; 16])
            .is_ok());
    }
}
