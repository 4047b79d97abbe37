//! Every value from a peer checked against its limit ([`super::limits`])
//! when it arrives, before any of it is used. A value outside its limit
//! is refused with [`ProtocolError::Invalid`], which names the message,
//! the field and the limit, so the sender (and its operator) can tell
//! exactly what was wrong.

use crate::protocol::envelope::{Envelope, ProtocolError};
use crate::protocol::limits::*;
use crate::protocol::logtext;
use crate::protocol::message::*;
use crate::protocol::DeviceProps;

fn invalid(kind: &'static str, field: &'static str, reason: String) -> ProtocolError {
    ProtocolError::Invalid {
        kind,
        field,
        reason,
        request: None,
        seq: None,
    }
}

/// Checks an identifier field.
pub fn check_id(kind: &'static str, field: &'static str, s: &str) -> Result<(), ProtocolError> {
    if is_safe_id(s) {
        Ok(())
    } else {
        Err(invalid(
            kind,
            field,
            format!(
                "{:?} must be 1–{MAX_ID_BYTES} bytes of A–Z a–z 0–9 . _ - and not start with . or -",
                clip(s)
            ),
        ))
    }
}

/// Checks a result file name: a relative path of safe parts (no `..`, `.`,
/// empty parts, backslashes or control characters).
pub fn check_file_name(kind: &'static str, name: &str) -> Result<(), ProtocolError> {
    let bad = |why: &str| {
        Err(invalid(
            kind,
            "name",
            format!("result file name {:?} {why}", clip(name)),
        ))
    };
    if name.is_empty() || name.len() > MAX_FILE_NAME_BYTES {
        return bad(&format!("must be 1–{MAX_FILE_NAME_BYTES} bytes"));
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return bad("contains a control character or a backslash");
    }
    if name.starts_with('/') {
        return bad("is absolute; names are relative to the task's result folder");
    }
    for part in name.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return bad("has an empty, `.` or `..` part");
        }
        if part.len() > MAX_FILE_NAME_PART_BYTES {
            return bad(&format!(
                "has a part longer than {MAX_FILE_NAME_PART_BYTES} bytes"
            ));
        }
    }
    Ok(())
}

/// Cuts a peer's string for an error message.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

fn check_text(
    kind: &'static str,
    field: &'static str,
    s: &str,
    max: usize,
) -> Result<(), ProtocolError> {
    if s.len() > max {
        return Err(invalid(
            kind,
            field,
            format!("is {} bytes, over the limit of {max}", s.len()),
        ));
    }
    Ok(())
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    kind: &'static str,
    field: &'static str,
    v: T,
    range: std::ops::RangeInclusive<T>,
) -> Result<(), ProtocolError> {
    if range.contains(&v) {
        Ok(())
    } else {
        Err(invalid(
            kind,
            field,
            format!("{v} is outside {}–{}", range.start(), range.end()),
        ))
    }
}

fn check_device(kind: &'static str, d: &DeviceProps) -> Result<(), ProtocolError> {
    for (field, v) in [
        ("devicegroup", Some(&d.devicegroup)),
        ("devicename", d.devicename.as_ref()),
        ("deviceid", d.deviceid.as_ref()),
    ] {
        if let Some(v) = v {
            if !is_safe_id(v) || v.contains('.') {
                return Err(invalid(
                    kind,
                    field,
                    format!(
                        "{:?} must be 1–{MAX_ID_BYTES} bytes of A–Z a–z 0–9 _ - (no dots: they separate routing keys)",
                        clip(v)
                    ),
                ));
            }
        }
    }
    if d.deviceid.is_some() && d.devicename.is_none() {
        return Err(invalid(
            kind,
            "deviceid",
            "deviceid needs devicename".into(),
        ));
    }
    Ok(())
}

fn check_packages(kind: &'static str, packages: &[String]) -> Result<(), ProtocolError> {
    if packages.is_empty() || packages.len() > MAX_PACKAGES {
        return Err(invalid(
            kind,
            "packages",
            format!(
                "has {} entries; 1–{MAX_PACKAGES} test packages are allowed",
                packages.len()
            ),
        ));
    }
    if let Some(p) = packages.iter().find(|p| !is_safe_package(p)) {
        return Err(invalid(
            kind,
            "packages",
            format!(
                "test package name {:?} must be 1–{MAX_PACKAGE_BYTES} bytes of A–Z a–z 0–9 . _ - + and not start with . or -",
                clip(p)
            ),
        ));
    }
    Ok(())
}

