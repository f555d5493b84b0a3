//! Fuzz target: the server's NTS handling of arbitrary datagrams (extension-field parsing, cookie
//! opening, authenticator check). Nothing panics, a reply is never longer than the request, and
//! an arbitrary input never authenticates. The input is also tried behind a valid header, Unique
//! Identifier and cookie, so the fuzzer reaches the authenticator code at once.
#![no_main]

use gnomon::nts::cookie::{COOKIE_LEN, CookieJar, KeySet, SessionKeys};
use gnomon::nts::ntp::{NtsServer, ReplyHeader, Verdict};
use gnomon::proto::{NtpTimestamp, ReplyTemplate, ServerInfo};
use libfuzzer_sys::fuzz_target;

fn run(server: &mut NtsServer, req: &[u8]) {
    let template = ReplyTemplate::new(&ServerInfo::unsynchronized(-20));
    let header = ReplyHeader {
        template: &template,
        receive: NtpTimestamp(1),
        transmit: NtpTimestamp(2),
    };
    let mut buf = req.to_vec();
    match server.handle(&mut buf, req.len(), &header) {
        Verdict::Reply(n) => panic!("an arbitrary input authenticated ({n} bytes)"),
        Verdict::Nak(n, _) => assert!(n <= req.len()),
        Verdict::NotNts | Verdict::Drop(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let keys = KeySet::derive(b"fuzz secret", 1, 1);
    let mut server = NtsServer::new(&keys, [0; 32]);
    if data.len() >= 48 {
        run(&mut server, data);
    }
    let session = SessionKeys {
        aead: 15,
        c2s: [1; 32],
        s2c: [2; 32],
    };
    let mut cookie = [0u8; COOKIE_LEN];
    CookieJar::new(&keys).seal(&session, &[3; 16], &mut cookie);
    let mut req = vec![0u8; 48];
    req[0] = 0x23;
    req.extend_from_slice(&[0x01, 0x04, 0, 36]);
    req.extend_from_slice(&[4; 32]);
    req.extend_from_slice(&[0x02, 0x04, 0, (4 + COOKIE_LEN) as u8]);
    req.extend_from_slice(&cookie);
    req.extend_from_slice(data);
    run(&mut server, &req);
});
