//! The audit log under power cuts: the real log on a simulated disk that loses what was
//! not synced (any sector of it, independently), over seeded schedules of appends,
//! checkpoints, failing syncs and power cuts, including during recovery.
//!
//! After every recovery: every acknowledged entry is there, unchanged, in order; no
//! sequence number appears twice; and `verify` finds the chain intact (a crash's tail is
//! recorded, never reported as tampering), including against every checkpoint taken.
//!
//! `MARU_AUDIT_POWERCUT_SCHEDULES=N` runs N schedules (2,000 by default);
//! `MARU_AUDIT_POWERCUT_SEED=S` replays one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use disk::Env;
use disk::sim::{Rng, SimClock, SimDisk};
use policy::audit::{AuditLog, Checkpoint, verify};

use crate::audit::event;

fn run(seed: u64) -> Result<u64, String> {
    let trace = std::env::var_os("MARU_AUDIT_POWERCUT_TRACE").is_some();
    let say = |line: String| {
        if trace {
            println!("{line}");
        }
    };
    let disk = SimDisk::new();
    let clock = Arc::new(SimClock::new(1_700_000_000_000));
    let env = Env {
        disk: Arc::new(disk.clone()),
        clock: clock.clone(),
    };
    let dir = Path::new("/data/audit");
    let mut rng = Rng::new(seed);
    // Acknowledged entries: seq → resource.
    let mut acknowledged: BTreeMap<u64, String> = BTreeMap::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut counter = 0;
    let lifetimes = 2 + rng.below(5);
    // Half the schedules change segment every few entries.
    let segment_bytes = if rng.percent(50) { 1500 } else { 64 << 20 };
    for lifetime in 0..=lifetimes {
        let last = lifetime == lifetimes;
        if !last && rng.percent(25) {
            disk.crash_after(rng.below(60));
        }
        let log = match AuditLog::open_with_segment_bytes(env.clone(), dir, segment_bytes) {
            Ok((log, opened)) => {
                say(format!("lifetime {lifetime}: opened {opened:?}"));
                log
            }
            Err(e) if last || !disk.is_off() => {
                return Err(format!("lifetime {lifetime}: does not open: {e}"));
            }
            Err(_) => {
                disk.power_cut(&mut rng);
                continue;
            }
        };
        disk.disarm();
        let entries = log
            .entries(0, usize::MAX, |_| true)
            .map_err(|e| format!("lifetime {lifetime}: read: {e}"))?;
        let mut previous = 0;
        for entry in &entries {
            if entry.seq <= previous {
                return Err(format!(
                    "lifetime {lifetime}: entry {} after {previous}",
                    entry.seq
                ));
            }
            previous = entry.seq;
        }
        let found: BTreeMap<u64, String> = entries
            .iter()
            .map(|e| (e.seq, e.event.resource.clone()))
            .collect();
        for (seq, resource) in &acknowledged {
            if found.get(seq) != Some(resource) {
                return Err(format!(
                    "lifetime {lifetime}: acknowledged entry {seq} ({resource}) is {:?}",
                    found.get(seq)
                ));
            }
        }
        let report = verify(&env, dir, &checkpoints, Some(&log.public_key()))
            .map_err(|e| format!("lifetime {lifetime}: verify: {e}"))?;
        if let Some(problem) = report.problem {
            return Err(format!("lifetime {lifetime}: verify: {problem:?}"));
        }
        if last {
            break;
        }
        let failing_sync = rng.percent(20);
        if failing_sync {
            disk.fail_syncs_after(rng.below(3) as u32, 1);
        }
        disk.crash_after(rng.below(80));
        for _ in 0..1 + rng.below(12) {
            if disk.is_off() {
                break;
            }
            clock.advance_ms(1 + rng.below(1000));
            if rng.percent(15) {
                if let Ok(Some(checkpoint)) = log.checkpoint() {
                    checkpoints.push(checkpoint);
                }
                continue;
            }
            counter += 1;
            let mut e = event(counter);
            e.resource = format!("app/s{seed}-{counter}");
            let resource = e.resource.clone();
            let result = log.append(e);
            say(format!("  append {resource}: {result:?}"));
            if let Ok(seq) = result {
                acknowledged.insert(seq, resource);
            }
        }
        // After a failed sync the machine is restarted, not only maru (docs/node.md): the
        // page cache may hold what never reached the disk.
        let end = if failing_sync { 0 } else { rng.below(3) };
        say(format!(
            "lifetime {lifetime} ends {end} (off: {})",
            disk.is_off()
        ));
        match end {
            0 => {
                disk.power_off();
                drop(log);
                disk.power_cut(&mut rng);
            }
            1 => {
                // Killed: the page cache survives.
                disk.power_off();
                drop(log);
                disk.revive();
            }
            _ => {
                disk.disarm();
                drop(log);
                if disk.is_off() {
                    disk.power_cut(&mut rng);
                }
            }
        }
    }
    Ok(acknowledged.len() as u64)
}

#[test]
fn acknowledged_entries_and_the_chain_survive_power_cuts() {
    let runs = disk::sim::run_schedules(
        "MARU_AUDIT_POWERCUT",
        2000,
        "cargo test -p policy --test it powercut",
        run,
    );
    println!(
        "audit power-cut simulation: {} schedules, {} acknowledged entries, 0 violations",
        runs.len(),
        runs.iter().sum::<u64>()
    );
}

/// The pseudonym key (`DATA/pseudonym.key`) under power cuts: once a start has used a key,
/// every later start uses the same one (pseudonyms made before stay linkable); a start cut
/// off before the key was made may make a new one, and no start ever finds a damaged file.
fn pseudonym_key_run(seed: u64) -> Result<u64, String> {
    let disk = SimDisk::new();
    let env = Env {
        disk: Arc::new(disk.clone()),
        clock: Arc::new(SimClock::new(1_700_000_000_000)),
    };
    let data = Path::new("/data");
    disk::create_dir_all(env.disk.as_ref(), data).map_err(|e| e.to_string())?;
    let mut rng = Rng::new(seed);
    let mut used: Option<[u8; 32]> = None;
    // Starts cut off while the key was being made or read.
    let mut cut = 0;
    let lifetimes = 2 + rng.below(4);
    for lifetime in 0..=lifetimes {
        let last = lifetime == lifetimes;
        if !last && rng.percent(60) {
            disk.crash_after(rng.below(8));
        }
        let result = policy::data::pseudonym_key(&env, data);
        if disk.is_off() {
            cut += 1;
        }
        match result {
            Ok(key) => {
                if let Some(before) = used
                    && before != key
                {
                    return Err(format!("lifetime {lifetime}: the key changed after use"));
                }
                if !disk.is_off() {
                    used = Some(key);
                }
            }
            Err(error) if last || !disk.is_off() => {
                return Err(format!("lifetime {lifetime}: {error}"));
            }
            Err(_) => {}
        }
        disk.power_cut(&mut rng);
    }
    Ok(cut)
}

#[test]
fn the_pseudonym_key_survives_power_cuts() {
    let runs = disk::sim::run_schedules(
        "MARU_PSEUDONYM_POWERCUT",
        300,
        "cargo test -p policy --test it pseudonym",
        pseudonym_key_run,
    );
    println!(
        "pseudonym key power-cut simulation: {} schedules, {} starts cut off while the key was made or read, 0 violations",
        runs.len(),
        runs.iter().sum::<u64>()
    );
}
