//! A task log's sparse index, `tasks/<task>/log.idx`, and the questions
//! it answers: where line N starts, which line holds a byte, when lines
//! were received — and a search of the whole log in bounded pieces.
//!
//! The serving loop appends a mark (offset, line number, receive time;
//! 24 bytes, little-endian) before a batch of lines when the last mark is
//! 64 KiB behind or the second has changed, so counting lines from the
//! nearest mark reads at most a batch or 64 KiB. Time marks stop at
//! `MAX_TIME_MARKS` (about 55 hours of a log that writes every second);
//! spacing marks go on to `MAX_MARKS` (24 MiB of index). A log stored
//! before the index existed has none: its lines are counted from the
//! start, and it shows no receive times.
//!
//! Reading is the file desk's (off the loop): every answer reads a
//! bounded amount of the log.

use crate::protocol::logfind::{
    LogFind, LogFinding, LogMatches, LogPlace, LogTime, MAX_MATCHES, MAX_TIMES, SEARCH_CHUNK,
};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Bytes of one mark.
pub const MARK_BYTES: u64 = 24;
/// A mark at least every this many bytes of log.
pub const MARK_SPACING: u64 = 64 * 1024;
/// Marks written only because the second changed, at most.
pub const MAX_TIME_MARKS: u64 = 200_000;
/// Marks in all, at most.
pub const MAX_MARKS: u64 = 1 << 20;
/// Bytes read at a time.
const PIECE: usize = 1 << 20;

fn encode(m: &LogTime) -> [u8; MARK_BYTES as usize] {
    let mut b = [0u8; MARK_BYTES as usize];
    b[..8].copy_from_slice(&m.offset.to_le_bytes());
    b[8..16].copy_from_slice(&m.line.to_le_bytes());
    b[16..].copy_from_slice(&m.at_ms.to_le_bytes());
    b
}

fn decode(b: &[u8; MARK_BYTES as usize]) -> LogTime {
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    LogTime {
        offset: word(0),
        line: word(8),
        at_ms: word(16),
    }
}

/// The writer's side for one open log: lines so far and when the last
/// mark was made. I/O-free but for [`Marker::recover`].
#[derive(Debug, Clone, Default)]
pub struct Marker {
    lines: u64,
    last: Option<(u64, u64)>,
    marks: u64,
    time_marks: u64,
}

