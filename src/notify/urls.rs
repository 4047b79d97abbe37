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
    pub allow: Vec<UrlPattern>,
    pub allow_private: bool,
}

/// A `notify.allow_urls` pattern, taken apart like the URLs it is held
/// against, so that each part is matched on its own (a host pattern never
/// matches text in a path or a query): `SCHEME://HOST[:PORT][/PATH]`.
/// `HOST` and `PATH` are globs (`*` matches anything, `?` one character);
/// `PORT` is a number or `*`, and without it only the scheme's default
/// port matches; without a path any path matches.
#[derive(Clone, Debug)]
pub struct UrlPattern {
    text: String,
    https: bool,
    host: glob::Pattern,
    port: Option<Option<u16>>,
    path: Option<glob::Pattern>,
}

impl UrlPattern {
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let (https, rest) = if let Some(r) = pattern.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = pattern.strip_prefix("http://") {
            (false, r)
        } else {
            return Err("must start with http:// or https://".into());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], Some(&rest[i..])),
            None => (rest, None),
        };
        if authority.contains('@') {
            return Err("must not carry a user name".into());
        }
        // `[v6]:port`, `host:port` or a host alone.
        let (host, port) = if let Some(r) = authority.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or("has an unclosed [ in its host")?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err("has no host".into());
        }
        let port = match port {
            None => Some(None),
            Some("*") => None,
            Some(p) => {
                Some(Some(p.parse::<u16>().map_err(|_| {
                    format!("port {p:?} is neither a number nor *")
                })?))
            }
        };
        let glob = |p: &str| glob::Pattern::new(p).map_err(|e| e.to_string());
        Ok(UrlPattern {
            text: pattern.to_string(),
            https,
            host: glob(&host.to_ascii_lowercase())?,
            port,
            path: path.map(glob).transpose()?,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether a parsed URL matches: scheme, host, port and path each.
    pub fn matches(&self, t: &Target) -> bool {
        let default = if t.https { 443 } else { 80 };
        self.https == t.https
            && self.host.matches(&t.host)
            && match self.port {
                None => true,
                Some(None) => t.port == default,
                Some(Some(p)) => t.port == p,
            }
            && self.path.as_ref().is_none_or(|p| p.matches(&t.path))
    }
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
    // A bracketed host must be an IPv6 address as written: a zone
    // (`fe80::1%25lo`) names an interface of this machine.
    if host.contains(':') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!(
            "has the host [{host}], which is not a plain IPv6 address (zone-scoped addresses are local to this machine)"
        ));
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
/// NAT, unspecified, multicast, broadcast, documentation or benchmarking;
/// and for IPv6 none of the forms that carry an IPv4 address or reach one
/// through a translator this server cannot see past: IPv4-mapped and
/// IPv4-compatible (`::a.b.c.d`), 6to4 (2002::/16), Teredo (2001::/32),
/// NAT64 (64:ff9b::/96 and the local-use 64:ff9b:1::/48), site-local
/// (fec0::/10) and the discard prefix (100::/64).
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
            let ipv4_compatible = s[..6].iter().all(|x| *x == 0);
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || ipv4_compatible
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] == 0x2001 && s[1] == 0xdb8)
                || (s[0] == 0x2001 && s[1] == 0)
                || s[0] == 0x2002
                || (s[0] == 0x64 && s[1] == 0xff9b)
                || (s[0] == 0x100 && s[1..4] == [0, 0, 0]))
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
        if !self.allow.iter().any(|p| p.matches(&target)) {
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
                .map(|p| UrlPattern::parse(p).unwrap())
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
            "::127.0.0.1",
            "::10.0.0.1",
            "::8.8.8.8",
            "2002:7f00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "64:ff9b::7f00:1",
            "64:ff9b:1::a00:1",
            "fec0::1",
            "100::1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "2001:4860::8888"] {
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

    #[test]
    fn patterns_match_the_parts_never_the_raw_url() {
        let r = rules(&["http://*.example.com/*"], true);
        assert!(r.check("http://ci.example.com/hook").is_ok());
        assert!(r.check("http://a.b.example.com/x?y=1").is_ok());
        for bad in [
            "http://vm:38283/.example.com/",
            "http://vm:38283/?x=.example.com/",
            "http://vm/.example.com/",
            "http://example.com.evil.org/",
            "http://ci.example.com:8080/hook",
            "https://ci.example.com/hook",
        ] {
            assert!(r.check(bad).unwrap_err().contains("not allowed"), "{bad}");
        }
        let ports = rules(
            &[
                "https://ci.example.com:*/hooks/*",
                "http://[2606:4700::1]/*",
            ],
            false,
        );
        assert!(ports.check("https://ci.example.com:8443/hooks/a").is_ok());
        assert!(ports.check("https://ci.example.com/hooks/a").is_ok());
        assert!(ports.check("https://ci.example.com/other").is_err());
        assert!(ports.check("http://[2606:4700::1]/x").is_ok());
        for bad in ["ftp://x/*", "http://:80/", "http://h:port/", "http://[::1/"] {
            assert!(UrlPattern::parse(bad).is_err(), "{bad}");
        }
        // A zone names an interface here.
        assert!(rules(&["http://*/*"], false)
            .check("http://[fe80::1%25lo]/")
            .is_err());
        assert!(rules(&["http://*/*"], false)
            .check("http://[::127.0.0.1]/")
            .unwrap_err()
            .contains("non-public"));
    }
}
