//! Reply validation: what each request looks like, how a reply is matched back to it (the
//! sequence number rides in the transmit timestamp), and which replies are wrong and why.
//! No I/O and no clock reads: the local time is an argument.

use gnomon::proto::{HEADER_LEN, Header, LeapIndicator, Mode, NtpDuration, NtpTimestamp, RefId};
use serde::Serialize;

/// Why a datagram we received does not count as a good reply. Unmatched and duplicate replies
/// are reasons of their own, apart from the field checks.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash, Serialize)]
#[repr(u8)]
pub enum Invalid {
    /// Shorter than the 48-byte header, or longer than our receive buffer.
    BadLength = 0,
    /// Not from the address and port the request went to.
    WrongSource = 1,
    /// Its origin timestamp is no request we sent (or one sent too long ago to remember).
    Unmatched = 2,
    /// A second reply to a request already answered.
    Duplicate = 3,
    /// Mode other than 4 (server).
    WrongMode = 4,
    /// Version differs from the request's.
    WrongVersion = 5,
    /// Transmit timestamp (T3) before receive timestamp (T2).
    TransmitBeforeReceive = 6,
    /// T2 or T3 further from our clock than the time bound.
    OutOfBound = 7,
    /// Echo mode: the bytes are not the request we sent.
    EchoMismatch = 8,
    /// `--nts`: the authenticator does not verify, or the Unique Identifier is not ours.
    Unauthenticated = 9,
}

impl Invalid {
    pub const COUNT: usize = 10;
    pub const ALL: [Invalid; Invalid::COUNT] = [
        Invalid::BadLength,
        Invalid::WrongSource,
        Invalid::Unmatched,
        Invalid::Duplicate,
        Invalid::WrongMode,
        Invalid::WrongVersion,
        Invalid::TransmitBeforeReceive,
        Invalid::OutOfBound,
        Invalid::EchoMismatch,
        Invalid::Unauthenticated,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Invalid::BadLength => "bad_length",
            Invalid::WrongSource => "wrong_source",
            Invalid::Unmatched => "unmatched",
            Invalid::Duplicate => "duplicate",
            Invalid::WrongMode => "wrong_mode",
            Invalid::WrongVersion => "wrong_version",
            Invalid::TransmitBeforeReceive => "t3_before_t2",
            Invalid::OutOfBound => "out_of_bound",
            Invalid::EchoMismatch => "echo_mismatch",
            Invalid::Unauthenticated => "unauthenticated",
        }
    }
}

/// Kiss-o'-Death codes, counted apart because each asks the client for something different.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum Kiss {
    Rate = 0,
    Deny = 1,
    Rstr = 2,
    Other = 3,
    /// NTS NAK: the cookie was refused.
    Ntsn = 4,
}

impl Kiss {
    pub const COUNT: usize = 5;
    pub const ALL: [Kiss; Kiss::COUNT] = [Kiss::Rate, Kiss::Deny, Kiss::Rstr, Kiss::Other, Kiss::Ntsn];

    pub fn from_code(code: RefId) -> Kiss {
        match code {
            RefId::RATE => Kiss::Rate,
            RefId::DENY => Kiss::Deny,
            RefId::RSTR => Kiss::Rstr,
            gnomon::nts::ntp::NTSN => Kiss::Ntsn,
            _ => Kiss::Other,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Kiss::Rate => "RATE",
            Kiss::Deny => "DENY",
            Kiss::Rstr => "RSTR",
            Kiss::Other => "other",
            Kiss::Ntsn => "NTSN",
        }
    }
}

/// What a reply that passed the checks says.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    /// A time reply; its leap indicator and stratum are tallied.
    Time {
        leap: LeapIndicator,
        stratum: u8,
    },
    Kiss(Kiss),
    /// Echo mode: the reply was our request, byte for byte.
    Echo,
}

/// Maps sequence numbers to transmit timestamps and back. The base is the run's start time,
/// so requests carry plausible timestamps (seq counts in units of 2^-32 s past it) and a
/// reply from an earlier run cannot match.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct SeqCodec {
    pub base: NtpTimestamp,
}

impl SeqCodec {
    pub fn transmit(&self, seq: u64) -> NtpTimestamp {
        NtpTimestamp(self.base.0.wrapping_add(seq))
    }

    /// The sequence number an origin timestamp stands for, if it could be one of ours.
    pub fn seq(&self, origin: NtpTimestamp) -> u64 {
        origin.0.wrapping_sub(self.base.0)
    }
}

/// The 48 request bytes every packet shares; per packet only the transmit timestamp changes.
pub fn request_template(version: u8) -> [u8; HEADER_LEN] {
    Header {
        version,
        mode: Mode::Client,
        ..Header::default()
    }
    .to_bytes()
}

/// Writes sequence number `seq` into a copy of the template.
#[inline]
pub fn fill_request(buf: &mut [u8; HEADER_LEN], template: &[u8; HEADER_LEN], codec: &SeqCodec, seq: u64) {
    *buf = *template;
    buf[40..48].copy_from_slice(&codec.transmit(seq).to_be_bytes());
}

/// Which timestamp field carries the sequence number back: the origin in a server reply,
/// the transmit field itself in an echo.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReplyKind {
    Ntp,
    Echo,
}

/// First step for any datagram: is it long enough, and which sequence number does it claim.
pub fn claimed_seq(reply: &[u8], kind: ReplyKind, codec: &SeqCodec) -> Result<u64, Invalid> {
    let h = Header::decode(reply).map_err(|_| Invalid::BadLength)?;
    Ok(match kind {
        ReplyKind::Ntp => codec.seq(h.origin_timestamp),
        ReplyKind::Echo => codec.seq(h.transmit_timestamp),
    })
}

