//! `ots-submit compare`, `history`, `flaky` and `known`: results across
//! testruns (README "Results"). Every text a peer wrote (case names,
//! messages, labels) is printed with its control characters escaped.

use crate::cli::conn::Conn;
use crate::client::{exit, ClientError};
use crate::protocol::results::{CaseChange, Comparison, KnownOn, KnownRule};
use crate::text::escape_controls;

/// `compare [BASE] RUN`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// `[BASE] RUN`: the testrun, after the one to compare it with
    /// (default: the last finished testrun of its series before it).
    #[arg(num_args = 1..=2, required = true, value_name = "RUN")]
    runs: Vec<String>,
    #[command(flatten)]
    conn: Conn,
}

/// `history CASE`.
#[derive(clap::Args, Debug)]
pub struct HistoryArgs {
    /// The case as `cases` names it (`classname::name`).
    case: String,
    /// Only results of this series.
    #[arg(long)]
    series: Option<String>,
    /// Only results on this device group.
    #[arg(long)]
    group: Option<String>,
    /// Results shown, newest first (at most 500).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=500))]
    limit: u32,
    #[command(flatten)]
    conn: Conn,
}

/// `flaky`.
#[derive(clap::Args, Debug)]
pub struct FlakyArgs {
    /// Only cases on this device group.
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

/// `known …`.
#[derive(clap::Subcommand, Debug)]
pub enum KnownCommand {
    /// List the known-issue rules (those of server.toml have id 0).
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Label failures matching a regular expression (role operator);
    /// they are kept out of regressions.
    Add {
        /// A regular expression (Rust regex syntax), at most 512 bytes.
        #[arg(long = "match", value_name = "REGEX")]
        pattern: String,
        /// What it is matched against: the case's name, its failure
        /// message, or its task's log.
        #[arg(long, default_value = "message", value_parser = ["name", "message", "log"])]
        on: String,
        /// The label shown (a bug id).
        #[arg(long)]
        label: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Remove a rule added with `known add` (role operator).
    Remove {
        id: u64,
        #[command(flatten)]
        conn: Conn,
    },
}

fn json<T: serde::Serialize>(v: &T) {
    crate::outln!("{}", serde_json::to_string_pretty(v).expect("serialises"));
}

pub(crate) async fn compare(args: CompareArgs) -> Result<i32, ClientError> {
    let (base, run) = match args.runs.as_slice() {
        [run] => (None, run.clone()),
        [base, run, ..] => (Some(base.clone()), run.clone()),
        [] => return Ok(exit::USAGE),
    };
    let mut client = args.conn.connect().await?;
    let c = client.compare(&run, base).await?;
    if args.conn.json {
        json(&c);
    } else {
        print_comparison(&c);
    }
    Ok(if c.totals.regressions > 0 {
        exit::FAIL
    } else {
        exit::PASS
    })
}

fn print_comparison(c: &Comparison) {
    let t = &c.totals;
    crate::outln!(
        "{} against {} (series {}): {} cases, {} regressions, {} fixed, {} still failing, {} flaky, {} device-specific, {} known issues, {} new, {} removed",
        c.run,
        c.base.as_deref().unwrap_or("nothing"),
        c.series,
        t.cases,
        t.regressions,
        t.fixed,
        t.still_failing,
        t.flaky,
        t.device_specific,
        t.known,
        t.new_cases,
        t.removed_cases
    );
    if let Some(note) = &c.note {
        crate::outln!("note: {note}");
    }
    let lists: [(&str, &[CaseChange], u64); 8] = [
        ("regressions", &c.regressions, t.regressions),
        ("fixed", &c.fixed, t.fixed),
        ("still failing", &c.still_failing, t.still_failing),
        ("flaky", &c.flaky, t.flaky),
        ("device-specific", &c.device_specific, t.device_specific),
        ("known issues", &c.known, t.known),
        ("new cases", &c.new_cases, t.new_cases),
        ("removed cases", &c.removed_cases, t.removed_cases),
    ];
    for (title, list, total) in lists {
        if list.is_empty() {
            continue;
        }
        crate::outln!("{title}:");
        for x in list {
            crate::outln!("  {}", change_line(x));
        }
        if total > list.len() as u64 {
            crate::outln!("  … and {} more", total - list.len() as u64);
        }
    }
}

fn change_line(x: &CaseChange) -> String {
    let mut line = format!(
        "{:<5} {} {}",
        x.status.map_or("gone", |s| s.as_str()),
        x.task,
        escape_controls(&x.name)
    );
    if let Some(w) = &x.worker {
        line.push_str(&format!(" on {}", escape_controls(w)));
    }
    if let Some(k) = &x.known {
        line.push_str(&format!(" [{}]", escape_controls(k)));
    }
    if let Some(m) = &x.message {
        line.push_str(&format!(" — {}", escape_controls(m)));
    }
    if let Some(p) = &x.last_passed {
        line.push_str(&format!(" (last passed in {p})"));
    }
    if let Some(e) = &x.evidence {
        line.push_str(&format!(" ({})", escape_controls(e)));
    }
    line
}

pub(crate) async fn history(args: HistoryArgs) -> Result<i32, ClientError> {
    let mut client = args.conn.connect().await?;
    let h = client
        .case_history(&args.case, args.series, args.group, args.limit)
        .await?;
    if args.conn.json {
        json(&h);
        return Ok(exit::PASS);
    }
    crate::outln!(
        "{}: last passed in {}, first failed since in {}",
        escape_controls(&h.case),
        h.last_passed.as_deref().unwrap_or("none shown"),
        h.first_failed.as_deref().unwrap_or("none")
    );
    if h.runs.is_empty() {
        crate::outln!("no results recorded for this case");
    }
    for r in &h.runs {
        crate::outln!(
            "{:<5} {:<10} {} on {} ({}) image {}{}{}",
            r.status.as_str(),
            r.run,
            r.task,
            escape_controls(r.worker.as_deref().unwrap_or("?")),
            escape_controls(r.devicegroup.as_deref().unwrap_or("?")),
            escape_controls(r.image.as_deref().unwrap_or("?")),
            r.duration_ms
                .map(|d| format!(", {:.3} s", d as f64 / 1000.0))
                .unwrap_or_default(),
            r.message
                .as_deref()
                .map(|m| format!(" — {}", escape_controls(m)))
                .unwrap_or_default()
        );
    }
    Ok(exit::PASS)
}

pub(crate) async fn flaky(args: FlakyArgs) -> Result<i32, ClientError> {
    let mut client = args.conn.connect().await?;
    let cases = client.flaky(args.group).await?;
    if args.conn.json {
        json(&cases);
        return Ok(exit::PASS);
    }
    if cases.is_empty() {
        crate::outln!("no flaky cases among the recent finished testruns");
    }
    for c in &cases {
        crate::outln!(
            "{} (series {}, image {}): passed {} times, failed in {} — {} on {}",
            escape_controls(&c.name),
            c.series,
            escape_controls(&c.image),
            c.passed,
            c.failed,
            c.failed_in.join(", "),
            escape_controls(&c.workers.join(", "))
        );
    }
    Ok(exit::PASS)
}

pub(crate) async fn known(cmd: KnownCommand) -> Result<i32, ClientError> {
    let (conn, add, remove) = match cmd {
        KnownCommand::List { conn } => (conn, None, None),
        KnownCommand::Add {
            pattern,
            on,
            label,
            conn,
        } => {
            let on: KnownOn = on.parse().unwrap_or(KnownOn::Message);
            let rule = KnownRule {
                id: 0,
                pattern,
                on,
                label,
                by: String::new(),
                added_ms: 0,
            };
            (conn, Some(rule), None)
        }
        KnownCommand::Remove { id, conn } => (conn, None, Some(id)),
    };
    let mut client = conn.connect().await?;
    let rules = client.known(add, remove).await?;
    if conn.json {
        json(&rules);
        return Ok(exit::PASS);
    }
    if rules.is_empty() {
        crate::outln!("no known-issue rules");
    }
    for r in &rules {
        crate::outln!(
            "{:>4} {:<8} {} → {} (by {})",
            r.id,
            r.on.as_str(),
            escape_controls(&r.pattern),
            escape_controls(&r.label),
            escape_controls(&r.by)
        );
    }
    Ok(exit::PASS)
}

/// `report`.
#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// How far back (`30d`, `12h`; at most 400 days).
    #[arg(long, default_value = "30d", value_parser = crate::cli::conn::parse_duration)]
    since: std::time::Duration,
    /// Only this device group.
    #[arg(long)]
    group: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

fn hours(ms: u64) -> String {
    format!("{:.1} h", ms as f64 / 3_600_000.0)
}

fn share(part: u64, whole: u64) -> String {
    if whole == 0 {
        "–".into()
    } else {
        format!("{:.0}%", part as f64 * 100.0 / whole as f64)
    }
}

pub(crate) async fn report(args: ReportArgs) -> Result<i32, ClientError> {
    let now = crate::protocol::limits::unix_ms_now();
    let since_ms = now.saturating_sub(args.since.as_millis() as u64);
    let mut client = args.conn.connect().await?;
    let r = client.report(since_ms, args.group).await?;
    if args.conn.json {
        json(&r);
        return Ok(exit::PASS);
    }
    crate::outln!(
        "since {} ({} ago)",
        crate::clock::human(r.since_ms),
        humantime::format_duration(std::time::Duration::from_secs(args.since.as_secs()))
    );
    let line = |l: &crate::protocol::results::UsageLine| {
        let t = &l.time;
        let total = t.total_ms();
        format!(
            "busy {} ({}), idle {}, leased {}, broken {}, offline {}; {} task attempts ({} passed, {} failed), {} infrastructure errors",
            hours(t.busy_ms),
            share(t.used_ms(), total),
            hours(t.idle_ms),
            hours(t.leased_ms),
            hours(t.broken_ms),
            hours(t.offline_ms),
            t.tasks,
            t.passed,
            t.failed,
            t.infra_errors
        )
    };
    if r.groups.is_empty() {
        crate::outln!("no usage recorded in that time");
    }
    for g in &r.groups {
        crate::outln!("group {}: {}", escape_controls(&g.name), line(g));
        for d in r.devices.iter().filter(|d| d.devicegroup == g.name) {
            crate::outln!("  {}: {}", escape_controls(&d.name), line(d));
        }
    }
    if !r.owners.is_empty() {
        crate::outln!("device hours per owner:");
    }
    for o in &r.owners {
        crate::outln!(
            "  {} on {}: {} ({} testruns, {} leased)",
            escape_controls(&o.owner),
            escape_controls(&o.devicegroup),
            hours(o.busy_ms + o.leased_ms),
            hours(o.busy_ms),
            hours(o.leased_ms)
        );
    }
    Ok(exit::PASS)
}
