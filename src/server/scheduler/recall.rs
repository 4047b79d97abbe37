//! History on demand: the scheduler holds what is alive and, of the
//! ended testruns, only the last `history.cache_runs` to end or be read.
//! A request that names another one (its status, log, files, a lease, a
//! worker's recent tasks) waits while the shell's history reader
//! ([`crate::server::store::history`]) reads its rows off the loop; once
//! they are in memory the request is handled as if they had never left,
//! so its answer and its authorisation are those of a testrun in memory.
//! The `runs` list is a page the database finds by its own indexes.
//!
//! Waiting requests are bounded in all and per user (`history.max_reads`,
//! `history.max_reads_per_user`, counted in `history_reads_refused`). A
//! testrun leaves memory once its final rows are committed and nothing
//! live refers to it: no follower, no worker, no lease, no upload.

use super::persist::{check_run, decode, encode, task_of_row, testrun_of_row, RunRow, TaskRow};
use super::*;
use crate::server::store::history::{Found, Recall, RecallJob, Recalled, Rows, RunQuery};
use crate::server::store::index::{state_token, verdict_token, RunIndex};

/// What the scheduler keeps of the history it does not hold.
#[derive(Default)]
pub(super) struct Recollection {
    /// Ended testruns in memory, in the order they ended or were read:
    /// past `history.cache_runs` the first leave.
    pub(super) cached: VecDeque<RunId>,
    next_ticket: u64,
    /// Bumped whenever retention changes a testrun: rows read before it
    /// may predate the change and are read again.
    pub(super) epoch: u64,
    /// What each question out is for.
    asked: HashMap<u64, Asked>,
    /// Testruns being read, and the question reading them.
    loading: HashMap<RunId, u64>,
    /// Requests waiting, in all and per user.
    waiting: usize,
    per_user: HashMap<String, usize>,
    /// A retention read is out, and the earliest end of a testrun that
    /// ended since it was asked.
    pub(super) kept_asked: bool,
    pub(super) ended_since_asked: Option<u64>,
}

enum Asked {
    /// Requests handled once these testruns are in memory.
    Runs {
        runs: Vec<RunId>,
        parked: Vec<Parked>,
    },
    /// One `runs` page.
    List { parked: Box<Parked>, request: u64 },
    /// One page of a testrun's cases.
    Cases {
        parked: Box<Parked>,
        request: u64,
        run: RunId,
    },
    /// Retention's next candidates.
    Kept,
    /// The newest ended leases, for `list_leases --all`.
    Leases { parked: Vec<Parked> },
    /// `compare`, `get_case_history`, `list_flaky`.
    Results { parked: Box<Parked>, request: u64 },
    /// The triage of a testrun that ended.
    Triage { run: RunId },
}

/// A request waiting for history.
struct Parked {
    peer: PeerId,
    who: String,
    env: Envelope,
}

/// Ended leases `list_leases --all` reads (it shows the newest of them).
const ENDED_LEASES_READ: usize = 200;

impl<S: Store> Scheduler<S> {
    /// Holds `env` back when it names history not in memory (and asks
    /// for it); gives it back to be handled now otherwise.
    pub(super) fn recall_first(
        &mut self,
        now: Instant,
        peer: &PeerId,
        env: Envelope,
    ) -> Option<Envelope> {
        // Only a user's requests: anything else is refused (or handled)
        // as it is, without a read.
        let user = !self.cfg.secure
            || self
                .callers
                .get(peer)
                .is_some_and(|c| matches!(c.identity, crate::security::Identity::User { .. }));
        if env.body.request().is_none() || !user {
            return Some(env);
        }
        let recall = match &env.body {
            Body::ListLeases { all: true, .. } => Recall::EndedLeases(ENDED_LEASES_READ),
            body => {
                let missing = self.missing_runs(body);
                if missing.is_empty() {
                    return Some(env);
                }
                // Already being read (a page asks for a testrun's status,
                // events and log at once): wait for that read.
                if let Some(&ticket) = self.recall.loading.get(&missing[0]) {
                    if missing
                        .iter()
                        .all(|r| self.recall.loading.get(r) == Some(&ticket))
                        && matches!(self.recall.asked.get(&ticket), Some(Asked::Runs { .. }))
                    {
                        if let Some(parked) = self.park(now, peer, env) {
                            if let Some(Asked::Runs { parked: list, .. }) =
                                self.recall.asked.get_mut(&ticket)
                            {
                                list.push(parked);
                            }
                        }
                        return None;
                    }
                }
                Recall::Runs(missing)
            }
        };
        let parked = self.park(now, peer, env)?;
        let asked = match &recall {
            Recall::Runs(runs) => Asked::Runs {
                runs: runs.clone(),
                parked: vec![parked],
            },
            _ => Asked::Leases {
                parked: vec![parked],
            },
        };
        self.ask_history(recall, asked);
        None
    }

