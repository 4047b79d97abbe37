//! A throwaway PostgreSQL cluster for the tests that keep the server's
//! state in PostgreSQL: Debian's `postgresql` package (installed here
//! with apt-get when missing, as root), `initdb -A trust` and `postgres`
//! run as the unprivileged `postgres` user in a temporary folder, on a
//! free port on 127.0.0.1. One cluster per test binary; each test gets a
//! database of its own. The server process dies with the test process
//! (parent-death signal), and its folder is removed at exit.

use super::free_port;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    child: Mutex<Child>,
}

/// Where Debian puts the server binaries (`/usr/lib/postgresql/15/bin`).
fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn postgres_user() -> (nix::unistd::Uid, nix::unistd::Gid) {
    let user = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("the postgresql package makes a postgres user");
    (user.uid, user.gid)
}

/// Runs as the postgres user, dying with the test process.
fn as_postgres(cmd: &mut Command) -> &mut Command {
    let (uid, gid) = postgres_user();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)?;
            nix::unistd::setgroups(&[])?;
            nix::unistd::setgid(gid)?;
            nix::unistd::setuid(uid)?;
            Ok(())
        })
    }
}

extern "C" fn remove_cluster() {
    if let Some(c) = CLUSTER.get() {
        if let Ok(mut child) = c.child.lock() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&c.dir);
    }
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();

/// The test binary's cluster, started on first use.
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        if bin_dir().is_none() {
            super::browser::ensure_packages(&[(
                "/usr/lib/postgresql/15/bin/postgres",
                "postgresql",
            )]);
        }
        let bin = bin_dir().expect("PostgreSQL's server binaries under /usr/lib/postgresql/*/bin");
        let dir = std::env::temp_dir().join(format!("ots-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (uid, gid) = postgres_user();
        nix::unistd::chown(&dir, Some(uid), Some(gid)).unwrap();
        let data = dir.join("data");
        let out = as_postgres(
            Command::new(bin.join("initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data)
                .current_dir(&dir),
        )
        .output()
        .expect("initdb");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let child = spawn_postgres(&bin, &dir, port);
        let cluster = Cluster {
            port,
            bin,
            dir,
            child: Mutex::new(child),
        };
        // SAFETY: registering a plain function to run at exit.
        unsafe {
            libc_atexit(remove_cluster);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while cluster.psql("postgres", "SELECT 1").is_err() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not come up on port {port}: {}",
                std::fs::read_to_string(cluster.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100)); // polling until it accepts, bounded by the deadline
        }
        cluster
    })
}

/// Starts the postmaster of the cluster in `dir` on `port`.
fn spawn_postgres(bin: &Path, dir: &Path, port: u16) -> Child {
    as_postgres(
        Command::new(bin.join("postgres"))
            .arg("-D")
            .arg(dir.join("data"))
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=32MB",
            ])
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("postgres.log"))
                    .unwrap(),
            )),
    )
    .spawn()
    .expect("postgres")
}

extern "C" {
    #[link_name = "atexit"]
    fn libc_atexit(f: extern "C" fn()) -> i32;
}

impl Cluster {
    /// Runs `sql` in database `db` with psql; its output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let psql = if self.bin.join("psql").exists() {
            self.bin.join("psql")
        } else {
            PathBuf::from("psql")
        };
        let out = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-p",
            ])
            .arg(self.port.to_string())
            .args(["-d", db, "-c", sql])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// A new, empty database; its URL.
    pub fn database(&self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let name = format!("ots_test_{}", NEXT.fetch_add(1, Ordering::Relaxed));
        self.psql("postgres", &format!("CREATE DATABASE {name}"))
            .unwrap();
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops PostgreSQL as `pg_ctl stop -m fast` does (SIGINT: sessions
    /// ended, a clean shutdown), waiting until it is gone.
    pub fn stop(&self) {
        let mut child = self.child.lock().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = child.wait();
    }

    /// Starts it again on the same port, waiting until it answers.
    pub fn start(&self) {
        let mut child = self.child.lock().unwrap();
        *child = spawn_postgres(&self.bin, &self.dir, self.port);
        drop(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.psql("postgres", "SELECT 1").is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not come back");
            std::thread::sleep(Duration::from_millis(50)); // polling until it accepts, bounded by the deadline
        }
    }

    /// `pg_ctl restart -m fast`: what a minor-version upgrade or a
    /// managed database's failover does.
    pub fn restart(&self) {
        self.stop();
        self.start();
    }
}
