//! Desired state on disk: apps, their immutable revisions and which revision serves.
//!
//! Invariant: every change is one redb write transaction, so a crash leaves the state as it
//! was before the change or as it is after it, never between. Revisions are never modified
//! after they are written.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use disk::{Clock, Env};
use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const REVISIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("revisions");

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The serving revision.
    pub current: u64,
    /// Revisions in the order they served; the last is `current`. Rollback pops it.
    pub history: Vec<u64>,
    pub next_revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionRecord {
    pub number: u64,
    pub manifest_path: String,
    /// Absolute directory the manifest was deployed from, for relative process paths.
    #[serde(default)]
    pub manifest_dir: Option<String>,
    pub manifest: String,
    /// Component path as written in the manifest → blake3 hash.
    pub components: BTreeMap<String, String>,
    pub created_unix_ms: u64,
}

impl AppRecord {
    /// The record after a new revision is deployed (to `previous`, or as a new app), and
    /// the new revision's number.
    pub fn deployed(previous: Option<&AppRecord>) -> (AppRecord, u64) {
        let mut record = previous.cloned().unwrap_or(AppRecord {
            current: 0,
            history: Vec::new(),
            next_revision: 1,
        });
        let number = record.next_revision;
        record.next_revision += 1;
        record.current = number;
        record.history.push(number);
        (record, number)
    }

    /// The record after a rollback to the revision that served before the current one, and
    /// `(from, to)`.
    pub fn rolled_back(&self, app: &str) -> Result<(AppRecord, (u64, u64)), StateError> {
        if self.history.len() < 2 {
            return Err(StateError::NothingToRollBack(app.to_string()));
        }
        let mut record = self.clone();
        let from = record
            .history
            .pop()
            .expect("history has at least two entries");
        let to = *record
            .history
            .last()
            .expect("history has at least one entry left");
        record.current = to;
        Ok((record, (from, to)))
    }
}

/// An app as a cluster shares it (in JetStream, docs/cluster.md): its record and the
/// revisions its history names, at most [`SharedApp::REVISIONS_KEPT`] of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedApp {
    pub record: AppRecord,
    pub revisions: Vec<RevisionRecord>,
}

impl SharedApp {
    /// Revisions a shared app keeps (the oldest in its history are dropped beyond it), so
    /// one app's record stays well under a JetStream message's size limit.
    pub const REVISIONS_KEPT: usize = 20;

