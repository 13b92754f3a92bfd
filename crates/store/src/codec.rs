//! Reed-Solomon over one stripe's blocks (`reed-solomon-simd`), reusing its working space.

use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

use crate::layout::Profile;

/// Encodes and rebuilds the blocks of stripes of one profile and block size.
pub struct Codec {
    profile: Profile,
    block_bytes: usize,
    encoder: Option<ReedSolomonEncoder>,
    decoder: Option<ReedSolomonDecoder>,
}

impl Codec {
    pub fn new(profile: Profile, block_bytes: usize) -> Codec {
        assert!(
            block_bytes > 0 && block_bytes.is_multiple_of(2),
            "Reed-Solomon blocks are an even number of bytes"
        );
        Codec {
            profile,
            block_bytes,
            encoder: None,
            decoder: None,
        }
    }

    /// The parity blocks of `data` (`profile.data()` blocks of `block_bytes` each).
    pub fn encode(&mut self, data: &[&[u8]]) -> Vec<Vec<u8>> {
        assert_eq!(data.len(), self.profile.data(), "one block per data shard");
        if self.profile.parity() == 0 {
            return Vec::new();
        }
        let (k, m, bytes) = (self.profile.data(), self.profile.parity(), self.block_bytes);
        let encoder = match &mut self.encoder {
            Some(encoder) => {
                encoder.reset(k, m, bytes).expect("the profile was checked");
                encoder
            }
            None => self
                .encoder
                .insert(ReedSolomonEncoder::new(k, m, bytes).expect("the profile was checked")),
        };
        for block in data {
            encoder
                .add_original_shard(block)
                .expect("blocks are the stripe's block size");
        }
        let result = encoder.encode().expect("every data block was added");
        result.recovery_iter().map(<[u8]>::to_vec).collect()
    }

    /// Fill in every missing block of a stripe (data and parity) from those present.
    /// Returns false if fewer than `data` blocks are present.
    pub fn rebuild(&mut self, blocks: &mut [Option<Vec<u8>>]) -> bool {
        let (k, m, bytes) = (self.profile.data(), self.profile.parity(), self.block_bytes);
        assert_eq!(blocks.len(), k + m, "one slot per shard");
        let present = blocks.iter().filter(|b| b.is_some()).count();
        if present < k {
            return false;
        }
        if present == k + m {
            return true;
        }
        if blocks[..k].iter().any(Option::is_none) {
            let decoder = match &mut self.decoder {
                Some(decoder) => {
                    decoder.reset(k, m, bytes).expect("the profile was checked");
                    decoder
                }
                None => self
                    .decoder
                    .insert(ReedSolomonDecoder::new(k, m, bytes).expect("the profile was checked")),
            };
            for (index, block) in blocks.iter().enumerate() {
                if let Some(block) = block {
                    if index < k {
                        decoder
                            .add_original_shard(index, block)
                            .expect("blocks are the stripe's block size");
                    } else {
                        decoder
                            .add_recovery_shard(index - k, block)
                            .expect("blocks are the stripe's block size");
                    }
                }
            }
            let result = decoder.decode().expect("enough blocks were added");
            let restored: Vec<(usize, Vec<u8>)> = (0..k)
                .filter(|i| blocks[*i].is_none())
                .map(|i| {
                    let block = result
                        .restored_original(i)
                        .expect("a missing data block is restored");
                    (i, block.to_vec())
                })
                .collect();
            for (index, block) in restored {
                blocks[index] = Some(block);
            }
        }
        if blocks[k..].iter().any(Option::is_none) {
            let data: Vec<Vec<u8>> = blocks[..k]
                .iter()
                .map(|b| b.clone().expect("data blocks were restored"))
                .collect();
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let parity = self.encode(&refs);
            for (slot, block) in blocks[k..].iter_mut().zip(parity) {
                if slot.is_none() {
                    *slot = Some(block);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every loss pattern of every small profile: what is rebuilt equals what was lost.
    #[test]
    fn every_loss_of_at_most_parity_blocks_is_rebuilt_exactly() {
        for data in 1..=5u8 {
            for parity in 0..=3u8 {
                let profile = Profile::new(data, parity).expect("valid");
                let mut codec = Codec::new(profile, 64);
                let originals: Vec<Vec<u8>> = (0..data)
                    .map(|i| (0..64).map(|j| i.wrapping_mul(31) ^ j as u8).collect())
                    .collect();
                let refs: Vec<&[u8]> = originals.iter().map(Vec::as_slice).collect();
                let parity_blocks = codec.encode(&refs);
                assert_eq!(parity_blocks.len(), profile.parity());
                let all: Vec<Vec<u8>> = originals.iter().cloned().chain(parity_blocks).collect();
                let shards = profile.shards();
                for pattern in 0u32..(1 << shards) {
                    let mut blocks: Vec<Option<Vec<u8>>> = (0..shards)
                        .map(|i| (pattern & (1 << i) == 0).then(|| all[i].clone()))
                        .collect();
                    let lost = pattern.count_ones() as usize;
                    let rebuilt = codec.rebuild(&mut blocks);
                    assert_eq!(
                        rebuilt,
                        lost <= profile.parity(),
                        "{profile} lost {pattern:b}"
                    );
                    if rebuilt {
                        let blocks: Vec<Vec<u8>> =
                            blocks.into_iter().map(|b| b.expect("filled")).collect();
                        assert_eq!(blocks, all, "{profile} lost {pattern:b}");
                    }
                }
            }
        }
    }
}
