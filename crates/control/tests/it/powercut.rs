//! The node's own files under power cuts: `NodeFiles` (the state database, the tokens, the
//! component cache, the metrics histories) on a simulated disk, from an empty disk, over
//! many seeded schedules, checked against a model of what was acknowledged.
//!
//! A schedule runs up to six lifetimes of a node. Each one opens the node's files (the
//! first open is a node's first start: the data directory and everything in it are created
//! under the same rule), then deploys, rolls back and removes apps (a component stored,
//! then a revision committed, as `Node::deploy` does), applies apps as a cluster shares
//! them (a revision deployed on another node: its component fetched, then the app's record
//! replaced, as `Node::apply_shared` does) and saves metrics histories. Faults
//! come at random: the power goes after a random number of disk operations (during the
//! open too, so recovery itself is interrupted), a sync fails, the process is killed (the
//! page cache survives), and between lifetimes a bit flips in a stored component or
//! history. A lifetime in which a sync failed ends with the machine restarted (a power cut
//! here), as the rule in docs/node.md asks: Linux marks the pages a failed sync lost as
//! clean, so only a fresh page cache reads what is really on the disk. After every open
//! these must hold:
//! - a token, once returned, is the token every later start returns;
//! - the apps and revisions are exactly those acknowledged, plus at most the one change
//!   the lifetime's fault interrupted;
//! - every component a committed revision names reads back whole (or, if a bit of it was
//!   flipped, is refused: never served changed);
//! - each history holds the last acknowledged save (or the interrupted one); a flipped
//!   history is set aside, never decoded into wrong numbers;
//! - no temporary file is left behind.
//!
//! `MARU_NODE_POWERCUT_SCHEDULES=N` runs N schedules (5,000 by default);
//! `MARU_NODE_POWERCUT_SEED=S` replays schedule S alone.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use control::files::NodeFiles;
use control::state::StateError;
use disk::Env;
use disk::sim::{Rng, SimClock, SimDisk};
use runtime::{ArtifactError, ComponentHash};

const DATA: &str = "/var/lib/maru";
const APPS: [&str; 3] = ["permits", "traffic", "relief"];
const SERVICES: [&str; 2] = ["web", "worker"];

#[derive(Debug, Clone, PartialEq, Eq)]
struct App {
    current: u64,
    history: Vec<u64>,
    next_revision: u64,
    /// Revision → (manifest text, component hash).
    revisions: BTreeMap<u64, (String, String)>,
}

/// What the node acknowledged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Model {
    token: Option<String>,
    ingest_token: Option<String>,
    apps: BTreeMap<String, App>,
    histories: BTreeMap<(String, String), Vec<u8>>,
}

enum Step {
    Deploy {
        app: String,
        manifest: String,
        component: Vec<u8>,
    },
    Rollback(String),
    Remove(String),
    /// A revision deployed on another node of a cluster, applied here.
    ApplyShared {
        app: String,
        manifest: String,
        component: Vec<u8>,
    },
    SaveHistory {
        key: (String, String),
        text: String,
    },
}

impl Step {
    fn name(&self) -> String {
        match self {
            Step::Deploy { app, .. } => format!("deploy {app}"),
            Step::Rollback(app) => format!("rollback {app}"),
            Step::Remove(app) => format!("remove {app}"),
            Step::ApplyShared { app, .. } => format!("apply shared {app}"),
            Step::SaveHistory { key, .. } => format!("save history {}.{}", key.0, key.1),
        }
    }
}

