//! `maru audit`: read the node's audit log, export signed checkpoints, verify the chain.

use std::path::PathBuf;

use maru_api::{AuditCheckpoint, AuditEntries, AuditEntry};

use crate::Target;
use crate::client::{Client, print_json};

/// What `maru audit search` filters on.
#[derive(Debug, Default, clap::Args)]
pub struct Filters {
    /// An actor (`operator:ana`), or a prefix ending in `:` (`token:`).
    #[arg(long)]
    actor: Option<String>,
    /// An action (`apps.deploy`), or a prefix ending in `.` (`store.`).
    #[arg(long)]
    action: Option<String>,
    /// A resource (`app/traffic`), or a prefix ending in `/` (`app/`).
    #[arg(long)]
    resource: Option<String>,
    /// `allow`, `deny` or `note`.
    #[arg(long)]
    decision: Option<String>,
    /// Only entries after this number.
    #[arg(long, default_value_t = 0)]
    after: u64,
}

/// `YYYY-MM-DD HH:MM:SS.mmm` UTC.
pub(crate) fn utc(unix_ms: u64) -> String {
    gateway::rfc3339(unix_ms)
        .replacen('T', " ", 1)
        .trim_end_matches('Z')
        .to_string()
}

fn print_entries(entries: &[AuditEntry]) {
    println!(
        "{:>8}  {:<23}  {:<5}  {:<43} {:<20} {:<24} REASON",
        "SEQ", "TIME (UTC)", "", "ACTOR", "ACTION", "RESOURCE"
    );
    for e in entries {
        println!(
            "{:>8}  {:<23}  {:<5}  {:<43} {:<20} {:<24} {}{}",
            e.seq,
            utc(e.unix_ms),
            e.decision,
            e.actor,
            e.action,
            e.resource,
            e.reason,
            e.address
                .as_deref()
                .map(|a| format!(" (from {a})"))
                .unwrap_or_default()
        );
    }
}

fn query(filters: &Filters, limit: usize) -> String {
    let mut query = format!("/v1/audit?limit={limit}&after={}", filters.after);
    for (name, value) in [
        ("actor", &filters.actor),
        ("action", &filters.action),
        ("resource", &filters.resource),
        ("decision", &filters.decision),
    ] {
        if let Some(value) = value {
            query.push_str(&format!("&{name}={}", encode(value)));
        }
    }
    query
}

/// Percent-encode a query value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `maru audit tail` and `maru audit search`: the newest `count` entries that match.
pub fn search(target: &Target, filters: &Filters, count: usize) -> anyhow::Result<()> {
    let found: AuditEntries =
        Client::new(target)?.get("read the audit log", &query(filters, count))?;
    if target.json {
        return print_json(&found.entries);
    }
    print_entries(&found.entries);
    Ok(())
}

/// `maru audit checkpoint`: the newest entry, signed by the node.
pub fn checkpoint(target: &Target) -> anyhow::Result<()> {
    let checkpoint: AuditCheckpoint =
        Client::new(target)?.get("sign an audit checkpoint", "/v1/audit/checkpoint")?;
    // JSON either way: it is meant to be saved and given back to `verify --checkpoint`.
    print_json(&checkpoint)
}

/// `maru audit verify`: walk the log in the data directory (the node may be running).
pub fn verify(target: &Target, checkpoints: &[PathBuf]) -> anyhow::Result<()> {
    let dir = target.data.join("audit");
    if !dir.exists() {
        anyhow::bail!(
            "no audit log in {}: give the node's data directory with --data or MARU_DATA",
            dir.display()
        );
    }
    let mut exported = Vec::new();
    for path in checkpoints {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("read checkpoint {}: {e}", path.display()))?;
        let checkpoint: policy::audit::Checkpoint = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a checkpoint from `maru audit checkpoint`: {e}",
                path.display()
            )
        })?;
        exported.push(checkpoint);
    }
    let env = disk::Env::os();
    let key = std::fs::read(dir.join("signing.key"))
        .ok()
        .and_then(|bytes| policy::audit::checkpoint::Signer::from_pkcs8(&bytes).ok())
        .map(|signer| signer.public_key());
    let report = policy::audit::verify(&env, &dir, &exported, key.as_deref())
        .map_err(|e| anyhow::anyhow!("verify {}: {e}", dir.display()))?;
    if target.json {
        print_json(&report)?;
    } else {
        println!(
            "{} entries in {} segment(s), {}..{}; {} checkpoint(s) checked",
            report.entries,
            report.segments,
            report.first_seq.map_or("-".into(), |s| s.to_string()),
            report.last_seq.map_or("-".into(), |s| s.to_string()),
            report.checkpoints_checked
        );
        for resumed in &report.resumed {
            println!(
                "recorded crash: {} bytes after entry {} ({} at offset {}) were not a whole entry; kept, and the log resumed after them",
                resumed.bytes, resumed.after_seq, resumed.segment, resumed.offset
            );
        }
        if report.incomplete_tail_bytes > 0 {
            println!(
                "the newest segment ends in {} bytes that are not yet a whole entry (a write in progress, or cut short by a crash: the next start records it)",
                report.incomplete_tail_bytes
            );
        }
        match &report.problem {
            None => println!("ok: the chain is intact"),
            Some(problem) => println!(
                "TAMPERED ({:?}){}: {}",
                problem.kind,
                match (&problem.segment, problem.offset) {
                    (Some(segment), Some(offset)) => format!(" in {segment} at byte {offset}"),
                    _ => String::new(),
                },
                problem.message
            ),
        }
    }
    match report.problem {
        None => Ok(()),
        Some(problem) => Err(anyhow::anyhow!(
            "the audit log fails verification: {}",
            problem.message
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_796_299_200_123), "2026-12-03 12:00:00.123");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00.000");
    }
}
