//! What an idle fleet costs the scheduler: `ready` messages (each idle
//! worker repeats one every heartbeat) and submits, with 100 and 5000
//! idle workers, on the I/O-free scheduler with an in-memory store.
//! Prints messages per second; with the ready index both should be about
//! the same whatever the fleet size (before it, every `ready` gathered and
//! sorted the whole registry).
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
    let mut s = Scheduler::new(cfg, MemoryStore::default(), "bench".into());
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

fn main() {
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
                    },
                }),
            );
            s.take_outputs();
        }
        let submit_rate = submits as f64 / t.elapsed().as_secs_f64();
        println!("{n:>5} idle workers: {ready_rate:>10.0} ready/s, {submit_rate:>8.0} submits/s");
    }
}
