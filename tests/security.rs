//! Issue 8: keys, handshakes, roles, revocation, replay, forged heartbeats
//! and secrets, with the real binaries over real sockets.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

#[test]
fn keygen_writes_a_private_key_only_its_owner_can_read_and_never_overwrites_one() {
    let dir = tempfile::tempdir().unwrap();
    for (program, args) in [
        ("ots-server", vec!["keygen"]),
        ("ots-worker", vec!["keygen"]),
        ("ots-submit", vec!["keygen"]),
    ] {
        let base = dir.path().join(program);
        let mut cmd = Command::new(bin(program));
        cmd.args(&args).arg(&base);
        let out = run_bounded(cmd, Duration::from_secs(10));
        assert_eq!(
            out.status.code(),
            Some(0),
            "{program}: {}",
            text(&out.stderr)
        );
        let key = base.with_extension("key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{program}");
        let public = ots::security::PublicKey::read(&base.with_extension("pub")).unwrap();
        assert!(text(&out.stdout).contains(&public.to_string()));
        let pair = ots::security::KeyPair::read(&key).unwrap();
        assert_eq!(pair.public, public);
        // A second keygen on the same path refuses to overwrite.
        let mut again = Command::new(bin(program));
        again.args(&args).arg(&base);
        let out = run_bounded(again, Duration::from_secs(10));
        assert_eq!(out.status.code(), Some(73), "{program}");
        assert!(
            text(&out.stderr).contains("keygen"),
            "{}",
            text(&out.stderr)
        );
    }
}

const LIMIT: Duration = Duration::from_secs(30);

fn argv() -> Vec<String> {
    example_conductor()
}

/// A worker configured with `key` (which may not be allow-listed).
fn worker_with_key(
    dir: &std::path::Path,
    name: &str,
    server: &ServerProc,
    key: &std::path::Path,
) -> Proc {
    let conductor = argv();
    let a: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let keys = server.keys.as_ref().unwrap();
    start_worker_with(
        dir,
        name,
        "devicegroup:g",
        &server.control,
        &server.events,
        &a,
        &[],
        &format!(
            "security = \"noise\"\nkey = {:?}\nserver_key = {:?}\n",
            key.display().to_string(),
            keys.server_pub().display().to_string()
        ),
    )
}

fn secured_server(dir: &std::path::Path, env: &[(&str, &str)]) -> ServerProc {
    start_server_keyed(
        &dir.join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        env,
        Some(Keys::new()),
    )
}

#[test]
fn an_unknown_worker_key_is_refused_gets_nothing_and_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[]);
    let stranger = dir.path().join("stranger");
    ots::security::KeyPair::generate().write(&stranger).unwrap();
    let w = worker_with_key(
        dir.path(),
        "ghost",
        &server,
        &stranger.with_extension("key"),
    );
    assert!(
        w.stderr
            .wait_for("refused this worker's handshake", LIMIT)
            .is_some(),
        "{:?}",
        w.stderr.all()
    );
    assert!(server
        .proc
        .stderr
        .wait_for("refused an unauthenticated connection", LIMIT)
        .is_some());
    // Nothing listed, nothing stored; the refusal is in the audit log.
    let out = submit(&server, &["workers", "--json"], LIMIT);
    assert_eq!(text(&out.stdout).trim(), "[]", "{}", text(&out.stderr));
    let log = audit_json(&server);
    assert!(
        log.contains("\"refused\"") && log.contains("is not allowed"),
        "{log}"
    );
    assert!(!log.contains("ghost"), "{log}");
    // A raw peer that speaks plaintext gets `unauthenticated`, nothing else.
    let mut peer = common::zmtp::handshake(&server.control, "DEALER").unwrap();
    peer.set_read_timeout(Some(LIMIT)).unwrap();
    use std::io::Write;
    peer.write_all(&common::zmtp::frames(&[
        b"\x81\xa1v\x01",
        b"\x81\xa4type\xa4ping",
    ]))
    .unwrap();
    let reply = common::zmtp::read_message(&mut peer).unwrap();
    let body = String::from_utf8_lossy(reply.last().unwrap()).to_string();
    assert!(body.contains("unauthenticated"), "{body}");
}

#[test]
fn a_known_key_claiming_another_workers_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[]);
    let keys = server.keys.clone().unwrap();
    let mut w = worker_with_key(dir.path(), "impostor", &server, &keys.worker("honest"));
    assert_eq!(w.wait_exit(LIMIT), Some(78), "{:?}", w.stderr.all());
    assert!(
        w.stderr.count("may register only as worker \"honest\"") > 0,
        "{:?}",
        w.stderr.all()
    );
    let out = submit(&server, &["workers", "--json"], LIMIT);
    assert_eq!(text(&out.stdout).trim(), "[]");
    assert!(audit_json(&server).contains("forbidden"));
}

