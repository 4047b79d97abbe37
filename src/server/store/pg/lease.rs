//! The lease (PROTOCOL.md §13): one leader among the servers sharing a
//! database, by the database's clock. A standby polls it; the leader
//! renews it on a connection of its own and fences every commit with its
//! epoch.

use super::connect::{self, PgSettings};
use super::PgDb;
use crate::server::store::db::StateError;
use std::time::Duration;
use tokio_postgres::Client;

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

impl PgDb {
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
    /// commit does not delay it), reporting each result. A lost
    /// connection is made again at the next renewal (PostgreSQL
    /// restarted: the lease holds if it is back within `lease_ttl`); the
    /// renewer ends when the serving loop stops listening (stepped down).
    pub async fn spawn_renewer(
        settings: &PgSettings,
        holder: String,
        epoch: i64,
        policy: crate::server::lease::LeasePolicy,
    ) -> Result<tokio::sync::mpsc::UnboundedReceiver<Renewal>, StateError> {
        let (client, conn, target) = connect::connect(settings, "lease renewal").await?;
        let settings = settings.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut connection = Some((client, conn));
            let mut ticker = tokio::time::interval(policy.renew);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                ticker.tick().await;
                if tx.is_closed() {
                    return;
                }
                let sent = std::time::Instant::now();
                if connection.as_ref().is_none_or(|(c, _)| c.is_closed()) {
                    let give_up = sent + policy.renew;
                    match connect::reconnect(&settings, "lease renewal", give_up).await {
                        Ok((client, conn, _)) => {
                            tracing::info!(database = %target, "lease renewal: connected again");
                            connection = Some((client, conn));
                        }
                        Err(_) => {
                            connection = None;
                            continue;
                        }
                    }
                }
                let Some((client, _)) = connection.as_ref() else {
                    continue;
                };
                match tokio::time::timeout(policy.renew, renew(client, &holder, epoch, policy.ttl))
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
                        if connect::connection_lost(&e) {
                            connection = None;
                        }
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
}
