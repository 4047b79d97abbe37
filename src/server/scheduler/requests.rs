//! Client requests: submit, status, events, cancel, workers, logs and files.

use super::*;

impl<S: Store> Scheduler<S> {
    pub(super) fn on_client_request(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        body: Body,
        raw: Option<Bytes>,
    ) {
        let reply = match body {
            Body::Ping { .. } => Ok(Body::Pong {
                request,
                server: self.incarnation.clone(),
                lease: self.cfg.lease.clone(),
            }),
            Body::Submit { testrun, .. } if testrun.lease.is_some() => Err((
                ErrorCode::BadRequest,
                "a testrun cannot carry lease terms: ask for a device with reserve".into(),
            )),
            Body::Submit { testrun, .. } => self.on_submit(now, peer, request, testrun),
            Body::Reserve {
                device,
                duration_ms,
                reason,
                priority,
                queue_anyway,
                ..
            } => self.on_reserve(
                now,
                peer,
                request,
                device,
                duration_ms,
                reason,
                priority,
                queue_anyway,
            ),
            Body::ListLeases { all, .. } => self.list_leases(now, peer, request, all),
            Body::LeaseAct {
                lease,
                action,
                force,
                duration_ms,
                user,
                ..
            } => self.on_lease_act(now, peer, request, lease, action, force, duration_ms, user),
            Body::ConsoleAttach {
                lease, since_ms, ..
            } => match self.on_console_attach(now, peer, request, lease, since_ms) {
                Ok(()) => return,
                Err(refused) => Err(refused),
            },
            Body::ConsoleDetach { lease, .. } => self.on_console_detach(peer, request, lease),
            Body::ConsoleInput {
                lease,
                stream,
                offset,
                ..
            } => self.on_console_input(now, peer, request, lease, stream, offset, raw),
            Body::Power { lease, action, .. } => {
                match self.on_power(now, peer, request, lease, action) {
                    Ok(()) => return,
                    Err(refused) => Err(refused),
                }
            }
            Body::Follow { run, logs, .. } => self.follow(peer, request, run, logs),
            Body::DrainWorker { worker, drain, .. } => {
                self.drain(now, peer, request, &worker, drain)
            }
            Body::WorkerHealth {
                worker,
                action,
                reason,
                ..
            } => self.worker_health(now, peer, request, &worker, action, &reason),
            body @ Body::ListCases { .. } => match self.ask_cases(now, peer, body) {
                Some(refused) => Err(refused),
                None => return,
            },
            body if body.asks_results() => match self.ask_results(now, peer, body) {
                Some(refused) => Err(refused),
                None => return,
            },
            Body::Known { add, remove, .. } => self.on_known(now, peer, request, add, remove),
            body @ Body::ListRuns { .. } => match self.on_list_runs(now, peer, request, body) {
                Some(refused) => Err(refused),
                None => return,
            },
            Body::ListNotifications { run, failed, .. } => {
                self.list_notifications(peer, request, run, failed)
            }
            Body::RetryNotification { id, .. } => self.retry_notification(now, peer, request, &id),
            Body::WebLogin { .. } => match self.on_web_login(peer, request) {
                Some(refused) => Err(refused),
                None => return,
            },
            Body::ListQueue { .. } => Ok(Body::Queue {
                request,
                queues: self.list_queue(now),
            }),
            Body::GetStatus { run, .. } => self
                .status(&run)
                .map(|status| Body::Status { request, status }),
            Body::GetEvents { run, from, .. } => match self.runs.get(&run) {
                Some(r) => Ok(Body::Events {
                    request,
                    run: run.clone(),
                    events: r.events.iter().skip(from as usize).cloned().collect(),
                }),
                None => Err((
                    ErrorCode::UnknownRun,
                    format!("no testrun {run:?} on this server"),
                )),
            },
            Body::CancelRun { run, .. } => self.cancel_run(now, &run).and_then(|()| {
                if self.cfg.secure {
                    self.audit_peer(peer, "cancel", &format!("run {run}"));
                }
                self.status(&run)
                    .map(|status| Body::Status { request, status })
            }),
            Body::ListWorkers { .. } => Ok(self.workers_answer(now, request)),
            body @ (Body::GetLogTail { .. }
            | Body::FindInLog { .. }
            | Body::GetAudit { .. }
            | Body::GetLog { .. }
            | Body::GetFile { .. }
            | Body::GetInput { .. }
            | Body::InputOffer { .. }
            | Body::InputEnd { .. }
            | Body::InputChunk { .. }) => match self.on_data_request(now, peer, request, body, raw)
            {
                Some(refused) => Err(refused),
                None => return,
            },
            other => Err((
                ErrorCode::Malformed,
                format!("{} is not a client request", other.kind()),
            )),
        };
        match reply {
            Ok(body) => self.send(peer, None, body, None),
            Err((code, message)) => self.send_error(peer, Some(request), code, message),
        }
    }

