//! Tests of the NTP-side NTS handling, with the client half of `nts::client` as the peer.

use super::*;
use crate::nts::client::{self, ReplyError};
use crate::nts::cookie::SessionKeys;
use crate::proto::{Header, ServerInfo, check_request};
use proptest::prelude::*;

const C2S: [u8; 32] = [0x11; 32];
const S2C: [u8; 32] = [0x22; 32];

fn session() -> SessionKeys {
    SessionKeys {
        aead: 15,
        c2s: C2S,
        s2c: S2C,
    }
}

fn keys(epoch: u64) -> KeySet {
    KeySet::derive(b"test secret", epoch, 2)
}

fn server(epoch: u64) -> NtsServer {
    NtsServer::new(&keys(epoch), [7; 32])
}

fn make_cookie(epoch: u64) -> Vec<u8> {
    let mut out = [0u8; COOKIE_LEN];
    CookieJar::new(&keys(epoch)).seal(&session(), &[5; 16], &mut out);
    out.to_vec()
}

fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = 0x23;
    h[40..48].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
    h
}

const UID: [u8; 32] = [0xab; 32];

fn request(cookie: &[u8], placeholders: usize) -> Vec<u8> {
    client::request(&header(), &UID, cookie, placeholders, &C2S, &[9; 16])
}

fn run(s: &mut NtsServer, req: &[u8]) -> (Verdict, Vec<u8>) {
    let template = ReplyTemplate::new(&ServerInfo::unsynchronized(-20));
    let h = ReplyHeader {
        template: &template,
        receive: NtpTimestamp(0xe000_0000_0000_0001),
        transmit: NtpTimestamp(0xe000_0000_0000_0002),
    };
    let mut buf = vec![0u8; 2048];
    buf[..req.len()].copy_from_slice(req);
    let v = s.handle(&mut buf, req.len(), &h);
    let n = match v {
        Verdict::Reply(n) | Verdict::Nak(n, _) => n,
        _ => 0,
    };
    buf.truncate(n);
    (v, buf)
}

#[test]
fn answers_with_one_cookie_per_cookie_and_placeholder() {
    for placeholders in [0, 1, 3, 7] {
        let mut s = server(10);
        let req = request(&make_cookie(10), placeholders);
        let (v, reply) = run(&mut s, &req);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        // Placeholders are the same length as the cookie, so the reply is exactly as long.
        assert_eq!(reply.len(), req.len());
        let h = Header::decode(&reply).unwrap();
        assert_eq!(h.origin_timestamp, NtpTimestamp(0x1122_3344_5566_7788));
        assert_eq!(h.transmit_timestamp, NtpTimestamp(0xe000_0000_0000_0002));
        let cookies = client::verify_reply(&reply, &UID, &S2C).unwrap();
        assert_eq!(cookies.len(), 1 + placeholders);
        // Each new cookie opens to the same session and is unlike the others.
        let jar = CookieJar::new(&keys(10));
        for c in &cookies {
            assert_eq!(jar.open(c).unwrap(), session());
        }
        assert!(cookies.windows(2).all(|w| w[0] != w[1]));
        assert_eq!(s.take_counts()[Reason::Answered as usize], 1);
    }
}

#[test]
fn a_tampered_reply_fails_the_clients_check() {
    let mut s = server(10);
    let (_, reply) = run(&mut s, &request(&make_cookie(10), 0));
    for at in [1, 40, 60, reply.len() - 1] {
        let mut bad = reply.clone();
        bad[at] ^= 1;
        assert!(client::verify_reply(&bad, &UID, &S2C).is_err(), "flip at {at} accepted");
    }
    assert_eq!(
        client::verify_reply(&reply, &[0xcd; 32], &S2C),
        Err(ReplyError::WrongUniqueId)
    );
}