impl Model {
    /// The model after `step` succeeds, as the state's own rules give it.
    fn after(&self, step: &Step) -> Model {
        let mut next = self.clone();
        match step {
            Step::Deploy {
                app,
                manifest,
                component,
            }
            | Step::ApplyShared {
                app,
                manifest,
                component,
            } => {
                let record = next.apps.entry(app.clone()).or_insert(App {
                    current: 0,
                    history: Vec::new(),
                    next_revision: 1,
                    revisions: BTreeMap::new(),
                });
                let number = record.next_revision;
                record.next_revision += 1;
                record.current = number;
                record.history.push(number);
                record.revisions.insert(
                    number,
                    (manifest.clone(), ComponentHash::of(component).to_string()),
                );
                if matches!(step, Step::ApplyShared { .. }) {
                    // A shared app names its last revisions only; older ones stay stored.
                    let excess = record
                        .history
                        .len()
                        .saturating_sub(control::state::SharedApp::REVISIONS_KEPT);
                    record.history.drain(..excess);
                }
            }
            Step::Rollback(app) => {
                if let Some(record) = next.apps.get_mut(app)
                    && record.history.len() >= 2
                {
                    record.history.pop();
                    record.current = *record.history.last().expect("two entries");
                }
            }
            Step::Remove(app) => {
                next.apps.remove(app);
            }
            Step::SaveHistory { key, text } => {
                next.histories.insert(key.clone(), text.as_bytes().to_vec());
            }
        }
        next
    }
}

/// Store a component in the cache, as a deploy does first; its revision's component map.
fn store_component(
    files: &NodeFiles,
    component: &[u8],
) -> Result<BTreeMap<String, String>, String> {
    let hash = ComponentHash::of(component);
    files
        .cache
        .put_component(&hash, component)
        .map_err(|e| e.to_string())?;
    Ok(BTreeMap::from([("app.wasm".to_string(), hash.to_string())]))
}

fn step(files: &NodeFiles, step: &Step) -> Result<(), String> {
    match step {
        Step::Deploy {
            app,
            manifest,
            component,
        } => {
            let components = store_component(files, component)?;
            files
                .state
                .deploy(app, "maru.toml", None, manifest, components)
                .map(drop)
                .map_err(|e| e.to_string())
        }
        Step::Rollback(app) => match files.state.rollback(app) {
            Ok(_) | Err(StateError::NotFound(_) | StateError::NothingToRollBack(_)) => Ok(()),
            Err(error) => Err(error.to_string()),
        },
        Step::Remove(app) => match files.state.remove(app) {
            Ok(()) | Err(StateError::NotFound(_)) => Ok(()),
            Err(error) => Err(error.to_string()),
        },
        Step::ApplyShared {
            app,
            manifest,
            component,
        } => {
            let components = store_component(files, component)?;
            let previous = match files.state.app(app) {
                Ok(record) => Some(record),
                Err(StateError::NotFound(_)) => None,
                Err(error) => return Err(error.to_string()),
            };
            let mut known = files.state.revisions(app).map_err(|e| e.to_string())?;
            let (record, number) = control::state::AppRecord::deployed(previous.as_ref());
            known.push(control::state::RevisionRecord {
                number,
                manifest_path: "maru.toml".into(),
                manifest_dir: None,
                manifest: manifest.clone(),
                components,
                created_unix_ms: 0,
            });
            let shared = control::state::SharedApp::new(record, &known)?;
            files.state.replace(app, &shared).map_err(|e| e.to_string())
        }
        Step::SaveHistory { key, text } => files.save_history(key, text).map_err(|e| e.to_string()),
    }
}

/// The apps as the state database holds them.
fn stored_apps(files: &NodeFiles) -> Result<BTreeMap<String, App>, String> {
    let mut apps = BTreeMap::new();
    for (name, record) in files.state.apps().map_err(|e| e.to_string())? {
        let revisions = files
            .state
            .revisions(&name)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|r| {
                let hash = r.components.get("app.wasm").cloned().unwrap_or_default();
                (r.number, (r.manifest, hash))
            })
            .collect();
        apps.insert(
            name,
            App {
                current: record.current,
                history: record.history,
                next_revision: record.next_revision,
                revisions,
            },
        );
    }
    Ok(apps)
}

fn temporaries(disk: &SimDisk, dirs: &[PathBuf]) -> Vec<String> {
    let mut left = Vec::new();
    for dir in dirs {
        for name in disk::Disk::list(disk, dir).unwrap_or_default() {
            if name.starts_with(disk::TEMPORARY_PREFIX) {
                left.push(dir.join(name).display().to_string());
            }
        }
    }
    left
}

