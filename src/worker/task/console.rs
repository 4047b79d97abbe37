//! The device's serial console, owned by the worker for the device's whole
//! life: opened when the worker starts, read continuously (not only during
//! tasks) on a thread of its own into a bounded on-disk ring, so the boot
//! output of a freshly flashed device is never missed. While a task runs
//! its lines are also handed to the task (live, as `serial` log lines),
//! and when it ends the console record of its window (with a pre-task
//! window) becomes its `serial.log` result file.
//!
//! The record is lossless: one line per console line or piece, each
//! `TIMESTAMP FLAG BYTES\n` where TIMESTAMP is UTC
//! (`2026-11-26T13:59:14.123Z`), FLAG is `|` for a line that ended with a
//! newline in the stream (the newline is the record's own), `+` for a
//! piece without one (a prompt, a line cut at 4 KiB, what was pending when
//! the console went quiet), `!` for a note of the worker (console lost,
//! back) and `>` for bytes written *to* the device; BYTES are the raw
//! bytes, invalid UTF-8 and control characters included. A console that
//! disappears (USB re-enumeration) is reopened with backoff; the gap is
//! marked once.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// Longest piece of a line without newline kept as one record.
pub const MAX_PIECE: usize = 4096;
/// Lines queued for the running task at most; more are dropped from the
/// live view (counted) — the task's serial.log still has them.
const TAP_LINES: usize = 10_000;

/// `[serial]` of the worker configuration.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SerialConfig {
    /// The console's device (`/dev/ttyUSB0`, a `/dev/serial/by-id/…`
    /// link); empty: no console.
    pub port: String,
    pub baud: u32,
    /// 5–8.
    pub data_bits: u8,
    /// `none`, `odd` or `even`.
    pub parity: String,
    /// 1 or 2.
    pub stop_bits: u8,
    /// `none`, `software` or `hardware`.
    pub flow_control: String,
    /// Bytes of console record kept on disk (oldest go first).
    pub ring_bytes: u64,
    /// How much console output before a task starts goes into its
    /// serial.log (boot output of a just-flashed device).
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub pre_task_ms: u64,
    /// Console actions for every task, unless the testrun's options
    /// (`console.send`, `console.expect`, `console.expect_timeout`) say
    /// otherwise: text to send at the task's start (`\r`, `\n`, `\xNN`),
    /// and a text to wait for before the conductor runs.
    pub send: String,
    pub expect: String,
    #[serde(deserialize_with = "crate::settings::duration::ms")]
    pub expect_timeout_ms: u64,
}

impl Default for SerialConfig {
    fn default() -> Self {
        SerialConfig {
            port: String::new(),
            baud: 115_200,
            data_bits: 8,
            parity: "none".into(),
            stop_bits: 1,
            flow_control: "none".into(),
            ring_bytes: 64 << 20,
            pre_task_ms: 60_000,
            send: String::new(),
            expect: String::new(),
            expect_timeout_ms: 60_000,
        }
    }
}

impl SerialConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.port.is_empty() {
            return Ok(());
        }
        if !(5..=8).contains(&self.data_bits) {
            return Err(format!(
                "serial.data_bits = {}: must be 5–8",
                self.data_bits
            ));
        }
        if !matches!(self.stop_bits, 1 | 2) {
            return Err(format!(
                "serial.stop_bits = {}: must be 1 or 2",
                self.stop_bits
            ));
        }
        if !matches!(self.parity.as_str(), "none" | "odd" | "even") {
            return Err(format!(
                "serial.parity = {:?}: must be none, odd or even",
                self.parity
            ));
        }
        if !matches!(self.flow_control.as_str(), "none" | "software" | "hardware") {
            return Err(format!(
                "serial.flow_control = {:?}: must be none, software or hardware",
                self.flow_control
            ));
        }
        if self.baud == 0 || self.ring_bytes < 64 * 1024 {
            return Err("serial.baud must be > 0 and serial.ring_bytes at least 65536".into());
        }
        Ok(())
    }
}