    /// The testruns `body` names that are not in memory but may be stored.
    fn missing_runs(&self, body: &Body) -> Vec<RunId> {
        let named: Vec<&str> = match body {
            Body::GetStatus { run, .. }
            | Body::GetEvents { run, .. }
            | Body::CancelRun { run, .. }
            | Body::Follow { run, .. }
            | Body::ListCases { run, .. }
            | Body::ListNotifications { run: Some(run), .. } => vec![run.as_str()],
            Body::Compare { run, base, .. } => std::iter::once(run.as_str())
                .chain(base.as_deref())
                .collect(),
            Body::GetLog { task, .. }
            | Body::GetLogTail { task, .. }
            | Body::FindInLog { task, .. }
            | Body::GetFile { task, .. } => task
                .rsplit_once('.')
                .map(|(run, _)| run)
                .into_iter()
                .collect(),
            Body::LeaseAct { lease, .. }
            | Body::ConsoleAttach { lease, .. }
            | Body::ConsoleInput { lease, .. }
            | Body::Power { lease, .. } => vec![lease.as_str()],
            Body::WorkerHealth { worker, .. } => {
                self.workers.get(worker).map_or_else(Vec::new, |w| {
                    w.recent
                        .iter()
                        .filter_map(|t| t.rsplit_once('.').map(|(run, _)| run))
                        .collect()
                })
            }
            _ => Vec::new(),
        };
        let mut missing: Vec<RunId> = Vec::new();
        for id in named {
            if !self.runs.contains_key(id)
                && self.may_be_stored(id)
                && !missing.iter().any(|m| m == id)
            {
                missing.push(id.to_string());
            }
        }
        missing
    }

