//! Finding one's way in a task log of millions of lines (PROTOCOL.md
//! §5.7): where line N starts, which line holds a byte, when a line was
//! received, and a search of the whole log — all answered by the server
//! in bounded pieces, so no client ever needs the whole log to find a
//! line in it.

use serde::{Deserialize, Serialize};

/// Bytes of a search text at most (one line; no newline in it).
pub const MAX_FIND_TEXT: usize = 256;
/// Bytes of log one `find_in_log` search scans at most: the client asks
/// again from `to` until `eof`.
pub const SEARCH_CHUNK: u64 = 64 * 1024 * 1024;
/// Offsets of matching lines one answer carries at most.
pub const MAX_MATCHES: usize = 100;
/// Receive times one place carries at most.
pub const MAX_TIMES: usize = 256;

/// What `find_in_log` asks for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum LogFind {
    /// Where line `line` (counted from 1) starts.
    Line { line: u64 },
    /// The line that holds byte `offset`.
    Offset { offset: u64 },
    /// Lines containing `text` (bytes as they are stored; case
    /// sensitive), in the `SEARCH_CHUNK` bytes of whole lines from
    /// `offset`: their count, and the offsets of the matching lines from
    /// the `skip`-th (0-based) of this piece on.
    Text {
        text: String,
        offset: u64,
        skip: u64,
    },
}

/// What the server found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "found", rename_all = "snake_case")]
pub enum LogFinding {
    Place(LogPlace),
    Matches(LogMatches),
}

/// A line's place in the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogPlace {
    /// Where the line starts (bytes); `size` for a line past the end.
    pub offset: u64,
    /// Its number, counted from 1 (`lines + 1` past the end).
    pub line: u64,
    /// The log's length in bytes and in lines, when asked.
    pub size: u64,
    pub lines: u64,
    /// When the server received the lines from `offset` on: each entry
    /// holds from its offset to the next one's (sorted; at most
    /// `MAX_TIMES`, covering at least 1 MiB when there are that many).
    /// Empty for a log stored before receive times were kept.
    pub times: Vec<LogTime>,
}

/// From `offset` on, lines were received at `at_ms` (Unix ms).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogTime {
    pub offset: u64,
    pub line: u64,
    pub at_ms: u64,
}

/// A piece of a search.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMatches {
    /// The piece scanned: whole lines from `from` to `to`.
    pub from: u64,
    pub to: u64,
    /// `to` is the log's end (as it was when read).
    pub eof: bool,
    /// Lines in the piece that contain the text.
    pub count: u64,
    /// Where the matching lines start, from the `skip`-th on (at most
    /// `MAX_MATCHES`).
    pub offsets: Vec<u64>,
}
