//! `[notify]` of `conf/server.toml`: the operator's targets
//! (`[[notify.webhook]]`, `[[notify.mail]]`), what per-run `--notify`
//! entries may name, and the outbox's timing and bounds (README
//! "Notifications"). Checked at start: every mistake names its target and
//! key.

use super::event::{Filter, Kind};
use super::mail::check_address;
use super::outbox::{Bounds, Rules, TargetKind, TargetRule};
use super::urls::UrlRules;
use crate::protocol::Verdict;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `[notify]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    pub webhook: Vec<WebhookConfig>,
    pub mail: Vec<MailConfig>,
    /// Patterns (glob: `*` matches anything) a per-run URL must match;
    /// empty: per-run URLs are refused.
    pub allow_urls: Vec<String>,
    /// Per-run URLs may reach loopback, private and link-local addresses
    /// (refused by default: no SSRF through the server).
    pub allow_private_addresses: bool,
    /// The secret per-run URLs are signed with (needed when
    /// `allow_urls` is set).
    pub url_secret_file: Option<PathBuf>,
    /// Which `[[notify.mail]]` sends `--notify mailto:ADDR` (default: the
    /// first one).
    pub mailto_via: String,
    /// Domains `--notify mailto:ADDR` may send to (exact, like
    /// `lab.example.org`); default none: only the addresses the
    /// `[[notify.mail]]` targets already send to (the operator's relay is
    /// not a way to mail anyone).
    pub allow_mail_domains: Vec<String>,
    /// A delivery not done this long after its event is failed.
    #[serde(
        rename = "max_age",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub max_age_secs: u64,
    /// First retry after about this (jittered 0.5–1.5×), doubling…
    #[serde(
        rename = "retry_first",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub retry_first_ms: u64,
    /// …up to this.
    #[serde(
        rename = "retry_cap",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub retry_cap_secs: u64,
    /// A target failing this long is logged as an error once and flagged
    /// in `ots-submit notifications` (never disabled).
    #[serde(
        rename = "alert_after",
        deserialize_with = "crate::settings::duration::secs"
    )]
    pub alert_after_secs: u64,
    /// Ended deliveries are listed this long, then forgotten.
    #[serde(rename = "keep", deserialize_with = "crate::settings::duration::secs")]
    pub keep_secs: u64,
    /// Deliveries not yet ended, in all and per target: past them an
    /// event's delivery is refused and counted.
    pub max_pending: usize,
    pub max_pending_per_target: usize,
    /// Ended deliveries kept for listing, at most (oldest forgotten first).
    pub max_kept: usize,
    /// Largest event body; a `testrun_finished` with more tasks than fit
    /// lists the first ones and says how many it left out.
    pub max_payload_bytes: usize,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            webhook: Vec::new(),
            mail: Vec::new(),
            allow_urls: Vec::new(),
            allow_private_addresses: false,
            url_secret_file: None,
            mailto_via: String::new(),
            allow_mail_domains: Vec::new(),
            max_age_secs: 24 * 3600,
            retry_first_ms: 1000,
            retry_cap_secs: 300,
            alert_after_secs: 3600,
            keep_secs: 7 * 24 * 3600,
            max_pending: 10_000,
            max_pending_per_target: 2_000,
            max_kept: 10_000,
            max_payload_bytes: 256 * 1024,
        }
    }
}

/// Filters shared by both kinds of target.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TargetFilters {
    pub events: Vec<Kind>,
    pub owners: Vec<String>,
    pub devicegroups: Vec<String>,
    pub verdicts: Vec<Verdict>,
    /// Only `testrun_finished` events with at least one regression
    /// against the testrun's series.
    pub only_regressions: bool,
}

/// One `[[notify.webhook]]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookConfig {
    pub name: String,
    pub url: String,
    /// Its content signs every request (Standard Webhooks; `whsec_…`
    /// secrets are base64-decoded as the specification says).
    pub secret_file: PathBuf,
    #[serde(flatten)]
    pub filters: TargetFilters,
    /// Only testruns that name it (`--notify NAME`), nothing by filter.
    pub per_run_only: bool,
    /// One attempt's deadline (connect, TLS, answer).
    #[serde(rename = "timeout", deserialize_with = "crate::settings::duration::ms")]
    pub timeout_ms: u64,
    /// Attempts in flight to it at once.
    pub concurrency: usize,
    /// PEM CA certificates it is verified against instead of the
    /// built-in Mozilla roots (a lab's own CA).
    pub ca_file: Option<PathBuf>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            name: String::new(),
            url: String::new(),
            secret_file: PathBuf::new(),
            filters: TargetFilters::default(),
            per_run_only: false,
            timeout_ms: 10_000,
            concurrency: 4,
            ca_file: None,
        }
    }
}

