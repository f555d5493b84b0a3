//! NTS-KE records (RFC 8915 section 4) and the server's answer to a request, as plain functions.
//!
//! The TLS layer (see `server.rs`) feeds the decrypted request bytes to [`respond`] and writes
//! back what it returns; nothing here touches a socket or the clock.

/// Record types (RFC 8915 section 4.1). The high bit of the type field is the critical bit.
pub mod record {
    pub const END_OF_MESSAGE: u16 = 0;
    pub const NEXT_PROTOCOL: u16 = 1;
    pub const ERROR: u16 = 2;
    pub const WARNING: u16 = 3;
    pub const AEAD_ALGORITHM: u16 = 4;
    pub const NEW_COOKIE: u16 = 5;
    pub const SERVER: u16 = 6;
    pub const PORT: u16 = 7;
}

pub const CRITICAL: u16 = 0x8000;
/// Next protocol id for NTPv4 (RFC 8915 section 7.7).
pub const PROTOCOL_NTPV4: u16 = 0;
/// AEAD_AES_SIV_CMAC_256 in the IANA AEAD registry.
pub const AEAD_AES_SIV_CMAC_256: u16 = 15;
/// Cookies handed out per key exchange (RFC 8915 section 4.1.6 suggests eight).
pub const COOKIES_PER_KE: usize = 8;
/// A request larger than this is not a client we serve; real ones are a few dozen bytes.
pub const MAX_REQUEST_LEN: usize = 1024;

/// Error codes of the Error record (RFC 8915 section 4.1.3).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u16)]
pub enum ErrorCode {
    UnrecognizedCriticalRecord = 0,
    BadRequest = 1,
    InternalServerError = 2,
}

/// One record as found on the wire.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Record<'a> {
    pub critical: bool,
    pub record_type: u16,
    pub body: &'a [u8],
}

/// Why request bytes are not (yet) a complete request.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DecodeError {
    /// More bytes are needed: the last record is cut short or no End of Message came yet.
    Incomplete,
    /// Bytes after End of Message, or a request over [`MAX_REQUEST_LEN`].
    Malformed,
}

/// Splits `buf` into records up to and including End of Message.
pub fn decode(buf: &[u8]) -> Result<Vec<Record<'_>>, DecodeError> {
    let mut records = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 4 {
            return Err(if buf.len() > MAX_REQUEST_LEN {
                DecodeError::Malformed
            } else {
                DecodeError::Incomplete
            });
        }
        let raw_type = u16::from_be_bytes([rest[0], rest[1]]);
        let len = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        if rest.len() < 4 + len {
            return Err(if buf.len() > MAX_REQUEST_LEN {
                DecodeError::Malformed
            } else {
                DecodeError::Incomplete
            });
        }
        let record = Record {
            critical: raw_type & CRITICAL != 0,
            record_type: raw_type & !CRITICAL,
            body: &rest[4..4 + len],
        };
        rest = &rest[4 + len..];
        let end = record.record_type == record::END_OF_MESSAGE;
        records.push(record);
        if end {
            return if rest.is_empty() {
                Ok(records)
            } else {
                Err(DecodeError::Malformed)
            };
        }
    }
}

/// Appends one record.
pub fn encode(out: &mut Vec<u8>, critical: bool, record_type: u16, body: &[u8]) {
    let t = record_type | if critical { CRITICAL } else { 0 };
    out.extend_from_slice(&t.to_be_bytes());
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
}

/// What the server says besides cookies: where NTP is served, if not the KE host and port 123.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Negotiation {
    pub server: Option<String>,
    pub port: Option<u16>,
}

/// What the KE server must do after [`respond`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send the response; cookies are to be made for this AEAD algorithm.
    Cookies { aead: u16 },
    /// Send the response (an error, or a negotiation that found nothing in common) and close.
    NoCookies,
}

fn u16_list(body: &[u8]) -> Option<impl Iterator<Item = u16> + '_> {
    body.len()
        .is_multiple_of(2)
        .then(|| body.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
}

fn error_response(code: ErrorCode) -> (Vec<u8>, Outcome) {
    let mut out = Vec::with_capacity(12);
    encode(&mut out, true, record::ERROR, &(code as u16).to_be_bytes());
    encode(&mut out, true, record::END_OF_MESSAGE, &[]);
    (out, Outcome::NoCookies)
}