#[test]
fn old_cookies_work_through_the_window_then_nak() {
    let req = request(&make_cookie(10), 0);
    assert!(matches!(run(&mut server(12), &req).0, Verdict::Reply(_)));
    let (v, reply) = run(&mut server(13), &req);
    assert_eq!(v, Verdict::Nak(HEADER_LEN + 36, Reason::CookieUnknownKey));
    let h = Header::decode(&reply).unwrap();
    assert_eq!(h.kiss_code(), Some(NTSN));
    assert_eq!(client::verify_reply(&reply, &UID, &S2C), Err(ReplyError::Nak));
    // A server that rotates in place (set_keys) behaves the same.
    let mut s = server(10);
    s.set_keys(&keys(13));
    assert!(matches!(run(&mut s, &req).0, Verdict::Nak(_, Reason::CookieUnknownKey)));
}

#[test]
fn forged_cookies_and_bad_authenticators_get_naks() {
    let mut s = server(10);
    let mut forged = make_cookie(10);
    forged[30] ^= 1;
    assert_eq!(
        run(&mut s, &request(&forged, 0)).0,
        Verdict::Nak(HEADER_LEN + 36, Reason::CookieForged)
    );
    assert!(matches!(
        run(&mut s, &request(&make_cookie(10)[..100], 0)).0,
        Verdict::Nak(_, Reason::CookieBadLength)
    ));
    // The right cookie, the wrong C2S key.
    let req = client::request(&header(), &UID, &make_cookie(10), 0, &[0x33; 32], &[9; 16]);
    assert_eq!(
        run(&mut s, &req).0,
        Verdict::Nak(HEADER_LEN + 36, Reason::AuthenticationFailed)
    );
    // A change to the authenticated header after sealing.
    let mut req = request(&make_cookie(10), 0);
    req[2] ^= 1;
    assert!(matches!(
        run(&mut s, &req).0,
        Verdict::Nak(_, Reason::AuthenticationFailed)
    ));
    let counts = s.take_counts();
    assert_eq!(counts[Reason::CookieForged as usize], 1);
    assert_eq!(counts[Reason::AuthenticationFailed as usize], 2);
}

#[test]
fn a_replayed_request_is_answered_afresh() {
    // The server keeps no per-client state (RFC 8915 section 5.7); replay protection is the
    // client's Unique Identifier. A replay gets a reply with new nonces and new cookies.
    let mut s = server(10);
    let req = request(&make_cookie(10), 0);
    let (_, a) = run(&mut s, &req);
    let (_, b) = run(&mut s, &req);
    assert_ne!(a, b);
    assert_ne!(
        client::verify_reply(&a, &UID, &S2C).unwrap(),
        client::verify_reply(&b, &UID, &S2C).unwrap()
    );
}

#[test]
fn malformed_fields_are_dropped_or_left_to_the_plain_path() {
    let mut s = server(10);
    let good = request(&make_cookie(10), 0);
    // A plain request and one with a 20-byte legacy MAC: not NTS.
    assert_eq!(run(&mut s, &header()).0, Verdict::NotNts);
    let mut mac = header().to_vec();
    mac.extend_from_slice(&[0, 0, 0, 1]);
    mac.extend_from_slice(&[0xee; 16]);
    assert_eq!(run(&mut s, &mac).0, Verdict::NotNts);
    // Every truncation of an NTS request is dropped or left to the plain path, never answered.
    for n in HEADER_LEN + 1..good.len() {
        let v = run(&mut s, &good[..n]).0;
        assert!(
            matches!(v, Verdict::NotNts | Verdict::Drop(_)),
            "truncated to {n}: {v:?}"
        );
    }
    // No Unique Identifier.
    let mut no_uid = good.clone();
    no_uid[48..50].copy_from_slice(&0x7777u16.to_be_bytes());
    assert_eq!(run(&mut s, &no_uid).0, Verdict::Drop(Reason::NoUniqueId));
    // A field length that is not a multiple of 4: after an NTS field it is a broken NTS request,
    // as the first field it may be anything else (the plain path answers it).
    let mut odd = good.clone();
    odd[84 + 3] += 1;
    assert_eq!(run(&mut s, &odd).0, Verdict::Drop(Reason::Malformed));
    let mut odd_first = good.clone();
    odd_first[51] += 1;
    assert_eq!(run(&mut s, &odd_first).0, Verdict::NotNts);
    // A second cookie field.
    let mut two = header().to_vec();
    two.extend_from_slice(&good[48..48 + 36]);
    two.extend_from_slice(&good[84..84 + 108]);
    two.extend_from_slice(&good[84..]);
    assert_eq!(run(&mut s, &two).0, Verdict::Drop(Reason::Duplicate));
    // An authenticator whose ciphertext is longer than its field.
    let mut long_ct = good.clone();
    let auth = good.len() - 40;
    long_ct[auth + 6..auth + 8].copy_from_slice(&64u16.to_be_bytes());
    assert_eq!(run(&mut s, &long_ct).0, Verdict::Drop(Reason::BadAuthenticator));
}

