//! Downloads: a task's log, result and input files, streamed from the
//! scheduler's file desk in ranges.

use super::bridge::AskError;
use super::Failure;
use crate::protocol::limits::MAX_READ_BYTES;
use crate::protocol::{Body, ErrorCode};
use crate::web::extract::{page_error, run_of_task, unexpected, Page, D};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use std::time::Duration;

/// Streams a result file (read in chunks through the request path).
pub(super) async fn download(
    State(d): D,
    Page(v, peer): Page,
    Path((task, name)): Path<(String, String)>,
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
    let read = {
        let (d, v, task, name) = (d.clone(), v.clone(), task.clone(), name.clone());
        move |offset: u64| {
            let (d, v, task, name) = (d.clone(), v.clone(), task.clone(), name.clone());
            async move {
                // The server answers at most 16 file reads at once
                // (`limit_reached` past it): wait a little and ask again
                // rather than break the download.
                let mut backoff = Duration::from_millis(20);
                loop {
                    let asked = d
                        .ask(
                            &v,
                            peer,
                            Body::GetFile {
                                request: 0,
                                task: task.clone(),
                                name: name.clone(),
                                offset,
                                max: MAX_READ_BYTES,
                            },
                        )
                        .await;
                    match asked {
                        Ok((Body::Data { eof, .. }, raw)) => {
                            return Ok((raw.unwrap_or_default(), eof))
                        }
                        Ok((other, _)) => return Err(unexpected("get_file", &other)),
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
    let file = name.rsplit('/').next().unwrap_or("result");
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
    let disposition = format!("attachment; filename=\"{safe}\"");
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
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
