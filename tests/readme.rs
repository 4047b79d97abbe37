//! Issue 20, item 7: the README's "Try it by hand" block works as written
//! on a fresh machine with security on — run here line by line in bash,
//! with a fresh `HOME`, the lab folder in a temporary directory and the
//! binaries this test run built (the block's `cargo build` is skipped:
//! `cargo test` built them, and a nested cargo would wait on its lock).

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

/// The first `sh` code block after `heading` in the README.
fn block_after(heading: &str) -> String {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme.find(heading).expect("the heading");
    let rest = &readme[at..];
    let start = rest.find("```sh\n").expect("a sh block") + "```sh\n".len();
    let end = rest[start..].find("```").expect("the block's end") + start;
    rest[start..end].to_string()
}

/// The README's lab uses fixed ports (5555, 5556): its blocks run one at
/// a time.
static LAB_PORTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_try_it_by_hand_block_runs_as_written() {
    let _ports = LAB_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let block = block_after("## Try it by hand");
    let lab = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let bin_dir = bin("ots-server").parent().unwrap().display().to_string();
    let lab_dir = lab.path().join("ots-lab").display().to_string();
    let script: String = block
        .lines()
        .filter(|l| l.trim() != "cargo build")
        .map(|l| {
            l.replace("target/debug/", &format!("{bin_dir}/"))
                .replace("/tmp/ots-lab", &lab_dir)
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("ots-server lab"), "{script}");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{script}\n"
        ))
        .current_dir(repo())
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME");
    for var in [
        "OTS_SERVER",
        "OTS_KEY",
        "OTS_PINNED_SERVER_KEY",
        "OTS_SECURITY",
    ] {
        cmd.env_remove(var);
    }
    let out = run_bounded(cmd, Duration::from_secs(120));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let all = format!("{stdout}\n--- stderr ---\n{stderr}");
    // The testrun ran on both workers and ended as the README says.
    assert!(stdout.contains("testrun r1: FAIL"), "{all}");
    for package in ["smoke", "network", "failing"] {
        assert!(stdout.contains(&format!("[{package}]")), "{package}: {all}");
    }
    assert!(stdout.contains("w1") && stdout.contains("w2"), "{all}");
    // The results were fetched into the lab folder, and the log shown.
    assert!(lab.path().join("ots-lab/results").is_dir(), "{all}");
    assert!(stdout.contains("r1.1"), "{all}");
    // Nothing was refused for a key, and nothing under /etc/ots used.
    assert!(!all.contains("No such file or directory"), "{all}");
    assert!(!all.contains("/etc/ots"), "{all}");
}

/// "Leases: a device for a person" runs as written in the lab of "Try it
/// by hand" (that block first, as a newcomer reads them): a lease on one
/// of its workers, a testrun on it, a console and a power status without
/// a console or power there, the release.
#[test]
fn the_lease_block_runs_as_written_in_the_lab() {
    let _ports = LAB_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let lab = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let bin_dir = bin("ots-server").parent().unwrap().display().to_string();
    let lab_dir = lab.path().join("ots-lab").display().to_string();
    let blocks = format!(
        "{}\n{}",
        block_after("## Try it by hand"),
        block_after("## Leases: a device for a person")
    );
    let script: String = blocks
        .lines()
        .filter(|l| l.trim() != "cargo build")
        .map(|l| {
            l.replace("target/debug/", &format!("{bin_dir}/"))
                .replace("/tmp/ots-lab", &lab_dir)
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("reserve devicegroup:example"), "{script}");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{script}\n"
        ))
        .current_dir(repo())
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME");
    for var in [
        "OTS_SERVER",
        "OTS_KEY",
        "OTS_PINNED_SERVER_KEY",
        "OTS_SECURITY",
    ] {
        cmd.env_remove(var);
    }
    let out = run_bounded(cmd, Duration::from_secs(180));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let all = format!("{stdout}\n--- stderr ---\n{stderr}");
    assert!(stderr.contains("lease l2: granted on worker"), "{all}");
    assert!(stdout.contains("bring-up"), "{all}");
    assert!(stdout.contains("testrun r3: PASS"), "{all}");
    assert!(stderr.contains("console of lease l2 on worker"), "{all}");
    assert!(
        stdout.contains("unknown (this worker has no [power] status command"),
        "{all}"
    );
    assert!(stdout.contains("lease l2 released"), "{all}");
    assert_eq!(out.status.code(), Some(0), "{all}");
}

