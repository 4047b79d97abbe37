//! One field's rule each: identifiers, file names, free text, ranges,
//! devices, packages, options, images, hashes, packed log parts, input
//! files. [`super::check`] applies them message by message.

use crate::protocol::envelope::ProtocolError;
use crate::protocol::limits::*;
use crate::protocol::testrun::{InputFile, LogLine, LogPart};
use crate::protocol::{logtext, DeviceProps};

pub(super) fn invalid(kind: &'static str, field: &'static str, reason: String) -> ProtocolError {
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
pub(super) fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(80).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

pub(super) fn check_text(
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

pub(super) fn check_range<T: PartialOrd + std::fmt::Display>(
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

pub(super) fn check_device(kind: &'static str, d: &DeviceProps) -> Result<(), ProtocolError> {
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

pub(super) fn check_packages(kind: &'static str, packages: &[String]) -> Result<(), ProtocolError> {
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

pub(super) fn check_options(
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

pub(super) fn check_image(kind: &'static str, image: &str) -> Result<(), ProtocolError> {
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

pub(super) fn check_timeout(kind: &'static str, secs: u64) -> Result<(), ProtocolError> {
    check_range(kind, "timeout_secs", secs, 1..=MAX_TIMEOUT_SECS)
}

pub(super) fn check_sha(kind: &'static str, sha: &str) -> Result<(), ProtocolError> {
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
pub(super) fn check_parts(
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

pub(super) fn check_lines(kind: &'static str, lines: &[LogLine]) -> Result<(), ProtocolError> {
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
pub(super) fn check_inputs(
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
