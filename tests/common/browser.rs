//! Headless Chromium driven over WebDriver (chromedriver), for the
//! dashboard's browser test. Debian's `chromium` and `chromium-driver`
//! are installed here if missing (as root, with apt-get): `cargo test` on
//! a fresh machine needs nothing else.

use super::{free_port, Proc};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Makes sure Chromium and ChromeDriver are installed.
pub fn ensure_installed() {
    ensure_packages(&[(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")]);
}

/// Makes sure each program is there, installing its Debian package with
/// apt-get when it is not (as root; once per machine: concurrent test
/// processes wait for each other on a lock file).
pub fn ensure_packages(wanted: &[(&str, &str)]) {
    let missing = || -> Vec<&str> {
        wanted
            .iter()
            .filter(|(path, _)| !Path::new(path).exists())
            .map(|(_, pkg)| *pkg)
            .collect()
    };
    if missing().is_empty() {
        return;
    }
    let lock = std::fs::File::create("/tmp/ots-test-packages.lock").unwrap();
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let packages = missing();
    if packages.is_empty() {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs Debian's {}: run `apt-get install {}` as root (or run the tests as root once)",
        packages.join(", "),
        packages.join(" ")
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&packages)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    if !install() {
        let _ = Command::new("apt-get").args(["update", "-q"]).status();
        assert!(install(), "apt-get install {} failed", packages.join(" "));
    }
}

/// A chromedriver process and one headless browser session.
pub struct Browser {
    pub client: fantoccini::Client,
    _driver: Proc,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Browser {
        ensure_installed();
        let port = free_port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"))
            .arg("--allowed-ips=127.0.0.1");
        let driver = Proc::spawn("chromedriver", cmd);
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                let r = super::http::get(&base, "/status", None);
                if r.status == 200 && r.text().contains("\"ready\":true") {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not become ready"
            );
            std::thread::sleep(Duration::from_millis(50)); // polling interval, bounded by the deadline
        }
        let profile = tempfile::Builder::new()
            .prefix("ots-chromium-")
            .tempdir()
            .unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }),
        );
        let client = fantoccini::ClientBuilder::new(
            hyper_util::client::legacy::connect::HttpConnector::new(),
        )
        .capabilities(caps)
        .connect(&base)
        .await
        .expect("a chromium session");
        Browser {
            client,
            _driver: driver,
            _profile: profile,
        }
    }

    /// Navigates to `url` and waits until the new document is parsed to
    /// its end. WebDriver's navigation can return while Chromium is still
    /// parsing the body (seen once: a sign-in page read as `<header>` and
    /// nothing after it), so the old document is marked first and the
    /// wait is for a document without the mark, complete, with its `main`.
    pub async fn open(&self, url: &str) {
        self.js("window.otsLeaving = true; return 1").await;
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("navigating to {url}: {e}"));
        self.wait_js(
            "window.otsLeaving !== true && document.readyState === 'complete' && document.querySelector('main') !== null",
            Duration::from_secs(30),
        )
        .await;
    }

    /// Saves a screenshot under `target/web-screenshots/NAME.png`.
    pub async fn screenshot(&self, name: &str) {
        let dir = super::repo().join("target/web-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    /// Waits until `script` (a JS expression) is truthy; its value.
    pub async fn wait_js(&self, script: &str, limit: Duration) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self
                .client
                .execute(&format!("return ({script});"), vec![])
                .await
                .expect("script runs");
            let truthy = !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false))
                && v != serde_json::json!(0)
                && v != serde_json::json!("");
            if truthy {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {script}");
            tokio::time::sleep(Duration::from_millis(50)).await; // polling interval, bounded by the deadline
        }
    }

    pub async fn js(&self, script: &str) -> serde_json::Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script {script}: {e}"))
    }
}