impl Marker {
    /// The marker of a log opened again (after a restart, or when its
    /// handle was closed): from the index's last mark and the lines
    /// after it. Marks past the log's end (a torn write cut back at a
    /// start) are cut from the index. `None`: a log stored before the
    /// index existed, left without one.
    pub fn recover(log: &Path, idx: &Path) -> io::Result<Option<Marker>> {
        let size = match std::fs::metadata(log) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        let index = match OpenOptions::new().read(true).write(true).open(idx) {
            Ok(f) => Some(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        let Some(index) = index else {
            return Ok((size == 0).then(Marker::default));
        };
        let mut n = index.metadata()?.len() / MARK_BYTES;
        let mut last = None;
        while n > 0 {
            let m = mark_at(&index, n - 1)?;
            if m.offset <= size {
                last = Some(m);
                break;
            }
            n -= 1;
        }
        index.set_len(n * MARK_BYTES)?;
        let Some(last) = last else {
            return Ok((size == 0).then(Marker::default));
        };
        let (lines, _) = count_lines(log, last.offset, size)?;
        Ok(Some(Marker {
            lines: last.line + lines,
            last: Some((last.offset, last.at_ms / 1000)),
            marks: n,
            // Not known after a reopen: counted from here (bounded all the same).
            time_marks: 0,
        }))
    }

    /// `text` (whole lines) was appended at `before`, received at
    /// `now_ms`: the mark to write first, if one is due.
    pub fn note(&mut self, before: u64, text: &[u8], now_ms: u64) -> Option<LogTime> {
        let sec = now_ms / 1000;
        let (spacing, second) = match self.last {
            None => (true, false),
            Some((offset, last_sec)) => (
                before.saturating_sub(offset) >= MARK_SPACING,
                sec != last_sec && self.time_marks < MAX_TIME_MARKS,
            ),
        };
        let mark = ((spacing || second) && self.marks < MAX_MARKS).then(|| {
            self.marks += 1;
            if !spacing {
                self.time_marks += 1;
            }
            self.last = Some((before, sec));
            LogTime {
                offset: before,
                line: self.lines,
                at_ms: now_ms,
            }
        });
        self.lines = self
            .lines
            .saturating_add(memchr::memchr_iter(b'\n', text).count() as u64);
        mark
    }
}

/// Appends a mark to the index at `idx`.
pub fn append_mark(idx: &Path, mark: &LogTime) -> io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(idx)?;
    f.write_all(&encode(mark))
}

fn mark_at(index: &File, i: u64) -> io::Result<LogTime> {
    let mut b = [0u8; MARK_BYTES as usize];
    index.read_exact_at(&mut b, i * MARK_BYTES)?;
    Ok(decode(&b))
}

/// Newlines in `log[from..to]`, and where the last one ends (the start
/// of the line that holds `to`).
fn count_lines(log: &Path, from: u64, to: u64) -> io::Result<(u64, u64)> {
    let mut f = File::open(log)?;
    f.seek(SeekFrom::Start(from))?;
    let mut left = to.saturating_sub(from);
    let (mut count, mut line_start, mut at) = (0u64, from, from);
    let mut buf = vec![0u8; PIECE];
    while left > 0 {
        let want = left.min(PIECE as u64) as usize;
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        for i in memchr::memchr_iter(b'\n', &buf[..n]) {
            count += 1;
            line_start = at + i as u64 + 1;
        }
        at += n as u64;
        left -= n as u64;
    }
    Ok((count, line_start))
}

/// Where line `n` (0-based) starts, counting from `from` (which starts
/// line `first`): `None` when the log ends first.
fn start_of_line(log: &Path, from: u64, first: u64, n: u64) -> io::Result<Option<u64>> {
    if n == first {
        return Ok(Some(from));
    }
    let mut f = File::open(log)?;
    f.seek(SeekFrom::Start(from))?;
    let mut need = n - first;
    let mut at = from;
    let mut buf = vec![0u8; PIECE];
    loop {
        let got = f.read(&mut buf)?;
        if got == 0 {
            return Ok(None);
        }
        for i in memchr::memchr_iter(b'\n', &buf[..got]) {
            need -= 1;
            if need == 0 {
                return Ok(Some(at + i as u64 + 1));
            }
        }
        at += got as u64;
    }
}

/// The index, read by binary search (marks are sorted by offset and by
/// line alike).
struct Index {
    file: Option<File>,
    n: u64,
}

impl Index {
    fn open(idx: &Path, size: u64) -> io::Result<Index> {
        let file = match File::open(idx) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Index { file: None, n: 0 }),
            Err(e) => return Err(e),
        };
        let mut n = file.metadata()?.len() / MARK_BYTES;
        // Marks past the end (cut back at the next start) are not read.
        while n > 0 && mark_at(&file, n - 1)?.offset > size {
            n -= 1;
        }
        Ok(Index {
            file: Some(file),
            n,
        })
    }

    fn at(&self, i: u64) -> io::Result<LogTime> {
        mark_at(self.file.as_ref().expect("n > 0 only with a file"), i)
    }

    /// The last mark for which `before` holds (a prefix of the marks),
    /// with its position.
    fn last_where(&self, before: impl Fn(&LogTime) -> bool) -> io::Result<Option<(u64, LogTime)>> {
        let (mut lo, mut hi) = (0u64, self.n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if before(&self.at(mid)?) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            return Ok(None);
        }
        Ok(Some((lo - 1, self.at(lo - 1)?)))
    }

    /// Receive times from mark `i` on, covering at least 1 MiB past `offset`.
    fn times(&self, i: u64, offset: u64) -> io::Result<Vec<LogTime>> {
        let mut out = Vec::new();
        let mut j = i;
        while j < self.n && out.len() < MAX_TIMES {
            let m = self.at(j)?;
            if m.offset > offset.saturating_add(PIECE as u64) {
                break;
            }
            out.push(m);
            j += 1;
        }
        Ok(out)
    }
}

/// Answers a `find_in_log` from the task's folder.
pub fn find(task_dir: &Path, find: &LogFind) -> io::Result<LogFinding> {
    let log = task_dir.join("log");
    let size = std::fs::metadata(&log)?.len();
    let index = Index::open(&task_dir.join("log.idx"), size)?;
    match find {
        LogFind::Text { text, offset, skip } => {
            search(&log, text.as_bytes(), (*offset).min(size), size, *skip).map(LogFinding::Matches)
        }
        LogFind::Line { line } => place_of_line(&log, &index, size, *line).map(LogFinding::Place),
        LogFind::Offset { offset } => {
            place_of_offset(&log, &index, size, (*offset).min(size)).map(LogFinding::Place)
        }
    }
}

