//! Scrub and heal: every block of every object is read back and verified, at a bounded
//! rate; a part with missing or damaged shards has them rebuilt from the others and
//! written again whole (under a temporary name, synced, renamed into place), on the same
//! volume if it is still there, else on a volume the part does not use yet (a replaced
//! disk), whose id the record then names.

use super::*;

/// What the scrub and heal have done since the store opened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScrubState {
    /// Full passes finished.
    pub passes: u64,
    pub pass_started_ms: Option<u64>,
    pub last_pass_finished_ms: Option<u64>,
    /// The last object the current pass checked.
    pub cursor: Option<(String, String)>,
    pub objects_checked: u64,
    pub objects_total: u64,
    pub bytes_verified: u64,
    /// Blocks found missing or damaged.
    pub blocks_bad: u64,
    pub blocks_healed: u64,
    pub parts_healed: u64,
    /// The background scrub's recent rate.
    pub bytes_per_second: f64,
    /// Objects with a shard that could not be rebuilt or placed yet.
    pub degraded: BTreeSet<(String, String)>,
    /// Objects with a stripe that lost more shards than its profile survives.
    pub lost: BTreeSet<(String, String)>,
}

/// What checking one object found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Intact,
    /// Damage was found and every shard rebuilt.
    Healed,
    /// Some shards could not be rebuilt now (no volume to put them on).
    Degraded,
    /// A stripe has too few good shards.
    Lost,
}

/// Objects the degraded and lost lists keep at most (the counts go on).
const LISTED_MAX: usize = 1000;

impl Store {
    pub fn scrub_state(&self) -> ScrubState {
        self.scrub
            .lock()
            .expect("the scrub lock is never poisoned")
            .clone()
    }

    /// Check objects, from where the last call stopped, until about `budget` bytes of
    /// blocks were read; heal what is damaged. Returns the bytes read (0 when a pass just
    /// ended).
    pub fn scrub_step(&self, budget: u64) -> Result<u64, StoreError> {
        let mut read = 0;
        // Objects a read found damaged come first.
        let suspects: Vec<(String, String)> = std::mem::take(
            &mut *self
                .suspects
                .lock()
                .expect("the suspects lock is never poisoned"),
        )
        .into_iter()
        .collect();
        for (bucket, key) in suspects {
            read += self.check_and_record(&bucket, &key)?.1;
        }
        while read < budget {
            let cursor = {
                let mut state = self.scrub.lock().expect("the scrub lock is never poisoned");
                if state.pass_started_ms.is_none() {
                    state.pass_started_ms = Some(self.now_ms());
                    state.objects_checked = 0;
                    state.bytes_verified = 0;
                    state.objects_total = self.object_count()?;
                    state.cursor = None;
                }
                state.cursor.clone()
            };
            let Some((bucket, key)) = self.object_after(cursor.as_ref())? else {
                let mut state = self.scrub.lock().expect("the scrub lock is never poisoned");
                state.passes += 1;
                state.pass_started_ms = None;
                state.last_pass_finished_ms = Some(self.now_ms());
                return Ok(read);
            };
            let (_, bytes) = self.check_and_record(&bucket, &key)?;
            read += bytes;
            let mut state = self.scrub.lock().expect("the scrub lock is never poisoned");
            state.cursor = Some((bucket, key));
            state.objects_checked += 1;
        }
        Ok(read)
    }

    /// Run a whole pass now, without a rate limit; returns the state after it.
    pub fn scrub_pass(&self) -> Result<ScrubState, StoreError> {
        let passes = self.scrub_state().passes;
        while self.scrub_state().passes == passes {
            self.scrub_step(u64::MAX)?;
        }
        Ok(self.scrub_state())
    }

    fn check_and_record(&self, bucket: &str, key: &str) -> Result<(Health, u64), StoreError> {
        let (health, bytes, bad, healed) = match self.check_object(bucket, key) {
            Ok(found) => found,
            Err(StoreError::NoSuchKey { .. } | StoreError::NoSuchBucket(_)) => {
                (Health::Intact, 0, 0, 0)
            }
            Err(error) => return Err(error),
        };
        let mut state = self.scrub.lock().expect("the scrub lock is never poisoned");
        state.bytes_verified += bytes;
        state.blocks_bad += bad;
        state.blocks_healed += healed;
        if health == Health::Healed {
            state.parts_healed += 1;
        }
        let name = (bucket.to_string(), key.to_string());
        state.degraded.remove(&name);
        state.lost.remove(&name);
        let list = match health {
            Health::Degraded => Some(&mut state.degraded),
            Health::Lost => Some(&mut state.lost),
            _ => None,
        };
        if let Some(list) = list
            && list.len() < LISTED_MAX
        {
            list.insert(name);
        }
        Ok((health, bytes))
    }

