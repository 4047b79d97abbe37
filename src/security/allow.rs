//! The server's allow-lists: who may connect, as what, with which rights.
//!
//! Two directories, one file per identity, the file name being the name:
//! `workers.d/NAME.pub` (a worker that may register as NAME and nothing
//! else) and `users.d/NAME.pub` with an optional `users.d/NAME.role`
//! (`submit`, the default, `operator` or `admin`). Loading is all or
//! nothing: a bad file refuses the whole list with its path and reason, so
//! a typo never silently admits or locks out anyone (at start the server
//! refuses to run; on a reload the previous list stays in force).

use super::{PublicKey, SecurityError};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Files per directory at most: a directory that grew past this is refused
/// rather than read without bound.
pub const MAX_IDENTITIES: usize = 100_000;
/// A key or role file larger than this is not one.
const MAX_FILE_BYTES: u64 = 4096;

/// What a user may do (PROTOCOL.md §15.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Submit testruns; see, follow and cancel its own.
    Submit,
    /// Everything `submit` may, for every testrun; drain workers.
    Operator,
    /// Everything, including the audit log.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "submit" => Ok(Role::Submit),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "role {other:?} is not one of submit, operator, admin"
            )),
        }
    }
}

/// Who an authenticated key is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Identity {
    /// May register as worker `name`, only.
    Worker { name: String },
    /// May use the client requests its role allows.
    User { name: String, role: Role },
}

impl Identity {
    pub fn name(&self) -> &str {
        match self {
            Identity::Worker { name } | Identity::User { name, .. } => name,
        }
    }

    /// `worker:NAME` or `user:NAME`, as logs and the audit log show it.
    pub fn label(&self) -> String {
        match self {
            Identity::Worker { name } => format!("worker:{name}"),
            Identity::User { name, .. } => format!("user:{name}"),
        }
    }
}

/// Every allowed key and who it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    by_key: HashMap<PublicKey, Identity>,
}

/// What changed in a directory since it was last read: names, sizes and
/// modification times of its entries. Cheap to compute every second.
pub type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, SecurityError> {
    let err = |reason: String| SecurityError::KeyFile {
        path: dir.display().to_string(),
        reason,
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        // A missing directory is an empty list: nobody of that kind.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e.to_string())),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| err(e.to_string()))?;
        paths.push(entry.path());
        if paths.len() > 2 * MAX_IDENTITIES {
            return Err(err(format!(
                "more than {MAX_IDENTITIES} identities; refused"
            )));
        }
    }
    paths.sort();
    Ok(paths)
}

/// The fingerprint of both directories (see [`Fingerprint`]).
pub fn fingerprint(workers_dir: &Path, users_dir: &Path) -> Fingerprint {
    let mut out = Vec::new();
    for dir in [workers_dir, users_dir] {
        for path in list_dir(dir).unwrap_or_default() {
            let meta = std::fs::metadata(&path).ok();
            out.push((
                path,
                meta.as_ref().map_or(0, |m| m.len()),
                meta.and_then(|m| m.modified().ok()),
            ));
        }
    }
    out
}

fn read_small(path: &Path) -> Result<String, SecurityError> {
    use std::io::Read;
    let err = |reason: String| SecurityError::KeyFile {
        path: path.display().to_string(),
        reason,
    };
    let f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let mut text = String::new();
    f.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| err(e.to_string()))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(err(format!("larger than {MAX_FILE_BYTES} bytes")));
    }
    Ok(text)
}

/// The identity name a `NAME.pub` file stands for, if it is one.
fn name_of(path: &Path, ext: &str) -> Option<String> {
    if path.extension()? != ext {
        return None;
    }
    Some(path.file_stem()?.to_str()?.to_string())
}

