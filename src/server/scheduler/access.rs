//! Who may do what (PROTOCOL.md §15.5): the identity each secured
//! connection authenticated as, the rules per request and role, the audit
//! log, followers (progress and log lines sent on their own control
//! connection), draining workers, and revocation.
//!
//! Without security (`security = "none"`) no connection has an identity
//! and every request is allowed: the lab is closed, by the operator's word.

use super::*;
use crate::security::{Identity, Role};

/// An authenticated connection: who, and from where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    /// The peer's address as the socket reported it (`tcp://IP:PORT`).
    pub address: String,
}

/// Workers removed from the registry whose numbering is remembered, at
/// most (an operator removing and restoring keys by the thousand).
pub const MAX_DEPARTED: usize = 100_000;

/// What the scheduler keeps of a worker removed from the registry (its
/// key went) for the rest of this incarnation.
#[derive(Debug)]
pub struct Departed {
    pub session: String,
    pub dedup: DedupWindow,
    pub next_seq: u64,
}

type Refusal = (ErrorCode, String);

impl<S: Store> Scheduler<S> {
    /// A connection completed its handshake as `identity`.
    pub fn on_authenticated(&mut self, peer: &PeerId, identity: Identity, address: String) {
        self.callers
            .insert(peer.clone(), Caller { identity, address });
    }

    /// The `web_login` requests received since the last call, for the
    /// shell to mint links for ([`Scheduler::answer_web_login`]).
    pub fn take_web_logins(&mut self) -> Vec<WebLoginAsk> {
        std::mem::take(&mut self.web_logins)
    }

    /// Answers a `web_login` with the link the shell minted, or with why
    /// none could be (the session table is full).
    pub fn answer_web_login(&mut self, ask: &WebLoginAsk, link: Result<(String, u64), String>) {
        match link {
            Ok((url, expires_ms)) => {
                self.audit_peer(&ask.peer, "web_login", "single-use dashboard link issued");
                self.send(
                    &ask.peer,
                    None,
                    Body::WebLink {
                        request: ask.request,
                        url,
                        expires_ms,
                    },
                    None,
                );
            }
            Err(why) => {
                self.count("web_logins_refused", 1);
                self.send_error(&ask.peer, Some(ask.request), ErrorCode::LimitReached, why);
            }
        }
    }

    /// Appends an audit entry at `now`: identity, address, event, detail.
    pub fn audit(&mut self, now: Instant, who: &str, address: &str, event: &str, detail: &str) {
        let line = serde_json::json!({
            "at_ms": self.wall_ms(now),
            "identity": who,
            "address": address,
            "event": event,
            "detail": detail,
        })
        .to_string();
        if let Err(e) = self.store.append_audit(&line) {
            self.count("audit_write_failures", 1);
            if self.noise.allow(self.latest, "audit log errors") {
                warn!(error = %e, "storage error: cannot append to the audit log");
            }
        }
    }

    pub(super) fn audit_peer(&mut self, peer: &PeerId, event: &str, detail: &str) {
        let (who, address) = match self.callers.get(peer) {
            Some(c) => (c.identity.label(), c.address.clone()),
            None => ("anonymous".to_string(), "-".to_string()),
        };
        self.audit(self.latest, &who, &address, event, detail);
    }

    /// Checks `body` from `peer` against the rules; on refusal answers
    /// `forbidden`, logs and audits it, and returns false.
    pub(super) fn authorize(&mut self, now: Instant, peer: &PeerId, body: &Body) -> bool {
        if !self.cfg.secure {
            return true;
        }
        let verdict = match self.callers.get(peer).cloned() {
            None => Err((
                ErrorCode::Unauthenticated,
                "this connection did not authenticate".to_string(),
            )),
            Some(caller) => self.rule(&caller, body),
        };
        let Err((code, message)) = verdict else {
            return true;
        };
        self.count("requests_forbidden", 1);
        let who = self
            .callers
            .get(peer)
            .map_or("anonymous".to_string(), |c| c.identity.label());
        // Logged and audited at a bounded rate (an allow-listed but broken
        // or hostile client could otherwise fill the disk); counted always.
        if self.noise.allow(now, "forbidden requests") {
            warn!(identity = %who, kind = body.kind(), %message, "forbidden: refused a request");
            self.audit_peer(peer, "forbidden", &format!("{}: {message}", body.kind()));
        } else {
            self.count("audit_forbidden_not_logged", 1);
        }
        self.send_error(peer, body.request(), code, message);
        false
    }

