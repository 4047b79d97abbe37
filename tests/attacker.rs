//! Issue 19: what an attacker tried against the secured default, each
//! finding as a scenario with the real binaries over real sockets — a
//! keyless sniffer, a subscription flood, inputs named by hash, a worker
//! key claiming another device, files under umask 022, a bad allow-list
//! file, replayed handshakes and secrets on command lines.

mod common;

use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(30);

/// Finding 1: a keyless peer that read a worker's routing identity off
/// the wire (it travels in clear text in the ZMTP READY) opens connections
/// announcing it, over and over, while the worker runs a task. The
/// server's connections are its own: the worker's session is never cut
/// and the task passes.
#[test]
fn a_sniffer_announcing_a_captured_routing_identity_cuts_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let proxy = Proxy::start(&server.control);
    let (conductor, go) = gated_conductor(dir.path());
    let keys = server.keys.clone().unwrap();
    let w = start_worker_with(
        dir.path(),
        "w",
        "devicegroup:g",
        &proxy.endpoint(),
        &server.events,
        &[conductor.to_str().unwrap()],
        &[],
        &keys.worker_toml("w"),
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "p",
        ],
    );
    wait_status(&server, &run, LIMIT, running);
    let captured = proxy.sniffed_identities();
    assert!(
        !captured.is_empty(),
        "the sniffer saw no identity: the test would prove nothing"
    );
    let mark = w.stderr.len();
    // A persistent sniffer: each captured identity announced 50 times,
    // some connections closed at once, some kept open for a while.
    let mut held = Vec::new();
    for round in 0..50 {
        for identity in &captured {
            let mut s = std::net::TcpStream::connect(zmtp::addr(&server.control)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&zmtp::greeting(false)).unwrap();
            s.write_all(&ready_with_identity(identity)).unwrap();
            if round % 5 == 0 {
                held.push(s);
            }
        }
    }
    // The worker's control connection still carries its messages: a
    // fresh request round trip through the server and the task's end.
    std::fs::write(&go, "").unwrap();
    let st = wait_status(&server, &run, LIMIT, finished);
    drop(held);
    assert_eq!(st["verdict"], "PASS", "{st:#}");
    let lines: Vec<String> = w.stderr.all()[mark..].to_vec();
    assert!(
        !lines.iter().any(|l| l.contains("server lost")),
        "the worker's session was cut: {lines:#?}"
    );
    assert!(
        server.proc.stderr.count("worker lost") == 0,
        "{:?}",
        server.proc.stderr.all()
    );
}

