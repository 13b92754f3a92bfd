use std::fs;

use super::*;
use crate::Topic;

fn event(i: usize) -> NewEvent {
    NewEvent {
        key: format!("sensor-{}", i % 3),
        content_type: "application/json".into(),
        kind: String::new(),
        source: "test".into(),
        payload: Bytes::from(format!("{{\"n\":{i}}}")),
    }
}

fn small_segments() -> TopicConfig {
    TopicConfig {
        segment_bytes: 1000,
        ..TopicConfig::default()
    }
}

async fn read_all(topic: &Arc<Topic>) -> Vec<String> {
    let events = topic
        .read(topic.first_offset(), 100_000, usize::MAX)
        .await
        .expect("reads");
    events
        .iter()
        .map(|e| String::from_utf8_lossy(&e.payload).to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_read_back_in_order_across_segments_and_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open("t", dir.path(), small_segments()).expect("opens");
    let mut tasks = Vec::new();
    for i in 0..200 {
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            topic.append(vec![event(i)]).await.expect("appends")
        }));
    }
    let mut offsets = Vec::new();
    for task in tasks {
        offsets.push(task.await.expect("task").start);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (0..200).collect::<Vec<_>>());
    let stats = topic.stats();
    assert!(stats.segments > 1, "{} segments", stats.segments);
    let before = read_all(&topic).await;
    assert_eq!(before.len(), 200);
    // Reading from the middle starts exactly there.
    let middle = topic.read(123, 5, usize::MAX).await.expect("reads");
    assert_eq!(
        middle.iter().map(|e| e.offset).collect::<Vec<_>>(),
        vec![123, 124, 125, 126, 127]
    );
    topic.close().await;
    let topic = Topic::open("t", dir.path(), small_segments()).expect("reopens");
    assert_eq!(read_all(&topic).await, before);
    assert_eq!(topic.next_offset(), 200);
    assert_eq!(
        topic.append(vec![event(200)]).await.expect("appends"),
        200..201
    );
    topic.close().await;
}

/// A crash can stop a write at any byte. Recovery must keep exactly the whole records
/// before the cut, so every event that was acknowledged (synced before its ack) survives,
/// and must never hand out an offset the cut-off bytes could have held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_after_a_cut_at_every_byte_keeps_every_whole_record() {
    let source = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open("t", source.path(), TopicConfig::default()).expect("opens");
    for i in 0..6 {
        topic.append(vec![event(i)]).await.expect("appends");
    }
    topic.close().await;
    let segment = segment_path(source.path(), 0);
    let bytes = fs::read(&segment).expect("segment");
    let mut ends = vec![0];
    let mut rest = Bytes::from(bytes.clone());
    while let Decoded::Record { len, .. } = record::decode(&rest) {
        ends.push(ends.last().expect("nonempty") + len);
        rest = rest.slice(len..);
    }
    for cut in 0..=bytes.len() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(segment_path(dir.path(), 0), &bytes[..cut]).expect("write");
        let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("recovers");
        let whole = ends.iter().filter(|end| **end <= cut).count() - 1;
        let tail = (cut - ends[whole]) as u64;
        let skipped = tail.div_ceil(record::RECORD_BYTES_MIN as u64);
        assert_eq!(read_all(&topic).await.len(), whole, "cut at {cut}");
        assert_eq!(topic.next_offset(), whole as u64 + skipped, "cut at {cut}");
        // Nothing is cut from disk; the cut-off offsets are reported and never reused.
        assert_eq!(
            fs::metadata(segment_path(dir.path(), 0))
                .expect("meta")
                .len(),
            cut as u64
        );
        let lost = topic.lost();
        if skipped == 0 {
            assert!(lost.is_empty(), "cut at {cut}: {lost:?}");
        } else {
            assert_eq!(
                lost,
                vec![whole as u64..whole as u64 + skipped],
                "cut at {cut}"
            );
        }
        assert_eq!(
            topic.append(vec![event(99)]).await.expect("appends").start,
            whole as u64 + skipped
        );
        topic.close().await;
        let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("reopens");
        assert_eq!(read_all(&topic).await.len(), whole + 1, "cut at {cut}");
        topic.close().await;
    }
}

