//! Device health, infrastructure retries and fair share in the scheduler,
//! on a fake clock (issue 21). The rules themselves are tested in
//! `server/health.rs` and `server/fairshare.rs`; these tests check that
//! the scheduler follows them.

use super::*;
use crate::server::health::HealthCheck;
use proptest::prelude::*;

fn check() -> HealthCheck {
    HealthCheck {
        image: "check.img".into(),
        packages: vec!["smoke".into()],
        options: BTreeMap::new(),
        timeout_secs: 60,
        interval: Duration::from_secs(3600),
    }
}

/// The dispatches in `out` with their specs, each once.
pub(super) fn specs(out: &[Output]) -> Vec<(String, TaskSpec)> {
    let mut v: Vec<(String, TaskSpec)> = Vec::new();
    for o in out {
        if let Output::Send {
            peer,
            body: Body::Dispatch { spec },
            ..
        } = o
        {
            let w = String::from_utf8_lossy(&peer[5..]).into_owned();
            if !v
                .iter()
                .any(|(x, s)| *x == w && s.task == spec.task && s.attempt == spec.attempt)
            {
                v.push((w, spec.clone()));
            }
        }
    }
    v
}

impl Lab {
    /// Whether `spec` is still the open attempt on `worker` (a resent
    /// dispatch shows up again in later outputs).
    fn open(&self, worker: &str, spec: &TaskSpec) -> bool {
        let t = &self.s.tasks[&spec.task];
        !t.state.is_final() && t.attempts == spec.attempt && t.worker.as_deref() == Some(worker)
    }

    fn with_check() -> Lab {
        let mut lab = Lab::new();
        lab.s.cfg.checks.insert("g".into(), check());
        lab
    }

    /// The worker runs `spec` to the end with `exit_code` (a passing
    /// JUnit file for 0) and asks for more work.
    pub(super) fn finish(&mut self, worker: &str, spec: &TaskSpec, exit_code: i32) -> Vec<Output> {
        let t = &self.s.tasks[&spec.task];
        assert!(
            !t.state.is_final() && t.attempts == spec.attempt,
            "{} attempt {} on {worker} is not open: {:?}",
            spec.task,
            spec.attempt,
            t.history
        );
        let mut out = self.mandatory(
            worker,
            Body::TaskAccepted {
                task: spec.task.clone(),
                attempt: spec.attempt,
            },
        );
        let mut files = vec![];
        if exit_code == 0 {
            let sha = hex::encode(Sha256::digest(PASSING.as_bytes()));
            out.extend(self.upload_attempt(
                worker,
                &spec.task,
                spec.attempt,
                "r.xml",
                PASSING.as_bytes(),
            ));
            files.push(FileInfo {
                name: "r.xml".into(),
                size: PASSING.len() as u64,
                sha256: sha,
            });
        }
        out.extend(self.mandatory(
            worker,
            Body::TaskFinished {
                task: spec.task.clone(),
                attempt: spec.attempt,
                outcome: Outcome {
                    exit_code: Some(exit_code),
                    ..Outcome::default()
                },
                log_lines: 0,
                files,
                file_problems: vec![],
            },
        ));
        out.extend(self.from(worker, Body::Ready));
        out
    }

    /// Lets `d` pass in heartbeat steps, every registered worker alive:
    /// the outputs of every tick.
    fn pass(&mut self, d: Duration) -> Vec<Output> {
        let mut out = Vec::new();
        let names: Vec<String> = self.s.workers.keys().cloned().collect();
        let mut left = d;
        while !left.is_zero() {
            let step = left.min(HB);
            self.advance(step);
            left -= step;
            for n in &names {
                self.from(n, Body::Heartbeat);
            }
            out.extend(self.tick());
        }
        out
    }

    fn health(&self, worker: &str) -> Health {
        self.s.workers[worker].health.health
    }

    /// Submits as `user` (security on for the request only, so the
    /// testrun has an owner).
    pub(super) fn submit_as(
        &mut self,
        user: &str,
        packages: &[&str],
        priority: Priority,
    ) -> Vec<Output> {
        let p = peer(&format!("user-{user}"));
        self.s.on_authenticated(
            &p,
            crate::security::Identity::User {
                name: user.into(),
                role: crate::security::Role::Operator,
            },
            "tcp://127.0.0.1:1".into(),
        );
        self.s.cfg.secure = true;
        self.s.on_message(
            self.now,
            &p,
            env(
                false,
                0,
                Body::Submit {
                    request: 1,
                    testrun: TestrunRequest {
                        lease: None,
                        on_lease: None,
                        series: None,
                        device: DeviceSpec::parse("devicegroup:g").unwrap(),
                        image: "img".into(),
                        packages: packages.iter().map(|p| p.to_string()).collect(),
                        distribution: Distribution::Perpackage,
                        timeout_secs: 60,
                        options: BTreeMap::new(),
                        queue_anyway: true,
                        secrets: Default::default(),
                        owner: None,
                        inputs: Default::default(),
                        priority,
                        devices: Vec::new(),
                        notify: Vec::new(),
                    },
                },
            ),
        );
        self.s.cfg.secure = false;
        self.outputs()
    }

