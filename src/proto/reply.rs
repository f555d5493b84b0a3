//! Server reply rules: which requests are answered, and the reply or Kiss-o'-Death written in place.
//!
//! The hot path builds one [`ReplyTemplate`] per batch from the clock snapshot, then for each
//! request calls [`check_request`] and [`write_reply`] on the receive buffer itself, and once the
//! whole batch is built, [`stamp_transmit`] with a single late T3. Nothing here allocates.

use super::packet::{HEADER_LEN, Header, LeapIndicator, Mode, RefId, STRATUM_KISS, STRATUM_UNSYNCHRONIZED, offset};
use super::timestamp::{NtpShort, NtpTimestamp};

/// Requests longer than this are dropped as oversized. A client request is a 48-byte header,
/// optionally followed by extension fields and a MAC; NTS (not served here) stays well under it.
/// Anything bigger is not a client we serve and may be a probe for a reflection bug.
pub const MAX_REQUEST_LEN: usize = 1024;

/// Why a datagram is not answered, as decided from its bytes alone.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum RequestError {
    /// Shorter than the 48-byte header.
    TooShort = 0,
    /// Longer than [`MAX_REQUEST_LEN`] (or truncated by the receive buffer).
    Oversized = 1,
    /// Version 0 or 5..=7.
    BadVersion = 2,
    /// Mode other than client (0 with version > 1, 1, 2, 4, 5).
    BadMode = 3,
    /// Mode 6 or 7 (control/private): never answered from the network (CVE-2013-5211).
    ControlMode = 4,
}

impl RequestError {
    pub const ALL: [RequestError; 5] = [
        RequestError::TooShort,
        RequestError::Oversized,
        RequestError::BadVersion,
        RequestError::BadMode,
        RequestError::ControlMode,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            RequestError::TooShort => "too_short",
            RequestError::Oversized => "oversized",
            RequestError::BadVersion => "bad_version",
            RequestError::BadMode => "bad_mode",
            RequestError::ControlMode => "control_mode",
        }
    }
}

/// Decides from the bytes alone whether a datagram is a client request we answer.
/// Cheapest checks first. NTPv1 had no mode field, so version 1 with mode 0 counts as a client
/// (RFC 1305 appendix B); any other mode 0 is dropped.
#[inline]
pub fn check_request(datagram: &[u8]) -> Result<(), RequestError> {
    if datagram.len() < HEADER_LEN || datagram.len() > MAX_REQUEST_LEN {
        // Off the common path: mode 6 requests (`ntpq`) are 12 bytes and mode 7 (`ntpdc`) ones
        // of any length; they are counted as control mode, not by their size.
        return Err(match datagram.first() {
            Some(lvm) if matches!(lvm & 7, 6 | 7) => RequestError::ControlMode,
            _ if datagram.len() < HEADER_LEN => RequestError::TooShort,
            _ => RequestError::Oversized,
        });
    }
    let lvm = datagram[offset::LI_VN_MODE];
    let version = (lvm >> 3) & 7;
    if !(1..=4).contains(&version) {
        return Err(RequestError::BadVersion);
    }
    match lvm & 7 {
        3 => Ok(()),
        0 if version == 1 => Ok(()),
        6 | 7 => Err(RequestError::ControlMode),
        _ => Err(RequestError::BadMode),
    }
}

/// What the server says about itself in every reply, taken from the clock snapshot.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ServerInfo {
    pub leap: LeapIndicator,
    /// 1..=15 when synchronised; 16 (or more) when not, sent as 0 on the wire.
    pub stratum: u8,
    pub precision: i8,
    pub root_delay: NtpShort,
    pub root_dispersion: NtpShort,
    pub reference_id: RefId,
    pub reference_timestamp: NtpTimestamp,
}

impl ServerInfo {
    /// What a server with no usable time says: LI 3, stratum 16 (0 on the wire), refid INIT,
    /// as ntpd does before its first synchronisation.
    pub const fn unsynchronized(precision: i8) -> ServerInfo {
        ServerInfo {
            leap: LeapIndicator::Unsynchronized,
            stratum: STRATUM_UNSYNCHRONIZED,
            precision,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::ZERO,
            reference_id: RefId::INIT,
            reference_timestamp: NtpTimestamp::ZERO,
        }
    }
}

/// The 48 bytes every reply of one batch shares; per request only version, poll and the
/// three timestamps change.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ReplyTemplate([u8; HEADER_LEN]);

