//! The node's own files in its data directory, opened at start: the state database, the
//! tokens, the component cache and the saved metrics histories. Everything goes through
//! [`disk::Env`], so a node's first start and every later one run on the simulated disk in
//! the power-cut simulation (`tests/it/powercut.rs`) exactly as on the machine's files.
//!
//! Layout under `DATA`:
//! - `state.redb`: apps and revisions ([`State`]);
//! - `token`, `ingest.token`: the control API's and the producers' bearer tokens;
//! - `components/`, `compiled/`: the artifact cache ([`ArtifactCache`]);
//! - `history/APP.SERVICE.txt`: each service's metrics history, replaced atomically;
//! - `processes/`: live process groups (`runtime::process`), `events/`: topics (`events`).
//!
//! Invariant: what [`NodeFiles::open`] returns was made durable, names included; a token it
//! returned is the token every later start returns.

use std::io;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use autopilot::history::History;
use disk::Env;
use runtime::ArtifactCache;

use crate::state::State;
use crate::token;

/// (app, service)
pub type ServiceKey = (String, String);

/// A token and whether this start created it (so it is shown to the operator once).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub value: String,
    pub created: bool,
}

pub struct NodeFiles {
    env: Env,
    data: PathBuf,
    pub state: State,
    pub cache: ArtifactCache,
    pub token: Token,
    pub ingest_token: Token,
}

impl NodeFiles {
    /// Open (creating on first start) the node's files under `data`. The state database is
    /// opened first: it admits one process, so two nodes on one data directory cannot both
    /// create tokens.
    pub fn open(env: Env, data: &Path) -> anyhow::Result<NodeFiles> {
        for dir in ["history", "processes"] {
            let path = data.join(dir);
            disk::create_dir_all(env.disk.as_ref(), &path)
                .with_context(|| format!("create {}", path.display()))?;
        }
        // A killed process may have renamed files into place without syncing their
        // directory; what this start reads must survive a power cut, so it is made durable
        // before it is read.
        for dir in [data.to_path_buf(), data.join("history")] {
            env.disk
                .sync_dir(&dir)
                .with_context(|| format!("sync directory {}", dir.display()))?;
        }
        disk::remove_temporaries(env.disk.as_ref(), data)
            .with_context(|| format!("clean up {}", data.display()))?;
        disk::remove_temporaries(env.disk.as_ref(), &data.join("history"))
            .with_context(|| format!("clean up {}", data.join("history").display()))?;
        let state =
            State::open(&env, &data.join("state.redb")).context("open the state database")?;
        let [token, ingest_token] = [token::TOKEN_FILE, token::INGEST_TOKEN_FILE].map(|file| {
            token::load_or_create(&env, data, file).map(|(value, created)| Token { value, created })
        });
        let cache =
            ArtifactCache::open(env.disk.clone(), data).context("open the component cache")?;
        Ok(NodeFiles {
            state,
            cache,
            token: token?,
            ingest_token: ingest_token?,
            data: data.to_path_buf(),
            env,
        })
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    pub fn env(&self) -> &Env {
        &self.env
    }

    fn history_path(&self, key: &ServiceKey) -> PathBuf {
        // App and service names are [a-z0-9-], so `.` cannot be part of either.
        self.data
            .join("history")
            .join(format!("{}.{}.txt", key.0, key.1))
    }

    /// The saved history of a service, or an empty one. A damaged file is reported and set
    /// aside as `.damaged`, never fatal.
    pub fn load_history(&self, key: &ServiceKey) -> History {
        let path = self.history_path(key);
        let bytes = match self.env.disk.read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return History::default(),
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "cannot read the metrics history; starting a new one (the next save replaces the file)");
                return History::default();
            }
        };
        let decoded = String::from_utf8(bytes)
            .map_err(|_| "not UTF-8 text".to_string())
            .and_then(|text| History::decode(&text));
        match decoded {
            Ok(history) => history,
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "metrics history does not decode; starting a new one (the old file is kept as .damaged)");
                let disk = self.env.disk.as_ref();
                let kept = disk
                    .rename(&path, &path.with_extension("damaged"))
                    .and_then(|()| disk.sync_dir(&self.data.join("history")));
                if let Err(error) = kept {
                    tracing::warn!(path = %path.display(), %error, "could not set the damaged history aside");
                }
                History::default()
            }
        }
    }

    /// Replace a service's saved history.
    pub fn save_history(&self, key: &ServiceKey, text: &str) -> Result<(), disk::Error> {
        disk::write_atomically(
            self.env.disk.as_ref(),
            &self.history_path(key),
            text.as_bytes(),
        )
    }

    /// Forget a removed service's history.
    pub fn remove_history(&self, key: &ServiceKey) {
        let path = self.history_path(key);
        let disk = self.env.disk.as_ref();
        match disk
            .remove_file(&path)
            .and_then(|()| disk.sync_dir(&self.data.join("history")))
        {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(path = %path.display(), %error, "could not remove the metrics history")
            }
        }
    }

    /// Write `DATA/name` atomically (say `node.json`).
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<(), disk::Error> {
        disk::write_atomically(self.env.disk.as_ref(), &self.data.join(name), bytes)
    }
}
