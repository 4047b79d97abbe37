//! The serving loop: one task owns the scheduler, the state store and
//! the ways out. Each turn waits for one [`Event`] (the table in
//! [`Sources::next`]), hands it to its handler, then ends the turn
//! ([`Serving::end_turn`]): durable first, then the replies that say so.
//! A fatal condition (the lease lost, a commit failed, a helper thread
//! gone) ends the loop with a [`Fatal`] error; what the binary does with
//! it is the binary's choice.

use crate::protocol;
use crate::security::gate::Verdict;
use crate::security::Gate;
use crate::server::scheduler::Scheduler;
use crate::server::shell::bridge::Pending;
use crate::server::shell::error::Fatal;
use crate::server::shell::inbound::{
    spawn_handshake_thread, spawn_reader, ConnectionActivity, HandshakeDone, HandshakeJob,
    InboundBytes, Received,
};
use crate::server::shell::outlets::Outlets;
use crate::server::shell::reload::Reload;
use crate::server::store::state::StateStore;
use crate::server::store::DiskStore;
use crate::shutdown::Stop;
use crate::transport;
use crate::web::bridge::Ask;
use bytes::Bytes;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};
use zeromq::prelude::*;
use zeromq::ZmqMessage;

/// Messages handled per loop turn at most (one commit for all of them).
const MAX_BATCH: usize = 512;
/// Reply bytes a turn gathers at most before it commits and sends them:
/// data requests (a MiB each) must not pile up before they leave.
const OUTPUT_BUDGET: usize = 8 * 1024 * 1024;
/// How long an orderly stop waits for its last messages (the shutdowns)
/// to be written to the workers' connections.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// The timings and queue size the serving loop runs with.
pub(super) struct Pace {
    pub(super) heartbeat: Duration,
    pub(super) send_timeout: Duration,
    pub(super) inbound_queue: usize,
    pub(super) inbound_queue_bytes: usize,
    pub(super) idle_timeout: Duration,
    /// Metrics scrapes waiting for a page (metrics endpoint on).
    pub(super) scrapes: Option<mpsc::Receiver<crate::server::shell::metrics::Scrape>>,
    /// The web dashboard, if served.
    pub(super) web: Option<crate::web::WebHandle>,
    /// With PostgreSQL: the lease this server acts under.
    pub(super) leadership: Option<Leadership>,
}

/// The lease held, and its renewer's reports.
pub(super) struct Leadership {
    pub(super) tenure: crate::server::lease::Tenure,
    pub(super) renewals: mpsc::UnboundedReceiver<crate::server::store::pg::Renewal>,
    /// How long the last renewal took (metrics).
    pub(super) renew_took: Duration,
    /// When this server took the lease (Unix ms), for `ping`.
    pub(super) since_ms: u64,
}

impl Leadership {
    /// Takes the renewals that arrived; whether the lease is still ours
    /// at `now`. A takeover is an error: the server steps down at once.
    fn holds(&mut self, now: Instant) -> Result<bool, Fatal> {
        while let Ok(r) = self.renewals.try_recv() {
            self.on_renewal(r)?;
        }
        Ok(self.tenure.valid(now))
    }

    fn on_renewal(&mut self, renewal: crate::server::store::pg::Renewal) -> Result<(), Fatal> {
        match renewal {
            crate::server::store::pg::Renewal::Renewed(sent, took) => {
                self.tenure.renewed(sent);
                self.renew_took = took;
                Ok(())
            }
            crate::server::store::pg::Renewal::Deposed => {
                Err(step_down("another server took the lease over"))
            }
        }
    }
}

/// Whether a leader (if this is one) still holds its lease at `now`.
fn still_leads(leadership: &mut Option<Leadership>, now: Instant) -> Result<bool, Fatal> {
    match leadership {
        None => Ok(true),
        Some(l) => l.holds(now),
    }
}

/// Stops acting at once: no output of this turn leaves; the caller ends
/// the loop with the error this returns.
fn step_down(why: &str) -> Fatal {
    error!(reason = why, "stepping down: this server no longer holds the lease; it sends, dispatches and acknowledges nothing more (it comes back as a standby when restarted)");
    Fatal::Deposed {
        reason: why.to_string(),
    }
}