/// The server's answer to a complete request, except the cookies: the caller appends
/// `New Cookie` records (made with [`push_cookie`]) and then [`finish`] when the outcome asks.
/// Client Server and Port records are ignored: the server says where it serves, not the client.
pub fn respond(records: &[Record<'_>], negotiation: &Negotiation) -> (Vec<u8>, Outcome) {
    let mut next_protocol = None;
    let mut aead = None;
    for r in records {
        match r.record_type {
            record::END_OF_MESSAGE => {}
            record::NEXT_PROTOCOL => {
                // Exactly once, and critical (RFC 8915 section 4.1.2).
                if next_protocol.is_some() || !r.critical {
                    return error_response(ErrorCode::BadRequest);
                }
                match u16_list(r.body) {
                    Some(mut ids) => next_protocol = Some(ids.any(|p| p == PROTOCOL_NTPV4)),
                    None => return error_response(ErrorCode::BadRequest),
                }
            }
            record::AEAD_ALGORITHM => {
                if aead.is_some() {
                    return error_response(ErrorCode::BadRequest);
                }
                match u16_list(r.body) {
                    Some(mut ids) => aead = Some(ids.any(|a| a == AEAD_AES_SIV_CMAC_256)),
                    None => return error_response(ErrorCode::BadRequest),
                }
            }
            // A client sends none of these; an error or warning from it, or cookies, are bad.
            record::ERROR | record::WARNING | record::NEW_COOKIE => {
                return error_response(ErrorCode::BadRequest);
            }
            record::SERVER | record::PORT => {}
            _ if r.critical => return error_response(ErrorCode::UnrecognizedCriticalRecord),
            _ => {}
        }
    }
    let Some(ntpv4) = next_protocol else {
        return error_response(ErrorCode::BadRequest);
    };
    let mut out = Vec::with_capacity(1024);
    if !ntpv4 {
        // None of the offered protocols: an empty list, and nothing else to negotiate.
        encode(&mut out, true, record::NEXT_PROTOCOL, &[]);
        encode(&mut out, true, record::END_OF_MESSAGE, &[]);
        return (out, Outcome::NoCookies);
    }
    // With NTPv4 the AEAD record is required (RFC 8915 section 4.1.5).
    let Some(aead_ok) = aead else {
        return error_response(ErrorCode::BadRequest);
    };
    encode(&mut out, true, record::NEXT_PROTOCOL, &PROTOCOL_NTPV4.to_be_bytes());
    if !aead_ok {
        encode(&mut out, true, record::AEAD_ALGORITHM, &[]);
        encode(&mut out, true, record::END_OF_MESSAGE, &[]);
        return (out, Outcome::NoCookies);
    }
    encode(
        &mut out,
        true,
        record::AEAD_ALGORITHM,
        &AEAD_AES_SIV_CMAC_256.to_be_bytes(),
    );
    if let Some(server) = &negotiation.server {
        encode(&mut out, true, record::SERVER, server.as_bytes());
    }
    if let Some(port) = negotiation.port {
        encode(&mut out, true, record::PORT, &port.to_be_bytes());
    }
    (
        out,
        Outcome::Cookies {
            aead: AEAD_AES_SIV_CMAC_256,
        },
    )
}

/// Appends one New Cookie record.
pub fn push_cookie(out: &mut Vec<u8>, cookie: &[u8]) {
    encode(out, false, record::NEW_COOKIE, cookie);
}

/// Closes a response with End of Message.
pub fn finish(out: &mut Vec<u8>) {
    encode(out, true, record::END_OF_MESSAGE, &[]);
}

/// The TLS exporter context for one direction (RFC 8915 section 5.1): protocol id, AEAD id and
/// 0x00 for client-to-server or 0x01 for server-to-client.
pub fn exporter_context(aead: u16, s2c: bool) -> [u8; 5] {
    let p = PROTOCOL_NTPV4.to_be_bytes();
    let a = aead.to_be_bytes();
    [p[0], p[1], a[0], a[1], s2c as u8]
}

/// The exporter label of RFC 8915 section 5.1.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-network-time-security";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(protocols: &[u16], aeads: Option<&[u16]>) -> Vec<u8> {
        let mut out = Vec::new();
        let p: Vec<u8> = protocols.iter().flat_map(|p| p.to_be_bytes()).collect();
        encode(&mut out, true, record::NEXT_PROTOCOL, &p);
        if let Some(aeads) = aeads {
            let a: Vec<u8> = aeads.iter().flat_map(|a| a.to_be_bytes()).collect();
            encode(&mut out, true, record::AEAD_ALGORITHM, &a);
        }
        encode(&mut out, true, record::END_OF_MESSAGE, &[]);
        out
    }

    fn answer(req: &[u8]) -> (Vec<(bool, u16, Vec<u8>)>, Outcome) {
        let records = decode(req).unwrap();
        let (mut out, outcome) = respond(&records, &Negotiation::default());
        if outcome != Outcome::NoCookies {
            finish(&mut out);
        }
        let parsed = decode(&out)
            .unwrap()
            .into_iter()
            .map(|r| (r.critical, r.record_type, r.body.to_vec()))
            .collect();
        (parsed, outcome)
    }

    #[test]
    fn round_trip_and_critical_bit() {
        let mut out = Vec::new();
        encode(&mut out, true, record::PORT, &123u16.to_be_bytes());
        encode(&mut out, false, record::SERVER, b"ntp.example");
        encode(&mut out, true, record::END_OF_MESSAGE, &[]);
        assert_eq!(&out[..6], &[0x80, 7, 0, 2, 0, 123]);
        let r = decode(&out).unwrap();
        assert_eq!(r.len(), 3);
        assert!(r[0].critical && !r[1].critical);
        assert_eq!((r[1].record_type, r[1].body), (record::SERVER, &b"ntp.example"[..]));
        // Every strict prefix is incomplete, never an error or a panic.
        for n in 0..out.len() {
            assert_eq!(decode(&out[..n]), Err(DecodeError::Incomplete));
        }
        let mut extra = out.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(DecodeError::Malformed));
    }

    #[test]
    fn good_request_gets_ntpv4_and_siv() {
        let (r, outcome) = answer(&request(&[0x8000, 0], Some(&[1, 15])));
        assert_eq!(outcome, Outcome::Cookies { aead: 15 });
        assert_eq!(r[0], (true, record::NEXT_PROTOCOL, vec![0, 0]));
        assert_eq!(r[1], (true, record::AEAD_ALGORITHM, vec![0, 15]));
        assert_eq!(r.last().unwrap().1, record::END_OF_MESSAGE);
    }

    #[test]
    fn server_and_port_are_announced() {
        let req = request(&[0], Some(&[15]));
        let n = Negotiation {
            server: Some("ntp2.example".into()),
            port: Some(1123),
        };
        let (out, _) = respond(&decode(&req).unwrap(), &n);
        let mut out = out;
        finish(&mut out);
        let r = decode(&out).unwrap();
        assert!(
            r.iter()
                .any(|r| r.record_type == record::SERVER && r.body == b"ntp2.example")
        );
        assert!(r.iter().any(|r| r.record_type == record::PORT && r.body == [4, 99]));
    }

    #[test]
    fn bad_requests_get_errors() {
        let err = |code: ErrorCode| {
            vec![
                (true, record::ERROR, (code as u16).to_be_bytes().to_vec()),
                (true, record::END_OF_MESSAGE, vec![]),
            ]
        };
        // No next protocol at all.
        let mut only_eom = Vec::new();
        encode(&mut only_eom, true, record::END_OF_MESSAGE, &[]);
        assert_eq!(answer(&only_eom).0, err(ErrorCode::BadRequest));
        // NTPv4 without an AEAD record.
        assert_eq!(answer(&request(&[0], None)).0, err(ErrorCode::BadRequest));
        // An odd-length list.
        let mut odd = Vec::new();
        encode(&mut odd, true, record::NEXT_PROTOCOL, &[0]);
        encode(&mut odd, true, record::END_OF_MESSAGE, &[]);
        assert_eq!(answer(&odd).0, err(ErrorCode::BadRequest));
        // An unknown critical record, and an unknown non-critical one (ignored).
        let mut crit = Vec::new();
        encode(&mut crit, true, 0x1234, &[1]);
        crit.extend_from_slice(&request(&[0], Some(&[15])));
        assert_eq!(answer(&crit).0, err(ErrorCode::UnrecognizedCriticalRecord));
        let mut noncrit = Vec::new();
        encode(&mut noncrit, false, 0x1234, &[1]);
        noncrit.extend_from_slice(&request(&[0], Some(&[15])));
        assert_eq!(answer(&noncrit).1, Outcome::Cookies { aead: 15 });
        // Twice the next protocol.
        let mut twice = Vec::new();
        encode(&mut twice, true, record::NEXT_PROTOCOL, &[0, 0]);
        twice.extend_from_slice(&request(&[0], Some(&[15])));
        assert_eq!(answer(&twice).0, err(ErrorCode::BadRequest));
    }

    #[test]
    fn nothing_in_common_gets_empty_lists() {
        let (r, outcome) = answer(&request(&[7], Some(&[15])));
        assert_eq!(outcome, Outcome::NoCookies);
        assert_eq!(r[0], (true, record::NEXT_PROTOCOL, vec![]));
        let (r, outcome) = answer(&request(&[0], Some(&[30])));
        assert_eq!(outcome, Outcome::NoCookies);
        assert_eq!(r[1], (true, record::AEAD_ALGORITHM, vec![]));
    }

    #[test]
    fn exporter_contexts() {
        assert_eq!(exporter_context(15, false), [0, 0, 0, 15, 0]);
        assert_eq!(exporter_context(15, true), [0, 0, 0, 15, 1]);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(records) = decode(&bytes) {
                let (out, _) = respond(&records, &Negotiation::default());
                prop_assert!(out.len() <= 64);
            }
        }
    }
}