/// A READY command frame for a DEALER announcing `identity`.
fn ready_with_identity(identity: &[u8]) -> Vec<u8> {
    let mut body = vec![5u8];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&6u32.to_be_bytes());
    body.extend_from_slice(b"DEALER");
    body.push(8);
    body.extend_from_slice(b"Identity");
    body.extend_from_slice(&(identity.len() as u32).to_be_bytes());
    body.extend_from_slice(identity);
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// Finding 2: a peer subscribing 400 000 times with 1 KiB topics on the
/// events port makes the server keep at most its documented bounds; the
/// refusals are counted and the memory is not held.
#[test]
fn a_subscription_flood_on_the_events_port_is_bounded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let pid = server.proc.pid().as_raw();
    let before = zmtp::rss_kib(pid);
    let topic = vec![b'x'; 1024];
    let mut floods = Vec::new();
    for _ in 0..4 {
        let mut s = zmtp::handshake(&server.events, "SUB").unwrap();
        let mut subscribe = vec![1u8];
        subscribe.extend_from_slice(&topic);
        let frame = zmtp::frames(&[&subscribe]);
        let mut batch = Vec::with_capacity(frame.len() * 1000);
        for _ in 0..1000 {
            batch.extend_from_slice(&frame);
        }
        for _ in 0..100 {
            s.write_all(&batch).unwrap();
        }
        floods.push(s);
    }
    // Short, well-formed subscriptions too, past the per-connection count.
    let mut s = zmtp::handshake(&server.events, "SUB").unwrap();
    for i in 0..10_000 {
        let mut subscribe = vec![1u8];
        subscribe.extend_from_slice(format!("run/{i}").as_bytes());
        s.write_all(&zmtp::frames(&[&subscribe])).unwrap();
    }
    floods.push(s);
    // Any testrun's status carries the server's counters.
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:none",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    let refused = wait_for_counter(
        &server,
        &run,
        "subscriptions_refused",
        400_000 + 10_000 - 16,
    );
    let during = zmtp::rss_kib(pid);
    drop(floods);
    eprintln!(
        "server RSS: {before} KiB before, {during} KiB after 410 000 subscriptions ({refused} refused)"
    );
    assert!(
        during < before + 64 * 1024,
        "the flood grew the server from {before} to {during} KiB"
    );
    // Still serving.
    let out = submit(&server, &["workers"], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// Polls the server's counters (in any testrun's status) until `name`
/// reaches `at_least`; returns its value.
fn wait_for_counter(server: &ServerProc, run: &str, name: &str, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = 0;
    while Instant::now() < deadline {
        if let Some(st) = status_json(server, run) {
            last = st["counters"][name].as_u64().unwrap_or(0);
            if last >= at_least {
                return last;
            }
        }
        std::thread::sleep(Duration::from_millis(100)); // polling interval, bounded by the deadline
    }
    panic!("counter {name} reached only {last}, wanted {at_least}");
}

/// The PUB/SUB acceptance: a secured worker takes the server's life from
/// the signed heartbeats on its SUB (the server sends none on the control
/// connection), and notices a SIGSTOPped server within liveness ×
/// interval (+0.5 s).
#[test]
fn a_secured_worker_lives_on_signed_broadcasts_and_notices_a_stopped_server_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "500")]);
    let w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &["/bin/true"],
        &[],
    );
    // Four liveness windows of an idle worker: only the broadcasts keep
    // it believing in the server.
    let mark = w.stderr.len();
    assert!(
        w.stderr
            .wait_for_after(mark, "server lost", Duration::from_secs(6))
            .is_none(),
        "an idle secured worker lost a healthy server: {:?}",
        w.stderr.all()
    );
    let mark = w.stderr.len();
    server.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let lost = w.stderr.wait_for_after(mark, "server lost", LIMIT);
    server.proc.signal(nix::sys::signal::Signal::SIGCONT);
    let (_, lost) = lost.unwrap_or_else(|| panic!("never noticed: {:?}", w.stderr.all()));
    let silence = silence_ms(&lost);
    eprintln!("a SIGSTOPped server noticed after {silence} ms of silence (bound 1500 + 500)");
    assert!(silence <= 2000, "{lost}");
}

/// What a man in the middle of the events port can do: relay the real
/// server's signed heartbeats, and once the server is stopped, replay
/// every captured one, forge new ones under a key of its own (beats far
/// ahead) and send unsigned ones. None keeps the worker believing: it
/// notices the stopped server within liveness × interval (+0.5 s).
#[test]
fn replayed_or_forged_broadcasts_keep_no_worker_believing_in_a_stopped_server() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "500")]);
    let relay = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_ep = format!("tcp://{}", relay.local_addr().unwrap());
    drop(relay);
    let stopped = Arc::new(AtomicBool::new(false));
    let quit = Arc::new(AtomicBool::new(false));
    let captured: Arc<Mutex<Vec<Vec<bytes::Bytes>>>> = Arc::default();
    let attacker = {
        let (relay_ep, events) = (relay_ep.clone(), server.events.clone());
        let (stopped, quit, captured) = (stopped.clone(), quit.clone(), captured.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                use zeromq::prelude::*;
                let mut publisher = zeromq::PubSocket::new();
                publisher.bind(&relay_ep).await.unwrap();
                let mut sub = ots::transport::connect_sub(&events, &["hb"], Duration::from_secs(5))
                    .await
                    .unwrap();
                let forger = ots::security::broadcast::Announcer::generate();
                let mut beat = 1_000_000u64;
                while !quit.load(Ordering::SeqCst) {
                    if !stopped.load(Ordering::SeqCst) {
                        // Relay (and capture) what the real server signs.
                        if let Ok(Ok(m)) =
                            tokio::time::timeout(Duration::from_millis(50), sub.recv()).await
                        {
                            let frames = m.into_vec();
                            captured.lock().unwrap().push(frames.clone());
                            let _ = publisher.send(ots::transport::to_message(frames)).await;
                        }
                        continue;
                    }
                    let copies = captured.lock().unwrap().clone();
                    for frames in copies {
                        let _ = publisher
                            .send(ots::transport::to_message(frames.clone()))
                            .await;
                        // The same body under the forger's key, far ahead.
                        beat += 1;
                        let mut forged = frames.clone();
                        forged[3] = forger.sign(beat, &frames[1], &frames[2]);
                        let _ = publisher.send(ots::transport::to_message(forged)).await;
                        // And unsigned, as a plaintext server sends it.
                        let _ = publisher
                            .send(ots::transport::to_message(frames[..3].to_vec()))
                            .await;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await; // the attacker's pace
                }
            })
        })
    };
    let keys = server.keys.clone().unwrap();
    let w = start_worker_with(
        dir.path(),
        "w",
        "devicegroup:g",
        &server.control,
        &relay_ep,
        &["/bin/true"],
        &[],
        &keys.worker_toml("w"),
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
    // The relay carries the real heartbeats: the worker stays up.
    let deadline = Instant::now() + LIMIT;
    while captured.lock().unwrap().len() < 6 {
        assert!(Instant::now() < deadline, "nothing relayed");
        std::thread::sleep(Duration::from_millis(20)); // polling interval, bounded by the deadline
    }
    assert_eq!(w.stderr.count("server lost"), 0, "{:?}", w.stderr.all());
    let mark = w.stderr.len();
    server.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    stopped.store(true, Ordering::SeqCst);
    let lost = w.stderr.wait_for_after(mark, "server lost", LIMIT);
    server.proc.signal(nix::sys::signal::Signal::SIGCONT);
    quit.store(true, Ordering::SeqCst);
    attacker.join().unwrap();
    let (_, lost) = lost.unwrap_or_else(|| {
        panic!(
            "replayed or forged broadcasts kept the worker believing: {:?}",
            w.stderr.all()
        )
    });
    let silence = silence_ms(&lost);
    eprintln!("noticed after {silence} ms of silence despite replays and forgeries");
    assert!(silence <= 2000, "{lost}");
    assert!(
        w.stderr.count("is not from the server that welcomed us") > 0,
        "the forgeries were never seen: {:?}",
        w.stderr.all()
    );
}

