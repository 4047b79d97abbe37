//! Issue 24, first part: the server's state in PostgreSQL, against a
//! real PostgreSQL the harness starts itself (`common::pg`). The same
//! batches give the same snapshot as SQLite; the schema is migrated,
//! a newer or foreign one refused; errors name what to fix; a server
//! whose database connection is cut connects again.

mod common;

use common::http;
use common::*;
use ots::protocol::{RunState, Verdict};
use ots::server::db::{Changes, Db, HistoryRow, Snapshot};
use ots::server::pg::{PgDb, PgSettings};
use ots::server::store::history::{Found, RunIndex};
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(60);

fn settings(url: &str) -> PgSettings {
    PgSettings {
        url: url.to_string(),
        password_file: None,
        ca_file: None,
        statement_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(10),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Testrun `i` of a batch: odd ones ended (keeping `i` bytes), every
/// third in group `arm`.
fn index(i: usize) -> RunIndex {
    let ended = i % 2 == 1;
    let summary = ots::protocol::RunSummary {
        run: format!("r{i}"),
        state: if ended {
            RunState::Finished
        } else {
            RunState::Queued
        },
        verdict: ended.then_some(Verdict::Pass),
        owner: Some("ann".into()),
        device: ots::protocol::DeviceSpec::parse("devicegroup:g").unwrap(),
        tasks: 1,
        submitted_ms: i as u64,
        ended_ms: ended.then_some(1000 + i as u64),
    };
    RunIndex {
        num: i as u64,
        kind: "r".into(),
        state: ots::server::store::history::state_token(summary.state),
        verdict: summary
            .verdict
            .map(ots::server::store::history::verdict_token),
        owner: summary.owner.clone(),
        groups: if i.is_multiple_of(3) {
            ",arm,".into()
        } else {
            ",g,".into()
        },
        live: !ended,
        ended_ms: summary.ended_ms,
        kept_bytes: ended.then_some(i as u64),
        summary: rmp_serde::to_vec_named(&summary).unwrap(),
        series: Some("s".into()),
        image: Some("img".into()),
    }
}

fn batch(n: usize) -> Changes {
    Changes {
        runs: (0..n)
            .map(|i| (format!("r{i}"), vec![i as u8; 3], index(i)))
            .collect(),
        tasks: (0..n)
            .map(|i| (format!("r{i}.1"), format!("r{i}"), vec![7; i % 5]))
            .chain(std::iter::once((
                "r0.1".to_string(),
                "r0".to_string(),
                b"later".to_vec(),
            )))
            .collect(),
        workers: vec![
            ("w1".into(), b"worker".to_vec()),
            ("w2".into(), b"gone".to_vec()),
        ],
        removed_workers: vec!["w2".into()],
        history: vec![HistoryRow {
            task: "r0.1".into(),
            at_ms: 5,
            state: "queued".into(),
            attempt: 0,
            worker: None,
            reason: Some("why".into()),
        }],
        files: vec![("r0.1".into(), "a.xml".into(), 10, "ab".repeat(32))],
        meta: vec![("next_run".into(), n.to_string())],
        input_owners: vec![
            ("cd".repeat(32), "ann".into()),
            ("cd".repeat(32), "ann".into()),
        ],
        notifications: vec![
            ("msg_1".into(), Some("r0".into()), b"n".to_vec()),
            ("msg_2".into(), None, b"m".to_vec()),
        ],
        ..Changes::default()
    }
}

fn sorted(mut s: Snapshot) -> Snapshot {
    s.runs.sort();
    s.tasks.sort();
    s.workers.sort();
    s.meta.sort();
    s.input_owners.sort();
    s.notifications.sort();
    s
}

/// The same batches into SQLite and PostgreSQL read back alike.
#[test]
fn the_same_batches_give_the_same_snapshot_on_both_backends() {
    let url = pg::cluster().database();
    let dir = tempfile::tempdir().unwrap();
    let mut lite = Db::open(dir.path()).unwrap();
    rt().block_on(async {
        let mut db = PgDb::open(&settings(&url)).await.unwrap();
        for b in [batch(50), batch(3)] {
            lite.commit(&b).unwrap();
            db.commit(&b).await.unwrap();
        }
        // Forgetting a delivery, pruning files.
        let more = Changes {
            removed_notifications: vec!["msg_2".into()],
            pruned_tasks: vec!["r0.1".into()],
            ..Changes::default()
        };
        lite.commit(&more).unwrap();
        db.commit(&more).await.unwrap();
        let (a, b) = (
            sorted(lite.load().unwrap()),
            sorted(db.load().await.unwrap()),
        );
        assert_eq!(a.runs, b.runs);
        assert_eq!(a.tasks, b.tasks);
        assert_eq!(a.workers, b.workers);
        // PostgreSQL's meta also names the database (`database_id`).
        let b_meta: Vec<_> = b
            .meta
            .iter()
            .filter(|(k, _)| k != "database_id")
            .cloned()
            .collect();
        assert_eq!(a.meta, b_meta);
        assert_eq!(a.input_owners, b.input_owners);
        assert_eq!(a.notifications, b.notifications);
        // A start loads the live testruns (and their tasks) only, and
        // sums of the rest.
        assert_eq!(b.runs.len(), 25);
        assert_eq!(
            (a.kept_bytes, a.oldest_kept_ms, a.file_bytes, a.highest_run),
            (b.kept_bytes, b.oldest_kept_ms, b.file_bytes, b.highest_run)
        );
        assert_eq!(
            (b.kept_bytes, b.oldest_kept_ms, b.highest_run),
            (625, Some(1001), 49)
        );
        // The history readers answer alike.
        let reader = ots::server::store::history::SqliteHistory::open(lite.path()).unwrap();
        let mut pg_reader = ots::server::store::pg::history::PgHistory::open(&settings(&url))
            .await
            .unwrap();
        use ots::server::store::history::{Recall, RunQuery};
        for recall in [
            Recall::Runs(vec!["r3".into(), "r0".into(), "r404".into()]),
            Recall::OldestKept(4),
            Recall::EndedLeases(5),
            Recall::List(RunQuery {
                newest: 40,
                state: Some("finished".into()),
                owner: Some("ann".into()),
                verdict: Some("PASS".into()),
                devicegroup: Some("arm".into()),
                limit: 3,
            }),
            Recall::List(RunQuery {
                newest: 60,
                state: None,
                owner: None,
                verdict: None,
                devicegroup: None,
                limit: 100,
            }),
        ] {
            let mut x = reader.recall(&recall).unwrap();
            let mut y = pg_reader.recall(&recall).await.unwrap();
            if let (Found::Rows(x), Found::Rows(y)) = (&mut x, &mut y) {
                x.tasks.sort();
                y.tasks.sort();
            }
            assert_eq!(x, y, "{recall:?}");
            if let (Recall::List(q), Found::List(runs)) = (&recall, &x) {
                if q.devicegroup.is_some() {
                    let ids: Vec<&str> = runs.iter().map(|r| r.run.as_str()).collect();
                    assert_eq!(ids, ["r39", "r33", "r27"]);
                } else {
                    assert_eq!(runs.len(), 49, "numbers from 1");
                }
            }
            if let (Recall::OldestKept(_), Found::Rows(rows)) = (&recall, &x) {
                let ids: Vec<&str> = rows.runs.iter().map(|r| r.0.as_str()).collect();
                assert_eq!(ids, ["r1", "r3", "r5", "r7"]);
                assert_eq!(rows.next_kept_ms, Some(1009));
            }
        }
        assert!(b
            .tasks
            .iter()
            .any(|(id, body)| id == "r0.1" && body == b"later"));
        assert_eq!(b.workers.len(), 1);
        assert_eq!(
            lite.history("r0.1").unwrap(),
            db.history("r0.1").await.unwrap()
        );
        assert_eq!(db.history("r0.1").await.unwrap().len(), 2);
    });
}

/// An older schema is migrated, a newer one and a foreign database are
/// refused naming why; a missing database says to create it.
#[test]
fn schemas_are_migrated_and_newer_or_foreign_ones_refused() {
    let c = pg::cluster();
    rt().block_on(async {
        let old = c.database();
        let db = old.rsplit('/').next().unwrap().to_string();
        let mut sql = String::new();
        for v in 1..=3 {
            sql.push_str(&ots::server::db::migration(v, ots::server::db::Dialect::Postgres));
        }
        sql.push_str("INSERT INTO meta VALUES ('schema_version', '3');");
        c.psql(&db, &sql).unwrap();
        let opened = PgDb::open(&settings(&old)).await.unwrap();
        let v = c.psql(&db, "SELECT value FROM meta WHERE key = 'schema_version'").unwrap();
        assert_eq!(v, ots::server::db::SCHEMA_VERSION.to_string());
        drop(opened);

        let newer = c.database();
        let name = newer.rsplit('/').next().unwrap().to_string();
        c.psql(&name, "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL); INSERT INTO meta VALUES ('schema_version', '999');")
            .unwrap();
        let e = PgDb::open(&settings(&newer)).await.err().unwrap().to_string();
        assert!(e.contains("999") && e.contains("newer"), "{e}");

        let foreign = c.database();
        let name = foreign.rsplit('/').next().unwrap().to_string();
        c.psql(&name, "CREATE TABLE photos (id INT)").unwrap();
        let e = PgDb::open(&settings(&foreign)).await.err().unwrap().to_string();
        assert!(e.contains("photos") && e.contains("database of its own"), "{e}");

        let e = PgDb::open(&settings(&c.url("no_such_db")))
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("createdb"), "{e}");
    });
}

/// A real server keeps its state in PostgreSQL: a testrun runs, the
/// server is SIGKILLed and restarted, the testrun is still there.
#[test]
fn a_server_on_postgres_keeps_its_testruns_across_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let url = pg::cluster().database();
    let env = [("OTS_SERVER_DATABASE", url.as_str())];
    let mut server = start_fresh_server(dir.path(), &env);
    assert!(
        server
            .proc
            .stderr
            .all()
            .iter()
            .any(|l| l.contains("PostgreSQL")),
        "the start says where the state is: {:?}",
        server.proc.stderr.all()
    );
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let _w = start_idle_worker(dir.path(), "pg-w1", "devicegroup:pg", &server, &argv, &[]);
    let image = repo()
        .join("examples/images/demo.img")
        .display()
        .to_string();
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:pg",
            "--image",
            &image,
            "--packages",
            "smoke",
        ],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    assert_eq!(st["verdict"], "PASS");
    let (control, events, state) = (
        server.control.clone(),
        server.events.clone(),
        server.state_dir.clone(),
    );
    server.proc.kill();
    let server = start_server(&state, &control, &events, &env);
    let again = current_status(&server, &run);
    assert_eq!(again["verdict"], "PASS");
    assert_eq!(again["tasks"], st["tasks"]);
    let runs = pg::cluster()
        .psql(url.rsplit('/').next().unwrap(), "SELECT count(*) FROM runs")
        .unwrap();
    assert_eq!(runs, "1");
}