    fn object_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let objects = txn.open_table(OBJECTS).map_err(db_error)?;
        Ok(objects.iter().map_err(db_error)?.count() as u64)
    }

    fn object_after(
        &self,
        cursor: Option<&(String, String)>,
    ) -> Result<Option<(String, String)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let objects = txn.open_table(OBJECTS).map_err(db_error)?;
        let range = match cursor {
            Some((bucket, key)) => objects
                .range((bucket.as_str(), key.as_str())..)
                .map_err(db_error)?,
            None => objects.iter().map_err(db_error)?,
        };
        for entry in range {
            let (k, _) = entry.map_err(db_error)?;
            let (bucket, key) = k.value();
            if cursor.is_some_and(|(b, c)| b == bucket && c == key) {
                continue;
            }
            return Ok(Some((bucket.to_string(), key.to_string())));
        }
        Ok(None)
    }

    /// Verify every block of an object and heal what is missing or damaged. Returns what
    /// was found, the bytes read, the bad blocks and the blocks rewritten.
    pub fn check_object(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<(Health, u64, u64, u64), StoreError> {
        let record = self.record(bucket, key)?;
        let mut health = Health::Intact;
        let (mut bytes, mut bad_blocks, mut healed_blocks) = (0, 0, 0);
        for part in &record.parts {
            let mut open = self.open_part(part)?;
            let profile = part.profile();
            let geometry = part.geometry();
            let stripes = geometry.stripes(part.size);
            // Which shards have any bad block (a missing file counts for every stripe).
            let mut bad = vec![false; profile.shards()];
            for stripe in 0..stripes {
                for (shard, flag) in bad.iter_mut().enumerate() {
                    if open.block(self, shard, stripe).is_none() {
                        *flag = true;
                        bad_blocks += 1;
                    }
                    bytes += geometry.stored_block_bytes() as u64;
                }
            }
            if stripes == 0 {
                for (shard, flag) in bad.iter_mut().enumerate() {
                    open.block_header(self, shard);
                    *flag = open.readers[shard].as_ref().is_some_and(Option::is_none);
                }
            }
            if !bad.contains(&true) {
                continue;
            }
            let good: Vec<bool> = bad.iter().map(|b| !b).collect();
            if layout::plan_heal(profile, &good).is_err() {
                health = Health::Lost;
                continue;
            }
            match self.heal_part(bucket, key, part, &mut open, &bad)? {
                (true, blocks) => {
                    healed_blocks += blocks;
                    if health == Health::Intact {
                        health = Health::Healed;
                    }
                }
                (false, blocks) => {
                    healed_blocks += blocks;
                    if health != Health::Lost {
                        health = Health::Degraded;
                    }
                }
            }
        }
        self.counters
            .blocks_bad
            .fetch_add(bad_blocks, Ordering::Relaxed);
        self.counters
            .blocks_healed
            .fetch_add(healed_blocks, Ordering::Relaxed);
        Ok((health, bytes, bad_blocks, healed_blocks))
    }

    /// Rewrite the `bad` shards of `part`. Returns whether every one was rewritten, and the
    /// blocks written.
    fn heal_part(
        &self,
        bucket: &str,
        key: &str,
        part: &PartRecord,
        open: &mut OpenPart,
        bad: &[bool],
    ) -> Result<(bool, u64), StoreError> {
        let profile = part.profile();
        let geometry = part.geometry();
        // Where each bad shard goes: its own volume if that is there, else a free one.
        let mut volumes = part.volumes.clone();
        let mut used: BTreeSet<u64> = volumes
            .iter()
            .enumerate()
            .filter(|(i, _)| !bad[*i])
            .filter_map(|(_, v)| *v)
            .collect();
        let mut targets = Vec::new();
        for (shard, is_bad) in bad.iter().enumerate() {
            if !is_bad {
                continue;
            }
            let target = volumes[shard]
                .and_then(|id| self.volume_by_id(id))
                .or_else(|| {
                    self.volumes.iter().find(|v| {
                        v.problem.is_none() && v.id.is_some_and(|id| !used.contains(&id.0))
                    })
                });
            if let Some(volume) = target {
                let id = volume.id.expect("online volumes have ids").0;
                used.insert(id);
                volumes[shard] = Some(id);
                targets.push((shard, volume.root.clone()));
            }
        }
        let mut writers = Vec::new();
        for (shard, root) in &targets {
            let path = shard::path(root, open.version, *shard);
            let temporary = path.with_file_name(format!(
                "{}heal-{}",
                disk::TEMPORARY_PREFIX,
                path.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or_default()
            ));
            _ = self.disk().remove_file(&temporary);
            let header = Header {
                version: open.version,
                shard: *shard as u16,
                profile,
                block_bytes: part.block_bytes,
                size: part.size,
            };
            let writer =
                ShardWriter::create(self.disk(), temporary.clone(), header).map_err(shard_error)?;
            writers.push((*shard, temporary, path, writer));
        }
        let mut written = 0;
        for stripe in 0..geometry.stripes(part.size) {
            let mut blocks: Vec<Option<Vec<u8>>> = (0..profile.shards())
                .map(|shard| {
                    if bad[shard] {
                        None
                    } else {
                        open.block(self, shard, stripe)
                    }
                })
                .collect();
            if !open.codec.rebuild(&mut blocks) {
                return Ok((false, written));
            }
            for (shard, _, _, writer) in writers.iter_mut() {
                writer
                    .append(blocks[*shard].as_ref().expect("rebuilt"))
                    .map_err(shard_error)?;
                written += 1;
            }
        }
        let mut dirs = BTreeSet::new();
        for (_, temporary, path, writer) in writers {
            writer.finish().map_err(shard_error)?;
            self.disk()
                .rename(&temporary, &path)
                .map_err(|e| io_error(disk::Error::new("rename into place", &path, e)))?;
            dirs.insert(path.parent().expect("in a directory").to_path_buf());
        }
        for dir in dirs {
            self.disk()
                .sync_dir(&dir)
                .map_err(|e| io_error(disk::Error::new("sync", &dir, e)))?;
        }
        if volumes != part.volumes {
            self.move_shards(bucket, key, &part.version, &volumes)?;
        }
        Ok((targets.len() == bad.iter().filter(|b| **b).count(), written))
    }

    /// Record that the version's shards now live on `volumes`, if the object still is
    /// that version.
    fn move_shards(
        &self,
        bucket: &str,
        key: &str,
        version: &str,
        volumes: &[Option<u64>],
    ) -> Result<(), StoreError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut objects = txn.open_table(OBJECTS).map_err(db_error)?;
            let record = objects
                .get((bucket, key))
                .map_err(db_error)?
                .map(|r| decode::<ObjectRecord>(r.value()));
            if let Some(record) = record {
                let mut record = record.map_err(StoreError::Metadata)?;
                let mut changed = false;
                for part in record.parts.iter_mut().filter(|p| p.version == version) {
                    part.volumes = volumes.to_vec();
                    changed = true;
                }
                if changed {
                    objects
                        .insert((bucket, key), encode(&record).as_slice())
                        .map_err(db_error)?;
                }
            }
        }
        txn.commit().map_err(db_error)
    }
}

