//! Content-addressed storage of uploaded components and their compiled artifacts.
//!
//! Components are stored as `components/<blake3>.wasm`; compiled code as
//! `compiled/<blake3>-<engine>.cwasm` with a `.sum` file beside it holding the blake3 of the
//! compiled bytes. Compilation happens once, at deploy; scaling only ever loads. Every read
//! is verified against its hash before use, so a torn or flipped file is recompiled rather
//! than executed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::Disk;

/// The blake3 hash of a component's bytes, as 64 lowercase hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ComponentHash(String);

impl ComponentHash {
    pub fn of(bytes: &[u8]) -> Self {
        ComponentHash(blake3::hash(bytes).to_hex().to_string())
    }

    /// Parse a hash given by a client; only 64 lowercase hex digits are accepted, so a hash
    /// can be used as a file name without any risk of path traversal.
    pub fn parse(text: &str) -> Result<Self, ArtifactError> {
        if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(ComponentHash(text.to_string()))
        } else {
            Err(ArtifactError::BadHash(text.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ComponentHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("`{0}` is not a component hash: expected 64 lowercase hex digits (blake3)")]
    BadHash(String),
    #[error("the uploaded bytes hash to {actual}, not {expected}: the upload was corrupted")]
    HashMismatch { expected: String, actual: String },
    #[error("component {0} has not been uploaded")]
    Missing(ComponentHash),
    #[error("component {hash} does not compile: {reason}")]
    Compile { hash: ComponentHash, reason: String },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl From<disk::Error> for ArtifactError {
    fn from(e: disk::Error) -> Self {
        ArtifactError::Io {
            action: e.action,
            path: e.path,
            source: e.source,
        }
    }
}

/// The on-disk cache of components and compiled artifacts under a node's data directory.
#[derive(Clone)]
pub struct ArtifactCache {
    disk: Arc<dyn Disk>,
    components: PathBuf,
    compiled: PathBuf,
}

impl fmt::Debug for ArtifactCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArtifactCache")
            .field("components", &self.components)
            .finish_non_exhaustive()
    }
}

impl ArtifactCache {
    /// The cache under `data_dir` on `disk`, its directories created (durably) if missing.
    pub fn open(disk: Arc<dyn Disk>, data_dir: &Path) -> Result<Self, ArtifactError> {
        let cache = ArtifactCache {
            disk,
            components: data_dir.join("components"),
            compiled: data_dir.join("compiled"),
        };
        for dir in [&cache.components, &cache.compiled] {
            disk::create_dir_all(cache.disk.as_ref(), dir)?;
            // What an interrupted write left.
            disk::remove_temporaries(cache.disk.as_ref(), dir)?;
            // A killed process may have renamed a file into place without syncing the
            // directory: what this start sees must survive a power cut.
            cache.sync(dir)?;
        }
        Ok(cache)
    }

    fn sync(&self, dir: &Path) -> Result<(), ArtifactError> {
        self.disk.sync_dir(dir).map_err(|source| ArtifactError::Io {
            action: "sync directory",
            path: dir.to_path_buf(),
            source,
        })
    }

    pub fn component_path(&self, hash: &ComponentHash) -> PathBuf {
        self.components.join(format!("{hash}.wasm"))
    }

    pub fn has_component(&self, hash: &ComponentHash) -> bool {
        self.read_component(hash).is_ok()
    }

