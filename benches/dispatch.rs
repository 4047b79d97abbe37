//! What an idle fleet costs the scheduler: `ready` messages (each idle
//! worker repeats one every heartbeat) and submits, with 100 and 5000
//! idle workers, on the I/O-free scheduler with an in-memory store.
//! Prints messages per second; with the ready index both should be about
//! the same whatever the fleet size (before it, every `ready` gathered and
//! sorted the whole registry).
//!
//! Then issue 21's figure: dispatch with 5000 workers and 100 000 queued
//! tasks from 100 owners (fair share, per-owner lines), against the same
//! cycle with 1000 queued tasks: a dispatch costs O(log n), so the two
//! rates should be close. Each cycle is a worker's final report, the
//! task's end, its `ready` and the next dispatch.
//!
//! `cargo bench --bench dispatch`

use bytes::Bytes;
use ots::protocol::*;
use ots::server::scheduler::{Scheduler, SchedulerConfig};
use ots::server::store::MemoryStore;
use std::time::{Duration, Instant};

fn env(body: Body) -> ots::protocol::Envelope {
    ots::protocol::Envelope {
        header: Header {
            v: PROTOCOL_VERSION,
            class: body.class(),
            mandatory: false,
            seq: 0,
            task: None,
            epoch: None,
        },
        body,
        raw: None,
    }
}

fn fleet(n: usize) -> (Scheduler<MemoryStore>, Vec<Bytes>, Instant) {
    let cfg = SchedulerConfig {
        heartbeat: Duration::from_secs(1),
        ..SchedulerConfig::default()
    };
    let mut s = Scheduler::new(
        cfg,
        MemoryStore::default(),
        "bench".into(),
        Instant::now(),
        ots::protocol::limits::unix_ms_now(),
    );
    let now = Instant::now();
    let mut peers = Vec::new();
    for i in 0..n {
        let peer = Bytes::from(format!("peer-{i}"));
        s.on_message(
            now,
            &peer,
            env(Body::Hello {
                worker: format!("w{i}"),
                session: format!("s{i}"),
                device: DeviceProps::parse(&format!("devicegroup:g{}", i % 10)).unwrap(),
                running: vec![],
                version: None,
            }),
        );
        s.on_message(now, &peer, env(Body::Ready));
        peers.push(peer);
    }
    s.take_outputs();
    (s, peers, now)
}

fn mandatory(body: Body, seq: u64) -> ots::protocol::Envelope {
    let mut e = env(body);
    e.header.mandatory = true;
    e.header.seq = seq;
    e
}