    fn workers_answer(&self, now: Instant, request: u64) -> Body {
        let workers = self.workers.keys().map(|name| self.worker_info(now, name));
        Body::Workers {
            request,
            workers: workers.collect(),
        }
    }

    /// A submit, with its owner set from the caller's identity (never what
    /// the client said), audited with security.
    fn on_submit(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        mut testrun: TestrunRequest,
    ) -> Result<Body, (ErrorCode, String)> {
        testrun.owner = self.owner(peer);
        self.check_run_on_lease(peer, &mut testrun)?;
        let on_lease = testrun.on_lease.clone();
        let owner = testrun.owner.clone();
        let reply = self.submit(now, peer, request, testrun);
        if let (Ok(Body::Submitted { run, .. }), Some(lease)) = (&reply, &on_lease) {
            self.suspend_for_run(now, lease, run);
        }
        if let (Ok(Body::Submitted { run, tasks, .. }), true) = (&reply, self.cfg.secure) {
            let r = &self.runs[run].request;
            let mut option_keys: Vec<&str> = r.options.keys().map(String::as_str).collect();
            option_keys.truncate(16);
            let detail = format!(
                "run {run} for {} on {}: {} tasks, options [{}], {} secrets",
                owner.as_deref().unwrap_or("-"),
                r.device,
                tasks.len(),
                option_keys.join(","),
                self.runs[run].secrets.as_ref().map_or(0, |s| s.len()),
            );
            self.audit_peer(peer, "submit", &detail);
        }
        reply
    }

    /// The testruns a `runs` request asks for; a submit user sees its own
    /// testruns only.
    /// A page of the `runs` list, newest first: read from the database
    /// (answered when it is), looking at no more than
    /// [`crate::server::store::history::LIST_WINDOW`] numbers below
    /// `before`. A submit user lists its own testruns only.
    fn on_list_runs(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        body: Body,
    ) -> Option<(ErrorCode, String)> {
        use crate::server::store::history::{state_token, verdict_token, RunQuery};
        let Body::ListRuns {
            state,
            owner,
            limit,
            verdict,
            devicegroup,
            before,
            ..
        } = &body
        else {
            return Some((ErrorCode::Malformed, "not a runs request".into()));
        };
        let owner = match (self.cfg.secure, self.caller_role(peer)) {
            (true, Some(crate::security::Role::Submit)) => self.owner(peer),
            _ => owner.clone(),
        };
        let newest = match before {
            Some(b) => b.saturating_sub(1).min(self.next_run),
            None => self.next_run,
        };
        if newest == 0 || *limit == 0 {
            self.send(
                peer,
                None,
                Body::Runs {
                    request,
                    runs: Vec::new(),
                },
                None,
            );
            return None;
        }
        let query = RunQuery {
            newest,
            state: state.map(state_token),
            owner,
            verdict: verdict.map(verdict_token),
            devicegroup: devicegroup.clone(),
            limit: *limit,
        };
        let env = Envelope {
            header: Header::best_effort(body.class(), None),
            body,
            raw: None,
        };
        self.ask_runs_page(now, peer, request, query, env)
    }

    /// A sign-in link asked for over Noise: handed to the shell, which
    /// mints it (none when the server does not serve the dashboard).
    fn on_web_login(&mut self, peer: &PeerId, request: u64) -> Option<(ErrorCode, String)> {
        if !self.cfg.web {
            return Some((
                ErrorCode::BadRequest,
                "this server does not serve the web dashboard: set web = \"127.0.0.1:8080\" in server.toml (or OTS_SERVER_WEB) and restart it".to_string(),
            ));
        }
        let identity = self.callers.get(peer).map(|c| c.identity.clone());
        self.web_logins.push(WebLoginAsk {
            peer: peer.clone(),
            request,
            identity,
        });
        None
    }

