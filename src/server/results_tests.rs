use super::*;
use crate::protocol::results::{KnownOn, KnownRule};

fn row(task: &str, attempt: u32, name: &str, status: CaseStatus, worker: &str) -> CaseRow {
    CaseRow {
        task: task.into(),
        attempt,
        name: name.into(),
        status,
        message: status.failed().then(|| format!("{name} broke")),
        worker: Some(worker.into()),
        devicegroup: Some("g".into()),
    }
}

fn seen(num: u64, name: &str, status: CaseStatus, worker: &str, image: &str) -> WindowRow {
    WindowRow {
        num,
        run: format!("r{num}"),
        name: name.into(),
        status,
        worker: Some(worker.into()),
        devicegroup: Some("g".into()),
        image: Some(image.into()),
    }
}

use CaseStatus::{Fail, Pass, Skip};

fn run(
    cases: Vec<CaseRow>,
    base: Vec<CaseRow>,
    window: &[WindowRow],
    known: &KnownRules,
) -> Triage {
    compare(Compare {
        run: "r9".into(),
        base: Some("r8".into()),
        series: "s".into(),
        cases,
        base_cases: base,
        window,
        known,
        logs: &HashMap::new(),
    })
}

fn names(list: &[CaseChange]) -> Vec<&str> {
    list.iter().map(|c| c.name.as_str()).collect()
}

#[test]
fn a_case_failing_now_and_passing_in_the_base_is_a_regression_and_the_reverse_is_fixed() {
    let t = run(
        vec![
            row("r9.1", 1, "a", Fail, "w1"),
            row("r9.1", 1, "b", Pass, "w1"),
            row("r9.1", 1, "c", Fail, "w1"),
            row("r9.1", 1, "new", Pass, "w1"),
        ],
        vec![
            row("r8.1", 1, "a", Pass, "w1"),
            row("r8.1", 1, "b", Fail, "w1"),
            row("r8.1", 1, "c", Fail, "w1"),
            row("r8.1", 1, "gone", Pass, "w1"),
        ],
        &[],
        &KnownRules::default(),
    );
    let c = &t.comparison;
    assert_eq!(names(&c.regressions), ["a"]);
    assert_eq!(names(&c.fixed), ["b"]);
    assert_eq!(names(&c.still_failing), ["c"]);
    assert_eq!(names(&c.new_cases), ["new"]);
    assert_eq!(names(&c.removed_cases), ["gone"]);
    assert_eq!(c.totals.cases, 4);
    assert_eq!(c.totals.regressions, 1);
    assert!(c.note.is_none());
}

#[test]
fn the_same_name_in_another_task_is_another_case() {
    let t = run(
        vec![row("r9.2", 1, "a", Fail, "w1")],
        vec![row("r8.1", 1, "a", Fail, "w1")],
        &[],
        &KnownRules::default(),
    );
    assert_eq!(names(&t.comparison.regressions), ["a"]);
    assert_eq!(names(&t.comparison.removed_cases), ["a"]);
}

#[test]
fn a_case_that_passed_and_failed_on_one_image_is_flaky_not_a_regression() {
    let window = [
        seen(7, "a", Pass, "w1", "img1"),
        seen(8, "a", Pass, "w1", "img1"),
        seen(9, "a", Fail, "w1", "img1"),
    ];
    let t = run(
        vec![row("r9.1", 1, "a", Fail, "w1")],
        vec![row("r8.1", 1, "a", Pass, "w1")],
        &window,
        &KnownRules::default(),
    );
    assert!(t.comparison.regressions.is_empty());
    assert_eq!(names(&t.comparison.flaky), ["a"]);
    assert!(t.comparison.flaky[0]
        .evidence
        .as_deref()
        .unwrap()
        .contains("img1"));
    // On a new image the same failure is a regression.
    let window = [
        seen(8, "a", Pass, "w1", "img1"),
        seen(9, "a", Fail, "w1", "img2"),
    ];
    let t = run(
        vec![row("r9.1", 1, "a", Fail, "w1")],
        vec![row("r8.1", 1, "a", Pass, "w1")],
        &window,
        &KnownRules::default(),
    );
    assert_eq!(names(&t.comparison.regressions), ["a"]);
}

