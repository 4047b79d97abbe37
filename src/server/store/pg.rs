//! The server's state in PostgreSQL (`database = "postgresql://…"`): the
//! same tables, rows and versioned schema as the embedded SQLite
//! ([`super::db`]), written from the same [`Changes`] batches and read
//! back into the same [`Snapshot`]. Each batch is one transaction of a
//! few statements whatever its size: rows travel as arrays (`UNNEST`),
//! not one statement per row, so a commit costs a handful of round trips.
//!
//! The connection is one client on the serving loop's runtime (commits
//! are serialised by the loop anyway), with a statement timeout; its loss
//! fails the next commit, which stops the server (exit 69) with a line
//! naming the database.

use super::db::{migration, Changes, Dialect, HistoryRow, Snapshot, StateError, SCHEMA_VERSION};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;
use tokio_postgres::{Client, Statement};

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

/// The open, migrated database.
pub struct PgDb {
    client: Client,
    /// `user@host:port/db`, for messages (never the password).
    target: String,
    statements: Statements,
    _connection: tokio::task::JoinHandle<()>,
    /// Once leader: (holder, epoch) every commit checks first.
    fence: Option<(String, i64)>,
    /// A random id made with the schema (`meta.database_id`).
    database_id: String,
}

/// The database's clock, in Unix ms: one clock for every server.
const NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// Who holds the lease, as a standby sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    pub holder: String,
    pub epoch: i64,
    /// Until it lapses, by the database's clock (negative: lapsed).
    pub remaining_ms: i64,
    /// The holder's control endpoint.
    pub address: String,
}

/// Acquires the lease when it is free or lapsed: the new epoch.
async fn try_acquire(
    client: &Client,
    holder: &str,
    address: &str,
    ttl: Duration,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let sql = format!(
        "INSERT INTO lease (id, holder, epoch, expires_ms, since_ms, address)
         VALUES (1, $1, 1, {NOW_MS} + $2, {NOW_MS}, $3)
         ON CONFLICT (id) DO UPDATE SET holder = excluded.holder, epoch = lease.epoch + 1,
             expires_ms = excluded.expires_ms, since_ms = excluded.since_ms, address = excluded.address
         WHERE lease.expires_ms < excluded.since_ms
         RETURNING epoch"
    );
    let ttl_ms = ttl.as_millis() as i64;
    Ok(client
        .query_opt(&sql, &[&holder, &ttl_ms, &address])
        .await?
        .map(|r| r.get(0)))
}

/// Renews our lease: false when it is not ours any more.
async fn renew(
    client: &Client,
    holder: &str,
    epoch: i64,
    ttl: Duration,
) -> Result<bool, tokio_postgres::Error> {
    let sql = format!(
        "UPDATE lease SET expires_ms = {NOW_MS} + $3 WHERE id = 1 AND holder = $1 AND epoch = $2"
    );
    let ttl_ms = ttl.as_millis() as i64;
    Ok(client.execute(&sql, &[&holder, &epoch, &ttl_ms]).await? == 1)
}

async fn view(client: &Client) -> Result<Option<LeaseView>, tokio_postgres::Error> {
    let sql =
        format!("SELECT holder, epoch, expires_ms - {NOW_MS}, address FROM lease WHERE id = 1");
    Ok(client.query_opt(&sql, &[]).await?.map(|r| LeaseView {
        holder: r.get(0),
        epoch: r.get(1),
        remaining_ms: r.get(2),
        address: r.get(3),
    }))
}

/// What the renewer tells the serving loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// The renewal sent at this instant succeeded, after this long.
    Renewed(std::time::Instant, Duration),
    /// The lease is someone else's now.
    Deposed,
}

