//! Issue 23: notifications with the real binaries — an in-test HTTP
//! receiver checks every webhook's signature and timestamp with the
//! algorithm the README documents (Standard Webhooks), written here
//! again from that description; an in-test SMTP sink takes the mail.

mod common;

use base64::Engine;
use common::http;
use common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(60);
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    id: String,
    body: Value,
    /// The signature verified and the timestamp is within 5 minutes.
    valid: bool,
    answered: u16,
    at: Instant,
}

#[derive(Default)]
struct Script {
    /// Statuses to answer per path, in order; 200 when none is left.
    answers: HashMap<String, VecDeque<u16>>,
    /// Paths whose requests are held unanswered until released.
    hold: Vec<String>,
    hits: Vec<Hit>,
}

/// A small HTTP/1.1 receiver on 127.0.0.1 (one request per connection).
#[derive(Clone)]
struct Receiver {
    port: u16,
    state: Arc<(Mutex<Script>, Condvar)>,
    key: Vec<u8>,
}

/// The key as the README says: the secret file's content, or for a
/// `whsec_` secret the base64-decoded rest.
fn key_of(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        None => secret.as_bytes().to_vec(),
    }
}

fn verify(key: &[u8], id: &str, ts: &str, body: &[u8], header: &str) -> bool {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let want = format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let fresh = ts.parse::<i64>().is_ok_and(|t| (now - t).abs() <= 300);
    fresh && header.split(' ').any(|s| s == want)
}

impl Receiver {
    fn start(secret: &str) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let r = Receiver {
            port: listener.local_addr().unwrap().port(),
            state: Arc::default(),
            key: key_of(secret),
        };
        let me = r.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let me = me.clone();
                std::thread::spawn(move || me.serve(conn));
            }
        });
        r
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn answer(&self, path: &str, statuses: &[u16]) {
        let mut s = self.state.0.lock().unwrap();
        s.answers
            .entry(path.into())
            .or_default()
            .extend(statuses.iter().copied());
    }

    fn hold(&self, path: &str, on: bool) {
        let mut s = self.state.0.lock().unwrap();
        s.hold.retain(|p| p != path);
        if on {
            s.hold.push(path.into());
        }
        self.state.1.notify_all();
    }

    fn serve(&self, conn: TcpStream) {
        conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|l| l.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len.min(1 << 20)];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let get = |k: &str| headers.get(k).cloned().unwrap_or_default();
        let id = get("webhook-id");
        let valid = verify(
            &self.key,
            &id,
            &get("webhook-timestamp"),
            &body,
            &get("webhook-signature"),
        );
        let (lock, cvar) = &*self.state;
        let mut s = lock.lock().unwrap();
        let answered = s
            .answers
            .get_mut(&path)
            .and_then(VecDeque::pop_front)
            .unwrap_or(200);
        s.hits.push(Hit {
            path: path.clone(),
            id,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            valid,
            answered,
            at: Instant::now(),
        });
        cvar.notify_all();
        let deadline = Instant::now() + LIMIT;
        while s.hold.contains(&path) && Instant::now() < deadline {
            s = cvar.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
        }
        drop(s);
        let mut conn = conn;
        let _ = write!(
            conn,
            "HTTP/1.1 {answered} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
    }

    /// Waits until the hits to `path` satisfy `ok`; returns them.
    fn wait(&self, path: &str, ok: impl Fn(&[Hit]) -> bool) -> Vec<Hit> {
        let (lock, cvar) = &*self.state;
        let deadline = Instant::now() + LIMIT;
        let mut s = lock.lock().unwrap();
        loop {
            let hits: Vec<Hit> = s.hits.iter().filter(|h| h.path == path).cloned().collect();
            if ok(&hits) {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "receiver never saw it on {path}: {hits:#?}"
            );
            s = cvar.wait_timeout(s, Duration::from_millis(200)).unwrap().0;
        }
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        let s = self.state.0.lock().unwrap();
        s.hits.iter().filter(|h| h.path == path).cloned().collect()
    }
}