    /// Reads of logs, the audit log, result and input files, and input
    /// uploads: answered here with their data, or later by the file desk;
    /// a refusal is returned.
    fn on_data_request(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        body: Body,
        raw: Option<Bytes>,
    ) -> Option<(ErrorCode, String)> {
        let no_task = |task: &str| {
            (
                ErrorCode::UnknownTask,
                format!("no task {task:?} on this server"),
            )
        };
        match body {
            Body::FindInLog { task, find, .. } => {
                if !self.tasks.contains_key(&task) {
                    return Some(no_task(&task));
                }
                // Searched by the file desk, off the loop.
                return self.find_in_log(peer, request, task, find).err();
            }
            Body::GetLogTail { task, max, .. } => {
                if !self.tasks.contains_key(&task) {
                    return Some(no_task(&task));
                }
                match self.store.read_log_tail(&task, max.min(MAX_READ_CHUNK)) {
                    Ok((offset, bytes)) => self.send(
                        peer,
                        None,
                        Body::Data {
                            request,
                            offset,
                            eof: true,
                        },
                        Some(bytes.into()),
                    ),
                    Err(e) => {
                        self.send_error(peer, Some(request), ErrorCode::UnknownTask, e.to_string())
                    }
                }
            }
            Body::GetAudit {
                offset,
                max,
                before,
                ..
            } => {
                let max = max.min(MAX_READ_CHUNK);
                // Newest first: the bytes that end at `before` (clamped to
                // the end), whole lines only.
                let (offset, read) = match before
                    .map(|b| self.store.audit_len().map(|len| b.min(len)))
                {
                    Some(Ok(end)) => {
                        let from = end.saturating_sub(max);
                        let read = self.store.read_audit(from, end - from).map(|(mut b, eof)| {
                            let head = if from == 0 {
                                0
                            } else {
                                memchr::memchr(b'\n', &b).map_or(b.len(), |i| i + 1)
                            };
                            b.drain(..head);
                            (b, eof)
                        });
                        let head = read
                            .as_ref()
                            .map_or(0, |(b, _)| (end - from) - b.len() as u64);
                        (from + head, read)
                    }
                    Some(Err(e)) => (offset, Err(e)),
                    None => (offset, self.store.read_audit(offset, max)),
                };
                self.send_data(peer, request, offset, read, ErrorCode::StorageFailed);
            }
            Body::GetLog {
                task, offset, max, ..
            } => {
                if !self.tasks.contains_key(&task) {
                    return Some(no_task(&task));
                }
                let read = self.store.read_log(&task, offset, max.min(MAX_READ_CHUNK));
                self.send_data(peer, request, offset, read, ErrorCode::UnknownTask);
            }
            Body::GetFile {
                task,
                name,
                offset,
                max,
                ..
            } => {
                let known = self
                    .tasks
                    .get(&task)
                    .is_some_and(|t| t.files.iter().any(|f| f.name == name));
                if !known {
                    return Some((
                        ErrorCode::UnknownTask,
                        format!("task {task:?} has no result file {name:?}"),
                    ));
                }
                // Read by the file desk, off the loop; answered when done.
                let source = crate::server::store::files::ReadSource::Result { task, name };
                return self
                    .read_file(peer, request, source, offset, max.min(MAX_READ_CHUNK))
                    .err();
            }
            Body::GetInput {
                sha256,
                offset,
                max,
                ..
            } => {
                return self
                    .read_input(peer, request, sha256, offset, max.min(MAX_READ_CHUNK))
                    .err()
            }
            Body::InputOffer { sha256, size, .. } => {
                self.on_input_offer(peer, request, sha256, size, false)
            }
            Body::InputEnd { sha256, size, .. } => {
                self.on_input_offer(peer, request, sha256, size, true)
            }
            Body::InputChunk { sha256, offset, .. } => {
                self.on_input_chunk(now, peer, sha256, offset, raw.unwrap_or_default())
            }
            other => {
                return Some((
                    ErrorCode::Malformed,
                    format!("{} is not a data request", other.kind()),
                ))
            }
        }
        None
    }