/// One volume as `maru store status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeStatus {
    pub path: PathBuf,
    pub id: Option<String>,
    /// `None` when the volume is usable.
    pub problem: Option<String>,
    pub shard_files: u64,
}

/// The store at a glance.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreStatus {
    pub profile: Profile,
    pub volumes: Vec<VolumeStatus>,
    pub buckets: u64,
    pub objects: u64,
    /// User bytes stored (what clients wrote).
    pub bytes: u64,
    pub uploads_in_progress: u64,
    pub scrub: ScrubState,
    pub bytes_written: u64,
    pub bytes_read: u64,
}

impl Store {
    pub fn status(&self) -> Result<StoreStatus, StoreError> {
        let volumes = self
            .volumes
            .iter()
            .map(|volume| {
                let objects = volume.root.join("objects");
                let shard_files = if volume.problem.is_none() {
                    self.disk()
                        .list(&objects)
                        .unwrap_or_default()
                        .iter()
                        .map(|fan| {
                            self.disk()
                                .list(&objects.join(fan))
                                .map(|n| n.len())
                                .unwrap_or(0) as u64
                        })
                        .sum()
                } else {
                    0
                };
                VolumeStatus {
                    path: volume.root.clone(),
                    id: volume.id.map(|id| format!("{:016x}", id.0)),
                    problem: volume.problem.clone(),
                    shard_files,
                }
            })
            .collect();
        let txn = self.db.begin_read().map_err(db_error)?;
        let (mut objects, mut bytes) = (0, 0);
        for entry in txn
            .open_table(OBJECTS)
            .map_err(db_error)?
            .iter()
            .map_err(db_error)?
        {
            let (_, record) = entry.map_err(db_error)?;
            let record: ObjectRecord = decode(record.value()).map_err(StoreError::Metadata)?;
            objects += 1;
            bytes += record.size;
        }
        let buckets = txn
            .open_table(BUCKETS)
            .map_err(db_error)?
            .iter()
            .map_err(db_error)?
            .count() as u64;
        let uploads = txn
            .open_table(UPLOADS)
            .map_err(db_error)?
            .iter()
            .map_err(db_error)?
            .count() as u64;
        Ok(StoreStatus {
            profile: self.profile,
            volumes,
            buckets,
            objects,
            bytes,
            uploads_in_progress: uploads,
            scrub: self.scrub_state(),
            bytes_written: self.counters.bytes_written.load(Ordering::Relaxed),
            bytes_read: self.counters.bytes_read.load(Ordering::Relaxed),
        })
    }
}