    /// Another registered worker whose device has the same identity
    /// (devicegroup and deviceid; a device without a deviceid claims none).
    fn device_holder(&self, name: &str, device: &crate::protocol::DeviceProps) -> Option<&str> {
        let id = device.deviceid.as_ref()?;
        self.workers
            .iter()
            .find(|(other, w)| {
                other.as_str() != name
                    && w.device.devicegroup == device.devicegroup
                    && w.device.deviceid.as_ref() == Some(id)
            })
            .map(|(other, _)| other.as_str())
    }

    fn owner_of_task(&self, task: &TaskId) -> Option<&RunId> {
        self.tasks.get(task).map(|t| &t.run)
    }

    /// The rule for one message (PROTOCOL.md §15.5).
    fn rule(&self, caller: &Caller, body: &Body) -> Result<(), Refusal> {
        let forbidden = |m: String| Err((ErrorCode::Forbidden, m));
        let label = caller.identity.label();
        match (&caller.identity, body) {
            (Identity::Worker { name, pin }, Body::Hello { worker, device, .. }) => {
                if worker != name {
                    return forbidden(format!(
                        "{label} may register only as worker {name:?}, not {worker:?}"
                    ));
                }
                // The key serves the devices its pin allows; without a pin,
                // the device it first registered with (trust on first use).
                match (pin, self.workers.get(name)) {
                    (Some(pin), _) if !pin.allows(device) => forbidden(format!(
                        "{label} may serve only devices matching {pin} (workers.d/{name}.device), not {device}"
                    )),
                    (None, Some(known)) if known.device != *device => forbidden(format!(
                        "{label} registered with device {} first and is pinned to it; to let it serve {device}, write that device into workers.d/{name}.device on the server",
                        known.device
                    )),
                    // Trust on first use pins both ways: a device (its
                    // group and id) another key registered with first is
                    // not taken over by a new key's first registration;
                    // the operator moves it with a `.device` file.
                    (None, None) => match self.device_holder(name, device) {
                        Some(holder) => forbidden(format!(
                            "device {device} is pinned to worker {holder:?}, which registered with it first; {label} may not take it over: to move it, write the device into workers.d/{name}.device on the server (and remove workers.d/{holder}.pub if {holder:?} is gone)"
                        )),
                        None => Ok(()),
                    },
                    _ => Ok(()),
                }
            }
            // A worker reads the input files of the task it runs.
            (Identity::Worker { name, .. }, Body::GetInput { sha256, .. }) => {
                let has = self
                    .workers
                    .get(name)
                    .and_then(|w| w.task.as_ref())
                    .and_then(|t| self.tasks.get(t))
                    .and_then(|t| self.runs.get(&t.run))
                    .is_some_and(|r| r.request.inputs.iter().any(|i| i.sha256 == *sha256));
                if has {
                    Ok(())
                } else {
                    forbidden(format!(
                        "{label} may read only the input files of the task it runs"
                    ))
                }
            }
            (Identity::Worker { .. }, Body::Ping { .. }) => Ok(()),
            (Identity::Worker { .. }, b) if b.request().is_some() => forbidden(format!(
                "{label} is a worker key; client requests need a user key"
            )),
            (Identity::Worker { .. }, _) => Ok(()),
            (Identity::User { .. }, Body::Hello { .. }) => forbidden(format!(
                "{label} is a user key; a worker needs a key in workers.d"
            )),
            // A user sends client requests only (`ready`, `log`, acks…
            // are a worker's).
            (Identity::User { .. }, b) if b.request().is_none() => forbidden(format!(
                "{label} is a user key: it may send client requests only, not {}; a worker needs a key in workers.d",
                b.kind()
            )),
            (Identity::User { name, role }, b) => {
                let run = match b {
                    Body::GetStatus { run, .. }
                    | Body::GetEvents { run, .. }
                    | Body::CancelRun { run, .. }
                    | Body::ListCases { run, .. }
                    | Body::Follow { run, .. } => Some(run.clone()),
                    // The base is checked the same way below.
                    Body::Compare { run, base, .. } => match base {
                        Some(b) if self.runs.get(b).is_some_and(|t| t.request.owner.as_deref() != Some(name.as_str())) => Some(b.clone()),
                        _ => Some(run.clone()),
                    },
                    Body::GetLog { task, .. }
                    | Body::GetLogTail { task, .. }
                    | Body::FindInLog { task, .. }
                    | Body::GetFile { task, .. } => {
                        self.owner_of_task(task).cloned()
                    }
                    _ => None,
                };
                match b {
                    Body::DrainWorker { .. } if *role < Role::Operator => forbidden(format!(
                        "{label} (role {}) may not drain workers; that needs role operator or admin",
                        role.as_str()
                    )),
                    Body::WorkerHealth {
                        action: Some(_), ..
                    } if *role < Role::Operator => forbidden(format!(
                        "{label} (role {}) may not change a worker's health (check, maintenance, retire); that needs role operator or admin",
                        role.as_str()
                    )),
                    Body::GetInput { .. } if *role < Role::Operator => forbidden(format!(
                        "{label} (role {}) may not read input files back; that needs role operator or admin",
                        role.as_str()
                    )),
                    Body::RetryNotification { .. } if *role < Role::Operator => forbidden(format!(
                        "{label} (role {}) may not resend notifications; that needs role operator or admin",
                        role.as_str()
                    )),
                    Body::GetAudit { .. } if *role < Role::Admin => forbidden(format!(
                        "{label} (role {}) may not read the audit log; that needs role admin",
                        role.as_str()
                    )),
                    _ if *role >= Role::Operator => Ok(()),
                    _ => match run.and_then(|r| self.runs.get(&r).map(|t| (r, t))) {
                        // A lease's transcript: also its shared viewers'.
                        Some((_, t))
                            if matches!(b, Body::GetLog { .. } | Body::GetLogTail { .. } | Body::FindInLog { .. } | Body::GetStatus { .. })
                                && t.request.lease.as_ref().is_some_and(|l| l.shared.contains(name)) =>
                        {
                            Ok(())
                        }
                        Some((r, t)) if t.request.owner.as_deref() != Some(name.as_str()) => {
                            forbidden(format!(
                                "{label} (role submit) may see and cancel only its own testruns; {r} is {}'s",
                                t.request.owner.as_deref().unwrap_or("nobody")
                            ))
                        }
                        _ => Ok(()),
                    },
                }
            }
        }
    }

