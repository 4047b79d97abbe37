//! The layered configuration loader both binaries share: built-in
//! defaults, then a TOML file, then `OTS_SERVER_…` / `OTS_WORKER_…`
//! environment variables, then flags. Unknown keys and invalid values are
//! refused at start with the key and the reason, so a typo never silently
//! falls back to a default. Each binary's settings live beside their
//! users (`server::config`, `worker::config`); this leaf knows none of
//! them.

use crate::protocol::DeviceSpecError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub mod duration;

/// Why configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("configuration (file or {prefix}_* environment): {source}")]
    Layer {
        prefix: &'static str,
        source: config::ConfigError,
    },
    #[error("configuration key `{key}` = {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    #[error("configuration key `device`: {0}")]
    Device(#[from] DeviceSpecError),
    #[error("instance configuration {path} does not exist: create it (at least `device = \"devicegroup:…\"` for this worker's device) or drop --instance-config")]
    MissingInstance { path: PathBuf },
}

pub fn invalid(key: &'static str, value: impl ToString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The effective configuration `cfg`, one `key = value  # source` line per
/// setting, where source is the layer that set it: `default`, `file PATH`,
/// `env NAME` or `flag`. What `--check-config` prints.
pub fn explain<T: Serialize>(
    cfg: &T,
    prefix: &str,
    files: &[&Path],
    overrides: &[Override],
) -> Vec<String> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.to_string())),
        }
    }
    let mut keys = Vec::new();
    flatten(
        "",
        &serde_json::to_value(cfg).unwrap_or_default(),
        &mut keys,
    );
    let layers: Vec<(String, config::Config)> = files
        .iter()
        .filter(|p| p.is_file())
        .filter_map(|p| {
            config::Config::builder()
                .add_source(config::File::from(*p).format(config::FileFormat::Toml))
                .build()
                .ok()
                .map(|c| (format!("file {}", p.display()), c))
        })
        .collect();
    let env_prefix = format!("{prefix}_");
    let env: Vec<(String, String)> = std::env::vars()
        .filter_map(|(k, _)| {
            let rest = k.strip_prefix(&env_prefix)?;
            Some((rest.to_lowercase().replace("__", "."), k))
        })
        .collect();
    keys.into_iter()
        .map(|(key, value)| {
            let source = if overrides.iter().any(|(k, v)| *k == key && v.is_some()) {
                "flag".to_string()
            } else if let Some((_, name)) = env.iter().find(|(k, _)| *k == key) {
                format!("env {name}")
            } else if let Some((name, _)) = layers
                .iter()
                .rev()
                .find(|(_, c)| c.get::<config::Value>(&key).is_ok())
            {
                name.clone()
            } else {
                "default".to_string()
            };
            format!("{key} = {value}  # {source}")
        })
        .collect()
}

/// A flag given on the command line, applied over file and environment.
pub type Override = (&'static str, Option<String>);

pub fn load<T: for<'de> Deserialize<'de> + Serialize + Default>(
    prefix: &'static str,
    files: &[&Path],
    overrides: &[Override],
    list_keys: &[&str],
) -> Result<T, ConfigError> {
    let defaults = config::Config::try_from(&T::default())
        .map_err(|source| ConfigError::Layer { prefix, source })?;
    let mut builder = config::Config::builder().add_source(defaults);
    for path in files {
        let path = *path;
        if !path.is_file() {
            return Err(ConfigError::File {
                path: path.to_path_buf(),
                source: config::ConfigError::Message(
                    "file does not exist or is not a regular file".into(),
                ),
            });
        }
        // Parse the file alone first, so its errors name the file.
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .build()
            .map_err(|source| ConfigError::File {
                path: path.to_path_buf(),
                source,
            })?;
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
    }
    let mut env = config::Environment::with_prefix(prefix)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true);
    if !list_keys.is_empty() {
        env = env.list_separator(",");
        for k in list_keys {
            env = env.with_list_parse_key(k);
        }
    }
    builder = builder.add_source(env);
    for (key, value) in overrides {
        if let Some(v) = value {
            builder = builder
                .set_override(*key, v.clone())
                .map_err(|source| ConfigError::Layer { prefix, source })?;
        }
    }
    builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|source| {
            // Name the file that holds the wrong key (an unknown key, a
            // wrong type) when one of the layered files does by itself.
            files
                .iter()
                .find_map(|path| {
                    config::Config::builder()
                        .add_source(config::Config::try_from(&T::default()).ok()?)
                        .add_source(config::File::from(*path).format(config::FileFormat::Toml))
                        .build()
                        .and_then(|c| c.try_deserialize::<T>())
                        .err()
                        .map(|source| ConfigError::File {
                            path: path.to_path_buf(),
                            source,
                        })
                })
                .unwrap_or(ConfigError::Layer { prefix, source })
        })
}

