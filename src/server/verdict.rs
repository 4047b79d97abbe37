//! Verdict rules (OTS): a task's verdict comes from the conductor's exit
//! status and its JUnit XML result files; a testrun's from its tasks.
//!
//! Conductor exit status convention (docs/PROTOCOL.md §7):
//! `0` tests ran (verdict from JUnit), `1` tests ran and some failed,
//! anything else or a signal: the conductor or the device failed (ERROR).
//! JUnit `<failure>` and `<error>` elements both make a case fail: they are
//! about the software under test, not the test infrastructure.

use crate::protocol::{CaseCounts, Outcome, Verdict};

pub use crate::server::cases::JunitError;

/// Largest result file parsed as JUnit (bytes past it are not read).
pub const MAX_JUNIT_BYTES: u64 = 64 * 1024 * 1024;

/// Counts `<testcase>` elements and their `<failure>`, `<error>` and
/// `<skipped>` children. Works for `<testsuites>` and bare `<testsuite>`;
/// `Ok(None)` for well-formed XML of another kind (not a JUnit file).
pub fn parse_junit(xml: &[u8]) -> Result<Option<CaseCounts>, JunitError> {
    let bounds = crate::server::cases::CaseBounds {
        max_cases: 0,
        ..Default::default()
    };
    Ok(crate::server::cases::parse(xml, &bounds)?.map(|c| c.counts))
}

/// "1 test case", "3 test cases".
fn cases(n: u64) -> String {
    format!("{n} test case{}", if n == 1 { "" } else { "s" })
}

/// The verdict of one task and the one-line reason for it.
pub fn task_verdict(
    outcome: &Outcome,
    timeout_secs: u64,
    junit: Result<Option<CaseCounts>, String>,
) -> (Verdict, String) {
    if let Some(failure) = &outcome.failure {
        return (
            Verdict::Error,
            format!("conductor could not run: {failure}"),
        );
    }
    if outcome.timed_out {
        return (
            Verdict::Error,
            format!("execution timeout: conductor still running after {timeout_secs} s, process group killed"),
        );
    }
    if let Some(signal) = outcome.signal {
        return (
            Verdict::Error,
            format!("conductor killed by signal {signal}"),
        );
    }
    match outcome.exit_code {
        Some(0) | Some(1) => {}
        Some(code) => {
            return (
                Verdict::Error,
                format!(
                    "conductor failed with exit status {code} (device or infrastructure error)"
                ),
            )
        }
        None => {
            return (
                Verdict::Error,
                "conductor ended without an exit status".into(),
            )
        }
    }
    let counts = match junit {
        Err(reason) => return (Verdict::Error, reason),
        Ok(counts) => counts.unwrap_or_default(),
    };
    let failed = counts.failures + counts.errors;
    if failed > 0 {
        return (
            Verdict::Fail,
            format!("{failed} of {} failed", cases(counts.cases)),
        );
    }
    if outcome.exit_code == Some(1) {
        return (
            Verdict::Fail,
            "conductor reported failures (exit status 1)".into(),
        );
    }
    if counts.cases == 0 {
        return (
            Verdict::Fail,
            "no test cases found in the result files".into(),
        );
    }
    (Verdict::Pass, format!("{} passed", cases(counts.cases)))
}

