//! Shows that the rate limiter's memory is fixed: RSS before and after 10 million distinct
//! clients, with a 16 MiB table. Run: `cargo run --release --example limiter_memory`.

use gnomon::policy::{RateLimitConfig, RateLimiter};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    let cfg = RateLimitConfig {
        table_bytes: 16 << 20,
        ..RateLimitConfig::default()
    };
    let start = rss_kib();
    let limiter = RateLimiter::new(&cfg);
    let built = rss_kib();
    let clients = 10_000_000u64;
    let (mut evicted, mut x) = (0u64, 0x2545_f491_4f6c_dd1du64);
    for i in 0..clients {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // 10 million distinct clients: half IPv4, half IPv6 /64s; one request each, 10 us apart.
        let addr = if i % 2 == 0 {
            IpAddr::V4(Ipv4Addr::from((i / 2) as u32 ^ 0x5a5a_0000))
        } else {
            IpAddr::V6(Ipv6Addr::from(
                (0x2001_0db8u128 << 96) | (u128::from(i) << 64) | u128::from(x),
            ))
        };
        evicted += limiter.check_detail(addr, i * 10_000, x as u32).evicted as u64;
    }
    let after = rss_kib();
    println!("configured table_bytes: {} KiB", cfg.table_bytes / 1024);
    println!("limiter memory_bytes:   {} KiB", limiter.memory_bytes() / 1024);
    println!("VmRSS before new():     {start} KiB");
    println!("VmRSS after new():      {built} KiB");
    println!(
        "VmRSS after {clients} clients: {after} KiB (growth since new(): {} KiB)",
        after.saturating_sub(built)
    );
    println!("evictions of live entries: {evicted}");
}
