//! Text for people, shared by the CLI and the dashboard: control
//! characters made visible, and spans of time in a few characters.

/// Shows control characters (other than tab and newline) escaped, so that
/// log text from a conductor cannot move the cursor, clear the screen or
/// retitle the terminal: ESC becomes `\x1b`, C1 controls `\u{9b}`.
pub fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    if !text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' | '\t' => out.push(c),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
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
