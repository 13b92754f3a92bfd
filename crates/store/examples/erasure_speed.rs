//! How fast one core erasure-codes, encrypts and hashes stripes: the CPU side of a PUT
//! and a GET, without disks or the network. `cargo run --release -p store --example
//! erasure_speed -- K M` prints JSON for `cargo xtask bench store`.

use std::time::Instant;

use store::codec::Codec;
use store::crypto::Key;
use store::layout::Profile;

fn main() {
    let args: Vec<u8> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (k, m) = match args.as_slice() {
        [k, m] => (*k, *m),
        _ => (4, 2),
    };
    let profile = Profile::new(k, m).expect("a valid profile");
    let block = 256 << 10;
    let mut codec = Codec::new(profile, block);
    let data: Vec<Vec<u8>> = (0..profile.data())
        .map(|i| (0..block).map(|j| (i * 7 + j) as u8).collect())
        .collect();
    let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    let stripes = 400;
    let user_bytes = (stripes * profile.data() * block) as f64;

    let started = Instant::now();
    let mut parity = Vec::new();
    for _ in 0..stripes {
        parity = codec.encode(&refs);
    }
    let encode = user_bytes / started.elapsed().as_secs_f64();

    let all: Vec<Vec<u8>> = data.iter().cloned().chain(parity).collect();
    let started = Instant::now();
    for _ in 0..stripes {
        let mut blocks: Vec<Option<Vec<u8>>> = all.iter().cloned().map(Some).collect();
        for lost in blocks.iter_mut().take(profile.parity()) {
            *lost = None;
        }
        assert!(codec.rebuild(&mut blocks));
    }
    let decode = user_bytes / started.elapsed().as_secs_f64();

    let key = Key::generate().expect("random");
    let mut buffer = vec![7u8; profile.data() * block - 16];
    let started = Instant::now();
    for stripe in 0..stripes as u64 {
        buffer.truncate(profile.data() * block - 16);
        key.seal_stripe(b"version", stripe, &mut buffer);
    }
    let seal = user_bytes / started.elapsed().as_secs_f64();

    let started = Instant::now();
    for _ in 0..stripes {
        for block in &all {
            std::hint::black_box(blake3::hash(block));
        }
    }
    let hash = (stripes * all.len() * block) as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut md5 = <md5::Md5 as md5::Digest>::new();
    for _ in 0..stripes {
        for block in &data {
            md5::Digest::update(&mut md5, block);
        }
    }
    std::hint::black_box(md5::Digest::finalize(md5));
    let md5_rate = user_bytes / started.elapsed().as_secs_f64();

    println!(
        "{}",
        serde_json::json!({
            "profile": profile.to_string(),
            "encode_bytes_per_second": encode,
            "decode_bytes_per_second_losing_parity": decode,
            "aes_gcm_seal_bytes_per_second": seal,
            "blake3_bytes_per_second": hash,
            "md5_bytes_per_second": md5_rate,
        })
    );
}