    /// The role of the user on `peer` (security on; none for workers).
    pub(super) fn caller_role(&self, peer: &PeerId) -> Option<Role> {
        match self.callers.get(peer).map(|c| &c.identity) {
            Some(Identity::User { role, .. }) => Some(*role),
            _ => None,
        }
    }

    /// The user who submits over `peer`, if security is on.
    pub(super) fn owner(&self, peer: &PeerId) -> Option<String> {
        self.callers
            .get(peer)
            .map(|c| c.identity.name().to_string())
    }

    // ------------------------------------------------------------------
    // What the server tells: heartbeats, progress, log lines
    // ------------------------------------------------------------------

    /// Sends `body` about `run` to every connection following it (log
    /// lines only to those that asked for them), and, without security,
    /// publishes it on PUB too. Best-effort, like PUB: a follower that
    /// misses some catches up with `get_events`.
    pub(super) fn tell_followers(
        &mut self,
        run: &RunId,
        topic: String,
        body: Body,
        raw: Option<Bytes>,
        is_log: bool,
    ) {
        for peer in self.followers.of(run, is_log) {
            self.send(&peer, None, body.clone(), raw.clone());
        }
        if !self.cfg.secure {
            self.out.push(Output::Publish {
                topic,
                body,
                raw,
                beat: None,
            });
        }
    }

    /// The beat of a broadcast sent now (signed with security).
    fn broadcast_beat(&mut self, now: Instant) -> Option<u64> {
        self.cfg.secure.then(|| self.beats.next(now))
    }

