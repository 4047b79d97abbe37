//! Hands on a device: a lease queued among CI tasks by fair share, its
//! console (replay of the boot output, typed input echoed), power through
//! Debian's real `pdudaemon` (its `localcmdline` driver flipping the fake
//! board's power file), the transcript, an operator's `--force` closing
//! the holder's console, another user refused, an idle holder losing
//! the lease, and the device back to CI afterwards.
//!
//! The board is a pseudo-terminal pair whose far end is a thread here:
//! it echoes what it receives while powered, and prints a boot banner
//! each time its power file turns `on`.

mod common;

use common::*;
use serialport::SerialPort;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// The fake board: echo while on, a numbered banner at every power-on.
struct Board {
    link: PathBuf,
    power: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Board {
    fn start(dir: &Path) -> Board {
        let (mut master, slave) = serialport::TTYPort::pair().expect("a pseudo-terminal pair");
        let link = dir.join("board-console");
        std::os::unix::fs::symlink(slave.name().unwrap(), &link).unwrap();
        let power = dir.join("board-power");
        std::fs::write(&power, "on\n").unwrap();
        master.set_timeout(Duration::from_millis(20)).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, file) = (stop.clone(), power.clone());
        let thread = std::thread::spawn(move || {
            let _slave = slave; // kept open: the master never sees a hangup
            let mut on = false;
            let mut boots = 0;
            let mut buf = [0u8; 4096];
            while !flag.load(Ordering::SeqCst) {
                let now_on = std::fs::read_to_string(&file)
                    .map(|s| s.trim() == "on")
                    .unwrap_or(false);
                if now_on && !on {
                    boots += 1;
                    let _ = master.write_all(format!("BOOT banner {boots}\r\nlogin: ").as_bytes());
                }
                on = now_on;
                if let Ok(n) = master.read(&mut buf) {
                    if on && n > 0 {
                        let _ = master.write_all(&buf[..n]);
                    }
                }
            }
        });
        Board {
            link,
            power,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Debian's pdudaemon on a free loopback port, its `localcmdline` PDU
/// `board` writing the board's power file.
fn start_pdudaemon(dir: &Path, power: &Path) -> (Proc, u16) {
    common::browser::ensure_packages(&[("/usr/sbin/pdudaemon", "pdudaemon")]);
    let port = free_port();
    let conf = dir.join("pdudaemon.conf");
    let cmd = |state: &str| format!("echo {state} > {} # port %s", power.display());
    std::fs::write(
        &conf,
        serde_json::json!({
            "daemon": {"hostname": "127.0.0.1", "port": port, "listener": "http", "logging_level": "DEBUG"},
            "pdus": {"board": {"driver": "localcmdline", "cmd_on": cmd("on"), "cmd_off": cmd("off")}}
        })
        .to_string(),
    )
    .unwrap();
    let mut c = std::process::Command::new("/usr/sbin/pdudaemon");
    c.arg("--conf")
        .arg(&conf)
        .arg("--logfile")
        .arg(dir.join("pdudaemon.log"));
    let p = Proc::spawn("pdudaemon", c);
    let deadline = Instant::now() + LIMIT;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "pdudaemon never listened: {:?}",
            p.stderr.all()
        );
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
    (p, port)
}

/// The worker's `[power]`: HTTP requests to pdudaemon, as a lab makes
/// them; the state read back from the board itself.
fn power_toml(port: u16, power: &Path) -> String {
    let get = |what: &str| {
        format!(
            "[\"python3\", \"-c\", \"import urllib.request as u; u.urlopen('http://127.0.0.1:{port}/power/control/{what}?hostname=board&port=1{}').read()\"]",
            if what == "reboot" { "&delay=1" } else { "" }
        )
    };
    format!(
        "\n[power]\non = {}\noff = {}\ncycle = {}\nstatus = [\"cat\", {:?}]\ntimeout = \"20s\"\n",
        get("on"),
        get("off"),
        get("reboot"),
        power.display().to_string()
    )
}

fn lab(dir: &Path, idle: &str) -> (ServerProc, Board, Proc, Proc, PathBuf) {
    lab_with(dir, &[("OTS_SERVER_LEASES__IDLE", idle)])
}

/// The lab: the board's group has a health check (package `health`, which
/// the conductor runs at once; CI packages wait for the `go` file), and
/// the worker's recovery is a power cycle.
fn lab_with(dir: &Path, env: &[(&str, &str)]) -> (ServerProc, Board, Proc, Proc, PathBuf) {
    let mut all = vec![("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")];
    all.extend_from_slice(env);
    let server = start_configured_server(
        dir,
        "[[health.check]]\ndevicegroup = \"board\"\nimage = \"check\"\npackages = [\"health\"]\ntimeout = \"60s\"\n",
        &all,
    );
    let board = Board::start(dir);
    let (pdu, port) = start_pdudaemon(dir, &board.power);
    let go = dir.join("go");
    let conductor = script(
        dir,
        "conductor.sh",
        &format!(
            "if [ \"$1\" != health ]; then while [ ! -e {go:?} ]; do sleep 0.05; done; fi\necho '<testsuite><testcase name=\"c\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    let keys = server.keys.clone().expect("secured");
    let w = start_worker_with(
        dir,
        "w1",
        "devicegroup:board",
        &server.control,
        &server.events,
        &[conductor.to_str().unwrap(), "{packages}"],
        &[("OTS_WORKER_SERIAL__PORT", board.link.to_str().unwrap())],
        &format!(
            "{}{}\n[recovery]\npower_cycle = true\n",
            keys.worker_toml("w1"),
            power_toml(port, &board.power)
        ),
    );
    assert!(
        w.stderr.wait_for("console open", LIMIT).is_some(),
        "{:?}",
        w.stderr.all()
    );
    wait_for_workers(&server, LIMIT, |ws: &[serde_json::Value]| {
        ws.iter()
            .any(|w| w["name"] == "w1" && w["state"] == "idle" && w["health"] == "good")
    });
    (server, board, pdu, w, go)
}

fn leases(server: &ServerProc, user: &str, all: bool) -> Vec<serde_json::Value> {
    let mut args = vec!["leases", "--json"];
    if all {
        args.push("--all");
    }
    let out = server.as_user(user).submit(&args, LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout).unwrap()
}

fn lease_state(server: &ServerProc, user: &str, id: &str) -> serde_json::Value {
    leases(server, user, true)
        .into_iter()
        .find(|l| l["lease"] == id)
        .unwrap_or_else(|| panic!("no lease {id}"))
}

fn wait_lease(
    server: &ServerProc,
    user: &str,
    id: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + LIMIT;
    loop {
        let l = lease_state(server, user, id);
        if ok(&l) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "lease {id} never got there: {l:#}"
        );
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
}

fn console(server: &ServerProc, user: &str, lease: &str) -> (Proc, std::process::ChildStdin) {
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args(["console", lease])
        .env("OTS_SERVER", &server.control);
    submit_env(&mut cmd, server, user);
    Proc::spawn_with_stdin(&format!("console-{user}"), cmd)
}

/// A CI testrun for the board (its conductor waits for the `go` file).
const CI: [&str; 6] = [
    "--device",
    "devicegroup:board",
    "--image",
    "i",
    "--packages",
    "p",
];

/// `reserve --wait` as `user`: the granted lease's id.
fn reserve_held(server: &ServerProc, user: &str) -> String {
    let out = server
        .as_user(user)
        .submit(&["reserve", "devicegroup:board", "--wait"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// Waits until a console says it is attached as the holder.
fn attached(con: &Proc) {
    assert!(
        con.stderr.wait_for("you may type", LIMIT).is_some(),
        "{:?}",
        con.stderr.all()
    );
}

/// The lease's transcript once it holds `needle` (its lines arrive in
/// batches after the live bytes), or as it is after the deadline.
fn transcript_with(server: &ServerProc, user: &str, lease: &str, needle: &str) -> String {
    let deadline = Instant::now() + LIMIT;
    loop {
        let t = text(&server.as_user(user).submit(&["logs", lease], LIMIT).stdout);
        if t.contains(needle) || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
}

#[test]
fn a_lease_takes_its_turn_among_ci_tasks_and_the_device_returns_to_ci() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _board, _pdu, _w, go) = lab(dir.path(), "10m");
    wait_allowed(&server, "alice");
    wait_allowed(&server, "bob");
    // A CI backlog: r1 runs (held by its gate), r2 waits.
    let r1 = submit_run(&server, &CI);
    wait_status(&server, &r1, LIMIT, running);
    let r2 = submit_run(&server, &CI);
    // Alice asks for the board: queued behind r1, ahead of the backlog
    // by fair share (she has had nothing; the tester has had r1).
    let out = server.as_user("alice").submit(
        &[
            "reserve",
            "devicegroup:board",
            "--duration",
            "10m",
            "--reason",
            "bring-up",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lease = text(&out.stdout).trim().to_string();
    assert!(lease.starts_with('l'), "{lease}");
    let l = lease_state(&server, "alice", &lease);
    assert_eq!(l["state"], "waiting", "{l:#}");
    let queue = text(&submit(&server, &["queue"], LIMIT).stdout);
    assert!(
        queue.contains(&format!("{lease}.1")),
        "the lease waits like a task: {queue}"
    );
    std::fs::write(&go, "").unwrap();
    wait_status(&server, &r1, LIMIT, finished);
    let l = wait_lease(&server, "alice", &lease, |l| l["state"] == "held");
    assert_eq!(l["worker"], "w1");
    assert_eq!(
        current_status(&server, &r2)["state"],
        "queued",
        "the board is alice's: r2 waits"
    );

    // The console: the boot banner from before the attach, then the echo.
    let (mut con, mut stdin) = console(&server, "alice", &lease);
    assert!(
        con.stdout.wait_for("BOOT banner 1", LIMIT).is_some(),
        "{:?} {:?}",
        con.stdout.all(),
        con.stderr.all()
    );
    stdin.write_all(b"hello board\n").unwrap();
    assert!(
        con.stdout.wait_for("hello board", LIMIT).is_some(),
        "{:?}",
        con.stdout.all()
    );

    // Power through pdudaemon: a cycle reboots the board; its new banner
    // reaches the open console.
    let out = server
        .as_user("alice")
        .submit(&["power", &lease, "cycle"], LIMIT);
    assert!(
        out.status.success(),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        con.stdout.wait_for("BOOT banner 2", LIMIT).is_some(),
        "{:?}",
        con.stdout.all()
    );
    let out = server
        .as_user("alice")
        .submit(&["power", &lease, "status"], LIMIT);
    assert_eq!(text(&out.stdout).trim(), "on", "{}", text(&out.stderr));

    // Bob may neither watch nor end it.
    let out = server.as_user("bob").submit(&["console", &lease], LIMIT);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    let out = server.as_user("bob").submit(&["release", &lease], LIMIT);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    let out = server
        .as_user("bob")
        .submit(&["release", &lease, "--force"], LIMIT);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));

    // The operator ends it: alice's console closes at once, saying why.
    let forced = Instant::now();
    let out = submit(&server, &["release", &lease, "--force"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(con.wait_exit(LIMIT), Some(3), "{:?}", con.stderr.all());
    let closed_after = forced.elapsed();
    assert!(
        con.stderr
            .all()
            .iter()
            .any(|l| l.contains("closed") && l.contains("--force")),
        "{:?}",
        con.stderr.all()
    );
    eprintln!(
        "console closed {} ms after the forced release",
        closed_after.as_millis()
    );

    // The board goes back to CI: r2 runs, after the device was judged
    // again (its group has no check: good at once, the reason says why).
    wait_status(&server, &r2, LIMIT, finished);
    let health = text(&submit(&server, &["health", "w1"], LIMIT).stdout);
    let ended = health
        .find(&format!("lease {lease} ended"))
        .unwrap_or_else(|| panic!("{health}"));
    assert!(
        health[ended..].contains("check") && health[ended..].contains("good"),
        "checked after the lease: {health}"
    );

    // The transcript: input by whom, power, the banners, the end.
    let out = server.as_user("alice").submit(&["logs", &lease], LIMIT);
    let transcript = text(&out.stdout);
    for needle in [
        "BOOT banner 1",
        "[input alice] hello board",
        "[power] cycle by alice: done, state on",
        "BOOT banner 2",
        "alice attached a console (holder)",
        &format!("lease {lease} ended: released by tester (--force)"),
    ] {
        assert!(
            transcript.contains(needle),
            "{needle:?} not in the transcript:\n{transcript}"
        );
    }
    let audit = audit_json(&server);
    assert!(
        audit.contains("lease_release") && audit.contains("power"),
        "{audit}"
    );
    let l = lease_state(&server, "tester", &lease);
    assert_eq!(l["state"], "ended");
}

#[test]
fn a_holder_that_vanishes_loses_the_lease_after_lease_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _board, _pdu, _w, go) = lab(dir.path(), "3s");
    std::fs::write(&go, "").unwrap();
    wait_allowed(&server, "alice");
    let lease = reserve_held(&server, "alice");
    // Her console keeps the lease alive while it is open…
    let (mut con, _stdin) = console(&server, "alice", &lease);
    attached(&con);
    let r = submit_run(&server, &CI);
    // Two idle windows pass with the console open: still held.
    let granted = lease_state(&server, "alice", &lease)["granted_ms"]
        .as_u64()
        .unwrap();
    let l = wait_lease(&server, "tester", &lease, |l| {
        l["state"] != "held" || ots::protocol::limits::unix_ms_now().saturating_sub(granted) > 7000
    });
    assert_eq!(l["state"], "held", "{l:#}");
    assert_eq!(current_status(&server, &r)["state"], "queued");
    // …and when her laptop dies, the board comes back after lease_idle.
    con.kill();
    let l = wait_lease(&server, "tester", &lease, |l| l["state"] == "ended");
    assert!(l["ended"].as_str().unwrap().contains("not heard"), "{l:#}");
    wait_status(&server, &r, LIMIT, finished);
    assert_eq!(current_status(&server, &r)["verdict"], "PASS");
}

/// The dashboard: reserve from the Leases page, the lease's page shows
/// the transcript with the boot banner, a line typed on it reaches the
/// board once (the same request sent twice types nothing more), another
/// user does not see it, release ends it.
#[test]
fn the_dashboard_reserves_shows_the_console_and_types_once() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _board, _pdu, _w, _go) =
        lab_with(dir.path(), &[("OTS_SERVER_WEB", "127.0.0.1:0")]);
    let base = web_url(&server);
    wait_allowed(&server, "alice");
    wait_allowed(&server, "bob");
    let cookie = common::http::sign_in(&web_link(&server, "alice"));
    let me = common::http::get(&base, "/api/me", Some(&cookie)).json();
    let csrf = me["csrf"].as_str().unwrap().to_string();
    let session = format!("ots_session={cookie}");
    let form = format!("csrf={csrf}&device=devicegroup%3Aboard&duration=10m&reason=web+session");
    let r = common::http::request(
        &base,
        "POST",
        "/leases",
        &[
            ("Cookie", &session),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Origin", &base),
        ],
        form.as_bytes(),
    );
    assert_eq!(r.status, 303, "{}", r.text());
    let lease = r
        .header("location")
        .unwrap()
        .trim_start_matches("/leases/")
        .to_string();
    wait_lease(&server, "alice", &lease, |l| l["state"] == "held");
    let page = common::http::get(&base, "/leases", Some(&cookie)).text();
    assert!(
        page.contains(&lease) && page.contains("web session") && page.contains("Release"),
        "{page}"
    );
    // The transcript opens with what the board printed before the grant.
    let deadline = Instant::now() + LIMIT;
    let page = loop {
        let page = common::http::get(&base, &format!("/leases/{lease}"), Some(&cookie)).text();
        if page.contains("BOOT banner 1") || Instant::now() > deadline {
            break page;
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    };
    assert!(
        page.contains("console-input") && page.contains("BOOT banner 1"),
        "{page}"
    );
    // A line typed, and the same request again (a retry after a lost answer).
    let body = br#"{"stream":"web-test","offset":0,"text":"from the web\n"}"#;
    for _ in 0..2 {
        let r = common::http::request(
            &base,
            "POST",
            &format!("/api/leases/{lease}/input"),
            &[
                ("Cookie", &session),
                ("Content-Type", "application/json"),
                ("X-CSRF-Token", &csrf),
            ],
            body,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["have"], 13);
    }
    let echoed = |t: &str| {
        t.lines()
            .filter(|l| l.contains("[serial] from the web"))
            .count()
    };
    let transcript = transcript_with(&server, "alice", &lease, "[serial] from the web");
    assert_eq!(
        echoed(&transcript),
        1,
        "typed once, echoed once:\n{transcript}"
    );
    assert!(
        transcript.contains("[input alice] from the web"),
        "{transcript}"
    );
    // Bob's browser sees nothing of it.
    let bob = common::http::sign_in(&web_link(&server, "bob"));
    let r = common::http::get(&base, &format!("/leases/{lease}"), Some(&bob));
    assert_eq!(r.status, 404, "{}", r.text());
    // Shared with him, he watches — and cannot type, in the browser or
    // from the command line.
    let out = server
        .as_user("alice")
        .submit(&["lease", "share", &lease, "bob"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page = common::http::get(&base, &format!("/leases/{lease}"), Some(&bob)).text();
    assert!(
        page.contains("from the web") && !page.contains("console-input"),
        "{page}"
    );
    let bob_me = common::http::get(&base, "/api/me", Some(&bob)).json();
    let bob_csrf = bob_me["csrf"].as_str().unwrap().to_string();
    let r = common::http::request(
        &base,
        "POST",
        &format!("/api/leases/{lease}/input"),
        &[
            ("Cookie", &format!("ots_session={bob}")),
            ("Content-Type", "application/json"),
            ("X-CSRF-Token", &bob_csrf),
        ],
        br#"{"stream":"bob","offset":0,"text":"rm -rf /\n"}"#,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let (mut watcher, _stdin) = console(&server, "bob", &lease);
    assert!(
        watcher.stderr.wait_for("read only", LIMIT).is_some(),
        "{:?}",
        watcher.stderr.all()
    );
    watcher.kill();
    // Release from the page: asked first (no JavaScript here), then done,
    // back on the page it was pressed on.
    let post = |body: String| {
        common::http::request(
            &base,
            "POST",
            &format!("/leases/{lease}/act"),
            &[
                ("Cookie", &session),
                ("Content-Type", "application/x-www-form-urlencoded"),
                ("Origin", &base),
            ],
            body.as_bytes(),
        )
    };
    let asked = post(format!("csrf={csrf}&action=release&back=%2Fleases"));
    assert_eq!(asked.status, 200, "{}", asked.text());
    assert!(
        asked.text().contains(&format!("End lease {lease}?")),
        "{}",
        asked.text()
    );
    assert_eq!(
        wait_lease(&server, "alice", &lease, |_| true)["state"],
        "held"
    );
    let r = post(format!(
        "csrf={csrf}&action=release&back=%2Fleases&confirm=yes"
    ));
    assert_eq!(r.status, 303, "{}", r.text());
    assert_eq!(r.header("location"), Some("/leases"));
    let l = wait_lease(&server, "alice", &lease, |l| l["state"] == "ended");
    assert!(
        l["ended"].as_str().unwrap().contains("released by alice"),
        "{l:#}"
    );
}

/// `run --lease`: the holder's testrun runs at once on the leased device
/// while CI waits; the lease holds on afterwards with the console still
/// attached and typing still reaching the board; the CI run goes after
/// the release.
#[test]
fn a_testrun_on_a_lease_runs_at_once_and_the_lease_holds_on() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _board, _pdu, _w, go) = lab(dir.path(), "10m");
    std::fs::write(&go, "").unwrap();
    wait_allowed(&server, "alice");
    let lease = reserve_held(&server, "alice");
    let (mut con, mut stdin) = console(&server, "alice", &lease);
    attached(&con);
    // CI waits for the board.
    let r = submit_run(&server, &CI);
    // Alice's testrun runs at once, ahead of it.
    let out = server.as_user("alice").submit(
        &[
            "run",
            "--lease",
            &lease,
            "--image",
            "mine",
            "--packages",
            "p",
            "--wait",
        ],
        LIMIT,
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("PASS"), "{}", text(&out.stdout));
    assert_eq!(
        current_status(&server, &r)["state"],
        "queued",
        "CI still waits"
    );
    // Bob may not run on her lease.
    wait_allowed(&server, "bob");
    let out = server.as_user("bob").submit(
        &[
            "run",
            "--lease",
            &lease,
            "--image",
            "his",
            "--packages",
            "p",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    // The lease holds on: the console still types into the board.
    let l = wait_lease(&server, "alice", &lease, |l| {
        l["state"] == "held" && l["worker"] == "w1"
    });
    assert_eq!(l["state"], "held");
    let deadline = Instant::now() + LIMIT;
    loop {
        // Typed again until it shows: between the testrun and the hold's
        // resumption the server asks the console to resend, never types twice.
        stdin.write_all(b"after the run\n").unwrap();
        if con
            .stdout
            .wait_for("after the run", Duration::from_secs(2))
            .is_some()
        {
            break;
        }
        assert!(Instant::now() < deadline, "{:?}", con.stdout.all());
    }
    let transcript = text(
        &server
            .as_user("alice")
            .submit(&["logs", &lease], LIMIT)
            .stdout,
    );
    assert!(
        transcript.contains("runs on the device; the console stays open"),
        "{transcript}"
    );
    let out = server.as_user("alice").submit(&["release", &lease], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(con.wait_exit(LIMIT), Some(3), "{:?}", con.stderr.all());
    wait_status(&server, &r, LIMIT, finished);
    assert_eq!(current_status(&server, &r)["verdict"], "PASS");
}

/// A holder whose key is removed from the allow-list loses the lease at
/// once, connected or not, and the board goes back to CI.
#[test]
fn a_lease_ends_when_its_holders_key_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _board, _pdu, _w, go) = lab(dir.path(), "10m");
    std::fs::write(&go, "").unwrap();
    wait_allowed(&server, "carol");
    let lease = reserve_held(&server, "carol");
    let r = submit_run(&server, &CI);
    let keys = server.keys.clone().unwrap();
    std::fs::remove_file(keys.users_dir().join("carol.pub")).unwrap();
    let l = wait_lease(&server, "tester", &lease, |l| l["state"] == "ended");
    assert!(
        l["ended"]
            .as_str()
            .unwrap()
            .contains("carol was revoked or changed"),
        "{l:#}"
    );
    wait_status(&server, &r, LIMIT, finished);
    assert_eq!(current_status(&server, &r)["verdict"], "PASS");
}

/// The console in a real browser (headless Chromium): the lease's page
/// shows the boot banner from before the grant, a line typed into its
/// input reaches the board and its echo appears in the page, live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_works_in_a_browser() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _board, _pdu, _w, go) = lab_with(dir.path(), &[("OTS_SERVER_WEB", "127.0.0.1:0")]);
    std::fs::write(&go, "").unwrap();
    let base = web_url(&server);
    wait_allowed(&server, "dave");
    let out = server.as_user("dave").submit(
        &[
            "reserve",
            "devicegroup:board",
            "--wait",
            "--reason",
            "browser",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lease = text(&out.stdout).trim().to_string();
    let b = common::browser::Browser::start().await;
    b.open(&web_link(&server, "dave")).await;
    b.open(&format!("{base}/leases")).await;
    let page = b.client.source().await.unwrap();
    assert!(page.contains(&lease) && page.contains("browser"), "{page}");
    b.screenshot("leases").await;
    b.open(&format!("{base}/leases/{lease}")).await;
    b.wait_js(
        "document.querySelector('#log') && document.querySelector('#log').textContent.includes('BOOT banner 1')",
        LIMIT,
    )
    .await;
    b.js("document.querySelector('#console-input [name=text]').value = 'typed in chromium'; document.querySelector('#console-input button[type=submit]').click(); return 1").await;
    // Typed once (the input line) and echoed once (the board), live.
    b.wait_js(
        "document.querySelector('#log').textContent.split('typed in chromium').length - 1 >= 2",
        LIMIT,
    )
    .await;
    b.screenshot("lease-console").await;
    let transcript = text(
        &server
            .as_user("dave")
            .submit(&["logs", &lease], LIMIT)
            .stdout,
    );
    assert_eq!(
        transcript.matches("[serial] typed in chromium").count(),
        1,
        "{transcript}"
    );
}

/// The server is SIGKILLed and started again while the holder's console
/// is attached: the lease is still held, the console attaches again by
/// itself, and what is typed before and after reaches the board exactly
/// once.
#[test]
fn typed_input_reaches_the_board_once_across_a_server_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, _board, _pdu, _w, go) = lab(dir.path(), "10m");
    std::fs::write(&go, "").unwrap();
    wait_allowed(&server, "erin");
    let lease = reserve_held(&server, "erin");
    let (mut con, mut stdin) = console(&server, "erin", &lease);
    attached(&con);
    stdin.write_all(b"before the crash\n").unwrap();
    assert!(
        con.stdout.wait_for("before the crash", LIMIT).is_some(),
        "{:?}",
        con.stdout.all()
    );
    // SIGKILL, and the same server again on the same ports and state.
    server.proc.kill();
    let config = dir.path().join("server.toml").display().to_string();
    let again = start_server_args(
        &dir.path().join("server"),
        &server.control,
        &server.events,
        &[("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250")],
        server.keys.clone(),
        &["--config", &config],
    );
    server = again;
    assert!(
        con.stderr.wait_for("attaching again", LIMIT).is_some(),
        "{:?}",
        con.stderr.all()
    );
    stdin.write_all(b"after the crash\n").unwrap();
    assert!(
        con.stdout.wait_for("after the crash", LIMIT).is_some(),
        "{:?} {:?}",
        con.stdout.all(),
        con.stderr.all()
    );
    let l = lease_state(&server, "erin", &lease);
    assert_eq!(l["state"], "held", "{l:#}");
    // The transcript's lines come in batches after the live bytes.
    let transcript = transcript_with(&server, "erin", &lease, "[serial] after the crash");
    for line in ["[serial] before the crash", "[serial] after the crash"] {
        assert_eq!(
            transcript.matches(line).count(),
            1,
            "{line:?}:\n{transcript}"
        );
    }
    con.kill();
}

/// `[leases] held_per_user`: a holder at the limit waits for one of its
/// own leases to end, while the free device goes to others' work.
#[test]
fn a_holder_at_the_held_limit_waits_for_its_own_lease_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _board, _pdu, _w, go) =
        lab_with(dir.path(), &[("OTS_SERVER_LEASES__HELD_PER_USER", "1")]);
    std::fs::write(&go, "").unwrap();
    // A second board of the group, without console or power.
    let keys = server.keys.clone().unwrap();
    let conductor = script(
        dir.path(),
        "plain.sh",
        "echo '<testsuite><testcase name=\"c\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let _w2 = start_worker_with(
        dir.path(),
        "w2",
        "devicegroup:board",
        &server.control,
        &server.events,
        &[conductor.to_str().unwrap()],
        &[],
        &keys.worker_toml("w2"),
    );
    wait_for_workers(&server, LIMIT, |ws: &[serde_json::Value]| {
        ws.iter()
            .filter(|w| w["state"] == "idle" && w["health"] == "good")
            .count()
            == 2
    });
    wait_allowed(&server, "frank");
    let reserve = |wait: bool| {
        let mut args = vec!["reserve", "devicegroup:board"];
        if wait {
            args.push("--wait");
        }
        let out = server.as_user("frank").submit(&args, LIMIT);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    };
    let first = reserve(true);
    let second = reserve(false);
    // The other board is free: CI runs on it, frank's second lease waits.
    let r = submit_run(&server, &CI);
    wait_status(&server, &r, LIMIT, finished);
    assert_eq!(lease_state(&server, "frank", &second)["state"], "waiting");
    let out = server.as_user("frank").submit(&["release", &first], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_lease(&server, "frank", &second, |l| l["state"] == "held");
}
