//! A whole lab in one process for `ots-submit run --local`: the real
//! server and real workers, talking over real ZeroMQ sockets on loopback
//! with ephemeral ports, a temporary state directory, and the example
//! conductor. Nothing to install; everything is torn down afterwards.

use crate::protocol::DeviceSpec;
use crate::server::config::ServerConfig;
use crate::server::{Server, ServerError, ServerHandle};
use crate::worker::config::{ConductorConfig, WorkerConfig};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Why the local lab could not start.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("cannot create a temporary state directory: {0}")]
    TempDir(std::io::Error),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("example conductor {0} not found; run from the repository root or pass --conductor")]
    NoConductor(PathBuf),
    #[error("local workers did not register within {0:?}")]
    WorkersTimeout(Duration),
    #[error("local worker configuration: {0}")]
    Config(#[from] crate::settings::ConfigError),
    #[error("throwaway keys: {0}")]
    Keys(#[from] crate::security::SecurityError),
}

/// Throwaway keys of a local lab, in its temporary folder: the server's,
/// one per worker (allow-listed in `workers.d`) and an admin user's (in
/// `users.d`), so `run --local` exercises the secured path end to end.
struct LabKeys {
    dir: PathBuf,
}

impl LabKeys {
    fn create(dir: &Path, workers: usize) -> Result<Self, crate::security::SecurityError> {
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |e: std::io::Error| crate::security::SecurityError::KeyFile {
                path,
                reason: e.to_string(),
            }
        };
        let keys = dir.join("keys");
        for d in [keys.clone(), keys.join("workers.d"), keys.join("users.d")] {
            std::fs::create_dir_all(&d).map_err(io(&d))?;
        }
        crate::security::KeyPair::generate().write(&keys.join("server"))?;
        let workers_d = keys.join("workers.d");
        for i in 1..=workers {
            let name = format!("local-{i}");
            crate::security::KeyPair::generate().write(&keys.join(&name))?;
            std::fs::copy(
                keys.join(format!("{name}.pub")),
                workers_d.join(format!("{name}.pub")),
            )
            .map_err(io(&workers_d))?;
        }
        let users_d = keys.join("users.d");
        crate::security::KeyPair::generate().write(&keys.join("you"))?;
        std::fs::copy(keys.join("you.pub"), users_d.join("you.pub")).map_err(io(&users_d))?;
        std::fs::write(users_d.join("you.role"), "admin\n").map_err(io(&users_d))?;
        Ok(LabKeys { dir: keys })
    }
}