/// Check what a fresh open sees against the models that may be stored: the acknowledged
/// changes, each with or without the changes that failed (a failed change may have landed).
/// Returns what is stored, as the model from now on.
fn check(
    disk: &SimDisk,
    files: &NodeFiles,
    candidates: &[Model],
    flipped: &[PathBuf],
) -> Result<Model, String> {
    let data = Path::new(DATA);
    let model = &candidates[0];
    let mut seen = model.clone();
    for (name, expected, found) in [
        ("control token", &model.token, &files.token),
        ("ingest token", &model.ingest_token, &files.ingest_token),
    ] {
        if let Some(expected) = expected
            && *expected != found.value
        {
            return Err(format!("the {name} changed across a restart"));
        }
        if expected.is_some() && found.created {
            return Err(format!("the {name} was created again"));
        }
    }
    seen.token = Some(files.token.value.clone());
    seen.ingest_token = Some(files.ingest_token.value.clone());

    seen.apps = stored_apps(files)?;
    for (name, app) in &seen.apps {
        for (number, (_, hash)) in &app.revisions {
            let hash = ComponentHash::parse(hash).map_err(|e| e.to_string())?;
            match files.cache.read_component(&hash) {
                Ok(_) => {}
                Err(ArtifactError::HashMismatch { .. })
                    if flipped.contains(&files.cache.component_path(&hash)) => {}
                Err(error) => {
                    return Err(format!(
                        "revision {number} of {name} names a component that does not read back: {error}"
                    ));
                }
            }
        }
    }

    let history_dir = data.join("history");
    let mut unsure = BTreeSet::new();
    seen.histories.clear();
    for app in APPS {
        for service in SERVICES {
            let key = (app.to_string(), service.to_string());
            let path = history_dir.join(format!("{app}.{service}.txt"));
            let stored = disk::Disk::read(disk, &path).ok();
            let was_flipped = flipped.contains(&path);
            let damaged = path.with_extension("damaged");
            let before = disk::Disk::read(disk, &damaged).ok();
            let loaded = files.load_history(&key);
            let set_aside = disk::Disk::read(disk, &damaged).ok() != before;
            if was_flipped && stored.is_some() {
                if !set_aside || loaded.seconds().count() > 0 {
                    return Err(format!("a flipped history {app}.{service} decoded"));
                }
                // The operator looks at it and deletes it.
                disk::Disk::remove_file(disk, &damaged)
                    .and_then(|()| disk::Disk::sync_dir(disk, &history_dir))
                    .map_err(|e| e.to_string())?;
                unsure.insert(key);
                continue;
            }
            if set_aside {
                return Err(format!("an intact history {app}.{service} was set aside"));
            }
            if let Some(bytes) = stored {
                seen.histories.insert(key, bytes);
            }
        }
    }
    let matches = |candidate: &Model| {
        candidate.apps == seen.apps
            && (APPS.iter()).all(|app| {
                SERVICES.iter().all(|service| {
                    let key = (app.to_string(), service.to_string());
                    unsure.contains(&key)
                        || candidate.histories.get(&key) == seen.histories.get(&key)
                })
            })
    };
    if !candidates.iter().any(matches) {
        return Err(format!(
            "what is stored is not what was acknowledged, with or without the changes that failed:\nstored apps {:?}\nacknowledged apps {:?}\nstored histories {:?}\nacknowledged histories {:?}",
            seen.apps,
            model.apps,
            seen.histories.keys().collect::<Vec<_>>(),
            model.histories.keys().collect::<Vec<_>>(),
        ));
    }
    let left = temporaries(
        disk,
        &[
            data.to_path_buf(),
            history_dir,
            data.join("components"),
            data.join("compiled"),
        ],
    );
    if !left.is_empty() {
        return Err(format!("temporary files left after the open: {left:?}"));
    }
    Ok(seen)
}