/// The `toml` blocks of "Device health and fair share" are valid
/// configuration as written: the server's loads and validates, the
/// worker's `[recovery]` table loads into a worker configuration.
#[test]
fn the_health_configuration_blocks_load_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme
        .find("## Device health and fair share")
        .expect("the heading");
    let section = &readme[at..readme[at + 3..]
        .find("\n## ")
        .map_or(readme.len(), |e| e + at + 3)];
    let blocks: Vec<&str> = section
        .split("```toml\n")
        .skip(1)
        .map(|b| &b[..b.find("```").expect("the block's end")])
        .collect();
    assert_eq!(blocks.len(), 2, "{section}");
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("server.toml");
    std::fs::write(&server, blocks[0]).unwrap();
    let cfg = ots::server::config::ServerConfig::load(Some(&server), &[]).unwrap();
    assert_eq!(cfg.health.check.len(), 1);
    assert_eq!(cfg.health.check[0].interval_secs, 24 * 3600);
    let worker = dir.path().join("worker.toml");
    std::fs::write(
        &worker,
        format!(
            "name = \"w\"\ndevice = \"devicegroup:n900\"\nsecurity = \"none\"\n{}",
            blocks[1]
        ),
    )
    .unwrap();
    let cfg = ots::worker::config::WorkerConfig::load(Some(&worker), &[]).unwrap();
    assert_eq!(cfg.recovery.command[0], "pdudaemon-client");
    assert_eq!(cfg.recovery.timeout_secs, 300);
}

/// Opens `$link` (no redirect followed) and prints its status.
/// Opens the link as a browser does when the user pastes it: it says
/// `Sec-Fetch-Site: none` (a client that does not say gets the page that
/// asks first).
const OPEN: &str = r#"python3 -c 'import sys, http.client, urllib.parse as u
p = u.urlsplit(sys.argv[1]); c = http.client.HTTPConnection(p.netloc, timeout=30)
c.request("GET", p.path + "?" + p.query, headers={"Sec-Fetch-Site": "none"}); print("opened:", c.getresponse().status)' "$link""#;

