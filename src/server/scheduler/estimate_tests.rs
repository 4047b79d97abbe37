//! Issue 38: a queued task's estimate names the worker it waits for,
//! counting only the workers it may use for this attempt.

use super::*;

impl Lab {
    /// A testrun of package `p` on devicegroup g: its one task, where it
    /// was dispatched (the dispatches of `out` when the caller has them).
    fn one_task(&mut self) -> (TaskId, Vec<Output>) {
        let out_submit = self.submit("devicegroup:g", &["p"], Distribution::Default, false);
        let run = run_id(&out_submit);
        let task = self.status(&run).tasks[0].task.clone();
        (task, self.outputs())
    }

    fn worker_of(&mut self, task: &TaskId) -> String {
        let run = task.rsplit_once('.').unwrap().0.to_string();
        self.status(&run).tasks[0]
            .worker
            .clone()
            .expect("dispatched")
    }

    /// Accepts the task's attempt on its worker, runs it `secs`, and ends
    /// it with `exit_code` (3: an infrastructure failure).
    fn run_for(&mut self, task: &TaskId, attempt: u32, secs: u64, exit_code: i32) -> String {
        let worker = self.worker_of(task);
        self.mandatory(
            &worker,
            Body::TaskAccepted {
                task: task.clone(),
                attempt,
            },
        );
        self.advance(Duration::from_secs(secs));
        self.mandatory(
            &worker,
            Body::TaskFinished {
                task: task.clone(),
                attempt,
                outcome: Outcome {
                    exit_code: Some(exit_code),
                    ..Outcome::default()
                },
                log_lines: 0,
                files: vec![],
                file_problems: vec![],
            },
        );
        worker
    }
}

#[test]
fn a_task_whose_retries_exclude_two_of_three_workers_waits_for_the_third() {
    let mut lab = Lab::new();
    lab.s.cfg.max_attempts = 3;
    for w in ["w1", "w2", "w3"] {
        lab.register(w, "devicegroup:g");
    }
    // Durations to go by: 80, 90 and 100 s.
    for secs in [80, 90, 100] {
        let (t, _) = lab.one_task();
        let w = lab.run_for(&t, 1, secs, 0);
        lab.from(&w, Body::Ready);
    }
    // The task fails (infrastructure) on a first worker, then a second;
    // in between another testrun takes the third.
    let (t, _) = lab.one_task();
    let first = lab.run_for(&t, 1, 1, 3);
    let second = lab.worker_of(&t);
    assert_ne!(first, second);
    let (other, _) = lab.one_task();
    let third = lab.worker_of(&other);
    assert!(
        third != first && third != second,
        "{first} {second} {third}"
    );
    lab.mandatory(
        &third,
        Body::TaskAccepted {
            task: other.clone(),
            attempt: 1,
        },
    );
    let failed_again = lab.run_for(&t, 2, 1, 3);
    assert_eq!(failed_again, second);
    // Both idle and asking for work: the task is not theirs.
    for w in [&first, &second] {
        let out = lab.from(w, Body::Ready);
        assert!(
            dispatches(&out).is_empty(),
            "{w} got {:?}",
            dispatches(&out)
        );
    }
    lab.advance(Duration::from_secs(30));
    let st = lab.status(&t.rsplit_once('.').unwrap().0.to_string());
    assert_eq!(st.tasks[0].state, TaskState::Queued, "{:?}", st.tasks[0]);
    let Body::Queue { queues, .. } = lab.request(Body::ListQueue { request: 1 }) else {
        panic!("not a queue");
    };
    let q = queues
        .iter()
        .find(|q| q.tasks.iter().any(|x| x.task == t))
        .unwrap_or_else(|| panic!("{t} not queued: {queues:?}"));
    let f = q.tasks[0].forecast.clone().expect("a forecast");
    assert_eq!(q.tasks[0].task, t);
    assert_eq!(f.worker, third, "{f:?}");
    assert_eq!(f.after.as_deref(), Some(other.as_str()));
    assert_eq!(f.could_run_on, vec![third.clone()]);
    // The other task has run 31 s (the second attempt's 1 s, then 30)
    // of 80–100 s (mean 90).
    let (lo, ms, hi) = (f.min_ms.unwrap(), f.ms.unwrap(), f.max_ms.unwrap());
    assert_eq!((lo, ms, hi), (49_000, 59_000, 69_000));
    assert!(lo <= ms && ms <= hi);
    let said = crate::text::forecast(&f);
    assert_eq!(
        said,
        format!("waits for {third} (busy with {other}): about 59 s (49 s–69 s)")
    );
    // The status of its testrun says the same.
    let run = t.rsplit_once('.').unwrap().0.to_string();
    let w = lab.status(&run).tasks[0].waiting.clone().expect("waiting");
    assert_eq!(w.forecast.unwrap().worker, third);
}

#[test]
fn with_no_duration_to_go_by_the_wait_is_unknown_not_zero() {
    let mut lab = Lab::new();
    lab.register("w1", "devicegroup:g");
    let (running, _) = lab.one_task();
    lab.mandatory(
        "w1",
        Body::TaskAccepted {
            task: running.clone(),
            attempt: 1,
        },
    );
    let (queued, _) = lab.one_task();
    let Body::Queue { queues, .. } = lab.request(Body::ListQueue { request: 1 }) else {
        panic!("not a queue");
    };
    let t = &queues[0].tasks[0];
    assert_eq!(t.task, queued);
    let f = t.forecast.clone().unwrap();
    assert_eq!((f.worker.as_str(), f.ms, t.estimate_ms), ("w1", None, None));
    assert!(crate::text::forecast(&f).contains("not known yet"));
}
