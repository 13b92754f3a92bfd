//! The audit log's bytes, without I/O: segment headers, entry frames and the hash chain.
//!
//! A segment file is a header followed by entry frames:
//!
//! ```text
//! header: "MAUS" first_seq:u64 prev_seq:u64 prev:[32] tail_first:u64 tail_offset:u64
//!         tail_bytes:u64 tail_hash:[32] check:[8]
//! frame:  "MAUE" len:u32 seq:u64 hash:[32] check:[8] payload:[len]
//! ```
//!
//! Integers are little-endian. `hash` is the chain: BLAKE3 (derived key "maru audit entry
//! v1") of the previous entry's hash, the sequence number and the payload, so changing,
//! removing or moving any entry changes every hash after it. `check` (BLAKE3 of the rest
//! of the header and the payload, 8 bytes) only tells a whole frame from torn or foreign
//! bytes; it is not a defence, the chain and the signed checkpoints are.
//!
//! A header's `tail_*` fields are set when the segment was started after recovery found
//! bytes that were not a whole, chained entry at the end of segment `tail_first`: they name
//! those bytes (kept, never deleted) so that verification can tell a recorded crash from
//! tampering.

/// A chain value: an entry's hash, or the value an entry chains from.
pub type Hash = [u8; 32];

/// What the first entry of a log chains from.
pub const GENESIS: Hash = [0; 32];

const SEGMENT_MAGIC: [u8; 4] = *b"MAUS";
pub(crate) const ENTRY_MAGIC: [u8; 4] = *b"MAUE";
pub const SEGMENT_HEADER_BYTES: usize = 4 + 8 + 8 + 32 + 8 + 8 + 8 + 32 + 8;
pub const FRAME_HEADER_BYTES: usize = 4 + 4 + 8 + 32 + 8;
/// The largest payload an entry may have.
pub const PAYLOAD_BYTES_MAX: usize = 64 * 1024;
/// The smallest frame: a header and one byte of payload. Bytes that are not entries can hold
/// at most `len / FRAME_BYTES_MIN` of them, which bounds the sequence numbers they used.
pub const FRAME_BYTES_MIN: usize = FRAME_HEADER_BYTES + 1;

/// The chain value of entry `seq` with `payload`, after `prev`.
pub fn chain(prev: &Hash, seq: u64, payload: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key("maru audit entry v1");
    hasher.update(prev);
    hasher.update(&seq.to_le_bytes());
    hasher.update(payload);
    *hasher.finalize().as_bytes()
}

fn check(parts: &[&[u8]]) -> [u8; 8] {
    let mut hasher = blake3::Hasher::new_derive_key("maru audit frame check v1");
    for part in parts {
        hasher.update(part);
    }
    let mut out = [0; 8];
    out.copy_from_slice(&hasher.finalize().as_bytes()[..8]);
    out
}

/// Bytes at the end of a segment that recovery found not to be whole, chained entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    /// The segment holding them (its first sequence number names it).
    pub segment: u64,
    pub offset: u64,
    pub bytes: u64,
    /// BLAKE3 of those bytes.
    pub hash: Hash,
}

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_seq: u64,
    /// The entry its first entry chains from (0: none), and that entry's chain value.
    pub prev_seq: u64,
    pub prev: Hash,
    pub tail: Option<Tail>,
}

impl SegmentHeader {
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.first_seq > self.prev_seq,
            "a segment starts after the entry it chains from"
        );
        let mut out = Vec::with_capacity(SEGMENT_HEADER_BYTES);
        out.extend_from_slice(&SEGMENT_MAGIC);
        out.extend_from_slice(&self.first_seq.to_le_bytes());
        out.extend_from_slice(&self.prev_seq.to_le_bytes());
        out.extend_from_slice(&self.prev);
        let tail = self.tail.unwrap_or(Tail {
            segment: 0,
            offset: 0,
            bytes: 0,
            hash: [0; 32],
        });
        out.extend_from_slice(&tail.segment.to_le_bytes());
        out.extend_from_slice(&tail.offset.to_le_bytes());
        out.extend_from_slice(&tail.bytes.to_le_bytes());
        out.extend_from_slice(&tail.hash);
        let sum = check(&[&out]);
        out.extend_from_slice(&sum);
        assert_eq!(out.len(), SEGMENT_HEADER_BYTES);
        out
    }

    /// The header at the start of `bytes`, if it is one.
    pub fn decode(bytes: &[u8]) -> Option<SegmentHeader> {
        let bytes = bytes.get(..SEGMENT_HEADER_BYTES)?;
        let (body, sum) = bytes.split_at(SEGMENT_HEADER_BYTES - 8);
        if body[..4] != SEGMENT_MAGIC || check(&[body]) != sum {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(body[at..at + 8].try_into().expect("8"));
        let hash_at = |at: usize| -> Hash { body[at..at + 32].try_into().expect("32") };
        let first_seq = u64_at(4);
        let prev_seq = u64_at(12);
        let tail_segment = u64_at(52);
        let header = SegmentHeader {
            first_seq,
            prev_seq,
            prev: hash_at(20),
            tail: (tail_segment != 0).then(|| Tail {
                segment: tail_segment,
                offset: u64_at(60),
                bytes: u64_at(68),
                hash: hash_at(76),
            }),
        };
        (first_seq > prev_seq).then_some(header)
    }
}

