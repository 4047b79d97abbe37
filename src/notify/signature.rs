//! Webhook signatures as the Standard Webhooks specification defines
//! them: `webhook-signature: v1,BASE64(HMAC-SHA256(key, "ID.TIMESTAMP.BODY"))`
//! with `webhook-id` (stable per event and target, the same on every
//! retry) and `webhook-timestamp` (Unix seconds of this attempt).

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A target's signing key, from the content of its secret file.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({} bytes)", self.0.len())
    }
}

/// Why a secret file's content is not a key.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the secret is empty")]
    Empty,
    #[error("it starts with whsec_ but the rest is not base64: {0}")]
    NotBase64(String),
}

impl SigningKey {
    /// The key a secret file holds: its content without the trailing
    /// newline; or, when it starts with `whsec_`, the base64-decoded rest
    /// (as Standard Webhooks libraries read such secrets).
    pub fn from_file_content(content: &[u8]) -> Result<SigningKey, KeyError> {
        let mut c = content;
        while let [rest @ .., b'\n' | b'\r'] = c {
            c = rest;
        }
        if c.is_empty() {
            return Err(KeyError::Empty);
        }
        match c.strip_prefix(b"whsec_") {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(SigningKey)
                .map_err(|e| KeyError::NotBase64(e.to_string())),
            None => Ok(SigningKey(c.to_vec())),
        }
    }

    /// `v1,` and the signature of `body` sent as `id` at `timestamp`.
    pub fn sign(&self, id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(tag)
        )
    }

    /// Whether `header` (space-separated `v1,SIG` entries) holds a valid
    /// signature of `body` (what a receiver checks; used by the tests).
    pub fn verify(&self, id: &str, timestamp: u64, body: &[u8], header: &str) -> bool {
        let want = self.sign(id, timestamp, body);
        header.split(' ').any(|s| {
            s.len() == want.len()
                && s.bytes()
                    .zip(want.bytes())
                    .fold(0u8, |a, (x, y)| a | (x ^ y))
                    == 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference
    /// libraries: secret, id, timestamp, payload and the signature they
    /// compute for them.
    #[test]
    fn the_specifications_example_verifies() {
        let key =
            SigningKey::from_file_content(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n").unwrap();
        let sig = key.sign(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(key.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
            "v1,bogus v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!key.verify(
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265331,
            br#"{"test": 2432232314}"#,
            &sig
        ));
    }

    #[test]
    fn a_plain_secret_is_its_bytes_and_bad_ones_are_named() {
        let a = SigningKey::from_file_content(b"hunter2\n").unwrap();
        assert_eq!(a, SigningKey(b"hunter2".to_vec()));
        assert_eq!(SigningKey::from_file_content(b"\n"), Err(KeyError::Empty));
        assert!(matches!(
            SigningKey::from_file_content(b"whsec_***"),
            Err(KeyError::NotBase64(_))
        ));
    }
}
