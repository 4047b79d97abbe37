//! Benchmark (issue 37): results read from the state database by the
//! history reader the server uses, on SQLite and on PostgreSQL —
//! `case_history` of one case over 100 000 testruns, and `compare` of two
//! testruns of 100 000 cases each (the newer one with 100 new failures,
//! each looked up in the series' window). Beside each, as the baseline
//! of the same run: the same question on a database of 1 000 testruns
//! and two testruns of 1 000 cases. Printed: the median and the slowest
//! of 20 answers.
//!
//! `cargo bench --bench results` (OTS_BENCH_RUNS, default 100000;
//! OTS_BENCH_CASES, default 100000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use ots::protocol::CaseStatus;
use ots::server::cases::Case;
use ots::server::db::{Changes, Db};
use ots::server::pg::{PgDb, PgSettings};
use ots::server::results::KnownRules;
use ots::server::store::cases::{CaseAbout, CaseSink, SqliteCases};
use ots::server::store::history::{Found, Recall, RunIndex, SqliteHistory};
use ots::server::store::results::{CompareQuery, HistoryQuery, ResultFound, ResultQuery};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Cases every testrun of the history has (one of them the probe).
const PER_RUN: usize = 5;

fn index(n: u64) -> RunIndex {
    RunIndex {
        num: n,
        kind: "r".into(),
        state: "finished".into(),
        verdict: Some("PASS".into()),
        owner: Some("ann".into()),
        groups: ",g,".into(),
        live: false,
        ended_ms: Some(n),
        kept_bytes: None,
        summary: Vec::new(),
        series: Some("s".into()),
        image: Some(format!("img{n}")),
    }
}

fn runs(from: u64, to: u64) -> Changes {
    Changes {
        runs: (from..to)
            .map(|n| (format!("r{n}"), vec![1], index(n)))
            .collect(),
        ..Changes::default()
    }
}

/// The history's case rows: `(task, num, name, status, worker)`.
fn history_rows(runs: u64) -> Vec<(String, u64, String, &'static str, String)> {
    let mut rows = Vec::new();
    for n in 1..=runs {
        for c in 0..PER_RUN {
            let name = if c == 0 {
                "suite::probe".to_string()
            } else {
                format!("suite::other_{c}")
            };
            let failed = c == 0 && n > runs - 10;
            rows.push((
                format!("r{n}.1"),
                n,
                name,
                if failed { "fail" } else { "pass" },
                format!("w{}", n % 3),
            ));
        }
    }
    rows
}

fn fill_sqlite(db: &Db, runs: u64) {
    let mut conn = rusqlite::Connection::open(db.path()).unwrap();
    let tx = conn.transaction().unwrap();
    {
        let mut insert = tx
            .prepare(
                "INSERT INTO cases (task, attempt, file, seq, run, suite, name, status,
                     duration_ms, message, num, series, worker, devicegroup)
                 VALUES (?1, 1, 'j.xml', ?2, ?3, 'suite', ?4, ?5, 3, NULL, ?6, 's', ?7, 'g')",
            )
            .unwrap();
        for (i, (task, n, name, status, worker)) in history_rows(runs).into_iter().enumerate() {
            insert
                .execute(rusqlite::params![
                    task,
                    (i % PER_RUN) as i64,
                    format!("r{n}"),
                    name,
                    status,
                    n as i64,
                    worker
                ])
                .unwrap();
        }
    }
    tx.commit().unwrap();
}

async fn fill_pg(url: &str, runs: u64) {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let rows = history_rows(runs);
    for chunk in rows.chunks(50_000) {
        let tasks: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
        let seqs: Vec<i64> = (0..chunk.len()).map(|i| (i % PER_RUN) as i64).collect();
        let runs: Vec<String> = chunk.iter().map(|r| format!("r{}", r.1)).collect();
        let names: Vec<&str> = chunk.iter().map(|r| r.2.as_str()).collect();
        let statuses: Vec<&str> = chunk.iter().map(|r| r.3).collect();
        let nums: Vec<i64> = chunk.iter().map(|r| r.1 as i64).collect();
        let workers: Vec<&str> = chunk.iter().map(|r| r.4.as_str()).collect();
        client
            .execute(
                "INSERT INTO cases (task, attempt, file, seq, run, suite, name, status,
                     duration_ms, message, num, series, worker, devicegroup)
                 SELECT t, 1, 'j.xml', q, r, 'suite', n, st, 3, NULL, nu, 's', w, 'g'
                 FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::text[],
                     $6::int8[], $7::text[]) AS x(t, q, r, n, st, nu, w)",
                &[&tasks, &seqs, &runs, &names, &statuses, &nums, &workers],
            )
            .await
            .unwrap();
    }
    client.execute("ANALYZE", &[]).await.unwrap();
}

/// Two testruns after the history, of `n` cases each, the newer with
/// 100 new failures: written by the file desk's own writer.
fn compared_cases(n: usize, newer: bool) -> Vec<Case> {
    (0..n)
        .map(|i| Case {
            suite: Arc::from("big"),
            name: format!("big.mod{}::test_{i}", i % 50),
            status: if newer && i % (n / 100).max(1) == 0 {
                CaseStatus::Fail
            } else {
                CaseStatus::Pass
            },
            duration_ms: Some(1),
            message: None,
            log_offset: None,
        })
        .collect()
}

fn record_pair(sink: &mut dyn CaseSink, first: u64, n: usize) {
    for (num, newer) in [(first, false), (first + 1, true)] {
        let about = CaseAbout {
            series: Some("s".into()),
            worker: Some("w1".into()),
            devicegroup: Some("g".into()),
        };
        sink.record(
            &format!("r{num}.1"),
            1,
            "big.xml",
            &about,
            &compared_cases(n, newer),
        )
        .unwrap();
    }
}