/// The repository's `examples/` folder: next to the working directory if
/// there is one there, else where this binary was built from.
pub fn examples_dir() -> PathBuf {
    let here = PathBuf::from("examples");
    if here.join("conductor.sh").is_file() {
        return here;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// The example image the example conductor "flashes".
pub fn example_image() -> PathBuf {
    let p = examples_dir().join("images").join("demo.img");
    std::fs::canonicalize(&p).unwrap_or(p)
}

/// A running local lab.
pub struct Lab {
    server: ServerHandle,
    workers: Vec<JoinHandle<()>>,
    stop: watch::Sender<crate::shutdown::Stop>,
    credentials: crate::security::Credentials,
    keys: PathBuf,
    dir: tempfile::TempDir,
}

impl Lab {
    /// Starts a server and `workers` workers whose devices match `device`.
    pub async fn start(
        device: &DeviceSpec,
        workers: usize,
        conductor: Option<PathBuf>,
    ) -> Result<Lab, LabError> {
        let dir = tempfile::Builder::new()
            .prefix("ots-local-")
            .tempdir()
            .map_err(LabError::TempDir)?;
        let conductor = conductor.unwrap_or_else(|| examples_dir().join("conductor.sh"));
        if !conductor.is_file() {
            return Err(LabError::NoConductor(conductor));
        }
        let conductor = std::fs::canonicalize(&conductor).unwrap_or(conductor);
        let keys = LabKeys::create(dir.path(), workers.max(1))?;
        let server_cfg = ServerConfig {
            control: "tcp://127.0.0.1:0".into(),
            events: "tcp://127.0.0.1:0".into(),
            state_dir: dir.path().join("server"),
            key: keys.dir.join("server.key"),
            workers_dir: keys.dir.join("workers.d"),
            users_dir: keys.dir.join("users.d"),
            ..ServerConfig::default()
        };
        let server = Server::start(server_cfg).await?;
        let (stop, stop_rx) = watch::channel(crate::shutdown::Stop::Run);
        let mut handles = Vec::new();
        for i in 1..=workers.max(1) {
            let mut device_text = format!("devicegroup:{}", device.devicegroup);
            if let Some(n) = &device.devicename {
                device_text.push_str(&format!(" devicename:{n}"));
            }
            let id = device
                .deviceid
                .clone()
                .unwrap_or_else(|| format!("local{i}"));
            if device.devicename.is_some() {
                device_text.push_str(&format!(" deviceid:{id}"));
            }
            let cfg = WorkerConfig {
                name: format!("local-{i}"),
                server: server.control.clone(),
                events: server.events.clone(),
                device: device_text,
                state_dir: dir.path().join(format!("worker-{i}")),
                conductor: ConductorConfig {
                    command: vec![
                        conductor.display().to_string(),
                        "--image".into(),
                        "{image}".into(),
                        "--packages".into(),
                        "{packages}".into(),
                        "--results".into(),
                        "{results_dir}".into(),
                    ],
                    ..ConductorConfig::default()
                },
                key: keys.dir.join(format!("local-{i}.key")),
                server_key: keys.dir.join("server.pub"),
                ..WorkerConfig::default()
            };
            cfg.validate()?;
            let rx = stop_rx.clone();
            handles.push(tokio::spawn(async move {
                if let Err(e) = crate::worker::run(cfg, rx).await {
                    tracing::error!(error = %e, "local worker failed");
                }
            }));
        }
        let lab = Lab {
            server,
            workers: handles,
            stop,
            credentials: crate::security::Credentials::Noise {
                key: crate::security::KeyPair::read(&keys.dir.join("you.key"))?,
                server: crate::security::PublicKey::read(&keys.dir.join("server.pub"))?,
            },
            keys: keys.dir,
            dir,
        };
        lab.wait_for_workers(workers.max(1), Duration::from_secs(10))
            .await?;
        Ok(lab)
    }

    async fn wait_for_workers(&self, n: usize, limit: Duration) -> Result<(), LabError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut poll = tokio::time::interval(Duration::from_millis(50));
        while tokio::time::Instant::now() < deadline {
            poll.tick().await;
            if let Ok(mut c) = crate::client::Client::connect(
                &self.server.control,
                Duration::from_secs(1),
                &self.credentials,
            )
            .await
            {
                if let Ok(ws) = c.workers().await {
                    if ws.iter().filter(|w| !w.state.is_gone()).count() >= n {
                        return Ok(());
                    }
                }
            }
        }
        Err(LabError::WorkersTimeout(limit))
    }

    pub fn control(&self) -> &str {
        &self.server.control
    }

    pub fn events(&self) -> &str {
        &self.server.events
    }

    /// The throwaway admin user's private key.
    pub fn user_key(&self) -> PathBuf {
        self.keys.join("you.key")
    }

    /// The throwaway server's public key.
    pub fn server_key(&self) -> PathBuf {
        self.keys.join("server.pub")
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops workers and server and removes the temporary state.
    pub async fn shutdown(self) {
        // Gracefully: the testrun is over, so each worker says bye at
        // once and the server records a clean stop (bounded below).
        let _ = self.stop.send(crate::shutdown::Stop::Gracefully);
        for w in self.workers {
            let _ = tokio::time::timeout(Duration::from_secs(5), w).await;
        }
        if let Err(e) = self.server.shutdown().await {
            tracing::error!(error = %e, "local server failed");
        }
    }
}
