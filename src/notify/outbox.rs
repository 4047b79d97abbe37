//! The notification outbox, without I/O: which deliveries an event makes,
//! when each is handed to the sender, what an attempt's result does, what
//! is listed and what is stored. The scheduler owns one and writes its
//! changed rows in the same commit as the event that caused them, so a
//! testrun's end and its notifications are durable together or not at
//! all; the shell hands [`Job`]s to the sender only after that commit.
//!
//! Each delivery is one event to one recipient (a webhook target, a
//! per-run URL, one mail address) with a stable id (`webhook-id`). Work
//! per call is bounded by the number of targets and the concurrency they
//! allow, never by how many deliveries wait.

use super::delivery::{Attempt, Delivery, RetryPolicy, State};
use super::event::{webhook_id, Event, Filter, Kind};
use super::urls::UrlRules;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The lane per-run URLs share (their concurrency and queue bound).
pub const URL_LANE: &str = "per-run-urls";
/// Attempts in flight to per-run URLs at once.
pub const URL_CONCURRENCY: usize = 4;

/// A configured target, as the scheduler sees it (no secrets, no I/O).
#[derive(Clone, Debug, PartialEq)]
pub struct TargetRule {
    pub name: String,
    pub kind: TargetKind,
    pub filter: Filter,
    pub per_run_only: bool,
    pub concurrency: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TargetKind {
    Webhook,
    /// Every matching event goes to each of `to`.
    Mail {
        to: Vec<String>,
    },
}

/// What the outbox may hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Bounds {
    pub max_pending: usize,
    pub max_pending_per_target: usize,
    pub max_kept: usize,
    pub max_payload_bytes: usize,
    pub keep_ms: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            max_pending: 10_000,
            max_pending_per_target: 2_000,
            max_kept: 10_000,
            max_payload_bytes: 256 * 1024,
            keep_ms: 7 * 24 * 3600 * 1000,
        }
    }
}

/// Everything `[notify]` says that the scheduler needs.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    pub targets: Vec<TargetRule>,
    /// The mail target `mailto:` entries go through.
    pub mail_relay: Option<String>,
    /// Domains `mailto:` entries may name (`notify.allow_mail_domains`,
    /// lower case)…
    pub mail_domains: Vec<String>,
    /// …besides the addresses the mail targets send to (lower case).
    pub mail_recipients: std::collections::HashSet<String>,
    pub urls: UrlRules,
    pub policy: RetryPolicy,
    pub bounds: Bounds,
    pub alert_after_ms: u64,
    /// The dashboard's address, for links in events.
    pub dashboard: Option<String>,
}

/// Who a delivery goes to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Recipient {
    /// The configured webhook named by the lane.
    Webhook,
    /// A per-run URL (checked at submit, its addresses at each attempt).
    Url { url: String },
    /// One address, through the mail target named by the lane.
    Mail { address: String },
}

/// One delivery as stored (a row of the `notifications` table).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub delivery: Delivery,
    /// The configured target carrying it, or [`URL_LANE`].
    pub lane: String,
    pub recipient: Recipient,
    pub event: Kind,
    pub run: Option<String>,
    /// The JSON body (the same bytes on every attempt).
    pub body: String,
    /// Unix ms it ended (delivered or failed).
    #[serde(default)]
    pub ended_ms: Option<u64>,
    /// Whose testrun it tells of: who may list it (rows from before it:
    /// none, so only operators list them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// Rows changed since the last commit: (id, run, encoded entry), and ids
/// to delete.
pub type Changes = (Vec<(String, Option<String>, Vec<u8>)>, Vec<String>);

/// What the sender is asked to do: one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub id: String,
    pub lane: String,
    pub recipient: Recipient,
    /// 1 for the first attempt.
    pub attempt: u32,
    pub body: std::sync::Arc<str>,
}

/// What the sender reports back.
#[derive(Clone, Debug, PartialEq)]
pub struct Done {
    pub id: String,
    pub attempt: u32,
    pub result: Attempt,
}

/// A target's standing, as listed.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
struct Standing {
    /// Unix ms of the first failure since its last success.
    failing_since: Option<u64>,
    alerted: bool,
    failures: u64,
    last_error: Option<String>,
}

