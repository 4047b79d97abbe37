//! `web`, `web_tls_*`, `web_url`, `web_proxy_user_header` and
//! `web_trusted_proxies` of `conf/server.toml`, checked and turned into
//! the dashboard's own [`crate::web::WebConfig`].

use super::ServerConfig;
use crate::security::SecurityMode;
use crate::settings::{invalid, ConfigError};

impl ServerConfig {
    /// The web dashboard's settings, checked; none when `web` is empty.
    pub fn web_config(&self) -> Result<Option<crate::web::WebConfig>, ConfigError> {
        if self.web.is_empty() {
            return Ok(None);
        }
        let addr: std::net::SocketAddr = self.web.parse().map_err(|_| {
            invalid(
                "web",
                &self.web,
                "must be HOST:PORT with a numeric address, e.g. 127.0.0.1:8080 (or empty: off)",
            )
        })?;
        let tls = match (&self.web_tls_cert, &self.web_tls_key) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            (None, None) => None,
            (Some(c), None) => {
                return Err(invalid(
                    "web_tls_key",
                    "",
                    format!(
                        "web_tls_cert is set ({}) but web_tls_key is not: set both or neither",
                        c.display()
                    ),
                ))
            }
            (None, Some(k)) => {
                return Err(invalid(
                    "web_tls_cert",
                    "",
                    format!(
                        "web_tls_key is set ({}) but web_tls_cert is not: set both or neither",
                        k.display()
                    ),
                ))
            }
        };
        if !addr.ip().is_loopback() && tls.is_none() && !self.web_insecure {
            return Err(invalid(
                "web",
                &self.web,
                "is not a loopback address: set web_tls_cert and web_tls_key (HTTPS), or bind 127.0.0.1 behind a reverse proxy, or set web_insecure = true to send session cookies in the clear",
            ));
        }
        let url = if self.web_url.is_empty() {
            None
        } else {
            let ok = (self.web_url.starts_with("http://") || self.web_url.starts_with("https://"))
                && self.web_url.len() <= 200
                && self.web_url.bytes().all(|b| b.is_ascii_graphic());
            if !ok {
                return Err(invalid(
                    "web_url",
                    &self.web_url,
                    "must be the dashboard's address as browsers reach it: http(s)://HOST[:PORT][/PATH], at most 200 characters",
                ));
            }
            Some(self.web_url.clone())
        };
        let proxy_user_header = if self.web_proxy_user_header.is_empty() {
            None
        } else {
            if axum::http::HeaderName::from_bytes(self.web_proxy_user_header.as_bytes()).is_err() {
                return Err(invalid(
                    "web_proxy_user_header",
                    &self.web_proxy_user_header,
                    "must be an HTTP header name, e.g. X-Remote-User",
                ));
            }
            Some(self.web_proxy_user_header.clone())
        };
        let mut trusted_proxies = Vec::new();
        for p in &self.web_trusted_proxies {
            trusted_proxies.push(p.parse().map_err(|_| {
                invalid(
                    "web_trusted_proxies",
                    p,
                    "must be a list of IP addresses, e.g. [\"127.0.0.1\", \"::1\"]",
                )
            })?);
        }
        let ft = &self.web_failure_text;
        if ft.is_empty()
            || ft.len() > crate::protocol::logfind::MAX_FIND_TEXT
            || ft.contains(['\n', '\r'])
        {
            return Err(invalid(
                "web_failure_text",
                ft,
                "must be one line of 1 to 256 bytes: the text of a log line that shows a failure, e.g. \"FAIL\"",
            ));
        }
        Ok(Some(crate::web::WebConfig {
            addr,
            failure_text: ft.clone(),
            tls,
            url,
            proxy_user_header,
            trusted_proxies,
            secure: self.security != SecurityMode::None,
        }))
    }
}