fn secret_file(dir: &Path, name: &str, secret: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p.display().to_string()
}

fn demo_image() -> String {
    repo()
        .join("examples/images/demo.img")
        .display()
        .to_string()
}

fn notifications(server: &ServerProc, args: &[&str]) -> Value {
    let mut all = vec!["notifications", "--json"];
    all.extend_from_slice(args);
    let out = submit(server, &all, LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Polls `ots-submit notifications` until `ok` holds for the deliveries.
fn wait_deliveries(
    server: &ServerProc,
    args: &[&str],
    ok: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let v = notifications(server, args);
        let d = v["deliveries"].as_array().cloned().unwrap_or_default();
        if ok(&d) {
            return d;
        }
        assert!(Instant::now() < deadline, "never reached: {v:#}");
        std::thread::sleep(Duration::from_millis(100)); // polling interval, bounded by the deadline
    }
}

fn start_lab(dir: &Path, toml: &str, group: &str) -> (ServerProc, Proc) {
    let server = start_configured_server(dir, toml, &[]);
    let conductor = example_conductor();
    let argv: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let worker = start_idle_worker(
        dir,
        &format!("{group}-w1"),
        &format!("devicegroup:{group}"),
        &server,
        &argv,
        &[],
    );
    (server, worker)
}

/// A testrun's webhook arrives signed, with its verdict and tasks; a
/// receiver answering 500 twice sees one id three times and one effective
/// delivery; a 400 is failed, listed, and sent again by `notify-retry`.
#[test]
fn a_testrun_webhook_is_signed_retried_under_one_id_and_a_refusal_is_listed() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(SECRET);
    rx.answer("/ci", &[500, 500]);
    rx.answer("/strict", &[400]);
    let secret = secret_file(dir.path(), "ci.secret", SECRET);
    let metrics = format!("127.0.0.1:{}", free_port());
    let toml = format!(
        r#"
web = "127.0.0.1:0"
metrics = "{metrics}"
[notify]
retry_first = "200ms"
[[notify.webhook]]
name = "ci"
url = "{ci}"
secret_file = "{secret}"
events = ["testrun_finished"]
[[notify.webhook]]
name = "strict"
url = "{strict}"
secret_file = "{secret}"
per_run_only = true
"#,
        ci = rx.url("/ci"),
        strict = rx.url("/strict"),
    );
    let (server, _w) = start_lab(dir.path(), &toml, "nt1");
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:nt1",
            "--image",
            &demo_image(),
            "--packages",
            "smoke,network",
            "--notify",
            "strict",
        ],
    );
    let st = wait_status(&server, &run, LIMIT, finished);
    let hits = rx.wait("/ci", |h| h.len() >= 3);
    eprintln!(
        "webhook retried after a 500: {} ms, after the second: {} ms (retry_first 200 ms, jittered 0.5-1.5x)",
        (hits[1].at - hits[0].at).as_millis(),
        (hits[2].at - hits[1].at).as_millis()
    );
    assert_eq!(hits.len(), 3, "{hits:#?}");
    assert!(hits.iter().all(|h| h.valid), "signatures: {hits:#?}");
    assert!(hits.iter().all(|h| h.id == hits[0].id), "one id: {hits:#?}");
    assert_eq!(
        hits.iter().map(|h| h.answered).collect::<Vec<_>>(),
        [500, 500, 200]
    );
    let body = &hits[2].body;
    assert_eq!(body["type"], "testrun_finished");
    assert_eq!(body["run"], run.as_str());
    assert_eq!(body["verdict"], st["verdict"]);
    let tasks: Vec<&str> = body["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    let want: Vec<&str> = st["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    assert_eq!(tasks, want);
    assert!(body["tasks"][0]["verdict"].is_string());
    assert!(
        body["url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/runs/{run}")),
        "a link to the dashboard: {body:#}"
    );

    // One effective delivery: listed delivered after three attempts.
    let d = wait_deliveries(&server, &["--run", &run], |d| {
        d.iter()
            .any(|x| x["via"] == "ci" && x["state"] == "delivered")
            && d.iter()
                .any(|x| x["via"] == "strict" && x["state"] == "failed")
    });
    let ci = d.iter().find(|x| x["via"] == "ci").unwrap();
    assert_eq!(ci["attempts"], 3);
    assert_eq!(ci["id"], hits[0].id.as_str());
    let strict = d.iter().find(|x| x["via"] == "strict").unwrap();
    assert_eq!(
        (strict["attempts"].as_u64(), strict["last"].as_str()),
        (Some(1), Some("400"))
    );
    let strict_id = strict["id"].as_str().unwrap().to_string();
    // The human listing shows it too, with the target's failures.
    let out = submit(&server, &["notifications", "--failed"], LIMIT);
    let listing = text(&out.stdout);
    assert!(
        listing.contains(&strict_id) && listing.contains("failed"),
        "{listing}"
    );
    assert!(
        !listing.contains(&hits[0].id),
        "--failed lists failed ones only: {listing}"
    );
    assert_eq!(rx.hits("/strict").len(), 1, "a 400 is not retried");
    // The dashboard's run page shows both deliveries, its API lists them.
    let out = submit(&server, &["web"], LIMIT);
    let link = text(&out.stdout).lines().last().unwrap().trim().to_string();
    let cookie = http::sign_in(&link);
    let base = &link[..link.find("/login").unwrap()];
    let page = http::get(base, &format!("/runs/{run}"), Some(&cookie)).text();
    assert!(
        page.contains(&strict_id) && page.contains(&hits[0].id),
        "{page}"
    );
    let api = http::get(
        base,
        &format!("/api/runs/{run}/notifications"),
        Some(&cookie),
    );
    assert_eq!(api.status, 200);
    assert_eq!(
        api.json().as_array().map(Vec::len),
        Some(2),
        "{}",
        api.text()
    );

    // Sending it again takes an operator; it keeps its id.
    keys().user("nt-dev", "submit");
    wait_allowed(&server, "nt-dev");
    let refused = submit_as(&server, "nt-dev", &["notify-retry", &strict_id], LIMIT);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("operator"),
        "{}",
        text(&refused.stderr)
    );
    let none = submit_as(&server, "nt-dev", &["notifications", "--json"], LIMIT);
    let none: Value = serde_json::from_slice(&none.stdout).unwrap();
    assert_eq!(
        none["deliveries"].as_array().unwrap().len(),
        0,
        "not its testrun: {none:#}"
    );
    let out = submit(&server, &["notify-retry", &strict_id], LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let again = rx.wait("/strict", |h| h.len() >= 2);
    assert_eq!(again[1].id, strict_id);
    assert!(again[1].valid);
    wait_deliveries(&server, &["--run", &run], |d| {
        d.iter().all(|x| x["state"] == "delivered")
    });
    let page = http::get(&format!("http://{metrics}"), "/metrics", None).text();
    assert!(
        page.contains("ots_notifications{state=\"delivered\"} 2"),
        "{page}"
    );
    assert!(
        page.contains("ots_notification_target_failures{target=\"ci\"} 2"),
        "{page}"
    );
    assert!(
        page.contains("ots_notification_target_failures{target=\"strict\"} 1"),
        "{page}"
    );

    // A per-run URL on a server that allows none is refused at submit.
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:nt1",
            "--image",
            &demo_image(),
            "--packages",
            "smoke",
            "--notify",
            &rx.url("/mine"),
        ],
        LIMIT,
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("allow_urls"),
        "{}",
        text(&out.stderr)
    );
}