    /// Store an uploaded component after checking its bytes against the hash it was sent
    /// under. Idempotent.
    pub fn put_component(
        &self,
        expected: &ComponentHash,
        bytes: &[u8],
    ) -> Result<(), ArtifactError> {
        let actual = ComponentHash::of(bytes);
        if &actual != expected {
            return Err(ArtifactError::HashMismatch {
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        if self.has_component(expected) {
            // It may be there only in the page cache (an earlier write stopped before its
            // directory sync); a revision is about to name it.
            return self.sync(&self.components);
        }
        Ok(disk::write_atomically(
            self.disk.as_ref(),
            &self.component_path(expected),
            bytes,
        )?)
    }

    /// Read a stored component, verifying that its bytes still match its name.
    pub fn read_component(&self, hash: &ComponentHash) -> Result<Vec<u8>, ArtifactError> {
        let path = self.component_path(hash);
        let bytes = match self.disk.read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ArtifactError::Missing(hash.clone()));
            }
            Err(source) => {
                return Err(ArtifactError::Io {
                    action: "read component",
                    path,
                    source,
                });
            }
        };
        let actual = ComponentHash::of(&bytes);
        if &actual != hash {
            return Err(ArtifactError::HashMismatch {
                expected: hash.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok(bytes)
    }

    pub(crate) fn compiled_path(&self, hash: &ComponentHash, engine_key: &str) -> PathBuf {
        self.compiled.join(format!("{hash}-{engine_key}.cwasm"))
    }

    /// Read compiled bytes if present and intact; `None` means "compile again".
    pub(crate) fn read_compiled(&self, hash: &ComponentHash, engine_key: &str) -> Option<Vec<u8>> {
        let path = self.compiled_path(hash, engine_key);
        let bytes = self.disk.read(&path).ok()?;
        let sum = self.disk.read(&path.with_extension("sum")).ok()?;
        (blake3::hash(&bytes).to_hex().as_bytes() == sum.trim_ascii()).then_some(bytes)
    }

    /// Store compiled bytes for `hash` under an engine's key (done by
    /// `Runtime::compile`; public for tests that exercise the cache without an engine).
    pub fn write_compiled(
        &self,
        hash: &ComponentHash,
        engine_key: &str,
        bytes: &[u8],
    ) -> Result<(), ArtifactError> {
        let path = self.compiled_path(hash, engine_key);
        disk::write_atomically(self.disk.as_ref(), &path, bytes)?;
        // The sum is written last: a crash in between leaves no sum, which reads as absent.
        Ok(disk::write_atomically(
            self.disk.as_ref(),
            &path.with_extension("sum"),
            blake3::hash(bytes).to_hex().as_bytes(),
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;

    fn open(dir: &Path) -> ArtifactCache {
        ArtifactCache::open(Arc::new(disk::OsDisk), dir).expect("open cache")
    }

    #[test]
    fn hash_parse_rejects_paths_and_case() {
        let good = ComponentHash::of(b"x");
        assert_eq!(ComponentHash::parse(good.as_str()).ok(), Some(good.clone()));
        for bad in [
            "../../etc/passwd",
            "",
            &good.as_str().to_uppercase(),
            &good.as_str()[..63],
        ] {
            assert!(ComponentHash::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn put_checks_hash_and_read_detects_flipped_bits() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = open(dir.path());
        let bytes = b"\0asm component bytes".to_vec();
        let hash = ComponentHash::of(&bytes);
        assert!(matches!(
            cache.put_component(&ComponentHash::of(b"other"), &bytes),
            Err(ArtifactError::HashMismatch { .. })
        ));
        cache.put_component(&hash, &bytes).expect("put");
        assert_eq!(cache.read_component(&hash).expect("read"), bytes);
        let mut flipped = bytes.clone();
        flipped[3] ^= 0x10;
        fs::write(cache.component_path(&hash), &flipped).expect("corrupt");
        assert!(matches!(
            cache.read_component(&hash),
            Err(ArtifactError::HashMismatch { .. })
        ));
    }

    #[test]
    fn compiled_without_matching_sum_reads_as_absent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = open(dir.path());
        let hash = ComponentHash::of(b"c");
        cache
            .write_compiled(&hash, "e1", b"compiled")
            .expect("write");
        assert_eq!(
            cache.read_compiled(&hash, "e1").as_deref(),
            Some(&b"compiled"[..])
        );
        assert_eq!(cache.read_compiled(&hash, "e2"), None);
        fs::write(cache.compiled_path(&hash, "e1"), b"compiles").expect("corrupt");
        assert_eq!(cache.read_compiled(&hash, "e1"), None);
    }
}
