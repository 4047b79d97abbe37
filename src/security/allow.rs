//! The server's allow-lists: who may connect, as what, with which rights.
//!
//! Two directories, one file per identity, the file name being the name:
//! `workers.d/NAME.pub` (a worker that may register as NAME and nothing
//! else) and `users.d/NAME.pub` with an optional `users.d/NAME.role`
//! (`submit`, the default, `operator` or `admin`); a worker may also have
//! `workers.d/NAME.device`, the devices its key may serve.
//!
//! Entries fail closed one by one: a bad file (unreadable, not a key, a
//! bad role or device pin, a key already used by another name) denies
//! only its own identity, with its path and reason; every other entry, and
//! every removal, takes effect. Like sshd's StrictModes, a directory or
//! file that someone other than root or the server's own user owns, or
//! that group or others may write, is not trusted: anyone who can write
//! there could make itself admin. The server refuses to start on one; on a
//! reload an untrusted file is denied and an untrusted directory adds no
//! one (only removals from it apply).

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
    /// May register as worker `name`, only, for the devices its pin allows
    /// (`workers.d/NAME.device`; without one, the device of its first
    /// registration). The pin stays on the server (not in handshakes).
    Worker {
        name: String,
        #[serde(skip)]
        pin: Option<crate::protocol::DevicePin>,
    },
    /// May use the client requests its role allows.
    User { name: String, role: Role },
}

impl Identity {
    pub fn name(&self) -> &str {
        match self {
            Identity::Worker { name, .. } | Identity::User { name, .. } => name,
        }
    }

    /// `worker:NAME` or `user:NAME`, as logs and the audit log show it.
    pub fn label(&self) -> String {
        match self {
            Identity::Worker { name, .. } => format!("worker:{name}"),
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

/// Why a path cannot be trusted (StrictModes), if it cannot: writable by
/// group or others, or owned by someone other than root and this process's
/// user.
pub fn untrusted(path: &Path) -> Option<SecurityError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    let mode = meta.mode() & 0o7777;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Some(SecurityError::Untrusted {
            path: path.display().to_string(),
            reason: format!(
                "it is owned by uid {}, neither root nor this server's user (uid {me})",
                meta.uid()
            ),
            fix: format!("chown {me} {}", path.display()),
        });
    }
    if mode & 0o022 != 0 && !meta.file_type().is_symlink() {
        return Some(SecurityError::Untrusted {
            path: path.display().to_string(),
            reason: format!("group or others may write it (mode {mode:o})"),
            fix: format!("chmod go-w {}", path.display()),
        });
    }
    None
}

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

/// What loading the allow-lists found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The entries that loaded.
    pub list: AllowList,
    /// Entries denied for their content, each naming its file.
    pub refused: Vec<SecurityError>,
    /// Files denied because they cannot be trusted (StrictModes).
    pub untrusted_files: Vec<SecurityError>,
    /// Directories that cannot be trusted: at start the server refuses to
    /// run; on a reload they add no one.
    pub untrusted_dirs: Vec<SecurityError>,
}

impl Loaded {
    /// Every problem found, for logs and `--check-config`.
    pub fn problems(&self) -> impl Iterator<Item = &SecurityError> {
        self.untrusted_dirs
            .iter()
            .chain(&self.untrusted_files)
            .chain(&self.refused)
    }

    /// The list to apply on a reload while `previous` is in force: all of
    /// it, unless a directory cannot be trusted — then only what was
    /// allowed before and still is (removals apply, additions do not).
    pub fn reloaded(self, previous: &AllowList) -> AllowList {
        if self.untrusted_dirs.is_empty() {
            return self.list;
        }
        AllowList {
            by_key: self
                .list
                .by_key
                .into_iter()
                .filter(|(k, id)| previous.by_key.get(k) == Some(id))
                .collect(),
        }
    }
}

/// An allow-list entry: the key and who it is.
type Entry = (PublicKey, Identity);

