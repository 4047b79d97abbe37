//! Every value from a peer checked against its limit ([`super::limits`])
//! when it arrives, before any of it is used. A value outside its limit
//! is refused with [`ProtocolError::Invalid`], which names the message,
//! the field and the limit, so the sender (and its operator) can tell
//! exactly what was wrong.

use crate::protocol::envelope::{Envelope, ProtocolError};
use crate::protocol::fields::*;
pub use crate::protocol::fields::{check_file_name, check_id, relative_path};
use crate::protocol::leasing::*;
use crate::protocol::limits::*;
use crate::protocol::message::*;
use crate::protocol::DeviceProps;

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
        | Body::ListCases { .. }
        | Body::Compare { .. }
        | Body::GetCaseHistory { .. }
        | Body::ListFlaky { .. }
        | Body::Known { .. }
        | Body::GetReport { .. }
        | Body::GetLabSeries { .. }
        | Body::GetWorkerSeries { .. }
        | Body::GetSeriesMatrix { .. }
        | Body::Submit { .. }
        | Body::Follow { .. }
        | Body::DrainWorker { .. }
        | Body::WorkerHealth { .. }
        | Body::GetAudit { .. }
        | Body::GetStatus { .. }
        | Body::CancelRun { .. }
        | Body::GetEvents { .. }
        | Body::GetLogTail { .. }
        | Body::FindInLog { .. }
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
        | Body::Cases { .. }
        | Body::Comparison { .. }
        | Body::CaseHistory { .. }
        | Body::Flaky { .. }
        | Body::KnownRules { .. }
        | Body::Report { .. }
        | Body::LabSeries { .. }
        | Body::WorkerSeries { .. }
        | Body::SeriesMatrix { .. }
        | Body::Queue { .. }
        | Body::Data { .. }
        | Body::LogFound { .. }
        | Body::Progress { .. }
        | Body::LogLines { .. }
        | Body::Leases { .. }
        | Body::ConsoleAttached { .. }
        | Body::ConsoleOutput { .. }
        | Body::ConsoleInputAck { .. }
        | Body::ConsoleClosed { .. }
        | Body::PowerResult { .. } => Ok(()),
        Body::Reserve { .. }
        | Body::ListLeases { .. }
        | Body::LeaseAct { .. }
        | Body::ConsoleAttach { .. }
        | Body::ConsoleInput { .. }
        | Body::ConsoleDetach { .. }
        | Body::Power { .. }
        | Body::LeaseInput { .. }
        | Body::PowerRequest { .. }
        | Body::ConsoleData { .. }
        | Body::PowerDone { .. } => check_leases(kind, &env.body, env.raw.as_deref()),
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
            | Body::LeaseInput { .. }
            | Body::PowerRequest { .. }
            | Body::PowerDone { .. }
    );
    let must_be_mandatory = matches!(
        env.body,
        Body::Dispatch { .. }
            | Body::Cancel { .. }
            | Body::LeaseInput { .. }
            | Body::PowerRequest { .. }
    );
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
        Body::ListCases {
            run, limit, offset, ..
        } => {
            check_id(kind, "run", run)?;
            check_range(
                kind,
                "limit",
                *limit,
                1..=crate::protocol::limits::MAX_CASES_PER_ANSWER,
            )?;
            check_range(kind, "offset", *offset, 0..=u64::from(u32::MAX))?;
        }
        Body::Compare { .. }
        | Body::GetCaseHistory { .. }
        | Body::ListFlaky { .. }
        | Body::GetReport { .. }
        | Body::GetLabSeries { .. }
        | Body::GetWorkerSeries { .. }
        | Body::GetSeriesMatrix { .. }
        | Body::Known { .. } => super::check_results::check(kind, &env.body)?,
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
            if let Some(series) = &testrun.series {
                check_id(kind, "testrun.series", series)?;
            }
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
        Body::GetAudit { offset, before, .. } => {
            check_range(kind, "offset", *offset, 0..=MAX_READ_OFFSET)?;
            if let Some(b) = before {
                check_range(kind, "before", *b, 0..=MAX_READ_OFFSET)?;
            }
        }
        Body::GetStatus { run, .. } | Body::CancelRun { run, .. } => check_id(kind, "run", run)?,
        Body::GetEvents { run, from, .. } => {
            check_id(kind, "run", run)?;
            check_range(kind, "from", *from, 0..=MAX_SEQ)?;
        }
        Body::GetLogTail { task, .. } => check_id(kind, "task", task)?,
        Body::FindInLog { task, find, .. } => check_find(kind, task, find)?,
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

