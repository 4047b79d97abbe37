//! The metrics endpoint (`metrics = "HOST:PORT"` in the server's
//! configuration; off by default): Prometheus/OpenMetrics text over plain
//! HTTP `GET /metrics`. The serving loop renders the page on request (a
//! scrape every few seconds costs what the registry holds, not a scan per
//! message); the HTTP side is a small bounded listener that never touches
//! the scheduler.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

type Labels = Vec<(String, String)>;

/// What the scheduler reports for one scrape.
pub struct Snapshot {
    /// (state, health) → workers.
    pub workers_by_state: BTreeMap<(String, String), u64>,
    pub tasks_by_state: BTreeMap<String, u64>,
    /// (routing key, queued tasks, age of the oldest in seconds)
    pub queues: Vec<(String, u64, f64)>,
    /// The scheduler's and the shell's counters (orphans, refusals, log
    /// lines stored and lost, file bytes, drops…).
    pub counters: BTreeMap<String, u64>,
    /// Notification deliveries per state (pending, sending, delivered,
    /// failed).
    pub notifications: Vec<(String, u64)>,
    /// Failed notification attempts per target since the server started,
    /// and 1 for each target failing for longer than `alert_after`.
    pub notify_targets: Vec<(String, u64, bool)>,
}

pub struct Metrics {
    registry: Registry,
    workers: Family<Labels, Gauge>,
    tasks: Family<Labels, Gauge>,
    queue_depth: Family<Labels, Gauge>,
    queue_age: Family<Labels, Gauge<f64, AtomicU64>>,
    events: Family<Labels, Counter>,
    seen: BTreeMap<String, u64>,
    commit_seconds: Histogram,
    tick_gap_seconds: Gauge<f64, AtomicU64>,
    notifications: Family<Labels, Gauge>,
    notify_failures: Family<Labels, Gauge>,
    notify_alerts: Family<Labels, Gauge>,
    leader: Gauge,
    lease_epoch: Gauge,
    lease_renew_seconds: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("ots");
        let workers = Family::<Labels, Gauge>::default();
        let tasks = Family::<Labels, Gauge>::default();
        let queue_depth = Family::<Labels, Gauge>::default();
        let queue_age = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        let events = Family::<Labels, Counter>::default();
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        let tick_gap_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "workers",
            "Registered workers by state and device health",
            workers.clone(),
        );
        registry.register(
            "tasks",
            "Unfinished (and just finished) tasks by state",
            tasks.clone(),
        );
        registry.register(
            "queue_depth",
            "Queued tasks per routing key",
            queue_depth.clone(),
        );
        registry.register(
            "queue_oldest_age_seconds",
            "Age of the oldest queued task per routing key",
            queue_age.clone(),
        );
        registry.register(
            "events",
            "Server event counters (messages refused, orphans, retries, log lines stored and lost, file bytes, drops)",
            events.clone(),
        );
        registry.register(
            "state_commit_seconds",
            "SQLite commit latency per batch",
            commit_seconds.clone(),
        );
        registry.register(
            "loop_tick_gap_max_seconds",
            "Longest gap between two heartbeat ticks of the serving loop since the last scrape",
            tick_gap_seconds.clone(),
        );
        let notifications = Family::<Labels, Gauge>::default();
        let notify_failures = Family::<Labels, Gauge>::default();
        let notify_alerts = Family::<Labels, Gauge>::default();
        registry.register(
            "notifications",
            "Notification deliveries kept, by state (pending, sending, delivered, failed)",
            notifications.clone(),
        );
        registry.register(
            "notification_target_failures",
            "Failed notification attempts per target since the server started",
            notify_failures.clone(),
        );
        registry.register(
            "notification_target_alert",
            "1 while a notification target has been failing for longer than notify.alert_after",
            notify_alerts.clone(),
        );
        let leader = Gauge::default();
        let lease_epoch = Gauge::default();
        let lease_renew_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "leader",
            "1: this server leads (it serves only then; with SQLite always)",
            leader.clone(),
        );
        registry.register(
            "lease_epoch",
            "The epoch of the lease this server holds (PostgreSQL; 0 with SQLite)",
            lease_epoch.clone(),
        );
        registry.register(
            "lease_renew_seconds",
            "How long the last lease renewal took (PostgreSQL)",
            lease_renew_seconds.clone(),
        );
        Metrics {
            leader,
            lease_epoch,
            lease_renew_seconds,
            notifications,
            notify_failures,
            notify_alerts,
            registry,
            workers,
            tasks,
            queue_depth,
            queue_age,
            events,
            seen: BTreeMap::new(),
            commit_seconds,
            tick_gap_seconds,
        }
    }

    /// The lease held (epoch 0: SQLite) and the last renewal's time.
    pub fn set_lease(&self, epoch: i64, renew: Option<Duration>) {
        self.leader.set(1);
        self.lease_epoch.set(epoch);
        self.lease_renew_seconds
            .set(renew.map_or(0.0, |d| d.as_secs_f64()));
    }

    pub fn observe_commit(&self, d: Duration) {
        self.commit_seconds.observe(d.as_secs_f64());
    }

    pub fn observe_tick_gap(&self, d: Duration) {
        if d.as_secs_f64() > self.tick_gap_seconds.get() {
            self.tick_gap_seconds.set(d.as_secs_f64());
        }
    }

    /// The page for one scrape.
    pub fn render(&mut self, snap: Snapshot) -> String {
        self.workers.clear();
        for ((state, health), n) in snap.workers_by_state {
            self.workers
                .get_or_create(&vec![("state".into(), state), ("health".into(), health)])
                .set(n as i64);
        }
        self.tasks.clear();
        for (state, n) in snap.tasks_by_state {
            self.tasks
                .get_or_create(&vec![("state".into(), state)])
                .set(n as i64);
        }
        self.queue_depth.clear();
        self.queue_age.clear();
        for (key, depth, age) in snap.queues {
            let labels = vec![("routing_key".to_string(), key)];
            self.queue_depth.get_or_create(&labels).set(depth as i64);
            self.queue_age.get_or_create(&labels).set(age);
        }
        for (name, total) in snap.counters {
            let last = self.seen.insert(name.clone(), total).unwrap_or(0);
            self.events
                .get_or_create(&vec![("event".into(), name)])
                .inc_by(total.saturating_sub(last));
        }
        self.notifications.clear();
        for (state, n) in snap.notifications {
            self.notifications
                .get_or_create(&vec![("state".into(), state)])
                .set(n as i64);
        }
        self.notify_failures.clear();
        self.notify_alerts.clear();
        for (target, failures, alert) in snap.notify_targets {
            let labels = vec![("target".to_string(), target)];
            self.notify_failures
                .get_or_create(&labels)
                .set(failures as i64);
            self.notify_alerts.get_or_create(&labels).set(alert as i64);
        }
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        self.tick_gap_seconds.set(0.0);
        out
    }
}

