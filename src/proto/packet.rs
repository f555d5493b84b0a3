//! The 48-byte NTP header (versions 1-4): field types, decode and encode.

use super::timestamp::{NtpShort, NtpTimestamp};
use core::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Length of the fixed NTP header. Extension fields and MACs may follow; they are ignored.
pub const HEADER_LEN: usize = 48;

/// RFC 5905 leap indicator.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum LeapIndicator {
    NoWarning = 0,
    /// Last minute of the day has 61 seconds.
    AddSecond = 1,
    /// Last minute of the day has 59 seconds.
    DeleteSecond = 2,
    /// Clock unsynchronised (alarm).
    Unsynchronized = 3,
}

impl LeapIndicator {
    pub const fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => LeapIndicator::NoWarning,
            1 => LeapIndicator::AddSecond,
            2 => LeapIndicator::DeleteSecond,
            _ => LeapIndicator::Unsynchronized,
        }
    }
}

/// RFC 5905 association mode.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum Mode {
    Reserved = 0,
    SymmetricActive = 1,
    SymmetricPassive = 2,
    Client = 3,
    Server = 4,
    Broadcast = 5,
    Control = 6,
    Private = 7,
}

impl Mode {
    pub const fn from_bits(b: u8) -> Self {
        match b & 7 {
            0 => Mode::Reserved,
            1 => Mode::SymmetricActive,
            2 => Mode::SymmetricPassive,
            3 => Mode::Client,
            4 => Mode::Server,
            5 => Mode::Broadcast,
            6 => Mode::Control,
            _ => Mode::Private,
        }
    }
}

/// Stratum 0 in a packet means "unspecified or invalid"; with it the refid is a kiss code.
pub const STRATUM_KISS: u8 = 0;
/// Stratum 16 and above: unsynchronised. Sent on the wire as 0 (RFC 5905 section 7.3).
pub const STRATUM_UNSYNCHRONIZED: u8 = 16;

/// The 32-bit reference identifier. Its meaning depends on the stratum:
/// a kiss code at stratum 0, an ASCII source code at stratum 1, else an address hash.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RefId(pub [u8; 4]);

impl RefId {
    pub const RATE: RefId = RefId(*b"RATE");
    pub const DENY: RefId = RefId(*b"DENY");
    pub const RSTR: RefId = RefId(*b"RSTR");
    pub const INIT: RefId = RefId(*b"INIT");
    pub const LOCL: RefId = RefId(*b"LOCL");

    /// An ASCII code such as `GPS`, padded with zeros to four bytes.
    /// Returns `None` unless 1..=4 printable ASCII characters.
    pub fn ascii(code: &str) -> Option<RefId> {
        let b = code.as_bytes();
        if b.is_empty() || b.len() > 4 || !b.iter().all(|c| c.is_ascii_graphic()) {
            return None;
        }
        let mut out = [0u8; 4];
        out[..b.len()].copy_from_slice(b);
        Some(RefId(out))
    }

    /// The refid a server below stratum 1 advertises for its upstream (RFC 5905 section 7.3):
    /// the IPv4 address, or the first four bytes of the MD5 digest of the IPv6 address.
    pub fn from_upstream(addr: IpAddr) -> RefId {
        match addr {
            IpAddr::V4(a) => RefId(a.octets()),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => RefId(v4.octets()),
                None => Self::from_ipv6(a),
            },
        }
    }

    pub fn from_ipv6(a: Ipv6Addr) -> RefId {
        use md5::{Digest, Md5};
        let d = Md5::digest(a.octets());
        RefId([d[0], d[1], d[2], d[3]])
    }

    pub const fn to_ipv4(self) -> Ipv4Addr {
        Ipv4Addr::new(self.0[0], self.0[1], self.0[2], self.0[3])
    }

    /// True when the four bytes read as an ASCII code (kiss codes and stratum-1 source names).
    pub fn is_ascii_code(self) -> bool {
        let n = self.0.iter().position(|&c| c == 0).unwrap_or(4);
        n > 0
            && self.0[..n].iter().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit())
            && self.0[n..].iter().all(|&c| c == 0)
    }

    /// Text form, the one `status`, `sources` and `query` all show: the ASCII code for stratum
    /// 0 and 1 when the bytes are one (kiss codes, a stratum-1 server's source), else a dotted
    /// quad (chrony's local clock sends 127.127.1.1 at stratum 1), with the code after it when
    /// a server above stratum 1 sends one (ntpd's LOCAL clock, gnomon's `local_stratum`).
    pub fn display(self, stratum: u8) -> String {
        if stratum <= 1 && self.is_ascii_code() {
            let n = self.0.iter().position(|&c| c == 0).unwrap_or(4);
            self.0[..n].iter().map(|&c| c as char).collect()
        } else if stratum > 1 && self.0.iter().all(|c| c.is_ascii_uppercase()) {
            // Not an address anyone uses: a code, shown after the quad a client compares.
            format!("{} ({})", self.to_ipv4(), self.display(0))
        } else {
            self.to_ipv4().to_string()
        }
    }
}