/// How mail reaches its relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MailTls {
    /// Plain connection, then STARTTLS (required), usually port 587.
    Starttls,
    /// TLS from the first byte, usually port 465.
    Tls,
    /// No TLS: only for a relay on this machine or a trusted network.
    None,
}

/// One `[[notify.mail]]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MailConfig {
    pub name: String,
    /// `HOST:PORT` of the SMTP relay; or set `sendmail`.
    pub smtp: String,
    pub tls: MailTls,
    /// Two lines: user name, password.
    pub credentials_file: Option<PathBuf>,
    /// A sendmail-compatible binary instead of SMTP.
    pub sendmail: Option<PathBuf>,
    pub from: String,
    /// Addresses every matching event is mailed to (may be empty: then
    /// it only carries `--notify mailto:ADDR`).
    pub to: Vec<String>,
    #[serde(flatten)]
    pub filters: TargetFilters,
    pub per_run_only: bool,
    #[serde(rename = "timeout", deserialize_with = "crate::settings::duration::ms")]
    pub timeout_ms: u64,
    pub concurrency: usize,
}

impl Default for MailConfig {
    fn default() -> Self {
        MailConfig {
            name: String::new(),
            smtp: String::new(),
            tls: MailTls::Starttls,
            credentials_file: None,
            sendmail: None,
            from: String::new(),
            to: Vec::new(),
            filters: TargetFilters::default(),
            per_run_only: false,
            timeout_ms: 30_000,
            concurrency: 2,
        }
    }
}

/// A `[notify]` setting that cannot work, naming it.
#[derive(Debug, thiserror::Error)]
pub enum NotifyConfigError {
    #[error("configuration `notify.{key}`: {reason}")]
    Setting { key: &'static str, reason: String },
    #[error("configuration `notify.{key}` = {path}: {reason}")]
    SettingFile {
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("configuration [[notify.{kind}]] {name:?}: `{key}` {reason}")]
    Target {
        kind: &'static str,
        name: String,
        key: &'static str,
        reason: String,
    },
    #[error("configuration [[notify.{kind}]] {name:?}: `{key}` = {path}: {reason}")]
    File {
        kind: &'static str,
        name: String,
        key: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// A target name: it appears in ids, listings and `--notify NAME`.
fn check_name(kind: &'static str, name: &str) -> Result<(), NotifyConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(NotifyConfigError::Target {
            kind,
            name: name.into(),
            key: "name",
            reason: "must be 1–64 letters, digits, '-', '_' or '.'".into(),
        })
    }
}

/// What every target must get right: a name of its own, a concurrency
/// within `1..=max`, a timeout between 100 ms and 10 min.
fn check_common(
    kind: &'static str,
    name: &str,
    names: &mut std::collections::BTreeSet<String>,
    (concurrency, max): (usize, usize),
    timeout_ms: u64,
) -> Result<(), NotifyConfigError> {
    check_name(kind, name)?;
    let bad = |key, reason: String| {
        Err(NotifyConfigError::Target {
            kind,
            name: name.into(),
            key,
            reason,
        })
    };
    if !names.insert(name.to_string()) {
        return bad("name", "is used by another target".into());
    }
    if !(1..=max).contains(&concurrency) {
        return bad("concurrency", format!("must be 1–{max}"));
    }
    if !(100..=600_000).contains(&timeout_ms) {
        return bad("timeout", "must be between 100 ms and 10 min".into());
    }
    Ok(())
}

impl NotifyConfig {
    /// Whether anything is configured at all (else no sender runs).
    pub fn is_empty(&self) -> bool {
        self.webhook.is_empty() && self.mail.is_empty() && self.allow_urls.is_empty()
    }