/// The database connection cut under a running server (its backend
/// terminated, as a database restart or a proxy does): the next commit
/// connects again and goes through; the server keeps serving, and its
/// log names the database and the reconnect (issue 34: a lost connection
/// no longer stops the server).
#[test]
fn a_server_whose_database_connection_is_cut_connects_again() {
    let dir = tempfile::tempdir().unwrap();
    let c = pg::cluster();
    let url = c.database();
    let db = url.rsplit('/').next().unwrap().to_string();
    let mut server = start_fresh_server(dir.path(), &[("OTS_SERVER_DATABASE", url.as_str())]);
    c.psql(
        "postgres",
        &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}' AND application_name = 'ots-server'"),
    )
    .unwrap();
    // The next commit (a submit) meets the closed connection, and waits
    // for a new one.
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
    assert_eq!(current_status(&server, &run)["state"], "queued");
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM runs").unwrap(),
        "1",
        "committed"
    );
    assert!(
        server.proc.child.try_wait().unwrap().is_none(),
        "still serving"
    );
    let log = server.proc.stderr.all().join("\n");
    assert!(
        log.contains("PostgreSQL connection lost") && log.contains(&db),
        "{log}"
    );
    assert!(log.contains("PostgreSQL connection made again"), "{log}");
    server.proc.kill();
}

const LEASE: [(&str, &str); 3] = [
    ("OTS_SERVER_LEASE_TTL", "2s"),
    ("OTS_SERVER_LEASE_RENEW", "500ms"),
    ("OTS_SERVER_HEARTBEAT_INTERVAL_MS", "250"),
];

/// An `ots-server` on `url` with its own state directory, not waited for
/// (a standby prints no "server listening" until it leads).
fn spawn_server(dir: &std::path::Path, name: &str, url: &str) -> Proc {
    spawn_server_env(dir, name, url, &[])
}

fn spawn_server_env(dir: &std::path::Path, name: &str, url: &str, extra: &[(&str, &str)]) -> Proc {
    let any = "tcp://127.0.0.1:0";
    spawn_with(&dir.join(name), name, url, (any, any), extra)
}

/// An `ots-server` on `url` with the lease timing of these tests, its
/// state in `state`, bound to (control, events) once it leads.
fn spawn_with(
    state: &std::path::Path,
    name: &str,
    url: &str,
    (control, events): (&str, &str),
    extra: &[(&str, &str)],
) -> Proc {
    let mut cmd = std::process::Command::new(bin("ots-server"));
    for (k, v) in keys().server_env().into_iter().chain(
        LEASE
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string())),
    ) {
        cmd.env(k, v);
    }
    cmd.env("OTS_SERVER_DATABASE", url)
        .arg("--control")
        .arg(control)
        .arg("--events")
        .arg(events)
        .arg("--state-dir")
        .arg(state);
    Proc::spawn(name, cmd)
}