/// A per-run URL to 127.0.0.1 is refused unless the operator allows both
/// the URL and private addresses; allowed, it is delivered and signed
/// with `notify.url_secret_file`.
#[test]
fn a_per_run_url_to_loopback_is_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start("plain secret for per-run urls");
    let secret = secret_file(dir.path(), "url.secret", "plain secret for per-run urls");
    let toml = |private: bool| {
        format!(
            "[notify]\nallow_urls = [\"http://127.0.0.1:*/*\"]\nurl_secret_file = \"{secret}\"\nallow_private_addresses = {private}\n"
        )
    };
    let url = rx.url("/mine");
    let args = |url: &str| -> Vec<String> {
        [
            "run",
            "--device",
            "devicegroup:nt2",
            "--image",
            &demo_image(),
            "--packages",
            "smoke",
            "--notify",
            url,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    {
        let d = dir.path().join("strict");
        std::fs::create_dir_all(&d).unwrap();
        let (server, _w) = start_lab(&d, &toml(false), "nt2");
        let a = args(&url);
        let out = submit(
            &server,
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            LIMIT,
        );
        assert!(!out.status.success());
        let err = text(&out.stderr);
        assert!(
            err.contains("non-public") && err.contains("allow_private_addresses"),
            "{err}"
        );
        let a = args("http://10.1.2.3:80/x");
        let out = submit(
            &server,
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            LIMIT,
        );
        assert!(!out.status.success(), "a private address too");
        let a = args("https://ci.example.com/x");
        let out = submit(
            &server,
            &a.iter().map(String::as_str).collect::<Vec<_>>(),
            LIMIT,
        );
        assert!(
            text(&out.stderr).contains("not allowed by notify.allow_urls"),
            "{}",
            text(&out.stderr)
        );
    }
    let d = dir.path().join("open");
    std::fs::create_dir_all(&d).unwrap();
    let (server, _w) = start_lab(&d, &toml(true), "nt2");
    let a = args(&url);
    let run = submit_run(
        &server,
        &a[1..].iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let hits = rx.wait("/mine", |h| !h.is_empty());
    assert!(hits[0].valid, "signed with url_secret_file: {hits:#?}");
    assert_eq!(hits[0].body["run"], run.as_str());
}

/// The server SIGKILLed while a testrun's notification is in flight (its
/// end is committed, the receiver has not answered) delivers it after
/// its restart, under the same id.
#[test]
fn a_server_killed_before_the_delivery_delivers_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(SECRET);
    rx.hold("/slow", true);
    let secret = secret_file(dir.path(), "ci.secret", SECRET);
    let toml = format!(
        "[notify]\nretry_first = \"200ms\"\n[[notify.webhook]]\nname = \"ci\"\nurl = \"{}\"\nsecret_file = \"{secret}\"\ntimeout = \"60s\"\nevents = [\"testrun_finished\"]\n",
        rx.url("/slow")
    );
    let (server, mut worker) = start_lab(dir.path(), &toml, "nt3");
    let run = submit_run(
        &server,
        &[
            "--device",
            "devicegroup:nt3",
            "--image",
            &demo_image(),
            "--packages",
            "smoke",
        ],
    );
    let first = rx.wait("/slow", |h| !h.is_empty());
    let mut server = server;
    server.proc.kill();
    worker.kill();
    rx.hold("/slow", false);
    let restarted = Instant::now();
    let server = start_configured_server(dir.path(), &toml, &[]);
    let hits = rx.wait("/slow", |h| h.len() >= 2);
    eprintln!(
        "after the SIGKILL the restarted server sent it again {} ms after it was started",
        (hits[1].at - restarted).as_millis()
    );
    assert!(
        hits.iter().all(|h| h.id == first[0].id && h.valid),
        "{hits:#?}"
    );
    assert!(hits.len() <= 3, "at most once more per restart: {hits:#?}");
    assert_eq!(hits[0].body["run"], run.as_str());
    let d = wait_deliveries(&server, &["--run", &run], |d| {
        d.iter().any(|x| x["state"] == "delivered")
    });
    assert_eq!(d.len(), 1, "{d:#?}");
}

/// One mail per testrun per address, the verdict in its subject, through
/// an in-test SMTP sink.
#[test]
fn each_testrun_mails_each_address_once_with_its_verdict_in_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let sink = SmtpSink::start();
    let toml = format!(
        "[notify]\nretry_first = \"200ms\"\nallow_mail_domains = [\"lab.example\"]\n[[notify.mail]]\nname = \"mail\"\nsmtp = \"127.0.0.1:{}\"\ntls = \"none\"\nfrom = \"ots@lab.example\"\nto = [\"lab@lab.example\"]\nevents = [\"testrun_finished\"]\n",
        sink.port
    );
    let (server, _w) = start_lab(dir.path(), &toml, "nt4");
    let run = |extra: &str| {
        submit_run(
            &server,
            &[
                "--device",
                "devicegroup:nt4",
                "--image",
                &demo_image(),
                "--packages",
                "smoke",
                "--notify",
                extra,
            ],
        )
    };
    let r1 = run("mailto:lab@lab.example");
    let r2 = run("mailto:ann@lab.example");
    for r in [&r1, &r2] {
        wait_status(&server, r, LIMIT, finished);
    }
    let mails = sink.wait(|m| m.len() >= 3);
    // Settled: nothing more comes (the deliveries are listed delivered).
    wait_deliveries(&server, &[], |d| {
        d.len() == 3 && d.iter().all(|x| x["state"] == "delivered")
    });
    let mails = {
        let later = sink.mails();
        assert_eq!(later.len(), mails.len());
        later
    };
    assert_eq!(mails.len(), 3, "{mails:#?}");
    let to = |r: &str, who: &str| {
        mails
            .iter()
            .filter(|(rcpt, data)| rcpt == who && subject(data).contains(r))
            .count()
    };
    assert_eq!(to(&r1, "lab@lab.example"), 1, "{mails:#?}");
    assert_eq!(to(&r2, "lab@lab.example"), 1);
    assert_eq!(to(&r2, "ann@lab.example"), 1);
    for (_, data) in &mails {
        assert!(subject(data).contains("PASS"), "{}", subject(data));
    }
}

