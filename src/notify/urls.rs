//! Per-testrun webhook URLs (`ots-submit run --notify https://…`): only
//! those the operator's `notify.allow_urls` patterns allow, and never to
//! a loopback, private, link-local or otherwise non-public address unless
//! `notify.allow_private_addresses` says so — the server must not become
//! a way into its own network (SSRF). The address check runs twice: on an
//! address written in the URL at submit, and on every address the name
//! resolves to at each attempt (a name may resolve elsewhere later).

use std::net::IpAddr;

/// Longest per-run notification entry, and most entries per testrun:
/// limits of the protocol's `submit` (PROTOCOL.md §14).
pub use crate::protocol::limits::{
    MAX_NOTIFY_ENTRY_BYTES as MAX_ENTRY_BYTES, MAX_NOTIFY_PER_RUN as MAX_PER_RUN,
};

/// What `notify.allow_urls` and `notify.allow_private_addresses` say.
#[derive(Clone, Debug, Default)]
pub struct UrlRules {
    pub allow: Vec<glob::Pattern>,
    pub allow_private: bool,
}

/// A URL taken apart as far as the checks need.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub https: bool,
    /// Without brackets for IPv6.
    pub host: String,
    pub port: u16,
    /// Path and query, at least `/`.
    pub path: String,
}

/// Parses an `http://` or `https://` URL without user information.
pub fn parse(url: &str) -> Result<Target, String> {
    if url.len() > MAX_ENTRY_BYTES || !url.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "must be printable ASCII without spaces, at most {MAX_ENTRY_BYTES} bytes"
        ));
    }
    let uri: axum::http::Uri = url.parse().map_err(|e| format!("is not a URL ({e})"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err("must start with http:// or https://".into()),
    };
    let authority = uri.authority().ok_or("has no host")?;
    if authority.as_str().contains('@') {
        return Err(
            "must not carry a user name or password (sign with the target's secret instead)".into(),
        );
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err("has no host".into());
    }
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    Ok(Target {
        https,
        host: host.to_ascii_lowercase(),
        port,
        path: if path.is_empty() { "/".into() } else { path },
    })
}

/// Whether an address is one anybody on the internet could reach: not
/// loopback, private (RFC 1918, unique local), link-local, carrier-grade
/// NAT, unspecified, multicast, broadcast, documentation or benchmarking.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0xdb8)
                || (s[0] == 0x64 && s[1] == 0xff9b))
        }
    }
}

impl UrlRules {
    /// Checks a per-run URL at submit: allowed by a pattern, and not
    /// written with a non-public address unless that is allowed.
    pub fn check(&self, url: &str) -> Result<Target, String> {
        if self.allow.is_empty() {
            return Err("per-run webhook URLs are not allowed on this server (notify.allow_urls is empty): name a configured target instead, or ask the operator to allow the URL".into());
        }
        let target = parse(url)?;
        if !self.allow.iter().any(|p| p.matches(url)) {
            return Err(format!(
                "is not allowed by notify.allow_urls ({})",
                self.allow
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let literal = target.host.parse::<IpAddr>().ok();
        if target.host == "localhost" || target.host.ends_with(".localhost") {
            if !self.allow_private {
                return Err("names this machine (localhost); loopback and private addresses are refused (notify.allow_private_addresses)".into());
            }
        } else if let Some(ip) = literal.filter(|ip| !is_public(*ip) && !self.allow_private) {
            return Err(format!(
                "is a loopback, private or otherwise non-public address ({ip}); those are refused (notify.allow_private_addresses)"
            ));
        }
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(patterns: &[&str], private: bool) -> UrlRules {
        UrlRules {
            allow: patterns
                .iter()
                .map(|p| glob::Pattern::new(p).unwrap())
                .collect(),
            allow_private: private,
        }
    }

    #[test]
    fn only_public_addresses_are_public() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "::",
            "fc00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn per_run_urls_need_a_pattern_and_a_public_address() {
        let none = rules(&[], false);
        assert!(none
            .check("https://ci.example.com/hook")
            .unwrap_err()
            .contains("allow_urls is empty"));
        let ci = rules(&["https://ci.example.com/*", "http://127.0.0.1:*/*"], false);
        assert_eq!(
            ci.check("https://ci.example.com/hook?x=1").unwrap(),
            Target {
                https: true,
                host: "ci.example.com".into(),
                port: 443,
                path: "/hook?x=1".into()
            }
        );
        assert!(ci
            .check("https://evil.example.com/hook")
            .unwrap_err()
            .contains("not allowed"));
        assert!(ci
            .check("http://127.0.0.1:9/hook")
            .unwrap_err()
            .contains("non-public"));
        assert!(ci.check("ftp://ci.example.com/x").is_err());
        assert!(ci.check("https://user:pw@ci.example.com/x").is_err());
        let private = rules(&["http://127.0.0.1:*/*", "http://localhost/*"], true);
        assert_eq!(private.check("http://127.0.0.1:9/h").unwrap().port, 9);
        assert!(private.check("http://localhost/h").is_ok());
        assert!(rules(&["http://localhost/*"], false)
            .check("http://localhost/h")
            .is_err());
        assert!(ci
            .check(&format!("https://ci.example.com/{}", "a".repeat(600)))
            .is_err());
    }
}
