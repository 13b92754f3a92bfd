//! Opening a topic's segments after a stop, a crash or a power cut.
//!
//! The rules, each for a reason:
//! - **Nothing is destroyed.** Recovery never truncates or deletes: a stretch of bytes that
//!   is not a valid record may be a write cut short (never acknowledged, since answers wait
//!   for the sync) or an acknowledged record with a flipped bit, and the two can look alike.
//! - **Damage in the middle is skipped.** After an invalid record, scanning resumes at the
//!   next valid record whose offset fits (at most one offset per [`RECORD_BYTES_MIN`] bytes
//!   skipped), so one bad byte costs only the records it touched. The offsets in between
//!   are reported as lost.
//! - **An offset is never reused.** If the newest segment ends in invalid bytes, or a
//!   consumer group committed past the end of what survived, appends continue in a new
//!   segment at an offset past anything the old tail or the group can have named. CloudEvents
//!   ids are `topic:offset`, so a reused offset would make downstream de-duplication drop a
//!   new event.
//! - **What recovery accepts is made durable.** The newest segment (the only one that can
//!   hold unsynced writes) is synced and so is the directory, before any of it is served: records that were written but never synced (a
//!   process killed before its sync) would otherwise be served now and lost at the next
//!   power cut.

use std::collections::BTreeMap;
use std::io;
use std::ops::Range;
use std::path::Path;

use bytes::Bytes;
use disk::{Env, OpenMode};

use super::{Gap, INDEX_EVERY_BYTES, Segment, io_message, segment_path};
use crate::record::{self, Decoded, RECORD_BYTES_MIN};

