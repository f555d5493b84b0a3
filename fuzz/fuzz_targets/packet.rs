//! Fuzz target: header decoding and the reply rule on arbitrary datagrams. A reply is never
//! longer than the request, always mode 4 with the request's version, and its origin timestamp
//! is the request's transmit timestamp byte for byte.
#![no_main]

use gnomon::proto::{
    Header, LeapIndicator, Mode, NtpShort, NtpTimestamp, RefId, ReplyTemplate, ServerInfo, check_request, respond,
    write_reply,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        // Every bit of the header is a field: decode then encode is the identity.
        assert_eq!(&h.to_bytes()[..], &data[..48]);
    }
    let info = ServerInfo {
        leap: LeapIndicator::from_bits(data.first().copied().unwrap_or(0)),
        stratum: data.get(1).copied().unwrap_or(2),
        precision: -24,
        root_delay: NtpShort(0x123),
        root_dispersion: NtpShort(0x456),
        reference_id: RefId(*b"GPS\0"),
        reference_timestamp: NtpTimestamp(0xe000_0000_0000_0001),
    };
    let t2 = NtpTimestamp(0xe000_0001_0000_0000);
    let t3 = NtpTimestamp(0xe000_0001_0000_1000);
    match respond(data, &info, t2, t3) {
        Ok(reply) => {
            assert!(check_request(data).is_ok());
            assert!(reply.len() <= data.len());
            assert_eq!(&reply[24..32], &data[40..48]);
            let r = Header::decode(&reply).expect("a reply is a whole header");
            let q = Header::decode(data).expect("an answered request is a whole header");
            assert_eq!(r.mode, Mode::Server);
            assert_eq!(r.version, q.version);
            assert_eq!(r.poll, q.poll);
            assert_eq!((r.receive_timestamp, r.transmit_timestamp), (t2, t3));
            // A Kiss-o'-Death written in place is no longer either.
            let mut buf = data.to_vec();
            let n = write_reply(&mut buf, &ReplyTemplate::kiss(RefId::RATE), t2);
            assert!(n <= data.len());
            assert_eq!(&buf[24..32], &data[40..48]);
            assert_eq!(Header::decode(&buf[..n]).unwrap().kiss_code(), Some(RefId::RATE));
        }
        Err(_) => assert!(check_request(data).is_err()),
    }
});
