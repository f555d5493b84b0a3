//! Per-request cost of NTS on the server, in ns/request: opening the cookie, checking the
//! authenticator and sealing the new cookies in place, with and without placeholders, against
//! the plain reply of the same handler.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gnomon::nts::cookie::CookieJar;
use gnomon::nts::ntp::{NtsServer, ReplyHeader, Verdict};
use gnomon::proto::{NtpTimestamp, ReplyTemplate, ServerInfo};
use std::hint::black_box;

#[path = "../tests/common/nts_fixture.rs"]
mod nts_fixture;

fn nts(c: &mut Criterion) {
    let nts_fixture::Fixture { keys, cookie, .. } = nts_fixture::request(b"bench secret", 0);
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
        let request = nts_fixture::request(b"bench secret", placeholders).request;
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
    let jar = CookieJar::new(&keys);
    g.bench_function("cookie_open", |b| {
        b.iter(|| black_box(jar.open(black_box(&cookie)).is_ok()))
    });
    g.finish();
}

criterion_group!(benches, nts);
criterion_main!(benches);
