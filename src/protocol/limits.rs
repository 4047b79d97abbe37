//! The limits every value from a peer is checked against when it arrives,
//! before any of it is used. `docs/PROTOCOL.md` §14 lists them; keep both
//! in step. A value outside its limit is refused with
//! [`ProtocolError::Invalid`], which names the message, the field and the
//! limit, so the sender (and its operator) can tell exactly what was wrong.
//!
//! Identifiers are restricted to a small character set so that an id can
//! never become a path outside its folder, forge a log line or smuggle
//! terminal escapes: the receiving side still joins them to paths only after
//! this check.

/// Longest task, run, worker, session or device identifier.
pub const MAX_ID_BYTES: usize = 64;
/// Longest test package name.
pub const MAX_PACKAGE_BYTES: usize = 128;
/// Most test packages in one testrun.
pub const MAX_PACKAGES: usize = 256;
/// Longest image reference (URL or path).
pub const MAX_IMAGE_BYTES: usize = 4096;
/// Most options of one testrun, and their sizes.
pub const MAX_OPTIONS: usize = 64;
pub const MAX_OPTION_KEY_BYTES: usize = 64;
pub const MAX_OPTION_VALUE_BYTES: usize = 4096;
/// A secret shorter than this could not be masked in output without
/// masking ordinary text too.
pub const MIN_SECRET_BYTES: usize = 4;
/// Longest execution timeout of a task: 7 days.
pub const MAX_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// Largest sequence number (header `seq`, log line `seq`): 2^53, so that
/// every sum of sequence numbers and counts fits a u64 and a JSON number.
pub const MAX_SEQ: u64 = 1 << 53;
/// Highest attempt number of a task.
pub const MAX_ATTEMPT: u32 = 1000;
/// Most log lines in one `log` batch, and the longest line.
pub const MAX_LOG_BATCH_LINES: usize = 10_000;
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Largest result file the protocol can describe (servers limit lower).
pub const MAX_FILE_BYTES: u64 = 1 << 40;
/// Longest result file name, and the longest part between slashes.
pub const MAX_FILE_NAME_BYTES: usize = 1024;
pub const MAX_FILE_NAME_PART_BYTES: usize = 255;
/// Most result files announced in one final report.
pub const MAX_REPORT_FILES: usize = 1024;
/// Input files of one testrun.
pub const MAX_INPUTS: usize = 64;
/// Device specs of one testrun (`device` and `devices`).
pub const MAX_DEVICE_SPECS: usize = 16;
/// Most tasks a `hello` may say it still runs.
pub const MAX_RUNNING: usize = 16;
/// Longest per-run notification entry (URL or `mailto:`) accepted.
pub const MAX_NOTIFY_ENTRY_BYTES: usize = 512;
/// Most `--notify` entries one testrun may carry.
pub const MAX_NOTIFY_PER_RUN: usize = 4;
/// Longest free-text field (reasons, messages, failure descriptions).
pub const MAX_TEXT_BYTES: usize = 4096;
/// Heartbeat interval a server may announce, in ms.
pub const HEARTBEAT_MS: std::ops::RangeInclusive<u64> = 10..=60_000;
/// Liveness a server may announce.
pub const LIVENESS: std::ops::RangeInclusive<u32> = 2..=100;
/// Dispatch time-to-live, in ms.
pub const TTL_MS: std::ops::RangeInclusive<u64> = 1..=24 * 3600 * 1000;
/// Most bytes a client may ask for in one `get_log`/`get_file`.
pub const MAX_READ_BYTES: u64 = 1024 * 1024;

/// Bytes of a test case's suite and name, and of the first line of its
/// message, as stored and reported (longer ones are cut, and counted).
pub const MAX_CASE_NAME_BYTES: usize = 512;
pub const MAX_CASE_MESSAGE_BYTES: usize = 512;

/// Failing cases `status` names per task (the rest are counted).
pub const FAILING_CASES_SHOWN: usize = 5;

/// Test cases one `list_cases` answer carries at most.
pub const MAX_CASES_PER_ANSWER: u32 = 1000;
/// Largest offset a client may give in `get_log`/`get_file`.
pub const MAX_READ_OFFSET: u64 = MAX_FILE_BYTES;

/// Current Unix time in milliseconds (0 if the clock is before 1970).
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// True if `s` is a safe identifier: 1–[`MAX_ID_BYTES`] bytes of ASCII
/// letters, digits, `.`, `_`, `-`, not starting with `.` or `-`.
pub fn is_safe_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ID_BYTES
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// True if a test package name is safe: like an id, plus `+`, up to
/// [`MAX_PACKAGE_BYTES`].
pub fn is_safe_package(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_PACKAGE_BYTES
        && !s.starts_with(['.', '-'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+'))
}