fn random_step(rng: &mut Rng, sequence: &mut u64) -> Step {
    *sequence += 1;
    let app = APPS[rng.below(APPS.len() as u64) as usize].to_string();
    match rng.below(20) {
        0..=7 => Step::Deploy {
            manifest: format!("[app]\nname = \"{app}\"\n# deploy {sequence}\n"),
            // Components big enough to span sectors, so they can be torn; one in three
            // deploys brings a component an earlier deploy may have stored.
            component: if rng.percent(33) {
                format!("shared component {} ", rng.below(3)).repeat(50)
            } else {
                format!("component {app} {sequence} ").repeat(40 + rng.below(60) as usize)
            }
            .into_bytes(),
            app,
        },
        8..=10 => Step::Rollback(app),
        11..=12 => Step::Remove(app),
        13..=14 => Step::ApplyShared {
            manifest: format!("[app]\nname = \"{app}\"\n# shared {sequence}\n"),
            component: format!("shared-in component {app} {sequence} ")
                .repeat(30 + rng.below(60) as usize)
                .into_bytes(),
            app,
        },
        _ => {
            let service = SERVICES[rng.below(2) as usize].to_string();
            let mut history = autopilot::history::History::default();
            for second in 0..1 + rng.below(5) {
                history.record(autopilot::history::Sample {
                    unix_s: 1_700_000_000 + *sequence * 10 + second,
                    arrivals: rng.below(100) as f64,
                    ..Default::default()
                });
            }
            Step::SaveHistory {
                key: (app, service),
                text: history.encode(),
            }
        }
    }
}

/// Flip a bit in a stored component or history, if there is one.
fn flip_something(disk: &SimDisk, rng: &mut Rng) -> Option<PathBuf> {
    let data = Path::new(DATA);
    let mut files = Vec::new();
    for dir in [data.join("components"), data.join("history")] {
        for name in disk::Disk::list(disk, &dir).unwrap_or_default() {
            if name.ends_with(".wasm") || name.ends_with(".txt") {
                files.push(dir.join(name));
            }
        }
    }
    if files.is_empty() {
        return None;
    }
    let path = files[rng.below(files.len() as u64) as usize].clone();
    let len = disk::Disk::read(disk, &path).ok()?.len();
    (len > 0 && disk.flip_bit(&path, rng.below(len as u64) as usize, rng.below(8) as u8))
        .then_some(path)
}

#[derive(Debug, PartialEq, Eq)]
struct Summary {
    operations: u64,
    acknowledged: u64,
    power_cuts: u64,
}

fn run(seed: u64) -> Result<Summary, String> {
    run_on(seed, |disk| Arc::new(disk))
}

