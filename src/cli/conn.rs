//! What every command shares: the connection to the server (`--server`,
//! keys, timeout) and how a failure or a verdict becomes the exit status.

use crate::client::{exit, Client, ClientError};
use crate::protocol::{RunState, RunStatus, Verdict};
use crate::security::{Credentials, KeyPair, PublicKey};
use crate::text::escape_controls;
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// Where the server is and how to talk to it.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Server control endpoint, or a comma-separated list of the servers
    /// that may lead (a leader and its standby): the first that answers
    /// is used, and a reconnect tries them all.
    /// `HOST:PORT` means `tcp://HOST:PORT`.
    #[arg(long, env = "OTS_SERVER", default_value = "tcp://127.0.0.1:5555", value_parser = parse_server)]
    pub server: String,
    /// `noise` (authenticate with --key, pin --server-key) or `none` (a
    /// server configured with security = "none").
    #[arg(long, env = "OTS_SECURITY", default_value = "noise")]
    pub security: crate::security::SecurityMode,
    /// Our private key (`ots-submit keygen`) [default:
    /// ~/.config/ots/me.key].
    #[arg(long, env = "OTS_KEY")]
    pub key: Option<PathBuf>,
    /// The server's public key [default: ~/.config/ots/server.pub, else
    /// /etc/ots/server.pub]. (`OTS_SERVER_KEY` is the server's own
    /// private key, to ots-server only.)
    #[arg(long, env = "OTS_PINNED_SERVER_KEY")]
    pub server_key: Option<PathBuf>,
    /// Give up on an unanswered request after this long.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Print machine-readable JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The connection options ([`Conn`]) that take a value.
const CONN_VALUED: [&str; 5] = [
    "--server",
    "--security",
    "--key",
    "--server-key",
    "--connect-timeout",
];

/// Connection options given before the subcommand (`ots-submit --server
/// X runs`) moved after it, where clap reads them (each subcommand has
/// its own [`Conn`]): placed at the end, before a `--` if there is one.
/// Pure; anything else is left as it was, for clap to judge.
pub fn hoist_global_options(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut rest = args.into_iter();
    let Some(program) = rest.next() else {
        return Vec::new();
    };
    let mut hoisted = Vec::new();
    let mut rest: std::collections::VecDeque<_> = rest.collect();
    while let Some(a) = rest.front().and_then(|a| a.to_str()).map(str::to_string) {
        let name = a.split_once('=').map_or(a.as_str(), |(n, _)| n);
        let valued = CONN_VALUED.contains(&name);
        if name != "--json" && !valued {
            break;
        }
        hoisted.extend(rest.pop_front());
        if valued && !a.contains('=') {
            hoisted.extend(rest.pop_front());
        }
    }
    let mut rest: Vec<_> = rest.into();
    if hoisted.is_empty() || rest.is_empty() {
        // Nothing moved, or no subcommand follows: clap says what is wrong.
        return std::iter::once(program)
            .chain(hoisted)
            .chain(rest)
            .collect();
    }
    let at = rest.iter().position(|a| a == "--").unwrap_or(rest.len());
    let tail = rest.split_off(at);
    std::iter::once(program)
        .chain(rest)
        .chain(hoisted)
        .chain(tail)
        .collect()
}

/// A `--server` value: each comma-separated endpoint `tcp://HOST:PORT`,
/// or `HOST:PORT` for it; anything else is refused naming the form.
pub fn parse_server(text: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for entry in text.split(',').map(str::trim) {
        let address = match entry.split_once("://") {
            Some(("tcp", rest)) => rest,
            Some((scheme, _)) => {
                return Err(format!(
                    "{entry:?}: ots speaks tcp only; give tcp://HOST:PORT or HOST:PORT, not {scheme}://"
                ))
            }
            None => entry,
        };
        let port = address
            .rsplit_once(':')
            .map(|(host, port)| (host, port.parse::<u16>()));
        match port {
            Some((host, Ok(_))) if !host.is_empty() => out.push(format!("tcp://{address}")),
            _ => {
                return Err(format!(
                    "{entry:?} is not an endpoint: give HOST:PORT or tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555), comma-separated for a leader and its standby"
                ))
            }
        }
    }
    Ok(out.join(","))
}

/// `$XDG_CONFIG_HOME/ots` or `~/.config/ots`: where a user's key lives.
pub(crate) fn config_dir() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("ots")
}