impl Store {
    fn note_rate(&self, bytes_per_second: f64) {
        self.scrub
            .lock()
            .expect("the scrub lock is never poisoned")
            .bytes_per_second = bytes_per_second;
    }
}

/// The background scrub: passes one after another, `interval` apart (from the start of one
/// to the start of the next), each reading at most `bytes_per_second`; until `stop`.
pub async fn run_scrub(
    store: Arc<Store>,
    bytes_per_second: u64,
    interval: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    use std::time::{Duration, Instant};
    let step = (bytes_per_second / 4).max(1 << 20);
    loop {
        let started = Instant::now();
        let passes = store.scrub_state().passes;
        let mut read: u64 = 0;
        while store.scrub_state().passes == passes {
            let worker = store.clone();
            let stepped = tokio::task::spawn_blocking(move || worker.scrub_step(step)).await;
            match stepped {
                Ok(Ok(bytes)) => read += bytes,
                Ok(Err(error)) => {
                    tracing::warn!(%error, "scrub step failed; trying again in a minute");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(60)) => {}
                    }
                }
                Err(_) => return,
            }
            let elapsed = started.elapsed().as_secs_f64().max(1e-3);
            store.note_rate(read as f64 / elapsed);
            // Hold the rate: wait until the bytes read are due.
            let due = Duration::from_secs_f64(read as f64 / bytes_per_second.max(1) as f64);
            let wait = due.saturating_sub(started.elapsed());
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        let state = store.scrub_state();
        if state.blocks_bad > 0 || !state.lost.is_empty() {
            tracing::info!(
                passes = state.passes,
                bad = state.blocks_bad,
                healed = state.blocks_healed,
                degraded = state.degraded.len(),
                lost = state.lost.len(),
                "scrub pass finished"
            );
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval.saturating_sub(started.elapsed())) => {}
        }
    }
}

/// What a master key rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    pub generation: u32,
    pub keys_rewrapped: u64,
    pub generations_retired: Vec<u32>,
}

/// Records re-wrapped per transaction during a rotation.
const REWRAP_BATCH: usize = 256;