fn history_q() -> Recall {
    Recall::Results(ResultQuery::History(HistoryQuery {
        case: "suite::probe".into(),
        series: Some("s".into()),
        devicegroup: None,
        owner: None,
        limit: 20,
    }))
}

fn compare_q(run: u64) -> Recall {
    Recall::Results(ResultQuery::Compare(CompareQuery {
        run: format!("r{run}"),
        base: None,
        owner: None,
        window_runs: 10,
        known: Arc::new(KnownRules::default()),
    }))
}

/// Median and slowest of 20 answers.
fn timed(mut ask: impl FnMut() -> Found) -> (Duration, Duration, Found) {
    let mut took = Vec::new();
    let mut last = None;
    for _ in 0..20 {
        let t = Instant::now();
        let found = ask();
        took.push(t.elapsed());
        last = Some(found);
    }
    took.sort();
    (took[10], took[19], last.unwrap())
}

fn check(found: &Found, what: &str) {
    match found {
        Found::Results(ResultFound::History(h)) => {
            assert_eq!(h.runs.len(), 20, "{what}");
            assert!(h.first_failed.is_some(), "{what}");
        }
        Found::Results(ResultFound::Compared(t)) => {
            assert_eq!(t.comparison.totals.regressions, 100, "{what}");
        }
        other => panic!("{what}: {other:?}"),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct Sizes {
    runs: u64,
    cases: usize,
}

fn sqlite(dir: &std::path::Path, s: &Sizes) -> [(Duration, Duration); 2] {
    std::fs::create_dir_all(dir).unwrap();
    let mut db = Db::open(dir).unwrap();
    for from in (1..=s.runs).step_by(10_000) {
        db.commit(&runs(from, (from + 10_000).min(s.runs + 1)))
            .unwrap();
    }
    fill_sqlite(&db, s.runs);
    db.commit(&runs(s.runs + 1, s.runs + 3)).unwrap();
    record_pair(
        &mut SqliteCases::open(db.path()).unwrap(),
        s.runs + 1,
        s.cases,
    );
    let reader = SqliteHistory::open(db.path()).unwrap();
    let (hm, hx, found) = timed(|| reader.recall(&history_q()).unwrap());
    check(&found, "SQLite history");
    let (cm, cx, found) = timed(|| reader.recall(&compare_q(s.runs + 2)).unwrap());
    check(&found, "SQLite compare");
    println!(
        "  SQLite, {} testruns / two of {} cases: history {:.2} ms (slowest {:.2}), compare {:.1} ms (slowest {:.1})",
        s.runs, s.cases, ms(hm), ms(hx), ms(cm), ms(cx)
    );
    [(hm, hx), (cm, cx)]
}

fn postgres(url: &str, s: &Sizes) -> [(Duration, Duration); 2] {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let settings = PgSettings {
        url: url.to_string(),
        password_file: None,
        ca_file: None,
        statement_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(10),
    };
    let (mut sink, mut reader) = rt.block_on(async {
        let mut db = PgDb::open(&settings).await.unwrap();
        for from in (1..=s.runs).step_by(10_000) {
            db.commit(&runs(from, (from + 10_000).min(s.runs + 1)))
                .await
                .unwrap();
        }
        fill_pg(url, s.runs).await;
        db.commit(&runs(s.runs + 1, s.runs + 3)).await.unwrap();
        (
            ots::server::store::pg::history::PgCases::open(&settings)
                .await
                .unwrap(),
            ots::server::store::pg::history::PgHistory::open(&settings)
                .await
                .unwrap(),
        )
    });
    record_pair(&mut sink, s.runs + 1, s.cases);
    let (hm, hx, found) = timed(|| rt.block_on(reader.recall(&history_q())).unwrap());
    check(&found, "PostgreSQL history");
    let (cm, cx, found) = timed(|| rt.block_on(reader.recall(&compare_q(s.runs + 2))).unwrap());
    check(&found, "PostgreSQL compare");
    println!(
        "  PostgreSQL, {} testruns / two of {} cases: history {:.2} ms (slowest {:.2}), compare {:.1} ms (slowest {:.1})",
        s.runs, s.cases, ms(hm), ms(hx), ms(cm), ms(cx)
    );
    [(hm, hx), (cm, cx)]
}

fn main() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let big = Sizes {
        runs: env("OTS_BENCH_RUNS", 100_000),
        cases: env("OTS_BENCH_CASES", 100_000) as usize,
    };
    let small = Sizes {
        runs: 1000,
        cases: 1000,
    };
    let dir =
        tempfile::tempdir_in(std::env::var("OTS_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .or_else(|_| tempfile::tempdir())
            .unwrap();
    println!("results bench: case_history (limit 20, one series) and compare (window 10)");
    let base = sqlite(&dir.path().join("small"), &small);
    let got = sqlite(&dir.path().join("big"), &big);
    println!(
        "SQLite: history of one case over {} testruns {:.2} ms (1000: {:.2} ms); compare of two testruns of {} cases {:.1} ms (1000 cases: {:.1} ms)",
        big.runs,
        ms(got[0].0),
        ms(base[0].0),
        big.cases,
        ms(got[1].0),
        ms(base[1].0)
    );
    let cluster = pg::cluster();
    let base = postgres(&cluster.database(), &small);
    let got = postgres(&cluster.database(), &big);
    println!(
        "PostgreSQL: history of one case over {} testruns {:.2} ms (1000: {:.2} ms); compare of two testruns of {} cases {:.1} ms (1000 cases: {:.1} ms)",
        big.runs,
        ms(got[0].0),
        ms(base[0].0),
        big.cases,
        ms(got[1].0),
        ms(base[1].0)
    );
}