/// A flipped bit costs exactly the record it hit, in the newest segment as in a sealed one:
/// every later record stays readable, the damaged one is reported lost by offset and never
/// served, and its offset is never handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bits_are_never_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Local::open_in(Env::os(), "t", dir.path(), small_segments()).expect("opens");
    for i in 0..60 {
        topic.append(vec![event(i)]).await.expect("appends");
    }
    let segments: Vec<(u64, u64)> = {
        let log = topic.log.lock().expect("lock");
        log.segments.iter().map(|s| (s.base, s.end)).collect()
    };
    topic.close().await;
    assert!(segments.len() >= 3);
    // Flip a bit in the middle of the first (sealed) segment.
    let (base, end) = segments[0];
    let path = segment_path(dir.path(), base);
    let mut bytes = fs::read(&path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    fs::write(&path, &bytes).expect("write");
    let topic = Topic::open("t", dir.path(), small_segments()).expect("recovers");
    let events = topic.read(0, 100_000, usize::MAX).await.expect("reads");
    let offsets: Vec<u64> = events.iter().map(|e| e.offset).collect();
    assert_eq!(offsets.len(), 59, "exactly the damaged record is missing");
    let lost = topic.lost();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].end - lost[0].start, 1);
    assert!(lost[0].start >= base && lost[0].end <= end);
    assert!(!offsets.contains(&lost[0].start));
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    for event in &events {
        assert_eq!(
            String::from_utf8_lossy(&event.payload),
            format!("{{\"n\":{}}}", event.offset)
        );
    }
    assert_eq!(
        topic.append(vec![event(60)]).await.expect("appends").start,
        60
    );
    topic.close().await;
}

/// Defect 2 of the hardening issue: one bad byte in the newest segment deleted every later
/// acknowledged record (recovery truncated at the first invalid one) and the freed offsets
/// were handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_byte_in_the_newest_segment_costs_only_its_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("opens");
    for i in 0..100 {
        topic.append(vec![event(i)]).await.expect("appends");
    }
    topic.close().await;
    let path = segment_path(dir.path(), 0);
    let mut bytes = fs::read(&path).expect("read");
    let tenth = {
        let mut rest = Bytes::from(bytes.clone());
        let mut position = 0;
        for _ in 0..10 {
            let Decoded::Record { len, .. } = record::decode(&rest) else {
                panic!("records")
            };
            position += len;
            rest = rest.slice(len..);
        }
        position
    };
    // Inside event 10's payload, the record's last byte.
    let Decoded::Record { len, .. } = record::decode(&Bytes::from(bytes[tenth..].to_vec())) else {
        panic!("record 10")
    };
    bytes[tenth + len - 1] ^= 0x01;
    fs::write(&path, &bytes).expect("write");
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("recovers");
    let offsets: Vec<u64> = topic
        .read(0, 1000, usize::MAX)
        .await
        .expect("reads")
        .iter()
        .map(|e| e.offset)
        .collect();
    let expected: Vec<u64> = (0..100).filter(|o| *o != 10).collect();
    assert_eq!(offsets, expected);
    assert_eq!(topic.lost(), vec![10..11]);
    assert_eq!(topic.next_offset(), 100);
    assert_eq!(
        topic.append(vec![event(100)]).await.expect("appends"),
        100..101
    );
    topic.close().await;
}

