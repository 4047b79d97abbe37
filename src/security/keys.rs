//! X25519 key pairs and their files. A private key file is one line
//! `ots-x25519-private <64 hex digits>`, a public one
//! `ots-x25519-public <64 hex digits>`; a private key file readable or
//! writable by group or others is refused, as ssh refuses one.

use super::SecurityError;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

const PRIVATE_TAG: &str = "ots-x25519-private";
const PUBLIC_TAG: &str = "ots-x25519-public";

/// A public key: 32 bytes, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; 32]);

impl std::fmt::Display for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A static key pair. The private half is never printed.
#[derive(Clone)]
pub struct KeyPair {
    pub(crate) private: [u8; 32],
    pub public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair {{ public: {} }}", self.public)
    }
}

fn key_error(path: &Path, reason: impl Into<String>) -> SecurityError {
    SecurityError::KeyFile {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

fn parse_line(path: &Path, text: &str, tag: &str) -> Result<[u8; 32], SecurityError> {
    let line = text.lines().next().unwrap_or("").trim();
    let hexpart = line
        .strip_prefix(tag)
        .map(str::trim)
        .ok_or_else(|| key_error(path, format!("does not start with `{tag}`")))?;
    let bytes = hex::decode(hexpart).map_err(|_| key_error(path, "the key is not hex"))?;
    bytes
        .try_into()
        .map_err(|_| key_error(path, "the key is not 32 bytes"))
}

impl KeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        let params = super::NOISE_PARAMS.parse().expect("valid noise params");
        let kp = snow::Builder::new(params)
            .generate_keypair()
            .expect("X25519 key generation");
        KeyPair {
            private: kp.private.try_into().expect("32-byte private key"),
            public: PublicKey(kp.public.try_into().expect("32-byte public key")),
        }
    }

    /// Writes `PATH.key` (mode 0600, created new: never overwrites a key)
    /// and `PATH.pub`.
    pub fn write(&self, base: &Path) -> Result<(), SecurityError> {
        let private = base.with_extension("key");
        let public = base.with_extension("pub");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&private)
            .map_err(|e| key_error(&private, e.to_string()))?;
        writeln!(f, "{PRIVATE_TAG} {}", hex::encode(self.private))
            .map_err(|e| key_error(&private, e.to_string()))?;
        self.public.write(&public)
    }

    /// A 32-byte key for another purpose (`label` names it), derived from
    /// the private key: SHA-256(label ‖ private key). Whoever can read the
    /// key file can derive it; nobody else can.
    pub fn derive(&self, label: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(label.as_bytes());
        h.update(self.private);
        h.finalize().into()
    }

    /// Reads a private key file, refusing one others may read or write,
    /// or that someone other than root or this process's user owns (they
    /// could replace it).
    pub fn read(path: &Path) -> Result<Self, SecurityError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(|e| key_error(path, e.to_string()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SecurityError::KeyTooOpen {
                path: path.display().to_string(),
                mode,
            });
        }
        let me = nix::unistd::geteuid().as_raw();
        let service = service_user().map(|u| u.uid.as_raw());
        if meta.uid() != 0 && meta.uid() != me && Some(meta.uid()) != service {
            return Err(SecurityError::Untrusted {
                path: path.display().to_string(),
                reason: format!(
                    "this private key is owned by uid {}, neither root nor this process's user (uid {me})",
                    meta.uid()
                ),
                fix: format!("chown {me} {}", path.display()),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))?;
        let private = parse_line(path, &text, PRIVATE_TAG)?;
        let public = x25519_public(&private);
        Ok(KeyPair {
            private,
            public: PublicKey(public),
        })
    }
}