/// The "Web dashboard" block works as written: a lab server with the
/// dashboard, and `ots-submit web` printing a link that signs in (the
/// port is made free for the test; the link is then opened).
#[test]
fn the_web_dashboard_block_runs_as_written() {
    let _ports = LAB_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let block = block_after("## Web dashboard");
    let lab = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    let bin_dir = bin("ots-server").parent().unwrap().display().to_string();
    let lab_dir = lab.path().join("ots-lab").display().to_string();
    let port = free_port();
    let script: String = block
        .lines()
        .map(|l| {
            let l = l
                .replace("target/debug/", &format!("{bin_dir}/"))
                .replace("/tmp/ots-lab", &lab_dir)
                .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
            if l.trim_end().ends_with("ots-submit web") {
                format!("link=$({l}) || exit 9\necho \"$link\"\n{OPEN}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("ots-submit web"), "{script}");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT\n{script}\n"
        ))
        .current_dir(repo())
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("BROWSER");
    for var in [
        "OTS_SERVER",
        "OTS_KEY",
        "OTS_PINNED_SERVER_KEY",
        "OTS_SECURITY",
        "OTS_SERVER_WEB",
    ] {
        cmd.env_remove(var);
    }
    let out = run_bounded(cmd, Duration::from_secs(120));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    let all = format!("{stdout}\n--- stderr ---\n{stderr}");
    assert!(
        stdout.contains(&format!("http://127.0.0.1:{port}/login?token=")),
        "{all}"
    );
    assert!(stdout.contains("opened: 303"), "{all}");
}

/// The "Notifications" blocks work as written: the `[notify]` example
/// loads and passes the start's checks, and the receiver's Python check
/// accepts what the server signs (and refuses a changed body).
#[test]
fn the_notification_blocks_work_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme.find("## Notifications").expect("the heading");
    let section = &readme[at..readme[at + 3..]
        .find("\n## ")
        .map_or(readme.len(), |e| e + at + 3)];
    let block = |lang: &str| {
        let start = section.find(&format!("```{lang}\n")).expect("the block") + lang.len() + 4;
        section[start..start + section[start..].find("```").unwrap()].to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("server.toml");
    std::fs::write(&server, block("toml")).unwrap();
    let cfg = ots::server::config::ServerConfig::load(Some(&server), &[]).unwrap();
    let rules = cfg.notify.rules(None).unwrap();
    assert_eq!(rules.targets.len(), 2);
    assert_eq!(rules.mail_relay.as_deref(), Some("lab-mail"));

    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let key = ots::notify::signature::SigningKey::from_file_content(secret.as_bytes()).unwrap();
    let now = ots::protocol::limits::unix_ms_now() / 1000;
    let body = r#"{"type":"testrun_finished","run":"r1"}"#;
    let sig = key.sign("msg_0123", now, body.as_bytes());
    let check = |body: &str| {
        let program = format!(
            "{}\nh = {{'webhook-id': 'msg_0123', 'webhook-timestamp': '{now}', 'webhook-signature': 'v1,x {sig}'}}\nprint(valid({secret:?}, h, {body:?}.encode()))\n",
            block("python")
        );
        let out = std::process::Command::new("python3")
            .arg("-c")
            .arg(&program)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(check(body), "True");
    assert_eq!(check(&body.replace("r1", "r2")), "False");
}

/// The PostgreSQL block of "State and crashes" loads as written.
#[test]
fn the_postgresql_block_loads_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme
        .find("### State in PostgreSQL, and a standby server")
        .expect("the heading");
    let rest = &readme[at..];
    let start = rest.find("```toml\n").expect("the block") + "```toml\n".len();
    let block = &rest[start..start + rest[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, block).unwrap();
    let cfg = ots::server::config::ServerConfig::load(Some(&file), &[]).unwrap();
    let pg = cfg.postgres().expect("PostgreSQL");
    assert_eq!(pg.url, "postgresql://ots@db.example.org/ots");
    assert_eq!(
        cfg.lease_policy(),
        ots::server::lease::LeasePolicy::default()
    );
}

/// The workers' endpoint lists of that section load as written.
#[test]
fn the_worker_endpoint_list_block_loads_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme
        .find("Workers and `ots-submit` take the list of servers")
        .expect("the paragraph");
    let rest = &readme[at..];
    let start = rest.find("```toml\n").expect("the block") + "```toml\n".len();
    let block = &rest[start..start + rest[start..].find("```").unwrap()];
    let pairs = block
        .lines()
        .map(|l| l.split_once(" = ").unwrap().1.trim_matches('"').to_string())
        .collect::<Vec<_>>();
    let endpoints = ots::settings::endpoint_pairs(&pairs[0], &pairs[1]).unwrap();
    assert_eq!(endpoints.len(), 2);
    assert_eq!(endpoints[1].0, "tcp://ots-b.lab:5555");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("worker.toml");
    std::fs::write(
        &file,
        format!("name = \"w\"\ndevice = \"devicegroup:n900\"\nsecurity = \"none\"\n{block}"),
    )
    .unwrap();
    ots::worker::config::WorkerConfig::load(Some(&file), &[]).unwrap();
}

/// Issue 34, finding 14: "A worker on its own host" works as written. Two
/// "hosts" on this machine, each installed with `scripts/install.sh` into
/// a folder of its own (its `/etc/ots` and `/var/lib/ots` below it); the
/// block runs on the worker host with `sudo` dropped, `ots.lab` being
/// 127.0.0.1 and `scp` copying between the two folders.
#[test]
fn a_worker_on_its_own_host_registers_as_written() {
    let _ports = LAB_PORTS.lock().unwrap_or_else(|e| e.into_inner());
    let block = block_after("### A worker on its own host");
    let hosts = tempfile::tempdir().unwrap();
    let bin_dir = bin("ots-server").parent().unwrap().to_path_buf();
    let install = |name: &str| {
        let root = hosts.path().join(name);
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/install.sh"))
            .env("BINDIR_SRC", &bin_dir)
            .env("PREFIX", root.join("usr"))
            .env("SYSCONFDIR", root.join("etc"))
            .env("DESTDIR", "");
        let out = run_bounded(cmd, Duration::from_secs(120));
        assert!(out.status.success(), "install.sh: {}", text(&out.stderr));
        // The host's /etc/ots and /var/lib/ots are below its folder.
        for conf in ["server.toml", "worker.toml"] {
            let path = root.join("etc/ots").join(conf);
            let t = std::fs::read_to_string(&path).unwrap();
            let t = t
                .replace("/etc/ots", &root.join("etc/ots").display().to_string())
                .replace(
                    "/var/lib/ots",
                    &root.join("var/lib/ots").display().to_string(),
                )
                .replace("0.0.0.0", "127.0.0.1");
            std::fs::write(&path, t).unwrap();
        }
        root
    };
    let server_host = install("server-host");
    let worker_host = install("worker-host");
    // The server host: its key, and the installed server started.
    let sbin = server_host.join("usr/bin");
    let out = run_bounded(
        {
            let mut c = Command::new(sbin.join("ots-server"));
            c.arg("keygen").arg(server_host.join("etc/ots/server"));
            c
        },
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::fs::create_dir_all(server_host.join("var/lib/ots/server")).unwrap();
    let mut cmd = Command::new(sbin.join("ots-server"));
    cmd.arg("--config")
        .arg(server_host.join("etc/ots/server.toml"));
    let server = Proc::spawn("server-host", cmd);
    assert!(
        server
            .stderr
            .wait_for("server listening", Duration::from_secs(30))
            .is_some(),
        "{:?}",
        server.stderr.all()
    );
    // The block, on the worker host.
    let s_etc = server_host.join("etc/ots").display().to_string();
    let w_etc = worker_host.join("etc/ots").display().to_string();
    let w_var = worker_host.join("var/lib/ots").display().to_string();
    let script: String = block
        .lines()
        .map(|l| {
            l.replace("sudo ", "")
                .replace("ots.lab:/etc/ots", "SERVERHOST")
                .replace("/etc/ots", &w_etc)
                .replace("SERVERHOST", &format!("serverhost:{s_etc}"))
                .replace("/var/lib/ots", &w_var)
                .replace("ots.lab", "127.0.0.1")
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(script.contains("--check-config"), "{script}");
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "set -e\nscp() {{ cp \"${{1#serverhost:}}\" \"${{2#serverhost:}}\"; }}\n{script}\nwait\n"
        ))
        .env(
            "PATH",
            format!(
                "{}:{}",
                worker_host.join("usr/bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        );
    let worker = Proc::spawn("worker-host", cmd);
    let registered = worker
        .stderr
        .wait_for("registered with the server", Duration::from_secs(60));
    assert!(
        registered.is_some(),
        "worker: {:?}\nserver: {:?}",
        worker.stderr.all(),
        server.stderr.all()
    );
    assert!(server.stderr.count("w3") > 0 || worker.stderr.count("w3") > 0);
}

/// The `[results]` block of "Results" loads as written, its known-issue
/// rule compiled.
#[test]
fn the_results_block_loads_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let at = readme
        .find("### Results: what failed")
        .expect("the heading");
    let rest = &readme[at..];
    let start = rest.find("```toml\n").expect("the block") + "```toml\n".len();
    let block = &rest[start..start + rest[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("server.toml");
    std::fs::write(&file, block).unwrap();
    let cfg = ots::server::config::ServerConfig::load(Some(&file), &[]).unwrap();
    let rules = cfg.results.rules();
    assert_eq!((rules.window_runs, rules.flaky_runs), (10, 50));
    assert_eq!(rules.known.len(), 1);
    assert_eq!(rules.known[0].label, "BUG-123");
    let known = ots::server::results::KnownRules::new(rules.known);
    assert_eq!(known.list().count(), 1, "the pattern compiles");
    // A pattern that does not compile stops the start, naming it.
    std::fs::write(&file, block.replace("timeout waiting for dhcp", "(")).unwrap();
    let err = ots::server::config::ServerConfig::load(Some(&file), &[]).unwrap_err();
    assert!(err.to_string().contains("results.known"), "{err}");
}
