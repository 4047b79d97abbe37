//! Result and input files with real processes: uploads streamed from disk
//! that survive a SIGKILLed server or worker and resume, a chunk damaged
//! in flight, names and kinds of files that must never be uploaded, limits
//! and the store's quota checked at the offer, an input file reaching the
//! conductor, and fetch (resumed, verified, with a progress bar on a
//! terminal).

mod common;

use common::*;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
const FAST: [(&str, &str); 1] = [("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")];
const MIB: u64 = 1024 * 1024;

fn sha_of(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

fn junit() -> &'static str {
    r#"echo '<testsuite><testcase name="files"/></testsuite>' > "$OTS_RESULTS_DIR/r.xml""#
}

/// A conductor that writes `mib` MiB of random bytes as big.bin.
fn big_file_conductor(dir: &Path, mib: u64) -> PathBuf {
    script(
        dir,
        "big.sh",
        &format!(
            "head -c {} /dev/urandom > \"$OTS_RESULTS_DIR/big.bin\"\n{}",
            mib * MIB,
            junit()
        ),
    )
}

fn incoming(server: &ServerProc, task: &str, name: &str) -> PathBuf {
    server
        .state_dir
        .join("tasks")
        .join(task)
        .join("incoming/1")
        .join(name)
}

fn stored(server: &ServerProc, task: &str, name: &str) -> PathBuf {
    server
        .state_dir
        .join("tasks")
        .join(task)
        .join("files")
        .join(name)
}

fn worker_result(dir: &Path, worker: &str, task: &str, name: &str) -> PathBuf {
    dir.join(worker)
        .join("tasks")
        .join(format!("{task}-attempt1"))
        .join("results")
        .join(name)
}

/// Waits until `path` holds at least `bytes` (polled, with a deadline).
fn wait_for_size(path: &Path, bytes: u64, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::fs::metadata(path).is_ok_and(|m| m.len() >= bytes) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2)); // polling a file's size
    }
    false
}

fn run_on(server: &ServerProc, device: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "--device",
        device,
        "--image",
        "i",
        "--packages",
        "p",
        "--queue-anyway",
    ];
    args.extend_from_slice(extra);
    submit_run(server, &args)
}

fn counter(st: &serde_json::Value, name: &str) -> u64 {
    st["counters"][name].as_u64().unwrap_or(0)
}

/// `sent=N` of the worker's "result file stored" line for `name`.
fn sent_by_worker(w: &Proc, name: &str) -> u64 {
    let line = w
        .stderr
        .all()
        .into_iter()
        .find(|l| l.contains("result file stored by the server") && l.contains(name))
        .expect("the worker logged the stored file");
    let start = line.find("sent=").unwrap() + 5;
    line[start..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn a_200_mib_upload_survives_a_server_kill_and_resends_under_a_quarter() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_fresh_server(dir.path(), &FAST);
    let conductor = big_file_conductor(dir.path(), 200);
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let run = run_on(&server, "devicegroup:g", &[]);
    let task = format!("{run}.1");
    let partial = incoming(&server, &task, "big.bin");
    assert!(
        wait_for_size(&partial, 50 * MIB, LIMIT),
        "the upload never reached 50 MiB: {:?}",
        w.stderr.all()
    );
    let (control, events, state) = (
        server.control.clone(),
        server.events.clone(),
        server.state_dir.clone(),
    );
    server.proc.kill();
    let at_kill = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let server = start_server(&state, &control, &events, &FAST);
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let sent = sent_by_worker(&w, "big.bin");
    let size = 200 * MIB;
    let resent = sent.saturating_sub(size);
    eprintln!(
        "server killed with {} MiB stored of {} MiB; the worker sent {sent} bytes in all: {resent} bytes ({:.2} %) sent again",
        at_kill / MIB,
        size / MIB,
        resent as f64 * 100.0 / size as f64
    );
    assert!(resent < size / 4, "re-sent {resent} of {size}");
    assert!(
        counter(&st, "file_bytes_resumed") >= 50 * MIB,
        "{}",
        st["counters"]
    );
    let ours = worker_result(dir.path(), "w", &task, "big.bin");
    assert_eq!(sha_of(&stored(&server, &task, "big.bin")), sha_of(&ours));
    assert!(
        !partial.exists(),
        "the incoming copy was renamed into place"
    );
}

#[test]
fn a_200_mib_upload_survives_a_worker_kill_and_resumes_from_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let conductor = big_file_conductor(dir.path(), 200);
    let start = || {
        start_worker(
            dir.path(),
            "w",
            "devicegroup:g",
            &server,
            &[conductor.to_str().unwrap()],
            &[],
        )
    };
    let mut w = start();
    let run = run_on(&server, "devicegroup:g", &[]);
    let task = format!("{run}.1");
    let partial = incoming(&server, &task, "big.bin");
    assert!(
        wait_for_size(&partial, 50 * MIB, LIMIT),
        "the upload never reached 50 MiB: {:?}",
        w.stderr.all()
    );
    w.kill();
    let at_kill = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let w = start();
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let size = 200 * MIB;
    // What the restarted worker sent, against what the server lacked.
    let sent = sent_by_worker(&w, "big.bin");
    let received = counter(&st, "file_bytes_received");
    let junit_bytes = std::fs::metadata(stored(&server, &task, "r.xml"))
        .unwrap()
        .len();
    let resent = received.saturating_sub(size + junit_bytes);
    eprintln!(
        "worker killed with {} MiB stored of {} MiB; the restarted worker sent {sent} bytes; the server received {received} in all: {resent} bytes ({:.2} %) sent twice",
        at_kill / MIB,
        size / MIB,
        resent as f64 * 100.0 / size as f64
    );
    assert!(
        sent <= size - at_kill + 16 * MIB,
        "the restarted worker resent from the start"
    );
    assert!(resent < size / 4, "re-sent {resent} of {size}");
    let ours = worker_result(dir.path(), "w", &task, "big.bin");
    assert_eq!(sha_of(&stored(&server, &task, "big.bin")), sha_of(&ours));
    assert_eq!(
        st["tasks"][0]["attempts"], 1,
        "the task did not run again: {st:#}"
    );
}