/// `keygen` of the three binaries: writes `BASE.key` and `BASE.pub`, prints
/// what it did and the public key; returns the exit status (0, or 73 when
/// the files cannot be created, e.g. because a key is already there).
pub fn keygen_command(program: &str, base: &Path) -> u8 {
    let kp = KeyPair::generate();
    if let Some(parent) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Err(e) = std::fs::create_dir_all(parent) {
            crate::errln!("{program}: keygen: cannot create {}: {e}", parent.display());
            return 73;
        }
    }
    match kp.write(base) {
        Ok(()) => {
            let private = base.with_extension("key");
            // The services run as `ots`: a key root makes for them must be
            // theirs to read (ots-submit's keys stay their user's).
            let handed = if program != "ots-submit" && nix::unistd::geteuid().is_root() {
                service_user().and_then(|u| {
                    nix::unistd::chown(&private, Some(u.uid), Some(u.gid))
                        .ok()
                        .map(|()| u.name)
                })
            } else {
                None
            };
            crate::outln!(
                "wrote {} (private, mode 0600{}) and {}
public key: {}",
                private.display(),
                handed.map_or(String::new(), |u| format!(
                    ", owned by {u}, the service user"
                )),
                base.with_extension("pub").display(),
                kp.public
            );
            0
        }
        Err(e) => {
            crate::errln!("{program}: keygen: {e}");
            73
        }
    }
}

impl PublicKey {
    /// Writes a public key file (an allow-list entry).
    pub fn write(&self, path: &Path) -> Result<(), SecurityError> {
        std::fs::write(path, format!("{PUBLIC_TAG} {self}\n"))
            .map_err(|e| key_error(path, e.to_string()))
    }

    /// Reads a public key file.
    pub fn read(path: &Path) -> Result<Self, SecurityError> {
        let text = std::fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))?;
        parse_public(path, &text)
    }

    /// Parses 64 hex digits (as `server_key` is given in a config file).
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text.trim()).ok()?;
        Some(PublicKey(bytes.try_into().ok()?))
    }
}

/// Parses the text of a public key file (`path` names it in errors).
pub fn parse_public(path: &Path, text: &str) -> Result<PublicKey, SecurityError> {
    Ok(PublicKey(parse_line(path, text, PUBLIC_TAG)?))
}

/// The X25519 public key of `private`, computed by a Noise DH with the
/// base point (so no second curve implementation is needed).
fn x25519_public(private: &[u8; 32]) -> [u8; 32] {
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut dh = DefaultResolver
        .resolve_dh(&snow::params::DHChoice::Curve25519)
        .expect("curve25519");
    dh.set(private);
    dh.pubkey().try_into().expect("32-byte public key")
}

/// The account the units run the services as (`User=ots`), if it exists:
/// keys it owns are trusted, since it runs the server and workers.
pub fn service_user() -> Option<nix::unistd::User> {
    nix::unistd::User::from_name("ots").ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_pair_reads_back_and_the_public_key_matches() {
        let dir = tempfile::tempdir().unwrap();
        let kp = KeyPair::generate();
        kp.write(&dir.path().join("w1")).unwrap();
        let back = KeyPair::read(&dir.path().join("w1.key")).unwrap();
        assert_eq!(back.public, kp.public);
        assert_eq!(back.private, kp.private);
        assert_eq!(
            PublicKey::read(&dir.path().join("w1.pub")).unwrap(),
            kp.public
        );
        // Never overwrites an existing key.
        assert!(kp.write(&dir.path().join("w1")).is_err());
    }

    #[test]
    fn a_private_key_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        KeyPair::generate().write(&dir.path().join("s")).unwrap();
        let path = dir.path().join("s.key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = KeyPair::read(&path).unwrap_err();
        assert!(
            matches!(e, SecurityError::KeyTooOpen { mode: 0o644, .. }),
            "{e}"
        );
        assert!(e.to_string().contains("chmod 600"));
    }

    #[test]
    fn garbage_key_files_are_typed_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.pub");
        std::fs::write(&path, "ots-x25519-public zz\n").unwrap();
        assert!(matches!(
            PublicKey::read(&path),
            Err(SecurityError::KeyFile { .. })
        ));
        std::fs::write(&path, "something else\n").unwrap();
        assert!(PublicKey::read(&path).is_err());
    }
}
