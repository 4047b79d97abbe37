//! A raw ZMTP 3.0 peer on a plain `TcpStream`: enough to be any hostile or
//! broken peer (oversized frame headers, garbage after the handshake, half
//! handshakes, connections that never read), and to play a rogue server
//! towards a worker.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// `tcp://HOST:PORT` → `HOST:PORT`.
pub fn addr(endpoint: &str) -> String {
    endpoint.trim_start_matches("tcp://").to_string()
}

/// The 64-byte ZMTP 3.0 greeting, NULL mechanism.
pub fn greeting(as_server: bool) -> Vec<u8> {
    let mut g = vec![0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 0;
    g[12..16].copy_from_slice(b"NULL");
    g[32] = u8::from(as_server);
    g
}

/// A READY command frame for `socket_type` (e.g. "DEALER", "ROUTER").
pub fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = vec![5u8];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// A long frame header (flag 0x02) declaring `len` bytes, nothing after.
pub fn long_header(len: u64) -> Vec<u8> {
    let mut f = vec![0x02];
    f.extend_from_slice(&len.to_be_bytes());
    f
}

/// Encodes a multipart message as ZMTP frames.
pub fn frames(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let more = u8::from(i + 1 < parts.len());
        if p.len() > 255 {
            out.push(0x02 | more);
            out.extend_from_slice(&(p.len() as u64).to_be_bytes());
        } else {
            out.push(more);
            out.push(p.len() as u8);
        }
        out.extend_from_slice(p);
    }
    out
}

/// Connects and completes the handshake as `socket_type`; the peer's
/// greeting and READY are read and discarded.
pub fn handshake(endpoint: &str, socket_type: &str) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(addr(endpoint))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // A peer that stops reading must not block an attacker thread forever.
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(&greeting(false))?;
    let mut g = [0u8; 64];
    s.read_exact(&mut g)?;
    s.write_all(&ready(socket_type))?;
    read_frame(&mut s)?;
    Ok(s)
}

/// Reads one frame (flags, body).
pub fn read_frame(s: &mut TcpStream) -> std::io::Result<(u8, Vec<u8>)> {
    let mut flags = [0u8; 1];
    s.read_exact(&mut flags)?;
    let len = if flags[0] & 0x02 != 0 {
        let mut l = [0u8; 8];
        s.read_exact(&mut l)?;
        u64::from_be_bytes(l)
    } else {
        let mut l = [0u8; 1];
        s.read_exact(&mut l)?;
        u64::from(l[0])
    };
    assert!(len < 64 << 20, "peer declared a {len}-byte frame");
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body)?;
    Ok((flags[0], body))
}

/// Reads one whole message (all frames up to one without MORE).
pub fn read_message(s: &mut TcpStream) -> std::io::Result<Vec<Vec<u8>>> {
    let mut parts = Vec::new();
    loop {
        let (flags, body) = read_frame(s)?;
        if flags & 0x04 != 0 {
            continue; // a command (READY and the like)
        }
        parts.push(body);
        if flags & 0x01 == 0 {
            return Ok(parts);
        }
    }
}

/// A rogue server's accepted connection: handshake done as `socket_type`.
pub fn accept(listener: &TcpListener, socket_type: &str) -> std::io::Result<TcpStream> {
    let (mut s, _) = listener.accept()?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut g = [0u8; 64];
    s.read_exact(&mut g)?;
    s.write_all(&greeting(true))?;
    s.write_all(&ready(socket_type))?;
    Ok(s)
}

/// Resident set size of a process, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// CPU time (user + system) of a process so far, in clock ticks.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    utime + stime
}

/// Raises this process's open-file soft limit to its hard limit, so a test
/// can hold thousands of connections.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}