impl ReplyTemplate {
    pub fn new(info: &ServerInfo) -> ReplyTemplate {
        let synced = info.leap != LeapIndicator::Unsynchronized && info.stratum < STRATUM_UNSYNCHRONIZED;
        let h = Header {
            leap: if synced {
                info.leap
            } else {
                LeapIndicator::Unsynchronized
            },
            version: 0,
            mode: Mode::Server,
            // RFC 5905 section 7.3: stratum 16 and above are sent as 0.
            stratum: if info.stratum >= STRATUM_UNSYNCHRONIZED {
                STRATUM_KISS
            } else {
                info.stratum
            },
            poll: 0,
            precision: info.precision,
            root_delay: info.root_delay,
            root_dispersion: info.root_dispersion,
            reference_id: info.reference_id,
            reference_timestamp: info.reference_timestamp,
            ..Header::default()
        };
        ReplyTemplate(h.to_bytes())
    }

    /// A Kiss-o'-Death: LI 3, stratum 0, the kiss code as refid. The timestamps are still
    /// filled in, because SNTP clients (RFC 4330) discard a reply whose transmit timestamp is
    /// zero before they ever look at the kiss code.
    pub fn kiss(code: RefId) -> ReplyTemplate {
        let h = Header {
            leap: LeapIndicator::Unsynchronized,
            version: 0,
            mode: Mode::Server,
            stratum: STRATUM_KISS,
            reference_id: code,
            ..Header::default()
        };
        ReplyTemplate(h.to_bytes())
    }

    pub fn as_bytes(&self) -> &[u8; HEADER_LEN] {
        &self.0
    }
}

/// Overwrites a checked request (see [`check_request`]) with its reply, in place, and returns
/// the reply length (always 48, never more than the request). The transmit timestamp is left
/// for [`stamp_transmit`], so it can be taken as late as possible for the whole batch.
#[inline]
pub fn write_reply(buf: &mut [u8], template: &ReplyTemplate, receive_timestamp: NtpTimestamp) -> usize {
    let req: &mut [u8; HEADER_LEN] = (&mut buf[..HEADER_LEN]).try_into().expect("checked length");
    let version_bits = req[offset::LI_VN_MODE] & 0x38;
    let poll = req[offset::POLL];
    let mut origin = [0u8; 8];
    origin.copy_from_slice(&req[offset::TRANSMIT_TIMESTAMP..offset::TRANSMIT_TIMESTAMP + 8]);
    *req = template.0;
    req[offset::LI_VN_MODE] |= version_bits;
    req[offset::POLL] = poll;
    req[offset::ORIGIN_TIMESTAMP..offset::ORIGIN_TIMESTAMP + 8].copy_from_slice(&origin);
    req[offset::RECEIVE_TIMESTAMP..offset::RECEIVE_TIMESTAMP + 8].copy_from_slice(&receive_timestamp.to_be_bytes());
    HEADER_LEN
}

/// Sets T3 in a reply written by [`write_reply`].
#[inline]
pub fn stamp_transmit(reply: &mut [u8], transmit_timestamp: NtpTimestamp) {
    reply[offset::TRANSMIT_TIMESTAMP..offset::TRANSMIT_TIMESTAMP + 8]
        .copy_from_slice(&transmit_timestamp.to_be_bytes());
}