/// What happened that the scheduler logs (the notifier does no I/O).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// A target has been failing for `alert_after`: logged as an error,
    /// once per failing stretch.
    TargetFailing {
        target: String,
        since_ms: u64,
        last_error: String,
    },
    /// A delivery ended in failure.
    Failed {
        id: String,
        target: String,
        why: String,
    },
    /// An event's delivery was refused (bound reached).
    Refused { target: String, why: String },
}

/// The outbox.
pub struct Notifier {
    rules: Rules,
    entries: HashMap<String, Entry>,
    /// Pending and not in flight, per lane, soonest first.
    due: HashMap<String, BTreeSet<(u64, String)>>,
    /// Attempts in flight per lane (and which ones).
    in_flight: HashMap<String, BTreeSet<String>>,
    /// Pending deliveries per lane (due or in flight).
    pending: HashMap<String, usize>,
    /// Ended deliveries, oldest first (what pruning looks at).
    ended: BTreeSet<(u64, String)>,
    /// How many of them were delivered (the rest failed).
    delivered: usize,
    /// Deliveries per testrun (a run's listing looks only at its own).
    by_run: HashMap<String, BTreeSet<String>>,
    standing: BTreeMap<String, Standing>,
    /// Rows to write and to delete at the next commit.
    touched: BTreeSet<String>,
    removed: Vec<String>,
    counters: BTreeMap<&'static str, u64>,
    notices: Vec<Notice>,
}

/// One delivery, as `ots-submit notifications` lists it.
pub use crate::protocol::NotificationInfo;
pub use crate::protocol::NotifyTargetInfo;