/// A list of endpoints, `tcp://a:5555, tcp://b:5555`: the servers that
/// may lead (a standby binds nothing until it takes over).
pub fn endpoints(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

/// `server` and `events` as pairs, checked: one events endpoint per
/// server endpoint, in the same order.
pub fn endpoint_pairs(server: &str, events: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let (s, e) = (endpoints(server), endpoints(events));
    if s.is_empty() {
        return Err(invalid("server", server, "names no endpoint"));
    }
    if s.len() > 16 {
        return Err(invalid("server", server, "lists more than 16 endpoints"));
    }
    if s.len() != e.len() {
        return Err(invalid(
            "events",
            events,
            format!(
                "lists {} endpoints for the {} of `server`: give one events endpoint per server, in the same order",
                e.len(),
                s.len()
            ),
        ));
    }
    for (a, b) in s.iter().zip(&e) {
        check_endpoint("server", a)?;
        check_endpoint("events", b)?;
    }
    Ok(s.into_iter().zip(e).collect())
}

pub fn check_endpoint(key: &'static str, ep: &str) -> Result<(), ConfigError> {
    let rest = ep.strip_prefix("tcp://").ok_or_else(|| {
        invalid(
            key,
            ep,
            "must be tcp://HOST:PORT (the zeromq crate supports tcp here)",
        )
    })?;
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| invalid(key, ep, "must be tcp://HOST:PORT"))?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(invalid(
            key,
            ep,
            "must be tcp://HOST:PORT with a port number 0–65535",
        ));
    }
    Ok(())
}

/// One thing `--check-config` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// A start would refuse it (exit 78).
    pub fatal: bool,
    pub message: String,
}

/// Prints what `--check-config` found, one line each; the exit status: 78
/// when a start would refuse, 0 otherwise.
pub fn report_problems(problems: &[Problem]) -> std::process::ExitCode {
    for p in problems {
        crate::outln!(
            "{}: {}",
            if p.fatal { "error" } else { "warning" },
            p.message
        );
    }
    if problems.iter().any(|p| p.fatal) {
        std::process::ExitCode::from(78)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

impl Problem {
    pub fn fatal(message: String) -> Self {
        Problem {
            fatal: true,
            message,
        }
    }

    pub fn skipped(message: String) -> Self {
        Problem {
            fatal: false,
            message,
        }
    }
}

/// Whether a state directory can be made and written by this user.
pub fn writable_dir_problem(dir: &Path, key: &str) -> Option<Problem> {
    let probe = if dir.exists() {
        dir.to_path_buf()
    } else {
        dir.ancestors().find(|a| a.exists())?.to_path_buf()
    };
    if nix::unistd::access(
        &probe,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .is_err()
    {
        use std::os::unix::fs::MetadataExt;
        let owner = std::fs::metadata(&probe).map(|m| m.uid()).unwrap_or(0);
        return Some(Problem::fatal(format!(
            "{key} {}: {} is not writable by this user (uid {}; it is owned by uid {owner}); give it to the service's user or choose another {key}",
            dir.display(),
            probe.display(),
            nix::unistd::geteuid()
        )));
    }
    None
}