/// Field checks for a server reply already matched to its request. A KoD is not checked for
/// timestamps: servers may leave them zero.
pub fn check_server_reply(
    reply: &[u8],
    request_version: u8,
    now: NtpTimestamp,
    time_bound: NtpDuration,
) -> Result<Verdict, Invalid> {
    let h = Header::decode(reply).map_err(|_| Invalid::BadLength)?;
    if h.mode != Mode::Server {
        return Err(Invalid::WrongMode);
    }
    if h.version != request_version {
        return Err(Invalid::WrongVersion);
    }
    if let Some(code) = h.kiss_code() {
        return Ok(Verdict::Kiss(Kiss::from_code(code)));
    }
    if h.transmit_timestamp.since(h.receive_timestamp).0 < 0 {
        return Err(Invalid::TransmitBeforeReceive);
    }
    let within = |t: NtpTimestamp| t.since(now).0.unsigned_abs() <= time_bound.0.unsigned_abs();
    if !within(h.receive_timestamp) || !within(h.transmit_timestamp) {
        return Err(Invalid::OutOfBound);
    }
    Ok(Verdict::Time {
        leap: h.leap,
        stratum: h.stratum,
    })
}

/// Echo mode: the reply must be exactly the request that carried this sequence number.
pub fn check_echo(reply: &[u8], template: &[u8; HEADER_LEN], codec: &SeqCodec, seq: u64) -> Result<(), Invalid> {
    let mut expected = [0u8; HEADER_LEN];
    fill_request(&mut expected, template, codec, seq);
    if reply == expected {
        Ok(())
    } else {
        Err(Invalid::EchoMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gnomon::proto::{NtpShort, ServerInfo, respond};

    const NOW: NtpTimestamp = NtpTimestamp::from_unix(1_800_000_000, 0);

    fn info() -> ServerInfo {
        ServerInfo {
            leap: LeapIndicator::NoWarning,
            stratum: 2,
            precision: -20,
            root_delay: NtpShort(10),
            root_dispersion: NtpShort(10),
            reference_id: RefId([127, 0, 0, 1]),
            reference_timestamp: NOW,
        }
    }

    fn bound() -> NtpDuration {
        NtpDuration::from_seconds_f64(1.0)
    }

    fn reply_to(seq: u64, t2: NtpTimestamp, t3: NtpTimestamp) -> ([u8; HEADER_LEN], SeqCodec) {
        let codec = SeqCodec { base: NOW };
        let mut req = [0; HEADER_LEN];
        fill_request(&mut req, &request_template(4), &codec, seq);
        (respond(&req, &info(), t2, t3).unwrap(), codec)
    }

    #[test]
    fn good_reply_matches_its_sequence() {
        let (r, codec) = reply_to(77, NOW, NOW);
        assert_eq!(claimed_seq(&r, ReplyKind::Ntp, &codec), Ok(77));
        assert_eq!(
            check_server_reply(&r, 4, NOW, bound()),
            Ok(Verdict::Time {
                leap: LeapIndicator::NoWarning,
                stratum: 2
            })
        );
    }

    #[test]
    fn each_bad_field_is_named() {
        let later = NOW.add(NtpDuration::from_nanos(1000));
        let (r, _) = reply_to(1, later, NOW);
        assert_eq!(
            check_server_reply(&r, 4, NOW, bound()),
            Err(Invalid::TransmitBeforeReceive)
        );
        let far = NOW.add(NtpDuration::from_seconds_f64(2.0));
        let (r, _) = reply_to(1, far, far);
        assert_eq!(check_server_reply(&r, 4, NOW, bound()), Err(Invalid::OutOfBound));
        let (mut r, _) = reply_to(1, NOW, NOW);
        assert_eq!(check_server_reply(&r, 3, NOW, bound()), Err(Invalid::WrongVersion));
        r[0] = (r[0] & !7) | 5;
        assert_eq!(check_server_reply(&r, 4, NOW, bound()), Err(Invalid::WrongMode));
        assert_eq!(check_server_reply(&r[..47], 4, NOW, bound()), Err(Invalid::BadLength));
    }

    #[test]
    fn kiss_codes_are_sorted() {
        for (code, kiss) in [
            (RefId::RATE, Kiss::Rate),
            (RefId::DENY, Kiss::Deny),
            (RefId::RSTR, Kiss::Rstr),
            (RefId(*b"NKEY"), Kiss::Other),
        ] {
            let (mut r, _) = reply_to(3, NtpTimestamp::ZERO, NtpTimestamp::ZERO);
            r[1] = 0;
            r[12..16].copy_from_slice(&code.0);
            assert_eq!(check_server_reply(&r, 4, NOW, bound()), Ok(Verdict::Kiss(kiss)));
        }
    }

    #[test]
    fn echo_must_be_the_request() {
        let codec = SeqCodec { base: NOW };
        let t = request_template(4);
        let mut req = [0; HEADER_LEN];
        fill_request(&mut req, &t, &codec, 9);
        assert_eq!(claimed_seq(&req, ReplyKind::Echo, &codec), Ok(9));
        assert_eq!(check_echo(&req, &t, &codec, 9), Ok(()));
        req[2] = 1;
        assert_eq!(check_echo(&req, &t, &codec, 9), Err(Invalid::EchoMismatch));
    }
}
