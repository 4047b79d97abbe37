//! A small HTTP/1.1 client over a plain TCP socket, for the dashboard's
//! tests: what a browser sends (cookies, `Last-Event-ID`), nothing hidden.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// `http://127.0.0.1:PORT` → `127.0.0.1:PORT`.
pub fn host(base: &str) -> &str {
    base.trim_start_matches("http://").trim_end_matches('/')
}

fn connect(base: &str) -> TcpStream {
    let s = TcpStream::connect(host(base)).expect("dashboard reachable");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn send_head(
    s: &mut TcpStream,
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
        host(base)
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
}

fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// One request; the whole response (chunked bodies decoded).
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = connect(base);
    send_head(&mut s, base, method, path, headers, body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(n) = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.resize(n, 0);
        r.read_exact(&mut body).unwrap();
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Response {
        status,
        headers,
        body,
    }
}

pub fn get(base: &str, path: &str, cookie: Option<&str>) -> Response {
    let c = cookie.map(|c| format!("ots_session={c}"));
    let headers: Vec<(&str, &str)> = c.iter().map(|c| ("Cookie", c.as_str())).collect();
    request(base, "GET", path, &headers, b"")
}

/// Opens a sign-in link as a browser does when the user pastes it (it
/// says `Sec-Fetch-Site: none`); the session cookie it set.
pub fn sign_in(link: &str) -> String {
    let (base, path) = link.split_at(link.find("/login").expect("a /login link"));
    let r = request(base, "GET", path, &[("Sec-Fetch-Site", "none")], b"");
    assert_eq!(r.status, 303, "sign-in: {}", r.text());
    let cookie = r.header("set-cookie").expect("a cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attr), "cookie {cookie:?} lacks {attr}");
    }
    cookie
        .split(';')
        .next()
        .unwrap()
        .trim_start_matches("ots_session=")
        .to_string()
}

/// An event of a server-sent event stream.
#[derive(Debug, Clone, Default)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

/// Reads a server-sent event stream until `done` says so (given all
/// events so far), the stream ends, or `limit` passes.
pub fn events(
    base: &str,
    path: &str,
    headers: &[(&str, &str)],
    limit: Duration,
    done: impl Fn(&[Event]) -> bool,
) -> (u16, Vec<Event>) {
    let mut s = connect(base);
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    send_head(&mut s, base, "GET", path, headers, b"");
    let deadline = Instant::now() + limit;
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    // Head first.
    let head_end = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        assert!(Instant::now() < deadline, "no response head");
        match s.read(&mut buf) {
            Ok(0) => panic!("closed before the head"),
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(_) => continue,
        }
    };
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body: Vec<u8> = raw[head_end..].to_vec();
    let mut ended = status != 200;
    let out = loop {
        // Decode whole chunks of the chunked body into event text.
        let mut text = Vec::new();
        let mut rest = &body[..];
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let n = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if n == 0 {
                ended = true;
                break;
            }
            if rest.len() < eol + 2 + n + 2 {
                break;
            }
            text.extend_from_slice(&rest[eol + 2..eol + 2 + n]);
            rest = &rest[eol + 2 + n + 2..];
        }
        let out = parse_events(&String::from_utf8_lossy(&text));
        if ended || done(&out) || Instant::now() >= deadline {
            break out;
        }
        match s.read(&mut buf) {
            Ok(0) => break out,
            Ok(n) => body.extend_from_slice(&buf[..n]),
            Err(_) => continue,
        }
    };
    (status, out)
}

fn parse_events(text: &str) -> Vec<Event> {
    let mut out = Vec::new();
    // Only complete events (ended by a blank line).
    let complete = match text.rfind("\n\n") {
        Some(i) => &text[..i + 2],
        None => return out,
    };
    for block in complete.split("\n\n") {
        let mut e = Event::default();
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                e.id = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("event:") {
                e.event = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
            }
        }
        if !e.event.is_empty() || !data.is_empty() {
            e.data = data.join("\n");
            out.push(e);
        }
    }
    out
}

/// A TCP connection to the dashboard from source address `from`
/// (127.0.0.x: loopback has them all), as another machine would.
pub fn connect_from(
    rt: &tokio::runtime::Runtime,
    from: [u8; 4],
    base: &str,
) -> std::net::TcpStream {
    let to: std::net::SocketAddr = host(base).parse().unwrap();
    let s = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind((std::net::Ipv4Addr::from(from), 0).into())
            .unwrap();
        socket.connect(to).await
    });
    let s = s.unwrap().into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}