/// The whole reply rule in one call, for tests, fuzzing and anything not on the hot path:
/// `None` means the request is dropped.
pub fn respond(
    request: &[u8],
    info: &ServerInfo,
    receive_timestamp: NtpTimestamp,
    transmit_timestamp: NtpTimestamp,
) -> Result<[u8; HEADER_LEN], RequestError> {
    check_request(request)?;
    let mut buf = [0u8; HEADER_LEN];
    buf.copy_from_slice(&request[..HEADER_LEN]);
    write_reply(&mut buf, &ReplyTemplate::new(info), receive_timestamp);
    stamp_transmit(&mut buf, transmit_timestamp);
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn synced() -> ServerInfo {
        ServerInfo {
            leap: LeapIndicator::NoWarning,
            stratum: 2,
            precision: -24,
            root_delay: NtpShort(0x0000_0123),
            root_dispersion: NtpShort(0x0000_0456),
            reference_id: RefId([127, 0, 0, 1]),
            reference_timestamp: NtpTimestamp(0xe000_0000_0000_0001),
        }
    }

    fn request(version: u8, mode: u8, tx: u64) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0] = (version << 3) | mode;
        b[2] = 6;
        b[40..48].copy_from_slice(&tx.to_be_bytes());
        b
    }

    #[test]
    fn reply_fields() {
        let req = request(4, 3, 0x1122_3344_5566_7788);
        let t2 = NtpTimestamp(0xe000_0001_0000_0000);
        let t3 = NtpTimestamp(0xe000_0001_0000_1000);
        let r = Header::decode(&respond(&req, &synced(), t2, t3).unwrap()).unwrap();
        assert_eq!(r.leap, LeapIndicator::NoWarning);
        assert_eq!(r.version, 4);
        assert_eq!(r.mode, Mode::Server);
        assert_eq!(r.stratum, 2);
        assert_eq!(r.poll, 6);
        assert_eq!(r.precision, -24);
        assert_eq!(r.root_delay, NtpShort(0x123));
        assert_eq!(r.root_dispersion, NtpShort(0x456));
        assert_eq!(r.reference_id, RefId([127, 0, 0, 1]));
        assert_eq!(r.reference_timestamp, NtpTimestamp(0xe000_0000_0000_0001));
        assert_eq!(r.origin_timestamp, NtpTimestamp(0x1122_3344_5566_7788));
        assert_eq!(r.receive_timestamp, t2);
        assert_eq!(r.transmit_timestamp, t3);
    }

    #[test]
    fn version_is_echoed() {
        for v in 1..=4 {
            let r = respond(&request(v, 3, 1), &synced(), NtpTimestamp(1), NtpTimestamp(2)).unwrap();
            assert_eq!(Header::decode(&r).unwrap().version, v);
        }
    }

    #[test]
    fn ntpv1_mode_zero_is_a_client() {
        assert_eq!(check_request(&request(1, 0, 1)), Ok(()));
        assert_eq!(check_request(&request(4, 0, 1)), Err(RequestError::BadMode));
    }

    #[test]
    fn bad_requests_are_classified() {
        for mode in [1, 2, 4, 5] {
            assert_eq!(
                check_request(&request(4, mode, 1)),
                Err(RequestError::BadMode),
                "mode {mode}"
            );
        }
        for mode in [6, 7] {
            assert_eq!(
                check_request(&request(2, mode, 1)),
                Err(RequestError::ControlMode),
                "mode {mode}"
            );
        }
        for v in [0, 5, 6, 7] {
            assert_eq!(
                check_request(&request(v, 3, 1)),
                Err(RequestError::BadVersion),
                "version {v}"
            );
        }
        assert_eq!(check_request(&[0x23; 47]), Err(RequestError::TooShort));
        assert_eq!(check_request(&[]), Err(RequestError::TooShort));
        let mut big = vec![0u8; MAX_REQUEST_LEN + 1];
        big[0] = 0x23;
        assert_eq!(check_request(&big), Err(RequestError::Oversized));
        big.truncate(MAX_REQUEST_LEN);
        assert_eq!(check_request(&big), Ok(()));
    }

    #[test]
    fn control_mode_counted_as_such_whatever_the_length() {
        // `ntpq -p`'s first request: a 12-byte mode 6 header (version 2, READVAR).
        let ntpq = [0x16, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(check_request(&ntpq), Err(RequestError::ControlMode));
        assert_eq!(
            check_request(&[0x17]),
            Err(RequestError::ControlMode),
            "mode 7, one byte"
        );
        let mut big = vec![0u8; MAX_REQUEST_LEN + 1];
        big[0] = 0x17;
        assert_eq!(check_request(&big), Err(RequestError::ControlMode), "mode 7, oversized");
    }

    #[test]
    fn unsynchronized_reply_is_li3_stratum0() {
        let r = respond(
            &request(4, 3, 1),
            &ServerInfo::unsynchronized(-20),
            NtpTimestamp(1),
            NtpTimestamp(2),
        )
        .unwrap();
        let h = Header::decode(&r).unwrap();
        assert_eq!(h.leap, LeapIndicator::Unsynchronized);
        assert_eq!(h.stratum, 0);
        assert_eq!(h.reference_id, RefId::INIT);
    }

    #[test]
    fn kiss_of_death() {
        let mut buf = request(3, 3, 0xabcdef);
        let n = write_reply(&mut buf, &ReplyTemplate::kiss(RefId::RATE), NtpTimestamp(5));
        assert_eq!(n, 48);
        let h = Header::decode(&buf).unwrap();
        assert_eq!(h.kiss_code(), Some(RefId::RATE));
        assert_eq!(h.leap, LeapIndicator::Unsynchronized);
        assert_eq!(h.version, 3);
        assert_eq!(h.mode, Mode::Server);
        assert_eq!(h.origin_timestamp, NtpTimestamp(0xabcdef));
    }

    proptest! {
        /// Never more bytes out than in, whatever arrives.
        #[test]
        fn reply_never_longer_than_request(req in proptest::collection::vec(any::<u8>(), 0..1100)) {
            if let Ok(r) = respond(&req, &synced(), NtpTimestamp(1), NtpTimestamp(2)) {
                prop_assert!(r.len() <= req.len());
                let h = Header::decode(&r).unwrap();
                prop_assert_eq!(h.mode, Mode::Server);
                prop_assert_eq!(&r[24..32], &req[40..48]);
            }
        }

        #[test]
        fn only_client_requests_are_answered(lvm: u8, rest in proptest::collection::vec(any::<u8>(), 47..60)) {
            let mut req = vec![lvm];
            req.extend_from_slice(&rest);
            let ok = check_request(&req).is_ok();
            let v = (lvm >> 3) & 7;
            let m = lvm & 7;
            prop_assert_eq!(ok, (1..=4).contains(&v) && (m == 3 || (m == 0 && v == 1)));
        }
    }
}