/// What the loop waits on.
struct Sources {
    inbound: mpsc::Receiver<Received>,
    web_asks: Option<mpsc::Receiver<Ask>>,
    scrapes: Option<mpsc::Receiver<crate::server::shell::metrics::Scrape>>,
    desk_done: mpsc::UnboundedReceiver<crate::server::store::files::FileDone>,
    recalled: mpsc::UnboundedReceiver<crate::server::store::history::Recalled>,
    notify_done: Option<mpsc::UnboundedReceiver<crate::notify::outbox::Done>>,
    handshakes_done: mpsc::UnboundedReceiver<HandshakeDone>,
    reloads: Option<mpsc::Receiver<Reload>>,
    ticker: tokio::time::Interval,
    stop: watch::Receiver<Stop>,
    /// False once the handle that sends stops is gone (the server then
    /// serves on until the process ends).
    stop_open: bool,
    /// Woken when the next notification retry is due (between ticks: a
    /// retry 1 s after a failure should not wait for a tick on top).
    notify_wake: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Wakes when the lease would lapse unrenewed (then: step down).
    lease_end: std::pin::Pin<Box<tokio::time::Sleep>>,
}

/// One thing that happened, for one handler. One lives at a time, on the
/// loop's stack: its size does not matter, a box per message would.
#[allow(clippy::large_enum_variant)]
enum Event {
    Renewal(crate::server::store::pg::Renewal),
    LeaseEnds,
    NotificationsDue,
    Inbound(Received),
    WebAsk(Ask),
    Scrape(crate::server::shell::metrics::Scrape),
    FileDone(crate::server::store::files::FileDone),
    Recalled(Option<crate::server::store::history::Recalled>),
    NotifyDone(crate::notify::outbox::Done),
    Handshake(HandshakeDone),
    Reload(Reload),
    Tick,
    Stop(Stop),
}

impl Sources {
    /// The next event. `notify_due` and `lease_until` set the two wake-ups
    /// first; `leadership` is where lease renewals arrive.
    async fn next(
        &mut self,
        notify_due: Option<Duration>,
        leadership: &mut Option<Leadership>,
    ) -> Event {
        if let Some(d) = notify_due {
            self.notify_wake
                .as_mut()
                .reset(tokio::time::Instant::now() + d);
        }
        if let Some(l) = leadership.as_ref() {
            self.lease_end
                .as_mut()
                .reset(tokio::time::Instant::from_std(l.tenure.valid_until()));
        }
        let leads = leadership.is_some();
        tokio::select! {
            Some(r) = async { leadership.as_mut()?.renewals.recv().await }, if leads => Event::Renewal(r),
            _ = &mut self.lease_end, if leads => Event::LeaseEnds,
            _ = &mut self.notify_wake, if notify_due.is_some() => Event::NotificationsDue,
            Some(item) = self.inbound.recv() => Event::Inbound(item),
            Some(ask) = async { self.web_asks.as_mut()?.recv().await }, if self.web_asks.is_some() => Event::WebAsk(ask),
            Some(s) = async { self.scrapes.as_mut()?.recv().await }, if self.scrapes.is_some() => Event::Scrape(s),
            Some(done) = self.desk_done.recv() => Event::FileDone(done),
            done = self.recalled.recv() => Event::Recalled(done),
            Some(done) = async { self.notify_done.as_mut()?.recv().await }, if self.notify_done.is_some() => Event::NotifyDone(done),
            Some(done) = self.handshakes_done.recv() => Event::Handshake(done),
            Some(r) = async { self.reloads.as_mut()?.recv().await }, if self.reloads.is_some() => Event::Reload(r),
            _ = self.ticker.tick() => Event::Tick,
            changed = self.stop.changed(), if self.stop_open => match changed {
                Ok(()) => Event::Stop(*self.stop.borrow()),
                Err(_) => {
                    self.stop_open = false;
                    Event::Stop(Stop::Run)
                }
            },
        }
    }
}

