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
        let deadline = std::time::Instant::now() + LIMIT;
        while !server
            .as_user(user)
            .submit(&["whoami"], LIMIT)
            .status
            .success()
        {
            assert!(std::time::Instant::now() < deadline, "{user} never allowed");
            std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
        }
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