impl Notifier {
    pub fn new(rules: Rules) -> Notifier {
        Notifier {
            rules,
            entries: HashMap::new(),
            due: HashMap::new(),
            in_flight: HashMap::new(),
            pending: HashMap::new(),
            ended: BTreeSet::new(),
            delivered: 0,
            by_run: HashMap::new(),
            standing: BTreeMap::new(),
            touched: BTreeSet::new(),
            removed: Vec::new(),
            counters: BTreeMap::new(),
            notices: Vec::new(),
        }
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The dashboard's address, once it is known (links in events).
    pub fn set_dashboard(&mut self, url: Option<String>) {
        self.rules.dashboard = url;
    }

    /// Anything configured that an event could go to.
    pub fn is_active(&self) -> bool {
        !self.rules.targets.is_empty() || !self.rules.urls.allow.is_empty()
    }

    fn count(&mut self, name: &'static str, n: u64) {
        *self.counters.entry(name).or_default() += n;
    }

    /// Counters since the last call (`notifications_*`).
    pub fn take_counters(&mut self) -> Vec<(&'static str, u64)> {
        std::mem::take(&mut self.counters).into_iter().collect()
    }

    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.notices)
    }

    /// Checks a testrun's `--notify` entries at submit.
    pub fn check_per_run(&self, entries: &[String]) -> Result<(), String> {
        if entries.len() > super::urls::MAX_PER_RUN {
            return Err(format!(
                "{} --notify entries; at most {} per testrun",
                entries.len(),
                super::urls::MAX_PER_RUN
            ));
        }
        for e in entries {
            self.per_run_recipient(e)
                .map_err(|why| format!("--notify {:?}: {why}", clip(e)))?;
        }
        Ok(())
    }

    /// The lane and recipient of a per-run entry.
    fn per_run_recipient(&self, entry: &str) -> Result<(String, Recipient), String> {
        if entry.len() > super::urls::MAX_ENTRY_BYTES {
            return Err(format!(
                "longer than {} bytes",
                super::urls::MAX_ENTRY_BYTES
            ));
        }
        if let Some(address) = entry.strip_prefix("mailto:") {
            super::mail::check_address(address)?;
            let lower = address.to_ascii_lowercase();
            let domain = lower.rsplit_once('@').map_or("", |(_, d)| d);
            if !self.rules.mail_recipients.contains(&lower)
                && !self.rules.mail_domains.iter().any(|d| d == domain)
            {
                return Err(format!(
                    "{address} is not an address this server mails already, and its domain is not in notify.allow_mail_domains ({}): ask the operator to allow the domain",
                    if self.rules.mail_domains.is_empty() {
                        "empty".to_string()
                    } else {
                        self.rules.mail_domains.join(", ")
                    }
                ));
            }
            let relay = self
                .rules
                .mail_relay
                .clone()
                .ok_or("this server sends no mail (no [[notify.mail]] in its configuration)")?;
            return Ok((
                relay,
                Recipient::Mail {
                    address: address.to_string(),
                },
            ));
        }
        if entry.starts_with("http://") || entry.starts_with("https://") {
            self.rules.urls.check(entry)?;
            return Ok((
                URL_LANE.to_string(),
                Recipient::Url {
                    url: entry.to_string(),
                },
            ));
        }
        match self.rules.targets.iter().find(|t| t.name == entry) {
            Some(t) if matches!(t.kind, TargetKind::Webhook) => {
                Ok((t.name.clone(), Recipient::Webhook))
            }
            Some(_) => Err(format!(
                "{entry} is a mail target: name an address as mailto:ADDR"
            )),
            None => Err(format!(
                "no notification target is named {entry} (configured: {}); or give mailto:ADDR or an allowed URL",
                if self.rules.targets.is_empty() {
                    "none".to_string()
                } else {
                    self.rules
                        .targets
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                }
            )),
        }
    }

    /// Makes the deliveries of `event`: to every configured target whose
    /// filters pass it (except `per_run_only` ones), and, for a testrun,
    /// to each of its `--notify` entries. Returns how many were made.
    pub fn on_event(&mut self, event: &Event, per_run: &[String], now_ms: u64) -> usize {
        let body = event.body.to_string();
        let mut recipients: Vec<(String, Recipient, String)> = Vec::new();
        for t in &self.rules.targets {
            if t.per_run_only || !t.filter.matches(event) {
                continue;
            }
            match &t.kind {
                TargetKind::Webhook => {
                    recipients.push((t.name.clone(), Recipient::Webhook, t.name.clone()))
                }
                TargetKind::Mail { to } => {
                    for a in to {
                        recipients.push((
                            t.name.clone(),
                            Recipient::Mail { address: a.clone() },
                            format!("mailto:{a}"),
                        ))
                    }
                }
            }
        }
        // Operator rules only for worker events.
        if event.kind == Kind::TestrunFinished {
            for e in per_run {
                match self.per_run_recipient(e) {
                    Ok((lane, r)) => {
                        let key = match &r {
                            Recipient::Webhook => lane.clone(),
                            Recipient::Mail { address } => format!("mailto:{address}"),
                            Recipient::Url { url } => url.clone(),
                        };
                        recipients.push((lane, r, key));
                    }
                    // Checked at submit; the configuration changed since.
                    Err(why) => {
                        self.count("notifications_refused_target_gone", 1);
                        self.notices.push(Notice::Refused {
                            target: clip(e),
                            why,
                        });
                    }
                }
            }
        }
        let mut made = 0;
        for (lane, recipient, key) in recipients {
            let id = webhook_id(&event.key, &key);
            if self.entries.contains_key(&id) {
                continue; // the same recipient twice (a filter and --notify)
            }
            if body.len() > self.rules.bounds.max_payload_bytes {
                self.count("notifications_refused_too_large", 1);
                self.notices.push(Notice::Refused {
                    target: key,
                    why: format!(
                        "its body is {} bytes, over notify.max_payload_bytes ({})",
                        body.len(),
                        self.rules.bounds.max_payload_bytes
                    ),
                });
                continue;
            }
            let pending_here = self.pending.get(&lane).copied().unwrap_or(0);
            let pending_all: usize = self.pending.values().sum();
            if pending_all >= self.rules.bounds.max_pending
                || pending_here >= self.rules.bounds.max_pending_per_target
            {
                self.count("notifications_refused_outbox_full", 1);
                self.notices.push(Notice::Refused {
                    target: key,
                    why: format!(
                        "{pending_all} deliveries wait ({pending_here} for {lane}): notify.max_pending / max_pending_per_target reached"
                    ),
                });
                continue;
            }
            let entry = Entry {
                delivery: Delivery::new(id.clone(), key, now_ms),
                lane,
                recipient,
                event: event.kind,
                run: event
                    .key
                    .strip_prefix("testrun_finished/")
                    .map(str::to_string),
                body: body.clone(),
                ended_ms: None,
                owner: event.owner.clone(),
            };
            self.insert(entry);
            self.count("notifications_created", 1);
            made += 1;
        }
        made
    }

    fn insert(&mut self, e: Entry) {
        let id = e.delivery.id.clone();
        match e.delivery.state {
            State::Pending => {
                *self.pending.entry(e.lane.clone()).or_default() += 1;
                self.due
                    .entry(e.lane.clone())
                    .or_default()
                    .insert((e.delivery.next_ms, id.clone()));
            }
            State::Delivered | State::Failed => {
                self.delivered += usize::from(e.delivery.state == State::Delivered);
                self.ended
                    .insert((e.ended_ms.unwrap_or(e.delivery.created_ms), id.clone()));
            }
        }
        self.touched.insert(id.clone());
        if let Some(run) = &e.run {
            self.by_run
                .entry(run.clone())
                .or_default()
                .insert(id.clone());
        }
        self.entries.insert(id, e);
    }

    /// Puts back a stored row (after a restart). Attempts in flight at
    /// the crash are due again: the receiver may see that id once more.
    pub fn restore(&mut self, row: Entry) {
        let id = row.delivery.id.clone();
        self.insert(row);
        self.touched.remove(&id);
    }

    fn concurrency(&self, lane: &str) -> usize {
        if lane == URL_LANE {
            return URL_CONCURRENCY;
        }
        self.rules
            .targets
            .iter()
            .find(|t| t.name == lane)
            .map_or(1, |t| t.concurrency)
    }

    /// The attempts due at `now_ms` that their lanes have room for.
    pub fn take_due(&mut self, now_ms: u64) -> Vec<Job> {
        let mut jobs = Vec::new();
        let lanes: Vec<String> = self.due.keys().cloned().collect();
        for lane in lanes {
            let room = self.concurrency(&lane);
            loop {
                let busy = self.in_flight.get(&lane).map_or(0, BTreeSet::len);
                if busy >= room {
                    break;
                }
                let Some(queue) = self.due.get_mut(&lane) else {
                    break;
                };
                let Some((at, id)) = queue.first().cloned() else {
                    break;
                };
                if at > now_ms {
                    break;
                }
                queue.remove(&(at, id.clone()));
                let Some(e) = self.entries.get(&id) else {
                    continue;
                };
                jobs.push(Job {
                    id: id.clone(),
                    lane: lane.clone(),
                    recipient: e.recipient.clone(),
                    attempt: e.delivery.attempts.saturating_add(1),
                    body: e.body.as_str().into(),
                });
                self.in_flight.entry(lane.clone()).or_default().insert(id);
            }
        }
        self.due.retain(|_, q| !q.is_empty());
        jobs
    }

    /// When the next attempt is due (for the shell's timer), if any: of
    /// lanes with room only — a full lane is pumped when one of its
    /// attempts ends, not polled.
    pub fn next_due_ms(&self) -> Option<u64> {
        self.due
            .iter()
            .filter(|(lane, _)| {
                self.in_flight.get(*lane).map_or(0, BTreeSet::len) < self.concurrency(lane)
            })
            .filter_map(|(_, q)| q.first().map(|(at, _)| *at))
            .min()
    }

    /// An attempt's result. `jitter` in [0, 1) spreads retries.
    pub fn on_done(&mut self, done: Done, now_ms: u64, jitter: f64) {
        let Some(e) = self.entries.get_mut(&done.id) else {
            self.count("notifications_results_unknown", 1);
            return;
        };
        let lane = e.lane.clone();
        let was_in_flight = self
            .in_flight
            .get_mut(&lane)
            .is_some_and(|s| s.remove(&done.id));
        if !was_in_flight || e.delivery.state != State::Pending {
            self.count("notifications_results_stale", 1);
            return;
        }
        e.delivery
            .attempted(now_ms, &done.result, &self.rules.policy, jitter);
        self.touched.insert(done.id.clone());
        let standing = self.standing.entry(lane.clone()).or_default();
        match e.delivery.state {
            State::Delivered => {
                *standing = Standing {
                    failures: standing.failures,
                    ..Standing::default()
                };
            }
            _ => {
                standing.failures = standing.failures.saturating_add(1);
                standing.last_error = e.delivery.last.clone();
                let since = *standing.failing_since.get_or_insert(now_ms);
                if !standing.alerted && now_ms.saturating_sub(since) >= self.rules.alert_after_ms {
                    standing.alerted = true;
                    self.notices.push(Notice::TargetFailing {
                        target: lane.clone(),
                        since_ms: since,
                        last_error: e.delivery.last.clone().unwrap_or_default(),
                    });
                }
            }
        }
        match e.delivery.state {
            State::Pending => {
                self.due
                    .entry(lane.clone())
                    .or_default()
                    .insert((e.delivery.next_ms, done.id.clone()));
                self.counters
                    .entry("notifications_attempts_failed")
                    .and_modify(|n| *n += 1)
                    .or_insert(1);
            }
            end => {
                e.ended_ms = Some(now_ms);
                self.ended.insert((now_ms, done.id.clone()));
                self.delivered += usize::from(end == State::Delivered);
                if let Some(n) = self.pending.get_mut(&lane) {
                    *n = n.saturating_sub(1);
                }
                let name = if end == State::Delivered {
                    "notifications_delivered"
                } else {
                    self.notices.push(Notice::Failed {
                        id: done.id.clone(),
                        target: e.delivery.target.clone(),
                        why: e.delivery.last.clone().unwrap_or_default(),
                    });
                    "notifications_failed"
                };
                *self.counters.entry(name).or_default() += 1;
            }
        }
    }

    /// An operator's `notify-retry ID`: pending again, due now, with a
    /// fresh `max_age`. Refused while an attempt is in flight.
    pub fn retry(&mut self, id: &str, now_ms: u64) -> Result<NotificationInfo, String> {
        let Some(e) = self.entries.get(id) else {
            return Err(format!(
                "no notification {id} (ots-submit notifications lists them)"
            ));
        };
        let lane = e.lane.clone();
        if self.in_flight.get(&lane).is_some_and(|s| s.contains(id)) {
            return Err(format!(
                "{id} is being sent right now; look again in a moment"
            ));
        }
        let e = self.entries.get_mut(id).expect("entry");
        match e.delivery.state {
            State::Pending => {
                if let Some(q) = self.due.get_mut(&lane) {
                    q.remove(&(e.delivery.next_ms, id.to_string()));
                }
            }
            ended => {
                self.ended
                    .remove(&(e.ended_ms.unwrap_or(e.delivery.created_ms), id.to_string()));
                self.delivered = self
                    .delivered
                    .saturating_sub(usize::from(ended == State::Delivered));
                *self.pending.entry(lane.clone()).or_default() += 1;
            }
        }
        e.delivery.retry_now(now_ms);
        e.ended_ms = None;
        self.due
            .entry(lane)
            .or_default()
            .insert((now_ms, id.to_string()));
        self.touched.insert(id.to_string());
        Ok(self.info(id, now_ms).expect("entry"))
    }

    /// Forgets ended deliveries past `keep`, and the oldest past
    /// `max_kept` (counted).
    pub fn prune(&mut self, now_ms: u64) {
        while let Some((at, id)) = self.ended.first().cloned() {
            let old = now_ms.saturating_sub(at) > self.rules.bounds.keep_ms;
            let over = self.ended.len() > self.rules.bounds.max_kept;
            if !old && !over {
                break;
            }
            if over && !old {
                self.count("notifications_forgotten_over_max_kept", 1);
            }
            self.ended.remove(&(at, id.clone()));
            if let Some(e) = self.entries.remove(&id) {
                self.delivered = self
                    .delivered
                    .saturating_sub(usize::from(e.delivery.state == State::Delivered));
                if let Some(ids) = e.run.as_ref().and_then(|r| self.by_run.get_mut(r)) {
                    ids.remove(&id);
                    if ids.is_empty() {
                        self.by_run.remove(e.run.as_deref().unwrap_or_default());
                    }
                }
            }
            self.touched.remove(&id);
            self.removed.push(id);
        }
    }

    /// Rows changed since the last call: (id, run, encoded entry), and
    /// ids to delete.
    pub fn take_changes(&mut self) -> Changes {
        let rows = std::mem::take(&mut self.touched)
            .into_iter()
            .filter_map(|id| {
                let e = self.entries.get(&id)?;
                let body = rmp_serde::to_vec_named(e).expect("entries serialise");
                Some((id, e.run.clone(), body))
            })
            .collect();
        (rows, std::mem::take(&mut self.removed))
    }

    fn info(&self, id: &str, _now_ms: u64) -> Option<NotificationInfo> {
        let e = self.entries.get(id)?;
        let sending = self.in_flight.get(&e.lane).is_some_and(|s| s.contains(id));
        Some(NotificationInfo {
            id: id.to_string(),
            event: e.event,
            run: e.run.clone(),
            target: e.delivery.target.clone(),
            via: e.lane.clone(),
            state: if sending {
                "sending".into()
            } else {
                match e.delivery.state {
                    State::Pending => "pending",
                    State::Delivered => "delivered",
                    State::Failed => "failed",
                }
                .into()
            },
            attempts: e.delivery.attempts,
            last: e.delivery.last.clone(),
            created_ms: e.delivery.created_ms,
            next_ms: (e.delivery.state == State::Pending).then_some(e.delivery.next_ms),
            ended_ms: e.ended_ms,
        })
    }

    /// Deliveries, newest first, at most `limit`: of one testrun, or all
    /// that `visible` lets through; `failed` only the failed ones.
    pub fn list(
        &self,
        run: Option<&str>,
        failed: bool,
        limit: usize,
        visible: impl Fn(&Entry) -> bool,
        now_ms: u64,
    ) -> Vec<NotificationInfo> {
        let all: Box<dyn Iterator<Item = &Entry>> = match run {
            Some(r) => Box::new(
                self.by_run
                    .get(r)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| self.entries.get(id)),
            ),
            None => Box::new(self.entries.values()),
        };
        let mut found: Vec<&Entry> = all
            .filter(|e| !failed || e.delivery.state == State::Failed)
            .filter(|e| visible(e))
            .collect();
        found.sort_by(|a, b| {
            (b.delivery.created_ms, &b.delivery.id).cmp(&(a.delivery.created_ms, &a.delivery.id))
        });
        found.truncate(limit);
        found
            .into_iter()
            .filter_map(|e| self.info(&e.delivery.id, now_ms))
            .collect()
    }

    pub fn entry(&self, id: &str) -> Option<&Entry> {
        self.entries.get(id)
    }

    /// Each target's standing (and the per-run URL lane, if used).
    pub fn targets(&self) -> Vec<NotifyTargetInfo> {
        let mut lanes: Vec<(String, &'static str)> = self
            .rules
            .targets
            .iter()
            .map(|t| {
                (
                    t.name.clone(),
                    match t.kind {
                        TargetKind::Webhook => "webhook",
                        TargetKind::Mail { .. } => "mail",
                    },
                )
            })
            .collect();
        if !self.rules.urls.allow.is_empty() {
            lanes.push((URL_LANE.to_string(), "webhook"));
        }
        lanes
            .into_iter()
            .map(|(name, kind)| {
                let s = self.standing.get(&name).cloned().unwrap_or_default();
                NotifyTargetInfo {
                    pending: self.pending.get(&name).copied().unwrap_or(0) as u64,
                    in_flight: self.in_flight.get(&name).map_or(0, BTreeSet::len) as u64,
                    kind: kind.into(),
                    failing_since_ms: s.failing_since,
                    alert: s.alerted,
                    failures: s.failures,
                    last_error: s.last_error,
                    name,
                }
            })
            .collect()
    }

    /// Deliveries per state (metrics `ots_notifications{state}`).
    pub fn states(&self) -> [(&'static str, u64); 4] {
        let sending: usize = self.in_flight.values().map(BTreeSet::len).sum();
        let pending: usize = self.pending.values().sum();
        [
            ("pending", pending.saturating_sub(sending) as u64),
            ("sending", sending as u64),
            ("delivered", self.delivered as u64),
            (
                "failed",
                self.ended.len().saturating_sub(self.delivered) as u64,
            ),
        ]
    }
}

fn clip(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Verdict;

    fn rules() -> Rules {
        Rules {
            targets: vec![
                TargetRule {
                    name: "ci".into(),
                    kind: TargetKind::Webhook,
                    filter: Filter::default(),
                    per_run_only: false,
                    concurrency: 2,
                },
                TargetRule {
                    name: "mail".into(),
                    kind: TargetKind::Mail {
                        to: vec!["lab@example.com".into()],
                    },
                    filter: Filter {
                        events: vec![Kind::WorkerHealthChanged],
                        ..Filter::default()
                    },
                    per_run_only: false,
                    concurrency: 1,
                },
            ],
            mail_relay: Some("mail".into()),
            mail_domains: vec!["example.com".into()],
            mail_recipients: ["lab@example.com".to_string()].into(),
            urls: UrlRules::default(),
            policy: RetryPolicy::default(),
            bounds: Bounds {
                max_pending: 5,
                ..Bounds::default()
            },
            alert_after_ms: 10_000,
            dashboard: None,
        }
    }

    fn event(run: &str) -> Event {
        Event {
            kind: Kind::TestrunFinished,
            key: format!("testrun_finished/{run}"),
            owner: Some("ann".into()),
            devicegroups: vec!["g".into()],
            verdict: Some(Verdict::Pass),
            regressions: None,
            body: serde_json::json!({"type": "testrun_finished", "run": run}),
        }
    }

    #[test]
    fn an_event_goes_to_matching_targets_and_its_per_run_recipients_once_each() {
        let mut n = Notifier::new(rules());
        let made = n.on_event(
            &event("r1"),
            &["ci".into(), "mailto:ann@example.com".into()],
            0,
        );
        // ci once (filter and --notify are the same recipient), ann's mail.
        assert_eq!(made, 2);
        let jobs = n.take_due(0);
        assert_eq!(jobs.len(), 2);
        assert!(jobs.iter().all(|j| j.attempt == 1));
        let mail = jobs.iter().find(|j| j.lane == "mail").unwrap();
        assert_eq!(
            mail.recipient,
            Recipient::Mail {
                address: "ann@example.com".into()
            }
        );
        // In flight: not handed out again.
        assert!(n.take_due(10_000).is_empty());
        let (rows, _) = n.take_changes();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|(_, run, _)| run.as_deref() == Some("r1")));
    }

    #[test]
    fn per_run_entries_are_checked() {
        let n = Notifier::new(rules());
        assert!(n.check_per_run(&["ci".into()]).is_ok());
        assert!(n
            .check_per_run(&["nope".into()])
            .unwrap_err()
            .contains("ci, mail"));
        assert!(n
            .check_per_run(&["mail".into()])
            .unwrap_err()
            .contains("mailto:"));
        assert!(n.check_per_run(&["mailto:x".into()]).is_err());
        // The relay mails its own recipients and the allowed domains only.
        assert!(n.check_per_run(&["mailto:LAB@example.com".into()]).is_ok());
        assert!(n.check_per_run(&["mailto:ann@example.com".into()]).is_ok());
        assert!(n
            .check_per_run(&["mailto:victim@elsewhere.org".into()])
            .unwrap_err()
            .contains("allow_mail_domains"));
        assert!(n
            .check_per_run(&["http://127.0.0.1:1/x".into()])
            .unwrap_err()
            .contains("allow_urls"));
        assert!(n.check_per_run(&vec!["ci".to_string(); 5]).is_err());
    }

    #[test]
    fn retries_keep_the_id_and_a_success_ends_it() {
        let mut n = Notifier::new(rules());
        n.on_event(&event("r1"), &[], 0);
        let job = n.take_due(0).pop().unwrap();
        let id = job.id.clone();
        n.on_done(
            Done {
                id: id.clone(),
                attempt: 1,
                result: Attempt::Status(500),
            },
            100,
            0.5,
        );
        assert!(n.take_due(500).is_empty());
        assert_eq!(
            n.next_due_ms(),
            Some(1100),
            "due 1 s after the failure (jitter 0.5)"
        );
        let again = n.take_due(1100).pop().unwrap();
        assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
        n.on_done(
            Done {
                id: id.clone(),
                attempt: 2,
                result: Attempt::Status(204),
            },
            1200,
            0.5,
        );
        let l = n.list(None, false, 10, |_| true, 1200);
        assert_eq!(l[0].state, "delivered");
        assert_eq!(l[0].attempts, 2);
        assert_eq!(n.states()[2], ("delivered", 1));
        // A late duplicate result changes nothing.
        n.on_done(
            Done {
                id,
                attempt: 2,
                result: Attempt::Status(500),
            },
            1300,
            0.5,
        );
        assert_eq!(n.list(None, false, 10, |_| true, 0)[0].state, "delivered");
    }

    #[test]
    fn a_refusal_fails_it_an_operator_retry_revives_it_and_failing_targets_alert_once() {
        let mut n = Notifier::new(rules());
        n.on_event(&event("r1"), &[], 0);
        n.on_event(&event("r2"), &[], 0);
        let jobs = n.take_due(0);
        assert_eq!(jobs.len(), 2, "concurrency 2");
        for (i, j) in jobs.into_iter().enumerate() {
            n.on_done(
                Done {
                    id: j.id,
                    attempt: 1,
                    result: Attempt::Status(400),
                },
                20_000 * i as u64,
                0.5,
            );
        }
        let failed = n.list(None, true, 10, |_| true, 0);
        assert_eq!(failed.len(), 2);
        let notices = n.take_notices();
        assert_eq!(
            notices
                .iter()
                .filter(|x| matches!(x, Notice::TargetFailing { .. }))
                .count(),
            1
        );
        let t = n.targets();
        assert!(t[0].alert && t[0].failing_since_ms == Some(0));
        let id = failed[0].id.clone();
        let info = n.retry(&id, 30_000).unwrap();
        assert_eq!(info.state, "pending");
        let job = n.take_due(30_000).pop().unwrap();
        assert_eq!((job.id.as_str(), job.attempt), (id.as_str(), 2));
        n.on_done(
            Done {
                id,
                attempt: 2,
                result: Attempt::Status(200),
            },
            30_001,
            0.5,
        );
        assert!(!n.targets()[0].alert, "a success ends the failing stretch");
    }

    #[test]
    fn a_full_lane_is_not_polled() {
        let mut n = Notifier::new(rules());
        for r in ["r1", "r2", "r3"] {
            n.on_event(&event(r), &[], 0);
        }
        assert_eq!(n.next_due_ms(), Some(0));
        let jobs = n.take_due(0);
        assert_eq!(jobs.len(), 2, "concurrency 2");
        assert_eq!(n.next_due_ms(), None, "r3 waits for room, not for a timer");
        n.on_done(
            Done {
                id: jobs[0].id.clone(),
                attempt: 1,
                result: Attempt::Status(200),
            },
            5,
            0.5,
        );
        assert_eq!(n.take_due(5).len(), 1, "room again: r3 goes");
    }

    #[test]
    fn the_outbox_is_bounded_and_ended_deliveries_are_pruned() {
        let mut n = Notifier::new(rules());
        for i in 0..7 {
            n.on_event(&event(&format!("r{i}")), &[], 0);
        }
        assert_eq!(n.states()[0].1, 5);
        assert_eq!(
            n.take_counters()
                .into_iter()
                .find(|(k, _)| *k == "notifications_refused_outbox_full"),
            Some(("notifications_refused_outbox_full", 2))
        );
        for j in n.take_due(0) {
            n.on_done(
                Done {
                    id: j.id,
                    attempt: 1,
                    result: Attempt::Status(200),
                },
                0,
                0.5,
            );
        }
        let _ = n.take_changes();
        n.prune(Bounds::default().keep_ms + 1);
        let (_, removed) = n.take_changes();
        assert_eq!(removed.len(), 2);
    }

    #[test]
    fn a_restored_row_in_flight_at_the_crash_is_due_again() {
        let mut n = Notifier::new(rules());
        n.on_event(&event("r1"), &[], 0);
        let job = n.take_due(0).pop().unwrap();
        let (rows, _) = n.take_changes();
        let mut m = Notifier::new(rules());
        for (_, _, body) in rows {
            m.restore(rmp_serde::from_slice(&body).unwrap());
        }
        let again = m.take_due(5).pop().unwrap();
        assert_eq!(again.id, job.id);
        assert_eq!(again.body, job.body);
    }
}