/// Everything the loop's handlers act on.
pub(super) struct Serving {
    scheduler: Scheduler<DiskStore>,
    db: StateStore,
    gate: Option<Gate>,
    out: Outlets,
    dashboard: Option<Arc<crate::web::Dashboard>>,
    web_pending: Pending,
    metrics: crate::server::shell::metrics::Metrics,
    activity: ConnectionActivity,
    leadership: Option<Leadership>,
    supervisor: crate::supervision::Supervisor,
    handshake_jobs: mpsc::UnboundedSender<HandshakeJob>,
    /// Received bytes waiting, in KiB permits given back once handled.
    inbound_kib: InboundBytes,
    /// Refused connections are logged and audited at a bounded rate (an
    /// anonymous peer can open connections as fast as it likes); the
    /// counters count every one.
    refusals: crate::logging::Throttle,
    subscriptions_refused: u64,
    last_tick: Instant,
}

/// The channels between the loop and its helper threads and tasks.
pub(super) struct Helpers {
    pub(super) desk: (
        mpsc::UnboundedSender<crate::server::store::files::FileJob>,
        mpsc::UnboundedReceiver<crate::server::store::files::FileDone>,
    ),
    pub(super) notifications: Option<(
        mpsc::UnboundedSender<crate::notify::outbox::Job>,
        mpsc::UnboundedReceiver<crate::notify::outbox::Done>,
    )>,
    pub(super) reloads: Option<mpsc::Receiver<Reload>>,
    pub(super) history: super::history::Channels,
}

/// Serves until `stop` says so (then announces the shutdown to the
/// workers) or a fatal condition ends it (returned).
pub(super) async fn serve(
    scheduler: Scheduler<DiskStore>,
    db: StateStore,
    helpers: Helpers,
    sockets: transport::ServerSockets,
    security: (Option<Gate>, Option<crate::security::broadcast::Announcer>),
    pace: Pace,
    stop: watch::Receiver<Stop>,
) -> Result<(), Fatal> {
    let (mut serving, mut sources, reader) =
        Serving::new(scheduler, db, helpers, sockets, security, pace, stop);
    let served = serving.run(&mut sources).await;
    if served.is_ok() {
        serving.shut_down().await?;
    }
    reader.abort();
    served
}

