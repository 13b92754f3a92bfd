//! The audit log on the machine's disk: entries come back in order, concurrent appends
//! share syncs, and `verify` names each kind of tampering.

use std::path::Path;
use std::sync::Arc;

use disk::Env;
use policy::audit::{AuditLog, Decision, Event, Kind, ProblemKind, verify};

pub fn event(n: u64) -> Event {
    Event {
        kind: Kind::Action,
        actor: "operator:ana".into(),
        action: "deploy".into(),
        resource: format!("app/app{n}"),
        decision: if n.is_multiple_of(3) {
            Decision::Deny
        } else {
            Decision::Allow
        },
        reason: String::new(),
        address: Some("127.0.0.1".into()),
        details: serde_json::Map::new(),
    }
}

fn fill(dir: &Path, entries: u64) -> AuditLog {
    let (log, _) = AuditLog::open(Env::os(), dir).expect("open");
    for n in 1..=entries {
        assert_eq!(log.append(event(n)).expect("append"), n);
    }
    log
}

fn segment(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("{:020}.log", 1))
}

/// The byte ranges of each entry's frame in the first segment.
fn frames(dir: &Path) -> Vec<std::ops::Range<usize>> {
    let bytes = std::fs::read(segment(dir)).expect("read");
    let mut at = policy::audit::format::SEGMENT_HEADER_BYTES;
    let mut out = Vec::new();
    while let Some(frame) = policy::audit::format::Frame::decode(&bytes[at..]) {
        out.push(at..at + frame.encoded_len());
        at += frame.encoded_len();
    }
    out
}

#[test]
fn entries_survive_reopening_and_concurrent_appends_all_land() {
    let dir = tempfile::tempdir().expect("dir");
    let log = Arc::new(fill(dir.path(), 10));
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| log.append(event(100 + t * 50 + i)).expect("append"))
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (11..=410).collect::<Vec<_>>());
    drop(log);
    let (log, opened) = AuditLog::open(Env::os(), dir.path()).expect("reopen");
    assert_eq!(opened.entries_in_newest_segment, 410);
    assert_eq!(log.durable_seq(), 410);
    let denied = log
        .entries(0, 1000, |e| e.event.decision == Decision::Deny)
        .expect("read");
    assert!(denied.iter().all(|e| e.event.decision == Decision::Deny));
    assert_eq!(log.entries(400, 5, |_| true).expect("read").len(), 5);
    let report = verify(&Env::os(), dir.path(), &[], None).expect("verify");
    assert!(report.ok(), "{report:?}");
    assert_eq!((report.entries, report.last_seq), (410, Some(410)));
}

#[test]
fn secrets_are_recorded_only_as_keyed_hashes() {
    let dir = tempfile::tempdir().expect("dir");
    let log = fill(dir.path(), 0);
    let secret = "maru-token-0123456789abcdef";
    let mut e = event(1);
    e.actor = format!("token:{}", log.redact(secret));
    log.append(e).expect("append");
    assert_eq!(log.redact(secret), log.redact(secret));
    assert_ne!(log.redact(secret), log.redact("another"));
    let bytes = std::fs::read(segment(dir.path())).expect("read");
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    let mode = std::fs::metadata(dir.path().join("redact.key")).expect("key");
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
}

fn tampered(
    entries: u64,
    change: impl FnOnce(&mut Vec<u8>, &[std::ops::Range<usize>]),
) -> (ProblemKind, Option<u64>) {
    let dir = tempfile::tempdir().expect("dir");
    let log = fill(dir.path(), entries);
    let exported = log.latest_checkpoint().expect("checkpoint").expect("one");
    drop(log);
    let clean = verify(
        &Env::os(),
        dir.path(),
        std::slice::from_ref(&exported),
        None,
    )
    .expect("verify");
    assert!(clean.ok(), "{clean:?}");
    let ranges = frames(dir.path());
    let mut bytes = std::fs::read(segment(dir.path())).expect("read");
    change(&mut bytes, &ranges);
    std::fs::write(segment(dir.path()), bytes).expect("write");
    // The node's own checkpoints file could be rewritten by whoever edited the log: only
    // the exported checkpoint counts here.
    std::fs::remove_file(dir.path().join("checkpoints")).expect("remove");
    let report = verify(&Env::os(), dir.path(), &[exported], None).expect("verify");
    let problem = report.problem.expect("a problem is found");
    (problem.kind, problem.seq)
}