/// `ots-submit leader --server LIST --json` with `server`'s keys: the
/// exit status and each endpoint's standing.
fn leader_of(server: &ServerProc, list: &str) -> (i32, Vec<serde_json::Value>) {
    let out = std::process::Command::new(bin("ots-submit"))
        .args([
            "leader",
            "--json",
            "--connect-timeout",
            "1s",
            "--server",
            list,
        ])
        .envs(submit_envs(server))
        .output()
        .unwrap();
    let standings = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code().unwrap_or(-1), standings)
}

/// SIGKILLs `leader`; the standby serves within lease_ttl + 2 s (the
/// test's lease is 2 s) under `epoch`. What took how long is printed.
fn fail_over(
    leader: &mut ServerProc,
    standby: Proc,
    state: std::path::PathBuf,
    epoch: Option<&str>,
    what: &str,
) -> ServerProc {
    let killed = std::time::Instant::now();
    leader.proc.kill();
    let next = as_server(standby, state);
    let took = killed.elapsed();
    eprintln!(
        "{what}: served {} ms after the leader was SIGKILLed (lease_ttl 2 s)",
        took.as_millis()
    );
    assert!(took < Duration::from_secs(4), "took {took:?}");
    if let Some(epoch) = epoch {
        let line = next
            .proc
            .stderr
            .wait_for("leader: this server holds the lease", LIMIT)
            .unwrap();
        assert_eq!(field(&line, "epoch"), epoch, "{line}");
    }
    next
}

/// The running server a [`Proc`] became once it logged "server listening".
fn as_server(proc: Proc, state_dir: std::path::PathBuf) -> ServerProc {
    let line = proc
        .stderr
        .wait_for("server listening", LIMIT)
        .unwrap_or_else(|| panic!("never served: {:?}", proc.stderr.all()));
    ServerProc {
        control: field(&line, "control"),
        events: field(&line, "events"),
        proc,
        state_dir,
        keys: Some(keys()),
        user: "tester".into(),
    }
}

/// Two servers on one database: the second is a standby (answering
/// `not_leader` naming the leader) until the leader is SIGKILLed, then
/// serves within lease_ttl + 2 s, with the testruns the leader had.
#[test]
fn a_standby_takes_over_within_the_lease_when_the_leader_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let url = pg::cluster().database();
    let leader = as_server(spawn_server(dir.path(), "a", &url), dir.path().join("a"));
    assert!(
        leader
            .proc
            .stderr
            .count("leader: this server holds the lease")
            == 1
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let standby = spawn_server_env(dir.path(), "b", &url, &[("OTS_SERVER_METRICS", &metrics)]);
    assert!(
        standby
            .stderr
            .wait_for("standby: another server holds the lease", LIMIT)
            .is_some(),
        "{:?}",
        standby.stderr.all()
    );
    assert_eq!(
        standby.stderr.count("server listening"),
        0,
        "a standby serves nothing"
    );
    let standby_control = field(
        &standby
            .stderr
            .wait_for("answering not_leader", LIMIT)
            .expect("the standby answers on its control endpoint"),
        "control",
    );
    let run = submit_run(
        &leader,
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
    // `leader` asks every endpoint: the leader answers with its lease, a
    // port nobody serves does not answer.
    let nobody = format!("tcp://127.0.0.1:{}", free_port());
    let (code, standings) = leader_of(&leader, &format!("{},{nobody}", leader.control));
    assert_eq!(code, 0, "{standings:?}");
    assert_eq!(standings[0]["state"], "leader", "{standings:?}");
    assert_eq!(standings[0]["lease"]["epoch"], 1, "{standings:?}");
    assert_eq!(standings[0]["lease"]["endpoint"], leader.control.as_str());
    assert_eq!(standings[1]["state"], "no answer", "{standings:?}");
    // A standby answers at once, naming the leader; a client given it
    // first goes on to the next server.
    let (code, standings) = leader_of(&leader, &format!("{standby_control},{}", leader.control));
    assert_eq!(code, 0, "{standings:?}");
    assert_eq!(standings[0]["state"], "standby", "{standings:?}");
    let said = standings[0]["error"].as_str().unwrap();
    assert!(said.contains("leads (epoch 1"), "{said}");
    assert_eq!(standings[1]["state"], "leader", "{standings:?}");
    let started = std::time::Instant::now();
    let out = std::process::Command::new(bin("ots-submit"))
        .args([
            "status",
            &run,
            "--json",
            "--connect-timeout",
            "5s",
            "--server",
        ])
        .arg(format!("{standby_control}, {}", leader.control))
        .envs(submit_envs(&leader))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the standby's answer was waited out ({:?})",
        started.elapsed()
    );
    let a_control = leader.control.clone();
    let mut leader = leader;
    let b = fail_over(
        &mut leader,
        standby,
        dir.path().join("b"),
        Some("2"),
        "standby",
    );
    let (code, standings) = leader_of(&b, &format!("{a_control}, {}", b.control));
    assert_eq!(code, 0, "{standings:?}");
    assert_eq!(standings[0]["state"], "no answer", "{standings:?}");
    assert_eq!(standings[1]["state"], "leader", "{standings:?}");
    assert_eq!(standings[1]["lease"]["epoch"], 2, "{standings:?}");
    assert!(standings[1]["lease"]["since_ms"].as_u64().unwrap() > 0);
    let st = current_status(&b, &run);
    assert_eq!(st["state"], "queued", "{st:#}");
    let page = http::get(&format!("http://{metrics}"), "/metrics", None).text();
    assert!(
        page.contains("ots_leader 1") && page.contains("ots_lease_epoch 2"),
        "{page}"
    );
}