/// A scrape asks the serving loop for the page and waits for it.
pub type Scrape = oneshot::Sender<String>;

/// Connections served at once, at most; more wait in the kernel's queue.
const MAX_SCRAPERS: usize = 8;

/// Serves `GET /metrics` on `addr` (anything else: 404), asking the loop
/// through `scrapes`. Each connection has 5 s to send its request line
/// (8 KiB at most) and gets the page within 5 s or a 503.
pub async fn serve(listener: tokio::net::TcpListener, scrapes: mpsc::Sender<Scrape>) {
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // The serving loop ended: the listener closes with it.
            () = scrapes.closed() => return,
        };
        let Ok((mut stream, _)) = accepted else {
            continue;
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let scrapes = scrapes.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while len < buf.len() {
                    match stream.read(&mut buf[len..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            len += n;
                            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let first = request.lines().next().unwrap_or("");
            let (status, body) = if first.starts_with("GET /metrics ") || first == "GET /metrics" {
                let (tx, rx) = oneshot::channel();
                let page = match scrapes.send(tx).await {
                    Ok(()) => tokio::time::timeout(Duration::from_secs(5), rx)
                        .await
                        .ok()
                        .and_then(Result::ok),
                    Err(_) => None,
                };
                match page {
                    Some(p) => ("200 OK", p),
                    None => (
                        "503 Service Unavailable",
                        "the server loop did not answer\n".to_string(),
                    ),
                }
            } else {
                ("404 Not Found", "try GET /metrics\n".to_string())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