    /// Whether `id` is a testrun or lease number this server gave out.
    fn may_be_stored(&self, id: &str) -> bool {
        id.strip_prefix(['r', 'l'])
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|n| n >= 1 && n < self.next_run)
    }

    /// Counts a request in as waiting, or refuses it (the bounds).
    fn park(&mut self, _now: Instant, peer: &PeerId, env: Envelope) -> Option<Parked> {
        let who = self
            .owner(peer)
            .unwrap_or_else(|| format!("connection {}", hex::encode(peer)));
        let rules = &self.cfg.history;
        let mine = self.recall.per_user.get(&who).copied().unwrap_or(0);
        let refusal = if self.recall.waiting >= rules.max_reads {
            Some(format!(
                "{} requests already wait for history read from the database (history.max_reads); try again shortly",
                self.recall.waiting
            ))
        } else if mine >= rules.max_reads_per_user {
            Some(format!(
                "{who} has {mine} requests waiting for history read from the database (history.max_reads_per_user); wait for their answers"
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            self.count("history_reads_refused", 1);
            self.send_error(peer, env.body.request(), ErrorCode::LimitReached, message);
            return None;
        }
        self.recall.waiting += 1;
        *self.recall.per_user.entry(who.clone()).or_default() += 1;
        Some(Parked {
            peer: peer.clone(),
            who,
            env,
        })
    }

    /// A waiting request is answered (or dropped): it no longer counts.
    fn unpark(&mut self, parked: &Parked) {
        self.recall.waiting = self.recall.waiting.saturating_sub(1);
        if let Some(n) = self.recall.per_user.get_mut(&parked.who) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.recall.per_user.remove(&parked.who);
            }
        }
    }

    fn ask_history(&mut self, recall: Recall, asked: Asked) {
        self.recall.next_ticket += 1;
        let ticket = self.recall.next_ticket;
        if let Recall::Runs(runs) = &recall {
            for r in runs {
                self.recall.loading.insert(r.clone(), ticket);
            }
        }
        self.recall.asked.insert(ticket, asked);
        self.count("history_reads", 1);
        self.out.push(Output::Recall(RecallJob {
            ticket,
            epoch: self.recall.epoch,
            recall,
        }));
    }

    /// A `runs` page: asked of the database (answered when it is read),
    /// or refused at once.
    pub(super) fn ask_runs_page(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        query: RunQuery,
        env: Envelope,
    ) -> Option<(ErrorCode, String)> {
        let parked = self.park(now, peer, env)?;
        self.ask_history(
            Recall::List(query),
            Asked::List {
                parked: Box::new(parked),
                request,
            },
        );
        None
    }

    /// A page of a testrun's test cases (of each task's last attempt),
    /// read from the database; the testrun is in memory (read back first
    /// if it had left).
    pub(super) fn ask_cases(
        &mut self,
        now: Instant,
        peer: &PeerId,
        body: Body,
    ) -> Option<(ErrorCode, String)> {
        let env = Envelope {
            header: Header::best_effort(body.class(), None),
            body,
            raw: None,
        };
        let Body::ListCases {
            request,
            run,
            failed,
            offset,
            limit,
        } = &env.body
        else {
            return Some((ErrorCode::Malformed, "not a cases request".into()));
        };
        let (request, run) = (*request, run.clone());
        let Some(r) = self.runs.get(&run) else {
            return Some((
                ErrorCode::UnknownRun,
                format!("no testrun {run:?} on this server"),
            ));
        };
        let query = crate::server::store::cases::CaseQuery {
            attempts: r
                .tasks
                .iter()
                .filter_map(|t| Some((t.clone(), self.tasks.get(t)?.attempts)))
                .filter(|(_, a)| *a > 0)
                .collect(),
            failed: *failed,
            offset: *offset,
            limit: *limit,
        };
        let parked = self.park(now, peer, env)?;
        self.ask_history(
            Recall::Cases(query),
            Asked::Cases {
                parked: Box::new(parked),
                request,
                run,
            },
        );
        None
    }

    /// A results question (`compare`, `get_case_history`, `list_flaky`),
    /// asked of the database; its testruns are in memory (read back first
    /// if they had left) and the caller may see them.
    pub(super) fn ask_results(
        &mut self,
        now: Instant,
        peer: &PeerId,
        body: Body,
    ) -> Option<(ErrorCode, String)> {
        let query = match self.results_query(peer, &body) {
            Ok(q) => q,
            Err(refusal) => return Some(refusal),
        };
        let request = body.request().unwrap_or(0);
        let env = Envelope {
            header: Header::best_effort(body.class(), None),
            body,
            raw: None,
        };
        let parked = self.park(now, peer, env)?;
        self.ask_history(
            Recall::Results(query),
            Asked::Results {
                parked: Box::new(parked),
                request,
            },
        );
        None
    }

    pub(super) fn ask_triage_query(
        &mut self,
        run: RunId,
        query: crate::server::store::results::ResultQuery,
    ) {
        self.ask_history(Recall::Results(query), Asked::Triage { run });
    }

    /// Retention asks for the oldest testruns that keep files.
    pub(super) fn ask_oldest_kept(&mut self, n: usize) {
        self.recall.kept_asked = true;
        self.recall.ended_since_asked = None;
        self.ask_history(Recall::OldestKept(n), Asked::Kept);
    }

    /// The history reader answered.
    pub fn on_recalled(&mut self, now: Instant, done: Recalled) {
        self.latest = self.latest.max(now);
        let Some(asked) = self.recall.asked.remove(&done.ticket) else {
            self.count("history_answers_unexpected", 1);
            return;
        };
        if let Asked::Runs { runs, .. } = &asked {
            for r in runs {
                if self.recall.loading.get(r) == Some(&done.ticket) {
                    self.recall.loading.remove(r);
                }
            }
        }
        let found = match done.found {
            Ok(found) => found,
            Err(e) => return self.recall_failed(now, asked, &e),
        };
        let stale = done.epoch < self.recall.epoch;
        match (asked, found) {
            (Asked::Runs { runs, parked }, Found::Rows(_)) if stale => {
                self.ask_history(Recall::Runs(runs.clone()), Asked::Runs { runs, parked });
            }
            (Asked::Leases { parked }, Found::Rows(_)) if stale => {
                self.ask_history(
                    Recall::EndedLeases(ENDED_LEASES_READ),
                    Asked::Leases { parked },
                );
            }
            (Asked::Runs { parked, .. } | Asked::Leases { parked }, Found::Rows(rows)) => {
                self.adopt_rows(now, rows);
                for p in parked {
                    self.unpark(&p);
                    self.handle_message(now, &p.peer, p.env);
                }
            }
            (Asked::List { parked, request }, Found::List(runs)) => {
                self.unpark(&parked);
                self.send(&parked.peer, None, Body::Runs { request, runs }, None);
            }
            (
                Asked::Cases {
                    parked,
                    request,
                    run,
                },
                Found::Cases(cases),
            ) => {
                self.unpark(&parked);
                self.send(
                    &parked.peer,
                    None,
                    Body::Cases {
                        request,
                        run,
                        cases,
                    },
                    None,
                );
            }
            (Asked::Results { parked, request }, Found::Results(found)) => {
                self.unpark(&parked);
                self.answer_results(&parked.peer, request, found);
            }
            (Asked::Triage { run }, Found::Results(found)) => {
                use crate::server::store::results::ResultFound;
                let triage = match found {
                    ResultFound::Compared(t) => Ok(*t),
                    _ => Err(format!("{run} is not in the state database")),
                };
                self.on_triaged(now, &run, triage);
            }
            (Asked::Kept, Found::Rows(rows)) => {
                self.recall.kept_asked = false;
                if !stale {
                    let order: Vec<RunId> = rows.runs.iter().map(|(id, _)| id.clone()).collect();
                    let next = rows.next_kept_ms;
                    self.adopt_rows(now, rows);
                    self.prune_recalled(now, &order, next);
                }
            }
            (asked, _) => {
                self.count("history_answers_unexpected", 1);
                self.recall_failed(now, asked, "the history reader answered another question");
            }
        }
    }

    /// A read failed: whoever waited is told why.
    fn recall_failed(&mut self, now: Instant, asked: Asked, error: &str) {
        self.count("history_reads_failed", 1);
        if self.noise.allow(now, "history reads") {
            error!(error = %error, "storage error: cannot read history from the state database; the requests waiting for it are answered storage_failed");
        }
        let parked = match asked {
            Asked::Runs { parked, .. } | Asked::Leases { parked } => parked,
            Asked::List { parked, .. }
            | Asked::Cases { parked, .. }
            | Asked::Results { parked, .. } => vec![*parked],
            Asked::Triage { run } => {
                self.on_triaged(now, &run, Err(error.to_string()));
                return;
            }
            Asked::Kept => {
                self.recall.kept_asked = false;
                return;
            }
        };
        for p in parked {
            self.unpark(&p);
            self.send_error(
                &p.peer,
                p.env.body.request(),
                ErrorCode::StorageFailed,
                format!("the server cannot read the history from its state database: {error}"),
            );
        }
    }

    /// Past `history.cache_runs`, the ended testruns that ended or were
    /// read first leave memory, if nothing live refers to them and their
    /// last change was committed (at an earlier turn: this one's changes
    /// are taken after this).
    pub(super) fn evict_past_cache(&mut self) {
        let cap = self.cfg.history.cache_runs;
        let mut tries = self.recall.cached.len().saturating_sub(cap);
        while self.recall.cached.len() > cap && tries > 0 {
            tries -= 1;
            let Some(id) = self.recall.cached.pop_front() else {
                break;
            };
            if !self.runs.contains_key(&id) {
                continue;
            }
            if !self.may_forget(&id) {
                self.recall.cached.push_back(id);
                continue;
            }
            let r = self.runs.remove(&id).expect("checked");
            for t in &r.tasks {
                self.tasks.remove(t);
            }
            self.count("runs_evicted", 1);
        }
    }

    /// Whether nothing live refers to an ended testrun.
    fn may_forget(&self, id: &RunId) -> bool {
        let Some(r) = self.runs.get(id) else {
            return true;
        };
        matches!(r.state, RunState::Finished | RunState::Cancelled)
            && !r.awaiting_triage
            && !self.pending.runs.contains(id)
            && !self.active_runs.contains(id)
            && !self.followers.has(id)
            && !self.leases.is_live(id)
            && r.tasks.iter().all(|t| {
                !self.pending.has_task(t)
                    && !self.active_tasks.contains(t)
                    && self.tasks.get(t).is_none_or(|task| {
                        task.state.is_final()
                            && task.uploads.is_empty()
                            && task.worker.as_ref().is_none_or(|w| {
                                self.workers
                                    .get(w)
                                    .is_none_or(|w| w.task.as_ref() != Some(t))
                            })
                    })
            })
    }

    /// The columns a testrun's row is found by in the database.
    pub(super) fn index_of(&self, id: &RunId, r: &Testrun) -> RunIndex {
        let (kind, num) = id.split_at(1);
        let done = matches!(r.state, RunState::Finished | RunState::Cancelled);
        let groups: BTreeSet<&str> = r
            .request
            .all_devices()
            .map(|d| d.devicegroup.as_str())
            .collect();
        let summary = RunSummary {
            run: id.clone(),
            state: r.state,
            verdict: r.verdict,
            owner: r.request.owner.clone(),
            device: r.request.device.clone(),
            tasks: r.tasks.len() as u32,
            submitted_ms: r.submitted_ms,
            ended_ms: r.ended_ms,
        };
        RunIndex {
            num: num.parse().unwrap_or(0),
            kind: kind.to_string(),
            state: state_token(r.state),
            verdict: r.verdict.map(verdict_token),
            owner: r.request.owner.clone(),
            groups: format!(",{},", groups.into_iter().collect::<Vec<_>>().join(",")),
            live: !done || r.awaiting_triage,
            ended_ms: r.ended_ms.filter(|_| done),
            kept_bytes: (done && r.ended_ms.is_some() && r.pruned.is_none())
                .then(|| self.run_bytes(id)),
            summary: encode(&summary),
            series: (kind == "r").then(|| r.request.series_name()),
            image: (kind == "r").then(|| r.request.image.clone()),
        }
    }

    /// Ended testruns read back from the database: held in memory (the
    /// cache) as they were before they left it. A row that does not
    /// decode, is not final, or misses a task is left out, said and
    /// counted; one in memory already wins (it is as new or newer).
    pub(super) fn adopt_rows(&mut self, now: Instant, rows: Rows) {
        let mut tasks: HashMap<TaskId, TaskRow> = HashMap::new();
        for (id, body) in &rows.tasks {
            match decode::<TaskRow>("tasks", id, body) {
                Ok(row) => {
                    tasks.insert(id.clone(), row);
                }
                Err(e) => {
                    warn!(task = %id, error = %e, "state database: a task row read back does not decode; its testrun is left out")
                }
            }
        }
        for (id, body) in &rows.runs {
            if self.runs.contains_key(id) {
                continue;
            }
            let row = match decode::<RunRow>("runs", id, body)
                .map_err(|e| e.reason)
                .and_then(|row| check_run(id, &row).map(|()| row))
            {
                Ok(row) => row,
                Err(reason) => {
                    self.count("history_rows_unreadable", 1);
                    warn!(run = %id, %reason, "state database: a testrun row read back is unreadable; requests for it answer as if it were not stored");
                    continue;
                }
            };
            if !matches!(row.state, RunState::Finished | RunState::Cancelled)
                || row.tasks.iter().any(|t| !tasks.contains_key(t))
            {
                self.count("history_rows_unreadable", 1);
                warn!(run = %id, "state database: a testrun read back is not finished or misses a task; requests for it answer as if it were not stored");
                continue;
            }
            for t in &row.tasks {
                let trow = tasks.remove(t).expect("checked");
                let since = self.instant_of(now, trow.since_ms);
                let queued_at = self.instant_of(now, trow.queued_at_ms);
                let state = trow.state;
                self.tasks.insert(
                    t.clone(),
                    task_of_row(t.clone(), trow, state, since, queued_at),
                );
            }
            self.runs.insert(id.clone(), testrun_of_row(row, None));
            self.recall.cached.push_back(id.clone());
            self.count("runs_recalled", 1);
        }
    }

    /// The monotonic instant of a stored Unix time (never after `now`).
    pub(super) fn instant_of(&self, now: Instant, ms: u64) -> Instant {
        let wall_now = self.wall_ms(now);
        now.checked_sub(Duration::from_millis(wall_now.saturating_sub(ms)))
            .unwrap_or(now)
    }
}