/// A leader frozen (SIGSTOP) past its lease while a standby takes over
/// does not act when it wakes: its commit is refused by the epoch and
/// it steps down (a standby in the same process); the request it took answers nothing and
/// leaves nothing in the database.
#[test]
fn a_leader_frozen_past_its_lease_steps_down_when_it_wakes() {
    let dir = tempfile::tempdir().unwrap();
    let c = pg::cluster();
    let url = c.database();
    let db = url.rsplit('/').next().unwrap().to_string();
    let mut leader = as_server(spawn_server(dir.path(), "a", &url), dir.path().join("a"));
    let standby = spawn_server(dir.path(), "b", &url);
    assert!(standby.stderr.wait_for("standby:", LIMIT).is_some());
    leader.proc.signal(nix::sys::signal::Signal::SIGSTOP);
    let b = as_server(standby, dir.path().join("b"));
    // A client of the frozen leader: its submit waits in the socket.
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args([
        "run",
        "--device",
        "devicegroup:none",
        "--image",
        "i",
        "--packages",
        "p",
        "--queue-anyway",
        "--connect-timeout",
        "2s",
    ])
    .env("OTS_SERVER", &leader.control)
    .envs(submit_envs(&leader));
    let client = Proc::spawn("late-client", cmd);
    // Its connection is accepted by the kernel; give it its handshake
    // bytes before the leader wakes (poll the socket's queue, bounded).
    let deadline = std::time::Instant::now() + LIMIT;
    while client.stderr.all().is_empty()
        && std::time::Instant::now() < deadline
        && !client_connected(&leader)
    {
        std::thread::sleep(Duration::from_millis(50)); // polling, bounded by the deadline
    }
    leader.proc.signal(nix::sys::signal::Signal::SIGCONT);
    // It steps down, and stays, a standby in the same process.
    assert!(
        leader
            .proc
            .stderr
            .wait_for("stepped down: this server is a standby now", LIMIT)
            .is_some(),
        "{:?}",
        leader.proc.stderr.all()
    );
    assert!(leader.proc.stderr.count("stepping down") >= 1);
    assert!(leader.proc.child.try_wait().unwrap().is_none(), "no exit");
    eprintln!(
        "{}",
        leader.proc.stderr.wait_for("stepping down", LIMIT).unwrap()
    );
    assert_eq!(
        c.psql(&db, "SELECT count(*) FROM runs").unwrap(),
        "0",
        "the frozen leader committed nothing"
    );
    // The new leader serves.
    let run = submit_run(
        &b,
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
    assert_eq!(current_status(&b, &run)["state"], "queued");
    drop(client);
}

/// Whether a TCP connection to the server's control port is established
/// (from /proc/net/tcp: the port in state 01).
fn client_connected(server: &ServerProc) -> bool {
    let port: u16 = server.control.rsplit(':').next().unwrap().parse().unwrap();
    let hex = format!(":{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2].ends_with(&hex) && f[3] == "01"
        })
}