fn subject(data: &str) -> String {
    let unfolded = data.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("subject:"))
        .unwrap_or("")
        .to_string()
}

/// Mails received: (recipient, data), and a signal for each.
type Mailbox = (Mutex<Vec<(String, String)>>, Condvar);

/// A minimal SMTP server: takes every mail, records (recipient, data).
struct SmtpSink {
    port: u16,
    mails: Arc<Mailbox>,
}

impl SmtpSink {
    fn start() -> SmtpSink {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mails: Arc<Mailbox> = Arc::default();
        let store = mails.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let store = store.clone();
                std::thread::spawn(move || smtp_session(conn, &store));
            }
        });
        SmtpSink { port, mails }
    }

    fn mails(&self) -> Vec<(String, String)> {
        self.mails.0.lock().unwrap().clone()
    }

    fn wait(&self, ok: impl Fn(&[(String, String)]) -> bool) -> Vec<(String, String)> {
        let (lock, cvar) = &*self.mails;
        let deadline = Instant::now() + LIMIT;
        let mut m = lock.lock().unwrap();
        while !ok(&m) {
            assert!(Instant::now() < deadline, "mail never came: {m:#?}");
            m = cvar.wait_timeout(m, Duration::from_millis(200)).unwrap().0;
        }
        m.clone()
    }
}