impl fmt::Debug for RefId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_ascii_code() {
            write!(f, "RefId({:?})", self.display(0))
        } else {
            write!(f, "RefId({})", self.to_ipv4())
        }
    }
}

/// Why bytes could not be read as an NTP header. Flat and `Copy`, so the hot path can count it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum DecodeError {
    /// Fewer than 48 bytes.
    TooShort,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooShort => write!(f, "shorter than the 48-byte NTP header"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// The NTP header, field names as in RFC 5905 figure 8.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Header {
    pub leap: LeapIndicator,
    /// 1..=4 for real packets; any 3-bit value decodes.
    pub version: u8,
    pub mode: Mode,
    pub stratum: u8,
    /// log2 seconds.
    pub poll: i8,
    /// log2 seconds.
    pub precision: i8,
    pub root_delay: NtpShort,
    pub root_dispersion: NtpShort,
    pub reference_id: RefId,
    pub reference_timestamp: NtpTimestamp,
    pub origin_timestamp: NtpTimestamp,
    pub receive_timestamp: NtpTimestamp,
    pub transmit_timestamp: NtpTimestamp,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            leap: LeapIndicator::NoWarning,
            version: 4,
            mode: Mode::Client,
            stratum: 0,
            poll: 0,
            precision: 0,
            root_delay: NtpShort::ZERO,
            root_dispersion: NtpShort::ZERO,
            reference_id: RefId([0; 4]),
            reference_timestamp: NtpTimestamp::ZERO,
            origin_timestamp: NtpTimestamp::ZERO,
            receive_timestamp: NtpTimestamp::ZERO,
            transmit_timestamp: NtpTimestamp::ZERO,
        }
    }
}

fn ts_at(b: &[u8], at: usize) -> NtpTimestamp {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    NtpTimestamp::from_be_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    a
}

/// Byte offsets of the header fields.
pub mod offset {
    pub const LI_VN_MODE: usize = 0;
    pub const STRATUM: usize = 1;
    pub const POLL: usize = 2;
    pub const PRECISION: usize = 3;
    pub const ROOT_DELAY: usize = 4;
    pub const ROOT_DISPERSION: usize = 8;
    pub const REFERENCE_ID: usize = 12;
    pub const REFERENCE_TIMESTAMP: usize = 16;
    pub const ORIGIN_TIMESTAMP: usize = 24;
    pub const RECEIVE_TIMESTAMP: usize = 32;
    pub const TRANSMIT_TIMESTAMP: usize = 40;
}

impl Header {
    /// Reads the first 48 bytes; anything after them (extension fields, MAC) is ignored.
    pub fn decode(b: &[u8]) -> Result<Header, DecodeError> {
        if b.len() < HEADER_LEN {
            return Err(DecodeError::TooShort);
        }
        let lvm = b[offset::LI_VN_MODE];
        Ok(Header {
            leap: LeapIndicator::from_bits(lvm >> 6),
            version: (lvm >> 3) & 7,
            mode: Mode::from_bits(lvm),
            stratum: b[offset::STRATUM],
            poll: b[offset::POLL] as i8,
            precision: b[offset::PRECISION] as i8,
            root_delay: NtpShort::from_be_bytes(u32_at(b, offset::ROOT_DELAY)),
            root_dispersion: NtpShort::from_be_bytes(u32_at(b, offset::ROOT_DISPERSION)),
            reference_id: RefId(u32_at(b, offset::REFERENCE_ID)),
            reference_timestamp: ts_at(b, offset::REFERENCE_TIMESTAMP),
            origin_timestamp: ts_at(b, offset::ORIGIN_TIMESTAMP),
            receive_timestamp: ts_at(b, offset::RECEIVE_TIMESTAMP),
            transmit_timestamp: ts_at(b, offset::TRANSMIT_TIMESTAMP),
        })
    }