/// The fencing itself: once another server holds a newer epoch, a
/// deposed leader's commit is refused in its transaction and writes
/// nothing; the new leader's commits land.
#[test]
fn a_deposed_leaders_commit_is_refused_by_the_epoch() {
    let url = pg::cluster().database();
    let policy = ots::server::lease::LeasePolicy {
        ttl: Duration::from_millis(300),
        renew: Duration::from_millis(100),
    };
    rt().block_on(async {
        let mut a = PgDb::open(&settings(&url)).await.unwrap();
        let mut b = PgDb::open(&settings(&url)).await.unwrap();
        let (ea, _) = a.lead("a", "tcp://a:5555", policy, |_| {}).await.unwrap();
        a.commit(&batch(1)).await.unwrap();
        // b waits for a's lease to lapse (a does not renew), then leads.
        let (eb, _) = b.lead("b", "tcp://b:5555", policy, |_| {}).await.unwrap();
        assert_eq!((ea, eb), (1, 2));
        let late = Changes {
            runs: vec![("r-late".into(), b"x".to_vec(), index(0))],
            ..Changes::default()
        };
        let e = a.commit(&late).await.expect_err("refused");
        assert!(
            matches!(
                e,
                ots::server::db::StateError::Deposed {
                    epoch: 1,
                    now: 2,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("held by b"), "{e}");
        b.commit(&batch(2)).await.unwrap();
        let snap = b.load().await.unwrap();
        assert!(!snap.runs.iter().any(|(id, _)| id == "r-late"));
        // b's batch landed (r0 is live: a start loads it).
        assert!(snap.runs.iter().any(|(id, _)| id == "r0"));
    });
}

/// A server of a leader/standby pair as the issue deploys them: a state
/// directory of its own, and `files` (logs, result and input files, the
/// audit log) shared with the other server through `files_dir`.
fn spawn_on(files: &std::path::Path, name: &str, url: &str, control: &str, events: &str) -> Proc {
    let own = files
        .parent()
        .expect("below the test's folder")
        .join(format!("state-{name}"));
    let files = files.display().to_string();
    spawn_with(
        &own,
        name,
        url,
        (control, events),
        &[
            ("OTS_SERVER_LOST_GRACE_MS", "30000"),
            ("OTS_SERVER_FILES_DIR", files.as_str()),
        ],
    )
}

/// The issue's failover with real processes: two servers on one
/// database and one shared `files_dir`, three real workers that
/// list both, testruns running; the leader is SIGKILLed mid-task. The
/// standby serves within lease_ttl + 2 s, the workers go to it, their
/// running tasks finish there, every testrun passes with one attempt per
/// task, and a client following a testrun with both endpoints sees it
/// through.
#[test]
fn testruns_running_through_a_failover_end_as_they_would_have() {
    let dir = tempfile::tempdir().unwrap();
    let url = pg::cluster().database();
    let state = dir.path().join("shared-files");
    let ports: Vec<String> = (0..4)
        .map(|_| format!("tcp://127.0.0.1:{}", free_port()))
        .collect();
    let (a_control, a_events, b_control, b_events) = (&ports[0], &ports[1], &ports[2], &ports[3]);
    let a = as_server(
        spawn_on(&state, "a", &url, a_control, a_events),
        state.clone(),
    );
    let b = spawn_on(&state, "b", &url, b_control, b_events);
    assert!(
        b.stderr.wait_for("standby:", LIMIT).is_some(),
        "{:?}",
        b.stderr.all()
    );
    let servers = format!("{a_control}, {b_control}");
    let events = format!("{a_events}, {b_events}");
    let conductor = script(
        dir.path(),
        "slow.sh",
        &format!(
            "sleep 3\necho done\n{}",
            r#"mkdir -p "$OTS_RESULTS_DIR"; echo '<testsuite><testcase name="t"/></testsuite>' > "$OTS_RESULTS_DIR/r.xml""#
        ),
    )
    .display()
    .to_string();
    let mut workers = Vec::new();
    for i in 1..=3 {
        workers.push(start_worker_with(
            dir.path(),
            &format!("fo-w{i}"),
            "devicegroup:fo",
            &servers,
            &events,
            &[&conductor],
            &[],
            "",
        ));
    }
    assert!(wait_for_workers(
        &a,
        LIMIT,
        all_idle(&["fo-w1", "fo-w2", "fo-w3"])
    ));
    let runs: Vec<String> = (0..3)
        .map(|_| {
            submit_run(
                &a,
                &[
                    "--device",
                    "devicegroup:fo",
                    "--image",
                    "img",
                    "--packages",
                    "p1,p2",
                    "--distribution",
                    "perpackage",
                ],
            )
        })
        .collect();
    // A client following the first testrun, knowing both servers.
    let mut cmd = std::process::Command::new(bin("ots-submit"));
    cmd.args(["wait", &runs[0]])
        .envs(submit_envs(&a))
        .env("OTS_SERVER", &servers);
    let waiter = Proc::spawn("waiter", cmd);
    assert!(
        waiter.stdout.wait_for(" queued", LIMIT).is_some()
            || waiter.stdout.wait_for("running", LIMIT).is_some()
    );
    // Mid-task: every worker busy.
    wait_status(&a, &runs[0], LIMIT, running);
    let mut a = a;
    let b = fail_over(&mut a, b, state.clone(), None, "failover: the standby");
    // And back: the killed server returns as the standby; while tasks
    // run on the new leader, that one is killed too.
    let a2 = spawn_on(&state, "a2", &url, a_control, a_events);
    assert!(
        a2.stderr.wait_for("standby:", LIMIT).is_some(),
        "{:?}",
        a2.stderr.all()
    );
    let mut runs = runs;
    runs.push(submit_run(
        &b,
        &[
            "--device",
            "devicegroup:fo",
            "--image",
            "img",
            "--packages",
            "p1,p2",
            "--distribution",
            "perpackage",
        ],
    ));
    wait_status(&b, runs.last().unwrap(), LIMIT, running);
    let mut b = b;
    let a2 = fail_over(
        &mut b,
        a2,
        state.clone(),
        Some("3"),
        "failover back: the first server",
    );
    for run in &runs {
        let st = wait_status(&a2, run, Duration::from_secs(90), finished);
        assert_eq!(st["verdict"], "PASS", "{st:#}");
        for t in st["tasks"].as_array().unwrap() {
            assert_eq!(t["attempts"], 1, "no task ran twice: {t:#}");
            assert_eq!(t["files"].as_array().unwrap().len(), 1, "{t:#}");
        }
    }
    let mut waiter = waiter;
    assert_eq!(
        waiter.wait_exit(LIMIT),
        Some(0),
        "{:?} {:?}",
        waiter.stdout.all(),
        waiter.stderr.all()
    );
    drop(workers);
}

/// A state directory records the database whose files it holds: a server
/// pointed at another database with it is refused, naming both.
#[test]
fn a_state_directory_of_another_database_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (pg::cluster().database(), pg::cluster().database());
    let mut first = as_server(spawn_server(dir.path(), "s", &one), dir.path().join("s"));
    first.proc.kill();
    let mut second = spawn_server(dir.path(), "s", &two);
    let code = second.wait_exit(LIMIT);
    assert!(code.is_some_and(|c| c != 0), "{:?}", second.stderr.all());
    let log = second.stderr.all().join("\n");
    assert!(log.contains("another PostgreSQL database"), "{log}");
}

/// A TCP proxy in front of PostgreSQL that can be cut: it then forwards
/// nothing either way but keeps the connections open (packets dropped,
/// the way a partition looks).
struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        from.set_read_timeout(Some(Duration::from_millis(50))).ok();
                        let mut buf = [0u8; 16384];
                        loop {
                            if flag.load(Ordering::SeqCst) {
                                // Cut: hold everything, deliver nothing.
                                std::thread::sleep(Duration::from_millis(50)); // a blackhole's idle loop
                                continue;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if e.kind() == std::io::ErrorKind::WouldBlock
                                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Proxy { port, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The tracing timestamp a log line starts with (RFC 3339, UTC, one
/// format: ordered as text).
fn stamp(line: &str) -> String {
    line.split_whitespace().next().unwrap_or("").to_string()
}

/// The leader cut from PostgreSQL (through a proxy that drops
/// everything) steps down before the standby, which still reaches the
/// database, takes the lease over.
#[test]
fn a_leader_cut_from_the_database_steps_down_before_the_standby_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let c = pg::cluster();
    let url = c.database();
    let db = url.rsplit('/').next().unwrap().to_string();
    let proxy = Proxy::start(c.port);
    let via_proxy = format!("postgresql://postgres@127.0.0.1:{}/{db}", proxy.port);
    let mut leader = as_server(
        spawn_server(dir.path(), "a", &via_proxy),
        dir.path().join("a"),
    );
    let standby = spawn_server(dir.path(), "b", &url);
    assert!(standby.stderr.wait_for("standby:", LIMIT).is_some());
    proxy.cut();
    let stepped = leader.proc.stderr.wait_for("stepping down", LIMIT).unwrap();
    // A standby now, in the same process (waiting for its database).
    assert!(leader
        .proc
        .stderr
        .wait_for("stepped down: this server is a standby now", LIMIT)
        .is_some());
    assert!(leader.proc.child.try_wait().unwrap().is_none(), "no exit");
    let b = as_server(standby, dir.path().join("b"));
    let took = b
        .proc
        .stderr
        .wait_for("leader: this server holds the lease", LIMIT)
        .unwrap();
    eprintln!(
        "cut leader stepped down at {}, the standby led at {}",
        stamp(&stepped),
        stamp(&took)
    );
    assert!(stamp(&stepped) < stamp(&took), "{stepped}\n{took}");
}

/// `sent=N` of every "result file stored by the server" line of a worker
/// for `name`: the bytes it sent for each stored copy.
fn sent_for(worker: &Proc, name: &str) -> Vec<u64> {
    worker
        .stderr
        .all()
        .into_iter()
        .filter(|l| l.contains("result file stored by the server") && l.contains(name))
        .map(|l| field(&l, "sent").parse().unwrap())
        .collect()
}

/// The issue's long acceptance: two servers on one database and one
/// shared state directory, three real workers and 200 simulated ones
/// listing both; twenty SIGKILLs alternating between the two while
/// testruns run and results upload. Each time the standby serves within
/// lease_ttl + 2 s and the whole fleet registers with it. In the end
/// every testrun has the verdict the same packages got before any
/// failover, every task ran exactly once (its conductor wrote its id
/// once), every log line is stored or counted lost (stored + gaps =
/// produced), every result file was stored once and no upload was sent
/// again from the start.
#[test]
fn twenty_failovers_alternating_under_load_keep_every_invariant() {
    const FLEET: usize = 200;
    const BLOB: u64 = 24 << 20;
    zmtp::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let url = pg::cluster().database();
    let state = dir.path().join("shared-files");
    let ports: Vec<String> = (0..4)
        .map(|_| format!("tcp://127.0.0.1:{}", free_port()))
        .collect();
    let pairs = [(&ports[0], &ports[1]), (&ports[2], &ports[3])];
    let servers = format!("{}, {}", ports[0], ports[2]);
    let events = format!("{}, {}", ports[1], ports[3]);
    let mut leader = as_server(
        spawn_on(&state, "s0", &url, pairs[0].0, pairs[0].1),
        state.clone(),
    );
    let mut standby = spawn_on(&state, "s1", &url, pairs[1].0, pairs[1].1);
    assert!(standby.stderr.wait_for("standby:", LIMIT).is_some());

    let ran = dir.path().join("ran.log");
    let conductor = script(
        dir.path(),
        "load.sh",
        &format!(
            r#"echo "$OTS_TASK_ID" >> {ran:?}
seq 1 400
sleep 1
mkdir -p "$OTS_RESULTS_DIR"
head -c {BLOB} /dev/urandom > "$OTS_RESULTS_DIR/blob.bin"
echo '<testsuite><testcase name="t"/></testsuite>' > "$OTS_RESULTS_DIR/r.xml"
if [ "$1" = bad ]; then exit 1; fi
"#
        ),
    )
    .display()
    .to_string();
    let names = ["tw-w1", "tw-w2", "tw-w3"];
    let workers: Vec<Proc> = names
        .iter()
        .map(|n| {
            start_worker_with(
                dir.path(),
                n,
                "devicegroup:tw",
                &servers,
                &events,
                &[&conductor, "{packages}"],
                &[],
                "",
            )
        })
        .collect();
    let lab = keys();
    let fleet_keys = ots::fleet::fleet_keys(
        &lab.path().join("private"),
        &lab.workers_dir(),
        "tw-sim",
        FLEET,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fleet = {
        let _guard = rt.enter();
        ots::fleet::start(
            &servers,
            &events,
            "tw-sim",
            FLEET,
            0,
            ots::fleet::FleetSecurity::Noise {
                server: ots::security::PublicKey::read(&lab.server_pub()).unwrap(),
                keys: std::sync::Arc::new(fleet_keys),
            },
        )
    };
    assert!(wait_for_workers(&leader, LIMIT, all_idle(&names)));
    let fleet_up = |since: usize| {
        let deadline = std::time::Instant::now() + LIMIT;
        while std::time::Instant::now() < deadline {
            if fleet.registered() == FLEET && fleet.welcomes() >= since + FLEET {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50)); // polling the fleet's counters
        }
        false
    };
    assert!(
        fleet_up(0),
        "only {} simulated workers registered",
        fleet.registered()
    );

    let submit = |server: &ServerProc, packages: &str| {
        submit_run(
            server,
            &[
                "--device",
                "devicegroup:tw",
                "--image",
                "img",
                "--packages",
                packages,
                "--distribution",
                "perpackage",
            ],
        )
    };
    // What the packages give without any failover.
    let before = |packages: &str| {
        let run = submit(&leader, packages);
        wait_status(&leader, &run, LIMIT, finished)["verdict"].clone()
    };
    let (good, bad) = (before("p1,p2,p3"), before("p1,p2,bad"));
    assert_eq!(good, "PASS");
    assert_ne!(bad, "PASS");

    let mut runs = Vec::new();
    for i in 0..20 {
        let failing = i % 2 == 1;
        let run = submit(&leader, if failing { "p1,p2,bad" } else { "p1,p2,p3" });
        if i % 2 == 0 {
            // Killed while conductors run.
            wait_status(&leader, &run, LIMIT, running);
        } else {
            // Killed while a result file is on its way (or just after).
            let partial = |n: u32| {
                state
                    .join("tasks")
                    .join(format!("{run}.{n}"))
                    .join("incoming/1/blob.bin")
            };
            let deadline = std::time::Instant::now() + LIMIT;
            while std::time::Instant::now() < deadline
                && !(1..=3).any(|n| std::fs::metadata(partial(n)).is_ok_and(|m| m.len() > 0))
            {
                std::thread::sleep(Duration::from_millis(2)); // polling a file's size
            }
        }
        runs.push((run, failing));
        let welcomes = fleet.welcomes();
        let serving = i % 2;
        let next = (serving + 1) % 2;
        let mut old = leader;
        leader = fail_over(
            &mut old,
            standby,
            state.clone(),
            Some(&(i + 2).to_string()),
            &format!("failover {} to s{next}", i + 1),
        );
        drop(old);
        standby = spawn_on(
            &state,
            &format!("s{serving}"),
            &url,
            pairs[serving].0,
            pairs[serving].1,
        );
        assert!(
            standby.stderr.wait_for("standby:", LIMIT).is_some(),
            "{:?}",
            standby.stderr.all()
        );
        assert!(
            fleet_up(welcomes),
            "failover {}: {} of {FLEET} simulated workers registered with the new leader",
            i + 1,
            fleet.registered()
        );
    }

    let mut tasks = 0;
    for (run, failing) in &runs {
        let st = wait_status(&leader, run, Duration::from_secs(120), finished);
        let expected = if *failing { &bad } else { &good };
        assert_eq!(&st["verdict"], expected, "{st:#}");
        for t in st["tasks"].as_array().unwrap() {
            tasks += 1;
            assert_eq!(t["attempts"], 1, "no task ran twice: {t:#}");
            let names: Vec<&str> = t["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap())
                .collect();
            assert_eq!(names.len(), 2, "blob.bin and r.xml, once each: {t:#}");
            let lost: u64 = t["log_gaps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g[1].as_u64().unwrap() - g[0].as_u64().unwrap() + 1)
                .sum();
            assert_eq!(
                t["log_lines_stored"].as_u64().unwrap() + lost,
                t["log_lines_produced"].as_u64().unwrap(),
                "stored + lost = produced: {t:#}"
            );
        }
    }
    let log = std::fs::read_to_string(&ran).unwrap();
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for id in log.lines() {
        *seen.entry(id).or_default() += 1;
    }
    for (run, _) in &runs {
        for n in 1..=3 {
            let id = format!("{run}.{n}");
            assert_eq!(seen.get(id.as_str()), Some(&1), "{id} ran once: {log}");
        }
    }
    let sent: Vec<u64> = workers
        .iter()
        .flat_map(|w| sent_for(w, "blob.bin"))
        .collect();
    let resent: u64 = sent.iter().map(|s| s.saturating_sub(BLOB)).sum();
    eprintln!(
        "20 failovers: {tasks} tasks, {} result files of {} MiB stored, {resent} bytes sent again in all",
        sent.len(),
        BLOB >> 20
    );
    assert!(
        sent.iter().all(|s| *s < BLOB + BLOB / 2),
        "an upload was sent again from the start: {sent:?}"
    );
    drop(rt);
}

/// A standby on the leader's own host and endpoints (a restart loop under
/// systemd, a test lab) cannot bind to answer `not_leader`: it says so,
/// waits without answering, and takes the same endpoints over when the
/// leader dies.
#[test]
fn a_standby_on_the_leaders_endpoints_waits_without_answering_and_takes_them_over() {
    let dir = tempfile::tempdir().unwrap();
    let url = pg::cluster().database();
    let files = dir.path().join("files");
    let (control, events) = (
        format!("tcp://127.0.0.1:{}", free_port()),
        format!("tcp://127.0.0.1:{}", free_port()),
    );
    let mut leader = as_server(
        spawn_on(&files, "x", &url, &control, &events),
        files.clone(),
    );
    let standby = spawn_on(&files, "y", &url, &control, &events);
    assert!(
        standby
            .stderr
            .wait_for(
                "cannot bind the control endpoint to answer not_leader",
                LIMIT
            )
            .is_some(),
        "{:?}",
        standby.stderr.all()
    );
    assert!(standby.stderr.wait_for("standby:", LIMIT).is_some());
    let next = fail_over(&mut leader, standby, files, Some("2"), "same endpoints");
    assert_eq!(next.control, control);
}

/// Issue 34, finding 11: `--check-config` connects to the database (a
/// short timeout) and names the setting that is wrong, as a start would.
#[test]
fn check_config_connects_to_the_database_and_names_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let c = pg::cluster();
    // A role that must give its password (the harness's cluster trusts
    // everyone else).
    c.psql(
        "postgres",
        "CREATE ROLE ots_pw LOGIN PASSWORD 'right-password'",
    )
    .unwrap();
    c.psql("postgres", "CREATE DATABASE ots_pw_db OWNER ots_pw")
        .unwrap();
    let hba = c.dir().join("data/pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host all ots_pw 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .unwrap();
    c.psql("postgres", "SELECT pg_reload_conf()").unwrap();
    let check = |url: &str, password: &str| {
        let pw = dir.path().join("pw");
        std::fs::write(&pw, format!("{password}\n")).unwrap();
        let config = dir.path().join("server.toml");
        std::fs::write(
            &config,
            format!(
                "database = {url:?}\ndatabase_password_file = {:?}\n",
                pw.display().to_string()
            ),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(bin("ots-server"));
        for (k, v) in keys().server_env() {
            cmd.env(k, v);
        }
        cmd.arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--check-config");
        let started = std::time::Instant::now();
        let out = run_bounded(cmd, LIMIT);
        (out.status.code(), text(&out.stdout), started.elapsed())
    };
    let url = format!("postgresql://ots_pw@127.0.0.1:{}/ots_pw_db", c.port);
    // The right password: connected.
    let (code, stdout, _) = check(&url, "right-password");
    assert_eq!(code, Some(0), "{stdout}");
    assert!(
        stdout.contains("database: connected to ots_pw@127.0.0.1"),
        "{stdout}"
    );
    // A wrong one: refused, naming the setting and what to check.
    let (code, stdout, _) = check(&url, "wrong-password");
    assert_eq!(code, Some(78), "{stdout}");
    assert!(
        stdout.contains("error: setting `database`") && stdout.contains("database_password_file"),
        "{stdout}"
    );
    // A database that does not exist.
    let (code, stdout, _) = check(
        &url.replace("ots_pw_db", "ots_no_such_db"),
        "right-password",
    );
    assert_eq!(code, Some(78), "{stdout}");
    assert!(stdout.contains("createdb"), "{stdout}");
    // Nobody on the port: said at once.
    let dead = format!("postgresql://ots_pw@127.0.0.1:{}/ots_pw_db", free_port());
    let (code, stdout, took) = check(&dead, "right-password");
    assert_eq!(code, Some(78), "{stdout}");
    assert!(stdout.contains("setting `database`"), "{stdout}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// Issue 34, finding 12: with a list of two servers and one of them
/// down (SIGKILLed: its port refuses), every call answers within 1 s —
/// the refused one is passed at once, and the one that led is
/// remembered and tried first next time.
#[test]
fn a_call_answers_within_a_second_whichever_server_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let c = pg::cluster();
    let url = c.database();
    let mut a = as_server(spawn_server(dir.path(), "a", &url), dir.path().join("a"));
    let standby = spawn_server(dir.path(), "b", &url);
    assert!(standby.stderr.wait_for("standby:", LIMIT).is_some());
    let cache = dir.path().join("cache");
    let call = |server: &ServerProc, list: &str| {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(bin("ots-submit"))
            .args(["workers", "--server", list])
            .envs(submit_envs(server))
            .env("XDG_CACHE_HOME", &cache)
            .output()
            .unwrap();
        (out.status.code(), started.elapsed(), text(&out.stderr))
    };
    // The leader first or second: fine while both are up.
    let b_control = standby
        .stderr
        .all()
        .iter()
        .find_map(|l| {
            l.contains("answering not_leader")
                .then(|| field(l, "control"))
        })
        .expect("the standby's control endpoint");
    for list in [
        format!("{},{b_control}", a.control),
        format!("{b_control},{}", a.control),
    ] {
        let (code, took, err) = call(&a, &list);
        assert_eq!(code, Some(0), "{err}");
        assert!(took < Duration::from_secs(1), "{list}: {took:?}");
    }
    // The leader SIGKILLed: the standby leads; every call within 1 s,
    // whichever order the list gives.
    a.proc.kill();
    let b = as_server(standby, dir.path().join("b"));
    let mut times = Vec::new();
    for list in [
        format!("{},{}", a.control, b.control),
        format!("{},{}", a.control, b.control),
        format!("{},{}", b.control, a.control),
    ] {
        let (code, took, err) = call(&b, &list);
        assert_eq!(code, Some(0), "{list}: {err}");
        times.push(took);
    }
    eprintln!("calls with the first server down: {times:?}");
    assert!(
        times.iter().all(|t| *t < Duration::from_secs(1)),
        "{times:?}"
    );
    let remembered = std::fs::read_to_string(cache.join("ots/leaders")).unwrap();
    assert!(remembered.contains(&b.control), "{remembered}");
    // `leader` says where each stands, the dead one at once.
    let started = std::time::Instant::now();
    let (code, standings) = leader_of(&b, &format!("{},{}", a.control, b.control));
    let took = started.elapsed();
    assert_eq!(code, 0, "{standings:?}");
    assert_eq!(standings[0]["state"], "no answer", "{standings:?}");
    assert_eq!(standings[1]["state"], "leader", "{standings:?}");
    assert!(took < Duration::from_secs(1), "leader took {took:?}");
}

/// Test cases recorded by the file desk's writer and listed by the
/// history reader come back alike on SQLite and PostgreSQL, a file
/// recorded again replacing its own cases.
#[test]
fn test_cases_are_recorded_and_listed_alike_on_both_backends() {
    use ots::server::cases::{parse, CaseBounds};
    use ots::server::store::cases::{CaseQuery, CaseSink, SqliteCases};
    use ots::server::store::history::{Recall, SqliteHistory};
    let url = pg::cluster().database();
    let dir = tempfile::tempdir().unwrap();
    let lite = Db::open(dir.path()).unwrap();
    let mut lite_sink = SqliteCases::open(lite.path()).unwrap();
    let lite_reader = SqliteHistory::open(lite.path()).unwrap();
    let xml = r#"<testsuite name="s"><testcase classname="m" name="a" time="0.5"/><testcase classname="m" name="b"><failure message="boom&#10;x"/></testcase><testcase name="c"><skipped/></testcase></testsuite>"#;
    let cases = parse(xml.as_bytes(), &CaseBounds::default())
        .unwrap()
        .unwrap()
        .cases;
    // 5000 more: more than one chunk on both.
    let many: Vec<_> = (0..5000)
        .map(|i| ots::server::cases::Case {
            name: format!("bulk::{i}"),
            ..cases[0].clone()
        })
        .collect();
    // The desk writes from a thread of its own through the server's
    // (multi-thread) runtime, as here.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (mut pg_sink, mut pg_reader) = rt.block_on(async {
        let _db = PgDb::open(&settings(&url)).await.unwrap();
        (
            ots::server::store::pg::history::PgCases::open(&settings(&url))
                .await
                .unwrap(),
            ots::server::store::pg::history::PgHistory::open(&settings(&url))
                .await
                .unwrap(),
        )
    });
    for sink in [&mut lite_sink as &mut dyn CaseSink, &mut pg_sink] {
        sink.record(&"r1.1".into(), 1, "big.xml", &Default::default(), &many)
            .unwrap();
        sink.record(&"r1.1".into(), 1, "r.xml", &Default::default(), &many[..3])
            .unwrap();
        // Stored again: replaced, not added to.
        sink.record(&"r1.1".into(), 1, "r.xml", &Default::default(), &cases)
            .unwrap();
        sink.record(&"r1.1".into(), 2, "r.xml", &Default::default(), &cases)
            .unwrap();
    }
    rt.block_on(async {
        for (failed, offset, limit) in [(false, 0, 1000), (true, 0, 10), (false, 4990, 20)] {
            let q = Recall::Cases(CaseQuery {
                attempts: vec![("r1.1".into(), 1)],
                failed,
                offset,
                limit,
            });
            let a = lite_reader.recall(&q).unwrap();
            let b = pg_reader.recall(&q).await.unwrap();
            assert_eq!(a, b, "{q:?}");
            let Found::Cases(list) = a else { panic!() };
            match (failed, offset) {
                (true, _) => {
                    assert_eq!(list.len(), 1);
                    assert_eq!(list[0].name, "m::b");
                    assert_eq!(list[0].message.as_deref(), Some("boom"));
                }
                (false, 0) => {
                    assert_eq!(list.len(), 1000);
                    assert_eq!(list[0].file, "big.xml");
                }
                _ => {
                    let files: Vec<&str> = list.iter().map(|c| c.file.as_str()).collect();
                    assert_eq!(files.len(), 13, "10 of big.xml, then r.xml's 3");
                    assert_eq!(files[12], "r.xml");
                }
            }
        }
    });
}

/// `compare`, `case_history` and `list_flaky` read the same answers on
/// SQLite and PostgreSQL (one SQL, two dialects): a regression with the
/// run it last passed in, a flaky case, a device-specific one.
#[test]
fn results_are_read_alike_on_both_backends() {
    use ots::protocol::CaseStatus;
    use ots::server::cases::Case;
    use ots::server::results::KnownRules;
    use ots::server::store::cases::{CaseAbout, CaseSink, SqliteCases};
    use ots::server::store::history::{Recall, SqliteHistory};
    use ots::server::store::results::{
        CompareQuery, FlakyQuery, HistoryQuery, ResultFound, ResultQuery,
    };
    let url = pg::cluster().database();
    let dir = tempfile::tempdir().unwrap();
    let mut lite = Db::open(dir.path()).unwrap();
    let mut lite_sink = SqliteCases::open(lite.path()).unwrap();
    let lite_reader = SqliteHistory::open(lite.path()).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Five finished testruns of series `s`: (image, worker) and what
    // fails — `flaky` in r2 only (image i1), `net` on w3 only, `feat`
    // from image i2 on (r5).
    let plan = [
        ("i1", "w1"),
        ("i1", "w2"),
        ("i1", "w3"),
        ("i1", "w3"),
        ("i2", "w1"),
    ];
    let runs = Changes {
        runs: (1..=5)
            .map(|i| {
                let mut x = index(i);
                x.image = Some(plan[i - 1].0.into());
                x.state = "finished".into();
                x.live = false;
                (format!("r{i}"), vec![1], x)
            })
            .collect(),
        ..Changes::default()
    };
    let case = |name: &str, failed: bool| Case {
        suite: std::sync::Arc::from("s"),
        name: name.into(),
        status: if failed {
            CaseStatus::Fail
        } else {
            CaseStatus::Pass
        },
        duration_ms: Some(5),
        message: failed.then(|| format!("{name} broke")),
        log_offset: None,
    };
    let (mut pg_sink, mut pg_reader) = rt.block_on(async {
        let mut db = PgDb::open(&settings(&url)).await.unwrap();
        db.commit(&runs).await.unwrap();
        (
            ots::server::store::pg::history::PgCases::open(&settings(&url))
                .await
                .unwrap(),
            ots::server::store::pg::history::PgHistory::open(&settings(&url))
                .await
                .unwrap(),
        )
    });
    lite.commit(&runs).unwrap();
    for sink in [&mut lite_sink as &mut dyn CaseSink, &mut pg_sink] {
        for (i, (image, worker)) in plan.iter().enumerate() {
            let n = i + 1;
            let cases = [
                case("stable", false),
                case("flaky", n == 2),
                case("net", *worker == "w3"),
                case("feat", *image == "i2"),
            ];
            let about = CaseAbout {
                series: Some("s".into()),
                worker: Some(worker.to_string()),
                devicegroup: Some("g".into()),
            };
            sink.record(&format!("r{n}.1"), 1, "j.xml", &about, &cases)
                .unwrap();
        }
    }
    let compare = |run: &str| {
        Recall::Results(ResultQuery::Compare(CompareQuery {
            run: run.into(),
            base: None,
            owner: None,
            window_runs: 10,
            known: std::sync::Arc::new(KnownRules::default()),
        }))
    };
    let questions = [
        compare("r2"),
        compare("r4"),
        compare("r5"),
        Recall::Results(ResultQuery::History(HistoryQuery {
            case: "feat".into(),
            series: Some("s".into()),
            devicegroup: None,
            owner: Some("ann".into()),
            limit: 10,
        })),
        Recall::Results(ResultQuery::Flaky(FlakyQuery {
            devicegroup: Some("g".into()),
            owner: None,
            window_runs: 50,
        })),
    ];
    rt.block_on(async {
        for q in &questions {
            let a = lite_reader.recall(q).unwrap();
            let b = pg_reader.recall(q).await.unwrap();
            assert_eq!(a, b, "{q:?}");
        }
    });
    let answer = |q: &Recall| match lite_reader.recall(q).unwrap() {
        Found::Results(r) => r,
        other => panic!("{other:?}"),
    };
    let names = |l: &[ots::protocol::results::CaseChange]| -> Vec<String> {
        l.iter().map(|c| c.name.clone()).collect()
    };
    let ResultFound::Compared(t) = answer(&questions[0]) else {
        panic!()
    };
    assert_eq!(names(&t.comparison.flaky), ["flaky"]);
    let ResultFound::Compared(t) = answer(&questions[1]) else {
        panic!()
    };
    assert_eq!(names(&t.comparison.device_specific), ["net"]);
    assert_eq!(t.suspects, [("w3".to_string(), "net".to_string())]);
    let ResultFound::Compared(t) = answer(&questions[2]) else {
        panic!()
    };
    assert_eq!(names(&t.comparison.regressions), ["feat"]);
    assert_eq!(
        t.comparison.regressions[0].last_passed.as_deref(),
        Some("r4")
    );
    let ResultFound::History(h) = answer(&questions[3]) else {
        panic!()
    };
    assert_eq!(h.runs.len(), 5);
    assert_eq!(
        (h.last_passed.as_deref(), h.first_failed.as_deref()),
        (Some("r4"), Some("r5"))
    );
    let ResultFound::Flaky(f) = answer(&questions[4]) else {
        panic!()
    };
    assert!(
        f.iter().any(|c| c.name == "flaky" && c.failed_in == ["r2"]),
        "{f:?}"
    );
}