fn smtp_session(conn: TcpStream, store: &Mailbox) {
    conn.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let mut out = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    let _ = out.write_all(b"220 sink ESMTP\r\n");
    let mut rcpts = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let upper = line.to_ascii_uppercase();
        let reply: &[u8] = if upper.starts_with("EHLO") || upper.starts_with("HELO") {
            b"250-sink\r\n250 8BITMIME\r\n"
        } else if upper.starts_with("MAIL FROM") {
            rcpts.clear();
            b"250 ok\r\n"
        } else if upper.starts_with("RCPT TO") {
            let addr = line
                .split('<')
                .nth(1)
                .and_then(|r| r.split('>').next())
                .unwrap_or("")
                .to_string();
            rcpts.push(addr);
            b"250 ok\r\n"
        } else if upper.starts_with("DATA") {
            let _ = out.write_all(b"354 go on\r\n");
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap_or(0) == 0 {
                    return;
                }
                if l == ".\r\n" {
                    break;
                }
                data.push_str(&l);
            }
            let (lock, cvar) = store;
            let mut m = lock.lock().unwrap();
            for r in &rcpts {
                m.push((r.clone(), data.clone()));
            }
            cvar.notify_all();
            b"250 queued\r\n"
        } else if upper.starts_with("QUIT") {
            let _ = out.write_all(b"221 bye\r\n");
            return;
        } else {
            b"250 ok\r\n"
        };
        if out.write_all(reply).is_err() {
            return;
        }
    }
}

