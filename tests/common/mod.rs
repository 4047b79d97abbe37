//! Test harness: the real binaries as child processes on loopback with
//! ephemeral ports, each in its own process group that is killed when its
//! guard drops, with stderr collected so tests can wait for log lines.
#![allow(dead_code)]

pub mod browser;
pub mod http;
pub mod pg;
pub mod zmtp;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub fn bin(name: &str) -> PathBuf {
    match name {
        "ots-server" => PathBuf::from(env!("CARGO_BIN_EXE_ots-server")),
        "ots-worker" => PathBuf::from(env!("CARGO_BIN_EXE_ots-worker")),
        "ots-submit" => PathBuf::from(env!("CARGO_BIN_EXE_ots-submit")),
        other => panic!("unknown binary {other}"),
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Lines a child wrote to stderr, shared with the test.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<Vec<String>>, Condvar)>);

impl Lines {
    pub fn all(&self) -> Vec<String> {
        self.0 .0.lock().unwrap().clone()
    }

    /// Waits until a line containing `needle` appears after the first
    /// `skip` lines; returns it and its index.
    pub fn wait_for_after(
        &self,
        skip: usize,
        needle: &str,
        limit: Duration,
    ) -> Option<(usize, String)> {
        let deadline = Instant::now() + limit;
        let (lock, cvar) = &*self.0;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some((i, l)) = lines
                .iter()
                .enumerate()
                .skip(skip)
                .find(|(_, l)| l.contains(needle))
            {
                return Some((i, l.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = cvar.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    pub fn wait_for(&self, needle: &str, limit: Duration) -> Option<String> {
        self.wait_for_after(0, needle, limit).map(|(_, l)| l)
    }

    pub fn count(&self, needle: &str) -> usize {
        self.all().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn len(&self) -> usize {
        self.0 .0.lock().unwrap().len()
    }

    /// Adds a line (output read some other way than a pipe).
    pub fn push(&self, line: String) {
        let (lock, cvar) = &*self.0;
        lock.lock().unwrap().push(line);
        cvar.notify_all();
    }
}

/// A child process in its own process group, killed (group and all) on drop.
pub struct Proc {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
    pub name: String,
}

fn collect(stream: impl std::io::Read + Send + 'static, sink: Lines, label: String) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if std::env::var_os("OTS_TEST_VERBOSE").is_some() {
                eprintln!("[{label}] {line}");
            }
            let (lock, cvar) = &*sink.0;
            lock.lock().unwrap().push(line);
            cvar.notify_all();
        }
    });
}

impl Proc {
    pub fn spawn(name: &str, cmd: Command) -> Proc {
        Self::start(name, cmd, Stdio::null()).0
    }

    /// [`Proc::spawn`] with its stdin a pipe the caller writes to.
    pub fn spawn_with_stdin(name: &str, cmd: Command) -> (Proc, std::process::ChildStdin) {
        let (p, stdin) = Self::start(name, cmd, Stdio::piped());
        (p, stdin.expect("a piped stdin"))
    }

    fn start(
        name: &str,
        mut cmd: Command,
        stdin: Stdio,
    ) -> (Proc, Option<std::process::ChildStdin>) {
        cmd.stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdin = child.stdin.take();
        let (stdout, stderr) = (Lines::default(), Lines::default());
        collect(
            child.stdout.take().unwrap(),
            stdout.clone(),
            format!("{name}:out"),
        );
        collect(
            child.stderr.take().unwrap(),
            stderr.clone(),
            name.to_string(),
        );
        (
            Proc {
                child,
                stdout,
                stderr,
                name: name.to_string(),
            },
            stdin,
        )
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Waits for the process to exit by itself; its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20)); // polling interval, bounded by the deadline
        }
        None
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = nix::sys::signal::killpg(self.pid(), nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(self.pid(), nix::sys::signal::Signal::SIGCONT);
        self.kill();
    }
}