#[test]
fn roles_decide_who_sees_cancels_and_drains_what() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[]);
    let keys = server.keys.clone().unwrap();
    keys.user("carol", "operator");
    for user in ["alice", "bob", "carol"] {
        wait_allowed(&server, user);
    }
    let conductor = argv();
    let a: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let _w = start_idle_worker(dir.path(), "w1", "devicegroup:g", &server, &a, &[]);
    // An operator drains the only worker: alice's run stays queued.
    let carol = server.as_user("carol");
    let out = carol.submit(&["drain", "w1"], LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let alice = server.as_user("alice");
    let out = alice.submit(
        &[
            "run",
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "smoke",
            "--queue-anyway",
            "--json",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let run = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["run"]
        .as_str()
        .unwrap()
        .to_string();
    // Alice sees her own run.
    assert_ne!(
        alice.submit(&["status", &run], LIMIT).status.code(),
        Some(77)
    );
    let bob = server.as_user("bob");
    for args in [
        vec!["status", &run],
        vec!["cancel", &run],
        vec!["drain", "w1"],
        vec!["audit"],
    ] {
        let out = bob.submit(&args, LIMIT);
        assert_eq!(
            out.status.code(),
            Some(77),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("user:bob"),
            "{}",
            text(&out.stderr)
        );
    }
    let out = carol.submit(&["cancel", &run], LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(carol.submit(&["audit"], LIMIT).status.code(), Some(77));
    assert!(server
        .proc
        .stderr
        .wait_for("forbidden: refused a request", LIMIT)
        .is_some());
    let log = audit_json(&server);
    for needle in [
        "\"submit\"",
        "\"cancel\"",
        "\"drain\"",
        "user:carol",
        "user:bob",
        "\"registered\"",
    ] {
        assert!(log.contains(needle), "{needle} not in {log}");
    }
}

#[test]
fn revoking_a_connected_worker_closes_its_session_within_a_second_and_drops_what_it_sends() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[("OTS_SERVER_LOST_GRACE_MS", "60000")]);
    let keys = server.keys.clone().unwrap();
    let go = dir.path().join("go");
    let conductor = script(
        dir.path(),
        "slow.sh",
        &format!(
            "echo started\nwhile [ ! -e {go:?} ]; do sleep 0.02; done\nmkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    let c = conductor.display().to_string();
    let w = start_idle_worker(
        dir.path(),
        "victim",
        "devicegroup:g",
        &server,
        &[c.as_str()],
        &[],
    );
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
    let mark = server.proc.stderr.len();
    let revoked_at = std::time::Instant::now();
    std::fs::remove_file(keys.workers_dir().join("victim.pub")).unwrap();
    let (_, line) = server
        .proc
        .stderr
        .wait_for_after(mark, "key revoked", LIMIT)
        .expect("never revoked");
    let took = revoked_at.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "revoked after {took:?}: {line}"
    );
    assert!(w.stderr.wait_for("server lost", LIMIT).is_some());
    // The conductor finishes; the worker's report cannot get in.
    std::fs::write(&go, "").unwrap();
    assert!(w
        .stderr
        .wait_for("refused this worker's handshake", LIMIT)
        .is_some());
    let st = wait_status(&server, &run, LIMIT, |st| {
        st["tasks"][0]["state"] == "queued"
    });
    assert!(st["tasks"][0]["verdict"].is_null(), "{st:#}");
    let out = submit(&server, &["workers", "--json"], LIMIT);
    assert_eq!(
        text(&out.stdout).trim(),
        "[]",
        "revoked worker still listed"
    );
    assert!(audit_json(&server).contains("\"revoked\""));
}

#[test]
fn a_captured_ciphertext_replayed_on_a_new_connection_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[]);
    let creds = credentials(&server);
    let ots::security::Credentials::Noise {
        key,
        server: server_key,
    } = &creds
    else {
        unreachable!()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use ots::protocol::{encode, Body, Header};
        use zeromq::prelude::*;
        let ping = Body::Ping { request: 7 };
        let header = Header {
            v: 1,
            class: ping.class(),
            mandatory: false,
            seq: 7,
            task: None,
            epoch: None,
        };
        let plain = encode(&header, &ping, None);
        let timeout = Duration::from_secs(5);
        // A genuine exchange, captured.
        let mut first = ots::transport::connect_dealer(&server.control, timeout)
            .await
            .unwrap();
        let (mut chan, _) = ots::security::link::handshake(&mut first, key, server_key, timeout)
            .await
            .unwrap();
        let captured = chan.seal(&plain);
        first
            .send(ots::transport::to_message(captured.clone()))
            .await
            .unwrap();
        let pong = chan.open(first.recv().await.unwrap().into_vec()).unwrap();
        assert!(String::from_utf8_lossy(&pong[1]).contains("pong"));
        // Replayed on a new connection, after its own handshake.
        let mut second = ots::transport::connect_dealer(&server.control, timeout)
            .await
            .unwrap();
        let (_, _) = ots::security::link::handshake(&mut second, key, server_key, timeout)
            .await
            .unwrap();
        second
            .send(ots::transport::to_message(captured.clone()))
            .await
            .unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(2), second.recv())
                .await
                .is_err(),
            "the replay got an answer"
        );
        // …and without a handshake: refused as unauthenticated.
        let mut third = ots::transport::connect_dealer(&server.control, timeout)
            .await
            .unwrap();
        third
            .send(ots::transport::to_message(captured))
            .await
            .unwrap();
        let reply = tokio::time::timeout(timeout, third.recv())
            .await
            .unwrap()
            .unwrap();
        let env = ots::protocol::decode(reply.into_vec()).unwrap();
        assert!(matches!(
            env.body,
            Body::Error {
                code: ots::protocol::ErrorCode::Unauthenticated,
                ..
            }
        ));
    });
    assert!(server
        .proc
        .stderr
        .wait_for("does not authenticate", LIMIT)
        .is_some());
}

