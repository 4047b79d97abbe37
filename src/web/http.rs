//! The dashboard's listener: HTTP/1.1 (hyper) over TCP or TLS (rustls),
//! with connections shared out by [`super::door`], deadlines for a
//! request's headers, its body and a TLS handshake, and the connection's
//! address handed to the handlers (for the audit log and the
//! trusted-proxy check).

use super::door::{Door, Occupant};
use super::{Counters, Dashboard, WebError};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tracing::{debug, warn};

pub use super::door::MAX_CONNECTIONS;
/// A request's headers must arrive within this (slowloris).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's body must arrive within this after its headers (a body
/// sent a byte at a time holds its connection no longer).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A TLS handshake must complete within this.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of a request's head (request line and headers), at most.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The address of the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// Who the request's session (or trusted proxy) says it is, looked up
/// once as the request arrives: the connection is shared out by it
/// ([`super::door`]) and the handlers' extractors take it from here.
#[derive(Clone, Debug)]
pub struct Seen(pub Option<super::sessions::Viewer>);

/// Reads the certificate chain and private key (PEM).
pub fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, WebError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |path: &Path, reason: String| WebError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls(cert, format!("cannot read the certificate chain: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls(cert, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(tls(cert, "holds no PEM certificate".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls(key, format!("no PEM private key read: {e}")))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, private)
        .map_err(|e| tls(key, format!("the key does not fit the certificate: {e}")))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A request body that must arrive by a deadline: past it, reading it
/// fails (the handler answers 400 and the connection closes).
pub struct DeadlineBody {
    inner: hyper::body::Incoming,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
}

impl http_body::Body for DeadlineBody {
    type Data = bytes::Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = &mut *self;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            )
            .into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts connections until the listener fails; each is served in a
/// task of its own, if [`super::door`] lets it in.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    dashboard: Arc<Dashboard>,
) {
    let exempt = match dashboard.proxy_user_header {
        Some(_) => dashboard.trusted_proxies.clone(),
        None => Vec::new(),
    };
    let door = Door::new(exempt);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // The serving loop ended (stepped down, stopped): so does the
            // listener.
            () = dashboard.asker.closed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: wait a little, go on.
                warn!(error = %e, "web dashboard: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await; // backoff after a failed accept, not synchronisation
                continue;
            }
        };
        let (ticket, ended, evicted) = match door.admit(peer.ip()) {
            Ok(t) => t,
            Err(_) => {
                Counters::bump(&dashboard.counters.connections_refused);
                drop(stream);
                continue;
            }
        };
        for _ in 0..evicted {
            Counters::bump(&dashboard.counters.connections_ended);
        }
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let (d, door) = (dashboard.clone(), door.clone());
        tokio::spawn(async move {
            let id = ticket.id;
            let _ticket = ticket;
            let service = app.map_request(move |req: hyper::Request<hyper::body::Incoming>| {
                // A request that carries a session makes its connection
                // that user's (see `door`).
                let seen = d.viewer(req.headers(), peer);
                if let Some(v) = &seen {
                    door.sign_in(
                        id,
                        Occupant {
                            user: v.label(),
                            submit: v.is_submit(),
                        },
                    );
                }
                let (parts, body) = req.into_parts();
                let mut req = hyper::Request::from_parts(
                    parts,
                    DeadlineBody {
                        inner: body,
                        deadline: Box::pin(tokio::time::sleep(BODY_TIMEOUT)),
                    },
                );
                req.extensions_mut().insert(PeerAddr(peer));
                req.extensions_mut().insert(Seen(seen));
                req
            });
            let service = TowerToHyperService::new(service);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_header_size(MAX_HEAD_BYTES)
                .max_buf_size(MAX_HEAD_BYTES);
            let served = async {
                match tls {
                    None => Some(http.serve_connection(TokioIo::new(stream), service).await),
                    Some(tls) => {
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.accept(stream)).await
                        {
                            Ok(Ok(stream)) => {
                                Some(http.serve_connection(TokioIo::new(stream), service).await)
                            }
                            Ok(Err(e)) => {
                                debug!(%peer, error = %e, "web dashboard: TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                debug!(%peer, "web dashboard: TLS handshake timed out");
                                None
                            }
                        }
                    }
                }
            };
            // Ended for a newcomer: dropping the connection closes it.
            let served = tokio::select! {
                s = served => s,
                _ = ended => None,
            };
            if let Some(Err(e)) = served {
                debug!(%peer, error = %e, "web dashboard connection ended with an error");
            }
        });
    }
}
