//! Who is signed in to the dashboard: single-use sign-in links minted for
//! an identity that authenticated over Noise (`ots-submit web`), and the
//! sessions they turn into. I/O-free, with the clock passed in; the shell
//! tells it the users the allow-lists grant after every reload, and a
//! session whose user went or changed role ends at that moment.
//!
//! Secrets (link tokens, session cookies) are 32 random bytes shown as
//! hex; the tables are keyed by their SHA-256, so a lookup's timing says
//! nothing about a secret's bytes.

use crate::security::{Identity, Role};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A sign-in link is valid this long, once.
pub const LINK_VALID: Duration = Duration::from_secs(60);
/// A session ends this long after sign-in, whatever happens.
pub const SESSION_MAX_AGE: Duration = Duration::from_secs(12 * 3600);
/// Sessions at most; a sign-in past it is refused (expired ones go first).
pub const MAX_SESSIONS: usize = 1000;
/// Sign-in links not yet used, at most.
pub const MAX_LINKS: usize = 100;

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
        match &self.identity {
            Some(Identity::User { role, .. }) => *role,
            Some(Identity::Worker { .. }) => Role::Submit,
            None => Role::Admin,
        }
    }
}

/// Why a sign-in did not give a session.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignInError {
    #[error("this sign-in link is unknown, used already or older than 60 s: run `ots-submit web` again for a new one")]
    Unknown,
    #[error("the dashboard has {MAX_SESSIONS} sessions already: sign out elsewhere, or wait until old sessions expire")]
    Full,
    #[error("the user this link was issued to is no longer allowed (its key or role changed): run `ots-submit web` again")]
    Revoked,
}

struct Link {
    identity: Option<Identity>,
    expires: Instant,
}

struct Session {
    identity: Option<Identity>,
    csrf: String,
    expires: Instant,
}

/// The sign-in links and sessions.
pub struct Sessions {
    links: HashMap<[u8; 32], Link>,
    sessions: HashMap<[u8; 32], Session>,
    /// The users the allow-lists grant and their roles; none without
    /// security (nothing to revoke by).
    users: Option<HashMap<String, Role>>,
    /// Sessions ended because their user went or changed role.
    pub revoked: u64,
    /// Sign-ins refused (unknown or used link, full table).
    pub refused: u64,
}

