//! The worker registry: registration (`hello`), one live worker per name,
//! and the server's mandatory messages to each worker (its outbox).

use super::*;

impl<S: Store> Scheduler<S> {
    /// Moves a worker's routing keys in the index of known devices.
    pub(super) fn index_device(&mut self, old: Vec<String>, new: Vec<String>) {
        for key in old {
            if let Some(n) = self.known.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.known.remove(&key);
                }
            }
        }
        for key in new {
            *self.known.entry(key).or_default() += 1;
        }
    }

    /// The connection of `peer` closed (the socket monitor says so): a
    /// worker on it is lost at once, not after the liveness window, and its
    /// peer mapping goes (a new connection brings a new `hello`). A hung
    /// worker keeps its connection and is caught by heartbeats instead.
    pub fn on_peer_closed(&mut self, now: Instant, peer: &PeerId) {
        self.latest = self.latest.max(now);
        self.forget_connection(peer);
        self.forget_input_uploads(peer);
        let Some(name) = self.peers.remove(peer) else {
            return;
        };
        let Some(w) = self.workers.get_mut(&name) else {
            return;
        };
        if w.peer.as_ref() == Some(peer) {
            w.peer = None;
        }
        if !w.state.is_gone() {
            self.count("workers_lost_connection_closed", 1);
            self.worker_lost(now, &name, "its connection closed");
        }
    }

    pub(super) fn on_hello(
        &mut self,
        now: Instant,
        peer: &PeerId,
        name: String,
        session: String,
        device: DeviceProps,
        running: Vec<TaskId>,
    ) {
        if self.refuse_hello(now, peer, &name, &session, &device) {
            return;
        }
        self.register(now, peer, &name, session, device);
        self.reconcile(now, peer, &name, running);
        self.welcome(now, peer, &name);
    }

    /// Refuses a hello it cannot take (answered here): an invalid device,
    /// a name a live worker holds, a full registry.
    fn refuse_hello(
        &mut self,
        now: Instant,
        peer: &PeerId,
        name: &str,
        session: &str,
        device: &DeviceProps,
    ) -> bool {
        if let Err(e) = device.validate() {
            self.send_error(
                peer,
                None,
                ErrorCode::BadRequest,
                format!("hello from {name:?}: {e}"),
            );
            return true;
        }
        // Two live workers with one name would steal each other's tasks and
        // messages: the one already registered keeps the name. A worker
        // restarted on the same state directory keeps its session, so it
        // takes over at once; a silent or lost one can be replaced.
        let liveness = self.cfg.heartbeat.saturating_mul(self.cfg.liveness);
        if let Some(w) = self.workers.get(name) {
            let alive = w.peer.is_some()
                && !w.state.is_gone()
                && now.saturating_duration_since(w.last_heard) <= liveness;
            if alive && w.session != session {
                let registered = w.session.clone();
                self.count("hello_name_in_use", 1);
                if self.noise.allow(now, "refused hellos") {
                    warn!(worker = %name, session = %session, registered_session = %registered, "refused a hello: the worker name is in use by a live worker with another session (two workers started with the same name?)");
                }
                self.send_error(
                    peer,
                    None,
                    ErrorCode::NameInUse,
                    format!(
                        "worker name {name:?} is in use by a live worker (session {registered}); give each worker its own name, or stop the other one"
                    ),
                );
                return true;
            }
        }
        if !self.workers.contains_key(name) && self.workers.len() >= self.cfg.limits.max_workers {
            self.count("hello_over_worker_limit", 1);
            if self.noise.allow(now, "refused hellos") {
                warn!(worker = %name, limit = self.cfg.limits.max_workers, "refused a hello: the worker registry is full (limits.max_workers)");
            }
            self.send_error(
                peer,
                None,
                ErrorCode::LimitReached,
                format!(
                    "the server knows {} workers, its limit (limits.max_workers); ask the operator",
                    self.workers.len()
                ),
            );
            return true;
        }
        false
    }

    /// The worker in the registry, on this connection, with this device;
    /// a new process (session) starts its dedup window afresh.
    fn register(
        &mut self,
        now: Instant,
        peer: &PeerId,
        name: &str,
        session: String,
        device: DeviceProps,
    ) {
        let name = name.to_string();
        // Registering anew: not waiting for work until it says `ready`
        // (and its device, hence its routing keys, may have changed).
        self.clear_ready(&name);
        self.pending.workers.insert(name.clone());
        let old_keys = self.workers.get(&name).map(Worker::routing_keys);
        // A worker removed from the registry earlier in this incarnation
        // (its key went, and came back) continues its numbering and its
        // dedup window: the worker process deduplicates our messages per
        // server incarnation, so a number reused would be acknowledged
        // and silently dropped as a duplicate — a wedged worker.
        let departed = self.departed.remove(&name);
        let retry = self.cfg.retry.clone();
        let unix_now = self.wall_ms(now);
        let worker = self.workers.entry(name.clone()).or_insert_with(|| {
            let (dedup, next_seq) = match departed {
                Some(d) if d.session == session => (d.dedup, d.next_seq),
                Some(d) => (DedupWindow::default(), d.next_seq),
                None => (DedupWindow::default(), 1),
            };
            Worker {
                name: name.clone(),
                device: device.clone(),
                session: session.clone(),
                peer: None,
                state: WorkerState::Idle,
                ready_since: None,
                task: None,
                last_heard: now,
                dedup,
                outbox: Outbox::restore(retry, next_seq, Vec::new()),
                health: WorkerHealth::new(unix_now),
                recent: VecDeque::new(),
            }
        });
        if let Some(old) = worker.peer.take() {
            self.peers.remove(&old);
        }
        if worker.session != session {
            info!(worker = %name, "worker process restarted (new session)");
            worker.session = session;
            worker.dedup = DedupWindow::default();
            // What was pending for the old process is moot; its task is
            // reconciled from `running` below. Numbering goes on where it
            // was: the worker deduplicates per server incarnation, so a
            // number must never be reused within one.
            worker.outbox =
                Outbox::restore(self.cfg.retry.clone(), worker.outbox.next_seq(), Vec::new());
        } else {
            worker.outbox.resend_all();
        }
        // With security, what the key may serve (shown by `workers`).
        if let Some(Caller {
            identity: crate::security::Identity::Worker { pin, .. },
            ..
        }) = self.callers.get(peer)
        {
            let shown = match pin {
                Some(pin) => pin.to_string(),
                None => format!("{device} (its first registration)"),
            };
            self.pins.insert(name.clone(), shown);
        }
        let worker = self.workers.get_mut(&name).expect("worker");
        worker.device = device;
        worker.peer = Some(peer.clone());
        worker.last_heard = now;
        self.peers.insert(peer.clone(), name.clone());
        self.schedule_worker(&name);
        if !self.workers[&name].outbox.is_empty() {
            self.outboxes.insert(name.clone());
        }
        let new_keys = self.workers[&name].routing_keys();
        if old_keys.as_ref() != Some(&new_keys) {
            self.index_device(old_keys.unwrap_or_default(), new_keys);
        }
        info!(worker = %name, device = %self.workers[&name].device, "worker registered");
        if self.cfg.secure {
            let detail = format!("worker {name} ({})", self.workers[&name].device);
            self.audit_peer(peer, "registered", &detail);
        }
    }

    /// What the worker runs against what we think it runs: a held task
    /// goes on, a dispatch it never got goes again, a task it lost fails
    /// as the infrastructure's, and one we do not know on it is closed.
    fn reconcile(&mut self, now: Instant, peer: &PeerId, name: &str, running: Vec<TaskId>) {
        let name = name.to_string();
        let ours = self.workers[&name].task.clone();
        if let Some(task) = ours {
            if running.contains(&task) {
                if let Some(t) = self.tasks.get_mut(&task) {
                    if t.state == TaskState::Held {
                        t.state = TaskState::Running;
                        t.since = now;
                        self.pending.tasks.insert(task.clone());
                        self.schedule_task(&task);
                        info!(worker = %name, task = %task, "worker is back; it still has the held task");
                    }
                }
            } else if self.never_accepted(&task) && running.is_empty() {
                // The dispatch never reached it (lost with a server that
                // crashed or was deposed before the worker's ack): not a
                // failure of the worker — the same attempt goes to it
                // again, unless that dispatch is still pending here.
                if !self.workers[&name].outbox.has_task(&task) {
                    info!(worker = %name, task = %task, "worker is back without a task it never accepted: dispatching it again (same attempt)");
                    self.count("dispatches_resent", 1);
                    let t = self.tasks.get_mut(&task).expect("task");
                    t.attempts = t.attempts.saturating_sub(1);
                    self.dispatch(now, &name, &task);
                }
            } else {
                self.workers.get_mut(&name).expect("worker").task = None;
                let why = format!("worker {name} came back without the task");
                self.infrastructure_failure(now, &task, &name, why);
            }
        }
        for task in running {
            if self.workers[&name].task.as_ref() != Some(&task) {
                self.count("orphan_control", 1);
                self.send(
                    peer,
                    Some(&task),
                    Body::TaskClosed {
                        task: task.clone(),
                        attempt: None,
                        reason: "the server does not know this task on this worker".into(),
                    },
                    None,
                );
            }
        }
    }

    /// The worker's state, its health told it registered, the welcome.
    fn welcome(&mut self, now: Instant, peer: &PeerId, name: &str) {
        let name = name.to_string();
        let w = self.workers.get_mut(&name).expect("worker");
        w.state = if w.task.is_some() {
            WorkerState::Busy
        } else {
            WorkerState::Idle
        };
        // New, or its device changed: unknown until checked.
        let shown = self.workers[&name].device.to_string();
        let has_check = self.check_of(&name).is_some();
        self.health_event(
            now,
            &name,
            crate::server::health::Event::Registered {
                device: &shown,
                has_check,
            },
        );
        let welcome = Body::Welcome {
            server: self.incarnation.clone(),
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u64,
            liveness: self.cfg.liveness,
            sent_ms: self.wall_ms(now),
            events_key: self.cfg.events_key.map(hex::encode),
            beat: self.beats.current(now),
        };
        self.send(peer, None, welcome, None);
        self.flush_worker(now, &name);
    }

    /// Whether the task's current attempt was dispatched but never
    /// accepted by its worker (no `running` in its history): after a
    /// restart or failover it is HELD like a running one, yet its worker
    /// may simply never have received the dispatch.
    fn never_accepted(&self, task: &TaskId) -> bool {
        self.tasks.get(task).is_some_and(|t| {
            matches!(t.state, TaskState::Dispatched | TaskState::Held)
                && t.attempts > 0
                && !t
                    .history
                    .iter()
                    .any(|h| h.attempt == t.attempts && h.state == ProgressState::Running)
        })
    }

    /// Sends the worker's due mandatory messages (first sends and resends).
    pub(super) fn flush_worker(&mut self, now: Instant, name: &str) {
        let Some(w) = self.workers.get_mut(name) else {
            return;
        };
        let Some(peer) = w.peer.clone() else { return };
        if w.state.is_gone() {
            return;
        }
        for o in w.outbox.due(now) {
            self.out_raw_bytes += o.raw.as_ref().map_or(0, |r| r.len());
            self.out.push(Output::Send {
                peer: peer.clone(),
                header: o.header,
                body: o.body,
                raw: o.raw,
            });
        }
    }

    /// Queues a mandatory message to a worker and sends it at once.
    pub(super) fn send_mandatory(&mut self, now: Instant, worker: &str, task: &TaskId, body: Body) {
        let _ = self.send_mandatory_raw(now, worker, task, body, None);
    }

    /// [`Self::send_mandatory`] with a raw frame (console input).
    pub(super) fn send_mandatory_raw(
        &mut self,
        now: Instant,
        worker: &str,
        task: &TaskId,
        body: Body,
        raw: Option<Bytes>,
    ) -> Option<u64> {
        let attempt = self.tasks.get(task).map(|t| t.attempts);
        let seq = self.workers.get_mut(worker).map(|w| {
            let seq = w.outbox.push(Some(task.clone()), attempt, body, raw);
            self.outboxes.insert(worker.to_string());
            seq
        });
        self.flush_worker(now, worker);
        seq
    }
}
