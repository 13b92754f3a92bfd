//! Objects written and read through the engine on a simulated disk: sizes around stripe
//! boundaries, ranges, overwrites, listings, multipart uploads, lost volumes and flipped
//! bits.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::Env;
use disk::sim::{Rng, SimClock, SimDisk};
use store::engine::StoreConfig;

/// Parts as small as this, but for the last: the tests' multipart uploads stay small.
pub const PART_BYTES_MIN: u64 = 20_000;
use store::{ObjectMeta, Store, StoreError};

pub const VOLUMES: usize = 6;

pub fn config(volumes: usize) -> StoreConfig {
    StoreConfig {
        block_bytes_max: 4096,
        part_bytes_min: PART_BYTES_MIN,
        ..StoreConfig::new(
            PathBuf::from("/data/store"),
            (0..volumes)
                .map(|i| PathBuf::from(format!("/volumes/{i}")))
                .collect(),
        )
    }
}

pub fn open(disk: &SimDisk, volumes: usize) -> Arc<Store> {
    let env = Env {
        disk: Arc::new(disk.clone()),
        clock: Arc::new(SimClock::new(1_700_000_000_000)),
    };
    Arc::new(Store::open(env, config(volumes)).expect("opens"))
}

pub fn body(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next_u64() as u8).collect()
}

pub fn put(store: &Arc<Store>, bucket: &str, key: &str, bytes: &[u8]) {
    let mut writer = store
        .put(bucket, key, bytes.len() as u64, ObjectMeta::default())
        .expect("starts");
    for chunk in bytes.chunks(1000) {
        writer.write(chunk).expect("writes");
    }
    writer.finish().expect("commits");
}

pub fn get(store: &Arc<Store>, bucket: &str, key: &str) -> Result<Vec<u8>, StoreError> {
    store.get(bucket, key, None)?.2.read_all()
}