/// A worker turning bad reaches an operator's target as
/// `worker_health_changed` (signed like every webhook).
#[test]
fn a_worker_turning_bad_reaches_the_operators_target() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start(SECRET);
    let secret = secret_file(dir.path(), "ops.secret", SECRET);
    let toml = format!(
        "[notify]\n[[notify.webhook]]\nname = \"ops\"\nurl = \"{}\"\nsecret_file = \"{secret}\"\nevents = [\"worker_health_changed\", \"worker_lost\"]\n",
        rx.url("/ops")
    );
    let server = start_configured_server(dir.path(), &toml, &[]);
    let broken = script(
        dir.path(),
        "broken.sh",
        "echo 'flashing failed' >&2; exit 3",
    )
    .display()
    .to_string();
    let good = script(dir.path(), "good.sh", "exit 0")
        .display()
        .to_string();
    let _bad = start_idle_worker(
        dir.path(),
        "nt5-broken",
        "devicegroup:nt5",
        &server,
        &[&broken],
        &[],
    );
    let _good = start_idle_worker(
        dir.path(),
        "nt5-good",
        "devicegroup:nt5",
        &server,
        &[&good],
        &[],
    );
    for _ in 0..4 {
        submit_run(
            &server,
            &[
                "--device",
                "devicegroup:nt5",
                "--image",
                "img",
                "--packages",
                "a,b,c",
            ],
        );
    }
    let hits = rx.wait("/ops", |h| {
        h.iter()
            .any(|x| x.body["worker"] == "nt5-broken" && x.body["to"] == "bad")
    });
    let bad = hits
        .iter()
        .find(|x| x.body["worker"] == "nt5-broken" && x.body["to"] == "bad")
        .unwrap();
    assert!(bad.valid);
    assert_eq!(bad.body["type"], "worker_health_changed");
    assert_eq!(bad.body["devicegroup"], "nt5");
    assert!(
        hits.iter().all(|h| h.body["type"] != "testrun_finished"),
        "the target asked for worker events only"
    );
}

/// A target whose secret file is missing stops the server at start
/// (exit 78, as every configuration mistake), naming the target, the key
/// and the file.
#[test]
fn a_missing_secret_file_stops_the_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let toml = "[notify]\n[[notify.webhook]]\nname = \"ci\"\nurl = \"https://ci.example.com/hook\"\nsecret_file = \"/nonexistent/ci.secret\"\n";
    let config = dir.path().join("server.toml");
    std::fs::write(&config, toml).unwrap();
    let mut cmd = std::process::Command::new(bin("ots-server"));
    for (k, v) in keys().server_env() {
        cmd.env(k, v);
    }
    cmd.arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(dir.path().join("server"))
        .arg("--control")
        .arg("tcp://127.0.0.1:0")
        .arg("--events")
        .arg("tcp://127.0.0.1:0");
    let out = run_bounded(cmd, LIMIT);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("[[notify.webhook]] \"ci\"")
            && err.contains("secret_file")
            && err.contains("/nonexistent/ci.secret"),
        "{err}"
    );
}