    /// What the scheduler needs (no secrets): checked.
    pub fn rules(&self, dashboard: Option<String>) -> Result<Rules, NotifyConfigError> {
        self.check_settings()?;
        let mut targets = Vec::new();
        let mut names = std::collections::BTreeSet::new();
        for w in &self.webhook {
            targets.push(webhook_rule(w, &mut names)?);
        }
        for m in &self.mail {
            targets.push(mail_rule(m, &mut names)?);
        }
        let mail_relay = if self.mailto_via.is_empty() {
            self.mail.first().map(|m| m.name.clone())
        } else if self.mail.iter().any(|m| m.name == self.mailto_via) {
            Some(self.mailto_via.clone())
        } else {
            return Err(setting("mailto_via", "names no [[notify.mail]] target"));
        };
        let mut allow = Vec::new();
        for p in &self.allow_urls {
            allow.push(super::urls::UrlPattern::parse(p).map_err(|e| {
                NotifyConfigError::Setting {
                    key: "allow_urls",
                    reason: format!(
                        "pattern {p:?} {e} (SCHEME://HOST[:PORT][/PATH], globs in HOST and PATH)"
                    ),
                }
            })?);
        }
        let mut mail_domains = Vec::new();
        for d in &self.allow_mail_domains {
            let d = d.trim().trim_start_matches('@').to_ascii_lowercase();
            if d.is_empty()
                || !d
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            {
                return Err(setting(
                    "allow_mail_domains",
                    "holds an entry that is not a domain name (like \"lab.example.org\")",
                ));
            }
            mail_domains.push(d);
        }
        let mail_recipients = self
            .mail
            .iter()
            .flat_map(|m| m.to.iter().map(|a| a.to_ascii_lowercase()))
            .collect();
        if !allow.is_empty() && self.url_secret_file.is_none() {
            return Err(setting(
                "url_secret_file",
                "must be set when allow_urls is: per-run webhooks are signed with it (hand it to those who receive them)",
            ));
        }
        Ok(Rules {
            targets,
            mail_relay,
            mail_domains,
            mail_recipients,
            urls: UrlRules {
                allow,
                allow_private: self.allow_private_addresses,
            },
            policy: super::delivery::RetryPolicy {
                first_ms: self.retry_first_ms,
                cap_ms: self.retry_cap_secs.saturating_mul(1000),
                max_age_ms: self.max_age_secs.saturating_mul(1000),
            },
            bounds: Bounds {
                max_pending: self.max_pending,
                max_pending_per_target: self.max_pending_per_target,
                max_kept: self.max_kept,
                max_payload_bytes: self.max_payload_bytes,
                keep_ms: self.keep_secs.saturating_mul(1000),
            },
            alert_after_ms: self.alert_after_secs.saturating_mul(1000),
            dashboard,
        })
    }

    /// The delivery settings in range.
    fn check_settings(&self) -> Result<(), NotifyConfigError> {
        if self.max_age_secs == 0 || self.max_age_secs > 30 * 24 * 3600 {
            return Err(setting("max_age", "must be between 1 s and 30 days"));
        }
        if !(10..=3_600_000).contains(&self.retry_first_ms) {
            return Err(setting("retry_first", "must be between 10 ms and 1 h"));
        }
        if self.retry_cap_secs == 0
            || self.retry_cap_secs.saturating_mul(1000) < self.retry_first_ms
            || self.retry_cap_secs > 24 * 3600
        {
            return Err(setting(
                "retry_cap",
                "must be at least retry_first and at most 24 h",
            ));
        }
        if !(1..=1_000_000).contains(&self.max_pending)
            || !(1..=1_000_000).contains(&self.max_pending_per_target)
            || self.max_kept > 1_000_000
        {
            return Err(setting(
                "max_pending",
                "max_pending and max_pending_per_target must be 1–1000000, max_kept at most 1000000",
            ));
        }
        if !(4096..=16 << 20).contains(&self.max_payload_bytes) {
            return Err(setting(
                "max_payload_bytes",
                "must be between 4096 and 16777216",
            ));
        }
        Ok(())
    }
}

fn setting(key: &'static str, reason: &str) -> NotifyConfigError {
    NotifyConfigError::Setting {
        key,
        reason: reason.into(),
    }
}

fn target(kind: &'static str, name: &str, key: &'static str, reason: String) -> NotifyConfigError {
    NotifyConfigError::Target {
        kind,
        name: name.into(),
        key,
        reason,
    }
}

fn filter(f: &TargetFilters) -> Filter {
    Filter {
        events: f.events.clone(),
        owners: f.owners.clone(),
        devicegroups: f.devicegroups.clone(),
        verdicts: f.verdicts.clone(),
        only_regressions: f.only_regressions,
    }
}

