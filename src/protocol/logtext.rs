//! Packed log text (`log_packed`, `log_lines_packed`; PROTOCOL.md §7.4):
//! log lines travel as the bytes the server stores, in a raw frame, with a
//! few numbers per *part* instead of a msgpack string per line. The worker
//! builds the text straight from the conductor's pipe; the server checks
//! it with a few passes over the bytes and appends it to the task log as
//! it is. Per line, nobody allocates.
//!
//! The text of a part is `count` lines, each terminated by `\n`, each in
//! the stored form: valid UTF-8 with a backslash written `\\` and a
//! carriage return `\r` (so a line can never contain a raw CR or LF, and
//! the original text is recovered by [`unescape`]). The stream's prefix
//! (`[stderr] `…) is not in the text; the part names the stream.

use crate::protocol::limits::MAX_LINE_BYTES;
use crate::protocol::{LogLine, LogPart, Stream};

/// Longest line of a packed part, in its escaped form, without the `\n`:
/// a line of [`MAX_LINE_BYTES`] read bytes grows at most threefold (an
/// invalid byte becomes U+FFFD), plus the continuation mark.
pub const MAX_PACKED_LINE_BYTES: usize = 3 * MAX_LINE_BYTES + 64;

/// Most parts in one packed message.
pub const MAX_LOG_PARTS: usize = 1024;

/// Appends `text` escaped (the stored form) to `out`, without the newline.
pub fn escape_into(out: &mut Vec<u8>, text: &[u8]) {
    if memchr::memchr3(b'\\', b'\r', b'\n', text).is_none() {
        out.extend_from_slice(text);
        return;
    }
    for &b in text {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b => out.push(b),
        }
    }
}

/// What the stored form puts before a line of `stream`: stdout lines have
/// no prefix, so a stdout line whose text begins with one of the others is
/// stored with a backslash before it (`\[serial] …`, see [`guarded`]):
/// a line's source is always its recorded stream, never its text.
pub fn prefix(stream: Stream) -> &'static str {
    match stream {
        Stream::Stdout => "",
        Stream::Stderr => "[stderr] ",
        Stream::Worker => "[ots-worker] ",
        Stream::Serial => "[serial] ",
    }
}

/// Whether a stdout line (its text or stored form) begins with another
/// stream's prefix, and so must be guarded in the stored form.
pub fn guarded(line: &[u8]) -> bool {
    // Called for every line of a conductor's output that starts with `[`
    // (all of a gtest log's): a byte or two decides most.
    match line.get(..2) {
        Some(b"[s") => line.starts_with(b"[stderr] ") || line.starts_with(b"[serial] "),
        Some(b"[o") => line.starts_with(b"[ots-worker] "),
        _ => false,
    }
}

/// Whether any line of `text` (lines ending in `\n`) must be guarded.
pub fn any_guarded(text: &[u8]) -> bool {
    guarded(text) || memchr::memmem::find_iter(text, b"\n[").any(|i| guarded(&text[i + 1..]))
}

/// Appends a stdout line's text in the stored form: escaped, with a
/// backslash before a leading stream prefix.
pub fn escape_stdout_into(out: &mut Vec<u8>, text: &[u8]) {
    if guarded(text) {
        out.push(b'\\');
    }
    escape_into(out, text);
}

/// Renders one log line as stored in the task's log file. Lines are data:
/// a backslash, newline or carriage return inside the text is escaped
/// (`\\`, `\n`, `\r`), so one line can never forge another, and a stdout
/// line beginning with another stream's prefix gets a backslash before it
/// (`\[ots-worker] …`), so its text never forges its source. Other control bytes are kept as sent; clients
/// escape them for a terminal.
pub fn render_line(line: &LogLine) -> String {
    let mut out = Vec::with_capacity(rendered_len(line) as usize);
    render_into(&mut out, line);
    String::from_utf8(out).expect("escaping keeps UTF-8 text UTF-8")
}

/// Appends the stored form of `line` to `out` (no allocation per line when
/// a batch is rendered into one buffer): the same escaping as packed
/// lines ([`crate::protocol::escape_into`]).
pub fn render_into(out: &mut Vec<u8>, line: &LogLine) {
    out.extend_from_slice(prefix(line.stream).as_bytes());
    match line.stream {
        Stream::Stdout => escape_stdout_into(out, line.text.as_bytes()),
        _ => escape_into(out, line.text.as_bytes()),
    }
    out.push(b'\n');
}

/// Bytes [`render_line`] writes for `line`, without rendering it.
pub fn rendered_len(line: &LogLine) -> u64 {
    let guard = line.stream == Stream::Stdout && guarded(line.text.as_bytes());
    (prefix(line.stream).len() + usize::from(guard) + escaped_len(line.text.as_bytes()) + 1) as u64
}