fn check_options(
    kind: &'static str,
    field: &'static str,
    options: &std::collections::BTreeMap<String, String>,
) -> Result<(), ProtocolError> {
    if options.len() > MAX_OPTIONS {
        return Err(invalid(
            kind,
            field,
            format!(
                "has {} entries, over the limit of {MAX_OPTIONS}",
                options.len()
            ),
        ));
    }
    for (k, v) in options {
        if k.is_empty()
            || k.len() > MAX_OPTION_KEY_BYTES
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        {
            return Err(invalid(
                kind,
                field,
                format!(
                    "option name {:?} must be 1–{MAX_OPTION_KEY_BYTES} bytes of A–Z a–z 0–9 _ - .",
                    clip(k)
                ),
            ));
        }
        if v.len() > MAX_OPTION_VALUE_BYTES || v.chars().any(char::is_control) {
            return Err(invalid(
                kind,
                field,
                format!(
                    "option {k:?} value must be at most {MAX_OPTION_VALUE_BYTES} bytes without control characters"
                ),
            ));
        }
    }
    Ok(())
}

fn check_image(kind: &'static str, image: &str) -> Result<(), ProtocolError> {
    if image.trim().is_empty()
        || image.len() > MAX_IMAGE_BYTES
        || image.chars().any(char::is_control)
    {
        return Err(invalid(
            kind,
            "image",
            format!("must be 1–{MAX_IMAGE_BYTES} bytes without control characters"),
        ));
    }
    Ok(())
}

fn check_timeout(kind: &'static str, secs: u64) -> Result<(), ProtocolError> {
    check_range(kind, "timeout_secs", secs, 1..=MAX_TIMEOUT_SECS)
}

fn check_sha(kind: &'static str, sha: &str) -> Result<(), ProtocolError> {
    if sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(invalid(
            kind,
            "sha256",
            "must be 64 lower-case hex digits".into(),
        ))
    }
}

/// Packed log parts against their raw frame: at most
/// [`logtext::MAX_LOG_PARTS`] parts, line numbers in range, the parts'
/// sizes adding up to the frame, each part's text well formed
/// ([`logtext::check_part`]). Linear in the frame's size.
fn check_parts(
    kind: &'static str,
    parts: &[LogPart],
    raw: Option<&[u8]>,
) -> Result<(), ProtocolError> {
    if parts.is_empty() || parts.len() > logtext::MAX_LOG_PARTS {
        return Err(invalid(
            kind,
            "parts",
            format!(
                "has {} parts; 1 to {} allowed",
                parts.len(),
                logtext::MAX_LOG_PARTS
            ),
        ));
    }
    let raw = raw.unwrap_or_default();
    let mut at = 0usize;
    for p in parts {
        check_range(kind, "parts.first", p.first, 1..=MAX_SEQ)?;
        check_range(kind, "parts.count", u64::from(p.count), 1..=MAX_SEQ)?;
        if p.first - 1 > MAX_SEQ - u64::from(p.count) {
            return Err(invalid(
                kind,
                "parts.count",
                format!("lines {} + {} pass {MAX_SEQ}", p.first, p.count),
            ));
        }
        let end = at.saturating_add(p.bytes as usize);
        let Some(text) = raw.get(at..end) else {
            return Err(invalid(
                kind,
                "parts.bytes",
                format!(
                    "parts announce more than the {} bytes of the raw frame",
                    raw.len()
                ),
            ));
        };
        logtext::check_part(text, u64::from(p.count))
            .map_err(|e| invalid(kind, "raw", format!("part from line {}: {e}", p.first)))?;
        at = end;
    }
    if at != raw.len() {
        return Err(invalid(
            kind,
            "parts.bytes",
            format!("parts announce {at} bytes, the raw frame has {}", raw.len()),
        ));
    }
    Ok(())
}

