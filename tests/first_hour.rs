//! Issue 20, items 8–11: what a sysadmin meets in the first hour — one key
//! per worker instance, messages that point at the right file, and
//! `--check-config` checking what a start checks.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const LIMIT: Duration = Duration::from_secs(30);

fn check_server(keys: &Keys, state: &std::path::Path) -> (Option<i32>, String) {
    let mut cmd = Command::new(bin("ots-server"));
    cmd.arg("--check-config").arg("--state-dir").arg(state);
    for (k, v) in keys.server_env() {
        cmd.env(k, v);
    }
    let out = run_bounded(cmd, LIMIT);
    (
        out.status.code(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// Item 10: `--check-config` passed what start refuses. It now reports,
/// naming each file, a missing or too open key, a role typo, a bad
/// `.pub`, a key in two entries, and an allow-list with nobody in it,
/// exiting 78 whenever a start would refuse.
#[test]
fn check_config_reports_what_a_start_would_refuse_or_skip() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let keys = Keys::new();
    let (code, out) = check_server(&keys, &state);
    assert_eq!(code, Some(0), "{out}");

    std::fs::write(keys.users_dir().join("tester.role"), "operater\n").unwrap();
    std::fs::write(keys.workers_dir().join("junk.pub"), "not a key\n").unwrap();
    std::fs::copy(
        keys.users_dir().join("tester.pub"),
        keys.workers_dir().join("twin.pub"),
    )
    .unwrap();
    let (code, out) = check_server(&keys, &state);
    assert_eq!(code, Some(0), "entries are skipped, not fatal: {out}");
    for needle in [
        "tester.role",
        "operater",
        "junk.pub",
        "twin.pub",
        "one key, one identity",
    ] {
        assert!(out.contains(needle), "{needle}: {out}");
    }

    let key = keys.path().join("server.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = check_server(&keys, &state);
    assert_eq!(code, Some(78), "{out}");
    assert!(
        out.contains("server.key") && out.contains("chmod 600"),
        "{out}"
    );
    std::fs::remove_file(&key).unwrap();
    let (code, out) = check_server(&keys, &state);
    assert_eq!(code, Some(78), "{out}");
    assert!(out.contains("server.key"), "{out}");

    // A server with nobody allowed is told so.
    let empty = Keys::new();
    std::fs::remove_file(empty.users_dir().join("tester.pub")).unwrap();
    let (code, out) = check_server(&empty, &state);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no identity is allowed"), "{out}");
}

/// Items 8 and 9: three worker instances on one host, one key each, found
/// by their names from one configuration; a missing instance file is an
/// error naming it, not a worker serving the default device.
#[test]
fn worker_instances_on_one_host_each_find_their_own_key() {
    let dir = tempfile::tempdir().unwrap();
    let keys = Keys::new();
    let etc = dir.path().join("etc");
    let shared = etc.join("worker.toml");
    std::fs::create_dir_all(etc.join("worker.d")).unwrap();
    std::fs::write(
        &shared,
        format!(
            "server_key = {:?}\nkey = {:?}\n",
            keys.server_pub().display().to_string(),
            etc.join("worker.d/{name}.key").display().to_string()
        ),
    )
    .unwrap();
    for (i, name) in ["n900-1", "n900-2", "n900-3"].iter().enumerate() {
        let base = etc.join("worker.d").join(name);
        let out = run_bounded(
            {
                let mut c = Command::new(bin("ots-worker"));
                c.arg("keygen").arg(&base);
                c
            },
            LIMIT,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        std::fs::copy(
            base.with_extension("pub"),
            keys.workers_dir().join(format!("{name}.pub")),
        )
        .unwrap();
        std::fs::write(
            base.with_extension("toml"),
            format!("device = \"devicegroup:n900 devicename:board deviceid:{i}\"\n"),
        )
        .unwrap();
    }
    let server = start_server_keyed(
        &dir.path().join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        &[],
        Some(keys.clone()),
    );
    let workers: Vec<Proc> = ["n900-1", "n900-2", "n900-3"]
        .iter()
        .map(|name| {
            let mut c = Command::new(bin("ots-worker"));
            c.arg("--config")
                .arg(&shared)
                .arg("--instance-config")
                .arg(etc.join("worker.d").join(format!("{name}.toml")))
                .arg("--name")
                .arg(name)
                .arg("--server")
                .arg(&server.control)
                .arg("--events")
                .arg(&server.events)
                .arg("--state-dir")
                .arg(dir.path().join(name));
            Proc::spawn(name, c)
        })
        .collect();
    assert!(
        wait_for_workers(&server, LIMIT, all_idle(&["n900-1", "n900-2", "n900-3"])),
        "{:?}",
        workers.iter().map(|w| w.stderr.all()).collect::<Vec<_>>()
    );
    // A fourth instance whose file was never written does not start.
    let mut c = Command::new(bin("ots-worker"));
    c.arg("--config")
        .arg(&shared)
        .arg("--instance-config")
        .arg(etc.join("worker.d/n900-4.toml"))
        .arg("--name")
        .arg("n900-4");
    let out = run_bounded(c, LIMIT);
    assert_eq!(out.status.code(), Some(78), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("n900-4.toml"),
        "{}",
        text(&out.stderr)
    );
}

/// Item 9: messages that point at the right file. A client pinning the
/// wrong server key is told to check its server key (not sent to look in
/// the server's allow-lists); an unknown key is told which lists lack it.
#[test]
fn refusals_name_the_file_or_setting_to_fix() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let keys = server.keys.clone().unwrap();
    // Pinning another server key.
    let other = dir.path().join("other");
    ots::security::KeyPair::generate().write(&other).unwrap();
    let mut cmd = Command::new(bin("ots-submit"));
    cmd.arg("whoami")
        .env("OTS_SERVER", &server.control)
        .env("OTS_KEY", keys.user("tester", "admin"))
        .env("OTS_PINNED_SERVER_KEY", other.with_extension("pub"));
    let out = run_bounded(cmd, LIMIT);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("server_key") || err.contains("--server-key"),
        "{err}"
    );
    // A key nobody allowed.
    let stranger = dir.path().join("stranger");
    ots::security::KeyPair::generate().write(&stranger).unwrap();
    let mut cmd = Command::new(bin("ots-submit"));
    cmd.arg("whoami")
        .env("OTS_SERVER", &server.control)
        .env("OTS_KEY", stranger.with_extension("key"))
        .env("OTS_PINNED_SERVER_KEY", keys.server_pub());
    let out = run_bounded(cmd, LIMIT);
    let err = text(&out.stderr);
    assert!(
        err.contains("workers_dir, users_dir") && err.contains("NAME.pub"),
        "{err}"
    );
    // Allowed: `whoami --json` is one JSON document; the server may be
    // given as HOST:PORT.
    let mut cmd = Command::new(bin("ots-submit"));
    cmd.args(["whoami", "--json", "--server"])
        .arg(server.control.trim_start_matches("tcp://"))
        .env("OTS_KEY", keys.user("tester", "admin"))
        .env("OTS_PINNED_SERVER_KEY", keys.server_pub());
    let out = run_bounded(cmd, LIMIT);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let me: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (me["kind"].as_str(), me["role"].as_str()),
        (Some("user"), Some("admin")),
        "{me}"
    );
    // A transport ots does not speak is refused naming the form.
    let mut cmd = Command::new(bin("ots-submit"));
    cmd.args(["whoami", "--server", "ipc:///tmp/ots"]);
    let out = run_bounded(cmd, LIMIT);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        text(&out.stderr).contains("tcp://HOST:PORT"),
        "{}",
        text(&out.stderr)
    );
}

