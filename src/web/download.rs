//! Downloads: a task's log, result and input files, streamed from the
//! scheduler's file desk in ranges.

use super::bridge::AskError;
use super::Failure;
use crate::protocol::limits::MAX_READ_BYTES;
use crate::protocol::{Body, ErrorCode};
use crate::web::extract::{page_error, run_of_task, unexpected, Page, D};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::time::Duration;

/// `?view=1`: a result file shown in the browser as plain text.
#[derive(serde::Deserialize, Default)]
pub(super) struct ViewFile {
    #[serde(default)]
    view: Option<u8>,
}

/// Streams a result file (read in chunks through the request path); with
/// `?view=1` as `text/plain` to read in the browser (`nosniff` and the
/// page's CSP keep it text, whatever it holds).
pub(super) async fn download(
    State(d): D,
    Page(v, peer): Page,
    Path((task, name)): Path<(String, String)>,
    Query(q): Query<ViewFile>,
) -> Response {
    if let Err(e) = run_of_task(&task) {
        return page_error(&v, e);
    }
    if name.len() > 1024
        || name
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return page_error(
            &v,
            Failure::new(StatusCode::BAD_REQUEST, "bad result file name"),
        );
    }
    let file = name.rsplit('/').next().unwrap_or("result").to_string();
    let ask = move |offset: u64| Body::GetFile {
        request: 0,
        task: task.clone(),
        name: name.clone(),
        offset,
        max: MAX_READ_BYTES,
    };
    streamed(d, v, peer, ask, &file, q.view.is_some()).await
}

/// The whole log of a task as plain text, streamed.
pub(super) async fn raw_log(
    State(d): D,
    Page(v, peer): Page,
    Path(task): Path<String>,
) -> Response {
    if let Err(e) = run_of_task(&task) {
        return page_error(&v, e);
    }
    let file = format!("{task}.log");
    let ask = move |offset: u64| Body::GetLog {
        request: 0,
        task: task.clone(),
        offset,
        max: MAX_READ_BYTES,
    };
    streamed(d, v, peer, ask, &file, true).await
}

/// Streams what `ask(offset)` reads, chunk by chunk, as a download or
/// (`inline`) as plain text.
async fn streamed(
    d: std::sync::Arc<super::Dashboard>,
    v: super::sessions::Viewer,
    peer: std::net::SocketAddr,
    ask: impl Fn(u64) -> Body + Clone + Send + Sync + 'static,
    file: &str,
    inline: bool,
) -> Response {
    let read = {
        let (d, v) = (d.clone(), v.clone());
        move |offset: u64| {
            let (d, v, ask) = (d.clone(), v.clone(), ask.clone());
            async move {
                // The server answers at most 16 file reads at once
                // (`limit_reached` past it): wait a little and ask again
                // rather than break the download.
                let mut backoff = Duration::from_millis(20);
                loop {
                    let asked = d.ask(&v, peer, ask(offset)).await;
                    match asked {
                        Ok((Body::Data { eof, .. }, raw)) => {
                            return Ok((raw.unwrap_or_default(), eof))
                        }
                        Ok((other, _)) => return Err(unexpected("a read", &other)),
                        Err(AskError::Busy)
                        | Err(AskError::Refused {
                            code: ErrorCode::LimitReached,
                            ..
                        }) if backoff < Duration::from_secs(5) => {
                            tokio::time::sleep(backoff).await; // backoff before asking again, not synchronisation
                            backoff *= 2;
                        }
                        Err(e) => return Err(Failure::from(e)),
                    }
                }
            }
        }
    };
    // The first chunk here: a refusal is an error page, not a broken download.
    let (first, eof) = match read(0).await {
        Ok(r) => r,
        Err(e) => return page_error(&v, e),
    };
    let stream = futures::stream::unfold((Some(first), eof, 0u64), move |(chunk, eof, offset)| {
        let read = read.clone();
        async move {
            if let Some(c) = chunk {
                let next = offset + c.len() as u64;
                return Some((Ok::<Bytes, std::io::Error>(c), (None, eof, next)));
            }
            if eof {
                return None;
            }
            match read(offset).await {
                Ok((c, eof)) if !c.is_empty() => {
                    let next = offset + c.len() as u64;
                    Some((Ok(c), (None, eof, next)))
                }
                Ok(_) => None,
                Err(f) => Some((Err(std::io::Error::other(f.message)), (None, true, offset))),
            }
        }
    });
    let safe: String = file
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (kind, how) = if inline {
        ("text/plain; charset=utf-8", "inline")
    } else {
        ("application/octet-stream", "attachment")
    };
    let disposition = format!("{how}; filename=\"{safe}\"");
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or(HeaderValue::from_static("attachment")),
            ),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}