/// Testrun verdict: ERROR if any task errored, else FAIL if any failed or
/// no test case was found at all, else PASS. `None` for no tasks.
pub fn run_verdict<'a>(
    tasks: impl IntoIterator<Item = (Verdict, Option<&'a CaseCounts>)>,
) -> Option<Verdict> {
    let mut worst = None;
    let mut cases = 0;
    for (verdict, counts) in tasks {
        worst = worst.max(Some(verdict));
        cases += counts.map_or(0, |c| c.cases);
    }
    match worst {
        Some(Verdict::Pass) if cases == 0 => Some(Verdict::Fail),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> Outcome {
        Outcome {
            exit_code: Some(code),
            ..Outcome::default()
        }
    }

    const PASSING: &str = r#"<?xml version="1.0"?>
<testsuites><testsuite name="smoke" tests="2">
  <testcase name="a"/>
  <testcase name="b"><system-out>ok</system-out></testcase>
</testsuite></testsuites>"#;

    const FAILING: &str = r#"<testsuite name="net">
  <testcase name="a"><failure message="boom">trace</failure><error/></testcase>
  <testcase name="b"><error message="x"/></testcase>
  <testcase name="c"><skipped/></testcase>
  <testcase name="d"/>
</testsuite>"#;

    #[test]
    fn junit_counts_cases_failures_errors_and_skips() {
        assert_eq!(
            parse_junit(PASSING.as_bytes()).unwrap(),
            Some(CaseCounts {
                cases: 2,
                failures: 0,
                errors: 0,
                skipped: 0
            })
        );
        assert_eq!(
            parse_junit(FAILING.as_bytes()).unwrap(),
            Some(CaseCounts {
                cases: 4,
                failures: 1,
                errors: 1,
                skipped: 1
            })
        );
        assert_eq!(
            parse_junit(b"<environment><os/></environment>").unwrap(),
            None
        );
    }

    #[test]
    fn junit_garbage_is_an_error_not_a_panic() {
        assert!(parse_junit(b"").is_err());
        assert!(parse_junit(b"<testsuite><testcase></testsuite>").is_err());
        assert!(parse_junit(&[0xff, 0xfe, 0x00]).is_err());
    }

    #[test]
    fn task_verdict_follows_exit_status_then_junit() {
        let pass = CaseCounts {
            cases: 3,
            ..Default::default()
        };
        let fail = CaseCounts {
            cases: 3,
            failures: 1,
            ..Default::default()
        };
        assert_eq!(task_verdict(&exit(0), 60, Ok(Some(pass))).0, Verdict::Pass);
        assert_eq!(task_verdict(&exit(0), 60, Ok(Some(fail))).0, Verdict::Fail);
        assert_eq!(task_verdict(&exit(1), 60, Ok(Some(pass))).0, Verdict::Fail);
        assert_eq!(task_verdict(&exit(0), 60, Ok(None)).0, Verdict::Fail);
        assert_eq!(task_verdict(&exit(3), 60, Ok(Some(pass))).0, Verdict::Error);
        assert_eq!(
            task_verdict(&exit(0), 60, Err("bad xml".into())).0,
            Verdict::Error
        );
        let crashed = Outcome {
            signal: Some(11),
            ..Outcome::default()
        };
        let (v, reason) = task_verdict(&crashed, 60, Ok(Some(pass)));
        assert_eq!(
            (v, reason.as_str()),
            (Verdict::Error, "conductor killed by signal 11")
        );
        let timed_out = Outcome {
            signal: Some(9),
            timed_out: true,
            ..Outcome::default()
        };
        assert!(task_verdict(&timed_out, 60, Ok(None))
            .1
            .contains("execution timeout"));
    }

    #[test]
    fn run_verdict_is_worst_task_and_fail_without_cases() {
        let some = CaseCounts {
            cases: 1,
            ..Default::default()
        };
        let none = CaseCounts::default();
        assert_eq!(
            run_verdict([(Verdict::Pass, Some(&some)), (Verdict::Pass, Some(&none))]),
            Some(Verdict::Pass)
        );
        assert_eq!(
            run_verdict([(Verdict::Pass, Some(&none))]),
            Some(Verdict::Fail)
        );
        assert_eq!(
            run_verdict([(Verdict::Fail, Some(&some)), (Verdict::Error, None)]),
            Some(Verdict::Error)
        );
        assert_eq!(
            run_verdict([(Verdict::Pass, Some(&some)), (Verdict::Fail, Some(&some))]),
            Some(Verdict::Fail)
        );
        assert_eq!(run_verdict([]), None);
    }
}