#[test]
fn a_chunk_damaged_in_flight_is_detected_and_the_file_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let conductor = big_file_conductor(dir.path(), 3);
    // The fault hook flips one byte of the chunk holding offset 1 000 000,
    // after the worker hashed the true bytes: only the server can notice.
    let _w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_TEST_CORRUPT_UPLOAD_AT", "1000000")],
    );
    let run = run_on(&server, "devicegroup:g", &[]);
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    assert_eq!(
        counter(&st, "file_hash_mismatches"),
        1,
        "{}",
        st["counters"]
    );
    let task = format!("{run}.1");
    assert_eq!(
        sha_of(&stored(&server, &task, "big.bin")),
        sha_of(&worker_result(dir.path(), "w", &task, "big.bin"))
    );
    assert!(server
        .proc
        .stderr
        .wait_for("SHA-256 mismatch", Duration::from_secs(1))
        .is_some());
}

#[test]
fn symlinks_and_special_files_are_never_uploaded() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "not for the server").unwrap();
    let conductor = script(
        dir.path(),
        "sneaky.sh",
        &format!(
            "ln -s {secret:?} \"$OTS_RESULTS_DIR/leak.txt\"\nmkdir -p \"$OTS_RESULTS_DIR/d\"\nln -s {:?} \"$OTS_RESULTS_DIR/d/up\"\nmkfifo \"$OTS_RESULTS_DIR/pipe\"\n{}",
            dir.path(),
            junit()
        ),
    );
    let _w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let run = run_on(&server, "devicegroup:g", &[]);
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let files: Vec<&str> = st["tasks"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(files, vec!["r.xml"]);
    let task = format!("{run}.1");
    assert!(!stored(&server, &task, "leak.txt").exists());
    assert!(!stored(&server, &task, "pipe").exists());
    let logs = text(&submit(&server, &["logs", &run], Duration::from_secs(10)).stdout);
    assert!(logs.contains("not a regular file"), "{logs}");
}