/// Bytes [`escape_into`] writes for `text`.
pub fn escaped_len(text: &[u8]) -> usize {
    text.len() + memchr::memchr3_iter(b'\\', b'\r', b'\n', text).count()
}

/// The original text of one escaped line (inverse of [`escape_into`]); a
/// backslash before anything else is kept as it is.
pub fn unescape(line: &str) -> String {
    if !line.contains('\\') {
        return line.to_string();
    }
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('[') => out.push('['),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

/// Why a packed part is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PartError {
    #[error("is not valid UTF-8 (at byte {0})")]
    NotUtf8(usize),
    #[error("contains a raw carriage return (must be escaped as \\r)")]
    RawCr,
    #[error("does not end with a newline")]
    Unterminated,
    #[error("has {found} lines, not the {count} it announces")]
    Count { found: u64, count: u64 },
    #[error("has a line of {0} bytes, over the limit of {MAX_PACKED_LINE_BYTES}")]
    LongLine(usize),
}

/// Checks the text of one part announcing `count` lines: a few linear
/// passes over the bytes, no allocation.
pub fn check_part(text: &[u8], count: u64) -> Result<(), PartError> {
    if let Err(e) = std::str::from_utf8(text) {
        return Err(PartError::NotUtf8(e.valid_up_to()));
    }
    if memchr::memchr(b'\r', text).is_some() {
        return Err(PartError::RawCr);
    }
    if text.last() != Some(&b'\n') {
        return Err(PartError::Unterminated);
    }
    let mut found = 0u64;
    let mut start = 0usize;
    for end in memchr::memchr_iter(b'\n', text) {
        if end - start > MAX_PACKED_LINE_BYTES {
            return Err(PartError::LongLine(end - start));
        }
        start = end + 1;
        found += 1;
    }
    if found != count {
        return Err(PartError::Count { found, count });
    }
    Ok(())
}

/// The lines of a checked part, without their newlines.
pub fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let empty = text.is_empty();
    body.split(|b| *b == b'\n').filter(move |_| !empty)
}

/// The lines of a part as [`LogLine`]s (original text), numbered from
/// `first`: for the rare slow paths (a part overlapping stored lines) and
/// for clients showing them.
pub fn to_lines(first: u64, stream: Stream, text: &[u8]) -> Vec<LogLine> {
    lines(text)
        .enumerate()
        .map(|(i, l)| LogLine {
            seq: first.saturating_add(i as u64),
            stream,
            text: unescape(&String::from_utf8_lossy(l)),
        })
        .collect()
}

/// Lines of one stream, packed, not yet numbered: what a worker's task
/// hands to its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackedText {
    pub stream: Stream,
    pub count: u32,
    pub text: Vec<u8>,
}

/// Marks a line cut at the protocol's line limit.
pub const CUT: &str = " [line cut]";

impl PackedText {
    /// One line of text (a worker's own line, a console line): escaped,
    /// cut at [`MAX_LINE_BYTES`] (marked) so it stays within the limits.
    pub fn line(stream: Stream, text: &str) -> Self {
        let mut text = text;
        let mut cut = false;
        if text.len() > MAX_LINE_BYTES - CUT.len() {
            let mut at = MAX_LINE_BYTES - CUT.len();
            while !text.is_char_boundary(at) {
                at -= 1;
            }
            text = &text[..at];
            cut = true;
        }
        let mut out = Vec::with_capacity(text.len() + CUT.len() + 1);
        escape_into(&mut out, text.as_bytes());
        if cut {
            out.extend_from_slice(CUT.as_bytes());
        }
        out.push(b'\n');
        PackedText {
            stream,
            count: 1,
            text: out,
        }
    }
}

/// Each part of a checked packed message with its text.
pub fn part_texts<'a>(
    parts: &'a [LogPart],
    raw: &'a [u8],
) -> impl Iterator<Item = (&'a LogPart, &'a [u8])> {
    let mut at = 0usize;
    parts.iter().map(move |p| {
        let end = at + p.bytes as usize;
        let text = &raw[at..end];
        at = end;
        (p, text)
    })
}

/// All lines of a checked packed message as [`LogLine`]s.
pub fn unpack(parts: &[LogPart], raw: &[u8]) -> Vec<LogLine> {
    part_texts(parts, raw)
        .flat_map(|(p, text)| to_lines(p.first, p.stream, text))
        .collect()
}