    /// The heartbeat, published on PUB: one message per interval whatever
    /// the fleet's size. With security the shell signs it with this
    /// incarnation's key (PUB is open to anyone; a forged or replayed
    /// heartbeat must not keep a worker believing in a dead server).
    pub(super) fn heartbeat(&mut self, now: Instant) {
        let body = Body::ServerHeartbeat {
            server: self.incarnation.clone(),
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
            sent_ms: self.wall_ms(now),
        };
        let beat = self.broadcast_beat(now);
        self.out.push(Output::Publish {
            topic: "hb".into(),
            body,
            raw: None,
            beat,
        });
    }

    /// What an orderly shutdown announces (the shell sends it last and
    /// waits until it is written): on each registered worker's control
    /// connection (sealed with security) and on PUB (signed with
    /// security), which is lossy.
    pub fn shutdown_announcement(&mut self, now: Instant) -> Vec<Output> {
        let body = Body::Shutdown {
            server: self.incarnation.clone(),
        };
        let beat = self.broadcast_beat(now);
        let peers: Vec<PeerId> = self.peers.keys().cloned().collect();
        for peer in peers {
            self.send(&peer, None, body.clone(), None);
        }
        self.out.push(Output::Publish {
            topic: "hb".into(),
            body,
            raw: None,
            beat,
        });
        self.take_outputs()
    }

    pub(super) fn follow(
        &mut self,
        peer: &PeerId,
        request: u64,
        run: RunId,
        logs: bool,
    ) -> Result<Body, Refusal> {
        if !self.runs.contains_key(&run) {
            return Err((
                ErrorCode::UnknownRun,
                format!("no testrun {run:?} on this server"),
            ));
        }
        // One followed run per connection: a new follow replaces the old.
        if !self.followers.follow(peer, &run, logs) {
            self.count("follows_over_limit", 1);
            return Err((
                ErrorCode::LimitReached,
                format!("testrun {run} has {MAX_FOLLOWERS_PER_RUN} followers already; poll with status instead"),
            ));
        }
        Ok(Body::Following { request, run })
    }

    pub(super) fn unfollow(&mut self, peer: &PeerId) {
        self.followers.unfollow(peer);
    }

    /// Forgets what belongs to a closed connection (identity, follows).
    pub(super) fn forget_connection(&mut self, peer: &PeerId) {
        self.callers.remove(peer);
        self.unfollow(peer);
        self.forget_consoles(peer);
    }

    // ------------------------------------------------------------------
    // Drain, revocation
    // ------------------------------------------------------------------

    pub(super) fn drain(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        name: &str,
        drain: bool,
    ) -> Result<Body, Refusal> {
        if !self.workers.contains_key(name) {
            return Err((
                ErrorCode::BadRequest,
                format!("no worker {name:?} on this server"),
            ));
        }
        if drain {
            self.drained.insert(name.to_string());
            self.clear_ready(name);
        } else {
            self.drained.remove(name);
        }
        self.pending.workers.insert(name.to_string());
        info!(worker = %name, drain, "worker drain changed");
        self.audit_peer(
            peer,
            if drain { "drain" } else { "undrain" },
            &format!("worker {name}"),
        );
        Ok(Body::Workers {
            request,
            workers: vec![self.worker_info(now, name)],
        })
    }

    pub(super) fn worker_info(&self, now: Instant, name: &str) -> WorkerInfo {
        let w = &self.workers[name];
        WorkerInfo {
            name: w.name.clone(),
            device: w.device.clone(),
            state: w.state,
            task: w.task.clone(),
            last_heard_ms_ago: now.saturating_duration_since(w.last_heard).as_millis() as u64,
            drained: self.drained.contains(name),
            version: self.versions.get(name).cloned(),
            console: self.consoles.get(name).cloned(),
            pinned: self.pins.get(name).cloned(),
            health: w.health.health,
            health_reason: w.health.reason.clone(),
            health_since_ms: w.health.since_ms,
        }
    }