#[test]
fn the_reply_is_never_longer_than_the_request() {
    // Placeholders shorter than the cookie: fewer cookies come back rather than a longer reply.
    let mut s = server(10);
    let good = request(&make_cookie(10), 0);
    let mut short = good[..good.len() - 40].to_vec();
    for _ in 0..3 {
        short.extend_from_slice(&[0x03, 0x04, 0, 16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    }
    let tag = Siv::new(&C2S).encrypt_in_place(&[&short[..], &[9u8; 16][..]], &mut []);
    short.extend_from_slice(&[0x04, 0x04, 0, 40, 0, 16, 0, 16]);
    short.extend_from_slice(&[9; 16]);
    short.extend_from_slice(&tag);
    let (v, reply) = run(&mut s, &short);
    assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
    assert!(reply.len() <= short.len());
    assert_eq!(client::verify_reply(&reply, &UID, &S2C).unwrap().len(), 1);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic_nor_grow(bytes in proptest::collection::vec(any::<u8>(), 48..700)) {
        let mut s = server(10);
        let mut req = bytes;
        req[0] = 0x23;
        prop_assume!(check_request(&req).is_ok());
        let (v, reply) = run(&mut s, &req);
        prop_assert!(reply.len() <= req.len());
        prop_assert!(!matches!(v, Verdict::Reply(_)));
    }

    #[test]
    fn mutated_requests_never_panic_nor_grow(at in 48usize..300, xor in 1u8..=255, cut in 0usize..200, placeholders in 0usize..4) {
        let mut s = server(10);
        let mut req = request(&make_cookie(10), placeholders);
        let at = at % req.len();
        req[at] ^= xor;
        req.truncate(req.len() - cut.min(req.len() - 48));
        let (v, reply) = run(&mut s, &req);
        prop_assert!(reply.len() <= req.len());
        // Any change to an authenticated byte is caught.
        prop_assert!(!matches!(v, Verdict::Reply(_)), "{v:?}");
    }
}

#[test]
fn a_client_session_refills_its_cookies_and_a_nak_empties_it() {
    use crate::nts::client::Session;
    use crate::nts::ke_client::KeSession;
    let mut s = server(10);
    let mut session = Session::new(KeSession {
        cookies: vec![make_cookie(10), make_cookie(10), make_cookie(10)],
        aead: 15,
        c2s: C2S,
        s2c: S2C,
        ntp_server: None,
        ntp_port: None,
    });
    let (req, pending) = session.request(&header(), UID, [9; 16]).unwrap();
    let (v, reply) = run(&mut s, &req);
    assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
    // Two left, so six asked for: the jar is full again.
    assert_eq!(session.reply(&reply, &pending), Ok(6));
    assert_eq!(session.cookies(), 8);
    // A reply to another request is not accepted, and changes nothing.
    let other = crate::nts::client::Pending { unique_id: [1; 32] };
    assert_eq!(session.reply(&reply, &other), Err(ReplyError::WrongUniqueId));
    assert_eq!(session.cookies(), 8);
    // A server that rotated the key out answers NTSN: time for a new key exchange.
    let (req, pending) = session.request(&header(), UID, [9; 16]).unwrap();
    let (v, reply) = run(&mut server(99), &req);
    assert!(matches!(v, Verdict::Nak(..)), "{v:?}");
    assert_eq!(session.reply(&reply, &pending), Err(ReplyError::Nak));
    assert_eq!(session.cookies(), 0);
    assert!(session.request(&header(), UID, [9; 16]).is_none());
}
