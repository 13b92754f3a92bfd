//! The node's master keys, which wrap every object's data key.
//!
//! Kept in `master.keys` in the store's directory (mode 0600, replaced atomically): one line
//! per generation, `GENERATION HEX`. The newest generation wraps new data keys; older ones
//! stay until no data key is wrapped by them (`rotate`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disk::Disk;

use crate::crypto::{KEY_BYTES, Key};

pub const FILE: &str = "master.keys";

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error(transparent)]
    Disk(#[from] disk::Error),
    #[error("{}: {what}; restore it from a backup (without it no stored object can be read)", path.display())]
    Damaged { path: PathBuf, what: String },
    #[error(transparent)]
    Crypto(#[from] crate::crypto::CryptoError),
}

/// Every master key generation the store knows.
#[derive(Debug, Clone)]
pub struct MasterKeys {
    keys: BTreeMap<u32, Key>,
    path: PathBuf,
}

impl MasterKeys {
    /// Read the keys in `dir`, creating the first generation if there is no file yet.
    pub fn open(disk: &dyn Disk, dir: &Path) -> Result<MasterKeys, KeysError> {
        let path = dir.join(FILE);
        match disk.read(&path) {
            Ok(bytes) => Self::parse(&bytes, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = MasterKeys {
                    keys: BTreeMap::from([(1, Key::generate()?)]),
                    path,
                };
                keys.save(disk)?;
                Ok(keys)
            }
            Err(e) => Err(disk::Error::new("read", &path, e).into()),
        }
    }

    fn parse(bytes: &[u8], path: PathBuf) -> Result<MasterKeys, KeysError> {
        let damaged = |what: String| KeysError::Damaged {
            path: path.clone(),
            what,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| damaged("not text".into()))?;
        let mut keys = BTreeMap::new();
        for (number, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let bad = || damaged(format!("line {} is not `GENERATION HEX-KEY`", number + 1));
            let (generation, hex) = line.trim().split_once(' ').ok_or_else(bad)?;
            let generation: u32 = generation.parse().map_err(|_| bad())?;
            if hex.len() != KEY_BYTES * 2 {
                return Err(bad());
            }
            let mut key = [0; KEY_BYTES];
            for (i, byte) in key.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[i * 2..i * 2 + 2], 16).map_err(|_| bad())?;
            }
            keys.insert(generation, Key::from_bytes(key));
        }
        if keys.is_empty() {
            return Err(damaged("it holds no key".into()));
        }
        Ok(MasterKeys { keys, path })
    }

    fn save(&self, disk: &dyn Disk) -> Result<(), KeysError> {
        let mut text = String::new();
        for (generation, key) in &self.keys {
            text.push_str(&generation.to_string());
            text.push(' ');
            for byte in key.bytes() {
                text.push_str(&format!("{byte:02x}"));
            }
            text.push('\n');
        }
        disk::write_atomically(disk, &self.path, text.as_bytes())?;
        Ok(())
    }

    /// The generation that wraps new data keys, and its key.
    pub fn current(&self) -> (u32, &Key) {
        let (generation, key) = self.keys.last_key_value().expect("never empty");
        (*generation, key)
    }

    pub fn get(&self, generation: u32) -> Option<&Key> {
        self.keys.get(&generation)
    }

    pub fn generations(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    /// Add a new generation (durably) and make it current.
    pub fn add_generation(&mut self, disk: &dyn Disk) -> Result<u32, KeysError> {
        let next = self.current().0 + 1;
        self.keys.insert(next, Key::generate()?);
        self.save(disk)?;
        Ok(next)
    }

    /// Forget the generations that wrap nothing any more (durably).
    pub fn retire(&mut self, disk: &dyn Disk, keep: &[u32]) -> Result<(), KeysError> {
        let current = self.current().0;
        self.keys
            .retain(|generation, _| *generation == current || keep.contains(generation));
        self.save(disk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::sim::SimDisk;

    #[test]
    fn keys_persist_rotate_and_retire() {
        let disk = SimDisk::new();
        let dir = Path::new("/");
        let mut keys = MasterKeys::open(&disk, dir).expect("creates");
        let first = keys.current().1.bytes().to_owned();
        assert_eq!(keys.add_generation(&disk).expect("adds"), 2);
        let reopened = MasterKeys::open(&disk, dir).expect("reads");
        assert_eq!(reopened.generations(), [1, 2]);
        assert_eq!(reopened.get(1).expect("kept").bytes(), &first);
        keys.retire(&disk, &[]).expect("retires");
        assert_eq!(
            MasterKeys::open(&disk, dir).expect("reads").generations(),
            [2]
        );
        disk::write_atomically(&disk, &dir.join(FILE), b"1 abc\n").expect("writes");
        assert!(matches!(
            MasterKeys::open(&disk, dir),
            Err(KeysError::Damaged { .. })
        ));
    }
}
