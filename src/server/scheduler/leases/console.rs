//! The consoles of a lease and its power: attach (with the replay of what
//! the device printed in the last `since_ms`), the worker's output
//! forwarded to every console (a gap in its offsets is output lost:
//! counted and told), the holder's input applied exactly once and in
//! order per input stream, power actions carried to the worker and their
//! answers back.

use super::*;

impl<S: Store> Scheduler<S> {
    /// The live lease a console request names, held (not waiting).
    fn held_lease(&self, lease: &LeaseId) -> Result<&Live, (ErrorCode, String)> {
        let Some(r) = self.runs.get(lease).filter(|r| r.request.lease.is_some()) else {
            return Err((
                ErrorCode::UnknownRun,
                format!("no lease {lease:?} on this server"),
            ));
        };
        let Some(l) = self.leases.live.get(lease) else {
            let why = r
                .request
                .lease
                .as_ref()
                .and_then(|t| t.ended.clone())
                .unwrap_or_else(|| "it ended".into());
            return Err((
                ErrorCode::BadRequest,
                format!("lease {lease} has ended: {why}"),
            ));
        };
        if r.state == RunState::Queued {
            return Err((
                ErrorCode::BadRequest,
                format!("lease {lease} is still waiting for a device (ots-submit leases shows its place)"),
            ));
        }
        Ok(l)
    }

    /// May `peer` watch (false) or type into (true) this lease's console?
    fn console_right(&self, peer: &PeerId, lease: &LeaseId) -> Result<bool, (ErrorCode, String)> {
        if !self.cfg.secure {
            return Ok(true);
        }
        let r = &self.runs[lease];
        let me = self.owner(peer);
        if me.is_some() && me == r.request.owner {
            return Ok(true);
        }
        let shared = me.as_ref().is_some_and(|m| {
            r.request
                .lease
                .as_ref()
                .is_some_and(|t| t.shared.contains(m))
        });
        if shared || self.caller_role(peer).is_some_and(|r| r >= Role::Operator) {
            return Ok(false);
        }
        Err((
            ErrorCode::Forbidden,
            format!(
                "{} may not see the console of lease {lease}: it is {}'s (its holder may share it: ots-submit lease share {lease} USER)",
                me.as_deref().unwrap_or("anonymous"),
                r.request.owner.as_deref().unwrap_or("nobody")
            ),
        ))
    }

    /// `console_attach`: answered `console_attached`, the replay, and
    /// from then on every byte of output.
    pub(in crate::server::scheduler) fn on_console_attach(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        lease: LeaseId,
        since_ms: u64,
    ) -> Result<(), (ErrorCode, String)> {
        self.held_lease(&lease)?;
        let writer = self.console_right(peer, &lease)?;
        let user = self.owner(peer);
        let (per_lease, per_user) = (
            self.cfg.leases.consoles_per_lease,
            self.cfg.leases.consoles_per_user,
        );
        let l = &self.leases.live[&lease];
        let attached = l.consoles.len();
        if !l.consoles.contains_key(peer) && attached >= per_lease {
            self.count("consoles_over_limit", 1);
            return Err((
                ErrorCode::LimitReached,
                format!(
                    "lease {lease} has {attached} consoles attached, the limit ([leases] consoles_per_lease)"
                ),
            ));
        }
        if let Some(u) = user.as_deref() {
            if self.leases.consoles_of(u) >= per_user {
                self.count("consoles_over_limit", 1);
                return Err((
                    ErrorCode::LimitReached,
                    format!(
                        "user {u} has {per_user} consoles attached, the per-user limit ([leases] consoles_per_user): close one"
                    ),
                ));
            }
        }
        let l = &self.leases.live[&lease];
        let worker = self.tasks[&l.task].worker.clone().unwrap_or_default();
        let task = l.task.clone();
        let next = l.out_end;
        let l = self.leases.live.get_mut(&lease).expect("live");
        if writer {
            l.hold.heard(now);
        }
        l.consoles.insert(
            peer.clone(),
            Attach {
                request,
                writer,
                user: user.clone(),
            },
        );
        let since = now.checked_sub(Duration::from_millis(since_ms));
        let replay: Vec<(u64, Bytes)> = l
            .replay
            .iter()
            .filter(|(at, _, _)| since.is_none_or(|s| *at >= s))
            .map(|(_, o, b)| (*o, b.clone()))
            .collect();
        self.leases
            .by_peer
            .entry(peer.clone())
            .or_default()
            .insert(lease.clone());
        self.count("consoles_attached", 1);
        let who = user.as_deref().unwrap_or("-").to_string();
        let role = if writer { "holder" } else { "viewer" };
        self.audit_peer(peer, "console_attach", &format!("{lease} as {role}"));
        self.note_in_transcript(&task, format!("{who} attached a console ({role})"));
        self.send(
            peer,
            None,
            Body::ConsoleAttached {
                request,
                lease: lease.clone(),
                writer,
                worker,
                next,
            },
            None,
        );
        for (offset, bytes) in replay {
            self.send(
                peer,
                None,
                Body::ConsoleOutput {
                    request,
                    lease: lease.clone(),
                    offset,
                    dropped: 0,
                },
                Some(bytes),
            );
        }
        Ok(())
    }

