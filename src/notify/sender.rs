//! The sender: makes the attempts the outbox hands out, off the serving
//! loop, and reports each result back. One tokio task per attempt, each
//! under its target's timeout; how many run at once is bounded by the
//! outbox (each lane's concurrency), so the channels carry at most that
//! many jobs.
//!
//! Webhooks are POSTed with hyper's HTTP/1.1 client over TCP or
//! tokio-rustls (no redirects followed: a redirect is a permanent failure,
//! as the outbox classifies 3xx), signed per attempt (`webhook-timestamp`
//! is the attempt's time). A per-run URL's addresses are resolved and
//! checked at each attempt. Mail goes through lettre (SMTP relay with
//! STARTTLS or TLS, or a sendmail binary).

use super::config::{MailTls, NotifyConfig, NotifyConfigError};
use super::delivery::Attempt;
use super::outbox::{Done, Job, Recipient};
use super::signature::SigningKey;
use super::urls::{self, Target};
use bytes::Bytes;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSendmailTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, warn};

/// Bytes of an answer's headers we read at most (the body is not read).
const MAX_ANSWER_HEADERS: usize = 16 * 1024;
/// The deadline of a per-run URL's attempt.
const URL_TIMEOUT: Duration = Duration::from_secs(10);

struct Webhook {
    target: Target,
    key: SigningKey,
    timeout: Duration,
    tls: tokio_rustls::TlsConnector,
}

enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Sendmail(AsyncSendmailTransport<Tokio1Executor>),
}

struct Mail {
    transport: Transport,
    from: lettre::message::Mailbox,
    timeout: Duration,
}

/// What the sender holds: each target's address, key and transport.
pub struct Sender {
    webhooks: HashMap<String, Webhook>,
    mails: HashMap<String, Mail>,
    url_key: Option<SigningKey>,
    url_tls: tokio_rustls::TlsConnector,
    allow_private: bool,
}