impl Conn {
    /// Our key and the pinned server key, or a clear error saying what
    /// to create.
    pub fn credentials(&self) -> Result<Credentials, ClientError> {
        if self.security == crate::security::SecurityMode::None {
            return Ok(Credentials::None);
        }
        // `me.key` as `ots-submit keygen ~/.config/ots/me` writes it (an
        // older default, `key.key`, is still found).
        let key = self.key.clone().unwrap_or_else(|| {
            let me = config_dir().join("me.key");
            let old = config_dir().join("key.key");
            if !me.exists() && old.exists() {
                old
            } else {
                me
            }
        });
        let server_key = self.server_key.clone().unwrap_or_else(|| {
            let mine = config_dir().join("server.pub");
            let system = PathBuf::from("/etc/ots/server.pub");
            if !mine.exists() && system.exists() {
                system
            } else {
                mine
            }
        });
        let key = KeyPair::read(&key).map_err(|e| {
            ClientError::Credentials(format!(
                "{e}\n  create one with `ots-submit keygen {}` and ask the server's admin to put its .pub file into users.d/ (or pass --key; --security none for a server without security)",
                key.with_extension("").display()
            ))
        })?;
        let server = PublicKey::read(&server_key).map_err(|e| {
            ClientError::Credentials(format!(
                "{e}\n  get the server's public key (server.pub) from its admin and pass it with --server-key (OTS_PINNED_SERVER_KEY) or put it at {}",
                server_key.display()
            ))
        })?;
        Ok(Credentials::Noise { key, server })
    }

    /// Connects (and authenticates) to the server. With a list of
    /// servers, the one that led at the last call is tried first, and
    /// the one that answers is remembered ([`leader_cache`]).
    pub async fn connect(&self) -> Result<Client, ClientError> {
        let list = crate::settings::endpoints(&self.server);
        if list.len() < 2 {
            return Client::connect(&self.server, self.connect_timeout, &self.credentials()?).await;
        }
        let leaders = remembered_leaders();
        let remembered = leaders
            .iter()
            .find(|(l, _)| *l == self.server)
            .map(|(_, e)| e.clone());
        let mut ordered: Vec<&str> = list.iter().map(String::as_str).collect();
        if let Some(i) = remembered
            .as_deref()
            .and_then(|r| ordered.iter().position(|e| *e == r))
        {
            let first = ordered.remove(i);
            ordered.insert(0, first);
        }
        let client = Client::connect(
            &ordered.join(","),
            self.connect_timeout,
            &self.credentials()?,
        )
        .await?;
        if remembered.as_deref() != Some(client.endpoint()) {
            remember_leader(leaders, &self.server, client.endpoint());
        }
        Ok(client)
    }
}

/// `$XDG_CACHE_HOME/ots/leaders` or `~/.cache/ots/leaders`: which server
/// of a list led at the last call, one `LIST<TAB>ENDPOINT` line per list
/// (at most 16). Only a hint: unreadable or unwritable, every server is
/// tried in the order given.
fn leader_cache() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("ots").join("leaders"))
}

const REMEMBERED_LISTS: usize = 16;

/// Bytes of the hint file read at most (16 lines of two endpoint lists).
const LEADERS_FILE_BYTES: u64 = 64 * 1024;

fn remembered_leaders() -> Vec<(String, String)> {
    use std::io::Read;
    let mut text = String::new();
    let read = leader_cache()
        .and_then(|p| std::fs::File::open(p).ok())
        .map(|f| f.take(LEADERS_FILE_BYTES).read_to_string(&mut text));
    if !matches!(read, Some(Ok(_))) {
        return Vec::new();
    }
    text.lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .take(REMEMBERED_LISTS)
        .collect()
}

/// Writes `endpoint` as the leader of `list` in front of the other
/// `known` lists (as read at the start of this call).
fn remember_leader(known: Vec<(String, String)>, list: &str, endpoint: &str) {
    let Some(path) = leader_cache() else { return };
    let mut lines: Vec<(String, String)> = known.into_iter().filter(|(l, _)| l != list).collect();
    lines.insert(0, (list.to_string(), endpoint.to_string()));
    lines.truncate(REMEMBERED_LISTS);
    let text: String = lines.iter().map(|(l, e)| format!("{l}\t{e}\n")).collect();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    // Written whole under another name, then renamed: a concurrent call
    // reads the old or the new hint, never half of one.
    let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}

pub(crate) fn fail(e: &ClientError) -> i32 {
    // The message may quote what a server sent: shown escaped.
    crate::errln!("ots-submit: {}", escape_controls(&e.to_string()));
    e.exit_code()
}

pub(crate) fn verdict_exit(status: &RunStatus) -> i32 {
    match (status.state, status.verdict) {
        (RunState::Cancelled, _) => exit::CANCELLED,
        (_, Some(Verdict::Pass)) => exit::PASS,
        (_, Some(Verdict::Fail)) => exit::FAIL,
        _ => exit::ERROR,
    }
}

/// Parses `90s`, `30m`, `2h`, `500ms` or plain seconds; refuses values
/// that do not fit (no overflow, whatever is typed).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    // A bare number is seconds; anything else as humantime reads it
    // (250ms, 90s, 30m, 2h, 1h 30m, 2d).
    if let Ok(n) = text.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 90s, 30m, 2h or 1h 30m ({e})"))
}