    /// A connection's key was revoked (removed or changed in the
    /// allow-list): the shell closed it; whatever it had in flight is not
    /// applied. A worker on it is lost at once and its task, if any, is
    /// re-queued without waiting for a grace period it cannot use.
    pub fn on_revoked(&mut self, now: Instant, peer: &PeerId, identity: &Identity) {
        self.latest = self.latest.max(now);
        let address = self
            .callers
            .get(peer)
            .map_or("-".to_string(), |c| c.address.clone());
        self.count("sessions_revoked", 1);
        warn!(identity = %identity.label(), %address, "key revoked: closed its session");
        self.audit(
            self.latest,
            &identity.label(),
            &address,
            "revoked",
            "session closed: key removed or changed",
        );
        self.on_peer_closed(now, peer);
        if let Identity::User { name, .. } = identity {
            self.revoke_leases(now, name);
        }
    }

    /// Drops from the registry every worker `allowed` does not name, so
    /// only allow-listed identities are listed (after a revocation, or on
    /// a restart with keys removed meanwhile). A dropped worker's task is
    /// re-queued or ended by the usual rules for a lost worker.
    pub fn retain_workers(&mut self, now: Instant, allowed: impl Fn(&str) -> bool) {
        let gone: Vec<String> = self
            .workers
            .keys()
            .filter(|n| !allowed(n))
            .cloned()
            .collect();
        for name in gone {
            if let Some(peer) = self.workers.get(&name).and_then(|w| w.peer.clone()) {
                self.on_peer_closed(now, &peer);
            }
            if !self.workers[&name].state.is_gone() {
                self.worker_lost(now, &name, "its key is no longer allowed");
            }
            if let Some(task) = self.workers.get_mut(&name).and_then(|w| w.task.take()) {
                if self
                    .tasks
                    .get(&task)
                    .is_some_and(|t| t.state == TaskState::Held)
                {
                    self.requeue_or_fail(
                        now,
                        &task,
                        format!("worker {name} lost: its key is no longer allowed"),
                    );
                }
            }
            self.clear_ready(&name);
            let keys = self.workers[&name].routing_keys();
            self.index_device(keys, Vec::new());
            if let Some(w) = self.workers.remove(&name) {
                // Kept for this incarnation in case the key comes back
                // (see `on_hello`). Its drain flag stays too: restoring a
                // key does not undrain a worker.
                if self.departed.len() >= MAX_DEPARTED {
                    self.departed.clear();
                }
                self.departed.insert(
                    name.clone(),
                    Departed {
                        session: w.session,
                        dedup: w.dedup,
                        next_seq: w.outbox.next_seq(),
                    },
                );
            }
            self.versions.remove(&name);
            self.pins.remove(&name);
            self.consoles.remove(&name);
            self.outboxes.remove(&name);
            self.armed.remove(&name);
            self.pending.removed_workers.push(name.clone());
            info!(worker = %name, "worker removed from the registry: its key is no longer allowed");
        }
    }

    // ------------------------------------------------------------------
    // Secrets at rest
    // ------------------------------------------------------------------

    /// Seals a testrun's secrets for the state database: ChaCha20-Poly1305
    /// under the key derived from the server's private key, random nonce
    /// first, the run id as associated data (a sealed blob moved to another
    /// run does not open).
    pub(super) fn seal_secrets(
        &self,
        run: &RunId,
        secrets: &BTreeMap<String, String>,
    ) -> Option<Vec<u8>> {
        use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
        if secrets.is_empty() {
            return None;
        }
        let key = self.cfg.secrets_key?;
        let cipher = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).ok()?);
        let nonce: [u8; 12] = rand::random();
        let mut sealed = rmp_serde::to_vec(secrets).expect("secrets serialise");
        cipher
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(run.as_bytes()),
                &mut sealed,
            )
            .expect("sealing");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        Some(out)
    }

    /// Opens what [`Self::seal_secrets`] made; `None` if it does not open.
    pub(super) fn open_secrets(
        &self,
        run: &RunId,
        sealed: &[u8],
    ) -> Option<BTreeMap<String, String>> {
        use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
        let key = self.cfg.secrets_key?;
        if sealed.len() < 12 {
            return None;
        }
        let (nonce, body) = sealed.split_at(12);
        let cipher = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).ok()?);
        let mut body = body.to_vec();
        let plain = cipher
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(run.as_bytes()),
                &mut body,
            )
            .ok()?;
        rmp_serde::from_slice(plain).ok()
    }
}
