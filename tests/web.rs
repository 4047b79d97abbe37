//! Issue 22: the web dashboard, with the real `ots-server`, `ots-worker`
//! and `ots-submit` processes: signed in through the link `ots-submit web`
//! prints, in headless Chromium over WebDriver, during a real testrun;
//! and over plain HTTP for what a browser would not show (single-use
//! links, resumed streams, limits, TLS).

mod common;

use common::browser::Browser;
use common::http;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);

/// A conductor that prints, waits for `go-$OTS_TASK_ID` next to it,
/// prints a marker, writes a JUnit result and a binary result file.
fn gated(dir: &Path) -> String {
    script(
        dir,
        "gated-web.sh",
        &format!(
            "echo \"started $OTS_TASK_ID\"\nfor i in $(seq 1 40); do echo \"early line $i\"; done\n\
             printf 'bell \\a and escape \\033[31m here\\n'\n\
             while [ ! -e {dir:?}/go-$OTS_TASK_ID ]; do [ -d {dir:?} ] || exit 3; sleep 0.02; done\n\
             echo \"AFTER-LOAD marker of $OTS_TASK_ID\"\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\"\n\
             head -c 300000 /dev/urandom > \"$OTS_RESULTS_DIR/blob.bin\"",
        ),
    )
    .display()
    .to_string()
}

fn release(dir: &Path, task: &str) {
    std::fs::write(dir.join(format!("go-{task}")), b"").unwrap();
}

