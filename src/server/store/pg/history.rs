//! History on PostgreSQL ([`crate::server::store::history`]): the same
//! questions on a connection of its own, so a long read never holds up a
//! commit. A lost connection is made again, bounded, once per question.

use super::connect::{self, PgSettings};
use crate::server::store::db::StateError;
use crate::server::store::history::{sql_int, summary_of, Found, Recall, Rows, RunQuery};
use tokio_postgres::Client;

/// A question waits this long at most for a lost connection to return.
const RECONNECT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct PgHistory {
    client: Client,
    target: String,
    settings: PgSettings,
    _connection: tokio::task::JoinHandle<()>,
}

impl PgHistory {
    pub async fn open(settings: &PgSettings) -> Result<PgHistory, StateError> {
        let (client, connection, target) = connect::connect(settings, "history").await?;
        Ok(PgHistory {
            client,
            target,
            settings: settings.clone(),
            _connection: connection,
        })
    }

    /// Answers one question (connecting again once if the connection
    /// was lost).
    pub async fn recall(&mut self, recall: &Recall) -> Result<Found, StateError> {
        match self.recall_once(recall).await {
            Err(e) if connect::connection_lost(&e) => {
                let give_up = std::time::Instant::now() + RECONNECT_WAIT;
                let (client, connection, _) =
                    connect::reconnect(&self.settings, "history", give_up).await?;
                self.client = client;
                self._connection = connection;
                self.recall_once(recall).await.map_err(|e| self.error(e))
            }
            other => other.map_err(|e| self.error(e)),
        }
    }

    fn error(&self, source: tokio_postgres::Error) -> StateError {
        StateError::Postgres {
            target: self.target.clone(),
            source,
        }
    }

    async fn recall_once(&self, recall: &Recall) -> Result<Found, tokio_postgres::Error> {
        match recall {
            Recall::Runs(ids) => self.rows(ids).await.map(Found::Rows),
            Recall::List(q) => self.list(q).await.map(Found::List),
            Recall::OldestKept(n) => {
                let found = self
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

    async fn rows(&self, ids: &[String]) -> Result<Rows, tokio_postgres::Error> {
        let mut rows = Rows::default();
        if ids.is_empty() {
            return Ok(rows);
        }
        for r in self
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
