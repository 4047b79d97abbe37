//! Leases (PROTOCOL.md §18): a person's hold on one device, queued and
//! dispatched as a one-task testrun `l…` whose task holds the device
//! instead of testing it. Here: reserving, listing, release, renew, keep
//! and share; the consoles attached to a lease (replay, output, input
//! applied once, in order); power actions; lapses (expiry, idle holder)
//! on the tick; what a lease's end leaves behind (consoles closed within
//! the turn, the device's health `unknown`).
//!
//! Bounded per user and in all: leases held and waiting per user
//! (`[leases] held_per_user`, `waiting_per_user`), leases in all
//! (`max_leases`), consoles per lease and per user, input bytes per
//! second per lease, replayable output per lease, input streams per lease.

use super::*;
use crate::protocol::leasing::MAX_LEASE_SHARES;
use crate::security::Role;
use crate::server::leasing::{Hold, InputBudget, Lapse};

/// Input streams (one per console session of the holder) remembered per
/// lease for exactly-once input; the oldest is forgotten past this.
const INPUT_STREAMS: usize = 16;
/// Power requests waiting for their worker's answer, in all.
const MAX_POWER_WAITING: usize = 1024;
/// …and of one lease (a worker that never answers holds up only its own).
const POWER_WAITING_PER_LEASE: usize = 4;
/// Console input forwarded to a lease's worker and not acknowledged by
/// it, at most: bytes, and messages (past either, input waits: it is
/// refused with `limit_reached` and sent again by the client).
const INPUT_IN_FLIGHT_BYTES: u64 = 64 * 1024;
const INPUT_IN_FLIGHT_MESSAGES: usize = 1024;
/// Ended leases `leases --all` lists at most.
const LISTED_ENDED: usize = 200;

/// A console attached to a lease.
#[derive(Clone, Debug)]
pub(super) struct Attach {
    /// The `console_attach` request: every push names it.
    request: u64,
    writer: bool,
    user: Option<String>,
}

/// One console input stream of a lease.
#[derive(Clone, Debug)]
pub(super) struct InputState {
    id: String,
    /// Bytes of the stream the worker acknowledged…
    have: u64,
    /// …and forwarded to it.
    sent: u64,
    /// Where acknowledgements go: the stream's last request.
    reply: Option<(PeerId, u64)>,
}

/// What the scheduler keeps of a lease that is waiting or held.
pub(super) struct Live {
    holder: Option<String>,
    hold: Hold,
    /// Its task (`l12.1`).
    task: TaskId,
    budget: InputBudget,
    /// Input streams, newest last (the last [`INPUT_STREAMS`]).
    inputs: VecDeque<InputState>,
    /// Input messages in the worker's outbox.
    in_flight: usize,
    /// Recent output for a late attach: (received, offset, bytes).
    replay: VecDeque<(Instant, u64, Bytes)>,
    replay_bytes: usize,
    /// Where output comes from now: a task's attempt on the worker (the
    /// hold, or a testrun on the lease), whose byte offsets start anew;
    /// its first offset seen and the one expected next.
    source: Option<(TaskId, u32)>,
    src_start: u64,
    next_offset: u64,
    /// The lease's own output offsets (what consoles see): where the
    /// current source's start lies, and the end so far.
    out_base: u64,
    out_end: u64,
    /// A testrun on the lease (`run --lease`) has the device: the hold
    /// waits behind it.
    suspended_for: Option<RunId>,
    /// The worker that holds the device, once granted.
    worker: Option<String>,
    consoles: BTreeMap<PeerId, Attach>,
}

impl Live {
    /// A lease just made (or restored): nothing attached, typed or seen.
    fn new(
        holder: Option<String>,
        task: TaskId,
        worker: Option<String>,
        hold: Hold,
        budget: InputBudget,
    ) -> Live {
        Live {
            holder,
            hold,
            task,
            budget,
            inputs: VecDeque::new(),
            in_flight: 0,
            replay: VecDeque::new(),
            replay_bytes: 0,
            source: None,
            src_start: 0,
            next_offset: 0,
            out_base: 0,
            out_end: 0,
            suspended_for: None,
            worker,
            consoles: BTreeMap::new(),
        }
    }
}

