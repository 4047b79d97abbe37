//! Live views: a task's log lines as they are stored, and a testrun's
//! progress, pushed to the browser as server-sent events.
//!
//! Every log event carries the byte offset in the stored log where its
//! lines end as its SSE `id`; a browser that reconnects sends it back
//! (`Last-Event-ID`) and gets exactly the lines after it: never a line
//! twice, never one skipped. Offsets are always at line starts.
//!
//! However many browsers watch one task, the server reads its new lines
//! once: a [`Hub`] per watched task reads from the end (through the same
//! bounded request path as every page) and hands each new chunk to all
//! its watchers. A watcher that falls behind (a slow browser) reads what
//! it missed itself, from its own offset, as the viewer it is.

use super::bridge::{AskError, Asker};
use super::sessions::Viewer;
use super::{Dashboard, Failure};
use crate::protocol::{Body, ProgressState, RunId, TaskId, TaskState};
use axum::http::StatusCode;
use axum::response::sse::Event;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};

/// Live views (log and progress streams) open at most, in all…
pub const MAX_STREAMS: usize = 256;
/// …and on one testrun…
pub const MAX_STREAMS_PER_RUN: usize = 128;
/// …of one user (a person with a few tabs open uses a handful)…
pub const MAX_STREAMS_PER_USER: usize = 32;
/// …and of submit users together: the rest is kept for operators and
/// admins.
pub const MAX_SUBMIT_STREAMS: usize = 192;
/// Bytes of log one event carries at most.
pub const CHUNK_BYTES: u64 = 256 * 1024;
/// How often a hub looks for new lines when it has seen the end.
pub const POLL: Duration = Duration::from_millis(200);
/// How often a stream checks that its viewer is still signed in (a
/// removed key ends its streams within this).
pub const RECHECK: Duration = Duration::from_millis(250);
/// Chunks a hub keeps for watchers that have not taken them yet (each
/// ≤ [`CHUNK_BYTES`] and its JSON: ≤ 4 MiB per watched task); one that
/// falls further behind reads what it missed itself.
const HUB_BACKLOG: usize = 8;

/// A chunk of whole lines of a task's log, at `start`.
#[derive(Clone, Debug)]
struct Chunk {
    start: u64,
    bytes: Bytes,
    /// The event's data for a watcher at `start`, encoded once for all.
    json: Arc<str>,
    /// The task ended and every line of it was sent.
    end: bool,
}

struct Hub {
    tx: broadcast::Sender<Chunk>,
}

/// The live views of the dashboard.
pub struct Live {
    asker: Asker,
    secure: bool,
    hubs: Mutex<HashMap<TaskId, Arc<Hub>>>,
    open: AtomicUsize,
    per_run: Mutex<HashMap<RunId, usize>>,
    /// Streams per user, and of submit users together (in the same lock).
    per_user: Mutex<(HashMap<String, usize>, usize)>,
}

/// A live view's place in the limits; given back when the stream ends.
pub struct Slot {
    live: Arc<Dashboard>,
    run: RunId,
    user: String,
    submit: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let live = &self.live.live;
        live.open.fetch_sub(1, Ordering::Relaxed);
        let mut per_run = live.per_run.lock().expect("per_run");
        if let Some(n) = per_run.get_mut(&self.run) {
            *n -= 1;
            if *n == 0 {
                per_run.remove(&self.run);
            }
        }
        let mut per_user = live.per_user.lock().expect("per_user");
        let (users, submits) = &mut *per_user;
        if let Some(n) = users.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                users.remove(&self.user);
            }
        }
        if self.submit {
            *submits -= 1;
        }
    }
}

/// The testrun a task belongs to (`r12.3` → `r12`; a lease's `l4.1` →
/// `l4`).
pub fn run_of(task: &str) -> Option<RunId> {
    let (run, n) = task.rsplit_once('.')?;
    (run.starts_with(['r', 'l']) && !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| run.to_string())
}

/// Cuts `bytes` after its last newline: whole lines only.
fn whole_lines(bytes: &[u8]) -> usize {
    memchr::memrchr(b'\n', bytes).map_or(0, |i| i + 1)
}

impl Live {
    pub fn new(asker: Asker, secure: bool) -> Self {
        Live {
            asker,
            secure,
            hubs: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            per_run: Mutex::new(HashMap::new()),
            per_user: Mutex::new((HashMap::new(), 0)),
        }
    }

