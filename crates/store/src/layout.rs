//! Where an object's bytes go, decided without I/O.
//!
//! An object is cut into *stripes*. Each stripe's plaintext (at most
//! [`Geometry::stripe_plaintext_bytes`]) is sealed with the object's data key (the AEAD adds
//! a tag), and the sealed bytes, padded to `k` equal *blocks*, are erasure-coded into `m`
//! parity blocks with Reed-Solomon. Shard `i` of the object is the sequence of block `i` of
//! every stripe, kept in one file on one volume; each stored block carries its own BLAKE3
//! hash, so a damaged block is found before it is decoded and rebuilt from the others.
//!
//! A read of a byte range touches only the stripes that hold it: stripe `s` starts at byte
//! `s * stripe_plaintext_bytes` of the object and at `s * stored_block_bytes` of each shard.

use std::fmt;

/// A Reed-Solomon profile: `data` shards hold the object, `parity` shards let any `parity`
/// of the `data + parity` be lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Profile {
    data: u8,
    parity: u8,
}

/// Shards an object may have at most (data and parity together).
pub const SHARDS_MAX: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("an erasure profile needs at least one data shard")]
    NoData,
    #[error("an erasure profile has at most {SHARDS_MAX} shards (data and parity); {0} asked")]
    TooManyShards(usize),
    #[error("RS({data},{parity}) needs {needed} volumes; the node has {volumes}")]
    TooFewVolumes {
        data: u8,
        parity: u8,
        needed: usize,
        volumes: usize,
    },
}

impl Profile {
    pub fn new(data: u8, parity: u8) -> Result<Profile, ProfileError> {
        if data == 0 {
            return Err(ProfileError::NoData);
        }
        let shards = usize::from(data) + usize::from(parity);
        if shards > SHARDS_MAX {
            return Err(ProfileError::TooManyShards(shards));
        }
        Ok(Profile { data, parity })
    }

    /// The profile a node with `volumes` volumes uses unless told otherwise: every volume
    /// holds one shard, and about a third of them are parity (as HDFS's RS(6,3) on nine):
    /// 1 volume: RS(1,0), no redundancy; 2: RS(1,1), a mirror; 3: RS(2,1); 4: RS(2,2);
    /// 5: RS(3,2); 6: RS(4,2); 9: RS(6,3). Past [`SHARDS_MAX`] volumes, a stripe uses
    /// [`SHARDS_MAX`] of them.
    pub fn for_volumes(volumes: usize) -> Profile {
        let shards = volumes.clamp(1, SHARDS_MAX);
        let parity = if shards == 1 { 0 } else { shards.div_ceil(3) };
        Profile {
            data: (shards - parity) as u8,
            parity: parity as u8,
        }
    }

    pub fn data(self) -> usize {
        usize::from(self.data)
    }

    pub fn parity(self) -> usize {
        usize::from(self.parity)
    }

    pub fn shards(self) -> usize {
        self.data() + self.parity()
    }

    /// Physical bytes stored per user byte (before block padding and hashes).
    pub fn overhead(self) -> f64 {
        self.shards() as f64 / self.data() as f64
    }

    /// Whether the profile fits on `volumes` volumes, one shard each.
    pub fn check_fits(self, volumes: usize) -> Result<(), ProfileError> {
        if self.shards() > volumes {
            return Err(ProfileError::TooFewVolumes {
                data: self.data,
                parity: self.parity,
                needed: self.shards(),
                volumes,
            });
        }
        Ok(())
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RS({},{})", self.data, self.parity)
    }
}

/// Which volume holds each shard of an object: the `shards` volumes with the highest
/// rendezvous score for the object's placement key, in score order. Every object spreads
/// its shards over distinct volumes and load spreads evenly; adding a volume changes only
/// the placements it joins. (A placement is decided when an object is written and kept
/// with it, so later changes to the volumes never move existing shards by themselves.)
pub fn place(placement_key: &[u8], volumes: &[VolumeId], shards: usize) -> Vec<usize> {
    assert!(
        shards <= volumes.len(),
        "the profile was checked to fit the volumes"
    );
    let mut scored: Vec<(u64, usize)> = volumes
        .iter()
        .enumerate()
        .map(|(index, volume)| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&volume.0.to_le_bytes());
            hasher.update(placement_key);
            let hash = hasher.finalize();
            let score = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
            (score, index)
        })
        .collect();
    scored.sort_unstable_by(|a, b| b.cmp(a));
    scored.into_iter().take(shards).map(|(_, i)| i).collect()
}

/// A volume's identity, written in it when it is first used, so a replaced disk (an empty
/// directory at the same path) is recognised as new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub u64);

/// The sizes one object is cut into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    profile: Profile,
    block_bytes: usize,
}

/// Bytes of an AEAD tag sealed into each stripe.
pub const TAG_BYTES: usize = 16;
/// Bytes of the BLAKE3 hash stored before each block.
pub const HASH_BYTES: usize = 32;