    /// Answers a read request with the bytes read (`data` + raw frame), or
    /// with `error{code}` if the store could not read them.
    fn send_data(
        &mut self,
        peer: &PeerId,
        request: u64,
        offset: u64,
        read: Result<(Vec<u8>, bool), StoreError>,
        code: ErrorCode,
    ) {
        match read {
            Ok((bytes, eof)) => self.send(
                peer,
                None,
                Body::Data {
                    request,
                    offset,
                    eof,
                },
                Some(bytes.into()),
            ),
            Err(e) => self.send_error(peer, Some(request), code, e.to_string()),
        }
    }

    pub(super) fn submit(
        &mut self,
        now: Instant,
        peer: &PeerId,
        request: u64,
        mut testrun: TestrunRequest,
    ) -> Result<Body, (ErrorCode, String)> {
        let bad = |m: String| Err((ErrorCode::BadRequest, m));
        testrun.series = Some(testrun.series_name());
        if testrun.packages.is_empty() {
            return bad("no test packages given".into());
        }
        if let Some(p) = testrun.packages.iter().find(|p| {
            p.is_empty() || p.len() > 200 || p.contains(|c: char| c.is_whitespace() || c == ',')
        }) {
            return bad(format!(
                "test package name {p:?} is empty, too long or contains whitespace or ','"
            ));
        }
        if testrun.image.trim().is_empty() {
            return bad("no image given".into());
        }
        if testrun.timeout_secs == 0 {
            return bad("timeout must be at least 1 second".into());
        }
        // Every input is on the server already, uploaded by this user
        // (input_offer). The refusal is the same whether someone else
        // stored the content or nobody did: it reveals nothing.
        if let Some(i) = testrun.inputs.iter().find(|i| {
            self.stored_inputs.get(&i.sha256) != Some(&i.size)
                || !self.may_use_input(peer, &i.sha256)
        }) {
            return bad(format!(
                "input file {:?} ({} bytes, SHA-256 {}) is not among the input files you uploaded to this server: upload it first (ots-submit run --input does)",
                i.name, i.size, i.sha256
            ));
        }
        if testrun.priority == Priority::High
            && self.cfg.secure
            && self
                .caller_role(peer)
                .is_none_or(|r| r < crate::security::Role::Operator)
        {
            return Err((
                ErrorCode::Forbidden,
                "--priority high needs role operator or admin (users.d/NAME.role); use normal or low".into(),
            ));
        }
        if let Err(why) = self.check_notify(&testrun.notify) {
            return bad(why);
        }
        if !testrun.secrets.is_empty() && !self.cfg.secure {
            return bad("secrets need a server with security = \"noise\": without it they would cross the network in plain text; pass them as options if that is acceptable".into());
        }
        for spec in testrun.all_devices() {
            let asked = DeviceProps {
                devicegroup: spec.devicegroup.clone(),
                devicename: spec.devicename.clone(),
                deviceid: spec.deviceid.clone(),
            };
            if let Err(e) = asked.validate() {
                return bad(e.to_string());
            }
        }
        // A spec matches a worker exactly when the worker has the spec's
        // routing key among its own: one lookup per spec, whatever the
        // fleet size.
        let unmatched = testrun
            .all_devices()
            .map(DeviceSpec::routing_key)
            .find(|k| self.known.get(k).is_none_or(|n| *n == 0));
        if let Some(key) = unmatched.filter(|_| !testrun.queue_anyway) {
            const SHOWN: usize = 20;
            let groups: Vec<&str> = self
                .known
                .keys()
                .filter(|k| !k.contains('.'))
                .map(String::as_str)
                .collect();
            let mut shown = groups
                .iter()
                .take(SHOWN)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if groups.len() > SHOWN {
                shown.push_str(&format!(" and {} more", groups.len() - SHOWN));
            }
            return Err((
                ErrorCode::NoMatchingWorker,
                format!(
                    "no queue for {key}: no known worker has such a device (known device groups: {}); use --queue-anyway to queue it regardless",
                    if groups.is_empty() { "none".to_string() } else { shown }
                ),
            ));
        }
        let specs: BTreeSet<&DeviceSpec> = testrun.all_devices().collect();
        if specs.len() <= testrun.devices.len() {
            return bad("a device spec is given twice".into());
        }
        let new_tasks = distribution::split(testrun.distribution, &testrun.packages)
            .len()
            .saturating_mul(1 + testrun.devices.len());
        let open = self.active_tasks.len();
        if open.saturating_add(new_tasks) > self.cfg.limits.max_open_tasks {
            self.count("submits_over_limit", 1);
            return Err((
                ErrorCode::LimitReached,
                format!(
                    "the server holds {open} unfinished tasks; {new_tasks} more would exceed its limit of {} (limits.max_open_tasks): try again when the queue is shorter",
                    self.cfg.limits.max_open_tasks
                ),
            ));
        }
        if let Some(owner) = testrun.owner.as_deref() {
            let (tasks, runs) = self.open_by_owner.get(owner).copied().unwrap_or_default();
            let (max_tasks, max_runs) = (
                self.cfg.limits.max_open_tasks_per_owner,
                self.cfg.limits.max_open_runs_per_owner,
            );
            if tasks.saturating_add(new_tasks) > max_tasks {
                self.count("submits_over_owner_quota", 1);
                return Err((
                    ErrorCode::LimitReached,
                    format!(
                        "user {owner} holds {tasks} unfinished tasks; {new_tasks} more would exceed the per-user quota of {max_tasks} (limits.max_open_tasks_per_owner): wait for some to finish, or cancel some"
                    ),
                ));
            }
            if runs >= max_runs {
                self.count("submits_over_owner_quota", 1);
                return Err((
                    ErrorCode::LimitReached,
                    format!(
                        "user {owner} holds {runs} unfinished testruns, the per-user quota (limits.max_open_runs_per_owner): wait for some to finish, or cancel some"
                    ),
                ));
            }
            let entry = self.open_by_owner.entry(owner.to_string()).or_default();
            entry.0 += new_tasks;
            entry.1 += 1;
        }
        let role = self.caller_role(peer).map(|r| r.as_str().to_string());
        let (run, task_ids) = self.create_run(now, testrun, role, None);
        Ok(Body::Submitted {
            request,
            run,
            tasks: task_ids,
        })
    }