    pub fn encode(&self, b: &mut [u8; HEADER_LEN]) {
        b[offset::LI_VN_MODE] = ((self.leap as u8) << 6) | ((self.version & 7) << 3) | self.mode as u8;
        b[offset::STRATUM] = self.stratum;
        b[offset::POLL] = self.poll as u8;
        b[offset::PRECISION] = self.precision as u8;
        b[offset::ROOT_DELAY..offset::ROOT_DELAY + 4].copy_from_slice(&self.root_delay.to_be_bytes());
        b[offset::ROOT_DISPERSION..offset::ROOT_DISPERSION + 4].copy_from_slice(&self.root_dispersion.to_be_bytes());
        b[offset::REFERENCE_ID..offset::REFERENCE_ID + 4].copy_from_slice(&self.reference_id.0);
        b[offset::REFERENCE_TIMESTAMP..offset::REFERENCE_TIMESTAMP + 8]
            .copy_from_slice(&self.reference_timestamp.to_be_bytes());
        b[offset::ORIGIN_TIMESTAMP..offset::ORIGIN_TIMESTAMP + 8].copy_from_slice(&self.origin_timestamp.to_be_bytes());
        b[offset::RECEIVE_TIMESTAMP..offset::RECEIVE_TIMESTAMP + 8]
            .copy_from_slice(&self.receive_timestamp.to_be_bytes());
        b[offset::TRANSMIT_TIMESTAMP..offset::TRANSMIT_TIMESTAMP + 8]
            .copy_from_slice(&self.transmit_timestamp.to_be_bytes());
    }

    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        self.encode(&mut b);
        b
    }

    /// A kiss code if this is a Kiss-o'-Death (stratum 0 with an ASCII refid). `INIT` and other
    /// codes also come from servers that are merely unsynchronised; see [`Header::is_refusal`].
    pub fn kiss_code(&self) -> Option<RefId> {
        (self.stratum == STRATUM_KISS && self.reference_id.is_ascii_code()).then_some(self.reference_id)
    }

    /// A Kiss-o'-Death that tells the client to stop or slow down (RATE, DENY, RSTR).
    pub fn is_refusal(&self) -> bool {
        matches!(self.kiss_code(), Some(RefId::RATE | RefId::DENY | RefId::RSTR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_header() -> impl Strategy<Value = Header> {
        (
            (0u8..4, 0u8..8, 0u8..8, any::<u8>(), any::<i8>(), any::<i8>()),
            (any::<u32>(), any::<u32>(), any::<[u8; 4]>()),
            (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
        )
            .prop_map(
                |((li, vn, mode, stratum, poll, precision), (rd, rdisp, refid), (t0, t1, t2, t3))| Header {
                    leap: LeapIndicator::from_bits(li),
                    version: vn,
                    mode: Mode::from_bits(mode),
                    stratum,
                    poll,
                    precision,
                    root_delay: NtpShort(rd),
                    root_dispersion: NtpShort(rdisp),
                    reference_id: RefId(refid),
                    reference_timestamp: NtpTimestamp(t0),
                    origin_timestamp: NtpTimestamp(t1),
                    receive_timestamp: NtpTimestamp(t2),
                    transmit_timestamp: NtpTimestamp(t3),
                },
            )
    }

    proptest! {
        #[test]
        fn header_round_trip(h in arb_header()) {
            let b = h.to_bytes();
            prop_assert_eq!(Header::decode(&b).unwrap(), h);
        }

        #[test]
        fn bytes_round_trip(b in proptest::array::uniform32(any::<u8>()), c in proptest::array::uniform16(any::<u8>())) {
            let mut raw = [0u8; 48];
            raw[..32].copy_from_slice(&b);
            raw[32..].copy_from_slice(&c);
            prop_assert_eq!(Header::decode(&raw).unwrap().to_bytes(), raw);
        }

        #[test]
        fn trailing_bytes_ignored(h in arb_header(), extra in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut v = h.to_bytes().to_vec();
            v.extend_from_slice(&extra);
            prop_assert_eq!(Header::decode(&v).unwrap(), h);
        }

        #[test]
        fn short_input_rejected(v in proptest::collection::vec(any::<u8>(), 0..48)) {
            prop_assert_eq!(Header::decode(&v), Err(DecodeError::TooShort));
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Captured from Debian's chronyd 4.3 (`chronyd -Q`) on loopback.
    #[test]
    fn chrony_request_decoded() {
        let b = hex("230006200000000000000000000000000000000000000000000000000000000000000000000000008e6bce9a243a6710");
        let h = Header::decode(&b).unwrap();
        assert_eq!(h.leap, LeapIndicator::NoWarning);
        assert_eq!(h.version, 4);
        assert_eq!(h.mode, Mode::Client);
        assert_eq!(h.stratum, 0);
        assert_eq!(h.poll, 6);
        // chrony sends a fixed precision of 2^32 in requests rather than its own.
        assert_eq!(h.precision, 32);
        assert_eq!(h.root_delay, NtpShort::ZERO);
        assert_eq!(h.root_dispersion, NtpShort::ZERO);
        assert_eq!(h.reference_id, RefId([0; 4]));
        assert_eq!(h.reference_timestamp, NtpTimestamp::ZERO);
        assert_eq!(h.origin_timestamp, NtpTimestamp::ZERO);
        assert_eq!(h.receive_timestamp, NtpTimestamp::ZERO);
        // A random transmit timestamp (chrony does not reveal its clock in requests).
        assert_eq!(h.transmit_timestamp, NtpTimestamp(0x8e6b_ce9a_243a_6710));
        assert_eq!(h.to_bytes().as_slice(), b.as_slice());
    }

    /// Captured from Debian's ntpdig (NTPsec 1.2.2) on loopback.
    #[test]
    fn ntpdig_request_decoded() {
        let b = hex("e3000000000000000000000000000000000000000000000000000000000000000000000000000000eeb03191c6851000");
        let h = Header::decode(&b).unwrap();
        // SNTP clients send LI 3 (their own clock is unsynchronised).
        assert_eq!(h.leap, LeapIndicator::Unsynchronized);
        assert_eq!(h.version, 4);
        assert_eq!(h.mode, Mode::Client);
        assert_eq!((h.stratum, h.poll, h.precision), (0, 0, 0));
        assert_eq!(h.transmit_timestamp, NtpTimestamp(0xeeb0_3191_c685_1000));
        // Real time: 2026-11-24 (the capture date), era 0.
        let unix = h.transmit_timestamp.to_unix_nanos(1_795_000_000) / 1_000_000_000;
        assert_eq!(unix, 0xeeb0_3191 - 2_208_988_800);
        assert_eq!(h.to_bytes().as_slice(), b.as_slice());
    }

    #[test]
    fn refid_forms() {
        assert_eq!(RefId::ascii("GPS"), Some(RefId(*b"GPS\0")));
        assert_eq!(RefId::ascii(""), None);
        assert_eq!(RefId::ascii("TOOLONG"), None);
        assert_eq!(
            RefId::from_upstream("192.0.2.7".parse().unwrap()),
            RefId([192, 0, 2, 7])
        );
        // First four bytes of MD5 over the 16 address bytes of ::1; the digest comes from
        // python3 -c "import hashlib;print(hashlib.md5(bytes(15)+b'\x01').hexdigest())".
        assert_eq!(
            RefId::from_upstream("::1".parse().unwrap()),
            RefId([0xcf, 0x40, 0x4d, 0xc8])
        );
        assert!(RefId::RATE.is_ascii_code());
        assert!(RefId(*b"GPS\0").is_ascii_code());
        assert!(!RefId([127, 0, 0, 1]).is_ascii_code());
        assert_eq!(RefId([127, 0, 0, 1]).display(2), "127.0.0.1");
        assert_eq!(RefId::LOCL.display(1), "LOCL");
        // chrony's local clock at stratum 1: not a code, so the quad (was "????").
        assert_eq!(RefId([127, 127, 1, 1]).display(1), "127.127.1.1");
        assert_eq!(RefId::LOCL.display(10), "76.79.67.76 (LOCL)");
    }
}