/// The keys of a secured test lab: the server's key pair, `workers.d`
/// and `users.d` allow-lists, and the private keys of the workers and
/// users the tests create (an admin `tester` from the start).
pub struct Keys {
    dir: tempfile::TempDir,
    lock: Mutex<()>,
}

impl Keys {
    pub fn new() -> Arc<Keys> {
        let dir = tempfile::Builder::new()
            .prefix("ots-keys-")
            .tempdir()
            .unwrap();
        for d in ["workers.d", "users.d", "private"] {
            std::fs::create_dir_all(dir.path().join(d)).unwrap();
        }
        ots::security::KeyPair::generate()
            .write(&dir.path().join("server"))
            .unwrap();
        let keys = Arc::new(Keys {
            dir,
            lock: Mutex::new(()),
        });
        keys.user("tester", "admin");
        keys
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn workers_dir(&self) -> PathBuf {
        self.path().join("workers.d")
    }

    pub fn users_dir(&self) -> PathBuf {
        self.path().join("users.d")
    }

    pub fn server_pub(&self) -> PathBuf {
        self.path().join("server.pub")
    }

    /// The private key of worker `name`, allow-listed on first use.
    pub fn worker(&self, name: &str) -> PathBuf {
        let _g = self.lock.lock().unwrap();
        let base = self.path().join("private").join(format!("worker-{name}"));
        if !base.with_extension("key").exists() {
            ots::security::KeyPair::generate().write(&base).unwrap();
            std::fs::copy(
                base.with_extension("pub"),
                self.workers_dir().join(format!("{name}.pub")),
            )
            .unwrap();
        }
        base.with_extension("key")
    }

    /// The private key of user `name` with `role`, allow-listed on first use.
    pub fn user(&self, name: &str, role: &str) -> PathBuf {
        let _g = self.lock.lock().unwrap();
        let base = self.path().join("private").join(format!("user-{name}"));
        if !base.with_extension("key").exists() {
            ots::security::KeyPair::generate().write(&base).unwrap();
            std::fs::copy(
                base.with_extension("pub"),
                self.users_dir().join(format!("{name}.pub")),
            )
            .unwrap();
            std::fs::write(self.users_dir().join(format!("{name}.role")), role).unwrap();
        }
        base.with_extension("key")
    }

    /// Environment that points a server at these keys.
    pub fn server_env(&self) -> Vec<(String, String)> {
        vec![
            (
                "OTS_SERVER_KEY".into(),
                self.path().join("server.key").display().to_string(),
            ),
            (
                "OTS_SERVER_WORKERS_DIR".into(),
                self.workers_dir().display().to_string(),
            ),
            (
                "OTS_SERVER_USERS_DIR".into(),
                self.users_dir().display().to_string(),
            ),
        ]
    }

    /// Worker config lines that authenticate as `name`.
    pub fn worker_toml(&self, name: &str) -> String {
        format!(
            "security = \"noise\"\nkey = {:?}\nserver_key = {:?}\n",
            self.worker(name).display().to_string(),
            self.server_pub().display().to_string()
        )
    }
}

/// The keys every secured server of this test process uses, unless a test
/// makes its own.
pub fn keys() -> Arc<Keys> {
    KEYS.get_or_init(|| {
        // The static is never dropped: its folder goes at exit.
        // SAFETY: registering a plain function to run at exit.
        unsafe {
            keys_atexit(remove_keys);
        }
        Keys::new()
    })
    .clone()
}

static KEYS: std::sync::OnceLock<Arc<Keys>> = std::sync::OnceLock::new();

extern "C" fn remove_keys() {
    if let Some(k) = KEYS.get() {
        let _ = std::fs::remove_dir_all(k.path());
    }
}

extern "C" {
    #[link_name = "atexit"]
    fn keys_atexit(f: extern "C" fn()) -> i32;
}

/// A running `ots-server` and the endpoints it bound.
pub struct ServerProc {
    pub proc: Proc,
    pub control: String,
    pub events: String,
    pub state_dir: PathBuf,
    /// The keys it runs with; None with `security = "none"`.
    pub keys: Option<Arc<Keys>>,
    /// The user `ots-submit` runs as (default `tester`, admin).
    pub user: String,
}

impl ServerProc {
    /// The same server, with `ots-submit` running as another user.
    pub fn as_user(&self, user: &str) -> ServerProcView<'_> {
        ServerProcView {
            server: self,
            user: user.to_string(),
        }
    }
}