    /// `console_detach`: the console closes (said with `console_closed`).
    pub(in crate::server::scheduler) fn on_console_detach(
        &mut self,
        peer: &PeerId,
        request: u64,
        lease: LeaseId,
    ) -> Result<Body, (ErrorCode, String)> {
        let removed = self
            .leases
            .live
            .get_mut(&lease)
            .and_then(|l| l.consoles.remove(peer).map(|a| (a, l.task.clone())));
        if let Some(set) = self.leases.by_peer.get_mut(peer) {
            set.remove(&lease);
            if set.is_empty() {
                self.leases.by_peer.remove(peer);
            }
        }
        if let Some((a, task)) = removed {
            let who = a.user.as_deref().unwrap_or("-").to_string();
            self.note_in_transcript(&task, format!("{who} detached"));
        }
        Ok(Body::ConsoleClosed {
            request,
            lease,
            reason: "detached".into(),
        })
    }

    /// `console_input`: bytes at `offset` of the holder's `stream`. What
    /// the server has not forwarded yet goes to the worker once, in order
    /// (its outbox), with its place in the stream, so the worker writes
    /// only what the device has not had (PROTOCOL.md §18.4). The answer
    /// says how much of the stream the *worker* has acknowledged; what
    /// it acknowledges later is answered then (`console_input_ack` to the
    /// last request of the stream). A stream the server does not know (a
    /// new session, or any after a server restart) starts where it says.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::server::scheduler) fn on_console_input(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        lease: LeaseId,
        stream: String,
        offset: u64,
        raw: Option<Bytes>,
    ) -> Result<Body, (ErrorCode, String)> {
        self.held_lease(&lease)?;
        if !self.console_right(peer, &lease)? {
            self.count("console_input_refused", 1);
            return Err((
                ErrorCode::Forbidden,
                format!("only the holder of lease {lease} types into its console; viewers read"),
            ));
        }
        let bytes = raw.unwrap_or_default();
        let rate = self.cfg.leases.input_bytes_per_sec;
        // The task that has the device: the hold, or a testrun on the lease.
        let target = self.lease_task_now(&lease);
        let l = self.leases.live.get_mut(&lease).expect("held");
        l.hold.heard(now);
        if !l.inputs.iter().any(|i| i.id == stream) {
            l.inputs.push_back(InputState {
                id: stream.clone(),
                have: offset,
                sent: offset,
                reply: None,
            });
            while l.inputs.len() > INPUT_STREAMS {
                l.inputs.pop_front();
            }
        }
        let i = l
            .inputs
            .iter_mut()
            .find(|i| i.id == stream)
            .expect("just made");
        i.reply = Some((peer.clone(), request));
        let (have, sent) = (i.have, i.sent);
        let end = offset.saturating_add(bytes.len() as u64);
        let ack = Ok(Body::ConsoleInputAck {
            request,
            lease: lease.clone(),
            stream: stream.clone(),
            have,
        });
        if offset > sent {
            // A gap: something before it was lost; resend from `have`.
            return ack;
        }
        if end <= sent {
            self.count("console_input_duplicates", 1);
            return ack;
        }
        let new = bytes.slice((sent - offset) as usize..);
        if sent.saturating_sub(have) > INPUT_IN_FLIGHT_BYTES
            || l.in_flight >= INPUT_IN_FLIGHT_MESSAGES
        {
            self.count("console_input_waiting_for_worker", 1);
            return Err((
                ErrorCode::LimitReached,
                format!("the device of lease {lease} has not taken the input before yet: resend from byte {have} a little later"),
            ));
        }
        let Some(task) = target else {
            // Between the hold and a testrun on the lease: nothing taken.
            return Err((
                ErrorCode::LimitReached,
                format!("the device of lease {lease} is between tasks: resend from byte {have} in a moment"),
            ));
        };
        if !l.budget.take(now, rate, new.len() as u64) {
            self.count("console_input_over_rate", 1);
            return Err((
                ErrorCode::LimitReached,
                format!(
                    "console input over {rate} bytes a second ([leases] input_bytes_per_sec): resend from byte {have} a little later"
                ),
            ));
        }
        let worker = self.tasks[&task]
            .worker
            .clone()
            .expect("a running task has a worker");
        let by = self.owner(peer).unwrap_or_else(|| "-".into());
        self.count("console_input_bytes", new.len() as u64);
        let attempt = self.tasks[&task].attempts;
        let body = Body::LeaseInput {
            task: task.clone(),
            attempt,
            by,
            stream: stream.clone(),
            offset: sent,
        };
        let seq = self.send_mandatory_raw(now, &worker, &task, body, Some(new));
        let l = self.leases.live.get_mut(&lease).expect("held");
        if let Some(i) = l.inputs.iter_mut().find(|i| i.id == stream) {
            i.sent = end;
        }
        l.in_flight += usize::from(seq.is_some());
        if let Some(seq) = seq {
            self.leases
                .input_acks
                .insert((worker, seq), (lease.clone(), stream.clone(), end));
        }
        ack
    }

    /// The worker acknowledged a message: if it was console input, the
    /// stream's client is told how much the worker has.
    pub(in crate::server::scheduler) fn console_input_acked(&mut self, worker: &str, seq: u64) {
        let Some((lease, stream, end)) = self.leases.input_acks.remove(&(worker.to_string(), seq))
        else {
            return;
        };
        let Some(l) = self.leases.live.get_mut(&lease) else {
            return;
        };
        l.in_flight = l.in_flight.saturating_sub(1);
        let Some(i) = l.inputs.iter_mut().find(|i| i.id == stream) else {
            return;
        };
        i.have = i.have.max(end);
        let Some((peer, request)) = i.reply.clone() else {
            return;
        };
        let have = i.have;
        self.send(
            &peer,
            None,
            Body::ConsoleInputAck {
                request,
                lease,
                stream,
                have,
            },
            None,
        );
    }

    /// `console_data` from the worker holding the lease: kept for a late
    /// attach's replay and sent to every console attached.
    pub(in crate::server::scheduler) fn on_console_data(
        &mut self,
        now: Instant,
        worker: &str,
        task: TaskId,
        attempt: u32,
        offset: u64,
        raw: Option<Bytes>,
    ) {
        let bytes = raw.unwrap_or_default();
        if !self.open_on(&task, worker, Some(attempt)) {
            self.count("orphan_console_bytes", bytes.len() as u64);
            return;
        }
        let Some(run) = self.lease_of_task(&task) else {
            self.count("orphan_console_bytes", bytes.len() as u64);
            return;
        };
        let replay_max = self.cfg.leases.replay_bytes;
        let Some(l) = self.leases.live.get_mut(&run) else {
            self.count("orphan_console_bytes", bytes.len() as u64);
            return;
        };
        let end = offset.saturating_add(bytes.len() as u64);
        // A new source (the hold, a testrun on the lease, an attempt of
        // either) numbers its bytes anew: the consoles' offsets go on.
        let key = (task.clone(), attempt);
        if l.source.as_ref() != Some(&key) {
            l.source = Some(key);
            l.out_base = l.out_end;
            l.src_start = offset;
            l.next_offset = offset;
        }
        let expected = l.next_offset;
        if end <= expected {
            return; // all seen
        }
        let (bytes, offset) = if offset < expected {
            (bytes.slice((expected - offset) as usize..), expected)
        } else {
            (bytes, offset)
        };
        let gap = offset - expected;
        l.next_offset = end;
        let offset = l.out_base.saturating_add(offset - l.src_start);
        l.out_end = l.out_base.saturating_add(end - l.src_start);
        l.replay.push_back((now, offset, bytes.clone()));
        l.replay_bytes += bytes.len();
        while l.replay_bytes > replay_max {
            let Some((_, _, b)) = l.replay.pop_front() else {
                break;
            };
            l.replay_bytes -= b.len();
        }
        let to: Vec<(PeerId, u64)> = l
            .consoles
            .iter()
            .map(|(p, a)| (p.clone(), a.request))
            .collect();
        if gap > 0 {
            self.count("console_bytes_lost", gap);
        }
        self.count("console_bytes", bytes.len() as u64);
        for (peer, request) in to {
            self.send(
                &peer,
                None,
                Body::ConsoleOutput {
                    request,
                    lease: run.clone(),
                    offset,
                    dropped: gap,
                },
                Some(bytes.clone()),
            );
        }
    }

    /// `power`: the holder's or an operator's; carried to the worker,
    /// answered when it reports (`power_result`).
    pub(in crate::server::scheduler) fn on_power(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        lease: LeaseId,
        action: PowerAction,
    ) -> Result<(), (ErrorCode, String)> {
        self.lease_actor(peer, &lease, true)?;
        let l = self.held_lease(&lease)?;
        if let Some(run) = &l.suspended_for {
            return Err((
                ErrorCode::BadRequest,
                format!(
                    "testrun {run} runs on lease {lease}'s device now: power it when that ends"
                ),
            ));
        }
        let task = l.task.clone();
        let of_lease = self
            .leases
            .power
            .values()
            .filter(|(_, _, l, _)| *l == lease)
            .count();
        if of_lease >= POWER_WAITING_PER_LEASE || self.leases.power.len() >= MAX_POWER_WAITING {
            self.count("power_over_limit", 1);
            return Err((
                ErrorCode::LimitReached,
                format!(
                    "{of_lease} power actions of lease {lease} ({POWER_WAITING_PER_LEASE} at most), {} of all leases ({MAX_POWER_WAITING} at most) wait for their workers: try again when they are answered",
                    self.leases.power.len()
                ),
            ));
        }
        let is_holder = self.owner(peer) == self.runs[&lease].request.owner;
        if is_holder {
            self.leases
                .live
                .get_mut(&lease)
                .expect("held")
                .hold
                .heard(now);
        }
        let worker = self.tasks[&task]
            .worker
            .clone()
            .expect("held lease has a worker");
        self.leases.next_power += 1;
        let id = self.leases.next_power;
        self.leases
            .power
            .insert(id, (peer.clone(), request, lease.clone(), action));
        let by = self.owner(peer).unwrap_or_else(|| "-".into());
        self.audit_peer(
            peer,
            "power",
            &format!("{lease} on worker {worker}: {action}"),
        );
        self.count("power_actions", 1);
        self.send_mandatory(
            now,
            &worker,
            &task,
            Body::PowerRequest {
                task: task.clone(),
                attempt: self.tasks[&task].attempts,
                id,
                action,
                by,
            },
        );
        Ok(())
    }

    /// `power_done` from the worker: answered to whoever asked.
    pub(in crate::server::scheduler) fn on_power_done(&mut self, worker: &str, body: Body) {
        let Body::PowerDone {
            task,
            id,
            action,
            state,
            ok,
            message,
            ..
        } = body
        else {
            return;
        };
        let task = &task;
        let run = self.tasks[task].run.clone();
        let state = match state.as_str() {
            "on" | "off" => state,
            _ => "unknown".to_string(),
        };
        self.audit(
            self.latest,
            &format!("worker:{worker}"),
            "-",
            "power_done",
            &format!(
                "{run}: {action} -> {state} ({}){}",
                if ok { "ok" } else { "failed" },
                if message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", crate::text::escape_controls(&message))
                }
            ),
        );
        let Some((peer, request, lease, asked)) = self.leases.power.remove(&id) else {
            return;
        };
        if lease != run || asked != action {
            return;
        }
        self.send(
            &peer,
            None,
            Body::PowerResult {
                request,
                lease,
                action,
                state,
                message,
                ok,
            },
            None,
        );
    }

    /// A line of the server's own in a lease's transcript.
    pub(in crate::server::scheduler) fn note_in_transcript(&mut self, task: &TaskId, text: String) {
        let line = LogLine {
            seq: 0,
            stream: Stream::Worker,
            text: format!("[{}] {text}", crate::clock::iso(self.wall_ms(self.latest))),
        };
        if let Err(e) = self.store.append_log(task, &[line]) {
            warn!(task = %task, error = %e, "storage error: cannot write into a lease's transcript");
        }
    }
}
