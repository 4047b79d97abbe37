//! Charts as SVG made on the server (no script, no font stack: the
//! browser draws the text), for the pages that show results and usage:
//! a case's status per testrun on each worker, a series' cases × workers
//! matrix, and lines over time (the lab's groups, a worker's hours).
//! Every text in them is a peer's and is escaped by `maud`.

use crate::protocol::results::{CaseRun, SeriesMatrix};
use crate::protocol::CaseStatus;
use maud::{html, Markup};

/// Lanes (workers) a case chart draws at most; the rest share one.
const MAX_LANES: usize = 16;

fn status_colour(s: CaseStatus) -> &'static str {
    match s {
        CaseStatus::Pass => "#2e7d32",
        CaseStatus::Fail => "#c62828",
        CaseStatus::Error => "#8e24aa",
        CaseStatus::Skip => "#9e9e9e",
    }
}

/// A case's results (newest first, as `case_history` gives them) as a
/// strip per worker, oldest on the left: one square per result.
pub fn case_history(runs: &[CaseRun]) -> Markup {
    let mut lanes: Vec<String> = Vec::new();
    for r in runs.iter().rev() {
        let w = r.worker.clone().unwrap_or_else(|| "?".into());
        if !lanes.contains(&w) && lanes.len() < MAX_LANES {
            lanes.push(w);
        }
    }
    lanes.sort();
    let lane_of = |r: &CaseRun| {
        let w = r.worker.as_deref().unwrap_or("?");
        lanes.iter().position(|l| l == w).unwrap_or(lanes.len())
    };
    let n_lanes = lanes.len() + usize::from(runs.iter().any(|r| lane_of(r) == lanes.len()));
    let cell = 14.0;
    let left = 90.0;
    let width = (left + cell * runs.len().max(1) as f64 + 10.0).max(320.0);
    let height = 24.0 + cell * n_lanes.max(1) as f64 + 20.0;
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" role="img"
            viewBox={ "0 0 " (width) " " (height) } width=(width) height=(height)
            aria-label="status per testrun, one row per worker" {
            @for (i, l) in lanes.iter().enumerate() {
                text x="4" y=(24.0 + cell * i as f64 + cell * 0.75) font-size="11" { (l) }
            }
            @if n_lanes > lanes.len() {
                text x="4" y=(24.0 + cell * lanes.len() as f64 + cell * 0.75) font-size="11" { "others" }
            }
            @for (i, r) in runs.iter().rev().enumerate() {
                rect x=(left + cell * i as f64) y=(24.0 + cell * lane_of(r) as f64)
                    width=(cell - 2.0) height=(cell - 2.0) fill=(status_colour(r.status))
                    class={ "case " (r.status.as_str()) } {
                    title { (r.run) " " (r.task) " on " (r.worker.as_deref().unwrap_or("?"))
                        ": " (r.status.as_str())
                        @if let Some(m) = &r.message { " — " (m) } }
                }
            }
            text x=(left) y="14" font-size="11" { "oldest" }
            text x=(width - 10.0) y="14" font-size="11" text-anchor="end" { "newest" }
            (legend(height - 6.0))
        }
    }
}

fn legend(y: f64) -> Markup {
    html! {
        @for (i, s) in [CaseStatus::Pass, CaseStatus::Fail, CaseStatus::Error, CaseStatus::Skip].iter().enumerate() {
            rect x=(4.0 + 70.0 * i as f64) y=(y - 9.0) width="10" height="10" fill=(status_colour(*s)) {}
            text x=(18.0 + 70.0 * i as f64) y=(y) font-size="11" { (s.as_str()) }
        }
    }
}

/// A series' cases × workers: each cell's red says how often the case
/// failed on that worker (grey: never ran there).
pub fn matrix(m: &SeriesMatrix) -> Markup {
    let cell = 22.0;
    let left = 320.0;
    let top = 90.0;
    let width = left + cell * m.workers.len().max(1) as f64 + 10.0;
    let height = top + cell * m.cases.len().max(1) as f64 + 10.0;
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" role="img"
            viewBox={ "0 0 " (width) " " (height) } width=(width) height=(height)
            aria-label="failures per case and worker" {
            @for (j, w) in m.workers.iter().enumerate() {
                text font-size="11"
                    transform={ "translate(" (left + cell * j as f64 + cell * 0.7) "," (top - 6.0) ") rotate(-60)" } { (w) }
            }
            @for (i, row) in m.cases.iter().enumerate() {
                text x="4" y=(top + cell * i as f64 + cell * 0.7) font-size="11" {
                    (crate::text::clip_bytes(&row.name, 48))
                }
                @for (j, (passed, failed)) in row.cells.iter().enumerate() {
                    rect x=(left + cell * j as f64) y=(top + cell * i as f64)
                        width=(cell - 2.0) height=(cell - 2.0) fill=(heat(*passed, *failed))
                        class="cell" {
                        title { (row.name) " on " (m.workers.get(j).map_or("?", String::as_str)) ": "
                            (passed) " passed, " (failed) " failed" }
                    }
                }
            }
        }
    }
}

/// White (never failed) to red (always failed); grey when it never ran.
fn heat(passed: u64, failed: u64) -> String {
    let total = passed + failed;
    if total == 0 {
        return "#e0e0e0".into();
    }
    let f = failed as f64 / total as f64;
    let g = (235.0 * (1.0 - f)) as u8 + 20;
    format!("rgb(230,{g},{g})")
}