/// An entry frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub seq: u64,
    pub hash: Hash,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes the frame takes.
    pub fn encoded_len(&self) -> usize {
        FRAME_HEADER_BYTES + self.payload.len()
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        assert!(
            !self.payload.is_empty() && self.payload.len() <= PAYLOAD_BYTES_MAX,
            "a payload is 1..={PAYLOAD_BYTES_MAX} bytes"
        );
        let start = out.len();
        out.extend_from_slice(&ENTRY_MAGIC);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.hash);
        let sum = check(&[&out[start..], self.payload]);
        out.extend_from_slice(&sum);
        out.extend_from_slice(self.payload);
        debug_assert_eq!(Frame::decode(&out[start..]), Some(*self));
    }

    /// The whole frame at the start of `bytes`, if there is one (its own check only: the
    /// chain is the caller's).
    pub fn decode(bytes: &[u8]) -> Option<Frame<'_>> {
        let header = bytes.get(..FRAME_HEADER_BYTES)?;
        if header[..4] != ENTRY_MAGIC {
            return None;
        }
        let len = u32::from_le_bytes(header[4..8].try_into().expect("4")) as usize;
        if len == 0 || len > PAYLOAD_BYTES_MAX {
            return None;
        }
        let payload = bytes.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len)?;
        if check(&[&header[..FRAME_HEADER_BYTES - 8], payload]) != header[FRAME_HEADER_BYTES - 8..]
        {
            return None;
        }
        Some(Frame {
            seq: u64::from_le_bytes(header[8..16].try_into().expect("8")),
            hash: header[16..48].try_into().expect("32"),
            payload,
        })
    }
}

/// Where a segment's chain of entries ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainEnd {
    /// Bytes of the segment that are header and whole, chained entries.
    pub valid_bytes: usize,
    /// The next sequence number the chain expects; the last entry (the header's `prev_seq`
    /// if the segment has none) and its chain value.
    pub next_seq: u64,
    pub last_seq: u64,
    pub last_hash: Hash,
    pub entries: u64,
}

/// Walk a segment's entries from its header while each is whole, has the next sequence
/// number and chains from the one before.
pub fn chain_end(header: &SegmentHeader, bytes: &[u8]) -> ChainEnd {
    let mut end = ChainEnd {
        valid_bytes: SEGMENT_HEADER_BYTES,
        next_seq: header.first_seq,
        last_seq: header.prev_seq,
        last_hash: header.prev,
        entries: 0,
    };
    while let Some(frame) = Frame::decode(&bytes[end.valid_bytes.min(bytes.len())..]) {
        if frame.seq != end.next_seq
            || chain(&end.last_hash, frame.seq, frame.payload) != frame.hash
        {
            break;
        }
        end.valid_bytes += frame.encoded_len();
        end.last_seq = frame.seq;
        end.next_seq += 1;
        end.last_hash = frame.hash;
        end.entries += 1;
    }
    end
}

/// The first sequence number a segment started after `tail` may use: past every number
/// the entries in those bytes can have used, so no number is ever given twice.
pub fn seq_after_tail(next_seq: u64, tail_bytes: u64) -> u64 {
    next_seq + tail_bytes / FRAME_BYTES_MIN as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segment(entries: &[&[u8]]) -> (SegmentHeader, Vec<u8>) {
        let header = SegmentHeader {
            first_seq: 7,
            prev_seq: 6,
            prev: [9; 32],
            tail: None,
        };
        let mut bytes = header.encode();
        let mut prev = header.prev;
        for (i, payload) in entries.iter().enumerate() {
            let seq = 7 + i as u64;
            let hash = chain(&prev, seq, payload);
            Frame { seq, hash, payload }.encode_into(&mut bytes);
            prev = hash;
        }
        (header, bytes)
    }

    #[test]
    fn headers_round_trip_with_and_without_a_tail() {
        let mut header = SegmentHeader {
            first_seq: 12,
            prev_seq: 11,
            prev: [3; 32],
            tail: None,
        };
        assert_eq!(SegmentHeader::decode(&header.encode()), Some(header));
        header.tail = Some(Tail {
            segment: 1,
            offset: 500,
            bytes: 77,
            hash: [5; 32],
        });
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Some(header));
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 1;
            assert_eq!(SegmentHeader::decode(&bad), None, "byte {at}");
        }
    }

    #[test]
    fn the_chain_ends_at_an_edit_a_gap_or_a_torn_frame() {
        let (header, bytes) = segment(&[b"one", b"two", b"three"]);
        let whole = chain_end(&header, &bytes);
        assert_eq!(
            (whole.valid_bytes, whole.next_seq, whole.entries),
            (bytes.len(), 10, 3)
        );
        // Torn anywhere inside the last frame: the two before remain.
        let two = SEGMENT_HEADER_BYTES + 2 * FRAME_HEADER_BYTES + 6;
        for cut in two..bytes.len() {
            let end = chain_end(&header, &bytes[..cut]);
            assert_eq!((end.valid_bytes, end.entries), (two, 2), "cut at {cut}");
        }
        // Entry two edited, with its frame check made right: the chain stops before it.
        let (_, edited) = segment(&[b"one", b"TWO", b"three"]);
        let mut spliced = bytes[..SEGMENT_HEADER_BYTES + FRAME_HEADER_BYTES + 3].to_vec();
        let second = Frame {
            seq: 8,
            hash: Frame::decode(&bytes[spliced.len()..]).expect("frame").hash,
            payload: b"TWO",
        };
        second.encode_into(&mut spliced);
        assert_eq!(chain_end(&header, &spliced).entries, 1);
        assert_ne!(edited, bytes);
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = SegmentHeader::decode(&bytes);
            let _ = Frame::decode(&bytes);
            let header = SegmentHeader { first_seq: 1, prev_seq: 0, prev: GENESIS, tail: None };
            let mut all = header.encode();
            all.extend_from_slice(&bytes);
            let end = chain_end(&header, &all);
            prop_assert!(end.valid_bytes <= all.len());
        }
    }
}
