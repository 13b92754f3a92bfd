//! The on-disk record format, without I/O: encoding, and decoding that tells a torn tail
//! from a complete record and never trusts a byte it has not checked.
//!
//! A record is, little-endian:
//!
//! ```text
//! u32 body length | u32 checksum (first 4 bytes of BLAKE3 of the body) | body
//! body = u64 offset | u64 time (ms since the Unix epoch)
//!      | u16 length + key | u16 length + content type | u16 length + type | u16 length + source
//!      | payload (the rest)
//! ```
//!
//! The offset inside each record lets recovery check that a segment's records are
//! consecutive, so a stale record left behind by a truncation can never be read as new.

use bytes::{BufMut, Bytes};

pub const HEADER_BYTES: usize = 8;
const FIXED_BODY_BYTES: usize = 8 + 8 + 4 * 2;
/// The smallest a record can be (no attributes, no payload): recovery uses it to bound how
/// many offsets a damaged stretch of bytes can have held.
pub const RECORD_BYTES_MIN: usize = HEADER_BYTES + FIXED_BODY_BYTES;
/// Where a record's body length and offset sit, so recovery can look for the next record
/// after damage without hashing every position.
pub fn peek(bytes: &[u8]) -> Option<(usize, u64)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let offset = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
    (FIXED_BODY_BYTES..=BODY_BYTES_MAX)
        .contains(&len)
        .then_some((len, offset))
}
/// The largest body a record may have; larger lengths are corruption.
pub const BODY_BYTES_MAX: usize = 16 << 20;
/// The longest key, content type, type or source.
pub const ATTRIBUTE_BYTES_MAX: usize = 1024;

/// One event as producers give it: everything but the offset and time the log assigns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewEvent {
    /// Events with the same key are delivered in the order they were appended.
    pub key: String,
    pub content_type: String,
    /// The CloudEvents `type`; empty means the default, `maru.event`.
    pub kind: String,
    /// Where the event came from (`mqtt:CLIENT-ID`, `http`, ...).
    pub source: String,
    pub payload: Bytes,
}

/// An event as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub offset: u64,
    pub time_ms: u64,
    pub key: String,
    pub content_type: String,
    pub kind: String,
    pub source: String,
    pub payload: Bytes,
}

impl NewEvent {
    /// Bytes this event takes in the log.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES
            + FIXED_BODY_BYTES
            + self.key.len()
            + self.content_type.len()
            + self.kind.len()
            + self.source.len()
            + self.payload.len()
    }

    /// Why this event cannot be stored, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        for (name, value) in [
            ("key", &self.key),
            ("content type", &self.content_type),
            ("type", &self.kind),
            ("source", &self.source),
        ] {
            if value.len() > ATTRIBUTE_BYTES_MAX {
                return Err(format!(
                    "the event's {name} is {} bytes; the limit is {ATTRIBUTE_BYTES_MAX}",
                    value.len()
                ));
            }
        }
        if self.encoded_len() - HEADER_BYTES > BODY_BYTES_MAX {
            return Err(format!(
                "the event is {} bytes; the log's limit is {BODY_BYTES_MAX}",
                self.encoded_len()
            ));
        }
        Ok(())
    }
}

/// Append one record to `out`. The event must have passed [`NewEvent::check`].
pub fn encode(event: &NewEvent, offset: u64, time_ms: u64, out: &mut Vec<u8>) {
    let start = out.len();
    let body_len = event.encoded_len() - HEADER_BYTES;
    assert!(body_len <= BODY_BYTES_MAX, "checked before encoding");
    out.put_u32_le(u32::try_from(body_len).expect("bounded by BODY_BYTES_MAX"));
    out.put_u32_le(0);
    out.put_u64_le(offset);
    out.put_u64_le(time_ms);
    for value in [&event.key, &event.content_type, &event.kind, &event.source] {
        out.put_u16_le(u16::try_from(value.len()).expect("bounded by ATTRIBUTE_BYTES_MAX"));
        out.put_slice(value.as_bytes());
    }
    out.put_slice(&event.payload);
    let sum = checksum(&out[start + HEADER_BYTES..]);
    out[start + 4..start + 8].copy_from_slice(&sum.to_le_bytes());
}

/// Give an encoded record (exactly its bytes) a new offset, checksum included.
pub fn renumber(record: &mut [u8], offset: u64) {
    assert!(record.len() >= RECORD_BYTES_MIN, "a whole record");
    record[HEADER_BYTES..HEADER_BYTES + 8].copy_from_slice(&offset.to_le_bytes());
    let sum = checksum(&record[HEADER_BYTES..]);
    record[4..8].copy_from_slice(&sum.to_le_bytes());
}

fn checksum(body: &[u8]) -> u32 {
    let hash = blake3::hash(body);
    u32::from_le_bytes(hash.as_bytes()[..4].try_into().expect("4 bytes"))
}

/// What the bytes at some position hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole, verified record taking `len` bytes.
    Record { event: Event, len: usize },
    /// The bytes end inside a record (or are empty): a torn write, or the end of the log.
    Incomplete,
    /// The bytes are not a valid record.
    Corrupt(&'static str),
}