/// A webhook target, checked: a unique name, its URL, its secret.
fn webhook_rule(
    w: &WebhookConfig,
    names: &mut std::collections::BTreeSet<String>,
) -> Result<TargetRule, NotifyConfigError> {
    check_common("webhook", &w.name, names, (w.concurrency, 64), w.timeout_ms)?;
    super::urls::parse(&w.url).map_err(|r| target("webhook", &w.name, "url", r))?;
    if w.secret_file.as_os_str().is_empty() {
        return Err(target(
                    "webhook",
                    &w.name,
                    "secret_file",
                    "is not set: every webhook is signed (write a secret, e.g. `whsec_` and base64 of 32 random bytes, into a file only the server reads)".into(),
                ));
    }
    Ok(TargetRule {
        name: w.name.clone(),
        kind: TargetKind::Webhook,
        filter: filter(&w.filters),
        per_run_only: w.per_run_only,
        concurrency: w.concurrency,
    })
}

/// A mail target, checked: a unique name, one way to send, its addresses.
fn mail_rule(
    m: &MailConfig,
    names: &mut std::collections::BTreeSet<String>,
) -> Result<TargetRule, NotifyConfigError> {
    check_common("mail", &m.name, names, (m.concurrency, 16), m.timeout_ms)?;
    if m.smtp.is_empty() == m.sendmail.is_none() {
        return Err(target(
            "mail",
            &m.name,
            "smtp",
            "set exactly one of smtp = \"HOST:PORT\" and sendmail = \"/usr/sbin/sendmail\"".into(),
        ));
    }
    if !m.smtp.is_empty() {
        let (host, port) = m.smtp.rsplit_once(':').unwrap_or(("", ""));
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(target(
                "mail",
                &m.name,
                "smtp",
                format!(
                    "= {:?} must be HOST:PORT, e.g. smtp.example.org:587",
                    m.smtp
                ),
            ));
        }
    }
    check_address(&m.from)
        .map_err(|r| target("mail", &m.name, "from", format!("= {:?} {r}", m.from)))?;
    if m.to.len() > 100 {
        return Err(target(
            "mail",
            &m.name,
            "to",
            "lists more than 100 addresses".into(),
        ));
    }
    for a in &m.to {
        check_address(a).map_err(|r| target("mail", &m.name, "to", format!("entry {a:?} {r}")))?;
    }
    Ok(TargetRule {
        name: m.name.clone(),
        kind: TargetKind::Mail { to: m.to.clone() },
        filter: filter(&m.filters),
        per_run_only: m.per_run_only,
        concurrency: m.concurrency,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml: &str) -> NotifyConfig {
        ::config::Config::builder()
            .add_source(::config::File::from_str(toml, ::config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap()
    }

    #[test]
    fn targets_are_read_and_checked() {
        let c = parse(
            r#"
            allow_urls = ["https://ci.example.com/*"]
            url_secret_file = "/etc/ots/notify-url.secret"
            [[webhook]]
            name = "ci"
            url = "https://ci.example.com/ots"
            secret_file = "/etc/ots/ci.secret"
            events = ["testrun_finished"]
            verdicts = ["FAIL", "ERROR"]
            timeout = "5s"
            [[mail]]
            name = "lab-mail"
            smtp = "smtp.example.com:587"
            from = "ots@example.com"
            to = ["lab@example.com"]
            events = ["worker_health_changed", "worker_lost"]
            "#,
        );
        let r = c.rules(Some("https://ots.lab".into())).unwrap();
        assert_eq!(r.targets.len(), 2);
        assert_eq!(
            r.targets[0].filter.verdicts,
            vec![Verdict::Fail, Verdict::Error]
        );
        assert_eq!(r.mail_relay.as_deref(), Some("lab-mail"));
        assert_eq!(c.webhook[0].timeout_ms, 5000);

        let mut bad = c.clone();
        bad.webhook[0].secret_file = PathBuf::new();
        assert!(bad
            .rules(None)
            .unwrap_err()
            .to_string()
            .contains("secret_file"));
        let mut bad = c.clone();
        bad.mail[0].to = vec!["not an address".into()];
        let e = bad.rules(None).unwrap_err().to_string();
        assert!(e.contains("lab-mail") && e.contains("`to`"), "{e}");
        let mut bad = c.clone();
        bad.url_secret_file = None;
        assert!(bad
            .rules(None)
            .unwrap_err()
            .to_string()
            .contains("url_secret_file"));
        let mut bad = c.clone();
        bad.mail[0].name = "ci".into();
        assert!(bad
            .rules(None)
            .unwrap_err()
            .to_string()
            .contains("another target"));
        let mut bad = c;
        bad.mail[0].sendmail = Some("/usr/sbin/sendmail".into());
        assert!(bad
            .rules(None)
            .unwrap_err()
            .to_string()
            .contains("exactly one"));
    }
}
