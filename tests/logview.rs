//! Issue 38: the log viewer on a log of a million lines, written by a
//! real conductor through a real worker and server, read in headless
//! Chromium: the first line, a permalinked middle line and the last line
//! each shown within a second of asking; a whole-log search with its
//! exact count, opening its 1000th match; ANSI red drawn red; folds; no
//! horizontal scroll at 390 px; the raw log streamed whole.

mod common;

use common::browser::Browser;
use common::*;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(120);
const LINES: u64 = 1_000_000;

/// A million lines: a WARNING in red every 500th (2000 in all), a fold
/// around the first 20 lines, one very long token.
fn million(dir: &std::path::Path) -> String {
    script(
        dir,
        "million.sh",
        &format!(
            "awk 'BEGIN {{ print \"::group::package setup\"; \
               for (i = 2; i <= {LINES}; i++) {{ \
                 if (i == 20) print \"::endgroup::\"; \
                 else if (i % 500 == 0) printf \"line %d WARNING \\033[31mred alert\\033[0m done\\n\", i; \
                 else if (i == 21) {{ printf \"line 21 \"; for (k = 0; k < 400; k++) printf \"x\"; print \"\" }} \
                 else print \"line \" i \" of the test output\" }} }}'"
        ),
    )
    .display()
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_line_log_is_read_by_line_number_search_and_colour() {
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start_web_lab(dir.path(), "");
    let conductor = million(dir.path());
    let _w = start_worker(
        dir.path(),
        "lv-w1",
        "devicegroup:logs",
        &server,
        &[&conductor],
        &[],
    );
    wait_for_workers(&server, LIMIT, all_idle(&["lv-w1"]));
    wait_allowed(&server, "lvalice");
    let out = server.as_user("lvalice").submit(
        &[
            "run",
            "--device",
            "devicegroup:logs",
            "--image",
            "img",
            "--packages",
            "p",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = text(&out.stdout).trim().to_string();
    let st = wait_status(&server, &run, Duration::from_secs(300), finished);
    let task = st["tasks"][0]["task"].as_str().unwrap().to_string();
    assert!(
        st["tasks"][0]["log_lines_stored"].as_u64().unwrap() >= LINES,
        "{st}"
    );

    // The raw log is the whole log, streamed: what the pages are checked against.
    let session = common::http::sign_in(&web_link(&server, "lvalice"));
    let raw = common::http::get(&base, &format!("/tasks/{task}/log.txt"), Some(&session));
    assert_eq!(raw.status, 200);
    assert!(raw
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(raw.header("x-content-type-options"), Some("nosniff"));
    // Every page has its icon; a wrong path says so with the way back.
    let icon = common::http::get(&base, "/favicon.ico", None);
    assert_eq!(
        (icon.status, icon.header("content-type")),
        (200, Some("image/svg+xml"))
    );
    let lost = common::http::get(&base, "/no/such/page", Some(&session));
    assert_eq!(lost.status, 404);
    assert!(lost.text().contains("href=\"/runs\""), "{}", lost.text());
    let all = String::from_utf8(raw.body).unwrap();
    let lines: Vec<&str> = all.split_terminator('\n').collect();
    let total = lines.len() as u64;
    assert!(total >= LINES, "{total} lines");
    // The worker's own lines come before and after the conductor's.
    let middle_no = lines
        .iter()
        .position(|l| *l == "line 500001 of the test output")
        .unwrap() as u64
        + 1;
    let warnings: Vec<u64> = (1..=total)
        .filter(|n| lines[*n as usize - 1].contains("WARNING"))
        .collect();
    assert_eq!(warnings.len(), 2000);

    let b = Browser::start().await;
    let c = &b.client;
    let log = format!("{base}/tasks/{task}/log");
    // A deep link opened before signing in is where sign-in leads.
    b.open(&format!("{log}?q=WARNING&m=2")).await;
    assert!(c.source().await.unwrap().contains("ots-submit web"));
    b.open(&web_link(&server, "lvalice")).await;
    b.wait_js(
        "document.querySelector('.who') && document.getElementById('match-no')",
        LIMIT,
    )
    .await;
    let landed = c.current_url().await.unwrap();
    assert!(
        landed
            .as_str()
            .ends_with(&format!("/tasks/{task}/log?q=WARNING&m=2")),
        "{landed}"
    );

    // Each shown within a second of asking (navigation to the line in view).
    let timed = |what: &'static str, url: String, line: u64| {
        let b = &b;
        async move {
            let t0 = Instant::now();
            b.open(&url).await;
            b.wait_js(&format!("document.getElementById('L{line}')"), LIMIT)
                .await;
            let took = t0.elapsed();
            println!(
                "{what}: line {line} shown {} ms after asking",
                took.as_millis()
            );
            assert!(took < Duration::from_secs(1), "{what} took {took:?}");
        }
    };
    timed("first line", format!("{log}?line=1#L1"), 1).await;
    // The first lines fold (a `::group::` the conductor printed).
    let folded = b
        .js("return document.querySelector('#log details.fold summary').textContent")
        .await;
    assert!(
        folded.as_str().unwrap().contains("::group::package setup"),
        "{folded}"
    );
    // A permalink to a line outside the window is opened on the server.
    timed(
        "permalinked middle line",
        format!("{log}#L{middle_no}"),
        middle_no,
    )
    .await;
    let middle = b
        .js(&format!(
            "return document.getElementById('L{middle_no}').querySelector('.x').textContent"
        ))
        .await;
    assert_eq!(middle, "line 500001 of the test output");
    assert!(c
        .current_url()
        .await
        .unwrap()
        .as_str()
        .contains(&format!("line={middle_no}")));
    timed("last line", log.clone(), total).await;
    let last = b
        .js(&format!(
            "return document.getElementById('L{total}').querySelector('.x').textContent"
        ))
        .await;
    let sgr_out = lines[total as usize - 1]
        .replace("\x1b[31m", "")
        .replace("\x1b[0m", "");
    assert_eq!(last.as_str().unwrap(), sgr_out);
    // Line numbers count from 1 and the page holds a window, not the log.
    let shown = b
        .js("return document.querySelectorAll('#log .l').length")
        .await;
    assert!(shown.as_u64().unwrap() < 5_000, "{shown} lines on the page");
    b.screenshot("log-last-line").await;

    // A whole-log search: the exact count, and its 1000th match opened.
    let t0 = Instant::now();
    b.open(&format!("{log}?q=WARNING&m=1000")).await;
    b.wait_js("document.getElementById('match-count')", LIMIT)
        .await;
    println!("search of {LINES} lines: {} ms", t0.elapsed().as_millis());
    assert_eq!(
        b.js("return document.getElementById('match-count').textContent")
            .await,
        "2000"
    );
    assert_eq!(
        b.js("return document.getElementById('match-no').textContent")
            .await,
        "1000"
    );
    let m1000 = format!("L{}", warnings[999]);
    assert_eq!(
        b.js("return document.querySelector('#log .here').id").await,
        m1000
    );
    // ANSI red is drawn red, the escape sequence taken out.
    let red = b
        .js(&format!("const s = document.querySelector('#{m1000} .a-f1'); return s ? [s.textContent, getComputedStyle(s).color] : null"))
        .await;
    assert_eq!(red[0], "red alert", "{red}");
    let rgb = red[1].as_str().unwrap().to_string();
    let parts: Vec<u32> = rgb
        .trim_start_matches("rgb(")
        .trim_end_matches(')')
        .split(',')
        .map(|p| p.trim().parse().unwrap())
        .collect();
    assert!(
        parts[0] > 150 && parts[1] < 100 && parts[2] < 100,
        "not red: {rgb}"
    );
    let raw_text = b
        .js(&format!(
            "return document.getElementById('{m1000}').textContent"
        ))
        .await;
    assert!(!raw_text.as_str().unwrap().contains("x1b"), "{raw_text}");
    b.screenshot("log-search").await;
    // Next goes to the 1001st.
    b.js("document.querySelector('#matches a:last-child').click(); return 1")
        .await;
    b.wait_js("document.getElementById('match-no') && document.getElementById('match-no').textContent === '1001'", LIMIT).await;
    assert_eq!(
        b.js("return document.querySelector('#log .here').id").await,
        format!("L{}", warnings[1000])
    );

    // No horizontal scroll on a phone, the long token included.
    c.set_window_rect(0, 0, 390, 844).await.unwrap();
    let long = lines
        .iter()
        .position(|l| l.starts_with("line 21 xxx"))
        .unwrap()
        + 1;
    for url in [
        format!("{log}?line={long}#L{long}"),
        format!("{log}?q=WARNING&m=3"),
    ] {
        b.open(&url).await;
        b.wait_js("document.getElementById('log')", LIMIT).await;
        let wide = b
            .js("return [document.documentElement.scrollWidth, window.innerWidth]")
            .await;
        assert!(
            wide[0].as_u64() <= wide[1].as_u64(),
            "{url}: page scrolls sideways: {wide}"
        );
    }
    b.screenshot("log-phone").await;
    // Every page fits a phone; the run's tasks are cards whose state,
    // verdict and reason are on the screen, not off its edge.
    for path in [
        "/",
        "/queue",
        "/runs",
        &format!("/runs/{run}"),
        "/leases",
        "/report",
        "/no/such/page",
    ] {
        b.open(&format!("{base}{path}")).await;
        b.wait_js("document.querySelector('main')", LIMIT).await;
        let wide = b
            .js("return [document.documentElement.scrollWidth, window.innerWidth]")
            .await;
        assert!(
            wide[0].as_u64() <= wide[1].as_u64(),
            "{path}: page scrolls sideways: {wide}"
        );
    }
    b.open(&format!("{base}/runs/{run}")).await;
    b.wait_js("document.querySelector('#tasks td[data-label]')", LIMIT)
        .await;
    let off = b
        .js("return Array.from(document.querySelectorAll('#tasks td')).filter(td => td.getBoundingClientRect().right > window.innerWidth + 1).length")
        .await;
    assert_eq!(off, 0, "task cells off the screen");
    assert!(
        c.source().await.unwrap().contains(" UTC"),
        "times carry their zone"
    );
    b.screenshot("run-phone").await;
    c.clone().close().await.unwrap();
}
