//! The control API's store routes: status, access keys, a scrub pass on demand.

use std::sync::Arc;

use maru_api::{AccessKeyInfo, CreateKeyRequest, KeyRotation, ScrubInfo, StoreStatus, VolumeInfo};
use store::{Store, StoreError};

use crate::node::ControlError;

fn control_error(error: StoreError) -> ControlError {
    match error {
        StoreError::BadAccessKey(_) | StoreError::BadBucketName(_) => ControlError::BadRequest {
            message: error.to_string(),
            hint: Some("`maru store keys list` shows the keys".into()),
        },
        other => ControlError::Internal(other.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ControlError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ControlError::Internal(format!("a store task failed: {e}")))?
        .map_err(control_error)
}

fn key_info(key: store::engine::AccessKey, secret: Option<String>) -> AccessKeyInfo {
    AccessKeyInfo {
        access_key: key.id,
        secret,
        buckets: key.buckets,
        created_unix_ms: key.created_ms,
        description: key.description,
    }
}

pub async fn create_key(
    store: Arc<Store>,
    request: CreateKeyRequest,
) -> Result<AccessKeyInfo, ControlError> {
    let (key, secret) =
        blocking(move || store.create_access_key(&request.buckets, &request.description)).await?;
    Ok(key_info(key, Some(secret)))
}

pub async fn list_keys(store: Arc<Store>) -> Result<Vec<AccessKeyInfo>, ControlError> {
    let keys = blocking(move || store.access_keys()).await?;
    Ok(keys.into_iter().map(|k| key_info(k, None)).collect())
}

pub async fn revoke_key(store: Arc<Store>, id: String) -> Result<(), ControlError> {
    blocking(move || store.revoke_access_key(&id)).await
}

pub async fn scrub(store: Arc<Store>, endpoint: String) -> Result<StoreStatus, ControlError> {
    let worker = store.clone();
    blocking(move || worker.scrub_pass()).await?;
    status(store, endpoint).await
}

pub async fn status(store: Arc<Store>, endpoint: String) -> Result<StoreStatus, ControlError> {
    let status = blocking(move || store.status()).await?;
    let scrub = status.scrub;
    let name = |(bucket, key): &(String, String)| format!("{bucket}/{key}");
    Ok(StoreStatus {
        endpoint,
        profile: status.profile.to_string(),
        tolerates_volume_losses: status.profile.parity(),
        volumes: status
            .volumes
            .into_iter()
            .map(|v| VolumeInfo {
                path: v.path.display().to_string(),
                id: v.id,
                state: v.problem.unwrap_or_else(|| "online".into()),
                shard_files: v.shard_files,
            })
            .collect(),
        buckets: status.buckets,
        objects: status.objects,
        bytes: status.bytes,
        uploads_in_progress: status.uploads_in_progress,
        scrub: ScrubInfo {
            passes: scrub.passes,
            running: scrub.pass_started_ms.is_some(),
            objects_checked: scrub.objects_checked,
            objects_total: scrub.objects_total,
            bytes_verified: scrub.bytes_verified,
            bytes_per_second: scrub.bytes_per_second,
            last_pass_finished_unix_ms: scrub.last_pass_finished_ms,
            blocks_bad: scrub.blocks_bad,
            blocks_healed: scrub.blocks_healed,
            parts_healed: scrub.parts_healed,
            degraded: scrub.degraded.iter().map(name).collect(),
            lost: scrub.lost.iter().map(name).collect(),
        },
        bytes_written: status.bytes_written,
        bytes_read: status.bytes_read,
    })
}

pub async fn rotate_key(store: Arc<Store>) -> Result<KeyRotation, ControlError> {
    let rotation = blocking(move || store.rotate_master_key()).await?;
    Ok(KeyRotation {
        generation: rotation.generation,
        keys_rewrapped: rotation.keys_rewrapped,
        generations_retired: rotation.generations_retired,
    })
}