fn key_of(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Sessions {
    pub fn new(users: Option<HashMap<String, Role>>) -> Self {
        Sessions {
            links: HashMap::new(),
            sessions: HashMap::new(),
            users,
            revoked: 0,
            refused: 0,
        }
    }

    /// Sessions now (signed in, not expired at the last sweep).
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn allowed(&self, identity: &Option<Identity>) -> bool {
        match (&self.users, identity) {
            (None, _) => true,
            (Some(users), Some(Identity::User { name, role })) => users.get(name) == Some(role),
            (Some(_), _) => false,
        }
    }

    /// Forgets expired links and sessions.
    pub fn sweep(&mut self, now: Instant) {
        self.links.retain(|_, l| l.expires > now);
        self.sessions.retain(|_, s| s.expires > now);
    }

    /// A new single-use link for `identity`; `secret` is 32 random bytes.
    /// Returns the token to put into the link.
    pub fn mint_link(
        &mut self,
        now: Instant,
        identity: Option<Identity>,
        secret: [u8; 32],
    ) -> Result<String, String> {
        self.sweep(now);
        if self.links.len() >= MAX_LINKS {
            self.refused += 1;
            return Err(format!(
                "{MAX_LINKS} dashboard sign-in links are waiting to be used; try again within a minute"
            ));
        }
        let token = hex::encode(secret);
        self.links.insert(
            key_of(&token),
            Link {
                identity,
                expires: now + LINK_VALID,
            },
        );
        Ok(token)
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
        if !self.allowed(&link.identity) {
            self.refused += 1;
            return Err(SignInError::Revoked);
        }
        self.open(now, link.identity, secret, csrf)
    }

    /// A session for `identity` without a link: the trusted-proxy mode,
    /// where the proxy in front authenticated the user.
    pub fn open(
        &mut self,
        now: Instant,
        identity: Option<Identity>,
        secret: [u8; 32],
        csrf: [u8; 16],
    ) -> Result<(String, Viewer), SignInError> {
        if self.sessions.len() >= MAX_SESSIONS {
            self.sweep(now);
            if self.sessions.len() >= MAX_SESSIONS {
                self.refused += 1;
                return Err(SignInError::Full);
            }
        }
        let cookie = hex::encode(secret);
        let key = key_of(&cookie);
        let csrf = hex::encode(csrf);
        self.sessions.insert(
            key,
            Session {
                identity: identity.clone(),
                csrf: csrf.clone(),
                expires: now + SESSION_MAX_AGE,
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
            identity: s.identity.clone(),
            csrf: s.csrf.clone(),
            key: *key,
        })
    }

    /// Ends a session (sign out).
    pub fn sign_out(&mut self, key: &[u8; 32]) {
        self.sessions.remove(key);
    }

    /// The allow-lists were read again: sessions and links of users who
    /// went or whose role changed end now. Returns how many sessions.
    pub fn set_users(&mut self, users: HashMap<String, Role>) -> usize {
        self.users = Some(users);
        let before = self.sessions.len();
        let users = self.users.take();
        let allowed = |i: &Option<Identity>| match (&users, i) {
            (None, _) => true,
            (Some(u), Some(Identity::User { name, role })) => u.get(name) == Some(role),
            (Some(_), _) => false,
        };
        self.sessions.retain(|_, s| allowed(&s.identity));
        self.links.retain(|_, l| allowed(&l.identity));
        self.users = users;
        let ended = before - self.sessions.len();
        self.revoked += ended as u64;
        ended
    }

    /// The role the allow-lists grant `name` now (trusted-proxy mode).
    pub fn role_of(&self, name: &str) -> Option<Role> {
        match &self.users {
            None => Some(Role::Admin),
            Some(u) => u.get(name).copied(),
        }
    }

    /// Whether security is on (sessions carry identities).
    pub fn secure(&self) -> bool {
        self.users.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, role: Role) -> Option<Identity> {
        Some(Identity::User {
            name: name.into(),
            role,
        })
    }

    fn lab() -> Sessions {
        Sessions::new(Some(HashMap::from([
            ("ann".to_string(), Role::Submit),
            ("ops".to_string(), Role::Operator),
        ])))
    }

    #[test]
    fn a_link_signs_in_once_within_its_minute() {
        let t0 = Instant::now();
        let mut s = lab();
        let token = s.mint_link(t0, user("ann", Role::Submit), [1; 32]).unwrap();
        let (cookie, viewer) = s.sign_in(t0, &token, [2; 32], [3; 16]).unwrap();
        assert_eq!(viewer.name(), "ann");
        assert_eq!(s.viewer(t0, &cookie), Some(viewer));
        // Used up.
        assert_eq!(
            s.sign_in(t0, &token, [4; 32], [5; 16]),
            Err(SignInError::Unknown)
        );
        // Expired.
        let late = s.mint_link(t0, user("ann", Role::Submit), [6; 32]).unwrap();
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
            .mint_link(t0, user("ops", Role::Operator), [1; 32])
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
    fn a_removed_key_or_changed_role_ends_the_session_at_once() {
        let t0 = Instant::now();
        let mut s = lab();
        let a = s.mint_link(t0, user("ann", Role::Submit), [1; 32]).unwrap();
        let (ann, _) = s.sign_in(t0, &a, [2; 32], [3; 16]).unwrap();
        let o = s
            .mint_link(t0, user("ops", Role::Operator), [4; 32])
            .unwrap();
        let (ops, _) = s.sign_in(t0, &o, [5; 32], [6; 16]).unwrap();
        let pending = s.mint_link(t0, user("ann", Role::Submit), [7; 32]).unwrap();
        // ann's key removed, ops demoted.
        let ended = s.set_users(HashMap::from([("ops".to_string(), Role::Submit)]));
        assert_eq!(ended, 2);
        assert!(s.viewer(t0, &ann).is_none());
        assert!(s.viewer(t0, &ops).is_none());
        assert!(s.sign_in(t0, &pending, [8; 32], [9; 16]).is_err());
        assert_eq!(s.revoked, 2);
    }

    #[test]
    fn the_tables_are_bounded() {
        let t0 = Instant::now();
        let mut s = Sessions::new(None);
        for i in 0..MAX_LINKS {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_be_bytes());
            s.mint_link(t0, None, b).unwrap();
        }
        assert!(s.mint_link(t0, None, [0xff; 32]).is_err());
        for i in 0..MAX_SESSIONS {
            let mut b = [0u8; 32];
            b[..8].copy_from_slice(&(i as u64).to_be_bytes());
            s.open(t0, None, b, [0; 16]).unwrap();
        }
        assert_eq!(
            s.open(t0, None, [0xee; 32], [0; 16]).unwrap_err(),
            SignInError::Full
        );
        // Expired ones make room.
        assert!(s
            .open(t0 + SESSION_MAX_AGE, None, [0xee; 32], [0; 16])
            .is_ok());
    }
}
