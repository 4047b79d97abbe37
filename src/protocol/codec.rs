//! Frames ↔ messages. This is the one place bytes become typed messages, so
//! a later authenticated-encryption layer wraps exactly these two functions.

pub use crate::protocol::envelope::{Envelope, ProtocolError};
use crate::protocol::message::{Body, Header};
use crate::protocol::PROTOCOL_VERSION;
use bytes::Bytes;
use serde::Deserialize;

/// Largest header frame accepted.
pub const MAX_HEADER_BYTES: usize = 4 * 1024;
/// Largest body frame accepted (a log batch or a status reply).
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Largest raw frame accepted (one file chunk).
pub const MAX_RAW_BYTES: usize = 4 * 1024 * 1024;

/// Reads a `request` key out of a body map that did not decode as a whole.
#[derive(Deserialize)]
struct RequestProbe {
    #[serde(default)]
    request: Option<u64>,
}

/// Encodes header and body (and the raw frame, if any) as frames.
pub fn encode(header: &Header, body: &Body, raw: Option<Bytes>) -> Vec<Bytes> {
    // Serialising our own plain structs into a Vec cannot fail.
    let h = rmp_serde::to_vec_named(header).expect("header serialises");
    let b = rmp_serde::to_vec_named(body).expect("body serialises");
    let mut frames = vec![Bytes::from(h), Bytes::from(b)];
    if let Some(raw) = raw {
        frames.push(raw);
    }
    frames
}

#[derive(Deserialize)]
struct VersionProbe {
    v: u8,
}

/// The wire form of a `log` body, for decoding it without buffering.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogWire {
    #[serde(rename = "type")]
    kind: String,
    task: crate::protocol::TaskId,
    attempt: u32,
    lines: Vec<crate::protocol::LogLine>,
}

fn check_size(what: &'static str, frame: &Bytes, limit: usize) -> Result<(), ProtocolError> {
    if frame.len() > limit {
        return Err(ProtocolError::TooLarge {
            what,
            request: None,
            size: frame.len(),
            limit,
        });
    }
    Ok(())
}