#[test]
fn a_case_that_passed_on_an_automatic_retry_is_flaky() {
    let t = run(
        vec![
            row("r9.1", 1, "a", Fail, "w1"),
            row("r9.1", 2, "a", Pass, "w2"),
            row("r9.1", 1, "s", Skip, "w1"),
            row("r9.1", 2, "s", Pass, "w2"),
        ],
        vec![row("r8.1", 1, "a", Pass, "w1")],
        &[],
        &KnownRules::default(),
    );
    assert_eq!(names(&t.comparison.flaky), ["a"]);
    assert!(t.comparison.regressions.is_empty() && t.comparison.fixed.is_empty());
}

#[test]
fn a_case_failing_only_on_one_worker_of_its_group_is_device_specific_and_a_suspect() {
    let window = [
        seen(5, "net", Pass, "w1", "i5"),
        seen(6, "net", Pass, "w2", "i6"),
        seen(7, "net", Fail, "w3", "i7"),
        seen(8, "net", Pass, "w1", "i8"),
        seen(9, "net", Fail, "w3", "i9"),
    ];
    let t = run(
        vec![row("r9.1", 1, "net", Fail, "w3")],
        vec![row("r8.1", 1, "net", Pass, "w1")],
        &window,
        &KnownRules::default(),
    );
    assert_eq!(names(&t.comparison.device_specific), ["net"]);
    assert_eq!(t.suspects, [("w3".to_string(), "net".to_string())]);
    let why = t.comparison.device_specific[0].evidence.clone().unwrap();
    assert!(
        why.contains("only on w3") && why.contains("w1, w2"),
        "{why}"
    );
    // Failing on two workers: not one device's fault.
    let mut window = window.to_vec();
    window.push(seen(4, "net", Fail, "w2", "i4"));
    let t = run(
        vec![row("r9.1", 1, "net", Fail, "w3")],
        vec![row("r8.1", 1, "net", Pass, "w1")],
        &window,
        &KnownRules::default(),
    );
    assert!(t.suspects.is_empty());
    assert_eq!(names(&t.comparison.regressions), ["net"]);
}

#[test]
fn a_known_issue_labels_a_failure_and_keeps_it_out_of_regressions() {
    let known = KnownRules::new([
        KnownRule {
            id: 1,
            pattern: "^a broke$".into(),
            on: KnownOn::Message,
            label: "BUG-1".into(),
            by: "op".into(),
            added_ms: 0,
        },
        KnownRule {
            id: 2,
            pattern: "(".into(), // does not compile: left out
            on: KnownOn::Name,
            label: "BAD".into(),
            by: "op".into(),
            added_ms: 0,
        },
    ]);
    assert_eq!(known.list().count(), 1);
    let t = run(
        vec![
            row("r9.1", 1, "a", Fail, "w1"),
            row("r9.1", 1, "b", Fail, "w1"),
        ],
        vec![],
        &[],
        &known,
    );
    assert_eq!(names(&t.comparison.known), ["a"]);
    assert_eq!(t.comparison.known[0].known.as_deref(), Some("BUG-1"));
    assert_eq!(names(&t.comparison.regressions), ["b"]);
}

#[test]
fn without_a_base_every_failure_is_a_regression_and_the_note_says_why() {
    let t = compare(Compare {
        run: "r1".into(),
        base: None,
        series: "s".into(),
        cases: vec![
            row("r1.1", 1, "a", Fail, "w1"),
            row("r1.1", 1, "b", Pass, "w1"),
        ],
        base_cases: vec![],
        window: &[],
        known: &KnownRules::default(),
        logs: &HashMap::new(),
    });
    assert_eq!(names(&t.comparison.regressions), ["a"]);
    assert!(t.comparison.new_cases.is_empty());
    assert!(t
        .comparison
        .note
        .unwrap()
        .contains("no earlier finished testrun"));
}

#[test]
fn lists_are_bounded_and_totals_count_everything() {
    let cases: Vec<CaseRow> = (0..MAX_TRIAGED + 50)
        .map(|i| row("r9.1", 1, &format!("c{i:05}"), Fail, "w1"))
        .collect();
    let t = run(cases.clone(), vec![], &[], &KnownRules::default());
    assert_eq!(t.comparison.regressions.len(), MAX_COMPARED_LISTED);
    assert_eq!(t.comparison.totals.regressions, (MAX_TRIAGED + 50) as u64);
    assert!(t.comparison.note.unwrap().contains("50 failing cases"));
    assert_eq!(failing_names(&cases).len(), MAX_TRIAGED);
}

#[test]
fn hostile_patterns_are_refused() {
    assert!(compile_pattern("").is_err());
    assert!(compile_pattern(&"a".repeat(600)).is_err());
    assert!(compile_pattern("a{1000}{1000}").is_err());
    assert!(compile_pattern("timeout .* waiting").is_ok());
}