#[test]
fn a_heartbeat_forged_on_the_events_port_does_not_keep_a_worker_believing_in_a_hung_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "500")]);
    // Learn the real incarnation, then forge its heartbeats on a port the
    // worker is told is the events port.
    let incarnation = server
        .proc
        .stderr
        .wait_for("server listening", LIMIT)
        .unwrap()
        .split("server=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    let fake = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_ep = format!("tcp://{}", fake.local_addr().unwrap());
    drop(fake);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forger = {
        let (ep, stop, inc) = (fake_ep.clone(), stop.clone(), incarnation.clone());
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                use zeromq::prelude::*;
                let mut publisher = zeromq::PubSocket::new();
                publisher.bind(&ep).await.unwrap();
                let body = ots::protocol::Body::ServerHeartbeat {
                    server: inc,
                    heartbeat_ms: 500,
                    sent_ms: 0,
                };
                let header = ots::protocol::Header {
                    v: 1,
                    class: body.class(),
                    mandatory: false,
                    seq: 0,
                    task: None,
                    epoch: None,
                };
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let mut frames = vec![bytes::Bytes::from_static(b"hb")];
                    frames.extend(ots::protocol::encode(&header, &body, None));
                    let _ = publisher.send(ots::transport::to_message(frames)).await;
                    tokio::time::sleep(Duration::from_millis(100)).await; // the forger's pace
                }
            })
        })
    };
    let keys = server.keys.clone().unwrap();
    let conductor = argv();
    let a: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let w = start_worker_with(
        dir.path(),
        "w",
        "devicegroup:g",
        &server.control,
        &fake_ep,
        &a,
        &[],
        &keys.worker_toml("w"),
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["w"])));
    let mark = w.stderr.len();
    server.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let lost = w
        .stderr
        .wait_for_after(mark, "server lost", Duration::from_secs(10));
    server.proc.signal(nix::sys::signal::Signal::SIGCONT);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    forger.join().unwrap();
    assert!(
        lost.is_some(),
        "forged heartbeats kept the worker believing: {:?}",
        w.stderr.all()
    );
}