/// Decodes frames into an [`Envelope`], checking version, sizes and that
/// the body travels in its class.
pub fn decode(frames: Vec<Bytes>) -> Result<Envelope, ProtocolError> {
    if !(2..=3).contains(&frames.len()) {
        return Err(ProtocolError::FrameCount(frames.len()));
    }
    let mut frames = frames.into_iter();
    let (h, b, raw) = (
        frames.next().unwrap(),
        frames.next().unwrap(),
        frames.next(),
    );
    // The body's request id, for refusals that come before the body is
    // decoded (the sender is told which request failed, PROTOCOL §3.3).
    let request_of = |b: &Bytes| {
        (b.len() <= MAX_BODY_BYTES)
            .then(|| rmp_serde::from_slice::<RequestProbe>(b).ok())
            .flatten()
            .and_then(|p| p.request)
    };
    if let Err(ProtocolError::TooLarge {
        what, size, limit, ..
    }) = check_size("header", &h, MAX_HEADER_BYTES)
    {
        return Err(ProtocolError::TooLarge {
            what,
            size,
            limit,
            request: request_of(&b),
        });
    }
    // Check the version before the rest, so a newer peer whose header grew
    // fields we do not know still gets the precise answer.
    let probe: VersionProbe = rmp_serde::from_slice(&h).map_err(|e| ProtocolError::BadHeader {
        reason: e.to_string(),
        request: request_of(&b),
    })?;
    if probe.v != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion {
            version: probe.v,
            request: request_of(&b),
        });
    }
    let header: Header = rmp_serde::from_slice(&h).map_err(|e| ProtocolError::BadHeader {
        reason: e.to_string(),
        request: request_of(&b),
    })?;
    check_size("body", &b, MAX_BODY_BYTES)?;
    let seq = header.mandatory.then_some(header.seq);
    let bad_body = |e: rmp_serde::decode::Error| ProtocolError::BadBody {
        reason: e.to_string(),
        request: rmp_serde::from_slice::<RequestProbe>(&b)
            .ok()
            .and_then(|p| p.request),
        seq,
    };
    let body = match header.class {
        // The hot path: a tagged enum is decoded through a buffered copy of
        // the whole map; a log batch is decoded straight into its fields.
        crate::protocol::Class::Log => match rmp_serde::from_slice::<LogWire>(&b) {
            Ok(w) if w.kind == "log" => Body::Log {
                task: w.task,
                attempt: w.attempt,
                lines: w.lines,
            },
            _ => rmp_serde::from_slice(&b).map_err(bad_body)?,
        },
        _ => rmp_serde::from_slice(&b).map_err(bad_body)?,
    };
    if body.class() != header.class {
        return Err(ProtocolError::ClassMismatch {
            header: header.class,
            body: body.class(),
            kind: body.kind(),
            request: body.request(),
            seq,
        });
    }
    if let Some(raw) = &raw {
        check_size("raw", raw, MAX_RAW_BYTES)?;
        if !matches!(
            body,
            Body::FileChunk { .. }
                | Body::InputChunk { .. }
                | Body::Data { .. }
                | Body::LogPacked { .. }
                | Body::LogLinesPacked { .. }
                | Body::ConsoleInput { .. }
                | Body::ConsoleOutput { .. }
                | Body::ConsoleData { .. }
                | Body::LeaseInput { .. }
        ) {
            return Err(ProtocolError::UnexpectedRaw {
                kind: body.kind(),
                request: body.request(),
                seq,
            });
        }
    }
    let env = Envelope { header, body, raw };
    crate::protocol::check::check(&env).map_err(|e| match e {
        ProtocolError::Invalid {
            kind,
            field,
            reason,
            ..
        } => ProtocolError::Invalid {
            kind,
            field,
            reason,
            request: env.body.request(),
            seq,
        },
        other => other,
    })?;
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Class, ErrorCode};

    fn header(class: Class) -> Header {
        Header {
            v: PROTOCOL_VERSION,
            class,
            mandatory: true,
            seq: 7,
            task: Some("r.1".into()),
            epoch: None,
        }
    }

    #[test]
    fn round_trip_keeps_header_body_and_raw() {
        let body = Body::FileChunk {
            task: "r.1".into(),
            attempt: 1,
            name: "a.xml".into(),
            offset: 0,
        };
        let mut h = header(Class::File);
        h.mandatory = false;
        let frames = encode(&h, &body, Some(Bytes::from_static(b"abc")));
        let env = decode(frames).unwrap();
        assert_eq!(env.body, body);
        assert_eq!(env.header.seq, 7);
        assert_eq!(env.raw.as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn garbage_and_wrong_versions_are_typed_errors() {
        let e = decode(vec![Bytes::from_static(b"\xc1"), Bytes::new()]).unwrap_err();
        assert!(matches!(e, ProtocolError::BadHeader { .. }));
        assert_eq!(e.code(), ErrorCode::Malformed);

        let mut h = header(Class::Control);
        h.v = 9;
        let frames = encode(&h, &Body::Ready, None);
        let e = decode(frames).unwrap_err();
        assert_eq!(
            e,
            ProtocolError::UnsupportedVersion {
                version: 9,
                request: None
            }
        );
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);

        assert_eq!(decode(vec![]).unwrap_err(), ProtocolError::FrameCount(0));
        let frames = encode(&header(Class::Log), &Body::Ready, None);
        assert!(matches!(
            decode(frames),
            Err(ProtocolError::ClassMismatch { .. })
        ));
        let frames = encode(
            &header(Class::Control),
            &Body::Ready,
            Some(Bytes::from_static(b"x")),
        );
        assert_eq!(
            decode(frames).unwrap_err(),
            ProtocolError::UnexpectedRaw {
                kind: "ready",
                request: None,
                seq: Some(7)
            }
        );
        // A client request refused for its class or a raw frame, a wrong
        // version or an oversized header: the reply names the request.
        let ping = Body::Ping { request: 42 };
        let e = decode(encode(&header(Class::Log), &ping, None)).unwrap_err();
        assert_eq!(e.request(), Some(42), "{e}");
        let e = decode(encode(
            &header(Class::Control),
            &ping,
            Some(Bytes::from_static(b"x")),
        ))
        .unwrap_err();
        assert_eq!(e.request(), Some(42), "{e}");
        let mut h = header(Class::Control);
        h.v = 9;
        assert_eq!(
            decode(encode(&h, &ping, None)).unwrap_err().request(),
            Some(42)
        );
        let mut frames = encode(&header(Class::Control), &ping, None);
        frames[0] = Bytes::from(vec![0u8; MAX_HEADER_BYTES + 1]);
        assert_eq!(decode(frames).unwrap_err().request(), Some(42));
    }

    #[test]
    fn log_batches_decode_on_the_fast_path_like_any_body() {
        let body = Body::Log {
            task: "r.1".into(),
            attempt: 2,
            lines: vec![crate::protocol::LogLine {
                seq: 1,
                stream: crate::protocol::Stream::Stdout,
                text: "x".into(),
            }],
        };
        let mut h = header(Class::Log);
        h.mandatory = false;
        assert_eq!(decode(encode(&h, &body, None)).unwrap().body, body);
        let lines = Body::LogLines {
            run: "r".into(),
            task: "r.1".into(),
            lines: vec![],
        };
        assert_eq!(decode(encode(&h, &lines, None)).unwrap().body, lines);
    }

    #[test]
    fn oversized_frames_are_refused_before_decoding() {
        let mut frames = encode(&header(Class::Control), &Body::Ready, None);
        frames[1] = Bytes::from(vec![0u8; MAX_BODY_BYTES + 1]);
        assert!(matches!(
            decode(frames),
            Err(ProtocolError::TooLarge { what: "body", .. })
        ));
    }

    #[test]
    fn unknown_body_type_is_malformed_not_a_panic() {
        let h = rmp_serde::to_vec_named(&header(Class::Control)).unwrap();
        let mut map = std::collections::BTreeMap::new();
        map.insert("type", "launch_missiles");
        let b = rmp_serde::to_vec_named(&map).unwrap();
        let e = decode(vec![h.into(), b.into()]).unwrap_err();
        assert!(matches!(e, ProtocolError::BadBody { .. }));
    }
}