    /// Makes an accepted testrun and its tasks, queues them (or, for a
    /// health check of `check_for`, hands it to that worker) and
    /// dispatches what it can.
    pub(super) fn create_run(
        &mut self,
        now: Instant,
        testrun: TestrunRequest,
        role: Option<String>,
        check_for: Option<String>,
    ) -> (RunId, Vec<TaskId>) {
        let prefix = if testrun.lease.is_some() { 'l' } else { 'r' };
        let pinned = testrun.on_lease.as_ref().and_then(|l| self.lease_worker(l));
        let run: RunId = format!("{prefix}{}", self.next_run);
        self.next_run += 1;
        let keys: Vec<String> = testrun.all_devices().map(DeviceSpec::routing_key).collect();
        let rank = self.rank_of(now, testrun.priority);
        let mut task_ids = Vec::new();
        let split = distribution::split(testrun.distribution, &testrun.packages);
        let per_spec =
            (0..keys.len()).flat_map(|spec| split.iter().map(move |p| (spec, p.clone())));
        for (i, (spec, packages)) in per_spec.enumerate() {
            let id = format!("{run}.{}", i + 1);
            self.tasks.insert(
                id.clone(),
                Task {
                    id: id.clone(),
                    run: run.clone(),
                    packages,
                    state: TaskState::Queued,
                    worker: None,
                    attempts: 0,
                    verdict: None,
                    reason: None,
                    cases: None,
                    log: SeqRanges::default(),
                    log_lines_produced: None,
                    files: Vec::new(),
                    since: now,
                    queued_at: now,
                    order: self.next_order,
                    cancel_requested: false,
                    history: Vec::new(),
                    log_bytes: 0,
                    log_refused: 0,
                    log_full_told: None,
                    file_errors: BTreeMap::new(),
                    refusals: 0,
                    file_sizes: BTreeMap::new(),
                    uploads: BTreeMap::new(),
                    junit: BTreeMap::new(),
                    avoid: Vec::new(),
                    failed_on: Vec::new(),
                    rank,
                    check_for: check_for.clone(),
                    pinned: pinned.clone(),
                    spec,
                    failing: Vec::new(),
                },
            );
            self.next_order += 1;
            self.active_tasks.insert(id.clone());
            task_ids.push(id);
        }
        info!(run = %run, device = %testrun.device, tasks = task_ids.len(), "testrun accepted");
        self.active_runs.insert(run.clone());
        let mut testrun = testrun;
        let secrets = std::mem::take(&mut testrun.secrets);
        let sealed_secrets = self.seal_secrets(&run, &secrets);
        self.runs.insert(
            run.clone(),
            Testrun {
                secrets: Some(secrets),
                sealed_secrets,
                request: testrun,
                tasks: task_ids.clone(),
                state: RunState::Queued,
                verdict: None,
                events: Vec::new(),
                submitted_ms: self.wall_ms(now),
                ended_ms: None,
                pruned: None,
                role,
                awaiting_triage: false,
            },
        );
        for id in &task_ids {
            self.enqueue(id);
            if let Some(w) = &check_for {
                self.checks.insert(w.clone(), id.clone());
            }
            self.progress(id, ProgressState::Queued, None, None);
        }
        match check_for.or(pinned) {
            Some(w) => self.reconsider(now, &w),
            None => {
                for key in &keys {
                    self.try_dispatch_key(now, key);
                }
            }
        }
        (run, task_ids)
    }