impl Serving {
    fn new(
        scheduler: Scheduler<DiskStore>,
        db: StateStore,
        helpers: Helpers,
        sockets: transport::ServerSockets,
        (gate, announcer): (Option<Gate>, Option<crate::security::broadcast::Announcer>),
        pace: Pace,
        stop: watch::Receiver<Stop>,
    ) -> (Serving, Sources, tokio::task::JoinHandle<()>) {
        // The dashboard's requests: asked on a bounded queue, handled
        // here in batches like messages, answered after the commit like
        // replies.
        let (dashboard, web_asks) = match pace.web {
            Some(w) => (Some(w.dashboard), Some(w.asks)),
            None => (None, None),
        };
        let transport::ServerSockets {
            mut router,
            publisher,
            ..
        } = sockets;
        // Connections come and go here; each one's last sign of life is
        // kept so that one that stays silent is closed (idle connections
        // would otherwise hold their slots of `limits.max_connections`).
        let connections = router.monitor();
        let (router_tx, router_rx) = router.split();
        // Bounded: when the scheduler falls behind, the reader waits, the
        // sockets stop reading and TCP pushes back on the senders. The
        // ROUTER reads its peers in turn, so one flooding peer gets its
        // share only. Bounded in bytes too (in KiB permits).
        let (inbound_tx, inbound) = mpsc::channel::<Received>(pace.inbound_queue);
        let inbound_kib = InboundBytes::new(pace.inbound_queue_bytes);
        let reader = spawn_reader(router_rx, connections, inbound_tx, inbound_kib.clone());
        let mut ticker = tokio::time::interval(pace.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (handshake_jobs, handshakes_done) = spawn_handshake_thread();
        let (desk_jobs, desk_done) = helpers.desk;
        let (history_jobs, recalled) = helpers.history;
        let (notify_jobs, notify_done) = match helpers.notifications {
            Some((jobs, done)) => (Some(jobs), Some(done)),
            None => (None, None),
        };
        // Sockets bound, state restored: ready. Pings come from this loop.
        let mut supervisor = crate::supervision::Supervisor::new();
        supervisor.ready(&scheduler.status_line());
        let sources = Sources {
            inbound,
            web_asks,
            scrapes: pace.scrapes,
            desk_done,
            recalled,
            notify_done,
            handshakes_done,
            reloads: helpers.reloads,
            ticker,
            stop,
            stop_open: true,
            notify_wake: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            lease_end: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
        };
        let serving = Serving {
            scheduler,
            db,
            gate,
            out: Outlets {
                router_tx,
                publisher,
                announcer,
                desk: desk_jobs,
                history: history_jobs,
                notify: notify_jobs,
                send_timeout: pace.send_timeout,
                send_failures: 0,
            },
            dashboard,
            web_pending: Pending::new(),
            metrics: crate::server::shell::metrics::Metrics::new(),
            activity: ConnectionActivity::new(pace.idle_timeout),
            leadership: pace.leadership,
            supervisor,
            handshake_jobs,
            inbound_kib,
            refusals: crate::logging::Throttle::new(Duration::from_secs(10), 20),
            subscriptions_refused: 0,
            last_tick: Instant::now(),
        };
        (serving, sources, reader)
    }

    /// The loop: one event, its handler, the end of the turn.
    async fn run(&mut self, sources: &mut Sources) -> Result<(), Fatal> {
        loop {
            let notify_due = self.scheduler.notifications_due_in(Instant::now());
            match sources.next(notify_due, &mut self.leadership).await {
                Event::Renewal(r) => self.on_renewal(r)?,
                Event::LeaseEnds => self.on_lease_end()?,
                Event::NotificationsDue => self.scheduler.on_notifications_due(Instant::now()),
                Event::Inbound(first) => self.on_inbound(first, &mut sources.inbound).await,
                Event::WebAsk(ask) => self.on_web_asks(ask, sources.web_asks.as_mut()),
                Event::Scrape(scrape) => self.on_scrape(scrape),
                Event::FileDone(done) => self.on_files_done(done, &mut sources.desk_done),
                Event::Recalled(Some(done)) => self.on_recalled(done, &mut sources.recalled),
                Event::Recalled(None) => {
                    error!(
                        "the history reader is gone; stopping so that systemd restarts the server"
                    );
                    return Err(Fatal::HistoryGone);
                }
                Event::NotifyDone(done) => {
                    self.on_notifications_done(done, sources.notify_done.as_mut())
                }
                Event::Handshake(done) => self.on_handshake_done(done).await,
                Event::Reload(reload) => self.on_reload(reload),
                Event::Tick => self.on_tick(),
                Event::Stop(Stop::Run) => {}
                Event::Stop(Stop::Gracefully | Stop::Now) => return Ok(()),
            }
            self.end_turn().await?;
        }
    }

    fn on_renewal(&mut self, renewal: crate::server::store::pg::Renewal) -> Result<(), Fatal> {
        match self.leadership.as_mut() {
            Some(l) => l.on_renewal(renewal),
            None => Ok(()),
        }
    }

    fn on_lease_end(&mut self) -> Result<(), Fatal> {
        if !still_leads(&mut self.leadership, Instant::now())? {
            return Err(step_down(
                "the lease could not be renewed in time (lease_ttl less one lease_renew)",
            ));
        }
        Ok(())
    }

    /// Takes what else is waiting too: one commit for the batch, up to
    /// [`MAX_BATCH`] messages or [`OUTPUT_BUDGET`] bytes of replies.
    async fn on_inbound(&mut self, first: Received, inbound: &mut mpsc::Receiver<Received>) {
        let mut first = Some(first);
        let mut handled = 0usize;
        loop {
            let item = match first.take() {
                Some(m) => m,
                None if handled >= MAX_BATCH
                    || self.scheduler.pending_output_bytes() >= OUTPUT_BUDGET =>
                {
                    break
                }
                None => match inbound.try_recv() {
                    Ok(m) => m,
                    Err(_) => break,
                },
            };
            handled += 1;
            match item {
                Received::Message(msg) => self.on_message(msg).await,
                Received::Connection(event) => self.on_connection_event(event),
            }
        }
    }

    /// A connection came or went: a closed one's session and registration
    /// end here, after everything it delivered was handled.
    fn on_connection_event(&mut self, event: zeromq::SocketEvent) {
        if let zeromq::SocketEvent::Disconnected(peer) = &event {
            let peer = Bytes::from(peer.clone());
            if let Some(gate) = self.gate.as_mut() {
                gate.forget(&peer);
            }
            self.scheduler.on_peer_closed(Instant::now(), &peer);
        }
        self.activity.on_event(Instant::now(), event);
    }

    /// One message: opened by the gate (with security), decoded, handed
    /// to the scheduler.
    async fn on_message(&mut self, msg: ZmqMessage) {
        self.inbound_kib.give_back(&msg);
        let mut frames = msg.into_vec();
        if frames.is_empty() {
            return;
        }
        let peer = frames.remove(0);
        let now = Instant::now();
        self.activity.heard(&peer, now);
        let frames = match self.gate.as_mut() {
            None => frames,
            Some(gate) => {
                match gate.inbound_from(now, &self.activity.address(&peer), &peer, frames) {
                    Verdict::Open(plain) => plain,
                    Verdict::Handshake { first, handshaker } => {
                        // Off the loop; the gate bounds how many wait.
                        let _ = self.handshake_jobs.send((peer, first, handshaker));
                        return;
                    }
                    v @ (Verdict::Secured { .. } | Verdict::Refuse { .. }) => {
                        self.answer_handshake(v, &peer, now).await;
                        return;
                    }
                    Verdict::Close { reason } => {
                        if self.refusals.allow(now, "refused connections") {
                            warn!(address = %self.activity.address(&peer), %reason, "closed a connection: its message does not authenticate");
                        }
                        gate.forget(&peer);
                        self.out.disconnect(&peer);
                        self.scheduler.on_peer_closed(now, &peer);
                        return;
                    }
                }
            }
        };
        match protocol::decode(frames) {
            Ok(env) => self.scheduler.on_message(now, &peer, env),
            Err(e) => self.scheduler.on_bad_frames(&peer, &e),
        }
    }

    async fn answer_handshake(&mut self, verdict: Verdict, peer: &Bytes, now: Instant) {
        self.out
            .answer_handshake(
                verdict,
                peer,
                now,
                &mut self.scheduler,
                &self.activity,
                &mut self.refusals,
            )
            .await;
    }

    async fn on_handshake_done(&mut self, (peer, result): HandshakeDone) {
        if let Some(v) = self.gate.as_mut().and_then(|g| g.complete(&peer, result)) {
            self.answer_handshake(v, &peer, Instant::now()).await;
        }
    }

    /// The dashboard's requests, in a batch like messages.
    fn on_web_asks(&mut self, ask: Ask, more: Option<&mut mpsc::Receiver<Ask>>) {
        let now = Instant::now();
        self.web_pending.begin(&mut self.scheduler, now, ask);
        let Some(more) = more else { return };
        let mut handled = 1;
        while handled < MAX_BATCH && self.scheduler.pending_output_bytes() < OUTPUT_BUDGET {
            let Ok(ask) = more.try_recv() else { break };
            self.web_pending.begin(&mut self.scheduler, now, ask);
            handled += 1;
        }
    }

    fn on_scrape(&mut self, scrape: crate::server::shell::metrics::Scrape) {
        // Serving means leading (a standby serves nothing).
        self.metrics.set_lease(
            self.leadership.as_ref().map_or(0, |l| l.tenure.epoch),
            self.leadership.as_ref().map(|l| l.renew_took),
        );
        let page = self
            .metrics
            .render(self.scheduler.metrics_snapshot(Instant::now()));
        let _ = scrape.send(page);
    }

    /// What the desk finished: one commit for all of it.
    fn on_files_done(
        &mut self,
        done: crate::server::store::files::FileDone,
        more: &mut mpsc::UnboundedReceiver<crate::server::store::files::FileDone>,
    ) {
        self.scheduler.on_file_done(Instant::now(), done);
        while let Ok(done) = more.try_recv() {
            self.scheduler.on_file_done(Instant::now(), done);
        }
    }

    /// What the history reader read: one commit for all of it.
    fn on_recalled(
        &mut self,
        done: crate::server::store::history::Recalled,
        more: &mut mpsc::UnboundedReceiver<crate::server::store::history::Recalled>,
    ) {
        self.scheduler.on_recalled(Instant::now(), done);
        while let Ok(done) = more.try_recv() {
            self.scheduler.on_recalled(Instant::now(), done);
        }
    }

    fn on_notifications_done(
        &mut self,
        done: crate::notify::outbox::Done,
        more: Option<&mut mpsc::UnboundedReceiver<crate::notify::outbox::Done>>,
    ) {
        self.scheduler.on_notify_done(Instant::now(), done);
        if let Some(more) = more {
            while let Ok(done) = more.try_recv() {
                self.scheduler.on_notify_done(Instant::now(), done);
            }
        }
    }

    /// New allow-lists: revoked keys lose their connections and their
    /// dashboard sessions; workers no longer allowed leave the registry.
    fn on_reload(
        &mut self,
        Reload {
            list: allow,
            denied,
        }: Reload,
    ) {
        let Some(gate) = self.gate.as_mut() else {
            return;
        };
        let now = Instant::now();
        let identities = allow.len();
        let allowed = allow.worker_names();
        let mut sessions_ended = 0;
        if let Some(d) = &self.dashboard {
            sessions_ended = d.set_users(allow.user_grants());
            if sessions_ended > 0 {
                info!(
                    sessions = sessions_ended,
                    "dashboard sessions ended: their user's key was removed or replaced, or its role changed"
                );
            }
        }
        // Users whose key went, changed or whose role changed: their
        // leases end, connected or not (a connected one's below too).
        let (before, after) = (gate.allow().user_grants(), allow.user_grants());
        let changed: Vec<String> = before
            .iter()
            .filter(|(name, grant)| after.get(*name) != Some(grant))
            .map(|(name, _)| name.clone())
            .collect();
        let revoked = gate.reload(allow);
        for user in changed {
            self.scheduler.revoke_leases(now, &user);
        }
        info!(
            identities,
            revoked = revoked.len(),
            sessions_ended,
            denied = denied.len(),
            "allow-lists reloaded"
        );
        self.scheduler.audit(
            now,
            "server",
            "-",
            "reload",
            &format!(
                "{identities} identities allowed, {} sessions revoked, {sessions_ended} dashboard sessions ended, {} entries denied",
                revoked.len(),
                denied.len()
            ),
        );
        self.scheduler
            .count_shell_event("allow_list_entries_denied", denied.len() as u64);
        for reason in denied.iter().take(20) {
            self.scheduler.audit(now, "server", "-", "denied", reason);
        }
        for (peer, identity) in revoked {
            self.out.disconnect(&peer);
            self.scheduler.on_revoked(now, &peer, &identity);
        }
        self.scheduler.retain_workers(now, |n| allowed.contains(n));
    }

    /// The heartbeat: the scheduler's timers, the shell's counters, idle
    /// connections closed.
    fn on_tick(&mut self) {
        let now = Instant::now();
        self.metrics
            .observe_tick_gap(now.saturating_duration_since(self.last_tick));
        self.last_tick = now;
        self.scheduler.on_tick(now);
        let lost = crate::logging::take_write_failures();
        if lost > 0 {
            self.scheduler.count_shell_event("log_writes_failed", lost);
        }
        for (name, n) in self.db.take_counters() {
            if n > 0 {
                self.scheduler.count_shell_event(name, n);
            }
        }
        let refused = self.out.publisher.subscriptions_refused();
        if refused > self.subscriptions_refused {
            self.scheduler.count_shell_event(
                "subscriptions_refused",
                refused - self.subscriptions_refused,
            );
            self.subscriptions_refused = refused;
        }
        if let Some(d) = &self.dashboard {
            let expired = self.web_pending.expire(&mut self.scheduler, now);
            self.scheduler
                .count_shell_event("web_requests_expired", expired as u64);
            for (name, n) in d.take_counters() {
                self.scheduler.count_shell_event(name, n);
            }
        }
        let idle = self.activity.take_idle(now);
        if !idle.is_empty() {
            self.scheduler
                .count_shell_event("idle_connections_closed", idle.len() as u64);
            debug!(
                closed = idle.len(),
                "closed connections silent for the idle timeout"
            );
            for peer in idle {
                self.out.router_tx.disconnect_peer(&peer);
            }
        }
    }

    /// The end of every turn: sign-in links minted, pongs out, the turn's
    /// changes committed, then (inside the lease) the replies.
    async fn end_turn(&mut self) -> Result<(), Fatal> {
        // Sign-in links asked for over Noise: minted by the dashboard,
        // answered by the scheduler (audited there).
        for ask in self.scheduler.take_web_logins() {
            let link = match &self.dashboard {
                Some(d) => {
                    let key = self.gate.as_ref().and_then(|g| g.key(&ask.peer));
                    d.mint_link(ask.identity.clone(), key)
                }
                None => Err("this server does not serve the web dashboard".to_string()),
            };
            self.scheduler.answer_web_login(&ask, link);
        }
        // Pongs say nothing durable: they leave before the commit (but,
        // like everything else, only from a leader inside its lease).
        let pongs = if still_leads(&mut self.leadership, Instant::now())? {
            self.scheduler.take_pongs()
        } else {
            Vec::new()
        };
        if !pongs.is_empty() {
            self.deliver(pongs).await?;
        }
        // Durable first, then the acknowledgements that say so.
        let scheduler = &self.scheduler;
        self.supervisor
            .tick(Instant::now(), || scheduler.status_line());
        self.commit().await?;
        if let Some(gate) = self.gate.as_mut() {
            for (name, n) in gate.take_counters() {
                self.scheduler.count_shell_event(name, n);
            }
        }
        // A leader acts only inside its lease: after a stop longer than
        // it (SIGSTOP, a stalled machine) nothing of this turn leaves.
        if !still_leads(&mut self.leadership, Instant::now())? {
            return Err(step_down(
                "the lease lapsed while this server was not running (stopped or stalled)",
            ));
        }
        let outputs = self.scheduler.take_outputs();
        let outputs = self
            .web_pending
            .answer(&mut self.scheduler, Instant::now(), outputs);
        self.deliver(outputs).await
    }

    /// Commits the turn's changes. A leader's commit must end inside its
    /// lease: one that hangs (the database unreachable, packets dropped)
    /// would otherwise keep a leader that cannot step down. A commit that
    /// fails stops the server, so that nothing is acknowledged that is not
    /// durable.
    async fn commit(&mut self) -> Result<(), Fatal> {
        let changes = self.scheduler.take_changes();
        let committing = Instant::now();
        let committed = match self.leadership.as_mut() {
            None => self.db.commit(&changes).await,
            Some(l) => {
                let commit = self.db.commit(&changes);
                tokio::pin!(commit);
                loop {
                    let until = tokio::time::Instant::from_std(l.tenure.valid_until());
                    match tokio::time::timeout_at(until, &mut commit).await {
                        Ok(r) => break r,
                        // Renewed meanwhile (a slow commit, a live
                        // database): wait on, to the new end of the lease.
                        Err(_) if l.holds(Instant::now())? => continue,
                        Err(_) => return Err(step_down("a commit did not finish within the lease (the database is unreachable or stalled)")),
                    }
                }
            }
        };
        if !changes.is_empty() {
            self.metrics.observe_commit(committing.elapsed());
        }
        match committed {
            Ok(()) => Ok(()),
            Err(e @ crate::server::store::db::StateError::Deposed { .. }) => {
                Err(step_down(&e.to_string()))
            }
            Err(e) => {
                error!(error = %e, "storage error: cannot commit server state; stopping so that nothing is acknowledged that is not durable");
                Err(Fatal::Commit(Box::new(e)))
            }
        }
    }

    async fn deliver(
        &mut self,
        outputs: Vec<crate::server::scheduler::Output>,
    ) -> Result<(), Fatal> {
        self.out
            .deliver(outputs, &mut self.scheduler, self.gate.as_mut())
            .await
    }

    /// An orderly stop: the workers are told, and the loop waits (bounded)
    /// until that is written to every connection, so that no worker learns
    /// of the stop from a failing connection instead.
    async fn shut_down(&mut self) -> Result<(), Fatal> {
        info!("server shutting down");
        self.supervisor.stopping("shutting down: telling workers");
        let outputs = self.scheduler.shutdown_announcement(Instant::now());
        self.deliver(outputs).await?;
        let deadline = Instant::now() + SHUTDOWN_FLUSH;
        while self.out.router_tx.queued_bytes() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await; // polling the socket's queues, bounded by the deadline
        }
        let unsent = self.out.router_tx.queued_bytes();
        if unsent > 0 {
            warn!(
                unsent_bytes = unsent,
                "shutting down with messages still queued to peers that do not read"
            );
        }
        Ok(())
    }
}