/// Builds the packed text of one stream of output, straight from the
/// bytes as they are read: lines cut at `\n` (a trailing `\r` dropped),
/// invalid UTF-8 replaced, escaped, and a line longer than
/// [`MAX_LINE_BYTES`] cut into pieces marked as continued. Memory is the
/// text of the lines completed so far plus at most one partial line.
#[derive(Default)]
pub struct PackedLines {
    /// The partial line carried over from the previous read.
    partial: Vec<u8>,
    /// Completed lines, packed.
    pub text: Vec<u8>,
    /// Lines in `text`.
    pub count: u32,
    /// Stdout: a line beginning with another stream's prefix is guarded
    /// ([`prefix`]).
    guard: bool,
}

/// Marks a piece of a line that was cut because it was too long.
pub const CONTINUED: &str = " [line continues]";

impl PackedLines {
    /// Lines of `stream`'s output.
    pub fn of(stream: Stream) -> Self {
        PackedLines {
            guard: stream == Stream::Stdout,
            ..Default::default()
        }
    }

    /// Takes the bytes of one read. `mask` rewrites a line's text when
    /// `needs_mask` says the bytes contain something to hide (secrets);
    /// only then is the read handled line by line through a `String`.
    pub fn push(
        &mut self,
        mut bytes: &[u8],
        needs_mask: &dyn Fn(&[u8]) -> bool,
        mask: &dyn Fn(String) -> String,
    ) {
        // Complete the partial line first.
        if !self.partial.is_empty() {
            let room = MAX_LINE_BYTES - self.partial.len();
            match memchr::memchr(b'\n', &bytes[..bytes.len().min(room)]) {
                Some(i) => {
                    let mut line = std::mem::take(&mut self.partial);
                    line.extend_from_slice(&bytes[..i]);
                    self.line(&line, false, mask, needs_mask(&line));
                    bytes = &bytes[i + 1..];
                }
                None if bytes.len() >= room => {
                    let mut line = std::mem::take(&mut self.partial);
                    line.extend_from_slice(&bytes[..room]);
                    self.line(&line, true, mask, needs_mask(&line));
                    bytes = &bytes[room..];
                }
                None => {
                    self.partial.extend_from_slice(bytes);
                    return;
                }
            }
        }
        // The complete lines of this read.
        let end = memchr::memrchr(b'\n', bytes).map_or(0, |i| i + 1);
        let (whole, rest) = bytes.split_at(end);
        if !whole.is_empty() {
            let masked = needs_mask(whole);
            if !masked && self.fast(whole) {
                // Taken verbatim.
            } else {
                let mut start = 0;
                for nl in memchr::memchr_iter(b'\n', whole) {
                    self.long_line(&whole[start..nl], mask, masked);
                    start = nl + 1;
                }
            }
        }
        // Keep what has no newline yet, cutting pieces that are too long.
        let mut rest = rest;
        while rest.len() >= MAX_LINE_BYTES {
            let (piece, tail) = rest.split_at(MAX_LINE_BYTES);
            self.line(piece, true, mask, needs_mask(piece));
            rest = tail;
        }
        self.partial.extend_from_slice(rest);
    }