/// Defect 4: a log that ends before a consumer group's committed offset (it lost its tail)
/// used to hand those offsets out again, and the group silently skipped the new events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_continue_past_a_committed_offset_beyond_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("opens");
    for i in 0..10 {
        topic.append(vec![event(i)]).await.expect("appends");
    }
    topic.commit("loops", 10).await.expect("commits");
    topic.close().await;
    // The log loses its last five records, as a power cut without syncs would.
    let path = segment_path(dir.path(), 0);
    let bytes = fs::read(&path).expect("read");
    let mut rest = Bytes::from(bytes.clone());
    let mut keep = 0;
    for _ in 0..5 {
        let Decoded::Record { len, .. } = record::decode(&rest) else {
            panic!("records")
        };
        keep += len;
        rest = rest.slice(len..);
    }
    fs::write(&path, &bytes[..keep]).expect("write");
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("recovers");
    assert_eq!(topic.next_offset(), 10);
    assert_eq!(topic.lost(), vec![5..10]);
    let appended = topic.append(vec![event(10)]).await.expect("appends");
    assert_eq!(appended, 10..11);
    let read = topic
        .read(topic.group_offset("loops"), 10, usize::MAX)
        .await
        .expect("reads");
    assert_eq!(read.len(), 1, "the group sees the new event");
    assert!(
        topic.commit("loops", 12).await.is_err(),
        "no commit past the end"
    );
    topic.close().await;
}

/// Defect 1: every group of a topic wrote through one temporary file, so two groups
/// committing at once could install each other's offsets (or fail).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn groups_committing_at_once_keep_their_own_offsets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("opens");
    for i in 0..200 {
        topic.append(vec![event(i)]).await.expect("appends");
    }
    let mut tasks = Vec::new();
    for (group, base) in [("a", 0), ("b", 100)] {
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..=100 {
                topic.commit(group, base + i).await.expect("commits");
            }
        }));
    }
    for task in tasks {
        task.await.expect("committer");
    }
    topic.close().await;
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("reopens");
    assert_eq!(topic.group_offset("a"), 100);
    assert_eq!(topic.group_offset("b"), 200);
    // A file installed under another group's name is refused, not read as its position.
    topic.close().await;
    let groups = dir.path().join("groups");
    fs::copy(groups.join("a"), groups.join("b")).expect("copies");
    let error = Topic::open("t", dir.path(), TopicConfig::default())
        .err()
        .expect("refuses");
    assert!(error.contains("belongs to another group"), "{error}");
    assert_eq!(
        fs::read_dir(&groups).expect("lists").count(),
        2,
        "no temporary file is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_offsets_survive_restarts_and_bad_files_are_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("opens");
    assert_eq!(topic.group_offset("loops"), 0);
    for i in 0..20 {
        topic.append(vec![event(i)]).await.expect("appends");
    }
    topic.commit("loops", 17).await.expect("commits");
    assert!(topic.commit("../etc", 1).await.is_err());
    topic.close().await;
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("reopens");
    assert_eq!(topic.group_offset("loops"), 17);
    topic.close().await;
    fs::write(dir.path().join("groups").join("loops"), "18\nbad\n").expect("write");
    let error = Topic::open("t", dir.path(), TopicConfig::default())
        .err()
        .expect("refuses");
    assert!(error.contains("fails its checksum"), "{error}");
    assert!(error.contains("delete it to restart the group"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_whole_old_segments_and_readers_are_told() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig {
        retention_bytes: Some(3000),
        ..small_segments()
    };
    let topic = Topic::open("t", dir.path(), config).expect("opens");
    for i in 0..100 {
        topic.append(vec![event(i)]).await.expect("appends");
    }
    // Retention runs at most every 10 s of appends; run it now.
    topic.close().await;
    let topic = Topic::open("t", dir.path(), config).expect("reopens");
    topic.append(vec![event(100)]).await.expect("appends");
    let stats = topic.stats();
    assert!(stats.first > 0, "nothing deleted");
    assert!(stats.bytes <= 3000 + 1000, "{} bytes kept", stats.bytes);
    match topic.read(0, 10, usize::MAX).await {
        Err(ReadError::Expired { first, .. }) => assert_eq!(first, stats.first),
        other => panic!("expected Expired, got {other:?}"),
    }
    topic.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_events_are_refused_with_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = TopicConfig {
        event_bytes_max: 100,
        ..TopicConfig::default()
    };
    let topic = Topic::open("t", dir.path(), config).expect("opens");
    let big = NewEvent {
        payload: Bytes::from(vec![b'x'; 200]),
        ..NewEvent::default()
    };
    let error = topic.append(vec![big]).await.expect_err("refused");
    expect_test::expect!["an event of 224 bytes exceeds topic t's limit of 100 bytes"]
        .assert_eq(&error.to_string());
    assert_eq!(topic.next_offset(), 0);
    topic.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_syncs_and_are_answered_only_once_visible() {
    let dir = tempfile::tempdir().expect("tempdir");
    let topic = Topic::open("t", dir.path(), TopicConfig::default()).expect("opens");
    let (producers, each) = (50, 20);
    let mut tasks = Vec::new();
    for p in 0..producers {
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..each {
                let range = topic
                    .append(vec![event(p * each + i)])
                    .await
                    .expect("appends");
                // The answer comes only after the group is durable and readable.
                assert!(topic.next_offset() >= range.end, "answered before visible");
            }
        }));
    }
    for task in tasks {
        task.await.expect("producer");
    }
    let total = (producers * each) as u64;
    let stats = topic.stats();
    assert_eq!(stats.next, total);
    assert!(
        stats.commits_total < total,
        "{} syncs for {total} appends: groups were not shared",
        stats.commits_total
    );
    let offsets: Vec<u64> = topic
        .read(0, 100_000, usize::MAX)
        .await
        .expect("reads")
        .iter()
        .map(|e| e.offset)
        .collect();
    assert_eq!(offsets, (0..total).collect::<Vec<_>>());
}

