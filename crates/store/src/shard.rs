//! Shard files: one per shard of an object version, on one volume.
//!
//! A file is a header (what it belongs to, checksummed) followed by one stored block per
//! stripe: the block's BLAKE3 hash, then its bytes. The hash covers the version, the shard
//! index and the stripe index with the bytes, so a block is verified as *this* block of
//! *this* object, not only as undamaged. A block that is missing or fails its hash is never
//! returned; the caller rebuilds it from the other shards.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use disk::{Disk, DiskFile, OpenMode};

use crate::layout::{Geometry, HASH_BYTES, Profile};

/// A version's identity: 16 random bytes, shown as 32 hex digits. Every write of an object
/// (and every multipart part) is a new version with new files, so nothing is overwritten in
/// place.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VersionId([u8; 16]);

impl VersionId {
    pub fn generate() -> Result<VersionId, crate::crypto::CryptoError> {
        let mut bytes = [0; 16];
        crate::crypto::random(&mut bytes)?;
        Ok(VersionId(bytes))
    }

    pub fn from_bytes(bytes: [u8; 16]) -> VersionId {
        VersionId(bytes)
    }

    pub fn bytes(&self) -> &[u8; 16] {
        &self.0
    }

    pub fn parse(text: &str) -> Option<VersionId> {
        if text.len() != 32 {
            return None;
        }
        let mut bytes = [0; 16];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
        }
        Some(VersionId(bytes))
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionId({self})")
    }
}

/// What a shard file says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: VersionId,
    pub shard: u16,
    pub profile: Profile,
    pub block_bytes: u32,
    /// The object version's size in user bytes.
    pub size: u64,
}

pub const HEADER_BYTES: usize = 96;
const MAGIC: &[u8; 8] = b"MARUSHD1";

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("shard file {}: {what}", path.display())]
    Damaged { path: PathBuf, what: &'static str },
}

impl Header {
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.profile, self.block_bytes as usize)
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0; HEADER_BYTES];
        out[..8].copy_from_slice(MAGIC);
        out[8..24].copy_from_slice(&self.version.0);
        out[24..26].copy_from_slice(&self.shard.to_le_bytes());
        out[26] = self.profile.data() as u8;
        out[27] = self.profile.parity() as u8;
        out[28..32].copy_from_slice(&self.block_bytes.to_le_bytes());
        out[32..40].copy_from_slice(&self.size.to_le_bytes());
        let sum = blake3::hash(&out[..64]);
        out[64..].copy_from_slice(sum.as_bytes());
        out
    }

    /// A header read back, refused unless its checksum and fields hold.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Option<Header> {
        if &bytes[..8] != MAGIC || blake3::hash(&bytes[..64]).as_bytes()[..] != bytes[64..] {
            return None;
        }
        let profile = Profile::new(bytes[26], bytes[27]).ok()?;
        let shard = u16::from_le_bytes([bytes[24], bytes[25]]);
        let block_bytes = u32::from_le_bytes(bytes[28..32].try_into().ok()?);
        if usize::from(shard) >= profile.shards()
            || block_bytes < 64
            || !block_bytes.is_multiple_of(64)
        {
            return None;
        }
        Some(Header {
            version: VersionId(bytes[8..24].try_into().ok()?),
            shard,
            profile,
            block_bytes,
            size: u64::from_le_bytes(bytes[32..40].try_into().ok()?),
        })
    }
}

fn block_hash(header: &Header, stripe: u64, block: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&header.version.0);
    hasher.update(&header.shard.to_le_bytes());
    hasher.update(&stripe.to_le_bytes());
    hasher.update(block);
    hasher.finalize()
}

/// Where shard `shard` of `version` lives under a volume's root: spread over 256
/// directories by the version's first byte.
pub fn path(volume: &Path, version: VersionId, shard: usize) -> PathBuf {
    volume
        .join("objects")
        .join(format!("{:02x}", version.0[0]))
        .join(format!("{version}.{shard}"))
}