struct Statements {
    runs: Statement,
    tasks: Statement,
    workers: Statement,
    removed_workers: Statement,
    history: Statement,
    files: Statement,
    pruned: Statement,
    owners: Statement,
    notifications: Statement,
    removed_notifications: Statement,
    meta: Statement,
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
    fn client_config(&self) -> Result<(tokio_postgres::Config, String), StateError> {
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

    fn tls(&self) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StateError> {
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

impl PgDb {
    /// Connects, checks the schema (refusing a newer one or a database
    /// that holds other tables) and migrates it.
    pub async fn open(settings: &PgSettings) -> Result<PgDb, StateError> {
        let (cfg, target) = settings.client_config()?;
        let pg = |source| StateError::Postgres {
            target: target.clone(),
            source,
        };
        let (client, connection) = cfg.connect(settings.tls()?).await.map_err(pg)?;
        let for_log = target.clone();
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::error!(database = %for_log, error = %e, "PostgreSQL connection lost; the next commit stops the server");
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
        let version = schema_version(&client, &target).await?;
        let mut client = client;
        migrate(&mut client, version, &target).await?;
        // Which database this is, whatever its address is written as: the
        // state directories of the servers sharing it record it.
        client
            .execute(
                "INSERT INTO meta (key, value) VALUES ('database_id', md5(random()::text || clock_timestamp()::text))
                 ON CONFLICT (key) DO NOTHING",
                &[],
            )
            .await
            .map_err(pg)?;
        let database_id: String = client
            .query_one("SELECT value FROM meta WHERE key = 'database_id'", &[])
            .await
            .map_err(pg)?
            .get(0);
        let statements = Statements::prepare(&client).await.map_err(pg)?;
        Ok(PgDb {
            client,
            target,
            statements,
            _connection: connection,
            fence: None,
            database_id,
        })
    }

    /// Waits until this server holds the lease (standby until then:
    /// nothing bound, nothing read), then fences every commit with its
    /// epoch. Returns the epoch and when the winning request was sent.
    /// `waiting` is called at each look while another leads (the shell
    /// tells systemd it is up, as a standby, and pings its watchdog).
    pub async fn lead(
        &mut self,
        holder: &str,
        address: &str,
        policy: crate::server::lease::LeasePolicy,
        mut waiting: impl FnMut(Option<&LeaseView>),
    ) -> Result<(i64, std::time::Instant), StateError> {
        let pg = |source| StateError::Postgres {
            target: self.target.clone(),
            source,
        };
        let mut told: Option<(String, i64)> = None;
        loop {
            let sent = std::time::Instant::now();
            if let Some(epoch) = try_acquire(&self.client, holder, address, policy.ttl)
                .await
                .map_err(pg)?
            {
                self.fence = Some((holder.to_string(), epoch));
                return Ok((epoch, sent));
            }
            let seen = view(&self.client).await.map_err(pg)?;
            waiting(seen.as_ref());
            if let Some(v) = seen {
                if told.as_ref() != Some(&(v.holder.clone(), v.epoch)) {
                    tracing::info!(
                        database = %self.target,
                        leader = %v.holder,
                        leader_control = %v.address,
                        epoch = v.epoch,
                        lapses_in_ms = v.remaining_ms,
                        "standby: another server holds the lease; taking over when it lapses"
                    );
                    told = Some((v.holder, v.epoch));
                }
            }
            // Polling the database's lease, not waiting for an event:
            // a dead leader sends none.
            tokio::time::sleep(policy.renew).await;
        }
    }

    /// Renews the lease every `renew` on a connection of its own (a long
    /// commit does not delay it), reporting each result.
    pub async fn spawn_renewer(
        settings: &PgSettings,
        holder: String,
        epoch: i64,
        policy: crate::server::lease::LeasePolicy,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Renewal>, StateError> {
        let (cfg, target) = settings.client_config()?;
        let pg = |source| StateError::Postgres {
            target: target.clone(),
            source,
        };
        let (client, connection) = cfg.connect(settings.tls()?).await.map_err(pg)?;
        let conn = tokio::spawn(connection);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _conn = conn;
            let mut ticker = tokio::time::interval(policy.renew);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                ticker.tick().await;
                let sent = std::time::Instant::now();
                match tokio::time::timeout(policy.renew, renew(&client, &holder, epoch, policy.ttl))
                    .await
                {
                    Ok(Ok(true)) => {
                        if tx.send(Renewal::Renewed(sent, sent.elapsed())).is_err() {
                            return;
                        }
                    }
                    Ok(Ok(false)) => {
                        let _ = tx.send(Renewal::Deposed);
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(database = %target, error = %e, "cannot renew the lease; stepping down if this lasts")
                    }
                    Err(_) => {
                        tracing::warn!(database = %target, "lease renewal got no answer within lease_renew; stepping down if this lasts")
                    }
                }
            }
        });
        Ok(rx)
    }

    /// `user@host:port/db`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The database's own id (`meta.database_id`).
    pub fn database_id(&self) -> &str {
        &self.database_id
    }

    fn pg(&self) -> impl Fn(tokio_postgres::Error) -> StateError + '_ {
        |source| StateError::Postgres {
            target: self.target.clone(),
            source,
        }
    }