    /// The status of a testrun as `ots-submit status` shows it.
    pub fn status(&self, run: &RunId) -> Result<RunStatus, (ErrorCode, String)> {
        let r = self.runs.get(run).ok_or_else(|| {
            (
                ErrorCode::UnknownRun,
                format!("no testrun {run:?} on this server"),
            )
        })?;
        let mut waiting = self.waiting_of(run);
        Ok(RunStatus {
            run: run.clone(),
            state: r.state,
            verdict: r.verdict,
            device: r.request.device.clone(),
            image: r.request.image.clone(),
            series: Some(r.request.series_name()),
            tasks: r
                .tasks
                .iter()
                .map(|id| {
                    let t = &self.tasks[id];
                    TaskStatus {
                        task: id.clone(),
                        packages: t.packages.clone(),
                        state: t.state,
                        worker: t.worker.clone(),
                        attempts: t.attempts,
                        verdict: t.verdict,
                        reason: t.reason.clone(),
                        cases: t.cases,
                        log_lines_stored: t.log.len(),
                        log_lines_produced: t.log_lines_produced,
                        log_gaps: t
                            .log_lines_produced
                            .map(|n| t.log.missing(n))
                            .unwrap_or_default(),
                        files: t.files.clone(),
                        history: t.history.clone(),
                        waiting: waiting.remove(id),
                        device: (!r.request.devices.is_empty())
                            .then(|| self.task_device(id).clone()),
                        failing: t.failing.iter().map(|(_, c)| c.clone()).collect(),
                    }
                })
                .collect(),
            counters: self.counters.clone(),
            pruned: r.pruned.clone(),
        })
    }

    pub(super) fn cancel_run(
        &mut self,
        now: Instant,
        run: &RunId,
    ) -> Result<(), (ErrorCode, String)> {
        let tasks = self
            .runs
            .get(run)
            .ok_or_else(|| {
                (
                    ErrorCode::UnknownRun,
                    format!("no testrun {run:?} on this server"),
                )
            })?
            .tasks
            .clone();
        info!(run = %run, "cancel requested");
        for id in tasks {
            let t = self.tasks.get_mut(&id).expect("task of run");
            match t.state {
                TaskState::Queued => {
                    self.remove_from_queue(&id);
                    self.end_task(
                        now,
                        &id,
                        TaskState::Cancelled,
                        None,
                        "cancelled while queued".into(),
                    );
                }
                TaskState::Dispatched | TaskState::Running => {
                    t.cancel_requested = true;
                    self.pending.tasks.insert(id.clone());
                    let worker = t.worker.clone().expect("running task has a worker");
                    self.send_mandatory(now, &worker, &id, Body::Cancel { task: id.clone() });
                }
                TaskState::Held => {
                    let worker = t.worker.clone();
                    if let Some(w) = worker.as_ref().and_then(|w| self.workers.get_mut(w)) {
                        w.task = None;
                    }
                    if let Some(w) = worker {
                        self.pending.workers.insert(w);
                    }
                    self.end_task(
                        now,
                        &id,
                        TaskState::Cancelled,
                        None,
                        "cancelled while its worker was away".into(),
                    );
                }
                TaskState::Finished | TaskState::Cancelled => {}
            }
        }
        Ok(())
    }
}