/// The leases and their consoles.
#[derive(Default)]
pub(super) struct Leases {
    live: BTreeMap<LeaseId, Live>,
    /// Which leases each connection has a console on.
    by_peer: HashMap<PeerId, BTreeSet<LeaseId>>,
    /// Power actions in flight: id → (connection, request, lease, action).
    power: HashMap<u64, (PeerId, u64, LeaseId, PowerAction)>,
    next_power: u64,
    /// Console input in the workers' outboxes: (worker, seq) → (lease,
    /// stream, end): the stream's client is answered when it is acked.
    input_acks: HashMap<(String, u64), (LeaseId, String, u64)>,
}

impl Leases {
    /// Whether `id` is waiting or held.
    pub(super) fn is_live(&self, id: &str) -> bool {
        self.live.contains_key(id)
    }

    fn held_and_waiting(&self, user: &str, runs: &BTreeMap<RunId, Testrun>) -> (usize, usize) {
        let mut n = (0, 0);
        for (id, l) in &self.live {
            if l.holder.as_deref() != Some(user) {
                continue;
            }
            if runs.get(id).is_some_and(|r| r.state == RunState::Queued) {
                n.1 += 1;
            } else {
                n.0 += 1;
            }
        }
        n
    }

    fn consoles_of(&self, user: &str) -> usize {
        self.live
            .values()
            .flat_map(|l| l.consoles.values())
            .filter(|a| a.user.as_deref() == Some(user))
            .count()
    }
}

/// Is this testrun id a lease's?
pub(super) fn is_lease_id(run: &str) -> bool {
    run.starts_with('l')
}

type Reply = Result<Body, (ErrorCode, String)>;