    /// Writes `changes` in one transaction; when this returns, they are
    /// durable (PostgreSQL's commit).
    pub async fn commit(&mut self, changes: &Changes) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let target = self.target.clone();
        let pg = |source| StateError::Postgres {
            target: target.clone(),
            source,
        };
        let s = &self.statements;
        let tx = self.client.transaction().await.map_err(pg)?;
        // Fenced: this commit lands only while our epoch is the lease's.
        // FOR SHARE holds off a takeover until the commit is done.
        if let Some((holder, epoch)) = &self.fence {
            let row = tx
                .query_one(
                    "SELECT holder, epoch FROM lease WHERE id = 1 FOR SHARE",
                    &[],
                )
                .await
                .map_err(pg)?;
            let (now_holder, now): (String, i64) = (row.get(0), row.get(1));
            if now != *epoch || now_holder != *holder {
                return Err(StateError::Deposed {
                    target,
                    epoch: *epoch,
                    now,
                    holder: now_holder,
                });
            }
        }
        write_changes(&tx, s, changes).await.map_err(pg)?;
        tx.commit().await.map_err(pg)
    }

    /// Reads every stored entity.
    pub async fn load(&self) -> Result<Snapshot, StateError> {
        let pg = self.pg();
        let pairs = |sql: &'static str| async move {
            self.client.query(sql, &[]).await.map(|rows| {
                rows.iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, Vec<u8>>(1)))
                    .collect::<Vec<_>>()
            })
        };
        let texts = |sql: &'static str| async move {
            self.client.query(sql, &[]).await.map(|rows| {
                rows.iter()
                    .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
                    .collect::<Vec<_>>()
            })
        };
        Ok(Snapshot {
            runs: pairs("SELECT id, body FROM runs").await.map_err(&pg)?,
            tasks: pairs("SELECT id, body FROM tasks").await.map_err(&pg)?,
            workers: pairs("SELECT name, body FROM workers").await.map_err(&pg)?,
            meta: texts("SELECT key, value FROM meta").await.map_err(&pg)?,
            input_owners: texts("SELECT sha256, owner FROM input_owners")
                .await
                .map_err(&pg)?,
            notifications: pairs("SELECT id, body FROM notifications")
                .await
                .map_err(&pg)?,
        })
    }

    /// The recorded state changes of one task, oldest first.
    pub async fn history(&self, task: &str) -> Result<Vec<HistoryRow>, StateError> {
        let rows = self
            .client
            .query(
                "SELECT task, at_ms, state, attempt, worker, reason FROM task_history WHERE task = $1 ORDER BY seq",
                &[&task],
            )
            .await
            .map_err(self.pg())?;
        Ok(rows
            .iter()
            .map(|r| HistoryRow {
                task: r.get(0),
                at_ms: r.get::<_, i64>(1) as u64,
                state: r.get(2),
                attempt: r.get::<_, i64>(3) as u32,
                worker: r.get(4),
                reason: r.get(5),
            })
            .collect())
    }

    /// Runs SQL as it is (tests: a foreign or damaged database).
    pub async fn execute_batch(&self, sql: &str) -> Result<(), StateError> {
        self.client.batch_execute(sql).await.map_err(self.pg())
    }
}

/// The schema version the database holds: 0 when empty; a database with
/// other tables than ots's is refused.
async fn schema_version(client: &tokio_postgres::Client, target: &str) -> Result<i64, StateError> {
    let pg = |source| StateError::Postgres {
        target: target.to_string(),
        source,
    };
    let tables: Vec<String> = client
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = current_schema()",
            &[],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let path = PathBuf::from(target);
    let version: i64 = if tables.is_empty() {
        0
    } else if !tables.iter().any(|t| t == "meta") {
        return Err(StateError::Foreign {
                path,
                reason: format!("PostgreSQL database with tables {tables:?} but no ots meta table; give ots a database of its own"),
            });
    } else {
        let row = client
            .query_opt("SELECT value FROM meta WHERE key = 'schema_version'", &[])
            .await
            .map_err(pg)?
            .ok_or_else(|| StateError::Foreign {
                path: path.clone(),
                reason: "meta table without a schema_version".into(),
            })?;
        let v: String = row.get(0);
        v.parse().map_err(|_| StateError::Foreign {
            path: path.clone(),
            reason: format!("schema_version {v:?} is not a number"),
        })?
    };
    if version > SCHEMA_VERSION {
        return Err(StateError::TooNew {
            path,
            found: version,
        });
    }
    Ok(version)
}