fn run_as(server: &ServerProc, user: &str, group: &str) -> String {
    let out = server.as_user(user).submit(
        &[
            "run",
            "--device",
            &format!("devicegroup:{group}"),
            "--image",
            "img",
            "--packages",
            "p",
        ],
        LIMIT,
    );
    assert!(out.status.success(), "submit: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

fn task_of(server: &ServerProc, run: &str) -> Value {
    wait_status(server, run, LIMIT, |st| {
        st["tasks"][0]["state"] == "running"
    })["tasks"][0]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_browser_during_a_real_testrun() {
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start_web_lab(dir.path(), "");
    let conductor = gated(dir.path());
    let _w1 = start_worker(
        dir.path(),
        "web-w1",
        "devicegroup:webla",
        &server,
        &[&conductor],
        &[],
    );
    let _w2 = start_worker(
        dir.path(),
        "web-w2",
        "devicegroup:webla",
        &server,
        &[&conductor],
        &[],
    );
    wait_for_workers(&server, LIMIT, all_idle(&["web-w1", "web-w2"]));
    wait_allowed(&server, "webalice");
    wait_allowed(&server, "webbob");
    let run_a = run_as(&server, "webalice", "webla");
    let run_b = run_as(&server, "webbob", "webla");
    let task_a = task_of(&server, &run_a)["task"]
        .as_str()
        .unwrap()
        .to_string();
    let task_b = task_of(&server, &run_b)["task"]
        .as_str()
        .unwrap()
        .to_string();

    let b = Browser::start().await;
    let c = &b.client;

    // Anonymous: the sign-in page, no data (pages and API).
    b.open(&format!("{base}/")).await;
    let page = c.source().await.unwrap();
    assert!(page.contains("ots-submit web"), "{page}");
    assert!(
        !page.contains("web-w1") && !page.contains(&run_a),
        "anonymous saw data: {page}"
    );
    b.screenshot("sign-in").await;
    b.open(&format!("{base}/runs/{run_a}")).await;
    assert!(!c.source().await.unwrap().contains(&task_a));
    let anon_api = b
        .js("return fetch('/api/workers').then(r => r.status)")
        .await;
    assert_eq!(anon_api, 401);

    // Signed in through the link ots-submit printed: it leads to the
    // page asked for last before signing in.
    let link = web_link(&server, "webalice");
    b.open(&link).await;
    b.wait_js(
        &format!("location.pathname === '/runs/{run_a}' && document.getElementById('summary')"),
        LIMIT,
    )
    .await;
    b.open(&format!("{base}/")).await;
    b.wait_js("document.querySelector('tr[data-worker=\"web-w1\"]') && document.querySelector('tr[data-worker=\"web-w2\"]')", LIMIT).await;
    let who = b
        .js("return document.querySelector('.who').textContent")
        .await;
    assert!(who.as_str().unwrap().contains("webalice"), "{who}");
    b.screenshot("lab").await;
    b.open(&format!("{base}/queue")).await;
    b.screenshot("queue").await;

    // The runs page links alice's run, not bob's.
    b.open(&format!("{base}/runs")).await;
    let runs_page = c.source().await.unwrap();
    assert!(
        runs_page.contains(&format!("href=\"/runs/{run_a}\"")),
        "{runs_page}"
    );
    assert!(
        !runs_page.contains(&format!("/runs/{run_b}\"")),
        "a submit user saw another's run: {runs_page}"
    );
    b.screenshot("runs").await;

    // Bob's run by link: refused, page and API alike.
    b.open(&format!("{base}/runs/{run_b}")).await;
    let refused = c.source().await.unwrap();
    assert!(
        refused.contains("403") && !refused.contains(&task_b),
        "{refused}"
    );
    let api_b = b
        .js(&format!(
            "return fetch('/api/runs/{run_b}').then(r => r.status)"
        ))
        .await;
    assert_eq!(api_b, 403);
    let log_b = b
        .js(&format!(
            "return fetch('/api/tasks/{task_b}/log').then(r => r.status)"
        ))
        .await;
    assert_eq!(log_b, 403);

    // A cancel without the CSRF token is refused, and changes nothing.
    let no_csrf = b
        .js(&format!("return fetch('/runs/{run_a}/cancel', {{method: 'POST', headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: ''}}).then(r => r.status)"))
        .await;
    assert_eq!(no_csrf, 403);
    let api_no_csrf = b
        .js(&format!(
            "return fetch('/api/runs/{run_a}/cancel', {{method: 'POST'}}).then(r => r.status)"
        ))
        .await;
    assert_eq!(api_no_csrf, 403);
    assert_eq!(current_status(&server, &run_a)["state"], "running");
    // With the token but unconfirmed (no JavaScript asked): the second
    // step is asked for, and nothing is cancelled.
    let asked = b
        .js(&format!("return fetch('/api/me').then(r => r.json()).then(j => fetch('/runs/{run_a}/cancel', {{method: 'POST', headers: {{'Content-Type': 'application/x-www-form-urlencoded'}}, body: 'csrf=' + encodeURIComponent(j.csrf)}})).then(r => r.text())"))
        .await;
    let asked = asked.as_str().unwrap();
    assert!(
        asked.contains(&format!("Cancel testrun {run_a}?"))
            && asked.contains("name=\"confirm\" value=\"yes\""),
        "{asked}"
    );
    assert_eq!(current_status(&server, &run_a)["state"], "running");

    // The run page in one tab, the task log in another, both live.
    b.open(&format!("{base}/runs/{run_a}")).await;
    b.js("window.otsNotReloaded = true; return 1").await;
    let run_tab = c.window().await.unwrap();
    let log_tab = c.new_window(true).await.unwrap();
    c.switch_to_window(log_tab.handle.clone()).await.unwrap();
    b.open(&format!("{base}/tasks/{task_a}/log")).await;
    b.wait_js(
        "document.getElementById('live-status').textContent === 'live'",
        LIMIT,
    )
    .await;
    b.wait_js(
        "document.getElementById('log').textContent.includes('early line 40')",
        LIMIT,
    )
    .await;
    // Control characters are shown escaped, not interpreted; an SGR
    // colour is drawn (live lines as the server draws stored ones).
    b.wait_js("document.getElementById('log').textContent.includes('bell \\\\x07 and escape  here') && document.querySelector('#log .a-f1').textContent === ' here'", LIMIT).await;
    b.js("window.otsNotReloaded = true; return 1").await;
    release(dir.path(), &task_a);
    let marker = format!("AFTER-LOAD marker of {task_a}");
    b.wait_js(
        &format!("document.getElementById('log').textContent.includes('{marker}')"),
        LIMIT,
    )
    .await;
    assert_eq!(
        b.js("return window.otsNotReloaded === true").await,
        true,
        "the log page reloaded"
    );
    b.wait_js(
        "document.getElementById('live-status').textContent === 'task ended'",
        LIMIT,
    )
    .await;
    b.screenshot("task-log").await;

    c.switch_to_window(run_tab).await.unwrap();
    b.wait_js(
        "document.getElementById('run-verdict').textContent === 'PASS'",
        LIMIT,
    )
    .await;
    assert_eq!(
        b.js("return window.otsNotReloaded === true").await,
        true,
        "the run page reloaded"
    );
    b.screenshot("run").await;

    // The result file downloaded by the browser has the stored SHA-256.
    let st = wait_status(&server, &run_a, LIMIT, finished);
    let stored = st["tasks"][0]["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "blob.bin")
        .expect("blob.bin stored")["sha256"]
        .as_str()
        .unwrap()
        .to_string();
    let href = b
        .js("return Array.from(document.querySelectorAll('a.download')).map(a => a.getAttribute('href')).find(h => h.endsWith('/blob.bin'))")
        .await;
    let href = href.as_str().expect("a download link").to_string();
    let digest = c
        .execute_async(
            "const done = arguments[arguments.length - 1];\
             fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => crypto.subtle.digest('SHA-256', b))\
             .then(d => done(Array.from(new Uint8Array(d)).map(x => x.toString(16).padStart(2, '0')).join('')))\
             .catch(e => done('error: ' + e));",
            vec![Value::String(href)],
        )
        .await
        .unwrap();
    assert_eq!(digest.as_str().unwrap(), stored);

    // The worker page: device, health history, recent tasks.
    b.open(&format!(
        "{base}/workers/{}",
        st["tasks"][0]["worker"].as_str().unwrap()
    ))
    .await;
    b.wait_js(
        &format!("document.getElementById('recent').textContent.includes('{task_a}')"),
        LIMIT,
    )
    .await;
    b.screenshot("worker").await;

    // A revoked user's open page stops receiving data within a second.
    let run_d = run_as(&server, "webalice", "webla");
    let task_d = task_of(&server, &run_d)["task"]
        .as_str()
        .unwrap()
        .to_string();
    b.open(&format!("{base}/tasks/{task_d}/log")).await;
    b.wait_js(
        "document.getElementById('live-status').textContent === 'live'",
        LIMIT,
    )
    .await;
    let t0 = b.js("return Date.now()").await.as_f64().unwrap();
    let keys = server.keys.as_ref().unwrap();
    std::fs::remove_file(keys.users_dir().join("webalice.pub")).unwrap();
    let at = b
        .wait_js(
            "document.getElementById('live-status').textContent === 'signed out' && Date.now()",
            LIMIT,
        )
        .await
        .as_f64()
        .unwrap();
    let after = at - t0;
    println!("revoked user's live log ended {after:.0} ms after its key was removed (observed by polling every 50 ms)");
    assert!(
        after < 1000.0,
        "the page kept its stream {after} ms after the key went"
    );
    let gone = b
        .js("return fetch('/api/workers').then(r => r.status)")
        .await;
    assert_eq!(gone, 401);
    release(dir.path(), &task_d);
    release(dir.path(), &task_b);
    c.clone().close().await.unwrap();
}

/// A link works once, within its minute; the cookie is what a browser
/// keeps; a role change ends the session at once; sign-out too.
#[test]
fn sign_in_links_are_single_use_and_sessions_follow_the_allow_list() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _base) = start_web_lab(dir.path(), "");
    wait_allowed(&server, "webcarol");
    let link = web_link(&server, "webcarol");
    let cookie = http::sign_in(&link);
    let (base, path) = link.split_at(link.find("/login").unwrap());
    let again = http::get(base, path, None);
    assert_eq!(again.status, 401);
    assert!(again.text().contains("used already"), "{}", again.text());
    let me = http::get(base, "/api/me", Some(&cookie));
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["user"], "webcarol");
    assert_eq!(me.json()["role"], "submit");
    // A guessed token is no better.
    let guess = http::get(base, &format!("/login?token={}", "ab".repeat(32)), None);
    assert_eq!(guess.status, 401);
    // Every API route needs a session.
    for path in [
        "/api/workers",
        "/api/queue",
        "/api/runs",
        "/api/runs/r1",
        "/api/tasks/r1.1/log",
        "/api/audit",
        "/api/me",
    ] {
        let r = http::get(base, path, None);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
    }
    // The audit log is the admin's.
    assert_eq!(http::get(base, "/api/audit", Some(&cookie)).status, 403);
    // The role changes: the session ends within a second.
    let keys = server.keys.as_ref().unwrap();
    let t0 = Instant::now();
    std::fs::write(keys.users_dir().join("webcarol.role"), "operator").unwrap();
    let deadline = t0 + LIMIT;
    while http::get(base, "/api/me", Some(&cookie)).status == 200 {
        assert!(
            Instant::now() < deadline,
            "session outlived the role change"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling interval, bounded by the deadline
    }
    println!("session ended {:?} after the role changed", t0.elapsed());
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Signed in again (as operator now), then signed out.
    let cookie = http::sign_in(&web_link(&server, "webcarol"));
    let me = http::get(base, "/api/me", Some(&cookie)).json();
    assert_eq!(me["role"], "operator");
    let csrf = me["csrf"].as_str().unwrap().to_string();
    let c = format!("ots_session={cookie}");
    let no = http::request(
        base,
        "POST",
        "/logout",
        &[
            ("Cookie", &c),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        b"csrf=wrong",
    );
    assert_eq!(no.status, 403);
    let out = http::request(
        base,
        "POST",
        "/logout",
        &[
            ("Cookie", &c),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        format!("csrf={csrf}").as_bytes(),
    );
    assert_eq!(out.status, 401, "{}", out.text());
    assert_eq!(http::get(base, "/api/me", Some(&cookie)).status, 401);
    // The link was issued in the audit log.
    let audit = audit_json(&server);
    assert!(
        audit.contains("web_login") && audit.contains("webcarol"),
        "{audit}"
    );
}

/// A live log stream resumed from the offset it gave (`Last-Event-ID`)
/// carries every line once; a finished task's stream ends.
#[test]
fn a_live_log_resumes_from_its_offset_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start_web_lab(dir.path(), "");
    let go = dir.path().join("go");
    let d = dir.path();
    let conductor = script(
        dir.path(),
        "counting.sh",
        &format!(
            "for i in $(seq 1 3000); do echo \"line $i\"; done\n\
             while [ ! -e {go:?} ]; do [ -d {d:?} ] || exit 3; sleep 0.02; done\n\
             for i in $(seq 3001 6000); do echo \"line $i\"; done"
        ),
    );
    let _w = start_worker(
        dir.path(),
        "web-count",
        "devicegroup:webcount",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    wait_for_workers(&server, LIMIT, all_idle(&["web-count"]));
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:webcount",
            "--image",
            "i",
            "--packages",
            "p",
        ],
    );
    let task = format!("{run}.1");
    let cookie = http::sign_in(&web_link(&server, "tester"));
    let c = format!("ots_session={cookie}");
    let path = format!("/api/tasks/{task}/log/stream?from=0");
    let lines_of = |events: &[http::Event]| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.event == "lines")
            .flat_map(|e| {
                let v: Value = serde_json::from_str(&e.data).unwrap();
                // The conductor's lines (the worker adds its own).
                v["text"]
                    .as_str()
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with("line "))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    // The first half, then the connection drops.
    let (status, first) = http::events(&base, &path, &[("Cookie", &c)], LIMIT, |ev| {
        lines_of(ev).iter().any(|l| l == "line 3000")
    });
    assert_eq!(status, 200);
    let resume = first
        .iter()
        .rev()
        .find_map(|e| e.id.clone())
        .expect("an id");
    std::fs::write(&go, b"").unwrap();
    // Resumed where it stopped (the query's from=0 is overridden).
    let (_, second) = http::events(
        &base,
        &path,
        &[("Cookie", &c), ("Last-Event-ID", &resume)],
        LIMIT,
        |ev| ev.iter().any(|e| e.event == "end"),
    );
    assert!(
        second.iter().any(|e| e.event == "end"),
        "the stream did not end with the task"
    );
    let mut all = lines_of(&first);
    all.extend(lines_of(&second));
    let want: Vec<String> = (1..=6000).map(|i| format!("line {i}")).collect();
    let mut seen = std::collections::HashSet::new();
    let repeated: Vec<&String> = all.iter().filter(|l| !seen.insert(*l)).collect();
    assert!(
        repeated.is_empty(),
        "repeated: {repeated:?}; resumed at {resume}; first ids {:?}",
        first.iter().map(|e| e.id.clone()).collect::<Vec<_>>()
    );
    assert_eq!(all.len(), want.len(), "lines missing or repeated");
    assert_eq!(all, want);
    // Another user's stream is refused before it starts.
    wait_allowed(&server, "webdave");
    let dave = http::sign_in(&web_link(&server, "webdave"));
    let (status, _) = http::events(
        &base,
        &path,
        &[("Cookie", &format!("ots_session={dave}"))],
        LIMIT,
        |_| true,
    );
    assert_eq!(status, 403);
}

/// Live views are bounded per testrun; past it, 429 at once.
#[test]
fn live_views_are_bounded() {
    use std::io::{Read, Write};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (server, base) = start_web_lab(dir.path(), "");
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:nobody",
            "--image",
            "i",
            "--packages",
            "p",
            "--queue-anyway",
        ],
    );
    // Operators may watch the tester's testrun; each from an address of
    // its own (as from their own machines).
    let per_user = ots::web::live::MAX_STREAMS_PER_USER;
    let users = ots::web::live::MAX_STREAMS_PER_RUN / per_user + 1;
    let cookies: Vec<String> = (0..users)
        .map(|i| {
            let name = format!("web-watch{i}");
            keys().user(&name, "operator");
            wait_allowed(&server, &name);
            http::sign_in(&web_link(&server, &name))
        })
        .collect();
    let stream = |i: usize, cookie: &str| {
        let mut s = http::connect_from(&rt, [127, 0, 3, 10 + i as u8], &base);
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.write_all(
            format!(
                "GET /api/runs/{run}/stream HTTP/1.1\r\nHost: x\r\nCookie: ots_session={cookie}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        (String::from_utf8_lossy(&head[9..12]).to_string(), s)
    };
    let mut open = Vec::new();
    for (i, cookie) in cookies.iter().enumerate() {
        for n in 0..=per_user {
            let (status, s) = stream(i, cookie);
            let on_run = open.len();
            if on_run >= ots::web::live::MAX_STREAMS_PER_RUN {
                assert_eq!(status, "429", "past the testrun's limit");
                break;
            } else if n < per_user {
                assert_eq!(status, "200", "user {i} stream {n}");
                open.push(s);
            } else {
                assert_eq!(status, "429", "user {i}: past its own limit");
            }
        }
    }
    assert_eq!(open.len(), ots::web::live::MAX_STREAMS_PER_RUN);
    // Closing them gives the places back.
    drop(open);
    let deadline = Instant::now() + LIMIT;
    loop {
        let (status, _) = http::events(
            &base,
            &format!("/api/runs/{run}/stream"),
            &[("Cookie", &format!("ots_session={}", cookies[0]))],
            Duration::from_secs(5),
            |_| true,
        );
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "places not given back");
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
}

/// A network address needs TLS (or web_insecure); with TLS, the cookie
/// is Secure.
#[test]
fn plaintext_on_the_network_is_refused_and_tls_works() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "web = \"0.0.0.0:0\"\n").unwrap();
    let mut cmd = std::process::Command::new(bin("ots-server"));
    cmd.args([
        "--config",
        config.to_str().unwrap(),
        "--state-dir",
        dir.path().join("s").to_str().unwrap(),
    ]);
    for (k, v) in keys().server_env() {
        cmd.env(k, v);
    }
    let out = run_bounded(cmd, LIMIT);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("web_tls_cert"),
        "{}",
        text(&out.stderr)
    );

    common::browser::ensure_packages(&[("/usr/bin/openssl", "openssl"), ("/usr/bin/curl", "curl")]);
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(made.status.success(), "{}", text(&made.stderr));
    let (server, base) = start_web_lab(
        dir.path(),
        &format!(
            "web_tls_cert = {:?}\nweb_tls_key = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    assert!(base.starts_with("https://"), "{base}");
    let link = web_link(&server, "tester");
    let curl = std::process::Command::new("curl")
        // As a browser says when the user opens the link itself (a
        // client that does not say gets the confirmation page).
        .args([
            "-s",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-H",
            "Sec-Fetch-Site: none",
            "--cacert",
        ])
        .arg(&cert)
        .arg(&link)
        .output()
        .expect("curl");
    let head = text(&curl.stdout);
    assert!(head.starts_with("HTTP/1.1 303"), "{head}");
    let cookie_line = head
        .lines()
        .find(|l| l.to_lowercase().starts_with("set-cookie"))
        .expect("a cookie");
    assert!(
        cookie_line.contains("Secure") && cookie_line.contains("HttpOnly"),
        "{cookie_line}"
    );
}
