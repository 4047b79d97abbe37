//! Slow work off the event loops: a named thread that takes jobs from a
//! channel in order and hands back what each produced. The file desk, the
//! worker's result file reader and the server's handshakes run this way,
//! so a disk or a key exchange never holds up a loop.

use tokio::sync::mpsc;

/// Spawns thread `name` running `handle` on each job until the job
/// channel closes or nobody takes the results any more. Unbounded
/// channels: each caller bounds what it hands out (credit, read-ahead,
/// handshakes waiting).
pub fn spawn<J, D>(
    name: &str,
    mut handle: impl FnMut(J) -> Option<D> + Send + 'static,
) -> (mpsc::UnboundedSender<J>, mpsc::UnboundedReceiver<D>)
where
    J: Send + 'static,
    D: Send + 'static,
{
    let (jobs_tx, mut jobs_rx) = mpsc::unbounded_channel::<J>();
    let (done_tx, done_rx) = mpsc::unbounded_channel::<D>();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Some(job) = jobs_rx.blocking_recv() {
                if let Some(done) = handle(job) {
                    if done_tx.send(done).is_err() {
                        return;
                    }
                }
            }
        })
        .unwrap_or_else(|e| panic!("cannot spawn the {name} thread: {e}"));
    (jobs_tx, done_rx)
}
