//! `maru audit verify`: walk every segment's chain and every checkpoint, and report the
//! first place where the log is not what it was when written.

use std::collections::BTreeMap;
use std::path::Path;

use disk::Env;
use serde::Serialize;

use super::checkpoint::{Checkpoint, hex};
use super::format::{self, FRAME_HEADER_BYTES, Frame, GENESIS, Hash, SegmentHeader, Tail};
use super::{read_checkpoints, segment_name, segments};

/// What is wrong at a place in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// An entry's contents changed after it was written.
    Edited,
    /// Entries are missing between two that remain.
    Deleted,
    /// An entry appears out of order (moved, or repeated).
    Reordered,
    /// Bytes that are not a whole entry, followed by more of the log.
    Damaged,
    /// The log ends before a signed checkpoint, or disagrees with it.
    Truncated,
    /// A checkpoint whose signature does not hold, or by another key.
    BadCheckpoint,
    /// A segment's header is damaged or does not follow the segment before.
    BadSegment,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub kind: ProblemKind,
    /// The segment file and byte offset, when the problem has a place.
    pub segment: Option<String>,
    pub offset: Option<u64>,
    /// The entry's sequence number, when known.
    pub seq: Option<u64>,
    pub message: String,
}

/// A crash the log recorded: bytes after entry `after_seq` that a new segment names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resumed {
    pub after_seq: u64,
    pub segment: String,
    pub offset: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub segments: usize,
    pub entries: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The newest entry's chain value, hex.
    pub last_hash: String,
    pub checkpoints_checked: usize,
    pub resumed: Vec<Resumed>,
    /// The first problem found (verification stops there).
    pub problem: Option<Problem>,
    /// The newest segment ends in bytes that are not a whole entry: a write in progress
    /// or cut short by a crash (the next `maru up` records it), or damage.
    pub incomplete_tail_bytes: u64,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problem.is_none()
    }
}

/// Whether a whole frame numbered `seq` follows somewhere in `bytes`.
fn appears_later(bytes: &[u8], seq: u64) -> bool {
    let mut at = 0;
    while let Some(frame) = Frame::decode(&bytes[at..]) {
        if frame.seq == seq {
            return true;
        }
        at += frame.encoded_len();
    }
    false
}

/// Why the chain stopped at a frame that is whole (the frame's own check holds); `rest` is
/// the segment from that frame on.
fn classify(frame: &Frame<'_>, next_seq: u64, rest: &[u8]) -> (ProblemKind, String) {
    if frame.seq > next_seq && appears_later(&rest[frame.encoded_len()..], next_seq) {
        (
            ProblemKind::Reordered,
            format!(
                "entry {} appears before entry {next_seq}: entries were moved",
                frame.seq
            ),
        )
    } else if frame.seq > next_seq {
        (
            ProblemKind::Deleted,
            format!(
                "entries {next_seq}..{} are missing: entry {} follows entry {}",
                frame.seq - 1,
                frame.seq,
                next_seq - 1
            ),
        )
    } else if frame.seq < next_seq {
        (
            ProblemKind::Reordered,
            format!("entry {} appears where entry {next_seq} belongs", frame.seq),
        )
    } else {
        (
            ProblemKind::Edited,
            format!(
                "entry {} does not match its hash: it was changed",
                frame.seq
            ),
        )
    }
}

/// Whether the bytes after the last entry look like a write still in progress or cut off
/// at its end: zeros, or the start of a frame that promises more bytes than there are.
fn cut_short(rest: &[u8]) -> bool {
    if rest.iter().all(|b| *b == 0) {
        return true;
    }
    let magic = format::ENTRY_MAGIC;
    if rest.len() < 8 {
        return magic.starts_with(&rest[..rest.len().min(4)]);
    }
    let len = u32::from_le_bytes(rest[4..8].try_into().expect("4")) as usize;
    rest[..4] == magic[..]
        && (1..=format::PAYLOAD_BYTES_MAX).contains(&len)
        && FRAME_HEADER_BYTES + len > rest.len()
}