/// What scanning one segment's bytes found.
#[derive(Debug, PartialEq)]
pub(super) struct Scan {
    /// Offset after the last valid record.
    pub end: u64,
    /// Position after the last valid record.
    pub valid_bytes: u64,
    pub newest_time_ms: u64,
    pub index: Vec<(u64, u64)>,
    pub gaps: Vec<Gap>,
    /// Bytes after the last valid record, and why they are not one.
    pub tail: Option<(u64, &'static str)>,
}

/// Scan a segment's bytes: the valid records, the damaged stretches between them, and an
/// invalid tail. Pure, so it is tested on bytes directly.
pub(super) fn scan(bytes: &Bytes, base: u64) -> Scan {
    let mut scan = Scan {
        end: base,
        valid_bytes: 0,
        newest_time_ms: 0,
        index: Vec::new(),
        gaps: Vec::new(),
        tail: None,
    };
    let mut position = 0usize;
    let mut last_indexed: Option<usize> = None;
    while position < bytes.len() {
        let why = match record::decode(&bytes.slice(position..)) {
            Decoded::Record { event, len } if event.offset == scan.end => {
                if last_indexed.is_none_or(|at| position - at >= INDEX_EVERY_BYTES as usize) {
                    scan.index.push((event.offset, position as u64));
                    last_indexed = Some(position);
                }
                scan.newest_time_ms = scan.newest_time_ms.max(event.time_ms);
                scan.end += 1;
                position += len;
                scan.valid_bytes = position as u64;
                continue;
            }
            Decoded::Record { .. } => "offsets out of sequence",
            Decoded::Incomplete => "a record cut short",
            Decoded::Corrupt(why) => why,
        };
        match resync(bytes, position, scan.end) {
            Some((resume, offset)) => {
                scan.gaps.push(Gap {
                    at: position as u64,
                    resume: resume as u64,
                    lost: scan.end..offset,
                    why,
                });
                // Readers jump from the gap straight to the record after it.
                scan.index.push((offset, resume as u64));
                last_indexed = Some(resume);
                scan.end = offset;
                position = resume;
            }
            None => {
                scan.tail = Some(((bytes.len() - position) as u64, why));
                break;
            }
        }
    }
    debug_assert!(
        scan.index
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
    );
    scan
}

/// The first valid record after the damage at `from`, and its offset. Its offset must be
/// past `expected` (the damaged record's) and no further than the skipped bytes could hold.
fn resync(bytes: &Bytes, from: usize, expected: u64) -> Option<(usize, u64)> {
    for at in from + 1..bytes.len() {
        let Some((len, offset)) = record::peek(&bytes[at..]) else {
            continue;
        };
        let most = expected + ((at - from) / RECORD_BYTES_MIN) as u64;
        if offset <= expected || offset > most || at + record::HEADER_BYTES + len > bytes.len() {
            continue;
        }
        if let Decoded::Record { event, .. } = record::decode(&bytes.slice(at..))
            && event.offset == offset
        {
            return Some((at, offset));
        }
    }
    None
}

/// The recovered log.
pub(super) struct Recovered {
    pub segments: Vec<Segment>,
    /// Offsets that cannot be read, merged and ascending.
    pub lost: Vec<Range<u64>>,
}

fn list_bases(env: &Env, dir: &Path) -> Result<Vec<u64>, String> {
    let names = env.disk.list(dir).map_err(|e| io_message("list", dir, e))?;
    let mut bases: Vec<u64> = names
        .iter()
        .filter_map(|name| name.strip_suffix(".log")?.parse().ok())
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

/// Open a scanned segment for reading; the newest one is synced first.
fn open_segment(
    env: &Env,
    path: &Path,
    base: u64,
    scan: &Scan,
    newest: bool,
) -> Result<Segment, String> {
    let file = env
        .disk
        .open(path, OpenMode::Read)
        .map_err(|e| io_message("open", path, e))?;
    // Synced before anything in it is served (see the module's rules). Only the newest
    // segment can hold writes that were never synced: every other one was synced before
    // the segment after it was created, by a roll or by the recovery that sealed it.
    if newest {
        file.sync().map_err(|e| io_message("sync", path, e))?;
    }
    Ok(Segment {
        base,
        path: path.to_path_buf(),
        file,
        end: scan.end,
        durable_bytes: scan.valid_bytes,
        newest_time_ms: scan.newest_time_ms,
        index: scan.index.clone(),
        gaps: scan.gaps.clone(),
    })
}

/// Create an empty segment at `base` and make it durable.
pub(super) fn create_segment(env: &Env, dir: &Path, base: u64) -> Result<Segment, String> {
    let path = segment_path(dir, base);
    let file = match env.disk.open(&path, OpenMode::CreateNew) {
        Ok(file) => file,
        // An earlier attempt created it and stopped before the directory sync.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => env
            .disk
            .open(&path, OpenMode::Append)
            .map_err(|e| io_message("open segment", &path, e))?,
        Err(e) => return Err(io_message("create segment", &path, e)),
    };
    let len = file.size().map_err(|e| io_message("stat", &path, e))?;
    if len != 0 {
        return Err(format!(
            "{} already holds {len} bytes; move it aside after checking what it is",
            path.display()
        ));
    }
    file.sync().map_err(|e| io_message("sync", &path, e))?;
    env.disk
        .sync_dir(dir)
        .map_err(|e| io_message("sync", dir, e))?;
    Ok(Segment {
        base,
        path,
        file,
        end: base,
        durable_bytes: 0,
        newest_time_ms: 0,
        index: Vec::new(),
        gaps: Vec::new(),
    })
}

/// Open the segments in `dir` under the module's rules. `committed` holds the consumer
/// groups' committed offsets: appends continue past every one of them.
pub(super) fn recover(
    env: &Env,
    name: &str,
    dir: &Path,
    committed: &BTreeMap<String, u64>,
) -> Result<Recovered, String> {
    let bases = list_bases(env, dir)?;
    let mut lost = Vec::new();
    let mut segments: Vec<Segment> = Vec::with_capacity(bases.len() + 1);
    let mut newest_tail = None;
    for (i, base) in bases.iter().enumerate() {
        let path = segment_path(dir, *base);
        let bytes = Bytes::from(
            env.disk
                .read(&path)
                .map_err(|e| io_message("read segment", &path, e))?,
        );
        let scan = scan(&bytes, *base);
        for gap in &scan.gaps {
            tracing::error!(topic = name, segment = %path.display(), lost = ?gap.lost, why = gap.why, "damaged records are skipped");
            lost.push(gap.lost.clone());
        }
        if let Some(previous) = segments.last()
            && previous.end > *base
        {
            return Err(format!(
                "segments {} and {} overlap; move one aside after checking which is right",
                previous.path.display(),
                path.display()
            ));
        }
        match (scan.tail, bases.get(i + 1)) {
            (Some((bytes, why)), Some(next_base)) => {
                tracing::error!(topic = name, segment = %path.display(), bytes, why, lost = ?(scan.end..*next_base), "a sealed segment ends in damage");
                lost.push(scan.end..*next_base);
            }
            (Some((bytes, why)), None) => newest_tail = Some((bytes, why)),
            // Offsets skipped when an earlier recovery or repair started a new segment
            // (empty when the next segment follows on).
            (None, Some(next_base)) => lost.push(scan.end..*next_base),
            (None, None) => {}
        }
        let newest = i + 1 == bases.len();
        segments.push(open_segment(env, &path, *base, &scan, newest)?);
    }
    let end = segments.last().map(|s| s.end).unwrap_or(0);
    let mut next = end;
    if let Some((bytes, why)) = newest_tail {
        // As many offsets as the invalid bytes could have held are never handed out again.
        next = end + bytes.div_ceil(RECORD_BYTES_MIN as u64);
        tracing::warn!(topic = name, bytes, why, skipped = ?(end..next), "the newest segment ends in bytes that are not a whole record (a write cut short, or damage); appends continue in a new segment");
        lost.push(end..next);
    }
    if let Some((group, offset)) = committed.iter().max_by_key(|(_, o)| **o)
        && *offset > next
    {
        tracing::error!(
            topic = name,
            group,
            committed = offset,
            end = next,
            "a consumer group committed past the end of the log (the log lost its tail); appends continue after the committed offset"
        );
        lost.push(next..*offset);
        next = *offset;
    }
    if segments.is_empty() || next > end || newest_tail.is_some() {
        segments.push(create_segment(env, dir, next)?);
    }
    env.disk
        .sync_dir(dir)
        .map_err(|e| io_message("sync", dir, e))?;
    Ok(Recovered {
        segments,
        lost: merge(lost),
    })
}

/// The lost ranges as one sorted list without overlaps, for reporting.
pub(super) fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.retain(|r| !r.is_empty());
    ranges.sort_by_key(|r| r.start);
    let mut out: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match out.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => out.push(range),
        }
    }
    out
}
