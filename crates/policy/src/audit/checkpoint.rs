//! Signed checkpoints: the node's ed25519 key signs "the log held entry `seq` with chain
//! value `hash` at `time`". Exported to a place the node cannot rewrite, a checkpoint
//! later shows whether entries up to it were cut off or rewritten.

use base64::Engine as _;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use super::format::Hash;

/// A signed checkpoint, as stored in the log's `checkpoints` file and exported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    /// The chain value of entry `seq`, hex.
    pub hash: String,
    pub time_ms: u64,
    /// The signing key's public half, base64.
    pub public_key: String,
    /// ed25519 signature, base64.
    pub signature: String,
}

fn message(seq: u64, hash: &Hash, time_ms: u64) -> Vec<u8> {
    let mut out = b"maru audit checkpoint v1".to_vec();
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(hash);
    out.extend_from_slice(&time_ms.to_le_bytes());
    out
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn parse_hex(text: &str) -> Option<Hash> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// The node's signing key.
pub struct Signer {
    pair: Ed25519KeyPair,
}

impl Signer {
    /// A new key, as PKCS#8 bytes to keep.
    pub fn generate() -> Result<Vec<u8>, String> {
        let rng = ring::rand::SystemRandom::new();
        Ed25519KeyPair::generate_pkcs8(&rng)
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| "the system's random source failed".to_string())
    }

    pub fn from_pkcs8(bytes: &[u8]) -> Result<Signer, String> {
        Ed25519KeyPair::from_pkcs8(bytes)
            .map(|pair| Signer { pair })
            .map_err(|e| format!("not an ed25519 PKCS#8 key: {e}"))
    }

    pub fn public_key(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.pair.public_key().as_ref())
    }

    pub fn sign(&self, seq: u64, hash: &Hash, time_ms: u64) -> Checkpoint {
        let signature = self.pair.sign(&message(seq, hash, time_ms));
        Checkpoint {
            seq,
            hash: hex(hash),
            time_ms,
            public_key: self.public_key(),
            signature: base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        }
    }
}

impl Checkpoint {
    /// The chain value, if the checkpoint's signature by its own public key holds.
    pub fn verified_hash(&self) -> Option<Hash> {
        let engine = base64::engine::general_purpose::STANDARD;
        let hash = parse_hex(&self.hash)?;
        let key = engine.decode(&self.public_key).ok()?;
        let signature = engine.decode(&self.signature).ok()?;
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&message(self.seq, &hash, self.time_ms), &signature)
            .ok()?;
        Some(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_until_any_field_changes() {
        let signer = Signer::from_pkcs8(&Signer::generate().expect("key")).expect("key");
        let checkpoint = signer.sign(41, &[7; 32], 1_000);
        assert_eq!(checkpoint.verified_hash(), Some([7; 32]));
        let mut later = checkpoint.clone();
        later.seq = 42;
        assert_eq!(later.verified_hash(), None);
        let mut other_hash = checkpoint.clone();
        other_hash.hash = hex(&[8; 32]);
        assert_eq!(other_hash.verified_hash(), None);
        let other = Signer::from_pkcs8(&Signer::generate().expect("key")).expect("key");
        let mut other_key = checkpoint;
        other_key.public_key = other.public_key();
        assert_eq!(other_key.verified_hash(), None);
    }
}