    fn owner_of(&self, task: &TaskId) -> String {
        let run = &self.s.tasks[task].run;
        self.s.runs[run].request.owner.clone().unwrap_or_default()
    }
}

#[test]
fn a_new_worker_gets_its_health_check_before_any_ordinary_task() {
    let mut lab = Lab::with_check();
    lab.submit("devicegroup:g", &["p"], Distribution::Default, true);
    let out = lab.register("w1", "devicegroup:g");
    let d = specs(&out);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].1.health_check && !d[0].1.recover, "{:?}", d[0].1);
    assert_eq!(lab.health("w1"), Health::Unknown);
    let out = lab.finish("w1", &d[0].1.clone(), 0);
    assert_eq!(lab.health("w1"), Health::Good);
    // Now the ordinary task.
    let d = specs(&out);
    assert_eq!(d.len(), 1);
    assert!(!d[0].1.health_check);
}

#[test]
fn without_a_configured_check_a_new_worker_is_good_at_once() {
    let mut lab = Lab::new();
    let out = lab.register("w1", "devicegroup:g");
    assert!(specs(&out).is_empty());
    assert_eq!(lab.health("w1"), Health::Good);
}

/// The scenario: three workers, one of which fails every task
/// with exit 3. Every testrun passes; the broken worker is suspect after
/// two failures, its check (after recovery) fails, it is bad, and no
/// task ever goes back to it.
#[test]
fn a_broken_worker_is_caught_and_its_tasks_pass_elsewhere() {
    let mut lab = Lab::with_check();
    let mut pending = Vec::new();
    for w in ["w1", "w2", "w3"] {
        pending.extend(specs(&lab.register(w, "devicegroup:g")));
    }
    // All pass their first check: w3 breaks afterwards.
    for (w, s) in std::mem::take(&mut pending) {
        lab.finish(&w, &s, 0);
    }
    assert!((1..=3).all(|i| lab.health(&format!("w{i}")) == Health::Good));
    let mut runs = Vec::new();
    for _ in 0..10 {
        let out = lab.submit(
            "devicegroup:g",
            &["a", "b", "c"],
            Distribution::Perpackage,
            false,
        );
        runs.push(run_id(&out));
    }
    pending.extend(specs(&lab.outputs()));
    // The submits dispatched already: the replies were taken by
    // `request`; find what the workers hold now.
    for w in ["w1", "w2", "w3"] {
        if let Some(t) = lab.s.workers[w].task.clone() {
            let spec = TaskSpec {
                hold: None,
                on_lease: None,
                task: t.clone(),
                run: lab.s.tasks[&t].run.clone(),
                attempt: lab.s.tasks[&t].attempts,
                image: String::new(),
                packages: vec![],
                timeout_secs: 60,
                options: BTreeMap::new(),
                ttl_ms: 1000,
                sent_ms: 0,
                inputs: vec![],
                secrets: BTreeMap::new(),
                health_check: lab.s.tasks[&t].check_for.is_some(),
                recover: false,
            };
            if !pending.iter().any(|(x, s)| x == w && s.task == t) {
                pending.push((w.to_string(), spec));
            }
        }
    }
    let mut on_w3 = Vec::new();
    let mut w3_check = None;
    let mut steps = 0;
    while let Some((w, s)) = pending.pop() {
        if !lab.open(&w, &s) {
            continue;
        }
        steps += 1;
        assert!(steps < 500, "no end");
        if w == "w3" {
            if s.health_check {
                w3_check = Some(s.clone());
            } else {
                assert!(!on_w3.contains(&s.task), "{} went back to w3", s.task);
                on_w3.push(s.task.clone());
            }
        }
        let code = if w == "w3" { 3 } else { 0 };
        let out = lab.finish(&w, &s, code);
        pending.extend(specs(&out));
    }
    for run in &runs {
        assert_eq!(lab.status(run).verdict, Some(Verdict::Pass), "{run}");
    }
    assert!(on_w3.len() <= 2, "w3 took {} ordinary tasks", on_w3.len());
    let check = w3_check.expect("w3 was checked");
    assert!(check.recover, "a check after a failure asks for recovery");
    assert_eq!(lab.health("w3"), Health::Bad);
    let retried = lab.status(&lab.s.tasks[&on_w3[0]].run.clone());
    let t = retried.tasks.iter().find(|t| t.task == on_w3[0]).unwrap();
    assert_eq!(t.attempts, 2);
    assert_ne!(t.worker.as_deref(), Some("w3"));
}

