//! Allow-lists that change while the server runs: read again on SIGHUP
//! and whenever a file in `workers_dir` or `users_dir` changes, off the
//! serving loop, which applies each [`Reload`] in one turn.

use crate::security::allow::fingerprint;
use crate::security::AllowList;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

/// A reloaded allow-list and the entries it denied (each naming its file).
pub(super) struct Reload {
    pub(super) list: AllowList,
    pub(super) denied: Vec<String>,
}

/// Reloads the allow-lists on SIGHUP and whenever a file in them changes
/// (checked every 250 ms, off the serving loop): a removed or changed key
/// takes effect within a second. Entries fail closed one by one (a bad
/// file denies its own identity, logged); a directory that cannot be
/// trusted adds no one, but removals from it still apply.
pub(super) fn watch_allow_lists(
    workers: PathBuf,
    users: PathBuf,
    mut last: crate::security::allow::Fingerprint,
    mut current: AllowList,
) -> mpsc::Receiver<Reload> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "cannot watch SIGHUP; allow-lists reload on file changes only");
                None
            }
        };
        // Told by the kernel when a file in either directory changes, the
        // server checks at once and re-reads everything only then; the
        // full check (a stat per file) also runs every few seconds in case
        // a change escaped the watch. Without inotify (a directory missing
        // at start, a filesystem without it), every 250 ms.
        let mut changes = watch_dirs(&[workers.clone(), users.clone()]);
        let every = if changes.is_some() {
            Duration::from_secs(5)
        } else {
            Duration::from_millis(250)
        };
        let mut tick = tokio::time::interval(every);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                event = async { changes.as_mut()?.recv().await }, if changes.is_some() => {
                    if event.is_none() {
                        // The watch ended: poll from now on.
                        changes = None;
                        tick = tokio::time::interval(Duration::from_millis(250));
                        continue;
                    }
                    // A burst of events (an editor's save, `echo > file`'s
                    // truncate and write) is one change: read it whole.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while changes.as_mut().is_some_and(|c| c.try_recv().is_ok()) {}
                    false
                }
                Some(()) = async { hup.as_mut()?.recv().await }, if hup.is_some() => true,
            };
            // The serving loop ended (stepped down, stopped): so does this.
            if tx.is_closed() {
                return;
            }
            let (w, u) = (workers.clone(), users.clone());
            let Ok(now) = tokio::task::spawn_blocking(move || fingerprint(&w, &u)).await else {
                continue;
            };
            if !forced && now == last {
                continue;
            }
            last = now;
            let (w, u) = (workers.clone(), users.clone());
            let Ok(list) = tokio::task::spawn_blocking(move || AllowList::load(&w, &u)).await
            else {
                continue;
            };
            match list {
                Ok(loaded) => {
                    let denied: Vec<String> = loaded.problems().map(|e| e.to_string()).collect();
                    for e in &denied {
                        error!(error = %e, "allow-list entry denied: {e}");
                    }
                    if !loaded.untrusted_dirs.is_empty() {
                        error!("an allow-list directory cannot be trusted: nobody new is admitted from it until it is fixed; removals still apply");
                    }
                    current = loaded.reloaded(&current);
                    let reload = Reload {
                        list: current.clone(),
                        denied,
                    };
                    if tx.send(reload).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    error!(error = %e, "allow-lists not reloaded: {e}; the previous lists stay in force — fix the directory")
                }
            }
        }
    });
    rx
}

/// Watches `dirs` with inotify on a thread of its own: one message per
/// batch of events. None if a directory cannot be watched (the caller
/// polls instead).
fn watch_dirs(dirs: &[PathBuf]) -> Option<mpsc::UnboundedReceiver<()>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    let inotify = Inotify::init(InitFlags::IN_CLOEXEC).ok()?;
    let flags = AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF;
    for dir in dirs {
        if let Err(e) = inotify.add_watch(dir, flags) {
            debug!(dir = %dir.display(), error = %e, "cannot watch the allow-list directory; polling it");
            return None;
        }
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let spawned = std::thread::Builder::new()
        .name("ots-allow-watch".into())
        .spawn(move || loop {
            match inotify.read_events() {
                Ok(_) => {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    warn!(error = %e, "the allow-list watch failed; changes are found by the periodic check");
                    return;
                }
            }
        });
    spawned.ok()?;
    Some(rx)
}