impl Geometry {
    /// Blocks are a multiple of 64 bytes (what Reed-Solomon SIMD kernels want) and large
    /// enough to hold a stripe's tag.
    pub fn new(profile: Profile, block_bytes: usize) -> Geometry {
        assert!(
            block_bytes >= 64 && block_bytes.is_multiple_of(64),
            "blocks are a positive multiple of 64 bytes"
        );
        assert!(
            block_bytes * profile.data() > TAG_BYTES,
            "a stripe holds more than its tag"
        );
        Geometry {
            profile,
            block_bytes,
        }
    }

    /// The geometry an object of `size` bytes gets: as few stripes as blocks of at most
    /// `block_bytes_max` allow, with the bytes spread evenly over them, so padding is at most
    /// 64 bytes per block (a small object is not padded to a large block, and an object a
    /// little over one stripe does not pay for a second, nearly empty one).
    pub fn for_object(profile: Profile, size: u64, block_bytes_max: usize) -> Geometry {
        let data = profile.data() as u64;
        let most = data * block_bytes_max as u64 - TAG_BYTES as u64;
        let stripes = size.div_ceil(most).max(1);
        let per_stripe = size.div_ceil(stripes);
        let block = (per_stripe + TAG_BYTES as u64).div_ceil(data).div_ceil(64) * 64;
        Geometry::new(profile, (block as usize).clamp(64, block_bytes_max))
    }

    pub fn profile(self) -> Profile {
        self.profile
    }

    pub fn block_bytes(self) -> usize {
        self.block_bytes
    }

    /// User bytes one stripe carries.
    pub fn stripe_plaintext_bytes(self) -> usize {
        self.block_bytes * self.profile.data() - TAG_BYTES
    }

    /// A block as stored: its hash, then its bytes.
    pub fn stored_block_bytes(self) -> usize {
        HASH_BYTES + self.block_bytes
    }

    /// Stripes an object of `size` bytes has (none for an empty object).
    pub fn stripes(self, size: u64) -> u64 {
        size.div_ceil(self.stripe_plaintext_bytes() as u64)
    }

    /// The stripes holding bytes `first..=last` of an object.
    pub fn stripes_for(self, first: u64, last: u64) -> std::ops::RangeInclusive<u64> {
        assert!(first <= last, "a range has at least one byte");
        let per = self.stripe_plaintext_bytes() as u64;
        first / per..=last / per
    }

    /// Where stripe `stripe` starts in the object's bytes.
    pub fn stripe_start(self, stripe: u64) -> u64 {
        stripe * self.stripe_plaintext_bytes() as u64
    }

    /// The plaintext bytes stripe `stripe` holds of an object of `size` bytes.
    pub fn stripe_len(self, stripe: u64, size: u64) -> usize {
        let start = self.stripe_start(stripe);
        assert!(start < size, "stripe {stripe} lies inside the object");
        (size - start).min(self.stripe_plaintext_bytes() as u64) as usize
    }

    /// Where stripe `stripe`'s stored block sits in a shard file, after the header.
    pub fn block_offset(self, stripe: u64) -> u64 {
        stripe * self.stored_block_bytes() as u64
    }

    /// Bytes of every shard file's blocks for an object of `size` bytes.
    pub fn shard_bytes(self, size: u64) -> u64 {
        self.stripes(size) * self.stored_block_bytes() as u64
    }
}

/// What a read can do with a stripe, given which of its shards are usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeRead {
    /// Every data shard is good: read them as they are.
    Direct,
    /// Rebuild from these shards (at least `data` good ones, data shards first).
    Rebuild {
        from: Vec<usize>,
        missing: Vec<usize>,
    },
    /// Fewer good shards than data shards: the stripe is lost.
    Lost { good: usize, needed: usize },
}

/// Decide how to read a stripe whose shards are `good[i]` (present and verified).
pub fn plan_read(profile: Profile, good: &[bool]) -> StripeRead {
    assert_eq!(good.len(), profile.shards(), "one flag per shard");
    let data = profile.data();
    if good[..data].iter().all(|g| *g) {
        return StripeRead::Direct;
    }
    let usable: Vec<usize> = (0..good.len()).filter(|i| good[*i]).collect();
    if usable.len() < data {
        return StripeRead::Lost {
            good: usable.len(),
            needed: data,
        };
    }
    StripeRead::Rebuild {
        from: usable.into_iter().take(data).collect(),
        missing: (0..data).filter(|i| !good[*i]).collect(),
    }
}