impl AllowList {
    /// Reads both directories (a missing one is empty).
    pub fn load(workers_dir: &Path, users_dir: &Path) -> Result<Self, SecurityError> {
        let mut list = AllowList::default();
        for (dir, users) in [(workers_dir, false), (users_dir, true)] {
            for path in list_dir(dir)? {
                let Some(name) = name_of(&path, "pub") else {
                    continue; // NAME.role, README, editor backups…
                };
                let bad = |reason: String| SecurityError::KeyFile {
                    path: path.display().to_string(),
                    reason,
                };
                if !crate::protocol::limits::is_safe_id(&name) {
                    return Err(bad(format!(
                        "{name:?} is not a valid identity name (1–64 of A–Z a–z 0–9 . _ -)"
                    )));
                }
                let text = read_small(&path)?;
                let key = super::keys::parse_public(&path, &text)?;
                let identity = if users {
                    let role_file = path.with_extension("role");
                    let role = match read_small(&role_file) {
                        Ok(text) => text.parse().map_err(|e| SecurityError::KeyFile {
                            path: role_file.display().to_string(),
                            reason: e,
                        })?,
                        Err(_) if !role_file.exists() => Role::Submit,
                        Err(e) => return Err(e),
                    };
                    Identity::User { name, role }
                } else {
                    Identity::Worker { name }
                };
                if let Some(other) = list.by_key.get(&key) {
                    return Err(bad(format!(
                        "the same key is already allowed as {}; one key, one identity",
                        other.label()
                    )));
                }
                list.by_key.insert(key, identity);
            }
        }
        Ok(list)
    }

    /// Builds a list directly (tests, `run --local`).
    pub fn from_entries(entries: impl IntoIterator<Item = (PublicKey, Identity)>) -> Self {
        AllowList {
            by_key: entries.into_iter().collect(),
        }
    }

    pub fn get(&self, key: &PublicKey) -> Option<&Identity> {
        self.by_key.get(key)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// Names of the allowed workers.
    pub fn worker_names(&self) -> std::collections::HashSet<String> {
        self.by_key
            .values()
            .filter_map(|i| match i {
                Identity::Worker { name } => Some(name.clone()),
                _ => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::KeyPair;

    #[test]
    fn keys_roles_and_mistakes() {
        let dir = tempfile::tempdir().unwrap();
        let (w, u) = (dir.path().join("workers.d"), dir.path().join("users.d"));
        std::fs::create_dir_all(&w).unwrap();
        std::fs::create_dir_all(&u).unwrap();
        let (kw, ku, ko) = (
            KeyPair::generate(),
            KeyPair::generate(),
            KeyPair::generate(),
        );
        kw.write(&w.join("rig-1")).unwrap();
        std::fs::remove_file(w.join("rig-1.key")).unwrap();
        ku.write(&u.join("alice")).unwrap();
        ko.write(&u.join("bob")).unwrap();
        std::fs::write(u.join("bob.role"), "operator\n").unwrap();
        std::fs::write(u.join("README"), "not a key").unwrap();
        let list = AllowList::load(&w, &u).unwrap();
        assert_eq!(
            list.get(&kw.public),
            Some(&Identity::Worker {
                name: "rig-1".into()
            })
        );
        assert_eq!(
            list.get(&ku.public),
            Some(&Identity::User {
                name: "alice".into(),
                role: Role::Submit
            })
        );
        assert_eq!(
            list.get(&ko.public),
            Some(&Identity::User {
                name: "bob".into(),
                role: Role::Operator
            })
        );
        assert!(list.worker_names().contains("rig-1") && !list.worker_names().contains("alice"));
        // A bad role refuses the whole list, naming the file.
        std::fs::write(u.join("bob.role"), "root\n").unwrap();
        let e = AllowList::load(&w, &u).unwrap_err().to_string();
        assert!(e.contains("bob.role") && e.contains("root"), "{e}");
        std::fs::write(u.join("bob.role"), "admin").unwrap();
        // One key under two names is refused.
        std::fs::copy(u.join("alice.pub"), w.join("alice.pub")).unwrap();
        let e = AllowList::load(&w, &u).unwrap_err().to_string();
        assert!(e.contains("one key, one identity"), "{e}");
        std::fs::remove_file(w.join("alice.pub")).unwrap();
        // A name that is not an identifier is refused.
        std::fs::write(w.join("..x.pub"), "x").unwrap();
        assert!(AllowList::load(&w, &u).is_err());
        std::fs::remove_file(w.join("..x.pub")).unwrap();
        // Missing directories are empty lists.
        let none = AllowList::load(&dir.path().join("no"), &dir.path().join("nope")).unwrap();
        assert!(none.is_empty());
        // The fingerprint changes when a key goes.
        let before = fingerprint(&w, &u);
        std::fs::remove_file(u.join("alice.pub")).unwrap();
        assert_ne!(before, fingerprint(&w, &u));
    }
}