/// Item 11: the example conductor takes only images below its images
/// folder: a testrun naming any other file on the worker host is refused
/// without the file being read; `audit` prints dates for people.
#[test]
fn the_example_conductor_refuses_images_outside_its_folder_and_audit_reads_as_dates() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_fresh_server(dir.path(), &[]);
    let conductor = example_conductor();
    let args: Vec<&str> = conductor.iter().map(String::as_str).collect();
    let _w = start_idle_worker(dir.path(), "w", "devicegroup:g", &server, &args, &[]);
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:g",
            "--image",
            "/etc/passwd",
            "--packages",
            "smoke",
            "--wait",
        ],
        LIMIT,
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));
    let log = text(&submit(&server, &["logs", "r1"], LIMIT).stdout);
    assert!(log.contains("not below the images folder"), "{log}");
    assert!(!log.contains("sha256"), "the file was read: {log}");
    assert_smoke_passes(&server, "g");

    let shown = text(&submit(&server, &["audit"], LIMIT).stdout);
    assert!(
        shown.contains(" UTC ") && shown.contains("submit"),
        "{shown}"
    );
    assert!(!shown.contains("at_ms"), "{shown}");
    // --json: one document, as every list prints.
    let json = text(&submit(&server, &["audit", "--json"], LIMIT).stdout);
    let doc: serde_json::Value = serde_json::from_str(&json).expect("one JSON document");
    let entries = doc.as_array().expect("an array of entries");
    assert!(
        !entries.is_empty() && entries.iter().all(|e| e["at_ms"].is_u64()),
        "{json}"
    );
}

