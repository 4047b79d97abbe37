//! The dashboard's way into the scheduler: the same requests `ots-submit`
//! sends, asked on a bounded queue and handled by the serving loop in its
//! batches like any message, each on a connection of its own that carries
//! the signed-in user's identity. So every page sees exactly what the
//! `access` rules let that user see (PROTOCOL.md §15.5), and the
//! dashboard never touches the scheduler's state: the serving loop's side
//! of this queue is `server::bridge`.

use crate::protocol::{Body, ErrorCode};
use crate::security::Identity;
use bytes::Bytes;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// An answer: its body and raw frame.
pub type Answer = (Body, Option<Bytes>);

/// Requests waiting for the serving loop, at most; past it a page gets
/// 503 at once (counted) instead of queueing without bound.
pub const ASK_QUEUE: usize = 256;
/// A request not answered within this is given up (504).
pub const ASK_TIMEOUT: Duration = Duration::from_secs(10);

/// One request of the dashboard's.
pub struct Ask {
    pub identity: Option<Identity>,
    /// Where the browser is (`web:IP`), for the audit log.
    pub address: String,
    pub body: Body,
    /// The raw frame (console input).
    pub raw: Option<Bytes>,
    pub reply: oneshot::Sender<(Body, Option<Bytes>)>,
}

/// Why a request of the dashboard's got no answer it can show.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("the server is busy ({ASK_QUEUE} dashboard requests waiting); try again")]
    Busy,
    #[error("the server is stopping")]
    Stopped,
    #[error("the server did not answer within {ASK_TIMEOUT:?}")]
    Timeout,
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
}

/// The sending half, cloned into every handler.
#[derive(Clone)]
pub struct Asker {
    tx: mpsc::Sender<Ask>,
}

impl Asker {
    pub fn new() -> (Asker, mpsc::Receiver<Ask>) {
        let (tx, rx) = mpsc::channel(ASK_QUEUE);
        (Asker { tx }, rx)
    }

    /// Resolves when the serving loop stopped taking requests (it ended:
    /// the listener closes so that a server leading again can bind).
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Asks `body` as `identity`; the answer's body and raw frame, or the
    /// error the server answered with.
    pub async fn ask(
        &self,
        identity: Option<Identity>,
        address: String,
        body: Body,
    ) -> Result<(Body, Option<Bytes>), AskError> {
        self.ask_raw(identity, address, body, None).await
    }

    /// [`Self::ask`] with a raw frame.
    pub async fn ask_raw(
        &self,
        identity: Option<Identity>,
        address: String,
        body: Body,
        raw: Option<Bytes>,
    ) -> Result<(Body, Option<Bytes>), AskError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .try_send(Ask {
                identity,
                address,
                body,
                raw,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => AskError::Busy,
                mpsc::error::TrySendError::Closed(_) => AskError::Stopped,
            })?;
        match tokio::time::timeout(ASK_TIMEOUT, answer).await {
            Err(_) => Err(AskError::Timeout),
            Ok(Err(_)) => Err(AskError::Stopped),
            Ok(Ok((Body::Error { code, message, .. }, _))) => {
                Err(AskError::Refused { code, message })
            }
            Ok(Ok(answer)) => Ok(answer),
        }
    }
}