/// A schedule with the node's files on `wrap(disk)`; faults and checks use `disk` itself.
fn run_on(seed: u64, wrap: impl FnOnce(SimDisk) -> Arc<dyn disk::Disk>) -> Result<Summary, String> {
    let disk = SimDisk::new();
    let env = Env {
        disk: wrap(disk.clone()),
        clock: Arc::new(SimClock::new(1_700_000_000_000)),
    };
    let mut rng = Rng::new(seed);
    let data = Path::new(DATA);
    // The acknowledged model first, then the same with some of the failed changes landed.
    let mut candidates: Vec<Model> = vec![Model::default()];
    let mut flipped: Vec<PathBuf> = Vec::new();
    let mut sequence = 0;
    let (mut acknowledged, mut power_cuts) = (0, 0);
    let lifetimes = 1 + rng.below(6);
    let trace = std::env::var_os("MARU_NODE_POWERCUT_TRACE").is_some();
    let say = |line: String| {
        if trace {
            println!("{line}");
        }
    };
    for lifetime in 0..=lifetimes {
        let last = lifetime == lifetimes;
        if !last {
            if rng.percent(15) {
                flipped.extend(flip_something(&disk, &mut rng));
            }
            // The power may go while the node starts: recovery itself is interrupted.
            if rng.percent(30) {
                disk.crash_after(rng.below(120));
            }
        }
        let opened = disk::create_dir_all(env.disk.as_ref(), data)
            .map_err(|e| e.to_string())
            .and_then(|()| NodeFiles::open(env.clone(), data).map_err(|e| format!("{e:#}")));
        let files = match opened {
            Ok(files) => files,
            Err(error) if last || !disk.is_off() => {
                return Err(format!(
                    "lifetime {lifetime}: the node does not start: {error}"
                ));
            }
            Err(_) => {
                disk.power_cut(&mut rng);
                power_cuts += 1;
                continue;
            }
        };
        disk.disarm();
        let seen = check(&disk, &files, &candidates, &flipped)
            .map_err(|e| format!("lifetime {lifetime}: {e}"))?;
        candidates = vec![seen];
        // What `check` saw is now what is stored; flipped files were set aside or refused.
        flipped.retain(|path| disk::Disk::exists(&disk, path));
        if last {
            break;
        }
        if rng.percent(75) {
            disk.crash_after(rng.below(200));
        }
        let steps = 1 + rng.below(12);
        let failing_sync_at = rng.percent(10).then(|| rng.below(steps));
        for index in 0..steps {
            if failing_sync_at == Some(index) {
                let skip = rng.below(4) as u32;
                say(format!(
                    "lifetime {lifetime}: a sync fails after {skip} more"
                ));
                disk.fail_syncs_after(skip, 1);
            }
            if disk.is_off() {
                break;
            }
            let next = random_step(&mut rng, &mut sequence);
            let after: Vec<Model> = candidates.iter().map(|m| m.after(&next)).collect();
            match step(&files, &next) {
                Ok(()) => {
                    say(format!("lifetime {lifetime}: {} acknowledged", next.name()));
                    candidates = after;
                    acknowledged += 1;
                }
                Err(error) => {
                    // The change may or may not have landed. The node reports the error and
                    // goes on; what it acknowledges later must still hold.
                    say(format!(
                        "lifetime {lifetime}: {} failed: {error}",
                        next.name()
                    ));
                    for model in after {
                        if !candidates.contains(&model) {
                            candidates.push(model);
                        }
                    }
                }
            }
        }
        // The end of a lifetime: the power goes, the process is killed, or it stops.
        // After a failed sync the machine is restarted, not only maru (docs/node.md): the
        // page cache holds what never reached the disk and must not be read as the state.
        let end = if failing_sync_at.is_some() {
            0
        } else {
            rng.below(10)
        };
        say(format!(
            "lifetime {lifetime} ends: {} (disk off: {})",
            ["power cut", "kill", "stop"][usize::from(end > 5) + usize::from(end > 8)],
            disk.is_off()
        ));
        match end {
            0..=5 => {
                disk.power_off();
                drop(files);
                disk.power_cut(&mut rng);
                power_cuts += 1;
            }
            6..=8 => {
                disk.power_off();
                drop(files);
                disk.revive();
            }
            _ => {
                disk.disarm();
                drop(files);
                if disk.is_off() {
                    disk.power_cut(&mut rng);
                    power_cuts += 1;
                }
            }
        }
    }
    Ok(Summary {
        operations: disk.operations(),
        acknowledged,
        power_cuts,
    })
}

#[test]
fn the_nodes_files_survive_power_cuts_from_the_first_start() {
    let runs = disk::sim::run_schedules(
        "MARU_NODE_POWERCUT",
        5_000,
        "cargo test -p control --test it",
        run,
    );
    let acknowledged: u64 = runs.iter().map(|s| s.acknowledged).sum();
    let power_cuts: u64 = runs.iter().map(|s| s.power_cuts).sum();
    println!(
        "node power-cut simulation: {} schedules, {acknowledged} acknowledged changes, {power_cuts} power cuts, 0 violations",
        runs.len()
    );
}

#[test]
fn a_node_seed_replays_exactly() {
    for seed in [5, 17] {
        assert_eq!(run(seed), run(seed), "seed {seed}");
    }
}

/// The checks can fail: a node that never syncs its directories loses its first start's
/// files (or acknowledged changes) at a power cut, and the simulation says so.
#[test]
fn the_node_simulation_catches_forgotten_directory_syncs() {
    let caught = (0..500).find(|seed| {
        run_on(*seed, |disk| {
            disk.forget_directory_syncs();
            Arc::new(disk)
        })
        .is_err()
    });
    assert!(
        caught.is_some(),
        "no schedule noticed the missing directory syncs"
    );
}
