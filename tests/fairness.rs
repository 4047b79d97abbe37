//! Issue 21 (in part): one user's backlog cannot lock the lab out — per
//! user quotas beside the server-wide bound, with the real binaries.

mod common;

use common::*;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

fn queue_one(server: &ServerProc, user: &str) -> std::process::Output {
    server.as_user(user).submit(
        &[
            "run",
            "--device",
            "devicegroup:nobody",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
        LIMIT,
    )
}

/// User A fills its own quota of unfinished tasks (a group no worker has,
/// `--queue-anyway`): its next submit is refused naming the quota, and
/// user B still submits.
#[test]
fn a_user_filling_its_own_quota_leaves_others_able_to_submit() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(
        dir.path(),
        &[
            ("OTS_SERVER_LIMITS__MAX_OPEN_TASKS", "30"),
            ("OTS_SERVER_LIMITS__MAX_OPEN_TASKS_PER_OWNER", "10"),
        ],
    );
    for user in ["quota-a", "quota-b"] {
        wait_allowed(&server, user);
    }
    for i in 0..10 {
        let out = queue_one(&server, "quota-a");
        assert!(out.status.success(), "submit {i}: {}", text(&out.stderr));
    }
    let out = queue_one(&server, "quota-a");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("limits.max_open_tasks_per_owner") && err.contains("quota-a"),
        "{err}"
    );
    let out = queue_one(&server, "quota-b");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// "Why is my task still waiting?": `queue` names, for every queued task,
/// its owner and how many tasks of its owner and of others are ahead,
/// and for each queue the workers that could take it and what each is
/// doing — or that no worker has the device.
#[test]
fn the_queue_says_why_each_task_waits() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let (conductor, go) = gated_conductor(dir.path());
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let run_on = |user: &str, group: &str| {
        let out = server.as_user(user).submit(
            &[
                "run",
                "--device",
                group,
                "--image",
                "i",
                "--packages",
                "p",
                "--queue-anyway",
            ],
            LIMIT,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    run_on("tester", "devicegroup:g"); // runs on w
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let shown = text(&submit(&server, &["workers", "--json"], LIMIT).stdout);
        if shown.contains("\"busy\"") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "w never busy: {shown}"
        );
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
    for user in ["queue-a", "queue-a", "queue-b"] {
        wait_allowed(&server, user);
        run_on(user, "devicegroup:g");
    }
    run_on("queue-b", "devicegroup:nowhere");
    let out = submit(&server, &["queue", "--json"], LIMIT);
    let queues: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let g = queues
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["key"] == "g")
        .expect("queue g");
    let tasks = g["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3, "{g:#}");
    // Fair share: queue-b's one task goes between queue-a's two.
    assert_eq!(tasks[1]["owner"], "queue-b", "{g:#}");
    assert_eq!(
        (
            tasks[1]["ahead_own"].as_u64(),
            tasks[1]["ahead_others"].as_u64()
        ),
        (Some(0), Some(1)),
        "{g:#}"
    );
    assert_eq!(tasks[2]["owner"], "queue-a", "{g:#}");
    assert_eq!(
        (
            tasks[2]["ahead_own"].as_u64(),
            tasks[2]["ahead_others"].as_u64()
        ),
        (Some(1), Some(1)),
        "{g:#}"
    );
    assert!(
        g["workers"][0]["doing"]
            .as_str()
            .unwrap()
            .starts_with("busy with r1."),
        "{g:#}"
    );
    let shown = text(&submit(&server, &["queue"], LIMIT).stdout);
    assert!(
        shown.contains("could run on: w (busy with r1.1)"),
        "{shown}"
    );
    assert!(
        shown.contains("nowhere") && shown.contains("none is registered"),
        "{shown}"
    );
    // `status` says the same for each of a testrun's queued tasks.
    let st = current_status(&server, "r4");
    let w = &st["tasks"][0]["waiting"];
    assert_eq!(
        (
            w["position"].as_u64(),
            w["ahead_own"].as_u64(),
            w["ahead_others"].as_u64()
        ),
        (Some(2), Some(0), Some(1)),
        "{st:#}"
    );
    let shown = text(
        &server
            .as_user("queue-b")
            .submit(&["status", "r4"], LIMIT)
            .stdout,
    );
    assert!(
        shown.contains("waiting: position 2 under g (0 of the same owner and 1 of others ahead); could run on w (busy with r1.1)"),
        "{shown}"
    );
    let shown = text(
        &server
            .as_user("queue-b")
            .submit(&["status", "r5"], LIMIT)
            .stdout,
    );
    assert!(
        shown.contains("no registered worker has this device"),
        "{shown}"
    );
    std::fs::write(&go, "").unwrap();
    // Once they run, nothing says they wait.
    let st = wait_status(&server, "r4", LIMIT, finished);
    assert!(st["tasks"][0].get("waiting").is_none(), "{st:#}");
}
