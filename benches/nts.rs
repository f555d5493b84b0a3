//! Per-request cost of NTS on the server, in ns/request: opening the cookie, checking the
//! authenticator and sealing the new cookies in place, with and without placeholders, against
//! the plain reply of the same handler.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gnomon::nts::client;
use gnomon::nts::cookie::{COOKIE_LEN, CookieJar, KeySet, SessionKeys};
use gnomon::nts::ntp::{NtsServer, ReplyHeader, Verdict};
use gnomon::proto::{NtpTimestamp, ReplyTemplate, ServerInfo};
use std::hint::black_box;

fn nts(c: &mut Criterion) {
    let keys = KeySet::derive(b"bench secret", 1, 2);
    let session = SessionKeys {
        aead: 15,
        c2s: [3; 32],
        s2c: [4; 32],
    };
    let mut cookie = [0u8; COOKIE_LEN];
    CookieJar::new(&keys).seal(&session, &[1; 16], &mut cookie);
    let mut header = [0u8; 48];
    header[0] = 0x23;
    let template = ReplyTemplate::new(&ServerInfo::unsynchronized(-20));
    let reply_header = ReplyHeader {
        template: &template,
        receive: NtpTimestamp(1),
        transmit: NtpTimestamp(2),
    };
    let mut server = NtsServer::new(&keys, [9; 32]);
    let mut g = c.benchmark_group("nts");
    g.throughput(Throughput::Elements(1));
    for placeholders in [0usize, 7] {
        let request = client::request(&header, &[7; 32], &cookie, placeholders, &session.c2s, &[8; 16]);
        let mut buf = [0u8; 1024];
        g.bench_function(format!("request_{}_cookies", 1 + placeholders), |b| {
            b.iter(|| {
                buf[..request.len()].copy_from_slice(&request);
                let v = server.handle(&mut buf, request.len(), &reply_header);
                assert!(matches!(v, Verdict::Reply(_)));
                black_box(&buf);
            })
        });
    }
    let mut jar = CookieJar::new(&keys);
    g.bench_function("cookie_open", |b| {
        b.iter(|| black_box(jar.open(black_box(&cookie)).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, nts);
criterion_main!(benches);
