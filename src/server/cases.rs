//! Test cases out of JUnit XML, without I/O: one pass over a result file
//! gives its counts (what the verdict needs) and, bounded, its cases —
//! suite, name (`classname::name`, as pytest and ctest write them),
//! status, duration and the first line of the failure message.
//!
//! Read as the dialects write it: pytest (`<skipped type="pytest.xfail">`
//! for xfail, parametrized ids in the name), ctest, `go-junit-report`,
//! JUnit 4/5 (`<testsuites>` or a bare `<testsuite>`, nested suites). What
//! a bound cuts is counted and said, never silently lost.

use crate::protocol::{CaseCounts, CaseStatus};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Why a result file could not be read as JUnit XML.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not valid JUnit XML at byte {position}: {reason}")]
pub struct JunitError {
    pub position: u64,
    pub reason: String,
}

/// How much of a file's cases is kept.
#[derive(Clone, Copy, Debug)]
pub struct CaseBounds {
    /// Cases kept (all are counted).
    pub max_cases: usize,
    /// Bytes of a case's suite and name; of its message's first line.
    pub max_name_bytes: usize,
    pub max_message_bytes: usize,
}

impl Default for CaseBounds {
    fn default() -> Self {
        CaseBounds {
            max_cases: 250_000,
            max_name_bytes: crate::protocol::limits::MAX_CASE_NAME_BYTES,
            max_message_bytes: crate::protocol::limits::MAX_CASE_MESSAGE_BYTES,
        }
    }
}

/// Enclosing `<testsuite>`s tracked at most; cases of deeper ones take
/// the innermost name tracked (a file nesting suites a million deep
/// costs no more memory than one nesting them 64 deep).
const MAX_SUITE_DEPTH: usize = 64;

/// One test case as a result file says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Case {
    /// Shared by the cases of one suite (one copy, however many cases).
    pub suite: std::sync::Arc<str>,
    pub name: String,
    pub status: CaseStatus,
    pub duration_ms: Option<u64>,
    pub message: Option<String>,
    /// Where the task's log shows the case (a failing one's), in bytes:
    /// set by the file desk, which has the log.
    pub log_offset: Option<u64>,
}

/// A file's cases: all counted, the first `max_cases` kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cases {
    pub counts: CaseCounts,
    pub cases: Vec<Case>,
    /// Cases not kept (past `max_cases`), and names or messages cut.
    pub cases_cut: u64,
    pub fields_cut: u64,
}

/// The case being read: its element's depth, and what it said so far.
struct Open {
    depth: usize,
    case: Case,
    /// The first failure/error/skipped child's element, to read its text
    /// when it has no `message` attribute.
    reading_text: Option<usize>,
}

fn attr(e: &BytesStart<'_>, name: &[u8]) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.as_ref() == name)
        .map(|a| match a.unescape_value() {
            Ok(v) => v.into_owned(),
            Err(_) => String::from_utf8_lossy(&a.value).into_owned(),
        })
}

/// `text` cut to `max` bytes at a character boundary; whether it was cut.
fn bounded(text: &str, max: usize) -> (String, bool) {
    let kept = crate::text::clip_bytes(text, max);
    (kept.to_string(), kept.len() < text.len())
}

impl Cases {
    fn field(&mut self, text: &str, max: usize) -> String {
        let (kept, cut) = bounded(text, max);
        if cut {
            self.fields_cut += 1;
        }
        kept
    }

    /// The first non-blank line of `text`, bounded.
    fn first_line(&mut self, text: &str, max: usize) -> Option<String> {
        let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
        Some(self.field(line, max))
    }
}

