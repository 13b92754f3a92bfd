//! The control API's bearer token: generated at first start, kept in the data directory
//! with mode 0600.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use anyhow::{Context as _, bail};

pub const TOKEN_FILE: &str = "token";
/// The token event producers (HTTP and MQTT) present; it grants nothing else.
pub const INGEST_TOKEN_FILE: &str = "ingest.token";

/// Read the node's token, creating it if there is none. Returns the token and whether it was
/// created by this call.
pub fn load_or_create(data_dir: &Path) -> anyhow::Result<(String, bool)> {
    load_or_create_file(data_dir, TOKEN_FILE)
}

/// Read or create the token kept in `data_dir/file`.
pub fn load_or_create_file(data_dir: &Path, file: &str) -> anyhow::Result<(String, bool)> {
    let path = data_dir.join(file);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let mode = fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0o600);
            if mode & 0o077 != 0 {
                bail!(
                    "{} is readable by other users (mode {mode:o}); run `chmod 600 {}` and start again",
                    path.display(),
                    path.display()
                );
            }
            let token = text.trim().to_string();
            if token.len() < 32 {
                bail!(
                    "{} holds no valid token; delete it to have a new one generated at the next start",
                    path.display()
                );
            }
            Ok((token, false))
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| anyhow::anyhow!("read the OS random generator: {e}"))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("create {}", path.display()))?;
            file.write_all(format!("{token}\n").as_bytes())
                .context("write token")?;
            file.sync_all().context("fsync token")?;
            fs::File::open(data_dir)
                .and_then(|d| d.sync_all())
                .context("fsync data directory")?;
            Ok((token, true))
        }
        Err(error) => Err(error).with_context(|| format!("read {}", path.display())),
    }
}

/// Compare in time independent of where the first difference is.
pub fn matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (first, created) = load_or_create(dir.path()).expect("create");
        assert!(created);
        assert_eq!(
            fs::metadata(dir.path().join(TOKEN_FILE))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let (second, created) = load_or_create(dir.path()).expect("load");
        assert!(!created);
        assert_eq!(first, second);
        assert!(matches(&first, &second));
        assert!(!matches(&first, &second[1..]));
        fs::set_permissions(
            dir.path().join(TOKEN_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(load_or_create(dir.path()).is_err());
    }
}
