//! Reaching PostgreSQL: the settings (`database`, `database_*`), the
//! client configuration (the URL, then libpq's `PG*` environment, then
//! the password file), TLS, `--check-config`'s probe, and a connection
//! made ready for the statements (its timeouts set). A connection that
//! is lost (PostgreSQL restarted, a network cut) is made again by the
//! caller with [`reconnect`]: a restart of the database costs a wait,
//! never the server.

use super::super::db::StateError;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::Client;

/// How to reach the database.
#[derive(Clone, Debug)]
pub struct PgSettings {
    /// As configured: `postgresql://USER@HOST[:PORT]/DB[?sslmode=…]`;
    /// what it leaves out comes from `PGHOST`, `PGPORT`, `PGUSER`,
    /// `PGDATABASE`, `PGPASSWORD`, as libpq does.
    pub url: String,
    /// A file holding the password (its first line), instead of
    /// `PGPASSWORD` or the URL.
    pub password_file: Option<PathBuf>,
    /// PEM CA certificates the server's TLS certificate is checked
    /// against (default: Mozilla's roots).
    pub ca_file: Option<PathBuf>,
    /// A statement that takes longer fails (and stops the server).
    pub statement_timeout: Duration,
    pub connect_timeout: Duration,
}

fn config_error(url: &str, reason: impl Into<String>) -> StateError {
    StateError::DatabaseConfig {
        url: redact(url),
        reason: reason.into(),
    }
}

/// The URL with any password replaced, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

impl PgSettings {
    /// The client configuration: the URL, then the `PG*` environment for
    /// what it leaves out, then the password file.
    pub(super) fn client_config(&self) -> Result<(tokio_postgres::Config, String), StateError> {
        let mut cfg: tokio_postgres::Config = self
            .url
            .parse()
            .map_err(|e| config_error(&self.url, format!("is not a PostgreSQL URL ({e})")))?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        if cfg.get_hosts().is_empty() {
            match env("PGHOST") {
                Some(h) => {
                    cfg.host(&h);
                }
                None => {
                    cfg.host("/var/run/postgresql");
                }
            }
        }
        if cfg.get_ports().is_empty() {
            if let Some(p) = env("PGPORT") {
                let port = p
                    .parse()
                    .map_err(|_| config_error(&self.url, format!("PGPORT {p:?} is not a port")))?;
                cfg.port(port);
            }
        }
        if cfg.get_user().is_none() {
            let user = env("PGUSER")
                .or_else(|| env("USER"))
                .ok_or_else(|| config_error(&self.url, "names no user (and PGUSER is not set)"))?;
            cfg.user(&user);
        }
        if cfg.get_dbname().is_none() {
            if let Some(db) = env("PGDATABASE") {
                cfg.dbname(&db);
            }
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                config_error(
                    &self.url,
                    format!("database_password_file {}: {e}", path.display()),
                )
            })?;
            cfg.password(text.lines().next().unwrap_or("").as_bytes());
        } else if cfg.get_password().is_none() {
            if let Some(pw) = env("PGPASSWORD") {
                cfg.password(pw.as_bytes());
            }
        }
        cfg.connect_timeout(self.connect_timeout);
        cfg.application_name("ots-server");
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let target = format!(
            "{}@{host}:{}/{}",
            cfg.get_user().unwrap_or("?"),
            cfg.get_ports().first().copied().unwrap_or(5432),
            cfg.get_dbname().unwrap_or(cfg.get_user().unwrap_or("?"))
        );
        Ok((cfg, target))
    }

    pub(super) fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StateError> {
        let cfg =
            crate::notify::sender::client_tls_config(self.ca_file.as_deref()).map_err(|e| {
                let file = self.ca_file.as_deref().unwrap_or(std::path::Path::new("-"));
                config_error(
                    &self.url,
                    format!("database_ca_file {}: {e}", file.display()),
                )
            })?;
        Ok(tokio_postgres_rustls::MakeRustlsConnect::new(cfg))
    }
}

impl PgSettings {
    /// `--check-config`: connects (within `limit` at most) and asks one
    /// trivial query, so a wrong address, user, password or database is
    /// named now rather than at the start. Touches no table.
    pub async fn probe(&self, limit: Duration) -> Result<String, StateError> {
        let (mut cfg, target) = self.client_config()?;
        cfg.connect_timeout(self.connect_timeout.min(limit));
        let pg = |source| StateError::Postgres {
            target: target.clone(),
            source,
        };
        let connected = tokio::time::timeout(limit, cfg.connect(self.tls()?)).await;
        let (client, connection) = match connected {
            Ok(c) => c.map_err(pg)?,
            Err(_) => {
                return Err(config_error(
                    &self.url,
                    format!("{target} did not answer within {} s: check the host and port, and that PostgreSQL runs", limit.as_secs()),
                ))
            }
        };
        let connection = tokio::spawn(connection);
        client.simple_query("SELECT 1").await.map_err(pg)?;
        drop(client);
        let _ = connection.await;
        Ok(target)
    }
}

/// Whether a PostgreSQL error means the connection is gone (closed,
/// reset, the server shutting down or starting): the operation may be
/// tried again on a new connection.
pub fn connection_lost(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return *code == SqlState::ADMIN_SHUTDOWN
            || *code == SqlState::CRASH_SHUTDOWN
            || *code == SqlState::CANNOT_CONNECT_NOW;
    }
    // No SQL state: an I/O error under the client (reset, refused).
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// A ready connection: the client, the task driving it (its statement
/// timeout set), and `user@host:port/db` for messages. `what` names the
/// connection in the line logged when it is lost.
pub async fn connect(
    settings: &PgSettings,
    what: &'static str,
) -> Result<(Client, tokio::task::JoinHandle<()>, String), StateError> {
    let (cfg, target) = settings.client_config()?;
    let pg = |source| StateError::Postgres {
        target: target.clone(),
        source,
    };
    let (client, connection) = cfg.connect(settings.tls()?).await.map_err(pg)?;
    let for_log = target.clone();
    let connection = tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(database = %for_log, connection = what, error = %e, "PostgreSQL connection lost; connecting again (a commit waits for it within the lease)");
        }
    });
    client
        .batch_execute(&format!(
            "SET statement_timeout = {}; SET lock_timeout = {}",
            settings.statement_timeout.as_millis(),
            settings.statement_timeout.as_millis()
        ))
        .await
        .map_err(pg)?;
    Ok((client, connection, target))
}

/// Connects again after a lost connection, waiting between attempts
/// (100 ms doubling to 2 s) until `give_up` passes; the new connection,
/// and how many attempts it took.
pub async fn reconnect(
    settings: &PgSettings,
    what: &'static str,
    give_up: std::time::Instant,
) -> Result<(Client, tokio::task::JoinHandle<()>, u32), StateError> {
    let mut wait = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        attempts = attempts.saturating_add(1);
        match connect(settings, what).await {
            Ok((client, conn, _)) => return Ok((client, conn, attempts)),
            Err(e) if std::time::Instant::now() + wait >= give_up => return Err(e),
            Err(e) => {
                if attempts == 1 {
                    tracing::warn!(connection = what, error = %e, "PostgreSQL not reachable yet; trying again");
                }
                // Backoff between connection attempts, not synchronisation.
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
            }
        }
    }
}