#[test]
fn a_bad_worker_is_checked_again_after_its_backoff_and_returns_to_good() {
    let mut lab = Lab::with_check();
    let s = specs(&lab.register("w1", "devicegroup:g"));
    let out = lab.finish("w1", &s[0].1, 3);
    assert!(specs(&out).is_empty());
    assert_eq!(lab.health("w1"), Health::Bad);
    // Nothing before the backoff (10 min by default)…
    assert!(specs(&lab.pass(Duration::from_secs(590))).is_empty());
    // …then a check, with recovery first.
    let d = specs(&lab.pass(Duration::from_secs(20)));
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].1.health_check && d[0].1.recover);
    lab.finish("w1", &d[0].1, 0);
    assert_eq!(lab.health("w1"), Health::Good);
    let history = &lab.s.workers["w1"].health.history;
    let path: Vec<Health> = history.iter().map(|c| c.to).collect();
    assert_eq!(path, vec![Health::Bad, Health::Good]);
}

#[test]
fn a_good_worker_is_checked_every_interval_and_stays_good() {
    let mut lab = Lab::with_check();
    let s = specs(&lab.register("w1", "devicegroup:g"));
    lab.finish("w1", &s[0].1, 0);
    for round in 0..3 {
        let d = specs(&lab.pass(Duration::from_secs(3601)));
        assert_eq!(
            d.len(),
            1,
            "round {round}: {d:?} {:?}",
            lab.s.workers["w1"].health
        );
        assert!(d[0].1.health_check && !d[0].1.recover);
        lab.finish("w1", &d[0].1, 0);
        assert_eq!(lab.health("w1"), Health::Good);
    }
}

#[test]
fn maintenance_stops_tasks_and_checks_until_it_is_off() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let reply = lab.request(Body::WorkerHealth {
        request: 1,
        worker: "w1".into(),
        action: Some(HealthAction::MaintenanceOn),
        reason: "new cable".into(),
    });
    assert!(
        matches!(reply, Body::HealthReport { ref worker, .. } if worker.health == Health::Maintenance),
        "{reply:?}"
    );
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Queued);
    let waiting = lab.status(&run).tasks[0].waiting.clone().unwrap();
    assert!(
        waiting.workers[0].doing.contains("maintenance"),
        "{waiting:?}"
    );
    lab.request(Body::WorkerHealth {
        request: 2,
        worker: "w1".into(),
        action: Some(HealthAction::MaintenanceOff),
        reason: "fixed".into(),
    });
    // No check configured: good again at once, and the task goes.
    assert_eq!(lab.health("w1"), Health::Good);
    assert_eq!(lab.status(&run).tasks[0].state, TaskState::Dispatched);
}

#[test]
fn a_lone_worker_failing_twice_ends_the_task_saying_there_is_no_other() {
    let mut lab = Lab::new();
    lab.s.cfg.max_attempts = 5;
    let out = lab.register("w1", "devicegroup:g");
    assert!(specs(&out).is_empty());
    let run = run_id(&lab.submit("devicegroup:g", &["p"], Distribution::Default, false));
    let first = lab.s.workers["w1"].task.clone().unwrap();
    let spec = |lab: &Lab, attempt| TaskSpec {
        hold: None,
        on_lease: None,
        task: first.clone(),
        run: run.clone(),
        attempt,
        image: String::new(),
        packages: vec![],
        timeout_secs: 60,
        options: BTreeMap::new(),
        ttl_ms: 1000,
        sent_ms: 0,
        inputs: vec![],
        secrets: BTreeMap::new(),
        health_check: lab.s.tasks[&first].check_for.is_some(),
        recover: false,
    };
    let s1 = spec(&lab, 1);
    let out = lab.finish("w1", &s1, 3);
    // Once: no other worker, so it may run here again.
    let d = specs(&out);
    assert_eq!(d.len(), 1);
    lab.finish("w1", &d[0].1, 3);
    let st = lab.status(&run);
    assert_eq!(st.tasks[0].verdict, Some(Verdict::Error));
    let reason = st.tasks[0].reason.clone().unwrap();
    assert!(reason.contains("no other worker for g"), "{reason}");
}

#[test]
fn a_user_with_a_backlog_does_not_hold_back_a_newcomer() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let pkgs: Vec<String> = (0..50).map(|i| format!("p{i}")).collect();
    let pkgs: Vec<&str> = pkgs.iter().map(String::as_str).collect();
    let out = lab.submit_as("alice", &pkgs, Priority::Normal);
    let d = specs(&out);
    assert_eq!(d.len(), 1);
    lab.submit_as("bob", &["x"], Priority::Normal);
    let out = lab.finish("w1", &d[0].1, 0);
    let next = specs(&out);
    assert_eq!(lab.owner_of(&next[0].1.task), "bob");
}