impl<S: Store> Scheduler<S> {
    /// `reserve`: a one-task testrun `l…` holding a device, queued like
    /// any task under the caller's share.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_reserve(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        device: DeviceSpec,
        duration_ms: u64,
        reason: String,
        priority: Priority,
        queue_anyway: bool,
    ) -> Reply {
        let owner = self.owner(peer);
        let role = self.caller_role(peer).map(Role::as_str);
        let rules = &self.cfg.leases;
        let max = rules.max_for(role);
        if u128::from(duration_ms) > max.as_millis() {
            return Err((
                ErrorCode::Invalid,
                format!(
                    "a lease of {} is longer than role {} may hold ({}, [leases] max_{} in server.toml): ask for less, and renew it later",
                    crate::text::span_ms(duration_ms),
                    role.unwrap_or("-"),
                    crate::text::span_ms(max.as_millis() as u64),
                    role.unwrap_or("submit"),
                ),
            ));
        }
        if self.leases.live.len() >= rules.max_leases {
            self.count("leases_over_limit", 1);
            return Err((
                ErrorCode::LimitReached,
                format!(
                    "the server has {} leases waiting or held, its limit ([leases] max_leases): try again later",
                    self.leases.live.len()
                ),
            ));
        }
        if let Some(user) = owner.as_deref() {
            let (held, waiting) = self.leases.held_and_waiting(user, &self.runs);
            if held >= rules.held_per_user && waiting >= rules.waiting_per_user {
                self.count("leases_over_user_limit", 1);
                return Err((
                    ErrorCode::LimitReached,
                    format!(
                        "user {user} holds {held} leases and has {waiting} waiting, the per-user limits ([leases] held_per_user, waiting_per_user): release one first"
                    ),
                ));
            }
            if waiting >= rules.waiting_per_user {
                self.count("leases_over_user_limit", 1);
                return Err((
                    ErrorCode::LimitReached,
                    format!(
                        "user {user} has {waiting} leases waiting, the per-user limit ([leases] waiting_per_user): release one first"
                    ),
                ));
            }
        }
        let testrun = TestrunRequest {
            device,
            devices: Vec::new(),
            image: "lease".into(),
            packages: vec!["lease".into()],
            distribution: Distribution::Default,
            timeout_secs: limits::MAX_TIMEOUT_SECS,
            options: BTreeMap::new(),
            queue_anyway,
            secrets: BTreeMap::new(),
            inputs: Vec::new(),
            owner: owner.clone(),
            priority,
            notify: Vec::new(),
            on_lease: None,
            series: None,
            lease: Some(Box::new(LeaseTerms {
                duration_ms,
                reason: reason.clone(),
                ..LeaseTerms::default()
            })),
        };
        let Body::Submitted { run, tasks, .. } = self.submit(now, peer, request, testrun)? else {
            unreachable!("submit answers submitted");
        };
        let task = tasks.into_iter().next().expect("one task");
        let granted_on = self.tasks[&task].worker.clone();
        let mut hold = Hold::new(now);
        if self.runs[&run].state == RunState::Running {
            hold.grant(now, Duration::from_millis(duration_ms));
        }
        // Granted at once (dispatched within the submit): its worker.
        let budget = InputBudget::new(now, self.cfg.leases.input_bytes_per_sec);
        self.leases.live.insert(
            run.clone(),
            Live::new(owner.clone(), task, granted_on, hold, budget),
        );
        self.count("leases_requested", 1);
        self.audit_peer(
            peer,
            "lease",
            &format!(
                "{run} for {} on {}: {}, reason {:?}",
                owner.as_deref().unwrap_or("-"),
                self.runs[&run].request.device,
                crate::text::span_ms(duration_ms),
                reason
            ),
        );
        Ok(Body::Leases {
            request,
            leases: vec![self.lease_info(now, &run)],
        })
    }

    /// After a restart: every unfinished lease is live again, its holder
    /// heard now (a fresh `idle` window: the silence was the server's),
    /// its end where it was (wall clock).
    pub(super) fn restore_leases(&mut self, now: Instant) {
        let wall = self.wall_ms(now);
        let live: Vec<(RunId, TaskId, Option<String>, Option<u64>)> = self
            .active_runs
            .iter()
            .filter_map(|id| {
                let r = self.runs.get(id)?;
                let terms = r.request.lease.as_ref()?;
                if terms.ended.is_some()
                    || matches!(r.state, RunState::Finished | RunState::Cancelled)
                {
                    return None;
                }
                Some((
                    id.clone(),
                    r.tasks.first()?.clone(),
                    r.request.owner.clone(),
                    terms.until_ms,
                ))
            })
            .collect();
        for (id, task, holder, until_ms) in live {
            let mut hold = Hold::new(now);
            hold.until = until_ms.map(|u| now + Duration::from_millis(u.saturating_sub(wall)));
            let worker = self.tasks.get(&task).and_then(|t| t.worker.clone());
            let budget = InputBudget::new(now, self.cfg.leases.input_bytes_per_sec);
            self.leases
                .live
                .insert(id, Live::new(holder, task, worker, hold, budget));
        }
    }

    /// A lease's task was dispatched to `worker`: the lease is granted.
    pub(super) fn lease_granted(&mut self, now: Instant, run: &RunId, worker: &str) {
        let wall = self.wall_ms(now);
        let Some(terms) = self
            .runs
            .get_mut(run)
            .and_then(|r| r.request.lease.as_mut())
        else {
            return;
        };
        if terms.granted_ms.is_some() {
            // The hold resumes after a testrun on the lease.
            if let Some(l) = self.leases.live.get_mut(run) {
                l.suspended_for = None;
            }
            info!(lease = %run, worker = %worker, "lease resumed after a testrun on it");
            return;
        }
        let duration = Duration::from_millis(terms.duration_ms);
        terms.granted_ms = Some(wall);
        terms.until_ms = Some(wall.saturating_add(terms.duration_ms));
        self.pending.runs.insert(run.clone());
        if let Some(l) = self.leases.live.get_mut(run) {
            l.hold.grant(now, duration);
            l.worker = Some(worker.to_string());
        }
        self.count("leases_granted", 1);
        info!(lease = %run, worker = %worker, "lease granted");
        self.audit(
            now,
            "server",
            "-",
            "lease_granted",
            &format!("{run} on worker {worker}"),
        );
    }

    /// Who may act on a lease: its holder; with `force`, an operator.
    fn lease_actor(
        &self,
        peer: &PeerId,
        lease: &LeaseId,
        force: bool,
    ) -> Result<(), (ErrorCode, String)> {
        let Some(r) = self.runs.get(lease).filter(|r| r.request.lease.is_some()) else {
            return Err((
                ErrorCode::UnknownRun,
                format!("no lease {lease:?} on this server"),
            ));
        };
        if !self.cfg.secure {
            return Ok(());
        }
        let me = self.owner(peer);
        if me.is_some() && me == r.request.owner {
            return Ok(());
        }
        let role = self.caller_role(peer);
        if force && role.is_some_and(|r| r >= Role::Operator) {
            return Ok(());
        }
        Err((
            ErrorCode::Forbidden,
            if force {
                format!(
                    "{} (role {}) may not end {}'s lease {lease}: --force needs role operator or admin",
                    me.as_deref().unwrap_or("anonymous"),
                    role.map_or("-", Role::as_str),
                    r.request.owner.as_deref().unwrap_or("nobody")
                )
            } else {
                format!(
                    "lease {lease} is {}'s, not {}'s (an operator may end it with --force)",
                    r.request.owner.as_deref().unwrap_or("nobody"),
                    me.as_deref().unwrap_or("anonymous")
                )
            },
        ))
    }

    /// `lease_act`: release, renew, keep, share, unshare.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_lease_act(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        lease: LeaseId,
        action: LeaseAction,
        force: bool,
        duration_ms: Option<u64>,
        user: Option<String>,
    ) -> Reply {
        self.lease_actor(peer, &lease, force && action == LeaseAction::Release)?;
        let who = self.owner(peer).unwrap_or_else(|| "-".into());
        let is_holder = self.owner(peer) == self.runs[&lease].request.owner;
        if !self.leases.live.contains_key(&lease) {
            if action != LeaseAction::Keep {
                let why = self.runs[&lease]
                    .request
                    .lease
                    .as_ref()
                    .and_then(|t| t.ended.clone())
                    .unwrap_or_else(|| "it ended".into());
                return Err((
                    ErrorCode::BadRequest,
                    format!("lease {lease} has ended: {why}"),
                ));
            }
        } else if is_holder {
            self.leases
                .live
                .get_mut(&lease)
                .expect("live")
                .hold
                .heard(now);
        }
        match action {
            LeaseAction::Keep => {}
            LeaseAction::Release => {
                let why = if is_holder {
                    format!("released by {who}")
                } else {
                    format!("released by {who} (--force)")
                };
                self.audit_peer(peer, "lease_release", &format!("{lease}: {why}"));
                self.end_lease(now, &lease, why);
            }
            LeaseAction::Renew => {
                let terms = self.runs[&lease].request.lease.clone().expect("lease");
                let duration = duration_ms.unwrap_or(terms.duration_ms);
                let role = self.caller_role(peer).map(Role::as_str);
                let max = self.cfg.leases.max_for(role);
                if u128::from(duration) > max.as_millis() {
                    return Err((
                        ErrorCode::Invalid,
                        format!(
                            "a renewal for {} is longer than role {} may hold ({}, [leases] max_{} in server.toml)",
                            crate::text::span_ms(duration),
                            role.unwrap_or("-"),
                            crate::text::span_ms(max.as_millis() as u64),
                            role.unwrap_or("submit")
                        ),
                    ));
                }
                let wall = self.wall_ms(now);
                let granted = terms.granted_ms.is_some();
                let t = self.runs.get_mut(&lease).expect("run");
                let terms = t.request.lease.as_mut().expect("lease");
                terms.duration_ms = duration;
                if granted {
                    terms.until_ms = Some(wall.saturating_add(duration));
                    let l = self.leases.live.get_mut(&lease).expect("live");
                    l.hold.until = Some(now + Duration::from_millis(duration));
                }
                self.pending.runs.insert(lease.clone());
                self.audit_peer(
                    peer,
                    "lease_renew",
                    &format!("{lease}: {}", crate::text::span_ms(duration)),
                );
            }
            LeaseAction::Share | LeaseAction::Unshare => {
                let Some(user) = user else {
                    return Err((
                        ErrorCode::BadRequest,
                        "share and unshare name a user".into(),
                    ));
                };
                let t = self.runs.get_mut(&lease).expect("run");
                let terms = t.request.lease.as_mut().expect("lease");
                if action == LeaseAction::Share {
                    if terms.shared.len() >= MAX_LEASE_SHARES && !terms.shared.contains(&user) {
                        return Err((
                            ErrorCode::LimitReached,
                            format!("lease {lease} is shared with {MAX_LEASE_SHARES} users already, the limit"),
                        ));
                    }
                    if !terms.shared.contains(&user) {
                        terms.shared.push(user.clone());
                    }
                } else {
                    terms.shared.retain(|u| *u != user);
                    self.close_consoles_of_user(
                        &lease,
                        &user,
                        "the holder stopped sharing the lease",
                    );
                }
                self.pending.runs.insert(lease.clone());
                let verb = if action == LeaseAction::Share {
                    "lease_share"
                } else {
                    "lease_unshare"
                };
                self.audit_peer(peer, verb, &format!("{lease}: {user}"));
            }
        }
        Ok(Body::Leases {
            request,
            leases: vec![self.lease_info(now, &lease)],
        })
    }

    /// Ends a lease now: its consoles close with `why`, a waiting one
    /// leaves the queue, a held one's worker is told to let go (its task
    /// ends when the worker reports; the device's health is then unknown).
    pub(super) fn end_lease(&mut self, now: Instant, lease: &LeaseId, why: String) {
        let Some(live) = self.leases.live.remove(lease) else {
            return;
        };
        self.leases.input_acks.retain(|_, (l, ..)| l != lease);
        self.leases.power.retain(|_, (_, _, l, _)| l != lease);
        for peer in live.consoles.keys() {
            if let Some(set) = self.leases.by_peer.get_mut(peer) {
                set.remove(lease);
                if set.is_empty() {
                    self.leases.by_peer.remove(peer);
                }
            }
        }
        for (peer, a) in live.consoles {
            self.send(
                &peer,
                None,
                Body::ConsoleClosed {
                    request: a.request,
                    lease: lease.clone(),
                    reason: why.clone(),
                },
                None,
            );
        }
        let wall = self.wall_ms(now);
        if let Some(terms) = self
            .runs
            .get_mut(lease)
            .and_then(|r| r.request.lease.as_mut())
        {
            terms.ended = Some(why.clone());
            if terms.until_ms.is_some_and(|u| u > wall) {
                terms.until_ms = Some(wall);
            }
        }
        self.pending.runs.insert(lease.clone());
        self.count("leases_ended", 1);
        info!(lease = %lease, reason = %why, "lease ended");
        self.audit(now, "server", "-", "lease_end", &format!("{lease}: {why}"));
        let hold_has_device = self.tasks.get(&live.task).is_some_and(|t| {
            matches!(
                t.state,
                TaskState::Running | TaskState::Dispatched | TaskState::Held
            )
        });
        if let (false, Some(w)) = (hold_has_device, live.worker.as_deref()) {
            // The hold waits behind a testrun on the lease: the device was
            // a person's all the same.
            self.after_person(now, w, lease);
        }
        if let Some(t) = self.tasks.get(&live.task) {
            if t.state == TaskState::Running || t.state == TaskState::Dispatched {
                let line = LogLine {
                    seq: 0,
                    stream: Stream::Worker,
                    text: format!("---- lease {lease} ended: {why} ----"),
                };
                if let Err(e) = self.store.append_log(&live.task, &[line]) {
                    warn!(task = %live.task, error = %e, "storage error: cannot write the lease's end into its transcript");
                }
            }
        }
        let _ = self.cancel_run(now, lease);
        // The holder may be under its limit again: its waiting leases are
        // tried on the workers waiting for work.
        let holder = self.runs.get(lease).and_then(|r| r.request.owner.clone());
        let waiting: Vec<String> = self
            .leases
            .live
            .iter()
            .filter(|(id, l)| {
                l.holder == holder
                    && self
                        .runs
                        .get(*id)
                        .is_some_and(|r| r.state == RunState::Queued)
            })
            .map(|(id, _)| self.runs[id].request.device.routing_key())
            .collect();
        for key in waiting {
            self.try_dispatch_key(now, &key);
        }
    }

    /// The lease's task ended on `worker` after holding it: the device
    /// may be in any state a person left it in; it is checked (after its
    /// recovery, if configured) before the next CI task.
    pub(super) fn lease_task_ended(
        &mut self,
        now: Instant,
        task: &TaskId,
        worker: Option<&str>,
        held: bool,
    ) {
        let run = self.tasks[task].run.clone();
        if self.leases.live.contains_key(&run) {
            let why = self.tasks[task]
                .reason
                .clone()
                .unwrap_or_else(|| "its task ended".into());
            self.end_lease(now, &run, why);
        }
        if let (Some(w), true) = (worker, held) {
            self.after_person(now, w, &run);
        }
    }

    /// A person had `worker`'s device (lease `lease`): its health is
    /// unknown until its group's check (after recovery) says otherwise.
    fn after_person(&mut self, now: Instant, worker: &str, lease: &LeaseId) {
        let has_check = self.check_of(worker).is_some();
        let reason = format!(
            "lease {lease} ended: whatever its holder left is checked before the next task"
        );
        self.health_event(
            now,
            worker,
            crate::server::health::Event::LeaseEnded {
                reason: &reason,
                has_check,
            },
        );
    }

    /// Lapses due at `now` (from the tick): expiry, idle holders; and an
    /// open console keeps its holder heard.
    pub(super) fn lease_tick(&mut self, now: Instant) {
        let idle = self.cfg.leases.idle;
        let mut ended = Vec::new();
        for (id, l) in self.leases.live.iter_mut() {
            if l.consoles.values().any(|a| a.user == l.holder) {
                l.hold.heard(now);
            }
            match l.hold.lapse(now, idle) {
                Some(Lapse::Expired) => ended.push((id.clone(), "its time was up".to_string())),
                Some(Lapse::Idle) => ended.push((
                    id.clone(),
                    format!(
                        "its holder was not heard for {} ([leases] idle)",
                        crate::text::span_ms(idle.as_millis() as u64)
                    ),
                )),
                None => {}
            }
        }
        for (id, why) in ended {
            self.end_lease(now, &id, why);
        }
    }

    /// A connection closed: its consoles go.
    pub(super) fn forget_consoles(&mut self, peer: &PeerId) {
        // Input acknowledgements no longer go to it.
        for l in self.leases.live.values_mut() {
            for i in l.inputs.iter_mut() {
                if i.reply.as_ref().is_some_and(|(p, _)| p == peer) {
                    i.reply = None;
                }
            }
        }
        let Some(leases) = self.leases.by_peer.remove(peer) else {
            return;
        };
        for lease in leases {
            if let Some(l) = self.leases.live.get_mut(&lease) {
                l.consoles.remove(peer);
            }
        }
        self.leases.power.retain(|_, (p, ..)| p != peer);
    }

    /// The key of `user` was revoked or changed: the leases it holds end.
    pub fn revoke_leases(&mut self, now: Instant, user: &str) {
        let held: Vec<LeaseId> = self
            .leases
            .live
            .iter()
            .filter(|(_, l)| l.holder.as_deref() == Some(user))
            .map(|(id, _)| id.clone())
            .collect();
        for id in held {
            self.end_lease(
                now,
                &id,
                format!("the key of its holder {user} was revoked or changed"),
            );
        }
    }

    fn close_consoles_of_user(&mut self, lease: &LeaseId, user: &str, why: &str) {
        let Some(l) = self.leases.live.get_mut(lease) else {
            return;
        };
        let gone: Vec<(PeerId, Attach)> = l
            .consoles
            .iter()
            .filter(|(_, a)| a.user.as_deref() == Some(user) && !a.writer)
            .map(|(p, a)| (p.clone(), a.clone()))
            .collect();
        for (peer, a) in gone {
            l.consoles.remove(&peer);
            if let Some(set) = self.leases.by_peer.get_mut(&peer) {
                set.remove(lease);
            }
            self.out.push(Output::Send {
                peer,
                header: Header::best_effort(Class::Control, None),
                body: Body::ConsoleClosed {
                    request: a.request,
                    lease: lease.clone(),
                    reason: why.to_string(),
                },
                raw: None,
            });
        }
    }
}

mod console;
mod lists;
pub(super) use lists::over_held_limit;
mod runs;