#[test]
fn an_oversized_file_is_refused_at_the_offer_and_a_full_store_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[
            FAST[0],
            ("OTS_SERVER_LIMITS__MAX_FILE_BYTES", "4194304"),
            ("OTS_SERVER_LIMITS__MAX_STORED_FILE_BYTES", "6291456"),
        ],
    );
    let mib = dir.path().join("mib");
    std::fs::write(&mib, "3").unwrap();
    // big.bin of $(cat mib) MiB: 3 (fits), then 3 again (over the quota),
    // then 5 (over the per-file limit).
    let conductor = script(
        dir.path(),
        "sized.sh",
        &format!(
            "head -c $(( $(cat {mib:?}) * 1048576 )) /dev/urandom > \"$OTS_RESULTS_DIR/big.bin\"\n{}",
            junit()
        ),
    );
    let _w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let first = run_on(&server, "devicegroup:g", &[]);
    let st = wait_status(&server, &first, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");

    let second = run_on(&server, "devicegroup:g", &[]);
    let st = wait_status(&server, &second, LIMIT, finished);
    assert_eq!(st["verdict"], "ERROR", "{st:#}");
    let reason = st["tasks"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("limits.max_stored_file_bytes"), "{reason}");
    assert!(!incoming(&server, &format!("{second}.1"), "big.bin").exists());

    std::fs::write(&mib, "5").unwrap();
    let received_before = counter(&st, "file_bytes_received");
    let third = run_on(&server, "devicegroup:g", &[]);
    let st = wait_status(&server, &third, LIMIT, finished);
    assert_eq!(st["verdict"], "ERROR", "{st:#}");
    let reason = st["tasks"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("limits.max_file_bytes"), "{reason}");
    // Refused before any byte of it was accepted (only r.xml's arrived).
    assert!(
        counter(&st, "file_bytes_received") - received_before < 1024,
        "{}",
        st["counters"]
    );
}

/// Runs `ots-submit` under a pseudo-terminal (Python's pty module), so
/// it draws its progress bar; returns what the terminal showed.
fn submit_on_a_terminal(server: &ServerProc, args: &[&str]) -> (i32, String) {
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg("import os, pty, sys; st = pty.spawn(sys.argv[1:]); sys.exit(os.waitstatus_to_exitcode(st))")
        .arg(bin("ots-submit"))
        .args(args)
        .env("OTS_SERVER", &server.control)
        .envs(submit_envs(server));
    let out = run_bounded(cmd, LIMIT);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn an_input_file_reaches_the_conductor_and_fetch_resumes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    // The conductor copies its input (found through {inputs_dir}) into
    // its results, so what arrived can be compared byte for byte.
    let conductor = script(
        dir.path(),
        "echo-input.sh",
        &format!(
            "cp \"$1/plans/plan.bin\" \"$OTS_RESULTS_DIR/echo.bin\"\nhead -c 5000000 /dev/urandom > \"$OTS_RESULTS_DIR/more.bin\"\n{}",
            junit()
        ),
    );
    let _w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap(), "{inputs_dir}"],
        &[],
    );
    let input = dir.path().join("plan.bin");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&input, &data).unwrap();
    let arg = format!("plans/plan.bin={}", input.display());
    let run = run_on(&server, "devicegroup:g", &["--input", &arg]);
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let task = format!("{run}.1");
    assert_eq!(sha_of(&stored(&server, &task, "echo.bin")), sha_of(&input));
    // The same input again: stored once, not uploaded again.
    let received = counter(&st, "file_bytes_received");
    let again = run_on(&server, "devicegroup:g", &["--input", &arg]);
    let st = wait_status(&server, &again, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let more = counter(&st, "file_bytes_received") - received;
    assert!(
        more < 9_000_000,
        "the input was uploaded again ({more} bytes)"
    );

    // Fetch on a terminal: a progress bar; every file with its hash.
    let out = dir.path().join("fetched");
    // An interrupted earlier download left half of more.bin.
    let more_stored = stored(&server, &task, "more.bin");
    let half = std::fs::read(&more_stored).unwrap()[..2_500_000].to_vec();
    std::fs::create_dir_all(out.join(&task)).unwrap();
    std::fs::write(out.join(&task).join("more.bin.part"), &half).unwrap();
    let (code, shown) = submit_on_a_terminal(&server, &["fetch", &run, out.to_str().unwrap()]);
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains("fetching") && shown.contains("B/s"),
        "no progress bar: {shown}"
    );
    for name in ["echo.bin", "more.bin", "r.xml"] {
        assert_eq!(
            sha_of(&out.join(&task).join(name)),
            sha_of(&stored(&server, &task, name)),
            "{name}"
        );
    }
    assert!(!out.join(&task).join("more.bin.part").exists());
    assert!(shown.contains("downloaded now"), "{shown}");

    // Without a terminal: plain lines; a damaged partial download is
    // detected by its hash and fetched again from the start.
    let out2 = dir.path().join("fetched2");
    std::fs::create_dir_all(out2.join(&task)).unwrap();
    std::fs::write(out2.join(&task).join("echo.bin.part"), vec![0u8; 1_000_000]).unwrap();
    let o = submit(&server, &["fetch", &run, out2.to_str().unwrap()], LIMIT);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let lines = text(&o.stderr);
    assert!(
        lines.contains("fetching") && lines.contains("done"),
        "{lines}"
    );
    assert!(lines.contains("resuming at 1000000"), "{lines}");
    assert_eq!(sha_of(&out2.join(&task).join("echo.bin")), sha_of(&input));
}

