//! Text for people, shared by the CLI and the dashboard: control
//! characters made visible, and spans of time in a few characters.

/// Shows control characters (other than tab and newline) escaped, so that
/// log text from a conductor cannot move the cursor, clear the screen or
/// retitle the terminal: ESC becomes `\x1b`, C1 controls `\u{9b}`.
/// Bidirectional controls (embeddings and overrides U+202A–U+202E,
/// isolates U+2066–U+2069, the marks U+200E, U+200F, U+061C) are escaped
/// too: they reorder what follows, so a line could show text other than
/// its bytes (CVE-2021-42574, "Trojan Source").
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| escaped(c) && c != '\n' && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if escaped(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Control and bidirectional formatting characters.
fn escaped(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

/// The characters that change the display order of text around them.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}')
}

/// An optional value for a log line: the value, or `none`.
pub fn or_none<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "none".to_string(), |v| v.to_string())
}

/// The name a value has on the wire and in configuration files (its serde
/// name: `limit_reached`, `finish`), for log lines and messages, never
/// Rust's `Debug` form.
pub fn wire<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".to_string(),
    }
}

/// A span in whole units: seconds up to 2 min, minutes up to 2 h, hours
/// up to 2 days, then days. The index picks the unit's name.
fn span(ms: u64) -> (u64, usize) {
    let s = ms / 1000;
    match s {
        0..=119 => (s, 0),
        120..=7199 => (s / 60, 1),
        7200..=172_799 => (s / 3600, 2),
        _ => (s / 86_400, 3),
    }
}

/// A duration as a setting would say it, exactly: `4h`, `90m`, `45s`,
/// `1500ms`.
pub fn span_ms(ms: u64) -> String {
    match ms {
        0 => "0s".into(),
        _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
        _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
        _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
        _ => format!("{ms}ms"),
    }
}

/// How long something took, to the precision that matters: `420 ms`,
/// `12.3 s`, `3 min 12 s`, `2 h 5 min`.
pub fn took(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms} ms"),
        1_000..60_000 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{} min {} s", ms / 60_000, ms / 1000 % 60),
        _ => format!("{} h {} min", ms / 3_600_000, ms / 60_000 % 60),
    }
}

/// `12 s`, `3 min`, `2 h`, `4 d` (the dashboard's).
pub fn ago(ms: u64) -> String {
    let (n, u) = span(ms);
    format!("{n} {}", ["s", "min", "h", "d"][u])
}

/// `12s`, `3m`, `2h`, `4d` (the CLI's tables).
pub fn ago_short(ms: u64) -> String {
    let (n, u) = span(ms);
    format!("{n}{}", ["s", "m", "h", "d"][u])
}

/// What a queued task waits for, in one phrase: "waits for w2 (busy
/// with r1.1): about 3 min (2 min–4 min)"; a forecast with no worker says
/// none may take it; an unknown time says so rather than guess.
pub fn forecast(f: &crate::protocol::Forecast) -> String {
    if f.worker.is_empty() {
        return "no worker may take it for this attempt (every worker of its device is away, or its failed attempts exclude them)".into();
    }
    let busy = match &f.after {
        Some(t) => format!(" (busy with {t})"),
        None => String::new(),
    };
    let when = match (f.min_ms, f.ms, f.max_ms) {
        (_, Some(0), _) if f.after.is_none() => "free now: starts at the next dispatch".to_string(),
        (Some(lo), Some(ms), Some(hi)) if lo == hi => format!("about {}", ago(ms)),
        (Some(lo), Some(ms), Some(hi)) => format!("about {} ({}–{})", ago(ms), ago(lo), ago(hi)),
        _ => "when, is not known yet (no finished task of its kind to go by)".to_string(),
    };
    format!("waits for {}{busy}: {when}", f.worker)
}

/// `text` cut to at most `max` bytes, at a character boundary.
pub fn clip_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bidirectional_controls_are_shown_escaped() {
        assert_eq!(
            escape_controls("ok \u{202e}gnp.exe\u{2066}x\u{2069}"),
            "ok \\u{202e}gnp.exe\\u{2066}x\\u{2069}"
        );
        for c in [
            '\u{202a}', '\u{202b}', '\u{202c}', '\u{202d}', '\u{2067}', '\u{2068}',
        ] {
            assert!(escape_controls(&c.to_string()).starts_with("\\u{"), "{c:?}");
        }
        // Right-to-left text itself is text.
        assert_eq!(escape_controls("שלום"), "שלום");
    }
}
