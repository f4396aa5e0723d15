//! Secrets at rest: webhook-source secrets must be usable for verification, so they are
//! stored encrypted (XChaCha20-Poly1305) under a key that is not in the database: given in
//! `LEADLEDGER_SECRET_KEY` (base64 of 32 bytes), or kept in `<data dir>/secret.key`
//! (mode 0600, made on first use). Processes sharing a database must share the key.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use rand::RngCore;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("LEADLEDGER_SECRET_KEY must be the base64 of 32 bytes")]
    BadKey,
    #[error("the secret key file {0}: {1}")]
    KeyFile(String, std::io::Error),
    #[error("a stored secret cannot be decrypted with this key (was the secret key changed?)")]
    Decrypt,
}

/// Encrypts and decrypts small secrets.
#[derive(Clone)]
pub struct SecretBox {
    cipher: XChaCha20Poly1305,
    key: [u8; 32],
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(..)")
    }
}

impl SecretBox {
    pub fn from_key(key: [u8; 32]) -> Self {
        Self {
            cipher: XChaCha20Poly1305::new(Key::from_slice(&key)),
            key,
        }
    }

    /// A key for one purpose, derived from the secret key (HMAC-SHA256 of the purpose's
    /// name): each use has its own key, and none of them reveals the secret key.
    pub fn derive(&self, purpose: &str) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes a key of any length");
        mac.update(b"leadledger/");
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A box with a random key: for throw-away databases (tests, benchmarks) only.
    pub fn ephemeral() -> Self {
        let mut key = [0u8; 32];
        rand::rng().fill_bytes(&mut key);
        Self::from_key(key)
    }

    /// The configured key: the environment's, else the data directory's (made if absent).
    pub fn load(env_key: Option<&str>, data_dir: &Path) -> Result<Self, SecretError> {
        if let Some(encoded) = env_key {
            let bytes = STANDARD
                .decode(encoded.trim())
                .map_err(|_| SecretError::BadKey)?;
            let key: [u8; 32] = bytes.try_into().map_err(|_| SecretError::BadKey)?;
            return Ok(Self::from_key(key));
        }
        let path = data_dir.join("secret.key");
        let err = |e| SecretError::KeyFile(path.display().to_string(), e);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = STANDARD
                    .decode(text.trim())
                    .map_err(|_| SecretError::BadKey)?;
                let key: [u8; 32] = bytes.try_into().map_err(|_| SecretError::BadKey)?;
                Ok(Self::from_key(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::create_dir_all(data_dir).map_err(err)?;
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                // create_new: two processes starting at once cannot both write a key.
                match std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
                {
                    Ok(mut f) => {
                        f.write_all(format!("{}\n", STANDARD.encode(key)).as_bytes())
                            .map_err(err)?;
                        Ok(Self::from_key(key))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load(None, data_dir)
                    }
                    Err(e) => Err(err(e)),
                }
            }
            Err(e) => Err(err(e)),
        }
    }

    /// (nonce, ciphertext)
    pub fn seal(&self, plaintext: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), plaintext)
            .expect("encryption of a small buffer cannot fail");
        (nonce.to_vec(), ciphertext)
    }

    pub fn open(&self, nonce: &[u8], ciphertext: &[u8]) -> Result<Vec<u8>, SecretError> {
        if nonce.len() != 24 {
            return Err(SecretError::Decrypt);
        }
        self.cipher
            .decrypt(XNonce::from_slice(nonce), ciphertext)
            .map_err(|_| SecretError::Decrypt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_secret_opens_with_its_key_and_not_with_another() {
        let a = SecretBox::ephemeral();
        let (nonce, sealed) = a.seal(b"whsec_abc");
        assert_ne!(sealed, b"whsec_abc");
        assert_eq!(a.open(&nonce, &sealed).unwrap(), b"whsec_abc");
        assert!(SecretBox::ephemeral().open(&nonce, &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert!(a.open(&nonce, &tampered).is_err());
    }

    #[test]
    fn the_key_file_is_made_once_private_and_reused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let first = SecretBox::load(None, dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("secret.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (nonce, sealed) = first.seal(b"x");
        let again = SecretBox::load(None, dir.path()).unwrap();
        assert_eq!(again.open(&nonce, &sealed).unwrap(), b"x");
        assert!(SecretBox::load(Some("too short"), dir.path()).is_err());
    }
}