#[test]
fn worker_folders_are_removed_once_delivered_keeping_the_last_few() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &FAST);
    let conductor = script(dir.path(), "tiny.sh", junit());
    let w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[("OTS_WORKER_KEEP_TASK_DIRS", "1")],
    );
    let mut runs = Vec::new();
    for _ in 0..3 {
        let run = run_on(&server, "devicegroup:g", &[]);
        let st = wait_status(&server, &run, LIMIT, finished);
        assert_eq!(st["verdict"], "PASS", "{st:#}");
        runs.push(run);
    }
    // The last report's ack reaches the worker after the verdict: wait
    // for the folders to go rather than assume.
    let tasks = dir.path().join("w").join("tasks");
    let deadline = Instant::now() + LIMIT;
    let count = || std::fs::read_dir(&tasks).map(|d| d.count()).unwrap_or(0);
    while count() > 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20)); // polling a folder
    }
    assert_eq!(count(), 1, "{:?}", w.stderr.all());
    assert!(tasks.join(format!("{}.1-attempt1", runs[2])).exists());
}

#[test]
fn retention_prunes_ended_testruns_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[FAST[0], ("OTS_SERVER_RETENTION__MAX_BYTES", "1")],
    );
    let conductor = big_file_conductor(dir.path(), 1);
    let _w = start_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let run = run_on(&server, "devicegroup:g", &[]);
    let st = wait_status(&server, &run, LIMIT, |st| !st["pruned"].is_null());
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    assert!(st["pruned"]["bytes"].as_u64().unwrap() >= MIB, "{st:#}");
    assert!(st["tasks"][0]["files"].as_array().unwrap().is_empty());
    let task = format!("{run}.1");
    let folder = server.state_dir.join("tasks").join(&task);
    let deadline = Instant::now() + LIMIT;
    while folder.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10)); // the desk removes it off the loop
    }
    assert!(!folder.exists());
    let shown = text(&submit(&server, &["status", &run], LIMIT).stdout);
    assert!(
        shown.contains("pruned") && shown.contains("retention.max_bytes"),
        "{shown}"
    );
    let audit = text(&submit(&server, &["audit", "--json"], LIMIT).stdout);
    assert!(audit.contains("prune") && audit.contains(&run), "{audit}");
}

/// `files_dir` set: logs, result files and the audit log go there, the
/// state directory keeps only the server's own state, and a fetch reads
/// them back from there.
#[test]
fn logs_result_files_and_the_audit_log_live_in_files_dir() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("shared-files");
    let files_env = files.display().to_string();
    let mut env = FAST.to_vec();
    env.push(("OTS_SERVER_FILES_DIR", files_env.as_str()));
    let server = start_fresh_server(dir.path(), &env);
    let conductor = big_file_conductor(dir.path(), 1);
    let _w = start_idle_worker(
        dir.path(),
        "fd",
        "devicegroup:fd",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let run = run_on(&server, "devicegroup:fd", &[]);
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let task = format!("{run}.1");
    let stored = files.join("tasks").join(&task).join("files/big.bin");
    assert_eq!(std::fs::metadata(&stored).unwrap().len(), MIB);
    assert!(files.join("tasks").join(&task).join("log").exists());
    assert!(files.join("audit.log").exists());
    assert!(
        !server.state_dir.join("tasks").join(&task).exists(),
        "nothing of the task in the state directory"
    );
    let fetched = dir.path().join("fetched");
    let out = submit(&server, &["fetch", &run, fetched.to_str().unwrap()], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        sha_of(&fetched.join(&task).join("big.bin")),
        sha_of(&stored)
    );
}