    /// The partial line at the end of the stream, if any.
    pub fn finish(&mut self, needs_mask: &dyn Fn(&[u8]) -> bool, mask: &dyn Fn(String) -> String) {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            self.line(&line, false, mask, needs_mask(&line));
        }
    }

    /// Forgets the partial line carried over (its text will never be
    /// stored); true if there was one.
    pub fn discard_partial(&mut self) -> bool {
        let had = !self.partial.is_empty();
        self.partial = Vec::new();
        had
    }

    /// Takes the packed lines so far: (count, text).
    pub fn take(&mut self) -> (u32, Vec<u8>) {
        (
            std::mem::take(&mut self.count),
            std::mem::take(&mut self.text),
        )
    }

    /// Whole lines with nothing to escape, replace or cut go in as they
    /// are: one UTF-8 check, one CR/backslash search, the newline count.
    fn fast(&mut self, whole: &[u8]) -> bool {
        if std::str::from_utf8(whole).is_err()
            || memchr::memchr2(b'\\', b'\r', whole).is_some()
            || (self.guard && any_guarded(whole))
        {
            return false;
        }
        let mut n = 0u32;
        let mut start = 0usize;
        for nl in memchr::memchr_iter(b'\n', whole) {
            if nl - start > MAX_LINE_BYTES {
                return false;
            }
            start = nl + 1;
            n += 1;
        }
        self.text.extend_from_slice(whole);
        self.count += n;
        true
    }

    /// A line that may be longer than the limit (from a read that had
    /// its newline): cut into continued pieces.
    fn long_line(&mut self, mut line: &[u8], mask: &dyn Fn(String) -> String, masked: bool) {
        while line.len() > MAX_LINE_BYTES {
            let (piece, tail) = line.split_at(MAX_LINE_BYTES);
            self.line(piece, true, mask, masked);
            line = tail;
        }
        self.line(line, false, mask, masked);
    }

    fn line(&mut self, line: &[u8], cut: bool, mask: &dyn Fn(String) -> String, masked: bool) {
        let mut line = line;
        while !cut && line.last() == Some(&b'\r') {
            line = &line[..line.len() - 1];
        }
        let guard = self.guard;
        let escape = |out: &mut Vec<u8>, text: &[u8]| match guard {
            true => escape_stdout_into(out, text),
            false => escape_into(out, text),
        };
        match std::str::from_utf8(line) {
            Ok(s) if !masked => escape(&mut self.text, s.as_bytes()),
            _ => {
                let text = String::from_utf8_lossy(line).into_owned();
                let text = if masked { mask(text) } else { text };
                escape(&mut self.text, text.as_bytes());
            }
        }
        if cut {
            self.text.extend_from_slice(CONTINUED.as_bytes());
        }
        self.text.push(b'\n');
        self.count += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pack(reads: &[&[u8]]) -> (u32, Vec<u8>) {
        let mut p = PackedLines::default();
        for r in reads {
            p.push(r, &|_| false, &|s| s);
        }
        p.finish(&|_| false, &|s| s);
        p.take()
    }

    #[test]
    fn reads_become_checked_lines_whatever_the_cuts() {
        let input: &[u8] = b"one\r\ntwo \\ back\nthr\xffee\rx\n\nlast";
        for cut in 0..input.len() {
            let (count, text) = pack(&[&input[..cut], &input[cut..]]);
            check_part(&text, count as u64).unwrap();
            let lines = to_lines(1, Stream::Stdout, &text);
            let texts: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
            assert_eq!(
                texts,
                ["one", "two \\ back", "thr\u{fffd}ee\rx", "", "last"],
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_long_line_is_cut_into_bounded_pieces() {
        let long = vec![b'a'; MAX_LINE_BYTES * 2 + 10];
        for reads in [vec![&long[..]], vec![&long[..100], &long[100..]]] {
            let (count, text) = pack(&reads);
            assert_eq!(count, 3);
            check_part(&text, 3).unwrap();
            let lines = to_lines(1, Stream::Stdout, &text);
            assert!(lines[0].text.ends_with(CONTINUED));
            assert_eq!(lines[2].text.len(), 10);
        }
    }

    #[test]
    fn a_line_without_newline_read_in_thirds_is_cut_into_bounded_pieces() {
        let third = vec![b'y'; MAX_LINE_BYTES / 3];
        let mut reads: Vec<&[u8]> = vec![&third; 10];
        reads.push(b"end\r\nnext");
        let (count, text) = pack(&reads);
        check_part(&text, count as u64).unwrap();
        let lines = to_lines(1, Stream::Stdout, &text);
        assert!(lines
            .iter()
            .all(|l| l.text.len() <= MAX_LINE_BYTES + CONTINUED.len()));
        assert_eq!(
            lines.iter().filter(|l| l.text.ends_with(CONTINUED)).count(),
            3
        );
        assert!(lines[3].text.ends_with("end"));
        assert_eq!(lines.last().unwrap().text, "next");
    }

    #[test]
    fn masked_reads_go_line_by_line() {
        let mut p = PackedLines::default();
        p.push(
            b"the key is hunter2\nfine\n",
            &|b| memchr::memmem::find(b, b"hunter2").is_some(),
            &|s| s.replace("hunter2", "[secret:k]"),
        );
        let (count, text) = p.take();
        assert_eq!(count, 2);
        assert_eq!(text, b"the key is [secret:k]\nfine\n");
    }

    #[test]
    fn bad_parts_are_refused_with_the_reason() {
        assert_eq!(check_part(b"a\nb", 2), Err(PartError::Unterminated));
        assert_eq!(check_part(b"a\rb\n", 1), Err(PartError::RawCr));
        assert_eq!(check_part(b"\xff\n", 1), Err(PartError::NotUtf8(0)));
        assert_eq!(
            check_part(b"a\nb\n", 3),
            Err(PartError::Count { found: 2, count: 3 })
        );
        assert!(check_part(b"a\n", 1).is_ok());
        let long = [vec![b'x'; MAX_PACKED_LINE_BYTES + 1], vec![b'\n']].concat();
        assert_eq!(
            check_part(&long, 1),
            Err(PartError::LongLine(MAX_PACKED_LINE_BYTES + 1))
        );
    }

    #[test]
    fn escaping_round_trips() {
        for s in ["plain", "a\\b", "a\\nb", "cr\r", "nl\n", "\\\\r"] {
            let mut out = Vec::new();
            escape_into(&mut out, s.as_bytes());
            assert!(!out.contains(&b'\n') && !out.contains(&b'\r'));
            assert_eq!(unescape(std::str::from_utf8(&out).unwrap()), s);
        }
    }
}