/// UTC timestamp of a record, fixed width (sorts as text).
pub fn stamp(ms: u64) -> String {
    crate::clock::iso(ms)
}

fn now_ms() -> u64 {
    crate::protocol::limits::unix_ms_now()
}

/// The on-disk ring: numbered segment files in a folder, the oldest
/// removed while the total is over the bound.
struct Ring {
    dir: PathBuf,
    segment_bytes: u64,
    max_bytes: u64,
    segments: VecDeque<(u64, u64)>, // (number, bytes)
    current: Option<File>,
}

impl Ring {
    fn open(dir: &Path, max_bytes: u64) -> std::io::Result<Ring> {
        fs::create_dir_all(dir)?;
        let mut segments: Vec<(u64, u64)> = fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.strip_suffix(".log")?.parse().ok()?;
                Some((n, e.metadata().ok()?.len()))
            })
            .collect();
        segments.sort();
        Ok(Ring {
            dir: dir.to_path_buf(),
            segment_bytes: (max_bytes / 4).max(16 * 1024),
            max_bytes,
            segments: segments.into(),
            current: None,
        })
    }

    fn path(&self, n: u64) -> PathBuf {
        self.dir.join(format!("{n:012}.log"))
    }

    fn append(&mut self, record: &[u8]) -> std::io::Result<()> {
        let full = self
            .segments
            .back()
            .is_none_or(|(_, b)| *b >= self.segment_bytes);
        if full || self.current.is_none() {
            let n = if full {
                self.segments.back().map_or(0, |(n, _)| n + 1)
            } else {
                self.segments.back().map_or(0, |(n, _)| *n)
            };
            if full {
                self.segments.push_back((n, 0));
            }
            self.current = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.path(n))?,
            );
            while self.segments.iter().map(|(_, b)| b).sum::<u64>() > self.max_bytes
                && self.segments.len() > 1
            {
                if let Some((old, _)) = self.segments.pop_front() {
                    let _ = fs::remove_file(self.path(old));
                }
            }
        }
        self.current.as_mut().expect("opened").write_all(record)?;
        if let Some((_, b)) = self.segments.back_mut() {
            *b += record.len() as u64;
        }
        Ok(())
    }

    /// The segment files, oldest first, everything appended so far on
    /// disk: read outside the console's lock (see [`copy_since`]).
    fn snapshot(&mut self) -> std::io::Result<Vec<PathBuf>> {
        if let Some(f) = self.current.as_mut() {
            f.flush()?;
        }
        Ok(self.segments.iter().map(|(n, _)| self.path(*n)).collect())
    }
}

/// Copies the records of `segments` stamped at or after `since` (a text
/// comparison of the fixed-width stamps) into `out`, streaming. A record
/// still being appended (no newline yet) is left out; a segment the ring
/// dropped meanwhile is skipped.
fn copy_since(segments: &[PathBuf], since: &str, out: &mut impl Write) -> std::io::Result<u64> {
    use std::io::BufRead;
    let mut written = 0u64;
    let mut record = Vec::new();
    for path in segments {
        let Ok(f) = File::open(path) else { continue };
        let mut reader = std::io::BufReader::new(f);
        loop {
            record.clear();
            if reader.read_until(b'\n', &mut record)? == 0 || record.last() != Some(&b'\n') {
                break;
            }
            if record.len() >= 24 && &record[..24] >= since.as_bytes() {
                out.write_all(&record)?;
                written += record.len() as u64;
            }
        }
    }
    Ok(written)
}

/// A console line (or piece) for the running task's live view.
#[derive(Clone, Debug)]
pub struct ConsoleLine {
    pub bytes: Vec<u8>,
    /// False for a piece without newline.
    pub complete: bool,
}

