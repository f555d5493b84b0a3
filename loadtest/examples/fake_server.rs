//! A minimal correct NTP server for trying gnomon-load by hand: one thread, recv_from/send_to,
//! gnomon's reply rule, stratum 1. Stops by itself after the given seconds.
//! Usage: fake_server [ADDRESS] [SECONDS]  (default 127.0.0.1:12300 for 30 s)

use gnomon::clock::realtime_ns;
use gnomon::proto::{LeapIndicator, NtpShort, NtpTimestamp, RefId, ServerInfo, respond};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:12300".into());
    let secs: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let sock = UdpSocket::bind(&addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let end = Instant::now() + Duration::from_secs(secs);
    let now = || NtpTimestamp::from_unix_nanos(realtime_ns() as i128);
    let info = ServerInfo {
        leap: LeapIndicator::NoWarning,
        stratum: 1,
        precision: -20,
        root_delay: NtpShort::ZERO,
        root_dispersion: NtpShort(100),
        reference_id: RefId::LOCL,
        reference_timestamp: now(),
    };
    let mut buf = [0u8; 1024];
    let mut answered = 0u64;
    while Instant::now() < end {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let t2 = now();
        if let Ok(reply) = respond(&buf[..n], &info, t2, now()) {
            sock.send_to(&reply, from)?;
            answered += 1;
        }
    }
    eprintln!("fake_server: answered {answered}");
    Ok(())
}