/// Item 11: bash completion completes a subcommand's options (it offered
/// file names: clap_complete spelled the subcommands two ways), and every
/// man page a SUBCOMMANDS section names exists, each binary's page with
/// its own description and FILES, ENVIRONMENT and EXIT STATUS.
#[test]
fn completions_complete_subcommand_options_and_every_man_page_named_exists() {
    let dir = tempfile::tempdir().unwrap();
    for b in ["ots-server", "ots-worker", "ots-submit"] {
        let mut c = Command::new(bin(b));
        c.arg("gen-docs").arg(dir.path());
        assert!(run_bounded(c, LIMIT).status.success());
    }
    let script = dir.path().join("completions/bash/ots-submit");
    let mut c = Command::new("bash");
    c.arg("-c").arg(format!(
        "source {:?}; COMP_WORDS=(ots-submit run --); COMP_CWORD=2; _ots__submit ots-submit -- run; echo ${{COMPREPLY[@]}}",
        script
    ));
    let out = text(&run_bounded(c, LIMIT).stdout);
    assert!(
        out.contains("--packages") && out.contains("--queue-anyway"),
        "{out}"
    );

    let man = dir.path().join("man/man1");
    let mut descriptions = std::collections::HashSet::new();
    for b in ["ots-server", "ots-worker", "ots-submit"] {
        let page = std::fs::read_to_string(man.join(format!("{b}.1"))).unwrap();
        for section in [".SH FILES", ".SH ENVIRONMENT", ".SH \"EXIT STATUS\""] {
            assert!(page.contains(section), "{b}: {section}");
        }
        let name_line = page
            .lines()
            .skip_while(|l| *l != ".SH NAME")
            .nth(1)
            .unwrap()
            .to_string();
        assert!(
            descriptions.insert(name_line.clone()),
            "shared description: {name_line}"
        );
        for named in page
            .lines()
            .filter(|l| l.ends_with("(1)") && l.starts_with(&b.replace('-', "\\-")))
        {
            let file = named.trim_end_matches("(1)").replace("\\-", "-");
            assert!(
                man.join(format!("{file}.1")).exists(),
                "{b} names {file}(1), which is not generated"
            );
        }
    }
}

/// Issue 38: Tab completes what only the server knows — run ids, task
/// ids, worker names and leases — through the generated bash and zsh
/// scripts asking `ots-submit complete` as the user; with no server it
/// completes nothing, at once.
#[test]
fn completion_asks_the_server_for_run_ids_tasks_workers_and_leases() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    let mut c = Command::new(bin("ots-submit"));
    c.arg("gen-docs").arg(&docs);
    assert!(run_bounded(c, LIMIT).status.success());
    let server = start_fresh_server(dir.path(), &[]);
    let conductor = script(dir.path(), "ok.sh", "exit 0");
    let _w = start_worker(
        dir.path(),
        "tab-w1",
        "devicegroup:tab",
        &server,
        &[conductor.to_str().unwrap()],
        &[],
    );
    assert!(wait_for_workers(&server, LIMIT, all_idle(&["tab-w1"])));
    let out = submit(
        &server,
        &[
            "run",
            "--device",
            "devicegroup:tab",
            "--image",
            "i",
            "--packages",
            "a,b",
            "--distribution",
            "perpackage",
        ],
        LIMIT,
    );
    let run = text(&out.stdout)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string();
    assert!(
        run.starts_with('r'),
        "{:?} {} {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    wait_status(&server, &run, LIMIT, finished);
    let bin_dir = bin("ots-submit").parent().unwrap().display().to_string();
    let script = docs.join("completions/bash/ots-submit");
    let tab = |words: &str, server_up: bool| {
        let n = words.split(' ').count() - 1;
        let mut c = Command::new("bash");
        c.arg("-c").arg(format!(
            "source {script:?}; COMP_WORDS=({words}); COMP_CWORD={n}; _ots_submit_ids ots-submit; echo \"${{COMPREPLY[@]}}\""
        ));
        c.env(
            "PATH",
            format!("{bin_dir}:{}", std::env::var("PATH").unwrap()),
        );
        c.env(
            "OTS_SERVER",
            if server_up {
                server.control.clone()
            } else {
                format!("tcp://127.0.0.1:{}", free_port())
            },
        );
        submit_env(&mut c, &server, &server.user);
        let t0 = std::time::Instant::now();
        let out = text(&run_bounded(c, LIMIT).stdout).trim().to_string();
        (out, t0.elapsed())
    };
    let (runs, _) = tab("ots-submit status r", true);
    assert!(runs.split(' ').any(|r| r == run), "{runs}");
    let (workers, _) = tab("ots-submit drain tab", true);
    assert_eq!(workers, "tab-w1");
    let (tasks, _) = tab(&format!("ots-submit logs {run} {run}."), true);
    assert_eq!(tasks, format!("{run}.1 {run}.2"));
    // Global options before the command are stepped over.
    let (runs_after_options, _) = tab("ots-submit --connect-timeout 2s status r", true);
    assert!(runs_after_options.contains(&run), "{runs_after_options}");
    // Options still complete as before.
    let (options, _) = tab("ots-submit status --", true);
    assert!(options.contains("--json"), "{options}");
    // No server: nothing, within the completion's own bound.
    let (nothing, took) = tab("ots-submit status r", false);
    assert_eq!(nothing, "");
    assert!(took < Duration::from_secs(5), "{took:?}");
    // zsh and fish call the same command.
    let zsh = std::fs::read_to_string(docs.join("completions/zsh/_ots-submit")).unwrap();
    assert!(
        zsh.contains("compdef _ots_submit_ids ots-submit")
            && zsh.contains("ots-submit complete $kind"),
        "zsh"
    );
    let fish = std::fs::read_to_string(docs.join("completions/fish/ots-submit.fish")).unwrap();
    assert!(
        fish.contains("ots-submit complete runs (commandline -ct)"),
        "fish"
    );
}