    /// `record` with the revisions it names, taken from `known`; the history beyond
    /// [`Self::REVISIONS_KEPT`] is dropped.
    pub fn new(mut record: AppRecord, known: &[RevisionRecord]) -> Result<SharedApp, String> {
        let excess = record.history.len().saturating_sub(Self::REVISIONS_KEPT);
        record.history.drain(..excess);
        let revisions = record
            .history
            .iter()
            .map(|number| {
                known
                    .iter()
                    .find(|r| r.number == *number)
                    .cloned()
                    .ok_or_else(|| format!("revision {number} is in the history but not known"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = SharedApp { record, revisions };
        shared.check()?;
        Ok(shared)
    }

    /// The invariants: the current revision is the last of the history, every revision of
    /// the history is present once, and none is numbered at or past `next_revision`.
    pub fn check(&self) -> Result<(), String> {
        let record = &self.record;
        if record.history.last() != Some(&record.current) {
            return Err(format!(
                "current revision {} is not the last of the history {:?}",
                record.current, record.history
            ));
        }
        if record.history.len() > Self::REVISIONS_KEPT {
            return Err(format!("history of {} revisions", record.history.len()));
        }
        let mut numbers: Vec<u64> = self.revisions.iter().map(|r| r.number).collect();
        numbers.sort_unstable();
        let mut expected = record.history.clone();
        expected.sort_unstable();
        expected.dedup();
        if numbers != expected {
            return Err(format!(
                "revisions {numbers:?} are not those of the history {:?}",
                record.history
            ));
        }
        if numbers.last().is_some_and(|n| *n >= record.next_revision) {
            return Err(format!(
                "a revision is numbered at or past next_revision {}",
                record.next_revision
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("no app named `{0}` is deployed")]
    NotFound(String),
    #[error("app `{0}` has no earlier revision to roll back to")]
    NothingToRollBack(String),
    #[error("state database: {0}")]
    Storage(String),
    #[error(
        "state database: the disk failed ({0}); changes are refused until maru is restarted: check the disk, then restart the machine, not only maru (docs/node.md)"
    )]
    Disk(String),
    #[error(transparent)]
    Open(#[from] disk::database::OpenError),
    #[error(
        "state database holds a record that does not decode ({0}); it was written by an incompatible version or damaged"
    )]
    Corrupt(String),
}

fn storage(error: impl Into<redb::Error>) -> StateError {
    match error.into() {
        error @ (redb::Error::Io(_) | redb::Error::PreviousIo) => {
            tracing::error!(%error, "the state database could not write to the disk; check the disk, then restart the machine, not only maru (docs/node.md)");
            StateError::Disk(error.to_string())
        }
        error => StateError::Storage(error.to_string()),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records are plain data and always serialise")
}

fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, StateError> {
    serde_json::from_slice(bytes).map_err(|error| StateError::Corrupt(error.to_string()))
}

pub struct State {
    db: Database,
    clock: Arc<dyn Clock>,
}

impl State {
    /// Open the state database at `path` on `env`'s disk, creating it if there is none. Only
    /// one process may have it open: a second is refused with [`StateError::Open`].
    pub fn open(env: &Env, path: &Path) -> Result<Self, StateError> {
        let db = disk::database::open(env.disk.as_ref(), path)?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(APPS).map_err(storage)?;
        txn.open_table(REVISIONS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(State {
            db,
            clock: env.clock.clone(),
        })
    }

    pub fn apps(&self) -> Result<Vec<(String, AppRecord)>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(APPS).map_err(storage)?;
        let mut apps = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (name, record) = entry.map_err(storage)?;
            apps.push((name.value().to_string(), decode(record.value())?));
        }
        Ok(apps)
    }

    pub fn app(&self, name: &str) -> Result<AppRecord, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(APPS).map_err(storage)?;
        let record = table
            .get(name)
            .map_err(storage)?
            .ok_or_else(|| StateError::NotFound(name.to_string()))?;
        decode(record.value())
    }

    pub fn revision(&self, app: &str, number: u64) -> Result<RevisionRecord, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(REVISIONS).map_err(storage)?;
        let record = table.get((app, number)).map_err(storage)?.ok_or_else(|| {
            StateError::Corrupt(format!(
                "revision {number} of app `{app}` is referenced but missing"
            ))
        })?;
        decode(record.value())
    }

    pub fn revisions(&self, app: &str) -> Result<Vec<RevisionRecord>, StateError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(REVISIONS).map_err(storage)?;
        let mut revisions = Vec::new();
        for entry in table.range((app, 0)..=(app, u64::MAX)).map_err(storage)? {
            let (_, record) = entry.map_err(storage)?;
            revisions.push(decode(record.value())?);
        }
        Ok(revisions)
    }

    /// Write a new revision and make it serve, atomically. Returns its number.
    pub fn deploy(
        &self,
        app: &str,
        manifest_path: &str,
        manifest_dir: Option<&str>,
        manifest: &str,
        components: BTreeMap<String, String>,
    ) -> Result<u64, StateError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let number = {
            let mut apps = txn.open_table(APPS).map_err(storage)?;
            let previous = match apps.get(app).map_err(storage)? {
                Some(existing) => Some(decode::<AppRecord>(existing.value())?),
                None => None,
            };
            let (record, number) = AppRecord::deployed(previous.as_ref());
            apps.insert(app, encode(&record).as_slice())
                .map_err(storage)?;
            let revision = RevisionRecord {
                number,
                manifest_path: manifest_path.to_string(),
                manifest_dir: manifest_dir.map(str::to_string),
                manifest: manifest.to_string(),
                components,
                created_unix_ms: self.clock.now_ms(),
            };
            let mut revisions = txn.open_table(REVISIONS).map_err(storage)?;
            revisions
                .insert((app, number), encode(&revision).as_slice())
                .map_err(storage)?;
            number
        };
        txn.commit().map_err(storage)?;
        Ok(number)
    }

