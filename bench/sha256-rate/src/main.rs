//! Hashes MIB MiB (argument, default 256) in 1 MiB updates, as dockside's upload path does,
//! with `sha2` (dockside's hasher: SHA extensions when the CPU has them and the target can use
//! them) and with `hmac-sha256` (portable scalar code), and prints MiB/s for each.
use std::time::Instant;

use sha2::Digest as _;

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().expect("MiB count"))
        .unwrap_or(256);
    let buf: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let t = Instant::now();
    let mut h = sha2::Sha256::new();
    for _ in 0..mib {
        h.update(&buf);
    }
    let a = h.finalize();
    let sha2_rate = mib as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut h = hmac_sha256::Hash::new();
    for _ in 0..mib {
        h.update(&buf);
    }
    let b = h.finalize();
    let scalar_rate = mib as f64 / t.elapsed().as_secs_f64();
    assert_eq!(a.as_slice(), b.as_slice(), "both hashers agree");
    println!("sha2 {sha2_rate:.0} MiB/s, portable scalar {scalar_rate:.0} MiB/s");
}
