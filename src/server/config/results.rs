//! `[results]` of `conf/server.toml`: how far back triage looks, and the
//! known-issue rules of the configuration (README "Results").

use crate::protocol::results::{KnownOn, KnownRule, MAX_KNOWN_LABEL_BYTES};
use crate::settings::{invalid, ConfigError};
use serde::{Deserialize, Serialize};

/// `[results]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResultsConfig {
    /// Testruns of a series (the one compared and those before it) whose
    /// results say whether a failure is flaky or device-specific.
    pub window_runs: u32,
    /// The newest finished testruns `ots-submit flaky` looks at.
    pub flaky_runs: u32,
    /// `[[results.known]]`: failures matching a rule carry its label and
    /// are not regressions.
    pub known: Vec<KnownConfig>,
    /// How often the usage series' per-hour additions are written
    /// (1 s – 60 s; a restart loses at most this much of them).
    #[serde(
        rename = "usage_flush",
        deserialize_with = "crate::settings::duration::ms"
    )]
    pub usage_flush_ms: u64,
}

/// One `[[results.known]]` rule.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownConfig {
    /// A regular expression (Rust `regex` syntax), at most 512 bytes.
    #[serde(rename = "match")]
    pub pattern: String,
    /// `name`, `message` or `log`.
    #[serde(default = "message")]
    pub on: KnownOn,
    pub label: String,
}

fn message() -> KnownOn {
    KnownOn::Message
}

impl Default for ResultsConfig {
    fn default() -> Self {
        let r = crate::server::scheduler::ResultsRules::default();
        ResultsConfig {
            window_runs: r.window_runs,
            flaky_runs: r.flaky_runs,
            known: Vec::new(),
            usage_flush_ms: r.usage_flush_ms,
        }
    }
}

/// Rules of `server.toml` at most.
const MAX_CONFIGURED_RULES: usize = 256;

impl ResultsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let max = crate::server::store::results::MAX_WINDOW_RUNS;
        if !(1..=max).contains(&self.window_runs) {
            return Err(invalid(
                "results.window_runs",
                self.window_runs,
                format!("must be between 1 and {max}"),
            ));
        }
        if !(1..=max).contains(&self.flaky_runs) {
            return Err(invalid(
                "results.flaky_runs",
                self.flaky_runs,
                format!("must be between 1 and {max}"),
            ));
        }
        if !(1000..=60_000).contains(&self.usage_flush_ms) {
            return Err(invalid(
                "results.usage_flush",
                format!("{} ms", self.usage_flush_ms),
                "must be between 1s and 60s",
            ));
        }
        if self.known.len() > MAX_CONFIGURED_RULES {
            return Err(invalid(
                "results.known",
                self.known.len(),
                format!("at most {MAX_CONFIGURED_RULES} rules"),
            ));
        }
        for (i, k) in self.known.iter().enumerate() {
            if let Err(why) = crate::server::results::compile_pattern(&k.pattern) {
                return Err(invalid(
                    "results.known",
                    format!("rule {} match = {:?}", i + 1, k.pattern),
                    why,
                ));
            }
            if k.label.is_empty() || k.label.len() > MAX_KNOWN_LABEL_BYTES {
                return Err(invalid(
                    "results.known",
                    format!("rule {} label = {:?}", i + 1, k.label),
                    format!("a label is 1–{MAX_KNOWN_LABEL_BYTES} bytes"),
                ));
            }
        }
        Ok(())
    }

    pub fn rules(&self) -> crate::server::scheduler::ResultsRules {
        crate::server::scheduler::ResultsRules {
            window_runs: self.window_runs,
            flaky_runs: self.flaky_runs,
            known: self
                .known
                .iter()
                .map(|k| KnownRule {
                    id: 0,
                    pattern: k.pattern.clone(),
                    on: k.on,
                    label: k.label.clone(),
                    by: "server.toml".into(),
                    added_ms: 0,
                })
                .collect(),
            usage_flush_ms: self.usage_flush_ms,
        }
    }
}