    /// Live views open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Takes a place for a live view of `run` for `viewer`, or says why
    /// there is none: within the limits in all, per testrun, per user and
    /// of submit users together.
    pub fn slot(d: &Arc<Dashboard>, run: &RunId, viewer: &Viewer) -> Result<Slot, Failure> {
        let live = &d.live;
        let mut per_run = live.per_run.lock().expect("per_run");
        let mut per_user = live.per_user.lock().expect("per_user");
        let (users, submits) = &mut *per_user;
        let user = viewer.label();
        let submit = viewer.is_submit();
        let on_run = per_run.get(run).copied().unwrap_or(0);
        let mine = users.get(&user).copied().unwrap_or(0);
        let why = if live.open.load(Ordering::Relaxed) >= MAX_STREAMS {
            Some(format!("{MAX_STREAMS} live views are open in all"))
        } else if on_run >= MAX_STREAMS_PER_RUN {
            Some(format!(
                "{MAX_STREAMS_PER_RUN} live views are open on {run}"
            ))
        } else if viewer.identity.is_some() && mine >= MAX_STREAMS_PER_USER {
            Some(format!("you have {MAX_STREAMS_PER_USER} live views open"))
        } else if submit && *submits >= MAX_SUBMIT_STREAMS {
            Some(format!(
                "submit users have {MAX_SUBMIT_STREAMS} live views open"
            ))
        } else {
            None
        };
        if let Some(why) = why {
            super::Counters::bump(&d.counters.streams_refused);
            return Err(Failure::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{why}; close some (other tabs of the dashboard) or reload later"),
            ));
        }
        live.open.fetch_add(1, Ordering::Relaxed);
        *per_run.entry(run.clone()).or_insert(0) += 1;
        *users.entry(user.clone()).or_insert(0) += 1;
        if submit {
            *submits += 1;
        }
        Ok(Slot {
            live: d.clone(),
            run: run.clone(),
            user,
            submit,
        })
    }

    /// Subscribes to the hub of `task`, started at `from` if there is none.
    fn subscribe(
        d: &Arc<Dashboard>,
        task: &TaskId,
        run: &RunId,
        from: u64,
    ) -> broadcast::Receiver<Chunk> {
        let mut hubs = d.live.hubs.lock().expect("hubs");
        if let Some(h) = hubs.get(task) {
            return h.tx.subscribe();
        }
        let (tx, rx) = broadcast::channel(HUB_BACKLOG);
        hubs.insert(task.clone(), Arc::new(Hub { tx: tx.clone() }));
        tokio::spawn(run_hub(d.clone(), task.clone(), run.clone(), from, tx));
        rx
    }

    /// Removes the hub of `task` if nobody watches it any more.
    fn leave(&self, task: &TaskId, tx: &broadcast::Sender<Chunk>, force: bool) -> bool {
        let mut hubs = self.hubs.lock().expect("hubs");
        // Checked under the lock: a watcher that subscribed meanwhile
        // keeps it (unless the task ended: then its watchers were told).
        if force || tx.receiver_count() == 0 {
            if hubs.get(task).is_some_and(|h| h.tx.same_channel(tx)) {
                hubs.remove(task);
            }
            true
        } else {
            false
        }
    }
}