/// Which shards a heal must rewrite: every one not good, if enough are good to rebuild.
pub fn plan_heal(profile: Profile, good: &[bool]) -> Result<Vec<usize>, StripeRead> {
    match plan_read(profile, good) {
        lost @ StripeRead::Lost { .. } => Err(lost),
        _ => Ok((0..good.len()).filter(|i| !good[*i]).collect()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_profiles_keep_about_a_third_for_parity() {
        let profiles: Vec<String> = (1..=10)
            .map(|n| format!("{n}:{}", Profile::for_volumes(n)))
            .collect();
        expect_test::expect![[r#"["1:RS(1,0)", "2:RS(1,1)", "3:RS(2,1)", "4:RS(2,2)", "5:RS(3,2)", "6:RS(4,2)", "7:RS(4,3)", "8:RS(5,3)", "9:RS(6,3)", "10:RS(6,4)"]"#]]
            .assert_eq(&format!("{profiles:?}"));
        for n in 1..100 {
            let profile = Profile::for_volumes(n);
            assert!(profile.check_fits(n).is_ok());
            assert!(profile.shards() <= SHARDS_MAX);
        }
    }

    #[test]
    fn placement_uses_distinct_volumes_spreads_evenly_and_moves_little() {
        let volumes: Vec<VolumeId> = (0..6).map(VolumeId).collect();
        let mut first_shard = [0usize; 6];
        for object in 0..6000u32 {
            let key = object.to_le_bytes();
            let placed = place(&key, &volumes, 6);
            let mut sorted = placed.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3, 4, 5], "distinct volumes");
            first_shard[placed[0]] += 1;
        }
        for count in first_shard {
            assert!((800..1200).contains(&count), "{first_shard:?}");
        }
        // A seventh volume changes only the placements it joins.
        let more: Vec<VolumeId> = (0..7).map(VolumeId).collect();
        for object in 0..6000u32 {
            let key = object.to_le_bytes();
            let (before, after) = (place(&key, &volumes, 4), place(&key, &more, 4));
            assert!(
                before == after || after.contains(&6),
                "{before:?} {after:?}"
            );
        }
    }

    #[test]
    fn geometry_maps_ranges_to_stripes() {
        let geometry = Geometry::new(Profile::new(4, 2).expect("valid"), 64);
        let per = geometry.stripe_plaintext_bytes() as u64;
        assert_eq!(per, 4 * 64 - 16);
        assert_eq!(geometry.stripes(0), 0);
        assert_eq!(geometry.stripes(1), 1);
        assert_eq!(geometry.stripes(per), 1);
        assert_eq!(geometry.stripes(per + 1), 2);
        assert_eq!(geometry.stripes_for(0, 0), 0..=0);
        assert_eq!(geometry.stripes_for(per - 1, per), 0..=1);
        assert_eq!(geometry.stripe_len(1, per + 5), 5);
        assert_eq!(geometry.block_offset(2), 2 * (32 + 64));
    }

    #[test]
    fn objects_pay_for_parity_and_at_most_a_little_padding() {
        for profile in [
            Profile::for_volumes(6),
            Profile::for_volumes(9),
            Profile::for_volumes(1),
        ] {
            for size in [
                0u64,
                1,
                1000,
                1 << 20,
                (1 << 20) + 1,
                5 << 20,
                64 << 20,
                1_000_000_007,
            ] {
                let geometry = Geometry::for_object(profile, size, 256 << 10);
                assert!(geometry.block_bytes() <= 256 << 10);
                let stored =
                    geometry.stripes(size) * (profile.shards() * geometry.block_bytes()) as u64;
                let ideal = size as f64 * profile.overhead();
                let slack = geometry.stripes(size) as f64
                    * profile.shards() as f64
                    * (64.0 + TAG_BYTES as f64);
                assert!(
                    stored as f64 <= ideal + slack + (profile.shards() * 64) as f64,
                    "{profile}: {size} bytes stored as {stored}"
                );
            }
        }
    }

    /// Every loss pattern of every small profile: a read is planned from good shards only,
    /// and is possible exactly when at most `parity` shards are bad.
    #[test]
    fn every_loss_pattern_of_small_profiles_is_planned_right() {
        for data in 1..=6u8 {
            for parity in 0..=4u8 {
                let profile = Profile::new(data, parity).expect("valid");
                let shards = profile.shards();
                for pattern in 0u32..(1 << shards) {
                    let good: Vec<bool> = (0..shards).map(|i| pattern & (1 << i) != 0).collect();
                    let bad = good.iter().filter(|g| !**g).count();
                    match plan_read(profile, &good) {
                        StripeRead::Direct => assert!(good[..profile.data()].iter().all(|g| *g)),
                        StripeRead::Rebuild { from, missing } => {
                            assert!(bad <= profile.parity());
                            assert_eq!(from.len(), profile.data());
                            assert!(from.iter().all(|i| good[*i]));
                            assert!(missing.iter().all(|i| !good[*i] && *i < profile.data()));
                        }
                        StripeRead::Lost { .. } => assert!(bad > profile.parity()),
                    }
                    match plan_heal(profile, &good) {
                        Ok(rewrite) => assert_eq!(rewrite.len(), bad),
                        Err(_) => assert!(bad > profile.parity()),
                    }
                }
            }
        }
    }
}
