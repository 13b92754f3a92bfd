//! Consumer groups' committed offsets: one small file per group in `groups/`, written with
//! [`disk::write_atomically`] (a temporary file of its own per write, so two groups
//! committing at once can never install each other's offset).
//!
//! A file is two lines: the offset, then the BLAKE3 hash of `group NAME offset N`. The hash
//! binds the offset to the group, so a file that ended up under another group's name is
//! refused rather than read as that group's position. Files from before the group was
//! bound (the hash of the offset alone) are still read, and rewritten at the next commit.

use std::collections::BTreeMap;
use std::path::Path;

use disk::Env;

use super::io_message;

/// A consumer group name: at most this many bytes of `[a-z0-9._-]`.
const GROUP_NAME_BYTES_MAX: usize = 128;

pub(crate) fn check_group_name(group: &str) -> Result<(), String> {
    if group.is_empty()
        || group.len() > GROUP_NAME_BYTES_MAX
        || !group
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        || group.starts_with('.')
    {
        return Err(format!(
            "consumer group {group:?} is not a valid name: use 1 to {GROUP_NAME_BYTES_MAX} of a-z, 0-9, '.', '_' and '-', not starting with '.'"
        ));
    }
    Ok(())
}

fn bound_sum(group: &str, offset: u64) -> String {
    blake3::hash(format!("group {group} offset {offset}").as_bytes()).to_string()
}

/// The file's text for `group` at `offset`.
pub(super) fn encode(group: &str, offset: u64) -> String {
    format!("{offset}\n{}\n", bound_sum(group, offset))
}

/// The offset a group's file holds, if the file is whole and belongs to `group`.
pub(super) fn decode(group: &str, text: &str) -> Option<u64> {
    let mut lines = text.lines();
    let (offset, sum, rest) = (lines.next()?, lines.next()?, lines.next());
    let offset: u64 = offset.parse().ok()?;
    if rest.is_some() || offset.to_string() != text.lines().next()? {
        return None;
    }
    let legacy = blake3::hash(offset.to_string().as_bytes()).to_string();
    (sum == bound_sum(group, offset) || sum == legacy).then_some(offset)
}

/// Every group's committed offset, after deleting temporary files of interrupted commits.
pub(super) fn read_groups(env: &Env, dir: &Path) -> Result<BTreeMap<String, u64>, String> {
    disk::create_dir_all(env.disk.as_ref(), dir).map_err(|e| e.to_string())?;
    disk::remove_temporaries(env.disk.as_ref(), dir).map_err(|e| e.to_string())?;
    let mut groups = BTreeMap::new();
    for name in env.disk.list(dir).map_err(|e| io_message("list", dir, e))? {
        if check_group_name(&name).is_err() {
            continue;
        }
        let path = dir.join(&name);
        let bytes = env
            .disk
            .read(&path)
            .map_err(|e| io_message("read", &path, e))?;
        let offset = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| decode(&name, text));
        match offset {
            Some(offset) => {
                groups.insert(name, offset);
            }
            None => {
                return Err(format!(
                    "{} fails its checksum (or belongs to another group); delete it to restart the group from the oldest event",
                    path.display()
                ));
            }
        }
    }
    Ok(groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_groups_file_reads_only_as_its_own_group() {
        let text = encode("loops", 17);
        assert_eq!(decode("loops", &text), Some(17));
        assert_eq!(decode("signals", &text), None, "another group's file");
        assert_eq!(decode("loops", &text.replace("17", "18")), None);
        assert_eq!(decode("loops", "17\n"), None);
        assert_eq!(decode("loops", &format!("{text}extra\n")), None);
        let legacy = format!("17\n{}\n", blake3::hash(b"17"));
        assert_eq!(
            decode("loops", &legacy),
            Some(17),
            "files from before are read"
        );
    }
}