/// Reads a JUnit file; `Ok(None)` for well-formed XML of another kind.
pub fn parse(xml: &[u8], bounds: &CaseBounds) -> Result<Option<Cases>, JunitError> {
    let mut reader = Reader::from_reader(xml);
    let mut out = Cases::default();
    let mut buf = Vec::new();
    let mut suites: Vec<(usize, std::sync::Arc<str>)> = Vec::new();
    let mut open: Option<Open> = None;
    let mut depth = 0usize;
    let mut saw_root = false;
    loop {
        let event = reader.read_event_into(&mut buf).map_err(|e| JunitError {
            position: reader.buffer_position(),
            reason: e.to_string(),
        })?;
        match &event {
            Event::Start(e) | Event::Empty(e) => {
                let opens = matches!(event, Event::Start(_));
                let name = e.name().as_ref().to_vec();
                if !saw_root {
                    if name != b"testsuites" && name != b"testsuite" {
                        return Ok(None);
                    }
                    saw_root = true;
                }
                element(
                    &mut out,
                    bounds,
                    e,
                    &name,
                    depth,
                    opens,
                    &mut suites,
                    &mut open,
                );
                if opens {
                    depth += 1;
                }
            }
            Event::Text(t) => {
                if let Some(o) = open.as_mut().filter(|o| o.reading_text.is_some()) {
                    let text = t.unescape().map(|c| c.into_owned()).unwrap_or_default();
                    if o.case.message.is_none() {
                        o.case.message = out.first_line(&text, bounds.max_message_bytes);
                    }
                }
            }
            Event::CData(c) => {
                if let Some(o) = open.as_mut().filter(|o| o.reading_text.is_some()) {
                    let text = String::from_utf8_lossy(c.as_ref()).into_owned();
                    if o.case.message.is_none() {
                        o.case.message = out.first_line(&text, bounds.max_message_bytes);
                    }
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                if let Some(o) = open.as_mut() {
                    if o.reading_text == Some(depth) {
                        o.reading_text = None;
                    }
                }
                if open.as_ref().is_some_and(|o| o.depth == depth) {
                    let o = open.take().expect("checked");
                    keep(&mut out, bounds, o.case);
                }
                if suites.last().is_some_and(|(d, _)| *d == depth) {
                    suites.pop();
                }
            }
            Event::Eof => break,
            _ => {}
        }
        buf.clear();
    }
    if !saw_root {
        return Err(JunitError {
            position: 0,
            reason: "no <testsuites> or <testsuite> element".into(),
        });
    }
    if let Some(o) = open.take() {
        keep(&mut out, bounds, o.case);
    }
    Ok(Some(out))
}

/// One start (or empty) element.
#[allow(clippy::too_many_arguments)]
fn element(
    out: &mut Cases,
    bounds: &CaseBounds,
    e: &BytesStart<'_>,
    name: &[u8],
    depth: usize,
    opens: bool,
    suites: &mut Vec<(usize, std::sync::Arc<str>)>,
    open: &mut Option<Open>,
) {
    match name {
        b"testsuite" if opens && suites.len() < MAX_SUITE_DEPTH => {
            let suite = attr(e, b"name").unwrap_or_default();
            suites.push((depth, out.field(&suite, bounds.max_name_bytes).into()));
        }
        b"testcase" => {
            out.counts.cases += 1;
            let n = attr(e, b"name").unwrap_or_default();
            let full = match attr(e, b"classname").filter(|c| !c.is_empty()) {
                Some(class) => format!("{class}::{n}"),
                None => n,
            };
            let suite = suites.last().map_or_else(|| "".into(), |(_, s)| s.clone());
            let case = Case {
                suite,
                name: out.field(&full, bounds.max_name_bytes),
                status: CaseStatus::Pass,
                duration_ms: attr(e, b"time")
                    .and_then(|t| t.trim().parse::<f64>().ok())
                    .filter(|s| s.is_finite() && *s >= 0.0)
                    .map(|s| (s * 1000.0).min(u64::MAX as f64) as u64),
                message: None,
                log_offset: None,
            };
            if opens {
                *open = Some(Open {
                    depth,
                    case,
                    reading_text: None,
                });
            } else {
                keep(out, bounds, case);
            }
        }
        b"failure" | b"error" | b"skipped" => {
            let Some(o) = open.as_mut() else { return };
            if o.case.status != CaseStatus::Pass {
                return;
            }
            o.case.status = match name {
                b"failure" => CaseStatus::Fail,
                b"error" => CaseStatus::Error,
                _ => CaseStatus::Skip,
            };
            match o.case.status {
                CaseStatus::Fail => out.counts.failures += 1,
                CaseStatus::Error => out.counts.errors += 1,
                _ => out.counts.skipped += 1,
            }
            let message = attr(e, b"message").filter(|m| !m.trim().is_empty());
            let o = open.as_mut().expect("open");
            match message {
                Some(m) => o.case.message = out.first_line(&m, bounds.max_message_bytes),
                None if opens => o.reading_text = Some(depth),
                None => {}
            }
        }
        _ => {}
    }
}

/// Keeps a case read whole, within the bound.
fn keep(out: &mut Cases, bounds: &CaseBounds, case: Case) {
    if out.cases.len() < bounds.max_cases {
        out.cases.push(case);
    } else {
        out.cases_cut += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases(xml: &str) -> Cases {
        parse(xml.as_bytes(), &CaseBounds::default())
            .unwrap()
            .unwrap()
    }

    #[test]
    fn pytest_dialect_names_statuses_durations_and_messages() {
        let c = cases(
            r#"<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1" skipped="2" tests="5" time="0.1">
<testcase classname="test_m" name="test_ok[1-2]" time="0.002"/>
<testcase classname="test_m" name="test_bad" time="0.010"><failure message="assert 1 == 2&#10;more">def test_bad(): ...</failure></testcase>
<testcase classname="test_m" name="test_skip" time="0"><skipped type="pytest.skip" message="not here">skip</skipped></testcase>
<testcase classname="test_m" name="test_xfail" time="0.001"><skipped type="pytest.xfail" message="known" /></testcase>
<testcase classname="test_m" name="test_err" time="0.001"><error><![CDATA[

Traceback: boom
second line]]></error></testcase>
</testsuite></testsuites>"#,
        );
        assert_eq!(
            (
                c.counts.cases,
                c.counts.failures,
                c.counts.errors,
                c.counts.skipped
            ),
            (5, 1, 1, 2)
        );
        let names: Vec<&str> = c.cases.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "test_m::test_ok[1-2]",
                "test_m::test_bad",
                "test_m::test_skip",
                "test_m::test_xfail",
                "test_m::test_err"
            ]
        );
        assert_eq!(c.cases[0].status, CaseStatus::Pass);
        assert_eq!(c.cases[0].duration_ms, Some(2));
        assert_eq!(&*c.cases[0].suite, "pytest");
        assert_eq!(c.cases[1].status, CaseStatus::Fail);
        assert_eq!(c.cases[1].message.as_deref(), Some("assert 1 == 2"));
        assert_eq!(c.cases[3].status, CaseStatus::Skip);
        assert_eq!(c.cases[4].status, CaseStatus::Error);
        assert_eq!(c.cases[4].message.as_deref(), Some("Traceback: boom"));
    }

    #[test]
    fn bounds_cut_and_count() {
        let bounds = CaseBounds {
            max_cases: 2,
            max_name_bytes: 8,
            max_message_bytes: 4,
        };
        let c = parse(
            r#"<testsuite name="s"><testcase name="aaaaaaaaaaaé"/><testcase name="b"><failure message="long message"/></testcase><testcase name="c"/></testsuite>"#.as_bytes(),
            &bounds,
        )
        .unwrap()
        .unwrap();
        assert_eq!(c.counts.cases, 3, "every case counted");
        assert_eq!(c.cases.len(), 2);
        assert_eq!(c.cases_cut, 1);
        assert_eq!(c.cases[0].name, "aaaaaaaa");
        assert_eq!(c.cases[1].message.as_deref(), Some("long"));
        assert_eq!(c.fields_cut, 2);
    }

    #[test]
    fn deeply_nested_suites_cost_no_more_than_the_bound() {
        let depth = 100_000;
        let xml = format!(
            "{}<testcase name=\"deep\"/>{}",
            "<testsuite name=\"s\">".repeat(depth),
            "</testsuite>".repeat(depth)
        );
        let c = parse(xml.as_bytes(), &CaseBounds::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.counts.cases, 1);
        assert_eq!(&*c.cases[0].suite, "s");
    }

    #[test]
    fn other_xml_is_not_junit_and_garbage_is_an_error() {
        assert_eq!(parse(b"<html/>", &CaseBounds::default()).unwrap(), None);
        assert!(parse(
            b"<testsuite><testcase name='a'></testsuite>",
            &CaseBounds::default()
        )
        .is_err());
        assert!(parse(b"", &CaseBounds::default()).is_err());
    }
}