/// Verify the log in `dir` against its own checkpoints and `exported` ones. A checkpoint
/// must carry `public_key` (the node's) when one is given.
pub fn verify(
    env: &Env,
    dir: &Path,
    exported: &[Checkpoint],
    public_key: Option<&str>,
) -> Result<Report, String> {
    let firsts = segments(env, dir)?;
    let mut report = Report {
        segments: firsts.len(),
        entries: 0,
        first_seq: None,
        last_seq: None,
        last_hash: hex(&GENESIS),
        checkpoints_checked: 0,
        resumed: Vec::new(),
        problem: None,
        incomplete_tail_bytes: 0,
    };
    // Checkpoints first: each must verify, and names a (seq, hash) the walk must meet.
    let mut wanted: BTreeMap<u64, (Hash, &'static str)> = BTreeMap::new();
    let local = read_checkpoints(env, dir)?;
    for (checkpoint, source) in local
        .iter()
        .map(|c| (c, "the node's checkpoints file"))
        .chain(exported.iter().map(|c| (c, "an exported checkpoint")))
    {
        let key_ok = public_key.is_none_or(|key| key == checkpoint.public_key);
        match checkpoint.verified_hash().filter(|_| key_ok) {
            Some(hash) => {
                wanted.insert(checkpoint.seq, (hash, source));
                report.checkpoints_checked += 1;
            }
            None => {
                report.problem = Some(Problem {
                    kind: ProblemKind::BadCheckpoint,
                    segment: None,
                    offset: None,
                    seq: Some(checkpoint.seq),
                    message: format!(
                        "{source} for entry {} is not signed by this node's key",
                        checkpoint.seq
                    ),
                });
                return Ok(report);
            }
        }
    }

    let mut next_seq = 1;
    let mut last_seq = 0;
    let mut prev = GENESIS;
    // Where the chain of the segment before stopped, if it stopped before its end.
    let mut open_break: Option<(Tail, Problem)> = None;
    for (index, &first) in firsts.iter().enumerate() {
        let name = segment_name(first);
        let bytes = env
            .disk
            .read(&dir.join(&name))
            .map_err(|e| format!("read {name}: {e}"))?;
        let bad_segment = |message: String| Problem {
            kind: ProblemKind::BadSegment,
            segment: Some(name.clone()),
            offset: Some(0),
            seq: None,
            message,
        };
        let Some(header) = SegmentHeader::decode(&bytes).filter(|h| h.first_seq == first) else {
            report.problem = Some(bad_segment(format!("segment {name} has a damaged header")));
            return Ok(report);
        };
        match (open_break.take(), header.tail) {
            (None, None) => {
                if header.first_seq != next_seq
                    || header.prev_seq != last_seq
                    || header.prev != prev
                {
                    report.problem = Some(bad_segment(format!(
                        "segment {name} does not follow the one before (it starts at entry {}, the log is at {next_seq}): a segment was removed or replaced",
                        header.first_seq
                    )));
                    return Ok(report);
                }
            }
            (Some((found, _)), Some(named))
                if found == named
                    && header.prev == prev
                    && header.prev_seq == last_seq
                    && header.first_seq == format::seq_after_tail(next_seq, found.bytes) =>
            {
                report.resumed.push(Resumed {
                    after_seq: last_seq,
                    segment: segment_name(found.segment),
                    offset: found.offset,
                    bytes: found.bytes,
                });
                next_seq = header.first_seq;
            }
            (Some((_, problem)), _) => {
                report.problem = Some(problem);
                return Ok(report);
            }
            (None, Some(_)) => {
                report.problem = Some(bad_segment(format!(
                    "segment {name} claims a crash tail the segment before does not have"
                )));
                return Ok(report);
            }
        }
        let mut at = format::SEGMENT_HEADER_BYTES;
        while at < bytes.len() {
            let Some(frame) = Frame::decode(&bytes[at..]) else {
                break;
            };
            if frame.seq != next_seq || format::chain(&prev, frame.seq, frame.payload) != frame.hash
            {
                break;
            }
            if let Some((hash, source)) = wanted.remove(&frame.seq)
                && hash != frame.hash
            {
                report.problem = Some(Problem {
                    kind: ProblemKind::Edited,
                    segment: Some(name.clone()),
                    offset: Some(at as u64),
                    seq: Some(frame.seq),
                    message: format!(
                        "entry {} is not the one {source} signed: the log was rewritten from here or before",
                        frame.seq
                    ),
                });
                return Ok(report);
            }
            report.first_seq.get_or_insert(frame.seq);
            report.last_seq = Some(frame.seq);
            last_seq = frame.seq;
            report.entries += 1;
            prev = frame.hash;
            next_seq += 1;
            at += frame.encoded_len();
        }
        if at < bytes.len() {
            let rest = &bytes[at..];
            let tail = Tail {
                segment: first,
                offset: at as u64,
                bytes: rest.len() as u64,
                hash: *blake3::hash(rest).as_bytes(),
            };
            let (kind, message) = match Frame::decode(rest) {
                Some(frame) => classify(&frame, next_seq, rest),
                None => (
                    ProblemKind::Damaged,
                    format!(
                        "{} bytes after entry {} are not a whole entry: damage, or a write cut short by a crash (`maru up` records a crash's tail; verify again after it)",
                        rest.len(),
                        last_seq
                    ),
                ),
            };
            let problem = Problem {
                kind,
                segment: Some(name.clone()),
                offset: Some(at as u64),
                seq: Frame::decode(rest).map(|f| f.seq),
                message,
            };
            let last = index + 1 == firsts.len();
            if last && cut_short(rest) {
                // The newest segment may end in a write in progress or cut short.
                report.incomplete_tail_bytes = rest.len() as u64;
            } else if last {
                report.problem = Some(problem);
                return Ok(report);
            } else {
                open_break = Some((tail, problem));
            }
        }
    }
    if let Some((&seq, &(_, source))) = wanted.iter().next() {
        report.problem = Some(Problem {
            kind: ProblemKind::Truncated,
            segment: None,
            offset: None,
            seq: Some(seq),
            message: format!(
                "{source} signed entry {seq}, but the log ends at entry {last_seq}: entries were cut off"
            ),
        });
    }
    report.last_hash = hex(&prev);
    Ok(report)
}