/// Reads `task`'s new lines from `offset` on and hands them to every
/// watcher, until it has none or the task ended and all was read.
async fn run_hub(
    d: Arc<Dashboard>,
    task: TaskId,
    run: RunId,
    mut offset: u64,
    tx: broadcast::Sender<Chunk>,
) {
    let identity = super::internal_identity(d.live.secure);
    let ask = |body: Body| {
        d.live
            .asker
            .ask(identity.clone(), "web:dashboard".into(), body)
    };
    let mut idle_polls = 0u32;
    loop {
        if tx.receiver_count() == 0 && d.live.leave(&task, &tx, false) {
            return;
        }
        let read = ask(Body::GetLog {
            request: 0,
            task: task.clone(),
            offset,
            max: CHUNK_BYTES,
        })
        .await;
        let mut at_end = true;
        match read {
            Ok((Body::Data { eof, .. }, raw)) => {
                let bytes = raw.unwrap_or_default();
                let n = whole_lines(&bytes);
                if n > 0 {
                    let _ = tx.send(chunk(offset, bytes.slice(..n)));
                    offset += n as u64;
                    at_end = eof && n == bytes.len();
                    idle_polls = 0;
                }
            }
            Ok(_) | Err(AskError::Busy) | Err(AskError::Timeout) => {}
            Err(AskError::Stopped) | Err(AskError::Refused { .. }) => {
                d.live.leave(&task, &tx, true);
                return;
            }
        }
        if !at_end {
            continue;
        }
        idle_polls = idle_polls.saturating_add(1);
        // At the end of what is stored: has the task ended? Asked on the
        // second idle poll (lines that came with the end are read first)
        // and every fifth after.
        if idle_polls % 5 == 2 {
            if let Ok((Body::Status { status, .. }, _)) = ask(Body::GetStatus {
                request: 0,
                run: run.clone(),
            })
            .await
            {
                let ended = status
                    .tasks
                    .iter()
                    .find(|t| t.task == task)
                    .is_none_or(|t| matches!(t.state, TaskState::Finished | TaskState::Cancelled));
                if ended {
                    // Lines stored just before the end, then the end.
                    if let Ok((Body::Data { .. }, Some(raw))) = ask(Body::GetLog {
                        request: 0,
                        task: task.clone(),
                        offset,
                        max: CHUNK_BYTES,
                    })
                    .await
                    {
                        let n = whole_lines(&raw);
                        if n > 0 {
                            let _ = tx.send(chunk(offset, raw.slice(..n)));
                            offset += n as u64;
                            if n == CHUNK_BYTES as usize {
                                continue;
                            }
                        }
                    }
                    d.live.leave(&task, &tx, true);
                    let _ = tx.send(Chunk {
                        start: offset,
                        bytes: Bytes::new(),
                        json: Arc::from(""),
                        end: true,
                    });
                    return;
                }
            }
        }
        tokio::time::sleep(POLL).await; // the pace of looking for new lines at the end of a log
    }
}

/// The data of a `lines` event: `{"from", "to", "text"}`.
fn lines_json(from: u64, bytes: &[u8]) -> String {
    let to = from + bytes.len() as u64;
    let text = String::from_utf8_lossy(bytes);
    serde_json::json!({ "from": from, "to": to, "text": text }).to_string()
}

/// One SSE event with the lines `from..to` of the log.
fn lines_event(from: u64, bytes: &[u8]) -> Event {
    let to = from + bytes.len() as u64;
    Event::default()
        .id(to.to_string())
        .event("lines")
        .data(lines_json(from, bytes))
}

/// A chunk of new lines for every watcher.
fn chunk(start: u64, bytes: Bytes) -> Chunk {
    Chunk {
        start,
        json: lines_json(start, &bytes).into(),
        bytes,
        end: false,
    }
}

/// Reads lines of `task` from `pos` as `viewer`, up to the end of what
/// is stored or `until`: whole lines, in events. Returns the new
/// position, whether the end was reached, or the refusal.
async fn read_as(
    d: &Dashboard,
    viewer: &Viewer,
    peer: SocketAddr,
    task: &TaskId,
    mut pos: u64,
    until: Option<u64>,
    out: &mpsc::Sender<Event>,
) -> Result<(u64, bool), Failure> {
    loop {
        if until.is_some_and(|u| pos >= u) {
            return Ok((pos, false));
        }
        let max = until.map_or(CHUNK_BYTES, |u| (u - pos).min(CHUNK_BYTES));
        // A busy request path (many views catching up at once) is waited
        // out, not a reason to end the view: the browser would reconnect
        // and ask again anyway, at greater cost.
        let mut backoff = Duration::from_millis(20);
        let (body, raw) = loop {
            let asked = d
                .ask(
                    viewer,
                    peer,
                    Body::GetLog {
                        request: 0,
                        task: task.clone(),
                        offset: pos,
                        max,
                    },
                )
                .await;
            match asked {
                Err(AskError::Busy | AskError::Timeout) if backoff < Duration::from_secs(5) => {
                    tokio::time::sleep(backoff).await; // backoff before asking again, not synchronisation
                    backoff *= 2;
                }
                other => break other?,
            }
        };
        let Body::Data { eof, .. } = body else {
            return Err(Failure::new(
                StatusCode::BAD_GATEWAY,
                "unexpected answer to get_log",
            ));
        };
        let bytes = raw.unwrap_or_default();
        let n = whole_lines(&bytes);
        if n > 0 {
            if out.send(lines_event(pos, &bytes[..n])).await.is_err() {
                return Err(Failure::new(StatusCode::GONE, "the browser went"));
            }
            pos += n as u64;
        }
        if n == 0 || (eof && n == bytes.len()) {
            return Ok((pos, true));
        }
    }
}

