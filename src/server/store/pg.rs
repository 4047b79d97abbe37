//! The server's state in PostgreSQL (`database = "postgresql://…"`): the
//! same tables, rows and versioned schema as the embedded SQLite
//! ([`super::db`]), written from the same [`Changes`] batches and read
//! back into the same [`Snapshot`]. Each batch is one transaction of a
//! few statements whatever its size: rows travel as arrays (`UNNEST`),
//! not one statement per row, so a commit costs a handful of round trips.
//!
//! The connection is one client on the serving loop's runtime (commits
//! are serialised by the loop anyway), with a statement timeout. When it
//! is lost (PostgreSQL restarted), a commit connects again and is tried
//! again — bounded by the lease, which the serving loop watches: a
//! database back within `lease_ttl` costs a wait, not the server.
//!
//! - [`connect`]: the settings, the client configuration, (re)connecting.
//! - [`lease`]: the lease: leading, renewing.

mod connect;
pub mod history;
mod lease;

pub use connect::{redact, PgSettings};
pub use lease::{LeaseView, Renewal};

use super::db::{migration, Changes, Dialect, HistoryRow, Snapshot, StateError, SCHEMA_VERSION};
use std::collections::BTreeMap;
use std::path::PathBuf;
use tokio_postgres::{Client, Statement};

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
    /// How to connect again.
    settings: PgSettings,
    /// Connections made again, and commits that waited for one (and how
    /// long), since the counters were last taken.
    reconnects: u64,
    commits_waited: u64,
    commit_wait_ms: u64,
}

/// A commit waits this long at most for a lost connection to come back
/// (the serving loop gives up sooner when its lease would lapse).
const COMMIT_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

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

