//! Encryption at rest: every object version has its own data key; data keys are kept only
//! wrapped by the node's master key. AES-256-GCM throughout.
//!
//! A stripe is sealed with the object's data key under a nonce made of the stripe's index
//! (a data key seals one object version, so no nonce repeats under a key), with the version
//! id as associated data: a block moved from another object or another stripe fails to open.
//! Wrapped keys and sealed metadata use random nonces.

use aes_gcm::aead::{AeadInPlace as _, KeyInit as _};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use crate::layout::TAG_BYTES;

pub const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 12;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error(
        "decryption failed: the bytes were changed, or sealed under another key or for another object"
    )]
    Open,
    #[error("a sealed value is {0} bytes, shorter than its nonce and tag")]
    Short(usize),
    #[error("the operating system's random generator failed: {0}")]
    Random(String),
}

/// Fill `bytes` from the operating system's random generator.
pub fn random(bytes: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(bytes).map_err(|e| CryptoError::Random(e.to_string()))
}

/// A 256-bit AES-GCM key. Its bytes are never printed.
#[derive(Clone)]
pub struct Key([u8; KEY_BYTES]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub fn generate() -> Result<Key, CryptoError> {
        let mut bytes = [0; KEY_BYTES];
        random(&mut bytes)?;
        Ok(Key(bytes))
    }

    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Key {
        Key(bytes)
    }

    pub fn bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.0.into())
    }

    /// Seal stripe `stripe` of version `version` in place: `buffer` gets the tag appended.
    pub fn seal_stripe(&self, version: &[u8], stripe: u64, buffer: &mut Vec<u8>) {
        let tag = self
            .cipher()
            .encrypt_in_place_detached(&stripe_nonce(stripe), version, buffer)
            .expect("a stripe is far below AES-GCM's message limit");
        buffer.extend_from_slice(&tag);
    }

    /// Open a sealed stripe in place: the tag is checked and removed.
    pub fn open_stripe(
        &self,
        version: &[u8],
        stripe: u64,
        buffer: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        if buffer.len() < TAG_BYTES {
            return Err(CryptoError::Short(buffer.len()));
        }
        let tag = Tag::clone_from_slice(&buffer[buffer.len() - TAG_BYTES..]);
        buffer.truncate(buffer.len() - TAG_BYTES);
        self.cipher()
            .decrypt_in_place_detached(&stripe_nonce(stripe), version, buffer, &tag)
            .map_err(|_| CryptoError::Open)
    }

    /// Seal a small value (a wrapped key, metadata) under a random nonce: nonce, ciphertext,
    /// tag. `context` is bound to it (it must be given again to open it).
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0; NONCE_BYTES];
        random(&mut nonce)?;
        let mut out = plaintext.to_vec();
        let tag = self
            .cipher()
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), context, &mut out)
            .expect("small values are far below AES-GCM's message limit");
        let mut sealed = nonce.to_vec();
        sealed.append(&mut out);
        sealed.extend_from_slice(&tag);
        Ok(sealed)
    }

    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < NONCE_BYTES + TAG_BYTES {
            return Err(CryptoError::Short(sealed.len()));
        }
        let (nonce, rest) = sealed.split_at(NONCE_BYTES);
        let (ciphertext, tag) = rest.split_at(rest.len() - TAG_BYTES);
        let mut out = ciphertext.to_vec();
        self.cipher()
            .decrypt_in_place_detached(
                Nonce::from_slice(nonce),
                context,
                &mut out,
                Tag::from_slice(tag),
            )
            .map_err(|_| CryptoError::Open)?;
        Ok(out)
    }

    /// This key wrapped by `master` for the object version `version`.
    pub fn wrap(&self, master: &Key, version: &[u8]) -> Result<Vec<u8>, CryptoError> {
        master.seal(version, &self.0)
    }

    pub fn unwrap(master: &Key, version: &[u8], wrapped: &[u8]) -> Result<Key, CryptoError> {
        let bytes = master.open(version, wrapped)?;
        let bytes: [u8; KEY_BYTES] = bytes.try_into().map_err(|_| CryptoError::Open)?;
        Ok(Key(bytes))
    }
}

fn stripe_nonce(stripe: u64) -> Nonce<aes_gcm::aead::consts::U12> {
    let mut nonce = [0; NONCE_BYTES];
    nonce[..8].copy_from_slice(&stripe.to_le_bytes());
    *Nonce::from_slice(&nonce)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_open_only_where_they_were_sealed() {
        let key = Key::generate().expect("random");
        let mut sealed = b"traffic counts".to_vec();
        key.seal_stripe(b"version-a", 3, &mut sealed);
        assert_eq!(sealed.len(), 14 + TAG_BYTES);
        assert!(!sealed.windows(7).any(|w| w == b"traffic"), "no plaintext");
        let mut copy = sealed.clone();
        key.open_stripe(b"version-a", 3, &mut copy).expect("opens");
        assert_eq!(copy, b"traffic counts");
        for (version, stripe) in [(&b"version-b"[..], 3), (b"version-a", 4)] {
            let mut copy = sealed.clone();
            assert_eq!(
                key.open_stripe(version, stripe, &mut copy),
                Err(CryptoError::Open)
            );
        }
        let mut flipped = sealed.clone();
        flipped[2] ^= 1;
        assert_eq!(
            key.open_stripe(b"version-a", 3, &mut flipped),
            Err(CryptoError::Open)
        );
    }

    #[test]
    fn wrapped_keys_unwrap_only_with_their_master_and_version() {
        let (master, other) = (
            Key::generate().expect("random"),
            Key::generate().expect("random"),
        );
        let data = Key::generate().expect("random");
        let wrapped = data.wrap(&master, b"v1").expect("wraps");
        assert_eq!(
            Key::unwrap(&master, b"v1", &wrapped)
                .expect("unwraps")
                .bytes(),
            data.bytes()
        );
        assert!(Key::unwrap(&other, b"v1", &wrapped).is_err());
        assert!(Key::unwrap(&master, b"v2", &wrapped).is_err());
        assert!(Key::unwrap(&master, b"v1", &wrapped[..10]).is_err());
    }
}