/// Decode the record at the start of `bytes`. `bytes` is cheap to slice (shared).
pub fn decode(bytes: &Bytes) -> Decoded {
    if bytes.len() < HEADER_BYTES {
        return Decoded::Incomplete;
    }
    let body_len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    if !(FIXED_BODY_BYTES..=BODY_BYTES_MAX).contains(&body_len) {
        // A zeroed length is what a preallocated or torn tail looks like.
        return if body_len == 0 && bytes[..HEADER_BYTES].iter().all(|b| *b == 0) {
            Decoded::Incomplete
        } else {
            Decoded::Corrupt("record length out of range")
        };
    }
    let Some(body) = bytes.get(HEADER_BYTES..HEADER_BYTES + body_len) else {
        return Decoded::Incomplete;
    };
    let sum = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if checksum(body) != sum {
        return Decoded::Corrupt("checksum mismatch");
    }
    let body = bytes.slice(HEADER_BYTES..HEADER_BYTES + body_len);
    let offset = u64::from_le_bytes(body[0..8].try_into().expect("8 bytes"));
    let time_ms = u64::from_le_bytes(body[8..16].try_into().expect("8 bytes"));
    let mut at = 16;
    let mut attributes: [String; 4] = Default::default();
    for attribute in &mut attributes {
        let Some(len) = body.get(at..at + 2) else {
            return Decoded::Corrupt("attribute beyond the record");
        };
        let len = u16::from_le_bytes(len.try_into().expect("2 bytes")) as usize;
        at += 2;
        let Some(value) = body.get(at..at + len) else {
            return Decoded::Corrupt("attribute beyond the record");
        };
        let Ok(value) = std::str::from_utf8(value) else {
            return Decoded::Corrupt("attribute is not UTF-8");
        };
        *attribute = value.to_string();
        at += len;
    }
    let [key, content_type, kind, source] = attributes;
    Decoded::Record {
        event: Event {
            offset,
            time_ms,
            key,
            content_type,
            kind,
            source,
            payload: body.slice(at..),
        },
        len: HEADER_BYTES + body_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn new_event() -> impl Strategy<Value = NewEvent> {
        (
            "[a-z0-9/-]{0,20}",
            "[a-z/]{0,12}",
            "[a-z.]{0,12}",
            "[a-z:]{0,12}",
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(key, content_type, kind, source, payload)| NewEvent {
                key,
                content_type,
                kind,
                source,
                payload: payload.into(),
            })
    }

    fn encoded(events: &[NewEvent]) -> Vec<u8> {
        let mut out = Vec::new();
        for (i, event) in events.iter().enumerate() {
            encode(event, 100 + i as u64, 7 + i as u64, &mut out);
        }
        out
    }

    proptest! {
        #[test]
        fn round_trips(events in proptest::collection::vec(new_event(), 1..6)) {
            let mut bytes = Bytes::from(encoded(&events));
            for (i, expected) in events.iter().enumerate() {
                let Decoded::Record { event, len } = decode(&bytes) else {
                    panic!("record {i} did not decode");
                };
                prop_assert_eq!(event.offset, 100 + i as u64);
                prop_assert_eq!(event.time_ms, 7 + i as u64);
                prop_assert_eq!(&event.key, &expected.key);
                prop_assert_eq!(&event.content_type, &expected.content_type);
                prop_assert_eq!(&event.kind, &expected.kind);
                prop_assert_eq!(&event.source, &expected.source);
                prop_assert_eq!(&event.payload, &expected.payload);
                prop_assert_eq!(len, expected.encoded_len());
                bytes = bytes.slice(len..);
            }
            prop_assert_eq!(decode(&bytes), Decoded::Incomplete);
        }

        /// Any prefix of a record is a torn tail, never a record.
        #[test]
        fn a_cut_record_is_incomplete(event in new_event(), cut in any::<prop::sample::Index>()) {
            let bytes = encoded(std::slice::from_ref(&event));
            let cut = cut.index(bytes.len());
            let decoded = decode(&Bytes::copy_from_slice(&bytes[..cut]));
            prop_assert!(!matches!(decoded, Decoded::Record { .. }), "{cut} bytes decoded");
        }

        /// Any single flipped bit is caught.
        #[test]
        fn a_flipped_bit_is_caught(event in new_event(), bit in any::<prop::sample::Index>()) {
            let mut bytes = encoded(std::slice::from_ref(&event));
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let decoded = decode(&Bytes::from(bytes));
            prop_assert!(!matches!(decoded, Decoded::Record { .. }), "bit {bit} flipped unnoticed");
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&Bytes::from(bytes));
        }
    }

    #[test]
    fn oversized_attributes_are_refused() {
        let event = NewEvent {
            key: "k".repeat(ATTRIBUTE_BYTES_MAX + 1),
            ..NewEvent::default()
        };
        expect_test::expect!["the event's key is 1025 bytes; the limit is 1024"]
            .assert_eq(&event.check().err().unwrap_or_default());
    }
}