/// On the simulated disk with tokio's clock paused, so nothing here depends on how fast
/// the machine is (hardening defect 11: this test measured wall-clock windows).
#[tokio::test(start_paused = true)]
async fn batch_durability_answers_before_syncing_and_syncs_within_the_window() {
    let disk = disk::sim::SimDisk::new();
    let env = Env {
        disk: Arc::new(disk.clone()),
        clock: Arc::new(disk::sim::SimClock::new(1_750_000_000_000)),
    };
    let config = TopicConfig {
        durability: Durability::Batch {
            window: Duration::from_millis(50),
        },
        ..TopicConfig::default()
    };
    let topic = Topic::open_in(env, "t", Path::new("/data/t"), config).expect("opens");
    // Idle: one append is answered after its write, before any sync; the window's sync
    // follows on its own.
    topic.append(vec![event(0)]).await.expect("appends");
    assert_eq!(topic.stats().syncs_total, 0, "answered before syncing");
    let segment = segment_path(Path::new("/data/t"), 0);
    assert!(disk.durable_bytes(&segment).is_some_and(|b| b.is_empty()));
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(
        topic.stats().syncs_total,
        1,
        "synced once the window passed"
    );
    assert!(disk.durable_bytes(&segment).is_some_and(|b| !b.is_empty()));
    // Busy: an append every 10 ms for 0.5 s still gets a sync at least every window, and
    // not one per group.
    let before = topic.stats();
    for i in 1..=50 {
        topic.append(vec![event(i)]).await.expect("appends");
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    let after = topic.stats();
    let (commits, syncs) = (
        after.commits_total - before.commits_total,
        after.syncs_total - before.syncs_total,
    );
    assert!(
        commits > syncs,
        "batch durability synced every group ({commits} groups, {syncs} syncs)"
    );
    // A window starts at the first unsynced write, and the sync rides on the first group
    // after it ends: one sync per window plus one 10 ms step.
    assert!(
        syncs >= 500 / (50 + 10),
        "{syncs} syncs in 0.5 s of appends with a 50 ms window"
    );
    topic.close().await;
}