#[test]
fn a_secret_never_appears_in_status_events_the_stored_log_the_audit_log_or_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[]);
    let secret = "s3cr3t-Tok3n-9f8e7d";
    let got = dir.path().join("got");
    let conductor = script(
        dir.path(),
        "leaky.sh",
        &format!(
            "echo \"the token is $OTS_SECRET_API_TOKEN\"\necho \"argv: $1\"\nprintf '%s' \"$OTS_SECRET_API_TOKEN\" > {got:?}\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    let c = conductor.display().to_string();
    let _w = start_idle_worker(
        dir.path(),
        "w",
        "devicegroup:g",
        &server,
        &[c.as_str(), "{secret:api_token}"],
        &[],
    );
    let secret_arg = format!("api_token={secret}");
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
            "--secret",
            &secret_arg,
            "--follow",
        ],
        LIMIT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // The conductor got it…
    assert_eq!(std::fs::read_to_string(&got).unwrap(), secret);
    let run = "r1";
    let mut seen = vec![text(&out.stdout)];
    for args in [
        vec!["status", run, "--json"],
        vec!["logs", run],
        vec!["audit"],
    ] {
        let out = submit(&server, &args, LIMIT);
        seen.push(text(&out.stdout));
    }
    // Masked where the conductor printed it (and in the argv line).
    assert!(
        seen[2].contains("the token is [secret:api_token]"),
        "{}",
        seen[2]
    );
    assert!(seen[2].contains("argv: [secret:api_token]"), "{}", seen[2]);
    // …and nothing the server shows, stores or logs has it.
    for entry in walk(&server.state_dir) {
        seen.push(String::from_utf8_lossy(&std::fs::read(entry).unwrap_or_default()).to_string());
    }
    seen.extend(server.proc.stderr.all());
    for s in &seen {
        assert!(!s.contains(secret), "the secret leaked: {s}");
    }
    // A server without security refuses secrets outright.
    let plain = start_server_insecure(
        &dir.path().join("plain"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[],
    );
    let out = submit(
        &plain,
        &[
            "run",
            "--device",
            "devicegroup:g",
            "--image",
            "i",
            "--packages",
            "p",
            "--secret",
            &secret_arg,
            "--queue-anyway",
        ],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("plain text"),
        "{}",
        text(&out.stderr)
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

#[test]
fn a_private_key_others_can_read_stops_server_and_worker_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let key = keys.path().join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = Command::new(bin("ots-server"));
    cmd.args([
        "--control",
        "tcp://127.0.0.1:0",
        "--events",
        "tcp://127.0.0.1:0",
        "--state-dir",
    ])
    .arg(dir.path().join("s"))
    .envs(keys.server_env());
    let out = run_bounded(cmd, LIMIT);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("chmod 600"),
        "{}",
        text(&out.stderr)
    );
    let wkey = keys.worker("w");
    std::fs::set_permissions(&wkey, std::fs::Permissions::from_mode(0o640)).unwrap();
    let conductor = argv();
    let a: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let mut w = start_worker_with(
        dir.path(),
        "w",
        "devicegroup:g",
        "tcp://127.0.0.1:1",
        "tcp://127.0.0.1:2",
        &a,
        &[],
        &keys.worker_toml("w"),
    );
    assert_eq!(w.wait_exit(LIMIT), Some(78));
    assert!(w.stderr.count("chmod 600") > 0, "{:?}", w.stderr.all());
}

/// The transport cipher is negotiated inside the handshake: AES-256-GCM
/// where both ends have AES in hardware (this machine, if its CPU says
/// so), ChaCha20-Poly1305 where either does not — here a worker told to
/// keep to it (`OTS_TRANSPORT_CIPHER`), as a machine without AES would.
/// Both kinds of connection run a testrun on the same server.
#[test]
fn the_transport_cipher_is_aes_gcm_where_both_ends_have_aes_and_chacha_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let server = secured_server(dir.path(), &[]);
    let keys = server.keys.clone().unwrap();
    let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| {
        flags
            .lines()
            .filter(|l| l.starts_with("flags") || l.starts_with("Features"))
            .any(|l| l.split_whitespace().any(|w| w == f))
    };
    let aes_here = (has("aes") && has("pclmulqdq")) || (has("aes") && has("pmull"));
    let conductor = script(
        dir.path(),
        "ok.sh",
        "mkdir -p \"$OTS_RESULTS_DIR\"\necho '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"\n",
    ).display().to_string();
    let a = [conductor.as_str()];
    let mut workers = Vec::new();
    for (name, env) in [
        ("fast", vec![]),
        ("plain", vec![("OTS_TRANSPORT_CIPHER", "ChaChaPoly")]),
    ] {
        workers.push(start_worker_with(
            dir.path(),
            name,
            &format!("devicegroup:{name}"),
            &server.control,
            &server.events,
            &a,
            &env,
            &keys.worker_toml(name),
        ));
    }
    assert!(wait_for_workers(
        &server,
        LIMIT,
        all_idle(&["fast", "plain"])
    ));
    for group in ["fast", "plain"] {
        let run = submit_run(
            &server,
            &[
                "--device",
                &format!("devicegroup:{group}"),
                "--image",
                "i",
                "--packages",
                "p",
            ],
        );
        let st = wait_status(&server, &run, LIMIT, finished);
        assert_eq!(st["verdict"], "PASS", "{st:#}");
    }
    let st = current_status(&server, "r1");
    let counter = |n: &str| st["counters"][n].as_u64().unwrap_or(0);
    eprintln!(
        "AES in hardware here: {aes_here}; channels: AESGCM {}, ChaChaPoly {}",
        counter("security_channels_aesgcm"),
        counter("security_channels_chachapoly")
    );
    // The plain worker, and every client connection of ots-submit if
    // this machine has no AES.
    assert!(counter("security_channels_chachapoly") >= 1, "{st:#}");
    if aes_here {
        assert!(counter("security_channels_aesgcm") >= 1, "{st:#}");
    } else {
        assert_eq!(counter("security_channels_aesgcm"), 0, "{st:#}");
    }
}