#[test]
fn verify_names_the_first_edited_deleted_reordered_or_cut_entry() {
    // An edit inside entry 4's payload (the frame's check made right again would not help:
    // the chain covers it).
    let (kind, seq) = tampered(10, |bytes, r| {
        let at = r[3].start + 70;
        bytes[at] ^= 1;
    });
    assert_eq!((kind, seq), (ProblemKind::Damaged, None));
    // An edit that keeps the frame whole: a re-encoded frame with a different payload.
    let (kind, seq) = tampered(10, |bytes, r| {
        let old = policy::audit::format::Frame::decode(&bytes[r[3].clone()]).expect("frame");
        let payload = String::from_utf8(old.payload.to_vec())
            .expect("json")
            .replace("deny", "allow")
            .replace("app4", "app9");
        let mut frame = Vec::new();
        policy::audit::format::Frame {
            seq: old.seq,
            hash: old.hash,
            payload: payload.as_bytes(),
        }
        .encode_into(&mut frame);
        bytes.splice(r[3].clone(), frame);
    });
    assert_eq!((kind, seq), (ProblemKind::Edited, Some(4)));
    // Entry 5 deleted.
    let (kind, seq) = tampered(10, |bytes, r| {
        bytes.drain(r[4].clone());
    });
    assert_eq!((kind, seq), (ProblemKind::Deleted, Some(6)));
    // Entries 6 and 7 swapped.
    let (kind, seq) = tampered(10, |bytes, r| {
        let six = bytes[r[5].clone()].to_vec();
        let seven = bytes[r[6].clone()].to_vec();
        let mut swapped = seven;
        swapped.extend_from_slice(&six);
        bytes.splice(r[5].start..r[6].end, swapped);
    });
    assert_eq!((kind, seq), (ProblemKind::Reordered, Some(7)));
    // The last three entries cut off cleanly: only the exported checkpoint can tell.
    let (kind, seq) = tampered(10, |bytes, r| {
        bytes.truncate(r[7].start);
    });
    assert_eq!((kind, seq), (ProblemKind::Truncated, Some(10)));
    // The last entry rewritten whole (chain recomputed from entry 9): the checkpoint tells.
    let (kind, seq) = tampered(10, |bytes, r| {
        let nine = policy::audit::format::Frame::decode(&bytes[r[8].clone()]).expect("frame");
        let payload = String::from_utf8(
            policy::audit::format::Frame::decode(&bytes[r[9].clone()])
                .expect("frame")
                .payload
                .to_vec(),
        )
        .expect("json")
        .replace("app10", "app99");
        let hash = policy::audit::format::chain(&nine.hash, 10, payload.as_bytes());
        let mut frame = Vec::new();
        policy::audit::format::Frame {
            seq: 10,
            hash,
            payload: payload.as_bytes(),
        }
        .encode_into(&mut frame);
        bytes.splice(r[9].clone(), frame);
    });
    assert_eq!((kind, seq), (ProblemKind::Edited, Some(10)));
}

#[test]
fn a_checkpoint_from_another_key_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let log = fill(dir.path(), 3);
    let mut checkpoint = log.latest_checkpoint().expect("checkpoint").expect("one");
    let other = tempfile::tempdir().expect("dir");
    let other_log = fill(other.path(), 3);
    checkpoint.public_key = other_log.public_key();
    let report = verify(
        &Env::os(),
        dir.path(),
        &[checkpoint],
        Some(&log.public_key()),
    )
    .expect("verify");
    assert_eq!(
        report.problem.map(|p| p.kind),
        Some(ProblemKind::BadCheckpoint)
    );
}

#[test]
fn a_torn_tail_is_kept_and_named_and_numbers_are_not_reused() {
    let dir = tempfile::tempdir().expect("dir");
    drop(fill(dir.path(), 5));
    // A write cut short: half of a sixth frame.
    let mut bytes = std::fs::read(segment(dir.path())).expect("read");
    let whole = bytes.len();
    let r = frames(dir.path());
    let fifth = bytes[r[4].clone()].to_vec();
    bytes.extend_from_slice(&fifth[..fifth.len() / 2]);
    std::fs::write(segment(dir.path()), &bytes).expect("write");
    let before = verify(&Env::os(), dir.path(), &[], None).expect("verify");
    assert!(
        before.ok() && before.incomplete_tail_bytes > 0,
        "{before:?}"
    );
    let (log, opened) = AuditLog::open(Env::os(), dir.path()).expect("reopen");
    let tail = opened.tail.expect("a tail");
    assert_eq!(
        (tail.offset as usize, tail.bytes as usize),
        (whole, fifth.len() / 2)
    );
    let seq = log.append(event(6)).expect("append");
    assert!(
        seq > 6,
        "a number the tail may hold is not given again: {seq}"
    );
    assert_eq!(
        std::fs::read(segment(dir.path())).expect("read"),
        bytes,
        "the tail is kept"
    );
    let report = verify(&Env::os(), dir.path(), &[], None).expect("verify");
    assert!(report.ok(), "{report:?}");
    assert_eq!(report.resumed.len(), 1);
    assert_eq!(report.entries, 6);
}

#[test]
fn a_full_disk_refuses_entries_and_the_log_reopens_once_space_returns() {
    use disk::sim::{SimClock, SimDisk};
    let disk = SimDisk::new();
    let env = Env {
        disk: Arc::new(disk.clone()),
        clock: Arc::new(SimClock::new(1_700_000_000_000)),
    };
    let dir = Path::new("/data/audit");
    let (log, _) = AuditLog::open(env.clone(), dir).expect("open");
    for n in 1..=3 {
        log.append(event(n)).expect("append");
    }
    disk.set_capacity(Some(disk.used_bytes() + 100));
    let refused = log.append(event(4)).expect_err("no room");
    assert!(
        matches!(refused, policy::audit::AuditError::Unavailable(_)),
        "{refused:?}"
    );
    assert!(refused.to_string().contains("refused"), "{refused}");
    // Still refused while the disk is full, and at once (no retry within a second).
    assert!(log.append(event(5)).is_err());
    disk.set_capacity(None);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let seq = log.append(event(6)).expect("reopened");
    assert!(seq > 3);
    let report = verify(&env, dir, &[], None).expect("verify");
    assert!(report.ok(), "{report:?}");
    let kept: Vec<String> = log
        .entries(0, 100, |_| true)
        .expect("read")
        .into_iter()
        .map(|e| e.event.resource)
        .collect();
    assert_eq!(kept, ["app/app1", "app/app2", "app/app3", "app/app6"]);
}
