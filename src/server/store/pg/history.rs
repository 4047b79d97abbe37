//! History on PostgreSQL ([`crate::server::store::history`]): the same
//! questions on a connection of its own, so a long read never holds up a
//! commit. A lost connection is made again, bounded, once per question.

use super::connect::{self, PgSettings};
use crate::server::store::db::StateError;
use crate::server::store::history::{sql_int, summary_of, Found, Recall, Rows, RunQuery};
use crate::server::store::results::{SqlParam, SqlValue};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Error as PgError};

/// A question waits this long at most for a lost connection to return.
const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection of a helper's own (the history reader, the case
/// writer), made again after a loss.
struct Own {
    client: Client,
    target: String,
    settings: PgSettings,
    what: &'static str,
    _connection: tokio::task::JoinHandle<()>,
}

impl Own {
    async fn open(settings: &PgSettings, what: &'static str) -> Result<Own, StateError> {
        let (client, connection, target) = connect::connect(settings, what).await?;
        Ok(Own {
            client,
            target,
            settings: settings.clone(),
            what,
            _connection: connection,
        })
    }

    /// Connects again, waiting for the database [`RECONNECT_WAIT`] at most.
    async fn reconnect(&mut self) -> Result<(), StateError> {
        let give_up = std::time::Instant::now() + RECONNECT_WAIT;
        let (client, connection, _) =
            connect::reconnect(&self.settings, self.what, give_up).await?;
        self.client = client;
        self._connection = connection;
        Ok(())
    }

    fn error(&self, source: tokio_postgres::Error) -> StateError {
        StateError::Postgres {
            target: self.target.clone(),
            source,
        }
    }
}

/// PostgreSQL as [`crate::server::store::results::SqlRows`]: `?n`
/// placeholders become `$n` and SQLite's `instr` PostgreSQL's `strpos`
/// (the one function the queries use that differs); BIGINT columns are
/// integers, any other a text.
struct Pg<'a>(&'a Client);

impl crate::server::store::results::SqlRows for Pg<'_> {
    type Error = tokio_postgres::Error;
    async fn rows(&self, sql: &str, params: &[SqlParam]) -> Result<Vec<Vec<SqlValue>>, PgError> {
        let rows = self
            .0
            .query(&pg_sql(sql), &pg_params(params).refs())
            .await?;
        pg_values(&rows)
    }

    /// Prepared once, the queries pipelined on the one connection.
    async fn rows_each(
        &self,
        sql: &str,
        params: &[Vec<SqlParam>],
    ) -> Result<Vec<Vec<Vec<SqlValue>>>, PgError> {
        if params.is_empty() {
            return Ok(Vec::new());
        }
        let stmt = self.0.prepare(&pg_sql(sql)).await?;
        let values: Vec<PgParams> = params.iter().map(|p| pg_params(p)).collect();
        let asks = values.iter().map(|v| {
            let stmt = &stmt;
            async move { self.0.query(stmt, &v.refs()).await }
        });
        futures::future::try_join_all(asks)
            .await?
            .iter()
            .map(|rows| pg_values(rows))
            .collect()
    }
}

pub(crate) fn pg_sql(sql: &str) -> String {
    sql.replace('?', "$").replace("instr(", "strpos(")
}

/// Parameters as PostgreSQL takes them.
pub(crate) struct PgParams(Vec<Box<dyn ToSql + Sync + Send>>);

impl PgParams {
    pub(crate) fn refs(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.0
            .iter()
            .map(|v| v.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

pub(crate) fn pg_params(params: &[SqlParam]) -> PgParams {
    PgParams(
        params
            .iter()
            .map(|p| -> Box<dyn ToSql + Sync + Send> {
                match p {
                    SqlParam::Int(i) => Box::new(*i),
                    SqlParam::Text(t) => Box::new(t.clone()),
                }
            })
            .collect(),
    )
}

fn pg_values(rows: &[tokio_postgres::Row]) -> Result<Vec<Vec<SqlValue>>, PgError> {
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| {
                    Ok(match *r.columns()[i].type_() {
                        Type::INT8 => SqlValue::Int(r.try_get(i)?),
                        Type::BYTEA => SqlValue::Bytes(r.try_get(i)?),
                        Type::FLOAT8 => {
                            SqlValue::Text(r.try_get::<_, Option<f64>>(i)?.map(|v| v.to_string()))
                        }
                        Type::INT4 => SqlValue::Int(r.try_get::<_, Option<i32>>(i)?.map(i64::from)),
                        _ => SqlValue::Text(r.try_get(i)?),
                    })
                })
                .collect()
        })
        .collect()
}

pub struct PgHistory {
    own: Own,
    /// The files folder (task logs, for `log` known-issue rules).
    logs: Option<std::path::PathBuf>,
}

impl PgHistory {
    pub async fn open(settings: &PgSettings) -> Result<PgHistory, StateError> {
        Ok(PgHistory {
            own: Own::open(settings, "history").await?,
            logs: None,
        })
    }