/// A library client of `user` (allow-listed with role submit on first use).
fn client_as(server: &ServerProc, user: &str) -> (tokio::runtime::Runtime, ots::client::Client) {
    let keys = server.keys.as_ref().unwrap();
    let credentials = ots::security::Credentials::Noise {
        key: ots::security::KeyPair::read(&keys.user(user, "submit")).unwrap(),
        server: ots::security::PublicKey::read(&keys.server_pub()).unwrap(),
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let deadline = Instant::now() + LIMIT;
    loop {
        // Until the server has reloaded its allow-lists with the new user.
        match rt.block_on(ots::client::Client::connect(
            &server.control,
            Duration::from_secs(5),
            &credentials,
        )) {
            Ok(c) => return (rt, c),
            Err(e) => assert!(Instant::now() < deadline, "{user} never allowed: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Finding 3: bob knows the SHA-256 of alice's input (it is in her build
/// logs). Offering it tells him nothing (answered as a new upload, no
/// stored size), naming it in a submit is refused exactly as a hash
/// nobody stored, and only uploading the bytes himself lets him use it —
/// stored once.
#[test]
fn another_users_input_can_be_neither_probed_nor_named_by_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let conductor = script(
        dir.path(),
        "echo-input.sh",
        "cp \"$1/in/plan.bin\" \"$OTS_RESULTS_DIR/echo.bin\"\necho '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap(), "{inputs_dir}"],
        &[],
    );
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let plan = dir.path().join("plan.bin");
    std::fs::write(&plan, &data).unwrap();
    let sha = sha256_hex(&data);
    let size = data.len() as u64;
    let arg = format!("in/plan.bin={}", plan.display());
    let run_with_input = |user: &str| {
        server.as_user(user).submit(
            &[
                "run",
                "--device",
                "devicegroup:g",
                "--image",
                "i",
                "--packages",
                "p",
                "--input",
                &arg,
                "--wait",
            ],
            LIMIT,
        )
    };
    wait_allowed(&server, "alice");
    let out = run_with_input("alice");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let (rt, mut bob) = client_as(&server, "bob");
    let offer = |client: &mut ots::client::Client, sha: &str, size: u64| {
        rt.block_on(client.request(|request| ots::protocol::Body::InputOffer {
            request,
            sha256: sha.to_string(),
            size,
        }))
    };
    // The stored hash is answered exactly as a hash nobody stored: a new
    // upload from byte 0; with a wrong size (carol) too — no stored size.
    let nobody = sha256_hex(b"nobody stored this");
    let shape = |r: Result<
        (ots::protocol::Body, Option<bytes::Bytes>),
        ots::client::ClientError,
    >| match r {
        Ok((
            ots::protocol::Body::InputCredit {
                have,
                until,
                resume,
                ..
            },
            _,
        )) => (have, until, resume),
        other => panic!("an offer told {other:?}"),
    };
    let theirs = shape(offer(&mut bob, &sha, size));
    let unknown = shape(offer(&mut bob, &nobody, size));
    assert_eq!(
        theirs, unknown,
        "an offer tells a stored hash from an unknown one"
    );
    assert_eq!(theirs.0, 0, "{theirs:?}");
    let (_rt2, mut carol) = client_as(&server, "carol");
    let wrong = shape(
        rt.block_on(carol.request(|request| ots::protocol::Body::InputOffer {
            request,
            sha256: sha.clone(),
            size: size + 1,
        })),
    );
    assert_eq!(wrong.0, 0, "{wrong:?}");
    drop(carol);
    let named = |client: &mut ots::client::Client, sha: &str| {
        rt.block_on(client.submit(ots::protocol::TestrunRequest {
            lease: None,
            on_lease: None,
            series: None,
            device: ots::protocol::DeviceSpec::parse("devicegroup:g").unwrap(),
            image: "i".into(),
            packages: vec!["p".into()],
            distribution: Default::default(),
            timeout_secs: 60,
            options: Default::default(),
            queue_anyway: false,
            secrets: Default::default(),
            owner: None,
            inputs: vec![ots::protocol::InputFile {
                name: "in/plan.bin".into(),
                size,
                sha256: sha.to_string(),
            }],
            priority: Default::default(),
            devices: Vec::new(),
            notify: Vec::new(),
        }))
    };
    let refusal = |r: Result<_, ots::client::ClientError>| match r {
        Err(ots::client::ClientError::Refused { message, .. }) => {
            message.replace(&sha, "H").replace(&nobody, "H")
        }
        other => panic!("bob's submit naming a hash he did not upload was not refused: {other:?}"),
    };
    let theirs = refusal(named(&mut bob, &sha));
    let nobodys = refusal(named(&mut bob, &nobody));
    assert_eq!(
        theirs, nobodys,
        "the refusal tells a stored hash from an unknown one"
    );
    assert!(
        theirs.contains("not among the input files you uploaded"),
        "{theirs}"
    );
    drop(bob);

    // With the bytes, bob may: the content is stored once.
    let out = run_with_input("bob");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stored: Vec<_> = std::fs::read_dir(server.state_dir.join("inputs"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name())
        .collect();
    assert_eq!(stored, vec![std::ffi::OsString::from(&sha)], "{stored:?}");
}

fn server_with(dir: &std::path::Path, keys: &std::sync::Arc<Keys>) -> ServerProc {
    start_server_keyed(
        &dir.join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[],
        Some(keys.clone()),
    )
}

/// Finding 4: a worker key serves only the devices its allow-list entry
/// pins (`workers.d/NAME.device`); without a pin, the device it first
/// registered with. Announcing another is refused (`forbidden`, audited)
/// and the worker exits 78 saying why; `workers` shows the pin.
#[test]
fn a_worker_key_serves_only_the_device_it_is_pinned_to() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    keys.worker("evil");
    std::fs::write(keys.workers_dir().join("evil.device"), "devicegroup:evil\n").unwrap();
    let server = server_with(dir.path(), &keys);
    let mut evil = start_worker_with(
        dir.path(),
        "evil",
        "devicegroup:lab devicename:n900 deviceid:dev42",
        &server.control,
        &server.events,
        &["/bin/true"],
        &[],
        &keys.worker_toml("evil"),
    );
    assert_eq!(evil.wait_exit(LIMIT), Some(78), "{:?}", evil.stderr.all());
    assert!(
        evil.stderr
            .count("may serve only devices matching devicegroup:evil")
            > 0,
        "{:?}",
        evil.stderr.all()
    );
    assert!(audit_json(&server).contains("may serve only devices matching"));

    // Unpinned: the first registration's device is the pin.
    let mut w = start_worker_with(
        dir.path(),
        "w",
        "devicegroup:g",
        &server.control,
        &server.events,
        &["/bin/true"],
        &[],
        &keys.worker_toml("w"),
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
    let out = submit(&server, &["workers"], LIMIT);
    assert!(
        text(&out.stdout).contains("(may serve: devicegroup:g (its first registration))"),
        "{}",
        text(&out.stdout)
    );
    w.kill();
    std::fs::create_dir_all(dir.path().join("again")).unwrap();
    let mut moved = start_worker_with(
        &dir.path().join("again"),
        "w",
        "devicegroup:lab devicename:n900",
        &server.control,
        &server.events,
        &["/bin/true"],
        &[],
        &keys.worker_toml("w"),
    );
    assert_eq!(moved.wait_exit(LIMIT), Some(78), "{:?}", moved.stderr.all());
    assert!(
        moved.stderr.count("pinned to it") > 0,
        "{:?}",
        moved.stderr.all()
    );
    // The operator pins it elsewhere: now it may.
    let mark = server.proc.stderr.len();
    std::fs::write(
        keys.workers_dir().join("w.device"),
        "devicegroup:lab devicename:n9*\n",
    )
    .unwrap();
    assert!(server
        .proc
        .stderr
        .wait_for_after(mark, "allow-lists reloaded", LIMIT)
        .is_some());
    let moved = start_worker_with(
        &dir.path().join("again"),
        "w",
        "devicegroup:lab devicename:n900",
        &server.control,
        &server.events,
        &["/bin/true"],
        &[],
        &keys.worker_toml("w"),
    );
    assert!(
        wait_for_workers(&server, LIMIT, all_idle(&["w"])),
        "{:?}",
        moved.stderr.all()
    );
    let out = submit(&server, &["workers", "--json"], LIMIT);
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        listed[0]["pinned"], "devicegroup:lab devicename:n9*",
        "{listed:#}"
    );
}

/// "Also seen": one bad file in `users.d` kept the old lists in force, so
/// removing a worker's key did not revoke it, and at the next start the
/// server exited 78. Entries fail closed one by one: the removal applies
/// at once, the bad file denies only itself, the server starts with the
/// rest, and `--check-config` names the file.
#[test]
fn a_bad_allow_list_file_denies_only_itself_and_removals_still_apply() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let state = dir.path().join("server");
    let server = server_with(dir.path(), &keys);
    let w2 = start_worker_with(
        dir.path(),
        "w2",
        "devicegroup:g",
        &server.control,
        &server.events,
        &["/bin/true"],
        &[],
        &keys.worker_toml("w2"),
    );
    let _w1 = start_worker_with(
        dir.path(),
        "w1",
        "devicegroup:g",
        &server.control,
        &server.events,
        &["/bin/true"],
        &[],
        &keys.worker_toml("w1"),
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w1", "w2"])));
    let mark = server.proc.stderr.len();
    std::fs::write(keys.users_dir().join("broken.pub"), "not a key\n").unwrap();
    std::fs::remove_file(keys.workers_dir().join("w2.pub")).unwrap();
    assert!(
        server
            .proc
            .stderr
            .wait_for_after(mark, "key revoked", LIMIT)
            .is_some(),
        "removing w2.pub did not revoke it: {:?}",
        server.proc.stderr.all()
    );
    assert!(w2.stderr.wait_for("server lost", LIMIT).is_some());
    assert!(wait_for_workers(&server, LIMIT, |ws| ws.len() == 1 && ws[0]["name"] == "w1"));
    assert!(audit_json(&server).contains("broken.pub"));

    // --check-config names the file; the restarted server starts.
    let mut check = std::process::Command::new(bin("ots-server"));
    check.arg("--check-config").arg("--state-dir").arg(&state);
    for (k, v) in keys.server_env() {
        check.env(k, v);
    }
    let out = run_bounded(check, LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("allow-list entry denied")
            && text(&out.stdout).contains("broken.pub"),
        "{}",
        text(&out.stdout)
    );
    let (control, events) = (server.control.clone(), server.events.clone());
    drop(server);
    let restarted = start_server_keyed(&state, &control, &events, &[], Some(keys.clone()));
    assert!(restarted
        .proc
        .stderr
        .wait_for("allow-list entry denied", LIMIT)
        .is_some());
    assert!(wait_for_workers(&restarted, LIMIT, all_idle(&["w1"])));
}

/// Finding 5 (StrictModes): an allow-list directory others may write
/// stops the server at start, naming the path and the fix (exit 78).
#[test]
fn an_allow_list_directory_others_may_write_stops_the_server_naming_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    std::fs::set_permissions(keys.users_dir(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let mut cmd = std::process::Command::new(bin("ots-server"));
    cmd.args([
        "--control",
        "tcp://127.0.0.1:0",
        "--events",
        "tcp://127.0.0.1:0",
        "--state-dir",
    ])
    .arg(dir.path().join("server"));
    for (k, v) in keys.server_env() {
        cmd.env(k, v);
    }
    let out = run_bounded(cmd, LIMIT);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains(&keys.users_dir().display().to_string()) && err.contains("chmod go-w"),
        "{err}"
    );
}

/// Every file and folder below `root` with its mode.
fn modes(root: &std::path::Path) -> Vec<(std::path::PathBuf, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        out.push((p.clone(), meta.permissions().mode() & 0o7777));
        if meta.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                todo.push(e.path());
            }
        }
    }
    out
}

/// Finding 5: under the usual umask 022, the server's database and WAL,
/// task logs, result files, inputs, the worker's database, results and
/// input cache were 0644. Now nothing the server or worker keeps is
/// reachable by other local users, whatever the umask, and a state
/// directory made earlier with 0755 is closed at start.
#[test]
fn under_umask_022_nothing_the_server_or_worker_keeps_is_readable_by_others() {
    let dir = tempfile::tempdir().unwrap();
    // The children inherit it (the usual interactive umask).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    let state = dir.path().join("server");
    std::fs::create_dir_all(&state).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let server = start_server(&state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0", &[]);
    let conductor = script(
        dir.path(),
        "echo-input.sh",
        "cp \"$1/in/plan.bin\" \"$OTS_RESULTS_DIR/echo.bin\"\necho hello\necho '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap(), "{inputs_dir}"],
        &[],
    );
    let plan = dir.path().join("plan.bin");
    std::fs::write(&plan, b"a plan").unwrap();
    let arg = format!("in/plan.bin={}", plan.display());
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "p",
            "--input",
            &arg,
            "--wait",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let systemd = std::env::var_os("INVOCATION_ID").is_some();
    let mut seen = 0;
    for root in [state.clone(), dir.path().join("w")] {
        for (path, mode) in modes(&root) {
            seen += 1;
            assert_eq!(
                mode & 0o007,
                0,
                "{} is mode {mode:o}: others may reach it",
                path.display()
            );
            if !systemd {
                assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", path.display());
            }
        }
    }
    assert!(seen > 10, "nothing found to check");
    // The server's database, a task log and a stored input were among them.
    assert!(state.join("ots.db").exists());
    assert!(std::fs::read_dir(state.join("inputs")).unwrap().count() > 0);
}

/// "Also seen": a captured handshake message 1 replayed on new connections
/// cost a full handshake each (24 000 in 15 s, counted as successful).
/// Now a replay is refused for a hash lookup: answered `unauthenticated`,
/// counted as `security_handshakes_replayed`, and no handshake succeeds.
#[test]
fn a_replayed_handshake_message_is_refused_without_a_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let keys = server.keys.clone().unwrap();
    let user = ots::security::KeyPair::read(&keys.user("tester", "admin")).unwrap();
    let server_key = ots::security::PublicKey::read(&keys.server_pub()).unwrap();
    let (_, first) = ots::security::Initiator::start(&user, &server_key, &[]).unwrap();
    let handshake = zmtp::frames(&[ots::security::gate::HANDSHAKE_MARKER, &first]);
    let answer = |s: &mut std::net::TcpStream| zmtp::read_message(s).unwrap();
    // The genuine first use is answered with message 2.
    let mut s = zmtp::handshake(&server.control, "DEALER").unwrap();
    s.write_all(&handshake).unwrap();
    assert_eq!(answer(&mut s)[0], ots::security::gate::HANDSHAKE_MARKER);
    drop(s);
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:none",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    let before = current_status(&server, &run)["counters"]["security_handshakes"]
        .as_u64()
        .unwrap_or(0);
    const REPLAYS: u64 = 300;
    for _ in 0..REPLAYS {
        let mut s = zmtp::handshake(&server.control, "DEALER").unwrap();
        s.write_all(&handshake).unwrap();
        let reply = answer(&mut s);
        let body: serde_json::Value = rmp_serde::from_slice(&reply[1]).unwrap();
        assert_eq!(body["code"], "unauthenticated", "{body}");
        assert!(
            body["message"].as_str().unwrap().contains("replayed"),
            "{body}"
        );
    }
    let replayed = wait_for_counter(&server, &run, "security_handshakes_replayed", REPLAYS);
    let st = current_status(&server, &run);
    let after = st["counters"]["security_handshakes"].as_u64().unwrap_or(0);
    // The status requests themselves handshake (one connection each).
    assert!(
        after - before < 20,
        "replays were computed as handshakes: {before} → {after}"
    );
    eprintln!("{replayed} replays refused; handshakes {before} → {after} (status requests only)");
}

/// "Also seen": `--secret KEY=VALUE` shows the value to every local user
/// in /proc/PID/cmdline, and so does `{secret:NAME}` in a conductor's
/// argument vector. Secrets now come from a file, standard input or the
/// environment — none of them on a command line — and the worker's
/// `--check-config` warns about `{secret:…}` in the argument vector.
#[test]
fn secrets_reach_the_conductor_from_a_file_stdin_or_the_environment_never_a_command_line() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let conductor = script(
        dir.path(),
        "secrets.sh",
        "printf '%s|%s|%s' \"$OTS_SECRET_FROM_FILE\" \"$OTS_SECRET_FROM_STDIN\" \"$OTS_SECRET_FROM_ENV\" > \"$OTS_RESULTS_DIR/seen.txt\"\necho '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"",
    );
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    let file = dir.path().join("token");
    std::fs::write(&file, "file-secret-1\n").unwrap();
    let from_file = format!("from-file=@{}", file.display());
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args([
        "run",
        "--device",
        "devicegroup:g",
        "--image",
        "i",
        "--packages",
        "p",
        "--secret",
        &from_file,
        "--secret",
        "from-stdin=-",
        "--secret",
        "from-env",
        "--wait",
    ])
    .env("OTS_SERVER", &server.control)
    .env("OTS_SECRET_FROM_ENV", "env-secret-3");
    submit_env(&mut cmd, &server, &server.user);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", child.id())).unwrap_or_default();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"stdin-secret-2\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for value in ["file-secret-1", "stdin-secret-2", "env-secret-3"] {
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(value),
            "{value} on the command line"
        );
    }
    let stdout = text(&out.stdout);
    let run = stdout
        .strip_prefix("testrun ")
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no run id in {stdout}"));
    let seen = std::fs::read_to_string(
        server
            .state_dir
            .join("tasks")
            .join(format!("{run}.1"))
            .join("files")
            .join("seen.txt"),
    );
    assert_eq!(seen.unwrap(), "file-secret-1|stdin-secret-2|env-secret-3");

    // A conductor argv quoting a secret is warned about, with the fix.
    let cfg = dir.path().join("argv.toml");
    std::fs::write(
        &cfg,
        format!(
            "name = \"x\"\nserver = \"tcp://127.0.0.1:1\"\ndevice = \"devicegroup:g\"\nsecurity = \"none\"\nstate_dir = {:?}\n[conductor]\ncommand = [\"flash\", \"--token={{secret:api-token}}\"]\n",
            dir.path().join("x").display().to_string()
        ),
    )
    .unwrap();
    let mut check = std::process::Command::new(bin("ots-worker"));
    check.arg("--config").arg(&cfg).arg("--check-config");
    let out = run_bounded(check, LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("{secret:api-token}")
            && text(&out.stdout).contains("OTS_SECRET_API_TOKEN"),
        "{}",
        text(&out.stdout)
    );
}

/// Finding 5: a 0600 server key owned by another user was accepted. It is
/// refused at start (exit 78) naming the owner and the fix. Needs root to
/// hand the file to another uid (CI runs as root).
#[test]
fn a_server_key_owned_by_another_user_stops_the_server() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: only root can give a file to another uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let key = dir.path().join("foreign.key");
    std::fs::copy(keys.path().join("server.key"), &key).unwrap();
    nix::unistd::chown(&key, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let mut cmd = std::process::Command::new(bin("ots-server"));
    cmd.args([
        "--control",
        "tcp://127.0.0.1:0",
        "--events",
        "tcp://127.0.0.1:0",
        "--state-dir",
    ])
    .arg(dir.path().join("server"));
    for (k, v) in keys.server_env() {
        cmd.env(k, v);
    }
    cmd.env("OTS_SERVER_KEY", &key);
    let out = run_bounded(cmd, LIMIT);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{err}");
    assert!(
        err.contains("owned by uid 65534") && err.contains("chown"),
        "{err}"
    );
}