/// Migrates from `version` to [`SCHEMA_VERSION`], one transaction per step.
async fn migrate(
    client: &mut tokio_postgres::Client,
    version: i64,
    target: &str,
) -> Result<(), StateError> {
    let pg = |source| StateError::Postgres {
        target: target.to_string(),
        source,
    };
    for v in version + 1..=SCHEMA_VERSION {
        let tx = client.transaction().await.map_err(pg)?;
        tx.batch_execute(&migration(v, Dialect::Postgres))
            .await
            .map_err(pg)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&v.to_string()],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        if version > 0 {
            tracing::info!(database = %target, version = v, "state database migrated");
        }
    }
    Ok(())
}

impl Statements {
    /// Every statement a commit runs, prepared once.
    async fn prepare(client: &tokio_postgres::Client) -> Result<Statements, tokio_postgres::Error> {
        let prepare = |sql: &'static str| async move { client.prepare(sql).await };
        Ok(Statements {
            runs: prepare(
                "INSERT INTO runs (id, body) SELECT * FROM UNNEST($1::text[], $2::bytea[])
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            )
            .await
            ?,
            tasks: prepare(
                "INSERT INTO tasks (id, run, body) SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])
                 ON CONFLICT (id) DO UPDATE SET run = excluded.run, body = excluded.body",
            )
            .await
            ?,
            workers: prepare(
                "INSERT INTO workers (name, body) SELECT * FROM UNNEST($1::text[], $2::bytea[])
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            )
            .await
            ?,
            removed_workers: prepare("DELETE FROM workers WHERE name = ANY($1::text[])")
                .await
                ?,
            history: prepare(
                "INSERT INTO task_history (task, at_ms, state, attempt, worker, reason)
                 SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::int8[], $5::text[], $6::text[])",
            )
            .await
            ?,
            files: prepare(
                "INSERT INTO files (task, name, size, sha256) SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[])
                 ON CONFLICT (task, name) DO UPDATE SET size = excluded.size, sha256 = excluded.sha256",
            )
            .await
            ?,
            pruned: prepare("DELETE FROM files WHERE task = ANY($1::text[])")
                .await
                ?,
            owners: prepare(
                "INSERT INTO input_owners (sha256, owner) SELECT * FROM UNNEST($1::text[], $2::text[])
                 ON CONFLICT DO NOTHING",
            )
            .await
            ?,
            notifications: prepare(
                "INSERT INTO notifications (id, run, body) SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[])
                 ON CONFLICT (id) DO UPDATE SET run = excluded.run, body = excluded.body",
            )
            .await
            ?,
            removed_notifications: prepare("DELETE FROM notifications WHERE id = ANY($1::text[])")
                .await
                ?,
            meta: prepare(
                "INSERT INTO meta (key, value) SELECT * FROM UNNEST($1::text[], $2::text[])
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .await
            ?,
        })
    }
}

/// One row per key and statement: a batch's later row wins (an
/// upsert may not touch a row twice).
fn last<K: Ord + Clone, V>(rows: impl Iterator<Item = (K, V)>) -> BTreeMap<K, V> {
    rows.collect()
}
/// Three columns of (key, (a, b)) rows.
fn columns<K, A, B>(rows: BTreeMap<K, (A, B)>) -> (Vec<K>, Vec<A>, Vec<B>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new());
    for (k, (a, b)) in rows {
        out.0.push(k);
        out.1.push(a);
        out.2.push(b);
    }
    out
}

