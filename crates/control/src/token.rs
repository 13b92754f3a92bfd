//! The node's bearer tokens: generated at first start and kept in the data directory, private
//! to maru's user (mode 0600), written atomically and made durable in their directory.

use std::io;
use std::path::Path;

use anyhow::{Context as _, bail};
use disk::Env;

pub const TOKEN_FILE: &str = "token";
/// The token event producers (HTTP and MQTT) present; it grants nothing else.
pub const INGEST_TOKEN_FILE: &str = "ingest.token";

/// Read the token kept in `data_dir/file`, creating it if there is none. Returns the token
/// and whether it was created by this call.
pub fn load_or_create(env: &Env, data_dir: &Path, file: &str) -> anyhow::Result<(String, bool)> {
    let path = data_dir.join(file);
    match env.disk.read(&path) {
        Ok(bytes) => {
            let mode = env
                .disk
                .mode(&path)
                .with_context(|| format!("read the permissions of {}", path.display()))?;
            if mode & 0o077 != 0 {
                bail!(
                    "{} is readable by other users (mode {mode:o}); run `chmod 600 {}` and start again",
                    path.display(),
                    path.display()
                );
            }
            let token = String::from_utf8(bytes)
                .unwrap_or_default()
                .trim()
                .to_string();
            if token.len() < 32 {
                bail!(
                    "{} holds no valid token; delete it to have a new one generated at the next start",
                    path.display()
                );
            }
            Ok((token, false))
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| anyhow::anyhow!("read the OS random generator: {e}"))?;
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            // Durable, name included, before anybody is told the token.
            disk::write_atomically(env.disk.as_ref(), &path, format!("{token}\n").as_bytes())
                .context("write the token")?;
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
    use std::fs;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn created_once_private_and_stable() {
        let dir = tempfile::tempdir().expect("temp dir");
        let env = Env::os();
        let (first, created) = load_or_create(&env, dir.path(), TOKEN_FILE).expect("create");
        assert!(created);
        assert_eq!(
            fs::metadata(dir.path().join(TOKEN_FILE))
                .expect("meta")
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let (second, created) = load_or_create(&env, dir.path(), TOKEN_FILE).expect("load");
        assert!(!created);
        assert_eq!(first, second);
        assert!(matches(&first, &second));
        assert!(!matches(&first, &second[1..]));
        fs::set_permissions(
            dir.path().join(TOKEN_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        assert!(load_or_create(&env, dir.path(), TOKEN_FILE).is_err());
    }
}