/// Whether a live view goes on: its viewer is still signed in (told
/// `signed_out` otherwise) and its browser still reads.
async fn still_watching(d: &Dashboard, viewer: &Viewer, out: &mpsc::Sender<Event>) -> bool {
    if !d.still_valid(viewer) {
        let _ = out
            .send(
                Event::default()
                    .event("signed_out")
                    .data("your session ended"),
            )
            .await;
        return false;
    }
    !out.is_closed()
}

/// One browser's live view of a task's log.
pub struct LogStream {
    pub d: Arc<Dashboard>,
    pub viewer: Viewer,
    pub peer: SocketAddr,
    pub task: TaskId,
    pub run: RunId,
    /// The byte offset it starts from (a line start).
    pub from: u64,
    /// The task had ended when the view opened.
    pub ended: bool,
}

/// Streams `task`'s log from `from` to `out` as `viewer`: what is stored
/// first, then new lines as the hub reads them, until the task ended,
/// the browser went or the viewer's session ended.
pub async fn stream_log(view: LogStream, out: mpsc::Sender<Event>, _slot: Slot) {
    let LogStream {
        d,
        viewer,
        peer,
        task,
        run,
        from,
        ended,
    } = view;
    let Ok((mut pos, _)) = read_as(&d, &viewer, peer, &task, from, None, &out).await else {
        return;
    };
    if ended {
        let _ = out.send(Event::default().event("end").data("ended")).await;
        return;
    }
    let mut rx = Live::subscribe(&d, &task, &run, pos);
    let mut recheck = tokio::time::interval(RECHECK);
    loop {
        tokio::select! {
            chunk = rx.recv() => match chunk {
                Ok(c) => {
                    if c.start > pos {
                        // Lines between: read them as the viewer.
                        match read_as(&d, &viewer, peer, &task, pos, Some(c.start), &out).await {
                            Ok((p, _)) => pos = p,
                            Err(_) => return,
                        }
                    }
                    let end = c.start + c.bytes.len() as u64;
                    if end > pos && c.start <= pos {
                        let event = if c.start == pos {
                            // The usual case: the hub's encoding, as is.
                            Event::default().id(end.to_string()).event("lines").data(&*c.json)
                        } else {
                            lines_event(pos, &c.bytes[(pos - c.start) as usize..])
                        };
                        if out.send(event).await.is_err() {
                            return;
                        }
                        pos = end;
                    }
                    if c.end {
                        if !d.still_valid(&viewer) {
                            return;
                        }
                        let _ = read_as(&d, &viewer, peer, &task, pos, None, &out).await;
                        let _ = out.send(Event::default().event("end").data("ended")).await;
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    match read_as(&d, &viewer, peer, &task, pos, None, &out).await {
                        Ok((p, _)) => pos = p,
                        Err(_) => return,
                    }
                }
                Err(broadcast::error::RecvError::Closed) => {
                    // The hub went (the server stops, or it gave up): read
                    // what is left, then end; the browser reconnects.
                    let _ = read_as(&d, &viewer, peer, &task, pos, None, &out).await;
                    return;
                }
            },
            _ = recheck.tick() => {
                if !still_watching(&d, &viewer, &out).await {
                    return;
                }
            }
        }
    }
}

/// Streams `run`'s progress events from index `from` as `viewer`, until
/// the testrun ended, the browser went or the session ended.
pub async fn stream_progress(
    d: Arc<Dashboard>,
    viewer: Viewer,
    peer: SocketAddr,
    run: RunId,
    mut from: u64,
    out: mpsc::Sender<Event>,
    _slot: Slot,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut recheck = tokio::time::interval(RECHECK);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let events = match d.ask(&viewer, peer, Body::GetEvents { request: 0, run: run.clone(), from }).await {
                    Ok((Body::Events { events, .. }, _)) => events,
                    Ok(_) => return,
                    Err(AskError::Busy | AskError::Timeout) => continue,
                    Err(_) => return,
                };
                for e in events {
                    from = e.index + 1;
                    let last = matches!(e.state, ProgressState::RunFinished | ProgressState::RunCancelled);
                    let data = serde_json::to_string(&e).unwrap_or_default();
                    if out.send(Event::default().id(from.to_string()).event("progress").data(data)).await.is_err() {
                        return;
                    }
                    if last {
                        let _ = out.send(Event::default().event("end").data("ended")).await;
                        return;
                    }
                }
            }
            _ = recheck.tick() => {
                if !still_watching(&d, &viewer, &out).await {
                    return;
                }
            }
        }
    }
}