    /// Reads task logs below `files` for `log` known-issue rules.
    pub fn with_logs(mut self, files: &std::path::Path) -> PgHistory {
        self.logs = Some(files.to_path_buf());
        self
    }

    /// Answers one question (connecting again once if the connection
    /// was lost).
    pub async fn recall(&mut self, recall: &Recall) -> Result<Found, StateError> {
        match self.recall_once(recall).await {
            Err(e) if connect::connection_lost(&e) => {
                self.own.reconnect().await?;
                self.recall_once(recall)
                    .await
                    .map_err(|e| self.own.error(e))
            }
            other => other.map_err(|e| self.own.error(e)),
        }
    }

    async fn recall_once(&self, recall: &Recall) -> Result<Found, tokio_postgres::Error> {
        match recall {
            Recall::Runs(ids) => self.rows(ids).await.map(Found::Rows),
            Recall::List(q) => self.list(q).await.map(Found::List),
            Recall::Cases(q) => self.cases(q).await.map(Found::Cases),
            Recall::Results(q) => crate::server::store::results::answer(
                &Pg(&self.own.client),
                q,
                self.logs.as_deref(),
            )
            .await
            .map(Found::Results),
            Recall::OldestKept(n) => {
                let found = self
                    .own
                    .client
                    .query(
                        "SELECT id, ended_ms FROM runs WHERE kept_bytes IS NOT NULL
                         ORDER BY ended_ms, num LIMIT $1",
                        &[&sql_int(*n as u64 + 1)],
                    )
                    .await?;
                let next = found
                    .get(*n)
                    .and_then(|r| r.get::<_, Option<i64>>(1))
                    .map(|v| u64::try_from(v).unwrap_or(0));
                let ids: Vec<String> = found.iter().take(*n).map(|r| r.get(0)).collect();
                let mut rows = self.rows(&ids).await?;
                rows.next_kept_ms = next;
                Ok(Found::Rows(rows))
            }
            Recall::EndedLeases(n) => {
                let ids: Vec<String> = self
                    .own
                    .client
                    .query(
                        "SELECT id FROM runs WHERE kind = 'l' AND live = 0 ORDER BY num DESC LIMIT $1",
                        &[&sql_int(*n as u64)],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                self.rows(&ids).await.map(Found::Rows)
            }
        }
    }

    async fn cases(
        &self,
        q: &crate::server::store::cases::CaseQuery,
    ) -> Result<Vec<crate::protocol::TestCase>, tokio_postgres::Error> {
        use crate::server::store::cases::{case_of, case_sql};
        let mut values: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> = Vec::new();
        for (task, attempt) in &q.attempts {
            values.push(Box::new(task.clone()));
            values.push(Box::new(i64::from(*attempt)));
        }
        values.push(Box::new(i64::from(q.limit)));
        values.push(Box::new(sql_int(q.offset)));
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = self.own.client.query(&case_sql(q, true), &refs).await?;
        Ok(rows
            .iter()
            .map(|r| {
                case_of((
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    r.get(3),
                    r.get(4),
                    r.get(5),
                    r.get(6),
                    r.get(7),
                ))
            })
            .collect())
    }

    async fn rows(&self, ids: &[String]) -> Result<Rows, tokio_postgres::Error> {
        let mut rows = Rows::default();
        if ids.is_empty() {
            return Ok(rows);
        }
        for r in self
            .own
            .client
            .query(
                "SELECT id, body FROM runs WHERE id = ANY($1::text[])",
                &[&ids],
            )
            .await?
        {
            rows.runs.push((r.get(0), r.get(1)));
        }
        for r in self
            .own
            .client
            .query(
                "SELECT id, body FROM tasks WHERE run = ANY($1::text[])",
                &[&ids],
            )
            .await?
        {
            rows.tasks.push((r.get(0), r.get(1)));
        }
        // In the order asked (retention prunes the first first).
        rows.runs
            .sort_by_key(|(id, _)| ids.iter().position(|i| i == id).unwrap_or(usize::MAX));
        Ok(rows)
    }

    async fn list(
        &self,
        q: &RunQuery,
    ) -> Result<Vec<crate::protocol::RunSummary>, tokio_postgres::Error> {
        let lowest = sql_int(q.lowest());
        let group = q.group_pattern();
        let rows = self
            .own
            .client
            .query(
                "SELECT id, summary FROM runs
                 WHERE kind = 'r' AND num BETWEEN $1 AND $2
                   AND ($3::text IS NULL OR state = $3) AND ($4::text IS NULL OR owner = $4)
                   AND ($5::text IS NULL OR verdict = $5) AND ($6::text IS NULL OR strpos(groups, $6) > 0)
                 ORDER BY num DESC LIMIT $7",
                &[
                    &lowest,
                    &sql_int(q.newest),
                    &q.state,
                    &q.owner,
                    &q.verdict,
                    &group,
                    &i64::from(q.limit),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .filter_map(|r| {
                summary_of(
                    &r.get::<_, String>(0),
                    r.get::<_, Option<Vec<u8>>>(1).as_deref(),
                )
            })
            .collect())
    }
}

/// The desk's case writer on PostgreSQL: a connection of its own, driven
/// from the desk's thread through the server's runtime.
pub struct PgCases {
    own: Own,
    runtime: tokio::runtime::Handle,
}

impl PgCases {
    pub async fn open(settings: &PgSettings) -> Result<PgCases, StateError> {
        Ok(PgCases {
            own: Own::open(settings, "cases").await?,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

impl crate::server::store::cases::CaseSink for PgCases {
    /// Records the cases; a lost connection (PostgreSQL restarted) is
    /// made again, bounded, and the file's cases written once more.
    fn record(
        &mut self,
        task: &crate::protocol::TaskId,
        attempt: u32,
        file: &str,
        about: &crate::server::store::cases::CaseAbout,
        cases: &[crate::server::cases::Case],
    ) -> Result<(), StateError> {
        match self.record_once(task, attempt, file, about, cases) {
            Err(StateError::Postgres { source, .. }) if connect::connection_lost(&source) => {
                self.runtime.block_on(self.own.reconnect())?;
                self.record_once(task, attempt, file, about, cases)
            }
            other => other,
        }
    }
}

impl PgCases {
    fn record_once(
        &mut self,
        task: &crate::protocol::TaskId,
        attempt: u32,
        file: &str,
        about: &crate::server::store::cases::CaseAbout,
        cases: &[crate::server::cases::Case],
    ) -> Result<(), StateError> {
        let run = crate::server::store::cases::run_of(task).to_string();
        let num = sql_int(crate::server::store::cases::num_of(&run));
        let (client, target) = (&mut self.own.client, self.own.target.clone());
        let pg = |source| StateError::Postgres {
            target: target.clone(),
            source,
        };
        self.runtime.block_on(async {
            client
                .execute(
                    "DELETE FROM cases WHERE task = $1 AND attempt = $2 AND file = $3",
                    &[task, &i64::from(attempt), &file],
                )
                .await
                .map_err(pg)?;
            client
                .execute(
                    "INSERT INTO case_sets (task, attempt, file, run, body) VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (task, attempt, file) DO UPDATE SET run = excluded.run, body = excluded.body",
                    &[task, &i64::from(attempt), &file, &run, &crate::server::store::cases::encode_set(cases)],
                )
                .await
                .map_err(pg)?;
            for (c, chunk) in cases.chunks(crate::server::store::cases::PG_CHUNK).enumerate() {
                let base = c * crate::server::store::cases::PG_CHUNK;
                let seqs: Vec<i64> = (0..chunk.len()).map(|i| sql_int((base + i) as u64)).collect();
                let suites: Vec<&str> = chunk.iter().map(|x| x.suite.as_ref()).collect();
                let names: Vec<&str> = chunk.iter().map(|x| x.name.as_str()).collect();
                let statuses: Vec<&str> = chunk.iter().map(|x| x.status.as_str()).collect();
                let durations: Vec<Option<i64>> =
                    chunk.iter().map(|x| x.duration_ms.map(sql_int)).collect();
                let messages: Vec<Option<&str>> =
                    chunk.iter().map(|x| x.message.as_deref()).collect();
                let offsets: Vec<Option<i64>> =
                    chunk.iter().map(|x| x.log_offset.map(sql_int)).collect();
                client
                    .execute(
                        "INSERT INTO cases (task, attempt, file, seq, run, suite, name, status,
                             duration_ms, message, num, series, worker, devicegroup, log_offset)
                         SELECT $1, $2, $3, s, $4, su, n, st, d, m, $11, $12, $13, $14, o
                         FROM UNNEST($5::int8[], $6::text[], $7::text[], $8::text[], $9::int8[],
                             $10::text[], $15::int8[]) AS x(s, su, n, st, d, m, o)
                         ON CONFLICT (task, attempt, file, seq) DO UPDATE SET suite = excluded.suite,
                             name = excluded.name, status = excluded.status,
                             duration_ms = excluded.duration_ms, message = excluded.message,
                             num = excluded.num, series = excluded.series,
                             worker = excluded.worker, devicegroup = excluded.devicegroup,
                             log_offset = excluded.log_offset",
                        &[
                            task,
                            &i64::from(attempt),
                            &file,
                            &run,
                            &seqs,
                            &suites,
                            &names,
                            &statuses,
                            &durations,
                            &messages,
                            &num,
                            &about.series,
                            &about.worker,
                            &about.devicegroup,
                            &offsets,
                        ],
                    )
                    .await
                    .map_err(pg)?;
            }
            Ok(())
        })
    }
}