/// A server seen as a particular user (see [`ServerProc::as_user`]).
pub struct ServerProcView<'a> {
    pub server: &'a ServerProc,
    pub user: String,
}

impl ServerProcView<'_> {
    pub fn submit(&self, args: &[&str], limit: Duration) -> Output {
        submit_as(self.server, &self.user, args, limit)
    }
}

pub fn field(line: &str, key: &str) -> String {
    let start = line
        .find(&format!("{key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len()
        + 1;
    line[start..].split_whitespace().next().unwrap().to_string()
}

/// Starts a server with its state in `dir/server` on ephemeral ports, with
/// extra `OTS_SERVER_*` environment.
pub fn start_fresh_server(dir: &Path, env: &[(&str, &str)]) -> ServerProc {
    start_server(
        &dir.join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        env,
    )
}

/// Starts a server on `control`/`events` (use port 0 for ephemeral ones)
/// with extra `OTS_SERVER_*` environment.
pub fn start_server(
    state_dir: &Path,
    control: &str,
    events: &str,
    env: &[(&str, &str)],
) -> ServerProc {
    let insecure = env
        .iter()
        .any(|(k, v)| *k == "OTS_SERVER_SECURITY" && *v == "none");
    start_server_keyed(
        state_dir,
        control,
        events,
        env,
        if insecure { None } else { Some(keys()) },
    )
}

/// Starts a server with `security = "none"` (tests of the protocol's
/// decoder with raw peers, and the simulated fleet).
pub fn start_server_insecure(
    state_dir: &Path,
    control: &str,
    events: &str,
    env: &[(&str, &str)],
) -> ServerProc {
    let mut env = env.to_vec();
    env.push(("OTS_SERVER_SECURITY", "none"));
    start_server_keyed(state_dir, control, events, &env, None)
}

/// Starts a server with these keys (None: without security).
pub fn start_server_keyed(
    state_dir: &Path,
    control: &str,
    events: &str,
    env: &[(&str, &str)],
    keys: Option<Arc<Keys>>,
) -> ServerProc {
    start_server_args(state_dir, control, events, env, keys, &[])
}

/// Starts a fresh secured server (state in `dir/server`, ephemeral
/// ports) with `toml` as its configuration file.
pub fn start_configured_server(dir: &Path, toml: &str, env: &[(&str, &str)]) -> ServerProc {
    let config = dir.join("server.toml");
    std::fs::write(&config, toml).unwrap();
    let config = config.display().to_string();
    start_server_args(
        &dir.join("server"),
        "tcp://127.0.0.1:0",
        "tcp://127.0.0.1:0",
        env,
        Some(keys()),
        &["--config", &config],
    )
}

/// [`start_server_keyed`] with extra command-line arguments.
pub fn start_server_args(
    state_dir: &Path,
    control: &str,
    events: &str,
    env: &[(&str, &str)],
    keys: Option<Arc<Keys>>,
    args: &[&str],
) -> ServerProc {
    let mut cmd = Command::new(bin("ots-server"));
    cmd.args(args);
    if let Some(k) = &keys {
        for (name, value) in k.server_env() {
            cmd.env(name, value);
        }
    }
    cmd.arg("--control")
        .arg(control)
        .arg("--events")
        .arg(events)
        .arg("--state-dir")
        .arg(state_dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let proc = Proc::spawn("server", cmd);
    let line = proc
        .stderr
        .wait_for("server listening", Duration::from_secs(20))
        .unwrap_or_else(|| panic!("server did not start: {:?}", proc.stderr.all()));
    ServerProc {
        control: field(&line, "control"),
        events: field(&line, "events"),
        proc,
        state_dir: state_dir.to_path_buf(),
        keys,
        user: "tester".into(),
    }
}

/// Writes a worker config using `conductor` (argv template) and starts it.
pub fn start_worker(
    dir: &Path,
    name: &str,
    device: &str,
    server: &ServerProc,
    conductor: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let security = match &server.keys {
        Some(k) => k.worker_toml(name),
        None => "security = \"none\"\n".to_string(),
    };
    start_worker_with(
        dir,
        name,
        device,
        &server.control,
        &server.events,
        conductor,
        env,
        &security,
    )
}

/// Like [`start_worker`], with explicit endpoints and extra top-level TOML.
#[allow(clippy::too_many_arguments)]
pub fn start_worker_with(
    dir: &Path,
    name: &str,
    device: &str,
    control: &str,
    events: &str,
    conductor: &[&str],
    env: &[(&str, &str)],
    extra: &str,
) -> Proc {
    let cfg = dir.join(format!("{name}.toml"));
    let command: Vec<String> = conductor.iter().map(|a| format!("{a:?}")).collect();
    // Secured with the process's keys unless `extra` says otherwise.
    let extra = if extra.contains("security") {
        extra.to_string()
    } else {
        format!("{}{extra}", keys().worker_toml(name))
    };
    std::fs::write(
        &cfg,
        format!(
            "name = {name:?}\nserver = {control:?}\nevents = {events:?}\ndevice = {device:?}\nstate_dir = {:?}\n{extra}\n\n[conductor]\ncommand = [{}]\nkill_grace_ms = 1000\n",
            dir.join(name).display().to_string(),
            command.join(", ")
        ),
    )
    .unwrap();
    let mut cmd = Command::new(bin("ots-worker"));
    cmd.arg("--config").arg(&cfg);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(name, cmd)
}

/// The example conductor's argv template.
pub fn example_conductor() -> Vec<String> {
    vec![
        repo().join("examples/conductor.sh").display().to_string(),
        "--image".into(),
        "{image}".into(),
        "--packages".into(),
        "{packages}".into(),
        "--results".into(),
        "{results_dir}".into(),
    ]
}

/// Runs `ots-submit` with `args` against `server`, bounded by `limit`.
pub fn submit(server: &ServerProc, args: &[&str], limit: Duration) -> Output {
    submit_as(server, &server.user, args, limit)
}

/// `ots-submit` as user `user` (created with role submit if new).
pub fn submit_as(server: &ServerProc, user: &str, args: &[&str], limit: Duration) -> Output {
    let mut cmd = Command::new(bin("ots-submit"));
    cmd.args(args);
    cmd.env("OTS_SERVER", &server.control);
    submit_env(&mut cmd, server, user);
    run_bounded(cmd, limit)
}

/// The environment that makes `ots-submit` talk to `server` as `user`.
pub fn submit_env(cmd: &mut Command, server: &ServerProc, user: &str) {
    match &server.keys {
        Some(k) => {
            cmd.env("OTS_SECURITY", "noise")
                .env("OTS_KEY", k.user(user, "submit"))
                .env("OTS_PINNED_SERVER_KEY", k.server_pub());
        }
        None => {
            cmd.env("OTS_SECURITY", "none");
        }
    }
}

/// [`submit_env`] as a list, for `Command::envs`.
pub fn submit_envs(server: &ServerProc) -> Vec<(String, String)> {
    match &server.keys {
        Some(k) => vec![
            ("OTS_SECURITY".into(), "noise".into()),
            (
                "OTS_KEY".into(),
                k.user("tester", "admin").display().to_string(),
            ),
            (
                "OTS_PINNED_SERVER_KEY".into(),
                k.server_pub().display().to_string(),
            ),
        ],
        None => vec![("OTS_SECURITY".into(), "none".into())],
    }
}

/// What a library client uses against `server` (as `tester`).
pub fn credentials(server: &ServerProc) -> ots::security::Credentials {
    match &server.keys {
        Some(k) => ots::security::Credentials::Noise {
            key: ots::security::KeyPair::read(&k.user("tester", "admin")).unwrap(),
            server: ots::security::PublicKey::read(&k.server_pub()).unwrap(),
        },
        None => ots::security::Credentials::None,
    }
}

/// Runs a command to completion, killing it after `limit`.
pub fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().expect("spawn");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let done = Arc::new(Mutex::new(false));
    let flag = done.clone();
    let watchdog = std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if *flag.lock().unwrap() {
                return;
            }
            std::thread::park_timeout(Duration::from_millis(50));
        }
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
    });
    let out = child.wait_with_output().expect("wait");
    *done.lock().unwrap() = true;
    watchdog.thread().unpark();
    let _ = watchdog.join();
    out
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Polls `ots-submit workers --json` until `ok` holds for the list.
pub fn wait_for_workers(
    server: &ServerProc,
    limit: Duration,
    ok: impl Fn(&[serde_json::Value]) -> bool,
) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let out = submit(
            server,
            &["workers", "--json", "--connect-timeout", "1s"],
            Duration::from_secs(5),
        );
        if out.status.success() {
            if let Ok(serde_json::Value::Array(ws)) = serde_json::from_slice(&out.stdout) {
                if ok(&ws) {
                    return true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
    false
}

/// True if every named worker is registered and idle.
pub fn all_idle<'a>(names: &'a [&'a str]) -> impl Fn(&[serde_json::Value]) -> bool + 'a {
    move |ws| {
        names
            .iter()
            .all(|n| ws.iter().any(|w| w["name"] == *n && w["state"] == "idle"))
    }
}

/// A free loopback TCP port nothing listens on (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A conductor that says `started`, waits for the file `go` next to it,
/// then passes with one JUnit case. Returns (script, go).
pub fn gated_conductor(dir: &Path) -> (PathBuf, PathBuf) {
    let go = dir.join("go");
    let script = script(
        dir,
        "gated.sh",
        &format!(
            "echo started\nwhile [ ! -e {go:?} ]; do sleep 0.02; done\necho released\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    (script, go)
}

/// Creates `user` (role submit unless made before) and waits, within 30 s,
/// until the server has reloaded its allow-lists with it.
pub fn wait_allowed(server: &ServerProc, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let out = server
            .as_user(user)
            .submit(&["whoami"], Duration::from_secs(30));
        if out.status.success() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
    panic!("user {user} never allowed");
}

/// The server's audit log as JSON Lines (`ots-submit audit --json`, admin).
pub fn audit_json(server: &ServerProc) -> String {
    let out = submit(server, &["audit", "--json"], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Writes an executable shell script.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/usr/bin/env bash\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Submits without waiting; returns the run id.
pub fn submit_run(server: &ServerProc, args: &[&str]) -> String {
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    let out = submit(server, &all, Duration::from_secs(20));
    assert!(out.status.success(), "submit failed: {}", text(&out.stderr));
    text(&out.stdout).trim().to_string()
}

/// `ots-submit status RUN --json`, or None if the server did not answer.
pub fn status_json(server: &ServerProc, run: &str) -> Option<serde_json::Value> {
    // `status` exits with the verdict's code once the run ended: read stdout.
    // Generous: on a loaded 2-core machine (the whole suite at once) a
    // fresh ots-submit's connect and handshake can take over a second.
    let out = submit(
        server,
        &["status", run, "--json", "--connect-timeout", "5s"],
        Duration::from_secs(20),
    );
    serde_json::from_slice(&out.stdout).ok()
}

/// The testrun's status now, asked again (within a minute) if a request
/// went unanswered on a loaded machine.
pub fn current_status(server: &ServerProc, run: &str) -> serde_json::Value {
    wait_status(server, run, Duration::from_secs(60), |_| true)
}

/// Polls the testrun's status until `ok` holds; returns that status.
pub fn wait_status(
    server: &ServerProc,
    run: &str,
    limit: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(st) = status_json(server, run) {
            if ok(&st) {
                return st;
            }
            last = Some(st);
        }
        std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
    }
    panic!("condition not reached within {limit:?}; last status: {last:#?}");
}

pub fn finished(st: &serde_json::Value) -> bool {
    st["state"] == "finished" || st["state"] == "cancelled"
}

pub fn running(st: &serde_json::Value) -> bool {
    st["tasks"][0]["state"] == "running"
}

/// Polls until `path` exists.
pub fn wait_for_file(path: &Path, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20)); // polling interval, bounded by the deadline
    }
    false
}

/// True once process `pid` is gone (or a zombie nobody reaped yet).
pub fn process_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

/// A TCP proxy on loopback that can black-hole traffic (stop forwarding
/// without closing) and resume: a partition between two peers.
pub struct Proxy {
    pub port: u16,
    paused: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    /// The first bytes each connection's client sent: what a sniffer on
    /// the wire sees of it (greeting, READY and its routing identity).
    sniffed: Sniffed,
}

type Sniffed = Arc<Mutex<Vec<Vec<u8>>>>;

/// Bytes of each connection's start kept by [`Proxy`].
const SNIFFED_BYTES: usize = 512;

impl Proxy {
    pub fn start(target: &str) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let target = target.trim_start_matches("tcp://").to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let sniffed: Sniffed = Arc::default();
        let (p, s, sniff) = (paused.clone(), stop.clone(), sniffed.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let Ok(upstream) = std::net::TcpStream::connect(&target) else {
                            continue;
                        };
                        let index = {
                            let mut all = sniff.lock().unwrap();
                            all.push(Vec::new());
                            all.len() - 1
                        };
                        for (from, to, sniffer) in [
                            (
                                client.try_clone().unwrap(),
                                upstream.try_clone().unwrap(),
                                Some((sniff.clone(), index)),
                            ),
                            (upstream, client, None),
                        ] {
                            let (p, s) = (p.clone(), s.clone());
                            std::thread::spawn(move || pump(from, to, p, s, sniffer));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)), // accept poll
                }
            }
        });
        Proxy {
            port,
            paused,
            stop,
            sniffed,
        }
    }

    /// The routing identities clients announced in their READY, as a
    /// sniffer on the wire reads them (clear text, before any handshake).
    pub fn sniffed_identities(&self) -> Vec<Vec<u8>> {
        const PROPERTY: &[u8] = b"\x08Identity";
        self.sniffed
            .lock()
            .unwrap()
            .iter()
            .filter_map(|bytes| {
                let at =
                    bytes.windows(PROPERTY.len()).position(|w| w == PROPERTY)? + PROPERTY.len();
                let len = u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?) as usize;
                Some(bytes.get(at + 4..at + 4 + len)?.to_vec())
            })
            .collect()
    }

    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.port)
    }

    /// Stops forwarding in both directions; connections stay open.
    pub fn black_hole(&self) {
        self.paused.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    paused: Arc<std::sync::atomic::AtomicBool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    sniffer: Option<(Sniffed, usize)>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    from.set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::SeqCst) {
        if paused.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5)); // black hole: leave bytes in the kernel
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if let Some((sniffed, index)) = &sniffer {
                    let mut all = sniffed.lock().unwrap();
                    let seen = &mut all[*index];
                    let room = SNIFFED_BYTES.saturating_sub(seen.len()).min(n);
                    seen.extend_from_slice(&buf[..room]);
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A conductor that waits for `go`, prints 100,000 lines, touches `done`
/// and writes a passing JUnit file. Returns (script, go, done).
pub fn flood_conductor(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (go, done) = (dir.join("go"), dir.join("done"));
    let script = script(
        dir,
        "flood.sh",
        &format!(
            "echo waiting\nwhile [ ! -e {go:?} ]; do sleep 0.02; done\nseq 1 100000 | sed 's/^/flood line /'\ntouch {done:?}\n\
             mkdir -p \"$OTS_RESULTS_DIR\"; echo '<testsuite><testcase name=\"t\"/></testsuite>' > \"$OTS_RESULTS_DIR/r.xml\""
        ),
    );
    (script, go, done)
}

/// (produced, stored, lost) log lines of a task in `status --json`.
pub fn log_accounting(task: &serde_json::Value) -> (u64, u64, u64) {
    let produced = task["log_lines_produced"].as_u64().expect("report applied");
    let stored = task["log_lines_stored"].as_u64().unwrap();
    let lost = task["log_gaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g[1].as_u64().unwrap() - g[0].as_u64().unwrap() + 1)
        .sum();
    (produced, stored, lost)
}

/// Starts one worker (see [`start_worker`]) and waits until the server
/// lists it as idle.
pub fn start_idle_worker(
    dir: &Path,
    name: &str,
    device: &str,
    server: &ServerProc,
    conductor: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let w = start_worker(dir, name, device, server, conductor, env);
    assert!(
        wait_for_workers(server, Duration::from_secs(20), all_idle(&[name])),
        "worker {name} never registered: {:?}",
        w.stderr.all()
    );
    w
}

/// Runs the example `smoke` package on `group` and asserts it passes.
pub fn assert_smoke_passes(server: &ServerProc, group: &str) {
    let image = repo()
        .join("examples/images/demo.img")
        .display()
        .to_string();
    let device = format!("devicegroup:{group}");
    let out = submit(
        server,
        &[
            "run",
            "--device",
            &device,
            "--image",
            &image,
            "--packages",
            "smoke",
            "--wait",
        ],
        Duration::from_secs(60),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// Peak resident set size of a process (VmHWM), in KiB (benchmarks).
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The silence a worker tolerated before it declared its server lost, from
/// its "server lost … nothing heard for N ms" log line.
pub fn silence_ms(line: &str) -> u64 {
    line.split("nothing heard for ")
        .nth(1)
        .and_then(|s| s.split(" ms").next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no silence in {line}"))
}

/// The dashboard's address, from the server's log.
pub fn web_url(server: &ServerProc) -> String {
    let line = server
        .proc
        .stderr
        .wait_for("web dashboard listening", Duration::from_secs(60))
        .expect("dashboard started");
    field(&line, "url")
}

/// `ots-submit web` as `user`: the link on its last line.
pub fn web_link(server: &ServerProc, user: &str) -> String {
    let out = server
        .as_user(user)
        .submit(&["web"], Duration::from_secs(60));
    assert!(
        out.status.success(),
        "ots-submit web: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let last = stdout.lines().last().expect("a link").trim().to_string();
    assert!(last.contains("/login?token="), "{stdout}");
    last
}

/// A secured server with the dashboard on an ephemeral port and
/// `extra_toml`; the server and the dashboard's address.
pub fn start_web_lab(dir: &Path, extra_toml: &str) -> (ServerProc, String) {
    let server = start_configured_server(dir, &format!("web = \"127.0.0.1:0\"\n{extra_toml}"), &[]);
    let url = web_url(&server);
    (server, url)
}

/// The serving loop's longest gap between two heartbeat ticks since the
/// last scrape, in seconds (`ots_loop_tick_gap_max_seconds` of the
/// metrics endpoint at `metrics`; scraping resets it). NaN if absent.
pub fn tick_gap(metrics: &str) -> f64 {
    let page = http::get(&format!("http://{metrics}"), "/metrics", None).text();
    page.lines()
        .find(|l| l.starts_with("ots_loop_tick_gap_max_seconds"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}
