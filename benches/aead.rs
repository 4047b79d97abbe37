//! Issue 25, first measurement: what sealing and hashing cost per core on
//! this machine, so the transport's budget can be set against them.
//! Prints, for message sizes from a packed log batch to a file chunk:
//! a `memcpy` of the same bytes (the floor), ring's ChaCha20-Poly1305 (the
//! cipher the channel uses today), ring's AES-256-GCM (what AES
//! instructions would give), and SHA-256 from the `sha2` crate (result
//! files) and ring. `cargo bench --bench aead`.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};
use sha2::Digest;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// Runs `f` on `size`-byte messages for about `for_`; MB/s.
fn rate(size: usize, for_: Duration, mut f: impl FnMut(&mut Vec<u8>)) -> f64 {
    let mut buf = vec![0x5au8; size];
    let start = Instant::now();
    let mut bytes = 0u64;
    while start.elapsed() < for_ {
        for _ in 0..16 {
            buf.truncate(size);
            f(&mut buf);
            bytes += size as u64;
        }
    }
    bytes as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn sealer(alg: &'static ring::aead::Algorithm) -> impl FnMut(&mut Vec<u8>) {
    let key = LessSafeKey::new(UnboundKey::new(alg, &[7u8; 32]).expect("a 32-byte key"));
    let mut counter = 0u64;
    move |buf: &mut Vec<u8>| {
        counter += 1;
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&counter.to_be_bytes());
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(n), Aad::from(&[1u8; 32]), buf)
            .expect("sealing");
        black_box(&buf);
    }
}

fn main() {
    let features = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has = |f: &str| {
        features
            .lines()
            .find(|l| l.starts_with("flags"))
            .is_some_and(|l| l.split_whitespace().any(|w| w == f))
    };
    println!(
        "CPU: aes={} pclmulqdq={} sha_ni={} avx2={} (one core, single thread)",
        has("aes"),
        has("pclmulqdq"),
        has("sha_ni"),
        has("avx2")
    );
    let d = Duration::from_millis(400);
    println!(
        "{:>8}  {:>10}  {:>12}  {:>12}  {:>12}  {:>12}",
        "size", "memcpy", "chacha-poly", "aes-256-gcm", "sha256 sha2", "sha256 ring"
    );
    for size in [256usize, 4 << 10, 64 << 10, 1 << 20] {
        let mut out = vec![0u8; size];
        let copy = rate(size, d, |b| {
            out.copy_from_slice(b);
            black_box(&out);
        });
        let chacha = rate(size, d, sealer(&CHACHA20_POLY1305));
        let aes = rate(size, d, sealer(&AES_256_GCM));
        let sha2 = rate(size, d, |b| {
            black_box(sha2::Sha256::digest(&b[..]));
        });
        let ring_sha = rate(size, d, |b| {
            black_box(ring::digest::digest(&ring::digest::SHA256, b));
        });
        println!(
            "{size:>8}  {copy:>7.0} MB/s  {chacha:>7.0} MB/s  {aes:>7.0} MB/s  {sha2:>7.0} MB/s  {ring_sha:>7.0} MB/s"
        );
    }
    println!("AES-256-GCM / ChaCha20-Poly1305 and both against memcpy are the figures that decide issue 25's cipher choice.");
}