#[cfg(test)]
mod dialects {
    use super::*;

    /// A report as `go-junit-report` writes it (checked into `tests/data`).
    #[test]
    fn a_go_junit_report() {
        let xml = include_str!("../../tests/data/go-junit-report.xml");
        let c = parse(xml.as_bytes(), &CaseBounds::default())
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.counts.cases, c.counts.failures, c.counts.skipped),
            (4, 1, 1)
        );
        assert_eq!(c.cases[1].name, "example.org/lab/netcheck::TestDHCP/ipv4");
        assert_eq!(&*c.cases[1].suite, "example.org/lab/netcheck");
        assert_eq!(c.cases[1].status, CaseStatus::Fail);
        assert_eq!(c.cases[1].message.as_deref(), Some("Failed"));
        assert_eq!(c.cases[1].duration_ms, Some(300));
        assert_eq!(c.cases[2].status, CaseStatus::Skip);
    }

    /// JUnit 5's console launcher: nested suites, a bare `<testsuite>`
    /// root, `<system-out>` beside the cases.
    #[test]
    fn a_junit5_report() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuite name="JUnit Jupiter" tests="2" skipped="0" failures="1" errors="0" time="0.05">
<properties><property name="java.version" value="21"/></properties>
<testcase name="adds()" classname="org.lab.CalcTest" time="0.01"/>
<testcase name="divides()" classname="org.lab.CalcTest" time="0.02">
<failure message="expected: &lt;2&gt; but was: &lt;3&gt;" type="org.opentest4j.AssertionFailedError">org.opentest4j.AssertionFailedError: expected: &lt;2&gt; but was: &lt;3&gt;</failure>
<system-out><![CDATA[unique-id: [engine:junit-jupiter]]]></system-out>
</testcase>
</testsuite>"#;
        let c = parse(xml.as_bytes(), &CaseBounds::default())
            .unwrap()
            .unwrap();
        assert_eq!(c.cases.len(), 2);
        assert_eq!(c.cases[1].name, "org.lab.CalcTest::divides()");
        assert_eq!(
            c.cases[1].message.as_deref(),
            Some("expected: <2> but was: <3>")
        );
    }
}