/// One identity's entry: its name checked, its companion file read.
fn read_entry(
    path: &Path,
    name: String,
    users: bool,
    key: PublicKey,
) -> Result<Entry, SecurityError> {
    let bad = |reason: String| SecurityError::KeyFile {
        path: path.display().to_string(),
        reason,
    };
    if !crate::protocol::limits::is_safe_id(&name) {
        return Err(bad(format!(
            "{name:?} is not a valid identity name (1–64 of A–Z a–z 0–9 . _ -)"
        )));
    }
    // The optional companion file (`.role` or `.device`): absent is the
    // default, present must be right.
    let companion = |ext: &str| -> Result<Option<(PathBuf, String)>, SecurityError> {
        let file = path.with_extension(ext);
        if !file.exists() {
            return Ok(None);
        }
        if let Some(e) = untrusted(&file) {
            return Err(e);
        }
        Ok(Some((file.clone(), read_small(&file)?)))
    };
    let identity = if users {
        let role = match companion("role")? {
            None => Role::Submit,
            Some((file, text)) => text.parse().map_err(|e| SecurityError::KeyFile {
                path: file.display().to_string(),
                reason: e,
            })?,
        };
        Identity::User { name, role }
    } else {
        let pin = match companion("device")? {
            None => None,
            Some((file, text)) => Some(crate::protocol::DevicePin::parse(text.trim()).map_err(
                |e| SecurityError::KeyFile {
                    path: file.display().to_string(),
                    reason: format!("not a device pin ({e}); write e.g. \"devicegroup:lab devicename:n900 deviceid:dev42\" (values may be glob patterns)"),
                },
            )?),
        };
        Identity::Worker { name, pin }
    };
    Ok((key, identity))
}