impl PgDb {
    /// Connects, checks the schema (refusing a newer one or a database
    /// that holds other tables) and migrates it.
    pub async fn open(settings: &PgSettings) -> Result<PgDb, StateError> {
        let (client, connection, target) = connect::connect(settings, "state").await?;
        let pg = |source| StateError::Postgres {
            target: target.clone(),
            source,
        };
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
            settings: settings.clone(),
            reconnects: 0,
            commits_waited: 0,
            commit_wait_ms: 0,
        })
    }

    /// Connects again (the statements prepared again) after the
    /// connection was lost, waiting for the database until `give_up`.
    async fn reconnect(&mut self, give_up: std::time::Instant) -> Result<(), StateError> {
        let (client, connection, _) = connect::reconnect(&self.settings, "state", give_up).await?;
        let statements =
            Statements::prepare(&client)
                .await
                .map_err(|source| StateError::Postgres {
                    target: self.target.clone(),
                    source,
                })?;
        tracing::info!(database = %self.target, "PostgreSQL connection made again");
        self.client = client;
        self.statements = statements;
        self._connection = connection;
        self.reconnects += 1;
        Ok(())
    }

    /// `postgres_reconnects`, `commits_waited_for_database` and
    /// `commit_wait_ms` since the last call.
    pub fn take_counters(&mut self) -> [(&'static str, u64); 3] {
        [
            ("postgres_reconnects", std::mem::take(&mut self.reconnects)),
            (
                "commits_waited_for_database",
                std::mem::take(&mut self.commits_waited),
            ),
            ("commit_wait_ms", std::mem::take(&mut self.commit_wait_ms)),
        ]
    }

    /// `user@host:port/db`.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// How it was connected to (a history reader connects alike).
    pub fn settings(&self) -> &PgSettings {
        &self.settings
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
    /// durable (PostgreSQL's commit). A lost connection is made again and
    /// the transaction tried again (every statement is an upsert or a
    /// delete by key: a transaction that did commit before its answer was
    /// lost writes the same rows again, but for task history rows, which
    /// it may add twice), for up to ten minutes — the serving loop stops
    /// waiting sooner, when its lease would lapse.
    pub async fn commit(&mut self, changes: &Changes) -> Result<(), StateError> {
        if changes.is_empty() {
            return Ok(());
        }
        let began = std::time::Instant::now();
        let mut waited = false;
        loop {
            match self.commit_once(changes).await {
                Err(StateError::Postgres { source, .. }) if connect::connection_lost(&source) => {
                    waited = true;
                    self.reconnect(began + COMMIT_WAIT).await?;
                }
                done => {
                    if waited {
                        self.commits_waited += 1;
                        self.commit_wait_ms = self
                            .commit_wait_ms
                            .saturating_add(began.elapsed().as_millis() as u64);
                    }
                    return done;
                }
            }
        }
    }

    async fn commit_once(&mut self, changes: &Changes) -> Result<(), StateError> {
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
        let sum = |sql: &'static str| async move {
            self.client.query_one(sql, &[]).await.map(|row| {
                row.get::<_, Option<i64>>(0)
                    .map(|v| u64::try_from(v).unwrap_or(0))
            })
        };
        use super::index as h;
        Ok(Snapshot {
            runs: pairs(h::LIVE_RUNS).await.map_err(&pg)?,
            tasks: pairs(h::LIVE_TASKS).await.map_err(&pg)?,
            kept_bytes: sum(h::KEPT_BYTES).await.map_err(&pg)?.unwrap_or(0),
            oldest_kept_ms: sum(h::OLDEST_KEPT).await.map_err(&pg)?,
            file_bytes: sum(h::FILE_BYTES).await.map_err(&pg)?.unwrap_or(0),
            highest_run: sum(h::HIGHEST_RUN).await.map_err(&pg)?.unwrap_or(0),
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
                "INSERT INTO runs (id, body, num, kind, state, verdict, owner, groups, live,
                     ended_ms, kept_bytes, summary, series, image)
                 SELECT * FROM UNNEST($1::text[], $2::bytea[], $3::int8[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::text[], $9::int8[], $10::int8[], $11::int8[], $12::bytea[],
                     $13::text[], $14::text[])
                 ON CONFLICT (id) DO UPDATE SET body = excluded.body, num = excluded.num,
                     kind = excluded.kind, state = excluded.state, verdict = excluded.verdict,
                     owner = excluded.owner, groups = excluded.groups, live = excluded.live,
                     ended_ms = excluded.ended_ms, kept_bytes = excluded.kept_bytes,
                     summary = excluded.summary, series = excluded.series, image = excluded.image",
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
        write_runs(tx, s, changes).await?;
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
    for (sql, params) in super::usage::statements(&changes.usage) {
        let params = history::pg_params(&params);
        tx.execute(history::pg_sql(sql).as_str(), &params.refs())
            .await?;
    }
    quarantine(tx, changes).await
}

/// The testrun rows of a batch with the columns they are found by.
async fn write_runs(
    tx: &tokio_postgres::Transaction<'_>,
    s: &Statements,
    changes: &Changes,
) -> Result<(), tokio_postgres::Error> {
    use super::index::sql_int;
    let rows = last(changes.runs.iter().map(|(k, b, x)| (k.as_str(), (b, x))));
    let mut c = RunColumns::default();
    for (id, (body, x)) in rows {
        c.ids.push(id);
        c.bodies.push(body.as_slice());
        c.nums.push(sql_int(x.num));
        c.kinds.push(x.kind.as_str());
        c.states.push(x.state.as_str());
        c.verdicts.push(x.verdict.as_deref());
        c.owners.push(x.owner.as_deref());
        c.groups.push(x.groups.as_str());
        c.live.push(i64::from(x.live));
        c.ended.push(x.ended_ms.map(sql_int));
        c.kept.push(x.kept_bytes.map(sql_int));
        c.summaries.push(x.summary.as_slice());
        c.series.push(x.series.as_deref());
        c.images.push(x.image.as_deref());
    }
    tx.execute(
        &s.runs,
        &[
            &c.ids,
            &c.bodies,
            &c.nums,
            &c.kinds,
            &c.states,
            &c.verdicts,
            &c.owners,
            &c.groups,
            &c.live,
            &c.ended,
            &c.kept,
            &c.summaries,
            &c.series,
            &c.images,
        ],
    )
    .await?;
    Ok(())
}

#[derive(Default)]
struct RunColumns<'a> {
    ids: Vec<&'a str>,
    bodies: Vec<&'a [u8]>,
    nums: Vec<i64>,
    kinds: Vec<&'a str>,
    states: Vec<&'a str>,
    verdicts: Vec<Option<&'a str>>,
    owners: Vec<Option<&'a str>>,
    groups: Vec<&'a str>,
    live: Vec<i64>,
    ended: Vec<Option<i64>>,
    kept: Vec<Option<i64>>,
    summaries: Vec<&'a [u8]>,
    series: Vec<Option<&'a str>>,
    images: Vec<Option<&'a str>>,
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