/// 5000 busy workers in one group and `queued` more tasks from 100
/// owners; returns report→dispatch cycles per second over `cycles`.
fn fair_share_cycles(queued: usize, cycles: usize) -> f64 {
    use ots::security::{Identity, Role};
    let workers = 5000usize;
    let owners = 100usize;
    let mut cfg = SchedulerConfig {
        heartbeat: Duration::from_secs(1),
        secure: true,
        ..SchedulerConfig::default()
    };
    let total = workers + queued;
    cfg.limits.max_open_tasks = total + 10;
    cfg.limits.max_open_tasks_per_owner = total;
    cfg.limits.max_open_runs_per_owner = total;
    cfg.limits.max_workers = workers + 10;
    let mut s = Scheduler::new(
        cfg,
        MemoryStore::default(),
        "bench".into(),
        Instant::now(),
        ots::protocol::limits::unix_ms_now(),
    );
    let now = Instant::now();
    let mut peers = Vec::new();
    for i in 0..workers {
        let peer = Bytes::from(format!("peer-{i}"));
        let name = format!("w{i}");
        s.on_authenticated(
            &peer,
            Identity::Worker {
                name: name.clone(),
                pin: None,
            },
            "tcp://127.0.0.1:1".into(),
        );
        s.on_message(
            now,
            &peer,
            env(Body::Hello {
                worker: name,
                session: format!("s{i}"),
                device: DeviceProps::parse("devicegroup:g").unwrap(),
                running: vec![],
                version: None,
            }),
        );
        s.on_message(now, &peer, env(Body::Ready));
        peers.push(peer);
    }
    let users: Vec<Bytes> = (0..owners)
        .map(|o| {
            let peer = Bytes::from(format!("user-{o}"));
            s.on_authenticated(
                &peer,
                Identity::User {
                    name: format!("owner{o}"),
                    role: Role::Submit,
                },
                "tcp://127.0.0.1:2".into(),
            );
            peer
        })
        .collect();
    // What each worker runs now, from the dispatches sent.
    let mut running: Vec<Option<(String, u32)>> = vec![None; workers];
    let note = |outs: Vec<ots::server::scheduler::Output>,
                running: &mut Vec<Option<(String, u32)>>| {
        for o in outs {
            if let ots::server::scheduler::Output::Send {
                peer,
                body: Body::Dispatch { spec },
                ..
            } = o
            {
                let i: usize = std::str::from_utf8(&peer[5..]).unwrap().parse().unwrap();
                running[i] = Some((spec.task.clone(), spec.attempt));
            }
        }
    };
    for i in 0..total {
        s.on_message(
            now,
            &users[i % owners],
            env(Body::Submit {
                request: i as u64,
                testrun: TestrunRequest {
                    lease: None,
                    on_lease: None,
                    series: None,
                    device: DeviceSpec::parse("devicegroup:g").unwrap(),
                    image: "img".into(),
                    packages: vec!["p".into()],
                    distribution: Distribution::Default,
                    timeout_secs: 60,
                    options: Default::default(),
                    queue_anyway: false,
                    secrets: Default::default(),
                    owner: None,
                    inputs: Default::default(),
                    priority: Default::default(),
                    devices: Vec::new(),
                    notify: Vec::new(),
                },
            }),
        );
        if i % 1000 == 0 {
            note(s.take_outputs(), &mut running);
        }
    }
    note(s.take_outputs(), &mut running);
    let busy = running.iter().filter(|r| r.is_some()).count();
    assert_eq!(
        busy,
        workers,
        "every worker busy before the cycles: {:?}",
        s.counters()
    );
    let mut seq = vec![0u64; workers];
    let t = Instant::now();
    for c in 0..cycles {
        let i = c % workers;
        let Some((task, attempt)) = running[i].take() else {
            continue;
        };
        seq[i] += 1;
        s.on_message(
            now,
            &peers[i],
            mandatory(
                Body::TaskFinished {
                    task,
                    attempt,
                    outcome: Outcome {
                        exit_code: Some(1),
                        ..Outcome::default()
                    },
                    log_lines: 0,
                    files: vec![],
                    file_problems: vec![],
                },
                seq[i],
            ),
        );
        s.on_message(now, &peers[i], env(Body::Ready));
        note(s.take_outputs(), &mut running);
    }
    cycles as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let small = fair_share_cycles(1_000, 1_000);
    let large = fair_share_cycles(100_000, 20_000);
    println!(
        "fair-share dispatch, 5000 workers, 100 owners: {small:>8.0} cycles/s with 1000 queued, {large:>8.0} cycles/s with 100000 queued ({:.2}x)",
        large / small
    );
    for n in [100usize, 5000] {
        let (mut s, peers, now) = fleet(n);
        let rounds = 50_000;
        let t = Instant::now();
        for i in 0..rounds {
            s.on_message(now, &peers[i % peers.len()], env(Body::Ready));
        }
        let ready_rate = rounds as f64 / t.elapsed().as_secs_f64();
        s.take_outputs();
        // Submits of one task to a group with no worker (queued), then one
        // to a group with idle workers (dispatched at once).
        let t = Instant::now();
        let submits = 2_000u64;
        for i in 0..submits {
            let group = if i % 2 == 0 { "nobody" } else { "g3" };
            s.on_message(
                now,
                &Bytes::from_static(b"client"),
                env(Body::Submit {
                    request: i,
                    testrun: TestrunRequest {
                        lease: None,
                        on_lease: None,
                        series: None,
                        device: DeviceSpec::parse(&format!("devicegroup:{group}")).unwrap(),
                        image: "img".into(),
                        packages: vec!["p".into()],
                        distribution: Distribution::Default,
                        timeout_secs: 60,
                        options: Default::default(),
                        queue_anyway: true,
                        secrets: Default::default(),
                        owner: None,
                        inputs: Default::default(),
                        priority: Default::default(),
                        devices: Vec::new(),
                        notify: Vec::new(),
                    },
                }),
            );
            s.take_outputs();
        }
        let submit_rate = submits as f64 / t.elapsed().as_secs_f64();
        println!("{n:>5} idle workers: {ready_rate:>10.0} ready/s, {submit_rate:>8.0} submits/s");
    }
}
