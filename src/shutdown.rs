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

/// What a server or a worker is asked to do about stopping: one type for
/// both, carried in a `tokio::sync::watch` from the binary's signal
/// handling (or an embedding lab) into the serving loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    /// Keep serving.
    #[default]
    Run,
    /// Stop in order: a server announces its shutdown; a worker takes no
    /// new task and ends its running one as `stop_policy` says.
    Gracefully,
    /// Stop at once (a second SIGTERM/SIGINT): a worker stops its task.
    Now,
}

impl Stop {
    /// What one more stop request makes of this one.
    pub fn escalate(self) -> Stop {
        match self {
            Stop::Run => Stop::Gracefully,
            Stop::Gracefully | Stop::Now => Stop::Now,
        }
    }
}