/// Writes a batch's rows into the open transaction, one statement per
/// table (each with every row of the batch).
async fn write_changes(
    tx: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    changes: &Changes,
) -> Result<(), tokio_postgres::Error> {
    if !changes.runs.is_empty() {
        let rows = last(changes.runs.iter().map(|(k, b)| (k.as_str(), b.as_slice())));
        let (ids, bodies): (Vec<&str>, Vec<&[u8]>) = rows.into_iter().unzip();
        tx.execute(&s.runs, &[&ids, &bodies]).await?;
    }
    if !changes.tasks.is_empty() {
        let rows = last(
            changes
                .tasks
                .iter()
                .map(|(k, r, b)| (k.as_str(), (r.as_str(), b.as_slice()))),
        );
        let (ids, runs, bodies) = columns(rows);
        tx.execute(&s.tasks, &[&ids, &runs, &bodies]).await?;
    }
    if !changes.workers.is_empty() {
        let rows = last(
            changes
                .workers
                .iter()
                .map(|(k, b)| (k.as_str(), b.as_slice())),
        );
        let (names, bodies): (Vec<&str>, Vec<&[u8]>) = rows.into_iter().unzip();
        tx.execute(&s.workers, &[&names, &bodies]).await?;
    }
    if !changes.removed_workers.is_empty() {
        tx.execute(&s.removed_workers, &[&changes.removed_workers])
            .await?;
    }
    if !changes.history.is_empty() {
        let h = &changes.history;
        let tasks: Vec<&str> = h.iter().map(|r| r.task.as_str()).collect();
        let at: Vec<i64> = h.iter().map(|r| r.at_ms as i64).collect();
        let states: Vec<&str> = h.iter().map(|r| r.state.as_str()).collect();
        let attempts: Vec<i64> = h.iter().map(|r| i64::from(r.attempt)).collect();
        let workers: Vec<Option<&str>> = h.iter().map(|r| r.worker.as_deref()).collect();
        let reasons: Vec<Option<&str>> = h.iter().map(|r| r.reason.as_deref()).collect();
        tx.execute(
            &s.history,
            &[&tasks, &at, &states, &attempts, &workers, &reasons],
        )
        .await?;
    }
    if !changes.files.is_empty() {
        let rows = last(
            changes
                .files
                .iter()
                .map(|(t, n, size, sha)| ((t.as_str(), n.as_str()), (*size as i64, sha.as_str()))),
        );
        let (keys, sizes, shas) = columns(rows);
        let (tasks, names): (Vec<&str>, Vec<&str>) = keys.into_iter().unzip();
        tx.execute(&s.files, &[&tasks, &names, &sizes, &shas])
            .await?;
    }
    if !changes.pruned_tasks.is_empty() {
        tx.execute(&s.pruned, &[&changes.pruned_tasks]).await?;
    }
    if !changes.input_owners.is_empty() {
        let (shas, owners): (Vec<&str>, Vec<&str>) = changes
            .input_owners
            .iter()
            .map(|(s, o)| (s.as_str(), o.as_str()))
            .unzip();
        tx.execute(&s.owners, &[&shas, &owners]).await?;
    }
    if !changes.notifications.is_empty() {
        let rows = last(
            changes
                .notifications
                .iter()
                .map(|(id, run, b)| (id.as_str(), (run.as_deref(), b.as_slice()))),
        );
        let (ids, runs, bodies) = columns(rows);
        tx.execute(&s.notifications, &[&ids, &runs, &bodies])
            .await?;
    }
    if !changes.removed_notifications.is_empty() {
        tx.execute(&s.removed_notifications, &[&changes.removed_notifications])
            .await?;
    }
    if !changes.meta.is_empty() {
        let rows = last(changes.meta.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let (keys, values): (Vec<&str>, Vec<&str>) = rows.into_iter().unzip();
        tx.execute(&s.meta, &[&keys, &values]).await?;
    }
    quarantine(tx, changes).await
}

/// Moves the rows that could not be restored aside, into the quarantine
/// table.
async fn quarantine(
    tx: &tokio_postgres::Transaction<'_>,
    changes: &Changes,
) -> Result<(), tokio_postgres::Error> {
    let now_ms = crate::protocol::limits::unix_ms_now() as i64;
    for (table, key, reason) in &changes.quarantine {
        let Some((table, column)) = super::db::quarantinable(table) else {
            continue;
        };
        tx.execute(
            &format!(
                "INSERT INTO quarantine (tbl, key, body, reason, at_ms)
                 SELECT $1, {column}, body, $2, $3 FROM {table} WHERE {column} = $4"
            ),
            &[&table, reason, &now_ms, key],
        )
        .await?;
        tx.execute(&format!("DELETE FROM {table} WHERE {column} = $1"), &[key])
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_a_message() {
        assert_eq!(
            redact("postgresql://ots:s3cret@db.lab:5432/ots"),
            "postgresql://ots:***@db.lab:5432/ots"
        );
        assert_eq!(redact("postgresql://ots@db/ots"), "postgresql://ots@db/ots");
        assert_eq!(redact("postgresql:///ots"), "postgresql:///ots");
    }
}