/// The log's length in lines: from the last mark on.
fn total_lines(log: &Path, index: &Index, size: u64) -> io::Result<u64> {
    let last = if index.n > 0 {
        index.at(index.n - 1)?
    } else {
        LogTime::default()
    };
    Ok(last.line + count_lines(log, last.offset, size)?.0)
}

fn place_of_line(log: &Path, index: &Index, size: u64, line: u64) -> io::Result<LogPlace> {
    let n = line.saturating_sub(1);
    let lines = total_lines(log, index, size)?;
    let (i, mark) = index.last_where(|m| m.line <= n)?.unwrap_or_default();
    let offset = if n >= lines {
        None
    } else {
        start_of_line(log, mark.offset, mark.line, n)?
    };
    let Some(offset) = offset else {
        return Ok(LogPlace {
            offset: size,
            line: lines + 1,
            size,
            lines,
            times: Vec::new(),
        });
    };
    Ok(LogPlace {
        offset,
        line: n + 1,
        size,
        lines,
        times: if index.n > 0 {
            index.times(i, offset)?
        } else {
            Vec::new()
        },
    })
}

fn place_of_offset(log: &Path, index: &Index, size: u64, offset: u64) -> io::Result<LogPlace> {
    let lines = total_lines(log, index, size)?;
    let (i, mark) = index
        .last_where(|m| m.offset <= offset)?
        .unwrap_or_default();
    // The newlines before `offset` (a newline at `offset` ends the line
    // that holds it, so it is not counted).
    let (count, start) = count_lines(log, mark.offset, offset)?;
    Ok(LogPlace {
        offset: start,
        line: mark.line + count + 1,
        size,
        lines,
        times: if index.n > 0 {
            index.times(i, start)?
        } else {
            Vec::new()
        },
    })
}