#[test]
fn weights_divide_the_dispatches() {
    let mut lab = Lab::new();
    lab.s.cfg.weights.insert("alice".into(), 3);
    lab.register("w1", "devicegroup:g");
    let pkgs: Vec<String> = (0..200).map(|i| format!("p{i}")).collect();
    let pkgs: Vec<&str> = pkgs.iter().map(String::as_str).collect();
    let mut pending = specs(&lab.submit_as("alice", &pkgs, Priority::Normal));
    pending.extend(specs(&lab.submit_as("bob", &pkgs, Priority::Normal)));
    let mut count: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let (w, s) = pending.pop().expect("a dispatch");
        if !lab.open(&w, &s) {
            continue;
        }
        *count.entry(lab.owner_of(&s.task)).or_default() += 1;
        pending.extend(specs(&lab.finish(&w, &s, 0)));
    }
    let (a, b) = (count["alice"], count["bob"]);
    assert!(
        (148..=152).contains(&a) && a + b == 200,
        "alice {a}, bob {b}"
    );
}

#[test]
fn priority_orders_within_an_owner_and_waiting_raises_low() {
    let mut lab = Lab::new();
    lab.s.cfg.priority_lead = Duration::from_secs(60);
    lab.register("w1", "devicegroup:g");
    let mut pending = specs(&lab.submit_as("alice", &["first"], Priority::Normal));
    lab.submit_as("alice", &["low"], Priority::Low);
    lab.submit_as("alice", &["high"], Priority::High);
    let (w, s) = pending.pop().unwrap();
    let d = specs(&lab.finish(&w, &s, 0));
    assert_eq!(lab.s.tasks[&d[0].1.task].packages, vec!["high"]);
    // A high task queued more than twice the lead after the low one
    // goes behind it.
    lab.advance(Duration::from_secs(121));
    lab.submit_as("alice", &["late-high"], Priority::High);
    let d = specs(&lab.finish(&d[0].0, &d[0].1, 0));
    assert_eq!(lab.s.tasks[&d[0].1.task].packages, vec!["low"]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random workers fail random attempts for infrastructure reasons:
    /// a task never runs on a worker that failed it twice, and every task
    /// ends.
    #[test]
    fn an_infrastructure_retry_never_runs_where_it_failed_twice(
        workers in 1usize..4,
        failures in proptest::collection::vec(any::<bool>(), 64),
        attempts in 2u32..6,
    ) {
        let mut lab = Lab::new();
        lab.s.cfg.max_attempts = attempts;
        lab.s.cfg.health.retry_min = Duration::from_secs(1);
        lab.s.cfg.health.retry_max = Duration::from_secs(1);
        let mut pending = Vec::new();
        for i in 0..workers {
            pending.extend(specs(&lab.register(&format!("w{i}"), "devicegroup:g")));
        }
        let mut runs = Vec::new();
        for _ in 0..4 {
            runs.push(run_id(&lab.submit("devicegroup:g", &["a", "b"], Distribution::Perpackage, false)));
        }
        for w in 0..workers {
            let name = format!("w{w}");
            if let Some(t) = lab.s.workers[&name].task.clone() {
                let attempt = lab.s.tasks[&t].attempts;
                pending.push((name, TaskSpec {
                    hold: None,
                    on_lease: None,
                    task: t.clone(), run: lab.s.tasks[&t].run.clone(), attempt,
                    image: String::new(), packages: vec![], timeout_secs: 60,
                    options: BTreeMap::new(), ttl_ms: 1000, sent_ms: 0, inputs: vec![],
                    secrets: BTreeMap::new(), health_check: false, recover: false,
                }));
            }
        }
        let mut failed: HashMap<(String, TaskId), u32> = HashMap::new();
        let mut i = 0;
        while let Some((w, s)) = pending.pop() {
            if !lab.open(&w, &s) {
                continue;
            }
            let key = (w.clone(), s.task.clone());
            prop_assert!(failed.get(&key).copied().unwrap_or(0) < 2, "{} ran on {w} after failing there twice", s.task);
            let fail = failures[i % failures.len()];
            i += 1;
            prop_assert!(i < 1000);
            if fail {
                *failed.entry(key).or_default() += 1;
            }
            pending.extend(specs(&lab.finish(&w, &s, if fail { 3 } else { 0 })));
            // A suspect worker (no check configured) is bad: bring it
            // back so the run goes on.
            if (0..workers).any(|n| lab.health(&format!("w{n}")) == Health::Bad) {
                pending.extend(specs(&lab.pass(Duration::from_secs(2))));
            }
        }
        for run in &runs {
            prop_assert!(lab.status(run).state == RunState::Finished, "{run} unfinished");
        }
    }
}