const PALETTE: [&str; 6] = [
    "#1565c0", "#c62828", "#2e7d32", "#ef6c00", "#6a1b9a", "#00838f",
];

/// Lines over time: `points` are (Unix ms, one value per label); the y
/// axis runs from 0 to the largest value (or `max`).
pub fn lines(
    title: &str,
    labels: &[&str],
    points: &[(u64, Vec<f64>)],
    max: Option<f64>,
    unit: &str,
) -> Markup {
    let (w, h, left, top, bottom) = (640.0, 180.0, 50.0, 22.0, 24.0);
    let (t0, t1) = match (points.first(), points.last()) {
        (Some(a), Some(b)) if b.0 > a.0 => (a.0, b.0),
        (Some(a), _) => (a.0, a.0 + 1),
        _ => (0, 1),
    };
    let top_value = max.unwrap_or_else(|| {
        points
            .iter()
            .flat_map(|(_, v)| v.iter().copied())
            .fold(0.0, f64::max)
            .max(1.0)
    });
    let x = |t: u64| left + (w - left - 10.0) * (t - t0) as f64 / (t1 - t0) as f64;
    let y = |v: f64| top + (h - top - bottom) * (1.0 - (v / top_value).clamp(0.0, 1.0));
    let path = |k: usize| {
        points
            .iter()
            .enumerate()
            .map(|(i, (t, v))| {
                format!(
                    "{}{:.1},{:.1}",
                    if i == 0 { "M" } else { " L" },
                    x(*t),
                    y(v.get(k).copied().unwrap_or(0.0))
                )
            })
            .collect::<String>()
    };
    html! {
        svg.chart xmlns="http://www.w3.org/2000/svg" role="img"
            viewBox={ "0 0 " (w) " " (h) } width=(w) height=(h) aria-label=(title) {
            text x=(left) y="14" font-size="12" font-weight="bold" { (title) }
            line x1=(left) y1=(top) x2=(left) y2=(h - bottom) stroke="#888" {}
            line x1=(left) y1=(h - bottom) x2=(w - 10.0) y2=(h - bottom) stroke="#888" {}
            text x=(left - 4.0) y=(top + 10.0) font-size="10" text-anchor="end" { (format_value(top_value)) (unit) }
            text x=(left - 4.0) y=(h - bottom) font-size="10" text-anchor="end" { "0" }
            @if points.is_empty() {
                text x=(w / 2.0) y=(h / 2.0) font-size="12" text-anchor="middle" { "no data yet" }
            } @else {
                text x=(left) y=(h - 6.0) font-size="10" { (crate::clock::human(t0).get(5..16).unwrap_or("")) }
                text x=(w - 10.0) y=(h - 6.0) font-size="10" text-anchor="end" { (crate::clock::human(t1).get(5..16).unwrap_or("")) }
                @for (k, label) in labels.iter().enumerate() {
                    path d=(path(k)) fill="none" stroke=(PALETTE[k % PALETTE.len()]) stroke-width="1.5" {}
                    @if points.len() < 60 {
                        @for (t, v) in points {
                            circle cx=(format!("{:.1}", x(*t))) cy=(format!("{:.1}", y(v.get(k).copied().unwrap_or(0.0)))) r="2" fill=(PALETTE[k % PALETTE.len()]) {}
                        }
                    }
                    rect x=(w - 160.0) y=(6.0 + 12.0 * k as f64) width="8" height="8" fill=(PALETTE[k % PALETTE.len()]) {}
                    text x=(w - 148.0) y=(14.0 + 12.0 * k as f64) font-size="10" { (label) }
                }
            }
        }
    }
}

fn format_value(v: f64) -> String {
    if v >= 10.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u32, worker: &str, status: CaseStatus) -> CaseRun {
        CaseRun {
            run: format!("r{n}"),
            task: format!("r{n}.1"),
            attempt: 1,
            status,
            duration_ms: None,
            message: Some("<script>x</script>".into()),
            worker: Some(worker.into()),
            devicegroup: None,
            image: None,
            series: None,
            ended_ms: None,
        }
    }

    #[test]
    fn a_case_chart_has_a_square_per_result_in_its_workers_row_and_escapes_text() {
        let runs = [
            run(3, "w3", CaseStatus::Fail),
            run(2, "w1", CaseStatus::Pass),
            run(1, "w3", CaseStatus::Fail),
        ];
        let svg = case_history(&runs).into_string();
        assert_eq!(svg.matches("class=\"case fail\"").count(), 2);
        assert_eq!(svg.matches("class=\"case pass\"").count(), 1);
        assert!(svg.contains("&lt;script&gt;") && !svg.contains("<script>"));
        // w1's row is the first (sorted), w3's the second.
        assert!(svg.contains(">w1</text>") && svg.contains(">w3</text>"));
    }

    #[test]
    fn a_matrix_cell_is_redder_the_more_it_failed() {
        assert_eq!(heat(0, 0), "#e0e0e0");
        assert_eq!(heat(5, 0), "rgb(230,255,255)");
        assert_eq!(heat(0, 5), "rgb(230,20,20)");
    }

    #[test]
    fn lines_draw_one_path_per_label() {
        let pts = vec![(0, vec![1.0, 2.0]), (60_000, vec![3.0, 1.0])];
        let svg = lines("t", &["a", "b"], &pts, None, "").into_string();
        assert_eq!(svg.matches("<path").count(), 2);
        let empty = lines("t", &["a"], &[], None, "").into_string();
        assert!(empty.contains("no data yet"));
    }
}