struct Shared {
    ring: Ring,
    /// The running task's live view, while one runs.
    tap: Option<tokio::sync::mpsc::Sender<ConsoleLine>>,
    tap_dropped: u64,
    /// Bytes to write to the device.
    outbox: VecDeque<Vec<u8>>,
    /// A second handle on the open port: bytes to the device are written
    /// at once by whoever sends them (a keystroke does not wait for the
    /// reader's timeout); while the port is closed they wait in `outbox`.
    writer: Option<serialport::TTYPort>,
    /// Appending to the ring fails (disk full): said once, not per line.
    write_failing: bool,
    /// The raw bytes from the device, for the conductor's re-exported
    /// console while a task runs (dropped when it does not keep up).
    export: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    available: Result<(), String>,
    /// The raw bytes from the device for a lease's consoles, each chunk
    /// with its offset (chunks the hold did not take in time are counted
    /// in the offsets all the same: a gap the server counts as lost).
    raw: Option<tokio::sync::mpsc::Sender<(u64, Vec<u8>)>>,
    raw_offset: u64,
    /// Lease input written, per input stream (the last [`INPUT_STREAMS`]):
    /// how far each is written, whichever task wrote it.
    typed: VecDeque<(String, u64)>,
}

/// Input streams remembered for exactly-once lease input.
const INPUT_STREAMS: usize = 64;

/// The console, shared between its reader thread and the worker.
#[derive(Clone)]
pub struct Console {
    shared: Arc<Mutex<Shared>>,
    cfg: SerialConfig,
}

impl Console {
    /// Starts the console of `cfg` (its ring under `state_dir/console`):
    /// a missing port is a warning, not an error; it is retried.
    pub fn start(cfg: &SerialConfig, state_dir: &Path) -> std::io::Result<Console> {
        let ring = Ring::open(&state_dir.join("console"), cfg.ring_bytes)?;
        let console = Console {
            shared: Arc::new(Mutex::new(Shared {
                ring,
                tap: None,
                tap_dropped: 0,
                outbox: VecDeque::new(),
                writer: None,
                write_failing: false,
                export: None,
                available: Err("not opened yet".into()),
                raw: None,
                raw_offset: 0,
                typed: VecDeque::new(),
            })),
            cfg: cfg.clone(),
        };
        let c = console.clone();
        std::thread::Builder::new()
            .name("ots-console".into())
            .spawn(move || c.run())?;
        Ok(console)
    }

    pub fn pre_task(&self) -> Duration {
        Duration::from_millis(self.cfg.pre_task_ms)
    }