    /// Make the revision that served before the current one serve again. Returns
    /// `(from, to)`.
    pub fn rollback(&self, app: &str) -> Result<(u64, u64), StateError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let moved = {
            let mut apps = txn.open_table(APPS).map_err(storage)?;
            let record: AppRecord = match apps.get(app).map_err(storage)? {
                Some(existing) => decode(existing.value())?,
                None => return Err(StateError::NotFound(app.to_string())),
            };
            let (record, moved) = record.rolled_back(app)?;
            apps.insert(app, encode(&record).as_slice())
                .map_err(storage)?;
            moved
        };
        txn.commit().map_err(storage)?;
        Ok(moved)
    }

    /// Make the app exactly as the cluster shares it: its record, and the shared revisions
    /// written (revisions are immutable: one already here is kept as it is). Revisions here
    /// that the cluster no longer keeps stay, unreferenced.
    pub fn replace(&self, app: &str, shared: &SharedApp) -> Result<(), StateError> {
        shared
            .check()
            .map_err(|why| StateError::Corrupt(format!("shared app `{app}`: {why}")))?;
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut apps = txn.open_table(APPS).map_err(storage)?;
            let mut revisions = txn.open_table(REVISIONS).map_err(storage)?;
            for revision in &shared.revisions {
                if revisions
                    .get((app, revision.number))
                    .map_err(storage)?
                    .is_none()
                {
                    revisions
                        .insert((app, revision.number), encode(revision).as_slice())
                        .map_err(storage)?;
                }
            }
            apps.insert(app, encode(&shared.record).as_slice())
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(())
    }

    /// Delete an app and all its revisions.
    pub fn remove(&self, app: &str) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut apps = txn.open_table(APPS).map_err(storage)?;
            if apps.remove(app).map_err(storage)?.is_none() {
                return Err(StateError::NotFound(app.to_string()));
            }
            let mut revisions = txn.open_table(REVISIONS).map_err(storage)?;
            revisions
                .retain_in((app, 0)..=(app, u64::MAX), |_, _| false)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(number: u64) -> RevisionRecord {
        RevisionRecord {
            number,
            manifest_path: "m.toml".into(),
            manifest_dir: None,
            manifest: format!("v{number}"),
            components: BTreeMap::new(),
            created_unix_ms: 0,
        }
    }

    #[test]
    fn a_shared_app_keeps_its_last_revisions_and_replaces_the_local_record() {
        let mut record = None;
        let mut known = Vec::new();
        for _ in 0..25 {
            let (next, number) = AppRecord::deployed(record.as_ref());
            known.push(revision(number));
            record = Some(next);
        }
        let shared = SharedApp::new(record.expect("deployed"), &known).expect("valid");
        assert_eq!(shared.revisions.len(), SharedApp::REVISIONS_KEPT);
        assert_eq!(shared.record.history.first(), Some(&6));
        assert_eq!(shared.record.current, 25);
        let (back, moved) = shared.record.rolled_back("a").expect("rollback");
        assert_eq!(moved, (25, 24));
        let rolled = SharedApp::new(back, &known).expect("valid");

        let dir = tempfile::tempdir().expect("temp dir");
        let state = State::open(&Env::os(), &dir.path().join("state.redb")).expect("open");
        state.replace("a", &rolled).expect("replace");
        assert_eq!(state.app("a").expect("a"), rolled.record);
        assert_eq!(state.revision("a", 24).expect("24").manifest, "v24");
        // A deploy on this node continues the shared numbering.
        assert_eq!(
            state
                .deploy("a", "m.toml", None, "v26", BTreeMap::new())
                .expect("deploy"),
            26
        );
        let mut broken = rolled.clone();
        broken.revisions.pop();
        assert!(state.replace("a", &broken).is_err(), "a revision missing");
    }

    #[test]
    fn deploy_rollback_remove_survive_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state.redb");
        {
            let state = State::open(&Env::os(), &path).expect("open");
            assert_eq!(
                state
                    .deploy("a", "m.toml", None, "v1", BTreeMap::new())
                    .expect("deploy"),
                1
            );
            assert_eq!(
                state
                    .deploy("a", "m.toml", None, "v2", BTreeMap::new())
                    .expect("deploy"),
                2
            );
            assert_eq!(
                state
                    .deploy("b", "m.toml", None, "b1", BTreeMap::new())
                    .expect("deploy"),
                1
            );
            assert!(matches!(
                state.rollback("b"),
                Err(StateError::NothingToRollBack(_))
            ));
        }
        let state = State::open(&Env::os(), &path).expect("reopen");
        assert_eq!(state.app("a").expect("a").current, 2);
        assert_eq!(state.rollback("a").expect("rollback"), (2, 1));
        assert_eq!(state.revision("a", 1).expect("rev").manifest, "v1");
        assert_eq!(
            state
                .deploy("a", "m.toml", None, "v3", BTreeMap::new())
                .expect("deploy"),
            3
        );
        assert_eq!(state.app("a").expect("a").history, [1, 3]);
        state.remove("a").expect("remove");
        assert!(matches!(state.app("a"), Err(StateError::NotFound(_))));
        assert!(state.revisions("a").expect("list").is_empty());
        assert_eq!(state.revisions("b").expect("list").len(), 1);
    }
}