/// Every lease message's fields against their limits.
fn check_leases(kind: &'static str, body: &Body, raw: Option<&[u8]>) -> Result<(), ProtocolError> {
    let raw_len = raw.map_or(0, <[u8]>::len);
    let lease = |l: &str| check_id(kind, "lease", l);
    match body {
        Body::Reserve {
            device,
            duration_ms,
            reason,
            ..
        } => {
            check_device(
                kind,
                &crate::protocol::DeviceProps {
                    devicegroup: device.devicegroup.clone(),
                    devicename: device.devicename.clone(),
                    deviceid: device.deviceid.clone(),
                },
            )?;
            if !(1000..=MAX_LEASE_MS).contains(duration_ms) {
                return Err(invalid(
                    kind,
                    "duration_ms",
                    format!("{duration_ms} is outside 1000–{MAX_LEASE_MS}"),
                ));
            }
            check_text(kind, "reason", reason, MAX_LEASE_REASON_BYTES)?;
        }
        Body::LeaseAct {
            lease: l,
            duration_ms,
            user,
            ..
        } => {
            lease(l)?;
            if let Some(d) = duration_ms {
                if !(1000..=MAX_LEASE_MS).contains(d) {
                    return Err(invalid(
                        kind,
                        "duration_ms",
                        format!("{d} is outside 1000–{MAX_LEASE_MS}"),
                    ));
                }
            }
            if let Some(u) = user {
                check_id(kind, "user", u)?;
            }
        }
        Body::ConsoleAttach {
            lease: l, since_ms, ..
        } => {
            lease(l)?;
            if *since_ms > MAX_REPLAY_MS {
                return Err(invalid(
                    kind,
                    "since_ms",
                    format!("{since_ms} is over the limit of {MAX_REPLAY_MS}"),
                ));
            }
        }
        Body::ConsoleDetach { lease: l, .. } | Body::Power { lease: l, .. } => lease(l)?,
        Body::ConsoleInput {
            lease: l, stream, ..
        } => {
            lease(l)?;
            check_id(kind, "stream", stream)?;
            if raw_len > MAX_CONSOLE_INPUT_BYTES {
                return Err(invalid(
                    kind,
                    "raw",
                    format!(
                        "{raw_len} bytes of input, over the limit of {MAX_CONSOLE_INPUT_BYTES}"
                    ),
                ));
            }
        }
        Body::LeaseInput {
            task, by, stream, ..
        } => {
            check_id(kind, "stream", stream)?;
            check_id(kind, "task", task)?;
            check_text(kind, "by", by, MAX_LEASE_REASON_BYTES)?;
            if raw_len > MAX_CONSOLE_INPUT_BYTES {
                return Err(invalid(
                    kind,
                    "raw",
                    format!(
                        "{raw_len} bytes of input, over the limit of {MAX_CONSOLE_INPUT_BYTES}"
                    ),
                ));
            }
        }
        Body::PowerRequest { task, by, .. } => {
            check_id(kind, "task", task)?;
            check_text(kind, "by", by, MAX_LEASE_REASON_BYTES)?;
        }
        Body::PowerDone {
            task,
            state,
            message,
            ..
        } => {
            check_id(kind, "task", task)?;
            check_text(kind, "state", state, 16)?;
            check_text(kind, "message", message, MAX_TEXT_BYTES)?;
        }
        Body::ConsoleData { task, .. } => {
            check_id(kind, "task", task)?;
            if raw_len > MAX_CONSOLE_OUTPUT_BYTES {
                return Err(invalid(
                    kind,
                    "raw",
                    format!(
                        "{raw_len} bytes of output, over the limit of {MAX_CONSOLE_OUTPUT_BYTES}"
                    ),
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

/// `find_in_log`: the task, and a line, offset or search text in range.
fn check_find(
    kind: &'static str,
    task: &str,
    find: &crate::protocol::logfind::LogFind,
) -> Result<(), ProtocolError> {
    use crate::protocol::logfind::{LogFind, MAX_FIND_TEXT, SEARCH_CHUNK};
    check_id(kind, "task", task)?;
    match find {
        LogFind::Line { line } => check_range(kind, "find.line", *line, 1..=MAX_READ_OFFSET + 1),
        LogFind::Offset { offset } => {
            check_range(kind, "find.offset", *offset, 0..=MAX_READ_OFFSET)
        }
        LogFind::Text { text, offset, skip } => {
            check_range(kind, "find.offset", *offset, 0..=MAX_READ_OFFSET)?;
            check_range(kind, "find.skip", *skip, 0..=SEARCH_CHUNK)?;
            check_text(kind, "find.text", text, MAX_FIND_TEXT)?;
            if text.is_empty() || text.contains(['\n', '\r']) {
                return Err(invalid(
                    kind,
                    "find.text",
                    "must be one line of 1 or more bytes".into(),
                ));
            }
            Ok(())
        }
    }
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