impl Store {
    /// Make a new master key generation current and re-wrap every data key under it (the
    /// data itself is not rewritten), then forget the old generations. Safe to interrupt:
    /// a record is re-wrapped in one transaction, and old generations are dropped only once
    /// nothing names them.
    pub fn rotate_master_key(&self) -> Result<Rotation, StoreError> {
        let generation = self
            .masters
            .write()
            .expect("the keys lock is never poisoned")
            .add_generation(self.disk())?;
        let mut rewrapped = 0;
        rewrapped += rewrap_table!(
            self,
            OBJECTS,
            ObjectRecord,
            (String, String),
            |k| (k.0.to_string(), k.1.to_string()),
            |o| (o.0.as_str(), o.1.as_str()),
            |masters: &MasterKeys, record: &mut ObjectRecord| -> Result<u64, StoreError> {
                let mut count = 0;
                for part in &mut record.parts {
                    let version = part.version();
                    count += rewrap(masters, &mut part.key, version.bytes())?;
                }
                count += rewrap(
                    masters,
                    &mut record.meta.key,
                    record.meta.context.as_bytes(),
                )?;
                Ok(count)
            }
        );
        rewrapped += rewrap_table!(
            self,
            UPLOAD_PARTS,
            UploadPartRecord,
            (String, u32),
            |k| (k.0.to_string(), k.1),
            |o| (o.0.as_str(), o.1),
            |masters: &MasterKeys, record: &mut UploadPartRecord| -> Result<u64, StoreError> {
                let version = record.part.version();
                rewrap(masters, &mut record.part.key, version.bytes())
            }
        );
        rewrapped += rewrap_table!(
            self,
            UPLOADS,
            UploadRecord,
            String,
            |k| k.to_string(),
            |o| o.as_str(),
            |masters: &MasterKeys, record: &mut UploadRecord| -> Result<u64, StoreError> {
                rewrap(
                    masters,
                    &mut record.meta.key,
                    record.meta.context.as_bytes(),
                )
            }
        );
        rewrapped += rewrap_table!(
            self,
            ACCESS_KEYS,
            AccessKeyRecord,
            String,
            |k| k.to_string(),
            |o| o.as_str(),
            |masters: &MasterKeys, record: &mut AccessKeyRecord| -> Result<u64, StoreError> {
                rewrap(
                    masters,
                    &mut record.secret.key,
                    record.secret.context.as_bytes(),
                )
            }
        );
        rewrapped += self.rewrap_kv_key()?;
        let mut masters = self
            .masters
            .write()
            .expect("the keys lock is never poisoned");
        let before = masters.generations();
        masters.retire(self.disk(), &[])?;
        let after = masters.generations();
        Ok(Rotation {
            generation,
            keys_rewrapped: rewrapped,
            generations_retired: before.into_iter().filter(|g| !after.contains(g)).collect(),
        })
    }
}

/// Re-wrap the keys of every record of one table, a batch per transaction. `$owned` turns
/// a borrowed key into an owned one, `$borrow` the owned one back.
macro_rules! rewrap_table {
    ($store:expr, $table:expr, $record:ty, $owned_ty:ty, |$k:ident| $owned:expr, |$o:ident| $borrow:expr, $change:expr) => {{
        let store: &Store = $store;
        let mut total: u64 = 0;
        let mut after: Option<$owned_ty> = None;
        loop {
            let txn = store.db.begin_write().map_err(db_error)?;
            let (done, last) = {
                let mut open = txn.open_table($table).map_err(db_error)?;
                let mut batch = Vec::new();
                {
                    let range = match &after {
                        Some($o) => open.range($borrow..).map_err(db_error)?,
                        None => open.iter().map_err(db_error)?,
                    };
                    for entry in range {
                        let (key, value) = entry.map_err(db_error)?;
                        let $k = key.value();
                        let owned = $owned;
                        if after.as_ref() == Some(&owned) {
                            continue;
                        }
                        batch.push((owned, value.value().to_vec()));
                        if batch.len() == REWRAP_BATCH {
                            break;
                        }
                    }
                }
                let masters = store
                    .masters
                    .read()
                    .expect("the keys lock is never poisoned");
                for (owned, bytes) in &batch {
                    let mut record: $record = decode(bytes).map_err(StoreError::Metadata)?;
                    let changed: u64 = ($change)(&*masters, &mut record)?;
                    if changed > 0 {
                        let $o = owned;
                        open.insert($borrow, encode(&record).as_slice())
                            .map_err(db_error)?;
                        total += changed;
                    }
                }
                (batch.len() < REWRAP_BATCH, batch.pop().map(|(k, _)| k))
            };
            txn.commit().map_err(db_error)?;
            if done {
                break;
            }
            after = last;
        }
        total
    }};
}
use rewrap_table;

/// Re-wrap `key` under the current generation if it is wrapped by another; 1 if it was.
pub(super) fn rewrap(
    masters: &MasterKeys,
    key: &mut WrappedKey,
    context: &[u8],
) -> Result<u64, StoreError> {
    if key.master == masters.current().0 {
        return Ok(0);
    }
    let plain = key.unwrap(masters, context)?;
    *key = WrappedKey::wrap(&plain, masters, context)?;
    Ok(1)
}