    /// The configured console actions: (send, expect, expect timeout).
    pub fn actions(&self) -> (&str, &str, Duration) {
        (
            &self.cfg.send,
            &self.cfg.expect,
            Duration::from_millis(self.cfg.expect_timeout_ms),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic elsewhere ends the process (fatal::exit_on_panic).
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the console is open, or why not.
    pub fn available(&self) -> Result<(), String> {
        self.lock().available.clone()
    }

    /// Starts handing lines to the running task (at most [`TAP_LINES`]
    /// queued; more are dropped from the live view and counted).
    pub fn tap(&self) -> tokio::sync::mpsc::Receiver<ConsoleLine> {
        let (tx, rx) = tokio::sync::mpsc::channel(TAP_LINES);
        let mut s = self.lock();
        s.tap = Some(tx);
        s.tap_dropped = 0;
        rx
    }

    /// Stops the live view; returns how many lines it dropped.
    pub fn untap(&self) -> u64 {
        let mut s = self.lock();
        s.tap = None;
        s.tap_dropped
    }

    /// Re-exports the console to the task's conductor on a fresh
    /// pseudo-terminal: what the device says is copied to it, what the
    /// conductor writes goes to the device (and into the record). Returns
    /// its path (`{console}`); it lives until the returned guard drops.
    pub fn export(&self) -> std::io::Result<(PathBuf, ExportGuard)> {
        use serialport::SerialPort;
        let (mut master, slave) = serialport::TTYPort::pair().map_err(std::io::Error::other)?;
        let path = PathBuf::from(
            slave
                .name()
                .ok_or_else(|| std::io::Error::other("pty without a name"))?,
        );
        master
            .set_timeout(Duration::from_millis(50))
            .map_err(std::io::Error::other)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1024);
        self.lock().export = Some(tx);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (console, flag) = (self.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ots-console-export".into())
            .spawn(move || {
                let _slave = slave; // kept open: the master never sees a hangup
                let mut buf = vec![0u8; 16 * 1024];
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    while let Ok(bytes) = rx.try_recv() {
                        if master.write_all(&bytes).is_err() {
                            break;
                        }
                    }
                    match master.read(&mut buf) {
                        Ok(n) if n > 0 => console.send(buf[..n].to_vec()),
                        _ => {}
                    }
                }
            })?;
        Ok((
            path,
            ExportGuard {
                console: self.clone(),
                stop,
                thread: Some(thread),
            },
        ))
    }

    /// Starts handing the device's raw bytes to a lease's hold, numbered
    /// from `from` (at most 256 chunks queued; more are skipped, and the
    /// offsets say so).
    pub fn raw_tap(&self, from: u64) -> tokio::sync::mpsc::Receiver<(u64, Vec<u8>)> {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let mut s = self.lock();
        s.raw = Some(tx);
        s.raw_offset = from;
        rx
    }

    pub fn raw_untap(&self) {
        self.lock().raw = None;
    }

    /// What the device printed since `since_ms`, as bytes (a line's
    /// newline restored; the worker's notes and what was written to the
    /// device left out), the last `max` bytes at most.
    pub fn recent(&self, since_ms: u64, max: usize) -> std::io::Result<Vec<u8>> {
        let segments = self.lock().ring.snapshot()?;
        let mut records = Vec::new();
        copy_since(&segments, &stamp(since_ms), &mut records)?;
        let mut out = Vec::new();
        for record in records.split(|b| *b == b'\n') {
            // `TIMESTAMP FLAG BYTES`: 24 bytes of stamp, a space, the flag, a space.
            // A `>` record may hold a newline: what follows it is no record.
            if record.len() < 27 || record[10] != b'T' || record[23] != b'Z' || record[24] != b' ' {
                continue;
            }
            match record[25] {
                b'|' => {
                    out.extend_from_slice(&record[27..]);
                    out.push(b'\n');
                }
                b'+' => out.extend_from_slice(&record[27..]),
                _ => {}
            }
        }
        if out.len() > max {
            out.drain(..out.len() - max);
        }
        Ok(out)
    }

    /// Writes the bytes of input `stream` at `offset` that the device has
    /// not had yet (a resend, after the server or a connection was lost,
    /// repeats nothing); returns the bytes written. A stream first seen
    /// starts where it says.
    pub fn send_once(&self, stream: &str, offset: u64, bytes: &[u8]) -> Vec<u8> {
        let new = {
            let mut s = self.lock();
            let have = s
                .typed
                .iter()
                .find(|(id, _)| id == stream)
                .map_or(offset, |(_, h)| *h);
            let end = offset.saturating_add(bytes.len() as u64);
            if end <= have {
                return Vec::new();
            }
            let skip = have.saturating_sub(offset) as usize;
            s.typed.retain(|(id, _)| id != stream);
            s.typed.push_back((stream.to_string(), end));
            while s.typed.len() > INPUT_STREAMS {
                s.typed.pop_front();
            }
            bytes[skip..].to_vec()
        };
        if !new.is_empty() {
            self.send(new.clone());
        }
        new
    }

    /// Queues bytes to write to the device (recorded as `>` records).
    pub fn send(&self, bytes: Vec<u8>) {
        let mut s = self.lock();
        let _ = s.ring.append(&record(now_ms(), b'>', &bytes));
        if s.outbox.is_empty() {
            if let Some(w) = s.writer.as_mut() {
                if w.write_all(&bytes).is_ok() {
                    return;
                }
                // The reader finds the port gone and reopens it.
                s.writer = None;
            }
        }
        s.outbox.push_back(bytes);
    }

    /// Writes the record since `since_ms` into `path` (the task's
    /// serial.log).
    /// The copy happens outside the console's lock: the reader thread
    /// keeps reading the device meanwhile.
    pub fn extract(&self, since_ms: u64, path: &Path) -> std::io::Result<u64> {
        let segments = self.lock().ring.snapshot()?;
        let mut out = std::io::BufWriter::new(File::create(path)?);
        let n = copy_since(&segments, &stamp(since_ms), &mut out)?;
        out.flush()?;
        Ok(n)
    }

    fn note(&self, text: &str) {
        let mut s = self.lock();
        let _ = s.ring.append(&record(now_ms(), b'!', text.as_bytes()));
    }

    fn record_line(&self, bytes: &[u8], complete: bool) {
        let mut s = self.lock();
        let flag = if complete { b'|' } else { b'+' };
        match s.ring.append(&record(now_ms(), flag, bytes)) {
            // Said once per failure spell (a full disk fails every line).
            Err(e) if !s.write_failing => {
                s.write_failing = true;
                warn!(error = %e, "console: cannot write the console record (lines are lost from it until writing works again)");
            }
            Err(_) => {}
            Ok(()) if s.write_failing => {
                s.write_failing = false;
                info!("console: the console record is written again");
            }
            Ok(()) => {}
        }
        if let Some(tap) = &s.tap {
            let line = ConsoleLine {
                bytes: bytes.to_vec(),
                complete,
            };
            if tap.try_send(line).is_err() {
                s.tap_dropped += 1;
            }
        }
    }

    fn open_port(&self) -> serialport::Result<serialport::TTYPort> {
        let c = &self.cfg;
        serialport::new(&c.port, c.baud)
            .data_bits(match c.data_bits {
                5 => serialport::DataBits::Five,
                6 => serialport::DataBits::Six,
                7 => serialport::DataBits::Seven,
                _ => serialport::DataBits::Eight,
            })
            .parity(match c.parity.as_str() {
                "odd" => serialport::Parity::Odd,
                "even" => serialport::Parity::Even,
                _ => serialport::Parity::None,
            })
            .stop_bits(if c.stop_bits == 2 {
                serialport::StopBits::Two
            } else {
                serialport::StopBits::One
            })
            .flow_control(match c.flow_control.as_str() {
                "software" => serialport::FlowControl::Software,
                "hardware" => serialport::FlowControl::Hardware,
                _ => serialport::FlowControl::None,
            })
            .timeout(Duration::from_millis(50))
            .open_native()
    }

    /// The reader thread: open, read, split, record; reopen with backoff.
    fn run(self) {
        let mut backoff = Duration::from_millis(100);
        let mut down_since: Option<(u64, String)> = None;
        let mut first = true;
        loop {
            let mut port = match self.open_port() {
                Ok(p) => p,
                Err(e) => {
                    let why = e.to_string();
                    if down_since.is_none() {
                        if first {
                            warn!(port = %self.cfg.port, error = %why, "console unavailable at start; the worker serves tasks without it and keeps trying");
                        } else {
                            warn!(port = %self.cfg.port, error = %why, "console lost; reopening with backoff");
                        }
                        self.note(&format!(
                            "--- console {} unavailable: {why} ---",
                            self.cfg.port
                        ));
                        down_since = Some((now_ms(), why.clone()));
                    }
                    self.lock().available = Err(why);
                    first = false;
                    // The reader thread waits before trying again.
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            first = false;
            backoff = Duration::from_millis(100);
            if let Some((since, _)) = down_since.take() {
                let gap = now_ms().saturating_sub(since);
                info!(port = %self.cfg.port, gap_ms = gap, "console back");
                self.note(&format!(
                    "--- console {} back after {gap} ms ---",
                    self.cfg.port
                ));
            } else {
                info!(port = %self.cfg.port, "console open");
            }
            {
                let mut s = self.lock();
                s.available = Ok(());
                s.writer = port.try_clone_native().ok();
            }
            let why = self.read_until_gone(&mut port);
            self.lock().writer = None;
            drop(port);
            warn!(port = %self.cfg.port, error = %why, "console lost; reopening with backoff");
            self.note(&format!("--- console {} lost: {why} ---", self.cfg.port));
            down_since = Some((now_ms(), why.clone()));
            self.lock().available = Err(why);
        }
    }

    /// Reads until the port fails; returns why.
    fn read_until_gone(&self, port: &mut serialport::TTYPort) -> String {
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let out: Vec<Vec<u8>> = self.lock().outbox.drain(..).collect();
            for bytes in out {
                if let Err(e) = port.write_all(&bytes) {
                    return format!("write failed: {e}");
                }
            }
            match port.read(&mut buf) {
                Ok(0) => {
                    if !pending.is_empty() {
                        self.record_line(&std::mem::take(&mut pending), false);
                    }
                    return "end of file (device closed)".into();
                }
                Ok(n) => {
                    {
                        let mut s = self.lock();
                        if let Some(export) = &s.export {
                            let _ = export.try_send(buf[..n].to_vec());
                        }
                        if let Some(raw) = &s.raw {
                            let _ = raw.try_send((s.raw_offset, buf[..n].to_vec()));
                        }
                        s.raw_offset = s.raw_offset.saturating_add(n as u64);
                    }
                    for &b in &buf[..n] {
                        if b == b'\n' {
                            self.record_line(&std::mem::take(&mut pending), true);
                        } else {
                            pending.push(b);
                            if pending.len() >= MAX_PIECE {
                                self.record_line(&std::mem::take(&mut pending), false);
                            }
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    // Quiet: what is pending (a prompt) is recorded now.
                    if !pending.is_empty() {
                        self.record_line(&std::mem::take(&mut pending), false);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    if !pending.is_empty() {
                        self.record_line(&std::mem::take(&mut pending), false);
                    }
                    return e.to_string();
                }
            }
        }
    }
}

/// Ends a re-exported console when dropped (the task ended).
pub struct ExportGuard {
    console: Console,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for ExportGuard {
    fn drop(&mut self) {
        self.console.lock().export = None;
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn record(ms: u64, flag: u8, bytes: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(bytes.len() + 28);
    r.extend_from_slice(stamp(ms).as_bytes());
    r.push(b' ');
    r.push(flag);
    r.push(b' ');
    r.extend_from_slice(bytes);
    r.push(b'\n');
    r
}

/// A console line for the live view: valid UTF-8 kept, anything else
/// (and control characters but tab) escaped as `\xNN`, so a device's
/// binary noise cannot drive a terminal or break the log.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() && c != '\t' {
                out.push_str(&format!("\\x{:02x}", c as u32));
            } else {
                out.push(c);
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Turns `\r`, `\n`, `\t`, `\\` and `\xNN` in a console action's text
/// (`console.send`) into bytes.
pub fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b't' => out.push(b'\t'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let hex = b
                        .get(i + 2..i + 4)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(v) => {
                            out.push(v);
                            i += 4;
                            continue;
                        }
                        None => out.extend_from_slice(b"\\x"),
                    }
                }
                other => {
                    out.push(b'\\');
                    out.push(other);
                }
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_sort_as_text_and_escapes_keep_noise_harmless() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(stamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert!(stamp(999) < stamp(1000));
        assert_eq!(escape(b"ok \xff\x1b[2J\tend"), "ok \\xff\\x1b[2J\tend");
        assert_eq!(unescape("root\\r\\n\\x03"), b"root\r\n\x03".to_vec());
    }

    #[test]
    fn the_ring_keeps_its_bound_and_finds_records_by_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut ring = Ring::open(dir.path(), 64 * 1024).unwrap();
        for i in 0..10_000u64 {
            ring.append(&record(1_000_000 + i, b'|', format!("line {i}").as_bytes()))
                .unwrap();
        }
        let total: u64 = fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum();
        assert!(total <= 64 * 1024 + 16 * 1024, "{total}");
        let mut out = Vec::new();
        let segments = ring.snapshot().unwrap();
        copy_since(&segments, &stamp(1_000_000 + 9_990), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 10, "{text}");
        assert!(text.ends_with("| line 9999\n"));
    }
}
