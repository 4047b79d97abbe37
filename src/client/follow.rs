//! Following a testrun: progress events arrive on a second control
//! connection that asked to `follow` the run (sealed like everything else;
//! best-effort: the server drops what a slow follower does not read) and
//! are checked against their per-testrun index; any gap, and a periodic
//! safety poll, is filled with `get_events` (lossless). Log lines come
//! from the follow connection only; gaps there are reported, and
//! `ots-submit logs` has everything the server stored.

use crate::client::{Client, ClientError};
use crate::protocol::{Body, LogLine, ProgressEvent, ProgressState, RunId, RunStatus, TaskId};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// Something to show while following.
#[derive(Debug, Clone, PartialEq)]
pub enum FollowItem {
    Event(ProgressEvent),
    Lines {
        task: TaskId,
        lines: Vec<LogLine>,
    },
    /// Live log lines of `task` that this follower did not receive.
    Missed {
        task: TaskId,
        lines: u64,
    },
    /// The follow connection could not be opened; progress is polled instead.
    NoLiveEvents(String),
    /// The server stopped answering; the follower keeps trying.
    ServerAway(String),
    /// The server answers again.
    ServerBack,
}

/// Reconnects to the server until it answers, with randomized
/// exponential backoff; tells `sink` once that it went away.
async fn reconnect(client: &mut Client, why: &ClientError, sink: &mut impl FnMut(FollowItem)) {
    use backon::BackoffBuilder;
    sink(FollowItem::ServerAway(why.to_string()));
    let mut backoff = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(2))
        .with_jitter()
        .without_max_times()
        .build();
    let endpoint = client.servers().to_string();
    let timeout = client.timeout();
    let credentials = client.credentials().clone();
    loop {
        match Client::connect(&endpoint, timeout, &credentials).await {
            Ok(c) => {
                *client = c;
                sink(FollowItem::ServerBack);
                return;
            }
            Err(_) => {
                let delay = backoff.next().unwrap_or(Duration::from_secs(2));
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn terminal(e: &ProgressEvent) -> bool {
    matches!(
        e.state,
        ProgressState::RunFinished | ProgressState::RunCancelled
    )
}

/// Opens the follow connection: what the server tells about `run` goes
/// to `tx`.
async fn subscribe(
    client: &Client,
    run: &RunId,
    logs: bool,
    tx: mpsc::UnboundedSender<Body>,
) -> Result<tokio::task::JoinHandle<()>, ClientError> {
    Client::connect(client.servers(), client.timeout(), client.credentials())
        .await?
        .into_follower(run, logs, tx)
        .await
}

/// Follows `run` until it ends; returns its final status.
pub async fn follow(
    client: &mut Client,
    run: &RunId,
    logs: bool,
    mut sink: impl FnMut(FollowItem),
) -> Result<RunStatus, ClientError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut reader = match subscribe(client, run, logs, tx.clone()).await {
        Ok(r) => Some(r),
        Err(e) => {
            sink(FollowItem::NoLiveEvents(e.to_string()));
            None
        }
    };
    let mut state = Progress {
        run: run.clone(),
        next: 0,
        last_seq: HashMap::new(),
        done: false,
    };
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let mut done_live = false;
    while !state.done {
        let mut catch_up = false;
        tokio::select! {
            Some(msg) = rx.recv() => match state.live(msg, &mut sink) {
                Live::Gap => catch_up = true,
                Live::Terminal => done_live = true,
                Live::Other => {}
            },
            _ = poll.tick() => catch_up = true,
        }
        if catch_up && !state.done {
            let events = match client.events(run, state.next).await {
                Ok(events) => events,
                Err(e @ ClientError::Unreachable { .. }) => {
                    // Ride through a server restart: its state is durable.
                    reconnect(client, &e, &mut sink).await;
                    // A fresh follow connection: the old one went with the
                    // server.
                    if let Some(r) = reader.take() {
                        r.abort();
                    }
                    reader = subscribe(client, run, logs, tx.clone()).await.ok();
                    continue;
                }
                Err(e) => return Err(e),
            };
            for event in events {
                if event.index != state.next {
                    continue;
                }
                state.next += 1;
                state.done = terminal(&event);
                sink(FollowItem::Event(event));
                if state.done {
                    break;
                }
            }
        }
    }
    // Ended by a poll: log lines sent before the end may still be in
    // flight on the follow connection; take them until the live end event
    // shows up.
    if logs && reader.is_some() && !done_live {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            if let Live::Terminal = state.live(msg, &mut sink) {
                break;
            }
        }
    }
    if let Some(r) = reader {
        r.abort();
    }
    loop {
        match client.status(run).await {
            Err(e @ ClientError::Unreachable { .. }) => reconnect(client, &e, &mut sink).await,
            other => return other,
        }
    }
}

enum Live {
    Gap,
    Terminal,
    Other,
}

struct Progress {
    run: RunId,
    /// Index of the next progress event to show.
    next: u64,
    last_seq: HashMap<TaskId, u64>,
    done: bool,
}

impl Progress {
    /// Handles one message of the follow connection.
    fn live(&mut self, body: Body, sink: &mut impl FnMut(FollowItem)) -> Live {
        match body {
            Body::Progress { run, event } if run == self.run => {
                let is_end = terminal(&event);
                if event.index == self.next {
                    self.next += 1;
                    self.done = is_end;
                    sink(FollowItem::Event(event));
                } else if event.index > self.next {
                    return Live::Gap;
                }
                if is_end {
                    return Live::Terminal;
                }
            }
            Body::LogLines { run, task, lines } if run == self.run => {
                let last = self.last_seq.entry(task.clone()).or_insert(0);
                if let Some(first) = lines.first() {
                    if first.seq > *last + 1 {
                        sink(FollowItem::Missed {
                            task: task.clone(),
                            lines: first.seq - *last - 1,
                        });
                    }
                }
                if let Some(l) = lines.last() {
                    *last = (*last).max(l.seq);
                }
                sink(FollowItem::Lines { task, lines });
            }
            _ => {}
        }
        Live::Other
    }
}