fn check_lines(kind: &'static str, lines: &[LogLine]) -> Result<(), ProtocolError> {
    if lines.len() > MAX_LOG_BATCH_LINES {
        return Err(invalid(
            kind,
            "lines",
            format!(
                "has {} lines, over the limit of {MAX_LOG_BATCH_LINES}",
                lines.len()
            ),
        ));
    }
    for l in lines {
        check_range(kind, "lines.seq", l.seq, 1..=MAX_SEQ)?;
        check_text(kind, "lines.text", &l.text, MAX_LINE_BYTES)?;
    }
    Ok(())
}

/// Input files of a testrun: at most [`MAX_INPUTS`], safe relative
/// names, no name twice, sizes and hashes well-formed.
fn check_inputs(
    kind: &'static str,
    field: &'static str,
    inputs: &[InputFile],
) -> Result<(), ProtocolError> {
    if inputs.len() > MAX_INPUTS {
        return Err(invalid(
            kind,
            field,
            format!("has {} entries, over {MAX_INPUTS}", inputs.len()),
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for i in inputs {
        check_file_name(kind, &i.name)?;
        check_range(kind, field, i.size, 0..=MAX_FILE_BYTES)?;
        check_sha(kind, &i.sha256)?;
        if !names.insert(i.name.as_str()) {
            return Err(invalid(
                kind,
                field,
                format!("names {:?} twice", clip(&i.name)),
            ));
        }
    }
    Ok(())
}

/// Checks every field of a decoded message against its limit.
pub fn check(env: &Envelope) -> Result<(), ProtocolError> {
    let kind = env.body.kind();
    check_header(kind, env)?;
    match &env.body {
        Body::Hello { .. }
        | Body::Bye { .. }
        | Body::ConsoleStatus { .. }
        | Body::Ready
        | Body::Heartbeat
        | Body::Ack { .. }
        | Body::TaskAccepted { .. }
        | Body::TaskRefused { .. }
        | Body::Log { .. }
        | Body::LogPacked { .. }
        | Body::LogLinesPacked { .. }
        | Body::TaskFinished { .. } => check_session(kind, env),
        Body::FileOffer { .. }
        | Body::FileChunk { .. }
        | Body::FileEnd { .. }
        | Body::FileStored { .. }
        | Body::FileCredit { .. }
        | Body::FileRefused { .. }
        | Body::InputOffer { .. }
        | Body::InputEnd { .. }
        | Body::InputChunk { .. }
        | Body::GetInput { .. }
        | Body::InputCredit { .. }
        | Body::InputStored { .. } => check_files(kind, env),
        Body::Welcome { .. }
        | Body::Dispatch { .. }
        | Body::LogFull { .. }
        | Body::Cancel { .. }
        | Body::TaskClosed { .. }
        | Body::Error { .. }
        | Body::ServerHeartbeat { .. }
        | Body::Shutdown { .. } => check_server(kind, env),
        Body::Ping { .. }
        | Body::ListWorkers { .. }
        | Body::ListQueue { .. }
        | Body::WebLogin { .. }
        | Body::ListRuns { .. }
        | Body::Submit { .. }
        | Body::Follow { .. }
        | Body::DrainWorker { .. }
        | Body::WorkerHealth { .. }
        | Body::GetAudit { .. }
        | Body::GetStatus { .. }
        | Body::CancelRun { .. }
        | Body::GetEvents { .. }
        | Body::GetLogTail { .. }
        | Body::WebLink { .. }
        | Body::ListNotifications { .. }
        | Body::RetryNotification { .. }
        | Body::GetLog { .. }
        | Body::GetFile { .. } => check_requests(kind, env),
        // Replies to clients and follower traffic are checked by the
        // client where it uses them (it only prints them, escaped).
        Body::Pong { .. }
        | Body::Following { .. }
        | Body::Submitted { .. }
        | Body::Status { .. }
        | Body::Events { .. }
        | Body::Workers { .. }
        | Body::HealthReport { .. }
        | Body::Notifications { .. }
        | Body::Runs { .. }
        | Body::Queue { .. }
        | Body::Data { .. }
        | Body::Progress { .. }
        | Body::LogLines { .. } => Ok(()),
    }
}

/// The header: sequence numbers and task ids in range, and the mandatory
/// flag only where the protocol has one.
fn check_header(kind: &'static str, env: &Envelope) -> Result<(), ProtocolError> {
    check_range(kind, "seq", env.header.seq, 0..=MAX_SEQ)?;
    if let Some(epoch) = env.header.epoch {
        check_range(kind, "epoch", epoch, 1..=MAX_SEQ)?;
    }
    if let Some(task) = &env.header.task {
        check_id(kind, "task", task)?;
    }
    // Which messages may carry the mandatory flag is part of the protocol
    // (PROTOCOL.md §4): a flag elsewhere would make the sender wait for an
    // ack that never comes; a dispatch or cancel without it is not one.
    let may_be_mandatory = matches!(
        env.body,
        Body::TaskAccepted { .. }
            | Body::TaskRefused { .. }
            | Body::Log { .. }
            | Body::LogPacked { .. }
            | Body::Bye { .. }
            | Body::TaskFinished { .. }
            | Body::Dispatch { .. }
            | Body::Cancel { .. }
    );
    let must_be_mandatory = matches!(env.body, Body::Dispatch { .. } | Body::Cancel { .. });
    if env.header.mandatory && !may_be_mandatory {
        return Err(invalid(
            kind,
            "mandatory",
            format!("a {kind} message is never mandatory"),
        ));
    }
    if !env.header.mandatory && must_be_mandatory {
        return Err(invalid(
            kind,
            "mandatory",
            format!("a {kind} message is always mandatory"),
        ));
    }
    Ok(())
}

/// What a worker sends about its session and its task: registration,
/// liveness, task acceptance, logs and the final report.
fn check_session(kind: &'static str, env: &Envelope) -> Result<(), ProtocolError> {
    let attempt = |a: u32| check_range(kind, "attempt", a, 1..=MAX_ATTEMPT);
    match &env.body {
        Body::Hello {
            worker,
            session,
            device,
            running,
            version,
        } => {
            if let Some(v) = version {
                check_text(kind, "version", v, 64)?;
            }
            check_id(kind, "worker", worker)?;
            check_id(kind, "session", session)?;
            check_device(kind, device)?;
            if running.len() > MAX_RUNNING {
                return Err(invalid(
                    kind,
                    "running",
                    format!("has {} entries, over {MAX_RUNNING}", running.len()),
                ));
            }
            for t in running {
                check_id(kind, "running", t)?;
            }
        }
        Body::Bye { reason } => check_text(kind, "reason", reason, MAX_TEXT_BYTES)?,
        Body::ConsoleStatus { status } => check_text(kind, "status", status, MAX_TEXT_BYTES)?,
        Body::Ready | Body::Heartbeat | Body::Ack { .. } => {
            if let Body::Ack { seq } = &env.body {
                check_range(kind, "seq", *seq, 0..=MAX_SEQ)?;
            }
        }
        Body::TaskAccepted { task, attempt: a } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
        }
        Body::TaskRefused { task, message, .. } => {
            check_id(kind, "task", task)?;
            check_text(kind, "message", message, MAX_TEXT_BYTES)?;
        }
        Body::Log {
            task,
            attempt: a,
            lines,
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_lines(kind, lines)?;
        }
        Body::LogPacked {
            task,
            attempt: a,
            parts,
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_parts(kind, parts, env.raw.as_deref())?;
        }
        Body::LogLinesPacked { run, task, parts } => {
            check_id(kind, "run", run)?;
            check_id(kind, "task", task)?;
            check_parts(kind, parts, env.raw.as_deref())?;
        }
        Body::TaskFinished {
            task,
            attempt: a,
            outcome,
            log_lines,
            files,
            file_problems,
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_range(kind, "log_lines", *log_lines, 0..=MAX_SEQ)?;
            if file_problems.len() > MAX_REPORT_FILES {
                return Err(invalid(
                    kind,
                    "file_problems",
                    format!(
                        "has {} entries, over {MAX_REPORT_FILES}",
                        file_problems.len()
                    ),
                ));
            }
            for p in file_problems {
                check_file_name(kind, &p.name)?;
                check_text(kind, "file_problems.reason", &p.reason, MAX_TEXT_BYTES)?;
            }
            if let Some(f) = &outcome.failure {
                check_text(kind, "outcome.failure", f, MAX_TEXT_BYTES)?;
            }
            if files.len() > MAX_REPORT_FILES {
                return Err(invalid(
                    kind,
                    "files",
                    format!("has {} entries, over {MAX_REPORT_FILES}", files.len()),
                ));
            }
            for f in files {
                check_file_name(kind, &f.name)?;
                check_range(kind, "files.size", f.size, 0..=MAX_FILE_BYTES)?;
                check_sha(kind, &f.sha256)?;
            }
        }
        // Routed elsewhere by `check`.
        _ => {}
    }
    Ok(())
}

/// Result files (worker → server) and input files (client ↔ server, server
/// → worker) in transit: offers, chunks against their raw frames, credit.
fn check_files(kind: &'static str, env: &Envelope) -> Result<(), ProtocolError> {
    let attempt = |a: u32| check_range(kind, "attempt", a, 1..=MAX_ATTEMPT);
    match &env.body {
        Body::FileOffer {
            task,
            attempt: a,
            name,
            size,
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_file_name(kind, name)?;
            check_range(kind, "size", *size, 0..=MAX_FILE_BYTES)?;
        }
        Body::FileChunk {
            task,
            attempt: a,
            name,
            offset,
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_file_name(kind, name)?;
            let len = env.raw.as_ref().map_or(0, |r| r.len() as u64);
            // offset + len within the largest file, without overflow; the
            // offered size is checked where the offer is known.
            if *offset > MAX_FILE_BYTES || len > MAX_FILE_BYTES - *offset {
                return Err(invalid(
                    kind,
                    "offset",
                    format!("chunk of {len} bytes at offset {offset} ends beyond {MAX_FILE_BYTES} bytes"),
                ));
            }
        }
        Body::FileEnd {
            task,
            attempt: a,
            name,
            size,
            sha256,
        }
        | Body::FileStored {
            task,
            attempt: a,
            name,
            size,
            sha256,
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_file_name(kind, name)?;
            check_range(kind, "size", *size, 0..=MAX_FILE_BYTES)?;
            check_sha(kind, sha256)?;
        }
        Body::FileCredit {
            task,
            attempt: a,
            name,
            have,
            until,
            ..
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_file_name(kind, name)?;
            check_range(kind, "have", *have, 0..=MAX_FILE_BYTES)?;
            check_range(kind, "until", *until, *have..=MAX_FILE_BYTES)?;
        }
        Body::FileRefused {
            task,
            attempt: a,
            name,
            message,
            ..
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_file_name(kind, name)?;
            check_text(kind, "message", message, MAX_TEXT_BYTES)?;
        }
        Body::InputOffer { sha256, size, .. } | Body::InputEnd { sha256, size, .. } => {
            check_sha(kind, sha256)?;
            check_range(kind, "size", *size, 0..=MAX_FILE_BYTES)?;
        }
        Body::InputChunk { sha256, offset, .. } => {
            check_sha(kind, sha256)?;
            let len = env.raw.as_ref().map_or(0, |r| r.len() as u64);
            if *offset > MAX_FILE_BYTES || len > MAX_FILE_BYTES - *offset {
                return Err(invalid(
                    kind,
                    "offset",
                    format!("chunk of {len} bytes at offset {offset} ends beyond {MAX_FILE_BYTES} bytes"),
                ));
            }
        }
        Body::GetInput { sha256, offset, .. } => {
            check_sha(kind, sha256)?;
            check_range(kind, "offset", *offset, 0..=MAX_READ_OFFSET)?;
        }
        Body::InputCredit {
            sha256,
            have,
            until,
            ..
        } => {
            check_sha(kind, sha256)?;
            check_range(kind, "have", *have, 0..=MAX_FILE_BYTES)?;
            check_range(kind, "until", *until, *have..=MAX_FILE_BYTES)?;
        }
        Body::InputStored { sha256, size, .. } => {
            check_sha(kind, sha256)?;
            check_range(kind, "size", *size, 0..=MAX_FILE_BYTES)?;
        }
        // Routed elsewhere by `check`.
        _ => {}
    }
    Ok(())
}

/// What a server sends its workers: welcome, dispatch, cancel, the
/// closing of a task, errors and heartbeats.
fn check_server(kind: &'static str, env: &Envelope) -> Result<(), ProtocolError> {
    let attempt = |a: u32| check_range(kind, "attempt", a, 1..=MAX_ATTEMPT);
    match &env.body {
        Body::Welcome {
            server,
            heartbeat_ms,
            liveness,
            events_key,
            ..
        } => {
            check_id(kind, "server", server)?;
            if let Some(key) = events_key {
                check_sha(kind, key)?;
            }
            check_range(kind, "heartbeat_ms", *heartbeat_ms, HEARTBEAT_MS)?;
            check_range(kind, "liveness", *liveness, LIVENESS)?;
        }
        Body::Dispatch { spec } => {
            check_id(kind, "spec.task", &spec.task)?;
            check_id(kind, "spec.run", &spec.run)?;
            attempt(spec.attempt)?;
            check_image(kind, &spec.image)?;
            check_packages(kind, &spec.packages)?;
            check_timeout(kind, spec.timeout_secs)?;
            check_options(kind, "spec.options", &spec.options)?;
            check_options(kind, "spec.secrets", &spec.secrets)?;
            check_range(kind, "spec.ttl_ms", spec.ttl_ms, TTL_MS)?;
            check_inputs(kind, "spec.inputs", &spec.inputs)?;
        }
        Body::LogFull {
            task,
            attempt: a,
            reason,
        } => {
            check_id(kind, "task", task)?;
            attempt(*a)?;
            check_text(kind, "reason", reason, MAX_TEXT_BYTES)?;
        }
        Body::Cancel { task } => check_id(kind, "task", task)?,
        Body::TaskClosed {
            task,
            attempt: a,
            reason,
        } => {
            check_id(kind, "task", task)?;
            if let Some(a) = a {
                attempt(*a)?;
            }
            check_text(kind, "reason", reason, MAX_TEXT_BYTES)?;
        }
        Body::Error { message, .. } => check_text(kind, "message", message, MAX_TEXT_BYTES)?,
        Body::ServerHeartbeat {
            server,
            heartbeat_ms,
            ..
        } => {
            check_id(kind, "server", server)?;
            check_range(kind, "heartbeat_ms", *heartbeat_ms, HEARTBEAT_MS)?;
        }
        Body::Shutdown { server } => check_id(kind, "server", server)?,
        // Routed elsewhere by `check`.
        _ => {}
    }
    Ok(())
}

/// A client's requests: submit, the lists, status, logs, files, and the
/// operators' actions.
fn check_requests(kind: &'static str, env: &Envelope) -> Result<(), ProtocolError> {
    match &env.body {
        Body::Ping { .. }
        | Body::ListWorkers { .. }
        | Body::ListQueue { .. }
        | Body::WebLogin { .. } => {}
        Body::ListRuns {
            owner,
            limit,
            devicegroup,
            ..
        } => {
            if let Some(o) = owner {
                check_id(kind, "owner", o)?;
            }
            if let Some(g) = devicegroup {
                check_id(kind, "devicegroup", g)?;
            }
            check_range(kind, "limit", *limit, 1..=1000)?;
        }
        Body::Submit { testrun, .. } => {
            if testrun.devices.len() >= MAX_DEVICE_SPECS {
                return Err(invalid(
                    kind,
                    "testrun.devices",
                    format!(
                        "{} device specs, over the limit of {MAX_DEVICE_SPECS}",
                        testrun.devices.len() + 1
                    ),
                ));
            }
            for d in testrun.all_devices() {
                check_device(
                    kind,
                    &DeviceProps {
                        devicegroup: d.devicegroup.clone(),
                        devicename: d.devicename.clone(),
                        deviceid: d.deviceid.clone(),
                    },
                )?;
            }
            check_image(kind, &testrun.image)?;
            check_packages(kind, &testrun.packages)?;
            check_timeout(kind, testrun.timeout_secs)?;
            check_options(kind, "testrun.options", &testrun.options)?;
            check_options(kind, "testrun.secrets", &testrun.secrets)?;
            check_inputs(kind, "testrun.inputs", &testrun.inputs)?;
            if testrun.notify.len() > MAX_NOTIFY_PER_RUN {
                return Err(invalid(
                    kind,
                    "testrun.notify",
                    format!(
                        "{} entries, over the limit of {}",
                        testrun.notify.len(),
                        MAX_NOTIFY_PER_RUN
                    ),
                ));
            }
            for n in &testrun.notify {
                check_text(kind, "testrun.notify", n, MAX_NOTIFY_ENTRY_BYTES)?;
            }
            if let Some((k, _)) = testrun
                .secrets
                .iter()
                .find(|(_, v)| v.len() < MIN_SECRET_BYTES)
            {
                return Err(invalid(
                    kind,
                    "testrun.secrets",
                    format!(
                        "secret {:?} is shorter than {MIN_SECRET_BYTES} bytes: too short to be masked in output",
                        clip(k)
                    ),
                ));
            }
        }
        Body::Follow { run, .. } => check_id(kind, "run", run)?,
        Body::DrainWorker { worker, .. } => check_id(kind, "worker", worker)?,
        Body::WorkerHealth { worker, reason, .. } => {
            check_id(kind, "worker", worker)?;
            check_text(kind, "reason", reason, MAX_TEXT_BYTES)?;
        }
        Body::GetAudit { offset, .. } => check_range(kind, "offset", *offset, 0..=MAX_READ_OFFSET)?,
        Body::GetStatus { run, .. } | Body::CancelRun { run, .. } => check_id(kind, "run", run)?,
        Body::GetEvents { run, from, .. } => {
            check_id(kind, "run", run)?;
            check_range(kind, "from", *from, 0..=MAX_SEQ)?;
        }
        Body::GetLogTail { task, .. } => check_id(kind, "task", task)?,
        Body::WebLink { url, .. } => check_text(kind, "url", url, MAX_TEXT_BYTES)?,
        Body::ListNotifications { run: Some(r), .. } => check_id(kind, "run", r)?,
        Body::RetryNotification { id, .. } => {
            let ok = id.len() == 36
                && id.starts_with("msg_")
                && id[4..].bytes().all(|b| b.is_ascii_hexdigit());
            if !ok {
                return Err(invalid(
                    kind,
                    "id",
                    "must be msg_ and 32 hex digits, as `notifications` lists it".into(),
                ));
            }
        }
        Body::GetLog { task, offset, .. } => {
            check_id(kind, "task", task)?;
            check_range(kind, "offset", *offset, 0..=MAX_READ_OFFSET)?;
        }
        Body::GetFile {
            task, name, offset, ..
        } => {
            check_id(kind, "task", task)?;
            check_file_name(kind, name)?;
            check_range(kind, "offset", *offset, 0..=MAX_READ_OFFSET)?;
        }
        // Routed elsewhere by `check`.
        _ => {}
    }
    Ok(())
}

/// A result file name as a relative path to join below a results folder,
/// or `None` if it is not one ([`check_file_name`]'s rule). Used by every
/// side that turns a peer's name into a path: the server's store, the
/// client's `fetch`.
pub fn relative_path(name: &str) -> Option<std::path::PathBuf> {
    check_file_name("file", name).ok()?;
    let mut out = std::path::PathBuf::new();
    for component in std::path::Path::new(name).components() {
        match component {
            std::path::Component::Normal(part) => out.push(part),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cannot_become_paths_or_escapes() {
        for good in ["r1.2", "worker-1", "a_b", "x"] {
            assert!(is_safe_id(good), "{good}");
        }
        for bad in [
            "",
            "..",
            "../x",
            "/abs",
            "a/b",
            ".hidden",
            "-flag",
            "a b",
            "a\nb",
            "\u{1b}[2J",
            &"x".repeat(65),
        ] {
            assert!(!is_safe_id(bad), "{bad:?}");
        }
        assert!(!is_safe_package("../../tmp/x"));
        assert!(is_safe_package("gcc+tests"));
    }

    #[test]
    fn file_names_stay_inside_the_result_folder() {
        for good in ["a.xml", "sub/dir/b.log"] {
            assert!(check_file_name("file_chunk", good).is_ok(), "{good}");
        }
        let long = "x".repeat(300);
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "./a",
            "a\\b",
            "a\u{0}b",
            &long,
        ] {
            assert!(check_file_name("file_chunk", bad).is_err(), "{bad:?}");
        }
    }
}
