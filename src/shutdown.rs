//! How the binaries learn that they should stop: SIGTERM (systemd, kill) or
//! SIGINT (Ctrl-C), whichever comes first.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves when SIGTERM or SIGINT arrives.
pub async fn requested() {
    // Installing a handler fails only if the runtime has no signal driver,
    // which a tokio main always has.
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