/// The version and shard a shard file's name says, if it is one.
pub fn parse_name(name: &str) -> Option<(VersionId, usize)> {
    let (version, shard) = name.split_once('.')?;
    Some((VersionId::parse(version)?, shard.parse().ok()?))
}

/// Writes one shard file, stripe after stripe. Nothing is durable until [`ShardWriter::finish`].
pub struct ShardWriter {
    file: Arc<dyn DiskFile>,
    header: Header,
    path: PathBuf,
    next_stripe: u64,
    buffer: Vec<u8>,
}

/// Appends are gathered up to this size before they are written.
const WRITE_BUFFER_BYTES: usize = 1 << 20;

impl ShardWriter {
    /// Create the file (its directory must exist).
    pub fn create(
        disk: &dyn Disk,
        path: PathBuf,
        header: Header,
    ) -> Result<ShardWriter, ShardError> {
        let io = |source| ShardError::Io {
            path: path.clone(),
            source,
        };
        let file = disk.open(&path, OpenMode::CreateNew).map_err(io)?;
        let mut buffer = Vec::with_capacity(WRITE_BUFFER_BYTES);
        buffer.extend_from_slice(&header.encode());
        Ok(ShardWriter {
            file,
            header,
            path,
            next_stripe: 0,
            buffer,
        })
    }