/// Every file under `dir` on the simulated disk.
pub fn files(disk: &SimDisk, dir: &Path) -> Vec<PathBuf> {
    use disk::Disk as _;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for name in disk.list(&dir).unwrap_or_default() {
            let path = dir.join(name);
            if disk.list(&path).is_ok() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn objects_of_every_size_around_stripes_read_back_whole_and_in_ranges() {
    let disk = SimDisk::new();
    let store = open(&disk, VOLUMES);
    store.create_bucket("city").expect("creates");
    // RS(4,2) with 4 KiB blocks: a stripe carries 4 * 4096 - 16 bytes.
    let stripe = 4 * 4096 - 16;
    for (i, len) in [
        0,
        1,
        63,
        1000,
        stripe - 1,
        stripe,
        stripe + 1,
        3 * stripe + 7,
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = body(i as u64, len);
        let key = format!("size-{len}");
        put(&store, "city", &key, &bytes);
        assert_eq!(
            get(&store, "city", &key).expect("reads"),
            bytes,
            "{len} bytes"
        );
        let (info, _) = store.head("city", &key).expect("heads");
        assert_eq!(info.size, len as u64);
        assert_eq!(info.etag.len(), 32);
        if len > 2 {
            for (first, last) in [
                (0, 0),
                (1, len as u64 - 2),
                (len as u64 - 1, len as u64 + 100),
            ] {
                let got = store
                    .get("city", &key, Some((first, last)))
                    .expect("ranges")
                    .2
                    .read_all()
                    .expect("reads");
                let last = (last as usize).min(len - 1);
                assert_eq!(
                    got,
                    bytes[first as usize..=last],
                    "{len} bytes, {first}-{last}"
                );
            }
        }
    }
    assert!(matches!(
        store.get("city", "size-1000", Some((1000, 2000))),
        Err(StoreError::InvalidRange { .. })
    ));
    assert!(matches!(
        get(&store, "city", "nope"),
        Err(StoreError::NoSuchKey { .. })
    ));
    assert!(matches!(
        get(&store, "nowhere", "x"),
        Err(StoreError::NoSuchBucket(_))
    ));
}

#[test]
fn an_overwrite_replaces_whole_and_leaves_no_files_behind() {
    let disk = SimDisk::new();
    let store = open(&disk, VOLUMES);
    store.create_bucket("city").expect("creates");
    put(&store, "city", "a", &body(1, 50_000));
    let before = files(&disk, Path::new("/volumes")).len();
    put(&store, "city", "a", &body(2, 70_000));
    assert_eq!(get(&store, "city", "a").expect("reads"), body(2, 70_000));
    assert_eq!(
        files(&disk, Path::new("/volumes")).len(),
        before,
        "old shards deleted"
    );
    store.delete("city", "a").expect("deletes");
    store.delete("city", "a").expect("deleting again succeeds");
    assert_eq!(
        files(&disk, Path::new("/volumes")).len(),
        VOLUMES,
        "only the volume ids are left"
    );
    assert!(matches!(
        store.delete_bucket("nope"),
        Err(StoreError::NoSuchBucket(_))
    ));
    store.delete_bucket("city").expect("empty bucket deleted");
}

#[test]
fn listings_page_and_group_by_delimiter() {
    let disk = SimDisk::new();
    let store = open(&disk, 3);
    store.create_bucket("city").expect("creates");
    for key in ["a/1", "a/2", "b", "c/x/1", "c/y", "d"] {
        put(&store, "city", key, key.as_bytes());
    }
    let names = |listing: &store::engine::Listing| {
        let mut out: Vec<String> = listing.objects.iter().map(|o| o.key.clone()).collect();
        out.extend(listing.common_prefixes.iter().map(|p| format!("{p}*")));
        out
    };
    let all = store
        .list("city", "", Some("/"), None, 1000)
        .expect("lists");
    assert_eq!(names(&all), ["b", "d", "a/*", "c/*"]);
    let page = store.list("city", "", Some("/"), None, 2).expect("lists");
    assert_eq!(names(&page), ["b", "a/*"]);
    let after = page.next.clone().expect("more");
    let rest = store
        .list("city", "", Some("/"), Some(&after), 2)
        .expect("lists");
    assert_eq!(
        names(&rest),
        ["b", "d", "c/*"]
            .iter()
            .filter(|n| **n != "b")
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    );
    let under = store.list("city", "c/", None, None, 1000).expect("lists");
    assert_eq!(names(&under), ["c/x/1", "c/y"]);
    assert!(matches!(
        store.delete_bucket("city"),
        Err(StoreError::BucketNotEmpty(_))
    ));
}

#[test]
fn multipart_uploads_complete_in_order_and_abort_cleanly() {
    let disk = SimDisk::new();
    let store = open(&disk, VOLUMES);
    store.create_bucket("city").expect("creates");
    let upload = store
        .create_upload("city", "archive", ObjectMeta::default())
        .expect("creates");
    let sizes = [PART_BYTES_MIN as usize, PART_BYTES_MIN as usize, 1234];
    let mut etags = Vec::new();
    let mut whole = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let bytes = body(10 + i as u64, *size);
        let mut writer = store
            .put_part(&upload, i as u32 + 1, *size as u64)
            .expect("starts");
        writer.write(&bytes).expect("writes");
        etags.push((i as u32 + 1, writer.finish().expect("commits")));
        whole.extend_from_slice(&bytes);
    }
    // A part uploaded again replaces the first upload of it.
    let bytes = body(99, 1234);
    let mut writer = store.put_part(&upload, 3, 1234).expect("starts");
    writer.write(&bytes).expect("writes");
    etags[2].1 = writer.finish().expect("commits");
    whole.truncate(2 * PART_BYTES_MIN as usize);
    whole.extend_from_slice(&bytes);
    assert_eq!(store.parts(&upload).expect("lists").1.len(), 3);
    assert!(matches!(
        store.complete_upload(&upload, &[etags[1].clone(), etags[0].clone()]),
        Err(StoreError::InvalidPartOrder)
    ));
    let info = store.complete_upload(&upload, &etags).expect("completes");
    assert!(info.etag.ends_with("-3"), "{}", info.etag);
    assert_eq!(get(&store, "city", "archive").expect("reads"), whole);
    let middle = store
        .get(
            "city",
            "archive",
            Some((PART_BYTES_MIN - 10, PART_BYTES_MIN + 10)),
        )
        .expect("ranges")
        .2
        .read_all()
        .expect("reads");
    assert_eq!(
        middle,
        whole[PART_BYTES_MIN as usize - 10..=PART_BYTES_MIN as usize + 10]
    );
    assert!(matches!(
        store.parts(&upload),
        Err(StoreError::NoSuchUpload(_))
    ));

    let small = store
        .create_upload("city", "small", ObjectMeta::default())
        .expect("creates");
    let mut tags = Vec::new();
    for n in 1..=2 {
        let mut writer = store.put_part(&small, n, 10).expect("starts");
        writer.write(&[n as u8; 10]).expect("writes");
        tags.push((n, writer.finish().expect("commits")));
    }
    assert!(matches!(
        store.complete_upload(&small, &tags),
        Err(StoreError::EntityTooSmall { part: 1, .. })
    ));
    let before = files(&disk, Path::new("/volumes")).len();
    store.abort_upload(&small).expect("aborts");
    assert_eq!(
        files(&disk, Path::new("/volumes")).len(),
        before - 2 * VOLUMES
    );
    assert!(store.uploads("city").expect("lists").is_empty());
}

#[test]
fn losing_any_parity_count_of_volumes_loses_nothing_and_one_more_says_so() {
    let disk = SimDisk::new();
    {
        let store = open(&disk, VOLUMES);
        store.create_bucket("city").expect("creates");
        for i in 0..12 {
            put(
                &store,
                "city",
                &format!("o{i}"),
                &body(i, 20_000 + i as usize * 777),
            );
        }
    }
    use disk::Disk as _;
    // RS(4,2): any two volumes may go.
    for lost in [[0usize, 1], [2, 5], [3, 4]] {
        let damaged = SimDisk::new();
        copy_disk(&disk, &damaged);
        for volume in lost {
            for file in files(
                &damaged,
                &PathBuf::from(format!("/volumes/{volume}/objects")),
            ) {
                damaged.remove_file(&file).expect("removes");
            }
        }
        let store = open(&damaged, VOLUMES);
        for i in 0..12 {
            assert_eq!(
                get(&store, "city", &format!("o{i}")).expect("reads"),
                body(i, 20_000 + i as usize * 777),
                "volumes {lost:?} lost"
            );
        }
    }
    let damaged = SimDisk::new();
    copy_disk(&disk, &damaged);
    for volume in [0, 1, 2] {
        for file in files(
            &damaged,
            &PathBuf::from(format!("/volumes/{volume}/objects")),
        ) {
            damaged.remove_file(&file).expect("removes");
        }
    }
    let store = open(&damaged, VOLUMES);
    let mut lost = 0;
    for i in 0..12 {
        match get(&store, "city", &format!("o{i}")) {
            Ok(bytes) => assert_eq!(bytes, body(i, 20_000 + i as usize * 777)),
            Err(StoreError::DataLost { .. }) => lost += 1,
            Err(other) => panic!("{other}"),
        }
    }
    assert!(
        lost > 0,
        "three of six volumes lost must lose some RS(4,2) object"
    );
}

#[test]
fn flipped_bits_are_never_served() {
    let disk = SimDisk::new();
    let store = open(&disk, VOLUMES);
    store.create_bucket("city").expect("creates");
    let bytes = body(7, 100_000);
    put(&store, "city", "x", &bytes);
    let shards = files(&disk, Path::new("/volumes"))
        .into_iter()
        .filter(|p| !p.ends_with("volume.id"))
        .collect::<Vec<_>>();
    let mut rng = Rng::new(3);
    for round in 0..200 {
        let path = &shards[rng.below(shards.len() as u64) as usize];
        let len = disk::Disk::read(&disk, path).expect("reads").len();
        let at = rng.below(len as u64) as usize;
        let bit = rng.below(8) as u8;
        disk.flip_bit(path, at, bit);
        // Two flips may land in two shards of one stripe: still readable with RS(4,2).
        let other = &shards[rng.below(shards.len() as u64) as usize];
        let at2 = rng.below(len as u64) as usize;
        disk.flip_bit(other, at2, 1);
        assert_eq!(
            get(&store, "city", "x").expect("rebuilt"),
            bytes,
            "round {round}"
        );
        disk.flip_bit(other, at2, 1);
        disk.flip_bit(path, at, bit);
    }
    assert!(
        store
            .counters
            .blocks_bad
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[test]
fn no_plaintext_of_objects_or_their_metadata_reaches_the_disk() {
    let disk = SimDisk::new();
    let store = open(&disk, VOLUMES);
    store.create_bucket("city").expect("creates");
    let secret = b"resident 880101-1234567 moved to Jongno-gu ".repeat(500);
    let mut meta = ObjectMeta::default();
    meta.user
        .insert("owner".into(), "Kim Minji, citizen id 880101".into());
    let mut writer = store
        .put("city", "records", secret.len() as u64, meta)
        .expect("starts");
    writer.write(&secret).expect("writes");
    writer.finish().expect("commits");
    for path in files(&disk, Path::new("/")) {
        let bytes = disk::Disk::read(&disk, &path).expect("reads");
        for needle in [&b"880101"[..], b"Jongno", b"Kim Minji"] {
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds plaintext",
                path.display()
            );
        }
    }
    let (_, meta) = store.head("city", "records").expect("heads");
    assert_eq!(meta.user["owner"], "Kim Minji, citizen id 880101");
}

/// Copy every file and directory of one simulated disk to another (synced).
pub fn copy_disk(from: &SimDisk, to: &SimDisk) {
    use disk::Disk as _;
    let mut stack = vec![PathBuf::from("/")];
    while let Some(dir) = stack.pop() {
        for name in from.list(&dir).unwrap_or_default() {
            let path = dir.join(&name);
            if from.list(&path).is_ok() {
                to.create_dir(&path).expect("creates");
                stack.push(path);
            } else {
                let file = to.open(&path, disk::OpenMode::CreateNew).expect("creates");
                file.append(&from.read(&path).expect("reads"))
                    .expect("writes");
                file.sync().expect("syncs");
            }
        }
        to.sync_dir(&dir).expect("syncs");
    }
}

#[test]
fn the_scrub_finds_and_heals_flipped_bits_lost_shards_and_a_replaced_volume() {
    use disk::Disk as _;
    let disk = SimDisk::new();
    let store = open(&disk, VOLUMES);
    store.create_bucket("city").expect("creates");
    for i in 0..8u64 {
        put(
            &store,
            "city",
            &format!("o{i}"),
            &body(i, 30_000 + i as usize * 1000),
        );
    }
    let first = store.scrub_pass().expect("scrubs");
    assert_eq!(
        (first.passes, first.blocks_bad, first.objects_checked),
        (1, 0, 8)
    );
    // A flipped bit in one shard, and one shard file of another object deleted.
    let shards: Vec<PathBuf> = files(&disk, Path::new("/volumes"))
        .into_iter()
        .filter(|p| !p.ends_with("volume.id"))
        .collect();
    assert!(disk.flip_bit(&shards[0], 500, 2));
    disk.remove_file(&shards[7]).expect("removes");
    let second = store.scrub_pass().expect("scrubs");
    assert!(
        second.blocks_bad > 0 && second.parts_healed >= 1,
        "{second:?}"
    );
    assert!(
        second.degraded.is_empty() && second.lost.is_empty(),
        "{second:?}"
    );
    let third = store.scrub_pass().expect("scrubs");
    assert_eq!(
        third.blocks_bad, second.blocks_bad,
        "nothing bad is left: {third:?}"
    );
    // A disk replaced: volume 3 comes back empty, with a new id.
    drop(store);
    for file in files(&disk, Path::new("/volumes/3")) {
        disk.remove_file(&file).expect("removes");
    }
    let store = open(&disk, VOLUMES);
    let healed = store.scrub_pass().expect("scrubs");
    assert!(
        healed.degraded.is_empty() && healed.lost.is_empty(),
        "{healed:?}"
    );
    // Now any two other volumes may go: redundancy is whole again.
    drop(store);
    for volume in [0, 5] {
        for file in files(&disk, &PathBuf::from(format!("/volumes/{volume}/objects"))) {
            disk.remove_file(&file).expect("removes");
        }
    }
    let store = open(&disk, VOLUMES);
    for i in 0..8u64 {
        assert_eq!(
            get(&store, "city", &format!("o{i}")).expect("reads"),
            body(i, 30_000 + i as usize * 1000)
        );
    }
    let status = store.status().expect("status");
    assert_eq!((status.objects, status.buckets), (8, 1));
}

#[test]
fn a_rotated_master_key_rewraps_every_data_key_and_the_old_one_is_forgotten() {
    let disk = SimDisk::new();
    let store = open(&disk, 3);
    store.create_bucket("city").expect("creates");
    // More records than one re-wrap batch.
    for i in 0..300u64 {
        put(
            &store,
            "city",
            &format!("o{i:03}"),
            &body(i, 100 + i as usize),
        );
    }
    let upload = store
        .create_upload("city", "pending", ObjectMeta::default())
        .expect("creates");
    let mut part = store.put_part(&upload, 1, 10).expect("starts");
    part.write(&[1; 10]).expect("writes");
    part.finish().expect("commits");
    let (key, secret) = store
        .create_access_key(&["city".into()], "")
        .expect("creates");
    let old_keys = disk::Disk::read(&disk, Path::new("/data/store/master.keys")).expect("reads");
    let rotation = store.rotate_master_key().expect("rotates");
    assert_eq!(rotation.generation, 2);
    assert_eq!(rotation.generations_retired, [1]);
    // 300 objects (a part key and a metadata key each), the upload's part and metadata,
    // and the access key.
    assert_eq!(rotation.keys_rewrapped, 300 * 2 + 2 + 1);
    let new_keys = disk::Disk::read(&disk, Path::new("/data/store/master.keys")).expect("reads");
    assert_ne!(old_keys, new_keys);
    assert!(
        String::from_utf8_lossy(&new_keys).starts_with("2 "),
        "only generation 2 is kept"
    );
    drop(store);
    let store = open(&disk, 3);
    for i in [0u64, 150, 299] {
        assert_eq!(
            get(&store, "city", &format!("o{i:03}")).expect("reads"),
            body(i, 100 + i as usize)
        );
    }
    assert_eq!(store.parts(&upload).expect("lists").1.len(), 1);
    assert_eq!(
        store.access_key(&key.id).expect("reads").expect("exists").1,
        secret
    );
}

#[test]
fn a_full_disk_refuses_the_write_and_damages_nothing() {
    let disk = SimDisk::new();
    let store = open(&disk, VOLUMES);
    store.create_bucket("city").expect("creates");
    put(&store, "city", "kept", &body(1, 40_000));
    let used = disk.used_bytes();
    disk.set_capacity(Some(used + 20_000));
    let bytes = body(2, 200_000);
    let mut writer = store
        .put("city", "big", bytes.len() as u64, ObjectMeta::default())
        .expect("starts");
    let failed = writer
        .write(&bytes)
        .and_then(|()| writer.finish().map(drop));
    assert!(matches!(failed, Err(StoreError::Full(_))), "{failed:?}");
    assert_eq!(get(&store, "city", "kept").expect("reads"), body(1, 40_000));
    assert!(matches!(
        get(&store, "city", "big"),
        Err(StoreError::NoSuchKey { .. })
    ));
    disk.set_capacity(None);
    put(&store, "city", "big", &bytes);
    assert_eq!(get(&store, "city", "big").expect("reads"), bytes);
    let (orphans, garbage) = store.leftovers().expect("lists");
    assert!(orphans.is_empty() && garbage == 0, "{orphans:?}");
}

fn limits() -> store::engine::KvLimits {
    store::engine::KvLimits {
        key_bytes_max: 64,
        value_bytes_max: 1024,
        total_bytes_max: 8 * 1024,
    }
}

#[test]
fn key_value_buckets_store_list_count_and_keep_their_limits() {
    use store::engine::KvError;
    let disk = SimDisk::new();
    let store = open(&disk, 3);
    assert_eq!(
        store.kv_get("permits", "bookings", "a").expect("gets"),
        None
    );
    store
        .kv_set(
            "permits",
            "bookings",
            "slot-09:00",
            b"Kim".to_vec(),
            limits(),
        )
        .expect("sets");
    store
        .kv_set(
            "permits",
            "bookings",
            "slot-10:00",
            b"Lee".to_vec(),
            limits(),
        )
        .expect("sets");
    store
        .kv_set(
            "other-app",
            "bookings",
            "slot-09:00",
            b"not yours".to_vec(),
            limits(),
        )
        .expect("sets");
    assert_eq!(
        store
            .kv_get("permits", "bookings", "slot-09:00")
            .expect("gets")
            .as_deref(),
        Some(&b"Kim"[..])
    );
    assert!(
        store
            .kv_exists("permits", "bookings", "slot-10:00")
            .expect("checks")
    );
    assert_eq!(
        store.kv_list("permits", "bookings", None).expect("lists"),
        (
            vec!["slot-09:00".to_string(), "slot-10:00".to_string()],
            None
        ),
        "apps and buckets are apart"
    );
    assert_eq!(
        store
            .kv_increment("permits", "counters", "visits", 5, limits())
            .expect("counts"),
        5
    );
    assert_eq!(
        store
            .kv_increment("permits", "counters", "visits", 2, limits())
            .expect("counts"),
        7
    );
    assert!(matches!(
        store.kv_increment("permits", "bookings", "slot-09:00", 1, limits()),
        Err(KvError::NotANumber(_))
    ));
    assert!(matches!(
        store.kv_set("permits", "bookings", &"k".repeat(65), vec![], limits()),
        Err(KvError::KeyTooLong { .. })
    ));
    assert!(matches!(
        store.kv_set("permits", "bookings", "big", vec![0; 1025], limits()),
        Err(KvError::ValueTooLarge { .. })
    ));
    // A batch that would overfill the bucket stores none of its values.
    let batch: Vec<(String, Vec<u8>)> = (0..20).map(|i| (format!("b{i}"), vec![1; 1000])).collect();
    assert!(matches!(
        store.kv_set_many("permits", "bookings", &batch, limits()),
        Err(KvError::BucketFull { .. })
    ));
    assert!(
        !store
            .kv_exists("permits", "bookings", "b0")
            .expect("checks")
    );
    let used = store.kv_usage("permits", "bookings").expect("usage");
    store
        .kv_delete_many(
            "permits",
            "bookings",
            &["slot-10:00".into(), "never".into()],
        )
        .expect("deletes");
    assert!(store.kv_usage("permits", "bookings").expect("usage") < used);
    // Pages of keys.
    let many: Vec<(String, Vec<u8>)> = (0..2500).map(|i| (format!("k{i:05}"), vec![])).collect();
    let roomy = store::engine::KvLimits {
        total_bytes_max: 1 << 20,
        ..limits()
    };
    store
        .kv_set_many("permits", "big", &many, roomy)
        .expect("sets");
    let (first, cursor) = store.kv_list("permits", "big", None).expect("lists");
    assert_eq!((first.len(), cursor), (1000, Some(1000)));
    let (_, cursor) = store.kv_list("permits", "big", cursor).expect("lists");
    let (last, end) = store.kv_list("permits", "big", cursor).expect("lists");
    assert_eq!(
        (last.len(), end, last.last().map(String::as_str)),
        (500, None, Some("k02499"))
    );
    // Survives a reopen and a key rotation; values are not on disk in plaintext.
    store.rotate_master_key().expect("rotates");
    drop(store);
    let store = open(&disk, 3);
    assert_eq!(
        store
            .kv_get("permits", "bookings", "slot-09:00")
            .expect("gets")
            .as_deref(),
        Some(&b"Kim"[..])
    );
    for path in files(&disk, Path::new("/")) {
        let bytes = disk::Disk::read(&disk, &path).expect("reads");
        assert!(
            !bytes.windows(9).any(|w| w == b"not yours"),
            "{} holds a value in plaintext",
            path.display()
        );
    }
}

/// Key-value writes under power cuts: a returned write is there after the power comes back.
#[test]
fn key_value_writes_survive_power_cuts() {
    for seed in 0..200u64 {
        let disk = SimDisk::new();
        let mut rng = Rng::new(seed);
        let mut acknowledged = 0u64;
        {
            let store = open(&disk, 3);
            disk.crash_after(rng.below(300));
            for n in 1..=20u64 {
                match store.kv_set(
                    "app",
                    "b",
                    &format!("k{n}"),
                    n.to_string().into_bytes(),
                    limits(),
                ) {
                    Ok(()) => acknowledged = n,
                    Err(_) => break,
                }
            }
            disk.power_off();
        }
        disk.power_cut(&mut rng);
        let store = open(&disk, 3);
        for n in 1..=acknowledged {
            assert_eq!(
                store.kv_get("app", "b", &format!("k{n}")).expect("gets"),
                Some(n.to_string().into_bytes()),
                "seed {seed}: acknowledged k{n} lost"
            );
        }
    }
}