/// Lines holding `text` in whole lines from `from`, up to
/// `SEARCH_CHUNK` bytes.
fn search(log: &Path, text: &[u8], from: u64, size: u64, skip: u64) -> io::Result<LogMatches> {
    let finder = memchr::memmem::Finder::new(text);
    let mut f = File::open(log)?;
    f.seek(SeekFrom::Start(from))?;
    let mut found = LogMatches {
        from,
        to: from,
        ..LogMatches::default()
    };
    // `buf[..filled]` holds bytes from `found.to` on.
    let mut buf = vec![0u8; PIECE];
    let mut filled = 0usize;
    let mut at_end = false;
    while !at_end && found.to - from < SEARCH_CHUNK {
        if filled == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let left = size.saturating_sub(found.to + filled as u64);
        let room = (buf.len() - filled).min(usize::try_from(left).unwrap_or(usize::MAX));
        let got = if room == 0 {
            0
        } else {
            f.read(&mut buf[filled..filled + room])?
        };
        filled += got;
        at_end = got == 0;
        // Whole lines only, but for the log's last bytes.
        let whole = if at_end {
            filled
        } else {
            match memchr::memrchr(b'\n', &buf[..filled]) {
                Some(i) => i + 1,
                // A line longer than a piece of the search: taken whole.
                None if filled >= SEARCH_CHUNK as usize => filled,
                None => continue,
            }
        };
        let mut pos = 0usize;
        while let Some(i) = finder.find(&buf[pos..whole]) {
            let hit = pos + i;
            let start = memchr::memrchr(b'\n', &buf[pos..hit]).map_or(pos, |j| pos + j + 1);
            found.count += 1;
            if found.count > skip && found.offsets.len() < MAX_MATCHES {
                found.offsets.push(found.to + start as u64);
            }
            pos = memchr::memchr(b'\n', &buf[hit..whole]).map_or(whole, |j| hit + j + 1);
        }
        found.to += whole as u64;
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
    found.eof = found.to >= size;
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `lines` as the serving loop does, one batch per `batch`
    /// lines, a second apart.
    fn log_of(dir: &Path, lines: &[String], batch: usize) {
        let (log, idx) = (dir.join("log"), dir.join("log.idx"));
        let mut marker = Marker::recover(&log, &idx).unwrap().unwrap();
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut at = 0u64;
        for (k, chunk) in lines.chunks(batch).enumerate() {
            let text: Vec<u8> = chunk
                .iter()
                .flat_map(|l| format!("{l}\n").into_bytes())
                .collect();
            if let Some(m) = marker.note(at, &text, 1_000_000 + k as u64 * 1000) {
                append_mark(&idx, &m).unwrap();
            }
            f.write_all(&text).unwrap();
            at += text.len() as u64;
        }
    }

    fn lines(n: usize) -> Vec<String> {
        (1..=n)
            .map(|i| {
                if i % 7 == 0 {
                    format!("line {i} WARNING something")
                } else {
                    format!("line {i} {}", "x".repeat(i % 50))
                }
            })
            .collect()
    }

    fn place(dir: &Path, find: LogFind) -> LogPlace {
        match super::find(dir, &find).unwrap() {
            LogFinding::Place(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn lines_are_found_by_number_and_by_byte_with_and_without_an_index() {
        let all = lines(20_000);
        let text: String = all.iter().map(|l| format!("{l}\n")).collect();
        for indexed in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            if indexed {
                log_of(dir.path(), &all, 37);
                assert!(std::fs::metadata(dir.path().join("log.idx")).unwrap().len() > 0);
            } else {
                std::fs::write(dir.path().join("log"), &text).unwrap();
            }
            for n in [1u64, 2, 37, 38, 9_999, 20_000] {
                let p = place(dir.path(), LogFind::Line { line: n });
                let want = all[..n as usize - 1]
                    .iter()
                    .map(|l| l.len() as u64 + 1)
                    .sum::<u64>();
                assert_eq!((p.offset, p.line, p.lines), (want, n, 20_000), "line {n}");
                assert!(text[p.offset as usize..].starts_with(&format!("line {n} ")));
                // Any byte of the line finds the line.
                let q = place(dir.path(), LogFind::Offset { offset: want + 3 });
                assert_eq!((q.offset, q.line), (want, n));
                assert_eq!(indexed, !q.times.is_empty());
            }
            let past = place(dir.path(), LogFind::Line { line: 20_001 });
            assert_eq!((past.offset, past.line), (text.len() as u64, 20_001));
        }
    }

    #[test]
    fn receive_times_cover_the_place_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let all = lines(1_000);
        log_of(dir.path(), &all, 10);
        let p = place(dir.path(), LogFind::Line { line: 555 });
        // Batch 55 (lines 551..560) was received at 1 000 000 + 55 000 ms.
        let t = p.times.iter().rev().find(|t| t.offset <= p.offset).unwrap();
        assert_eq!((t.line, t.at_ms), (550, 1_055_000));
    }

    #[test]
    fn a_search_counts_every_matching_line_and_gives_the_offsets_from_skip_on() {
        let dir = tempfile::tempdir().unwrap();
        let all = lines(50_000);
        log_of(dir.path(), &all, 100);
        let text: String = all.iter().map(|l| format!("{l}\n")).collect();
        let want = all.iter().filter(|l| l.contains("WARNING")).count() as u64;
        let LogFinding::Matches(m) = find(
            dir.path(),
            &LogFind::Text {
                text: "WARNING".into(),
                offset: 0,
                skip: 999,
            },
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!((m.count, m.eof, m.to), (want, true, text.len() as u64));
        // The 1000th match is line 7000.
        assert!(text[m.offsets[0] as usize..].starts_with("line 7000 WARNING"));
        assert_eq!(m.offsets.len(), MAX_MATCHES);
    }

    #[test]
    fn a_reopened_marker_goes_on_counting_and_drops_marks_past_a_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (log, idx) = (dir.path().join("log"), dir.path().join("log.idx"));
        log_of(dir.path(), &lines(100), 10);
        let size = std::fs::metadata(&log).unwrap().len();
        let mut m = Marker::recover(&log, &idx).unwrap().unwrap();
        assert_eq!(m.lines, 100);
        // A mark past the end (a torn write was cut back) is dropped.
        append_mark(
            &idx,
            &LogTime {
                offset: size + 10,
                line: 200,
                at_ms: 5,
            },
        )
        .unwrap();
        let before = std::fs::metadata(&idx).unwrap().len();
        m = Marker::recover(&log, &idx).unwrap().unwrap();
        assert_eq!(std::fs::metadata(&idx).unwrap().len(), before - MARK_BYTES);
        assert_eq!(m.lines, 100);
        // A log without an index stays without one.
        std::fs::remove_file(&idx).unwrap();
        assert!(Marker::recover(&log, &idx).unwrap().is_none());
    }
}