    /// Append the next stripe's block.
    pub fn append(&mut self, block: &[u8]) -> Result<(), ShardError> {
        assert_eq!(
            block.len(),
            self.header.block_bytes as usize,
            "a block is the shard's block size"
        );
        let hash = block_hash(&self.header, self.next_stripe, block);
        self.buffer.extend_from_slice(hash.as_bytes());
        self.buffer.extend_from_slice(block);
        self.next_stripe += 1;
        if self.buffer.len() >= WRITE_BUFFER_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), ShardError> {
        if !self.buffer.is_empty() {
            self.file
                .append(&self.buffer)
                .map_err(|source| ShardError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Write what is buffered and sync the file. Its name is durable only once the caller
    /// syncs its directory.
    pub fn finish(mut self) -> Result<PathBuf, ShardError> {
        let geometry = self.header.geometry();
        assert_eq!(
            self.next_stripe,
            geometry.stripes(self.header.size),
            "every stripe was written"
        );
        self.flush()?;
        let size = self.file.size().map_err(|source| ShardError::Io {
            path: self.path.clone(),
            source,
        })?;
        assert_eq!(
            size,
            HEADER_BYTES as u64 + geometry.shard_bytes(self.header.size),
            "the file holds its header and every block"
        );
        self.file.sync().map_err(|source| ShardError::Io {
            path: self.path.clone(),
            source,
        })?;
        Ok(self.path)
    }
}

/// An open shard file whose header was verified.
pub struct ShardReader {
    file: Arc<dyn DiskFile>,
    header: Header,
    path: PathBuf,
}

impl ShardReader {
    /// Open a shard file and check that it is shard `shard` of `version`.
    pub fn open(
        disk: &dyn Disk,
        path: PathBuf,
        version: VersionId,
        shard: usize,
    ) -> Result<ShardReader, ShardError> {
        let file = disk
            .open(&path, OpenMode::Read)
            .map_err(|source| ShardError::Io {
                path: path.clone(),
                source,
            })?;
        let mut bytes = [0; HEADER_BYTES];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|source| ShardError::Io {
                path: path.clone(),
                source,
            })?;
        let header = Header::decode(&bytes).ok_or_else(|| ShardError::Damaged {
            path: path.clone(),
            what: "its header does not verify",
        })?;
        if header.version != version || usize::from(header.shard) != shard {
            return Err(ShardError::Damaged {
                path,
                what: "it belongs to another object or shard",
            });
        }
        Ok(ShardReader { file, header, path })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Stripe `stripe`'s block, verified.
    pub fn block(&self, stripe: u64) -> Result<Vec<u8>, ShardError> {
        let mut block = vec![0; self.header.block_bytes as usize];
        self.block_into(stripe, &mut block)?;
        Ok(block)
    }

    /// Read stripe `stripe`'s block into `into` (exactly a block long) and verify it; on
    /// error `into` holds nothing to trust.
    /// Ask the disk to start reading the blocks of `stripes` (clamped to the object).
    pub fn prefetch(&self, stripes: std::ops::Range<u64>) {
        let geometry = self.header.geometry();
        let end = stripes.end.min(geometry.stripes(self.header.size));
        if stripes.start < end {
            let at = HEADER_BYTES as u64 + geometry.block_offset(stripes.start);
            let len = geometry.block_offset(end) - geometry.block_offset(stripes.start);
            self.file.will_need(at, len);
        }
    }

    pub fn block_into(&self, stripe: u64, into: &mut [u8]) -> Result<(), ShardError> {
        let geometry = self.header.geometry();
        assert!(
            stripe < geometry.stripes(self.header.size),
            "stripe {stripe} lies inside the object"
        );
        assert_eq!(into.len(), geometry.block_bytes(), "a whole block is read");
        let at = HEADER_BYTES as u64 + geometry.block_offset(stripe);
        let io = |source| ShardError::Io {
            path: self.path.clone(),
            source,
        };
        let mut hash = [0; HASH_BYTES];
        self.file.read_exact_at(&mut hash, at).map_err(io)?;
        self.file
            .read_exact_at(into, at + HASH_BYTES as u64)
            .map_err(io)?;
        if block_hash(&self.header, stripe, into).as_bytes()[..] != hash[..] {
            return Err(ShardError::Damaged {
                path: self.path.clone(),
                what: "a block does not match its hash",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use disk::sim::SimDisk;

    #[test]
    fn blocks_read_back_verified_and_damage_is_refused() {
        let disk = SimDisk::new();
        disk.create_dir(Path::new("/v")).expect("creates");
        let header = Header {
            version: VersionId::from_bytes([7; 16]),
            shard: 1,
            profile: Profile::new(2, 1).expect("valid"),
            block_bytes: 64,
            size: 2 * (2 * 64 - 16) + 1,
        };
        let path = PathBuf::from("/v/s");
        let mut writer = ShardWriter::create(&disk, path.clone(), header).expect("creates");
        for stripe in 0..3u8 {
            writer.append(&[stripe; 64]).expect("appends");
        }
        writer.finish().expect("finishes");
        let reader = ShardReader::open(&disk, path.clone(), header.version, 1).expect("opens");
        assert_eq!(reader.block(2).expect("reads"), [2; 64]);
        assert!(ShardReader::open(&disk, path.clone(), header.version, 0).is_err());
        assert!(disk.flip_bit(&path, HEADER_BYTES + 96 + 40, 3));
        assert!(matches!(reader.block(1), Err(ShardError::Damaged { .. })));
        assert_eq!(reader.block(0).expect("untouched"), [0; 64]);
        assert!(disk.flip_bit(&path, 30, 0));
        assert!(ShardReader::open(&disk, path, header.version, 1).is_err());
    }

    #[test]
    fn headers_and_names_round_trip() {
        let header = Header {
            version: VersionId::from_bytes([0xab; 16]),
            shard: 5,
            profile: Profile::new(4, 2).expect("valid"),
            block_bytes: 1 << 16,
            size: 123_456_789,
        };
        assert_eq!(Header::decode(&header.encode()), Some(header));
        let name = path(Path::new("/v"), header.version, 5);
        assert_eq!(
            name,
            PathBuf::from("/v/objects/ab/abababababababababababababababab.5")
        );
        let file = name.file_name().and_then(|n| n.to_str()).expect("name");
        assert_eq!(parse_name(file), Some((header.version, 5)));
        assert_eq!(parse_name("x.5"), None);
    }
}