impl AllowList {
    /// Reads both directories (a missing one is empty); see the module
    /// documentation for what fails closed and how.
    pub fn load(workers_dir: &Path, users_dir: &Path) -> Result<Loaded, SecurityError> {
        let mut loaded = Loaded::default();
        // Every entry read once; then keys seen in more than one `.pub`
        // file deny every entry holding them, whatever else is wrong with
        // either (which name would be the right one is not ours to guess).
        let mut entries: Vec<(PathBuf, Result<Entry, SecurityError>)> = Vec::new();
        let mut paths_of: HashMap<PublicKey, Vec<PathBuf>> = HashMap::new();
        for (dir, users) in [(workers_dir, false), (users_dir, true)] {
            if !dir.exists() {
                continue;
            }
            if let Some(e) = untrusted(dir) {
                loaded.untrusted_dirs.push(e);
            }
            for path in list_dir(dir)? {
                let Some(name) = name_of(&path, "pub") else {
                    continue; // NAME.role, NAME.device, README, editor backups…
                };
                if let Some(e) = untrusted(&path) {
                    loaded.untrusted_files.push(e);
                    continue;
                }
                let key = read_small(&path).and_then(|t| super::keys::parse_public(&path, &t));
                if let Ok(key) = &key {
                    paths_of.entry(*key).or_default().push(path.clone());
                }
                let entry = key.and_then(|key| read_entry(&path, name, users, key));
                entries.push((path, entry));
            }
        }
        for (path, entry) in entries {
            match entry {
                Ok((key, identity)) => {
                    let others: Vec<String> = paths_of[&key]
                        .iter()
                        .filter(|p| **p != path)
                        .map(|p| p.display().to_string())
                        .collect();
                    if others.is_empty() {
                        loaded.list.by_key.insert(key, identity);
                    } else {
                        loaded.refused.push(SecurityError::KeyFile {
                            path: path.display().to_string(),
                            reason: format!(
                                "the same key is also in {}; one key, one identity: every entry with it is denied until only one remains",
                                others.join(", ")
                            ),
                        });
                    }
                }
                Err(e @ SecurityError::Untrusted { .. }) => loaded.untrusted_files.push(e),
                Err(e) => loaded.refused.push(e),
            }
        }
        Ok(loaded)
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

    /// The allowed users with their roles and keys (a dashboard session
    /// is bound to the key that asked for its link).
    pub fn user_grants(&self) -> HashMap<String, (Role, PublicKey)> {
        self.by_key
            .iter()
            .filter_map(|(key, i)| match i {
                Identity::User { name, role } => Some((name.clone(), (*role, *key))),
                _ => None,
            })
            .collect()
    }

    /// Names of the allowed workers.
    pub fn worker_names(&self) -> std::collections::HashSet<String> {
        self.by_key
            .values()
            .filter_map(|i| match i {
                Identity::Worker { name, .. } => Some(name.clone()),
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
        let list = AllowList::load(&w, &u).unwrap().list;
        assert_eq!(
            list.get(&kw.public),
            Some(&Identity::Worker {
                name: "rig-1".into(),
                pin: None,
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
        // A bad role denies that user only, naming the file.
        std::fs::write(u.join("bob.role"), "root\n").unwrap();
        let loaded = AllowList::load(&w, &u).unwrap();
        let e = loaded.refused[0].to_string();
        assert!(e.contains("bob.role") && e.contains("root"), "{e}");
        assert_eq!(loaded.list.get(&ko.public), None);
        assert!(loaded.list.get(&ku.public).is_some() && loaded.list.get(&kw.public).is_some());
        std::fs::write(u.join("bob.role"), "admin").unwrap();
        // One key under two names: both denied, the others stay.
        std::fs::copy(u.join("alice.pub"), w.join("alice.pub")).unwrap();
        let loaded = AllowList::load(&w, &u).unwrap();
        assert!(loaded.refused[0]
            .to_string()
            .contains("one key, one identity"));
        assert_eq!(loaded.list.get(&ku.public), None);
        assert!(loaded.list.get(&ko.public).is_some());
        std::fs::remove_file(w.join("alice.pub")).unwrap();
        // A name that is not an identifier is denied alone.
        std::fs::write(w.join("..x.pub"), "x").unwrap();
        let loaded = AllowList::load(&w, &u).unwrap();
        assert_eq!(loaded.refused.len(), 1);
        assert_eq!(loaded.list.len(), 3);
        std::fs::remove_file(w.join("..x.pub")).unwrap();
        // A device pin is read with the worker's key; a bad one denies it.
        std::fs::write(w.join("rig-1.device"), "devicegroup:lab devicename:n9*\n").unwrap();
        let list = AllowList::load(&w, &u).unwrap().list;
        match list.get(&kw.public) {
            Some(Identity::Worker { pin: Some(pin), .. }) => {
                assert_eq!(pin.to_string(), "devicegroup:lab devicename:n9*")
            }
            other => panic!("{other:?}"),
        }
        std::fs::write(w.join("rig-1.device"), "devicegroup:[\n").unwrap();
        let loaded = AllowList::load(&w, &u).unwrap();
        assert!(loaded.refused[0].to_string().contains("rig-1.device"));
        assert_eq!(loaded.list.get(&kw.public), None);
        std::fs::remove_file(w.join("rig-1.device")).unwrap();
        // StrictModes: a directory others may write adds no one on a reload.
        use std::os::unix::fs::PermissionsExt;
        let before = AllowList::load(&w, &u).unwrap().list;
        let newcomer = KeyPair::generate();
        newcomer.public.write(&u.join("mallory.pub")).unwrap();
        std::fs::write(u.join("mallory.role"), "admin").unwrap();
        std::fs::remove_file(u.join("bob.pub")).unwrap();
        std::fs::set_permissions(&u, std::fs::Permissions::from_mode(0o777)).unwrap();
        let loaded = AllowList::load(&w, &u).unwrap();
        assert!(
            loaded.untrusted_dirs[0].to_string().contains("chmod go-w"),
            "{:?}",
            loaded.untrusted_dirs
        );
        let applied = loaded.reloaded(&before);
        assert_eq!(
            applied.get(&newcomer.public),
            None,
            "an addition through an untrusted directory"
        );
        assert_eq!(applied.get(&ko.public), None, "a removal did not apply");
        assert!(applied.get(&ku.public).is_some());
        std::fs::set_permissions(&u, std::fs::Permissions::from_mode(0o755)).unwrap();
        // …and a file others may write is denied.
        std::fs::set_permissions(
            u.join("mallory.pub"),
            std::fs::Permissions::from_mode(0o666),
        )
        .unwrap();
        let loaded = AllowList::load(&w, &u).unwrap();
        assert_eq!(loaded.untrusted_files.len(), 1);
        assert_eq!(loaded.list.get(&newcomer.public), None);
        std::fs::remove_file(u.join("mallory.pub")).unwrap();
        std::fs::write(u.join("alice.pub"), "").unwrap();
        std::fs::remove_file(u.join("alice.pub")).unwrap();
        ku.public.write(&u.join("alice.pub")).unwrap();
        // Missing directories are empty lists.
        let none = AllowList::load(&dir.path().join("no"), &dir.path().join("nope")).unwrap();
        assert!(none.list.is_empty());
        // The fingerprint changes when a key goes.
        let before = fingerprint(&w, &u);
        std::fs::remove_file(u.join("alice.pub")).unwrap();
        assert_ne!(before, fingerprint(&w, &u));
    }
}