/// A TLS client verifying against Mozilla's roots, or only the CA
/// certificates of `ca_file` (a lab's own CA): for webhooks here, and for
/// PostgreSQL ([`crate::server::store::pg`]). Errors say what is wrong with the
/// file; the caller names the setting.
pub fn client_tls_config(
    ca_file: Option<&Path>,
) -> Result<tokio_rustls::rustls::ClientConfig, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    match ca_file {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(path) => {
            let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
                .map_err(|e| format!("cannot be read as PEM: {e}"))?;
            for c in certs {
                let c = c.map_err(|e| format!("holds a certificate that cannot be read: {e}"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("holds a certificate that is not a CA: {e}"))?;
            }
            if roots.is_empty() {
                return Err("holds no certificate".into());
            }
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(
        tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, String> {
    client_tls_config(ca_file).map(|cfg| tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

fn read_key(
    kind: &'static str,
    name: &str,
    key: &'static str,
    path: &Path,
) -> Result<SigningKey, NotifyConfigError> {
    let file = |reason: String| NotifyConfigError::File {
        kind,
        name: name.to_string(),
        key,
        path: path.to_path_buf(),
        reason,
    };
    let content = std::fs::read(path).map_err(|e| file(format!("cannot be read: {e}")))?;
    warn_if_shared(kind, name, key, path);
    SigningKey::from_file_content(&content).map_err(|e| file(e.to_string()))
}

/// A secret others on the machine can read lets them forge notifications
/// (or, for credentials, send mail as the server): said at every start.
fn warn_if_shared(kind: &str, name: &str, key: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            warn!(target_kind = kind, target = name, key, path = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777), "notification secret file is readable by other users: chmod 600 it (owned by the server's user)");
        }
    }
}

impl Sender {
    /// Reads every target's secret, credentials and CA file: a start
    /// with one missing names it.
    pub fn from_config(cfg: &NotifyConfig) -> Result<Sender, NotifyConfigError> {
        let mut webhooks = HashMap::new();
        for w in &cfg.webhook {
            let key = read_key("webhook", &w.name, "secret_file", &w.secret_file)?;
            let tls =
                tls_connector(w.ca_file.as_deref()).map_err(|reason| NotifyConfigError::File {
                    kind: "webhook",
                    name: w.name.clone(),
                    key: "ca_file",
                    path: w.ca_file.clone().unwrap_or_default(),
                    reason,
                })?;
            let target = urls::parse(&w.url).map_err(|reason| NotifyConfigError::Target {
                kind: "webhook",
                name: w.name.clone(),
                key: "url",
                reason,
            })?;
            webhooks.insert(
                w.name.clone(),
                Webhook {
                    target,
                    key,
                    timeout: Duration::from_millis(w.timeout_ms),
                    tls,
                },
            );
        }
        let mut mails = HashMap::new();
        for m in &cfg.mail {
            let bad = |key, reason: String| NotifyConfigError::Target {
                kind: "mail",
                name: m.name.clone(),
                key,
                reason,
            };
            let timeout = Duration::from_millis(m.timeout_ms);
            let transport = match &m.sendmail {
                Some(path) => {
                    if !path.is_file() {
                        return Err(NotifyConfigError::File {
                            kind: "mail",
                            name: m.name.clone(),
                            key: "sendmail",
                            path: path.clone(),
                            reason: "is not a file (install a sendmail, or use smtp)".into(),
                        });
                    }
                    Transport::Sendmail(AsyncSendmailTransport::<Tokio1Executor>::new_with_command(
                        path,
                    ))
                }
                None => {
                    let (host, port) = m.smtp.rsplit_once(':').unwrap_or((&m.smtp, "25"));
                    let port: u16 = port
                        .parse()
                        .map_err(|_| bad("smtp", format!("= {:?} must be HOST:PORT", m.smtp)))?;
                    let builder = match m.tls {
                        MailTls::Starttls => {
                            AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(host)
                                .map_err(|e| bad("smtp", e.to_string()))?
                        }
                        MailTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(host)
                            .map_err(|e| bad("smtp", e.to_string()))?,
                        MailTls::None => {
                            AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
                        }
                    };
                    let mut builder = builder.port(port).timeout(Some(timeout));
                    if let Some(path) = &m.credentials_file {
                        let file = |reason: String| NotifyConfigError::File {
                            kind: "mail",
                            name: m.name.clone(),
                            key: "credentials_file",
                            path: path.clone(),
                            reason,
                        };
                        let text = std::fs::read_to_string(path)
                            .map_err(|e| file(format!("cannot be read: {e}")))?;
                        warn_if_shared("mail", &m.name, "credentials_file", path);
                        let mut lines = text.lines();
                        match (lines.next(), lines.next()) {
                            (Some(u), Some(p)) if !u.is_empty() => {
                                builder = builder.credentials(Credentials::new(u.into(), p.into()))
                            }
                            _ => {
                                return Err(file(
                                    "must hold two lines: the user name, then the password".into(),
                                ))
                            }
                        }
                    }
                    Transport::Smtp(builder.build())
                }
            };
            let from = m.from.parse().map_err(|e| {
                bad(
                    "from",
                    format!("= {:?} is not a mail address ({e})", m.from),
                )
            })?;
            mails.insert(
                m.name.clone(),
                Mail {
                    transport,
                    from,
                    timeout,
                },
            );
        }
        let url_key = match &cfg.url_secret_file {
            None => None,
            // A setting of `[notify]` itself, not of a target section.
            Some(path) => Some(
                read_key("url", "allow_urls", "url_secret_file", path).map_err(|e| match e {
                    NotifyConfigError::File { path, reason, .. } => {
                        NotifyConfigError::SettingFile {
                            key: "url_secret_file",
                            path,
                            reason,
                        }
                    }
                    other => other,
                })?,
            ),
        };
        Ok(Sender {
            webhooks,
            mails,
            url_key,
            url_tls: tls_connector(None).expect("the built-in roots make a TLS configuration"),
            allow_private: cfg.allow_private_addresses,
        })
    }

    /// Starts the sender: jobs in, results out.
    pub fn spawn(self) -> (mpsc::UnboundedSender<Job>, mpsc::UnboundedReceiver<Done>) {
        let (jobs_tx, mut jobs) = mpsc::unbounded_channel::<Job>();
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        let sender = Arc::new(self);
        tokio::spawn(async move {
            while let Some(job) = jobs.recv().await {
                let s = sender.clone();
                let done = done_tx.clone();
                let (id, attempt) = (job.id.clone(), job.attempt);
                let work = tokio::spawn(async move { s.attempt(&job).await });
                tokio::spawn(async move {
                    // A panic in an attempt is a failed attempt, logged;
                    // the delivery is tried again, never left "sending".
                    let result = match work.await {
                        Ok(r) => r,
                        Err(e) => {
                            error!(id = %id, error = %e, "notification attempt panicked; it will be tried again");
                            Attempt::Transport(format!("internal error in the sender: {e}"))
                        }
                    };
                    let _ = done.send(Done {
                        id,
                        attempt,
                        result,
                    });
                });
            }
        });
        (jobs_tx, done_rx)
    }

    async fn attempt(&self, job: &Job) -> Attempt {
        match &job.recipient {
            Recipient::Webhook => {
                let Some(w) = self.webhooks.get(&job.lane) else {
                    return Attempt::Rejected(format!(
                        "no webhook target {} in the configuration any more",
                        job.lane
                    ));
                };
                let attempt = post(&w.target, &w.tls, false, &w.key, job);
                tokio::time::timeout(w.timeout, attempt)
                    .await
                    .unwrap_or(Attempt::Timeout)
            }
            Recipient::Url { url } => {
                let Some(key) = &self.url_key else {
                    return Attempt::Rejected(
                        "per-run URLs are no longer allowed (notify.url_secret_file is not set)"
                            .into(),
                    );
                };
                let target = match urls::parse(url) {
                    Ok(t) => t,
                    Err(why) => return Attempt::Rejected(format!("the URL {why}")),
                };
                let attempt = post(&target, &self.url_tls, !self.allow_private, key, job);
                tokio::time::timeout(URL_TIMEOUT, attempt)
                    .await
                    .unwrap_or(Attempt::Timeout)
            }
            Recipient::Mail { address } => {
                let Some(m) = self.mails.get(&job.lane) else {
                    return Attempt::Rejected(format!(
                        "no mail target {} in the configuration any more",
                        job.lane
                    ));
                };
                let to = match address.parse() {
                    Ok(a) => a,
                    Err(e) => {
                        return Attempt::Rejected(format!(
                            "{address:?} is not a mail address ({e})"
                        ))
                    }
                };
                let (subject, text) = super::mail::render(&job.body);
                let message = Message::builder()
                    .from(m.from.clone())
                    .to(to)
                    .subject(subject)
                    // Stable per delivery: a mail client can tell a
                    // repeated attempt from a new notification.
                    .message_id(Some(format!("<{}@ots>", job.id)))
                    .header(ContentType::TEXT_PLAIN)
                    .body(text);
                let message = match message {
                    Ok(msg) => msg,
                    Err(e) => return Attempt::Rejected(format!("cannot make the mail: {e}")),
                };
                let sent = async {
                    match &m.transport {
                        Transport::Smtp(t) => match t.send(message).await {
                            Ok(r) => Attempt::Accepted(format!(
                                "{} {}",
                                r.code(),
                                r.message().next().unwrap_or("accepted")
                            )),
                            Err(e) if e.is_permanent() => Attempt::Rejected(e.to_string()),
                            Err(e) if e.is_timeout() => Attempt::Timeout,
                            Err(e) => Attempt::Transport(e.to_string()),
                        },
                        Transport::Sendmail(t) => match t.send(message).await {
                            Ok(()) => Attempt::Accepted("sendmail took it".into()),
                            Err(e) => Attempt::Transport(format!("sendmail: {e}")),
                        },
                    }
                };
                tokio::time::timeout(m.timeout, sent)
                    .await
                    .unwrap_or(Attempt::Timeout)
            }
        }
    }
}

/// One POST of a job's body to `target`, signed with `key`.
async fn post(
    target: &Target,
    tls: &tokio_rustls::TlsConnector,
    only_public: bool,
    key: &SigningKey,
    job: &Job,
) -> Attempt {
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
            Ok(a) => a.collect(),
            Err(e) => return Attempt::Transport(format!("cannot resolve {}: {e}", target.host)),
        };
    let addrs: Vec<_> = addrs
        .into_iter()
        .filter(|a| !only_public || urls::is_public(a.ip()))
        .take(4)
        .collect();
    if addrs.is_empty() {
        return Attempt::Rejected(format!(
            "{} resolves only to loopback, private or non-public addresses: refused (notify.allow_private_addresses)",
            target.host
        ));
    }
    let mut tcp = None;
    let mut why = String::new();
    for a in &addrs {
        match tokio::net::TcpStream::connect(a).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => why = format!("cannot connect to {a}: {e}"),
        }
    }
    let Some(tcp) = tcp else {
        return Attempt::Transport(why);
    };
    let _ = tcp.set_nodelay(true);
    let timestamp = crate::protocol::limits::unix_ms_now() / 1000;
    let body = Bytes::copy_from_slice(job.body.as_bytes());
    let default_port = if target.https { 443 } else { 80 };
    let host = if target.host.contains(':') {
        format!("[{}]", target.host)
    } else {
        target.host.clone()
    };
    let host_header = if target.port == default_port {
        host
    } else {
        format!("{host}:{}", target.port)
    };
    let request = hyper::Request::post(target.path.as_str())
        .header(hyper::header::HOST, host_header)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("ots/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", job.id.as_str())
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", key.sign(&job.id, timestamp, &body))
        .body(http_body_util::Full::new(body));
    let request = match request {
        Ok(r) => r,
        Err(e) => return Attempt::Rejected(format!("cannot make the request: {e}")),
    };
    if target.https {
        let name = match rustls_pki_types::ServerName::try_from(target.host.clone()) {
            Ok(n) => n,
            Err(e) => {
                return Attempt::Rejected(format!("{} is not a TLS server name: {e}", target.host))
            }
        };
        match tls.connect(name, tcp).await {
            Ok(s) => exchange(s, request).await,
            Err(e) => Attempt::Transport(format!("TLS with {}: {e}", target.host)),
        }
    } else {
        exchange(tcp, request).await
    }
}

async fn exchange<IO>(io: IO, request: hyper::Request<http_body_util::Full<Bytes>>) -> Attempt
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handshake = hyper::client::conn::http1::Builder::new()
        .max_buf_size(MAX_ANSWER_HEADERS.max(8192))
        .handshake(hyper_util::rt::TokioIo::new(io))
        .await;
    let (mut send, conn) = match handshake {
        Ok(x) => x,
        Err(e) => return Attempt::Transport(format!("HTTP: {e}")),
    };
    let driver = tokio::spawn(conn);
    let answer = send.send_request(request).await;
    driver.abort();
    match answer {
        Ok(response) => Attempt::Status(response.status().as_u16()),
        Err(e) => Attempt::Transport(format!("HTTP: {e}")),
    }
}
