//! `maru store`: the object store's status, access keys and scrub.

use maru_api::{AccessKeyInfo, CreateKeyRequest, KeyRotation, StoreStatus};

use crate::Target;
use crate::client::{Client, print_json};

fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub fn status(target: &Target) -> anyhow::Result<()> {
    let status: StoreStatus = Client::new(target)?.get("store status", "/v1/store/status")?;
    if target.json {
        return print_json(&status);
    }
    print_status(&status);
    Ok(())
}

fn print_status(status: &StoreStatus) {
    println!(
        "S3 endpoint {}   profile {} (survives {} lost volume{})",
        status.endpoint,
        status.profile,
        status.tolerates_volume_losses,
        if status.tolerates_volume_losses == 1 {
            ""
        } else {
            "s"
        }
    );
    println!(
        "{} bucket(s), {} object(s), {} stored; {} upload(s) in progress",
        status.buckets,
        status.objects,
        size(status.bytes),
        status.uploads_in_progress
    );
    println!();
    println!("{:<50} {:<18} {:>12}  STATE", "VOLUME", "ID", "SHARD FILES");
    for volume in &status.volumes {
        println!(
            "{:<50} {:<18} {:>12}  {}",
            volume.path,
            volume.id.as_deref().unwrap_or("-"),
            volume.shard_files,
            volume.state
        );
    }
    let scrub = &status.scrub;
    println!();
    if scrub.running {
        let share = if scrub.objects_total > 0 {
            100.0 * scrub.objects_checked as f64 / scrub.objects_total as f64
        } else {
            100.0
        };
        println!(
            "scrub: pass {} running, {}/{} objects ({share:.0} %), {} verified at {}/s",
            scrub.passes + 1,
            scrub.objects_checked,
            scrub.objects_total,
            size(scrub.bytes_verified),
            size(scrub.bytes_per_second as u64)
        );
    } else {
        println!(
            "scrub: {} pass(es) done{}",
            scrub.passes,
            if scrub.passes > 0 {
                format!(", the last verified {}", size(scrub.bytes_verified))
            } else {
                String::new()
            }
        );
    }
    println!(
        "heal: {} bad block(s) found, {} rewritten ({} part(s) healed); {} object(s) degraded, {} lost",
        scrub.blocks_bad,
        scrub.blocks_healed,
        scrub.parts_healed,
        scrub.degraded.len(),
        scrub.lost.len()
    );
    for name in &scrub.degraded {
        println!("  degraded: {name}");
    }
    for name in &scrub.lost {
        println!("  LOST: {name} (more volumes failed than its profile survives)");
    }
}

pub fn scrub(target: &Target) -> anyhow::Result<()> {
    let status: StoreStatus =
        Client::new(target)?.post("scrub", "/v1/store/scrub", &serde_json::json!({}))?;
    if target.json {
        return print_json(&status);
    }
    print_status(&status);
    Ok(())
}

pub fn create_key(
    target: &Target,
    buckets: Vec<String>,
    description: String,
) -> anyhow::Result<()> {
    let key: AccessKeyInfo = Client::new(target)?.post(
        "create access key",
        "/v1/store/keys",
        &CreateKeyRequest {
            buckets,
            description,
        },
    )?;
    if target.json {
        return print_json(&key);
    }
    println!("access key  {}", key.access_key);
    println!("secret      {}", key.secret.as_deref().unwrap_or("?"));
    println!("buckets     {}", key.buckets.join(", "));
    println!();
    println!("The secret is shown only now; keep it somewhere safe. To use the key:");
    println!(
        "  export AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY=<secret>",
        key.access_key
    );
    Ok(())
}

pub fn list_keys(target: &Target) -> anyhow::Result<()> {
    let keys: Vec<AccessKeyInfo> =
        Client::new(target)?.get("list access keys", "/v1/store/keys")?;
    if target.json {
        return print_json(&keys);
    }
    if keys.is_empty() {
        println!("no access keys; create one with `maru store keys create --bucket NAME`");
        return Ok(());
    }
    println!("{:<22} {:<30} DESCRIPTION", "ACCESS KEY", "BUCKETS");
    for key in keys {
        println!(
            "{:<22} {:<30} {}",
            key.access_key,
            key.buckets.join(","),
            key.description
        );
    }
    Ok(())
}

pub fn revoke_key(target: &Target, id: &str) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let () = client.finish(
        "revoke access key",
        client
            .agent
            .delete(client.url(&format!("/v1/store/keys/{id}")))
            .header("Authorization", client.auth())
            .call(),
    )?;
    if target.json {
        return print_json(&serde_json::json!({ "revoked": id }));
    }
    println!("{id}: revoked");
    Ok(())
}

pub fn rotate_key(target: &Target) -> anyhow::Result<()> {
    let rotation: KeyRotation = Client::new(target)?.post(
        "rotate the master key",
        "/v1/store/rotate-key",
        &serde_json::json!({}),
    )?;
    if target.json {
        return print_json(&rotation);
    }
    println!(
        "master key generation {} now wraps every data key ({} re-wrapped; retired generation(s): {})",
        rotation.generation,
        rotation.keys_rewrapped,
        if rotation.generations_retired.is_empty() {
            "none".to_string()
        } else {
            rotation
                .generations_retired
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    println!(
        "Keep a copy of the new DATA/store/master.keys apart from the volumes: without it nothing can be read."
    );
    Ok(())
}
