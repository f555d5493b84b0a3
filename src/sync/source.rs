//! One upstream server as seen by the client side: request building, reply validation, the
//! reachability register, poll interval control (iburst, backoff, Kiss-o'-Death) and the
//! per-source filter. Sans-IO: times are kernel realtime nanoseconds passed in.

use super::filter::{ClockFilter, Sample};
use super::{MAX_DISTANCE, MAX_POLL, MIN_POLL, UpstreamConfig};
use crate::clock::PHI;
use crate::proto::{HEADER_LEN, Header, LeapIndicator, Mode, NtpTimestamp, RefId};
use core::fmt;
use std::net::SocketAddr;

/// Polls sent 2 s apart at start when `iburst` is set.
pub const IBURST_COUNT: u8 = 6;
pub const IBURST_SPACING_NS: i64 = 2_000_000_000;
/// The first request waits this long after the source is added (chrony's INITIAL_DELAY), so
/// that it does not go out in the middle of the daemon's start-up (clknetsim skews clock reads
/// until a process first waits, which made the first sample 33 us off there).
pub const INITIAL_DELAY_NS: i64 = 200_000_000;
/// chrony's `polltarget`: the poll interval is adjusted so that the regression window (the
/// samples that still fit one line) holds about this many samples. A clock that wanders keeps
/// the window short, and so the interval.
const POLL_TARGET: f64 = 8.0;
/// A pool member unanswered for this many polls is dropped so the pool name is re-resolved.
pub const DROP_AFTER_MISSED: u32 = 16;

/// Why a reply was not used. Flat and `Copy` so a count per reason is cheap.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Rejection {
    TooShort,
    /// Mode other than 4 (server).
    NotServerMode,
    /// Origin timestamp is not the random transmit timestamp we sent: spoofed, late or duplicate.
    OriginMismatch,
    /// Kiss-o'-Death with this code.
    Kiss(RefId),
    /// LI 3 or stratum 0 / above 15: the upstream has no time to give.
    Unsynchronized,
    /// Receive or transmit timestamp zero.
    BadTimestamps,
    /// Root distance (seconds) over [`MAX_DISTANCE`].
    TooFar(f64),
    /// Nothing was sent, or the reply for the last request was already taken.
    NotExpected,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::TooShort => write!(f, "reply shorter than 48 bytes"),
            Rejection::NotServerMode => write!(f, "reply not in server mode"),
            Rejection::OriginMismatch => write!(f, "origin timestamp does not match the request"),
            Rejection::Kiss(code) => write!(f, "kiss code {} received", code.display(0)),
            Rejection::Unsynchronized => write!(f, "upstream unsynchronised"),
            Rejection::BadTimestamps => write!(f, "zero receive or transmit timestamp"),
            Rejection::TooFar(d) => write!(f, "too far (root distance {d:.3} s > {MAX_DISTANCE} s)"),
            Rejection::NotExpected => write!(f, "unexpected reply"),
        }
    }
}

/// chrony's get_poll_adj: `miss` is (|sample - prediction|, the sample's distance) when there
/// was a prediction, `window` the samples the regression keeps. A sample the prediction missed
/// by more than its own distance shortens it at once; otherwise the interval drifts so that the
/// window holds [`POLL_TARGET`] samples, shortening twice as fast as it lengthens.
fn poll_adjustment(miss: Option<(f64, f64)>, window: usize) -> f64 {
    if let Some((error, distance)) = miss
        && error > distance
        && distance > 0.0
    {
        return -(error / distance).log2();
    }
    let adj = (window as f64 / POLL_TARGET - 1.0) / POLL_TARGET;
    if adj < 0.0 { 2.0 * adj } else { adj }
}

/// The request the client sends: version 4, mode 3, and `transmit` (random, not our clock) as
/// the transmit timestamp. The real send time T1 stays local.
pub fn build_request(poll: i8, transmit: NtpTimestamp) -> [u8; HEADER_LEN] {
    Header {
        leap: LeapIndicator::NoWarning,
        version: 4,
        mode: Mode::Client,
        poll,
        transmit_timestamp: transmit,
        ..Header::default()
    }
    .to_bytes()
}

/// Checks a reply and turns it into a sample (RFC 5905 section 8 and chrony's tests).
/// `t1_ns`/`t4_ns` are the local realtime readings around the exchange, `request_transmit` the
/// random transmit timestamp of the request, `precision` our clock's (log2 s).
pub fn validate(
    request_transmit: NtpTimestamp,
    t1_ns: i64,
    reply: &[u8],
    t4_ns: i64,
    precision: i8,
) -> Result<Sample, Rejection> {
    let h = Header::decode(reply).map_err(|_| Rejection::TooShort)?;
    // Before anything else from the packet is believed, its mode and a kiss code included.
    if h.origin_timestamp != request_transmit {
        return Err(Rejection::OriginMismatch);
    }
    if h.mode != Mode::Server {
        return Err(Rejection::NotServerMode);
    }
    match h.kiss_code() {
        Some(code @ (RefId::RATE | RefId::DENY | RefId::RSTR)) => return Err(Rejection::Kiss(code)),
        // Other codes (INIT, STEP...) only say the server has no time to give yet.
        Some(_) => return Err(Rejection::Unsynchronized),
        None => {}
    }
    if h.leap == LeapIndicator::Unsynchronized || !(1..=15).contains(&h.stratum) {
        return Err(Rejection::Unsynchronized);
    }
    if h.receive_timestamp == NtpTimestamp::ZERO || h.transmit_timestamp == NtpTimestamp::ZERO {
        return Err(Rejection::BadTimestamps);
    }
    let pivot = t1_ns.div_euclid(1_000_000_000);
    let t1 = i128::from(t1_ns);
    let t2 = h.receive_timestamp.to_unix_nanos(pivot);
    let t3 = h.transmit_timestamp.to_unix_nanos(pivot);
    let t4 = i128::from(t4_ns);
    let offset = ((t2 - t1) + (t3 - t4)) as f64 * 0.5e-9;
    let rho_local = 2f64.powi(precision.into());
    let rho_server = 2f64.powi(h.precision.clamp(-32, 0).into());
    // Delay can come out negative with a server clock much finer than ours; clamp to precision.
    let delay = (((t4 - t1) - (t3 - t2)) as f64 * 1e-9).max(rho_local);
    let dispersion = rho_local + rho_server + PHI * ((t4 - t1) as f64 * 1e-9).max(0.0);
    let root_delay = h.root_delay.to_seconds_f64();
    let root_dispersion = h.root_dispersion.to_seconds_f64();
    let distance = (root_delay + delay) / 2.0 + root_dispersion + dispersion;
    if distance > MAX_DISTANCE {
        return Err(Rejection::TooFar(distance));
    }
    Ok(Sample {
        local_ns: t1_ns + (t4_ns - t1_ns) / 2,
        offset,
        delay,
        dispersion,
        root_delay,
        root_dispersion,
        leap: h.leap,
        stratum: h.stratum,
        reference_id: h.reference_id,
    })
}

/// A request in flight: what the reply must echo, and when it left.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Outstanding {
    transmit: NtpTimestamp,
    t1_ns: i64,
}

/// One upstream address and everything known about it.
#[derive(Clone, Debug)]
pub struct Source {
    /// The configured name (host, address or pool name).
    pub name: String,
    pub addr: SocketAddr,
    pub pool: bool,
    pub prefer: bool,
    pub trust: bool,
    pub iburst: bool,
    pub minpoll: i8,
    pub maxpoll: i8,
    /// Current poll exponent (log2 s).
    pub poll: i8,
    /// RFC 5905 reachability register: shifted left at each poll, bit 0 set by a valid reply.
    pub reach: u8,
    /// Polls that timed out since the last valid reply.
    pub missed: u32,
    /// Replies whose origin did not match (spoofed, duplicated or late).
    pub mismatched: u64,
    /// The last reply that was rejected, and why (cleared by a valid reply).
    pub last_rejection: Option<Rejection>,
    /// DENY or RSTR received: never polled again.
    pub denied: Option<RefId>,
    /// RATE received: polls stay at least this long (log2 s).
    pub rate_floor: Option<i8>,
    pub filter: ClockFilter,
    /// Local realtime of the last valid reply.
    pub last_reply_ns: Option<i64>,
    next_poll_ns: i64,
    burst_left: u8,
    /// Fractional poll adjustments carried over (chrony's poll score).
    poll_score: f64,
    outstanding: Option<Outstanding>,
}

impl Source {
    pub fn new(name: &str, addr: SocketAddr, cfg: &UpstreamConfig, now_ns: i64) -> Source {
        let minpoll = cfg.minpoll.clamp(MIN_POLL, MAX_POLL);
        let maxpoll = cfg.maxpoll.clamp(minpoll, MAX_POLL);
        Source {
            name: name.to_string(),
            addr,
            pool: cfg.pool,
            prefer: cfg.prefer,
            trust: cfg.trust,
            iburst: cfg.iburst,
            minpoll,
            maxpoll,
            poll: minpoll,
            reach: 0,
            missed: 0,
            mismatched: 0,
            last_rejection: None,
            denied: None,
            rate_floor: None,
            filter: ClockFilter::default(),
            last_reply_ns: None,
            next_poll_ns: now_ns + INITIAL_DELAY_NS,
            burst_left: if cfg.iburst { IBURST_COUNT } else { 0 },
            poll_score: 0.0,
            outstanding: None,
        }
    }

    /// When the next request is due; `None` once the source is denied.
    pub fn next_poll_at(&self) -> Option<i64> {
        self.denied.is_none().then_some(self.next_poll_ns)
    }

    fn interval_ns(&self) -> i64 {
        1_000_000_000i64 << self.poll.clamp(0, MAX_POLL)
    }

    /// Builds the next request if it is due. `random` must be fresh random bits: they become the
    /// transmit timestamp, which the reply has to echo.
    pub fn poll(&mut self, now_ns: i64, random: u64) -> Option<[u8; HEADER_LEN]> {
        if self.denied.is_some() || now_ns < self.next_poll_ns {
            return None;
        }
        if self.outstanding.is_some() {
            self.missed += 1;
        }
        self.reach <<= 1;
        // Back off from a silent server (RFC 5905 poll_update): each silent full register
        // doubles the interval, up to maxpoll.
        if self.reach == 0 && self.missed >= 8 && self.missed.is_multiple_of(8) && self.burst_left == 0 {
            self.poll = (self.poll + 1).min(self.maxpoll.max(self.rate_floor.unwrap_or(0)));
        }
        let transmit = NtpTimestamp(random);
        self.outstanding = Some(Outstanding {
            transmit,
            t1_ns: now_ns,
        });
        if self.burst_left > 0 {
            self.burst_left -= 1;
            self.next_poll_ns = now_ns + IBURST_SPACING_NS;
        } else {
            self.next_poll_ns = now_ns + self.interval_ns();
        }
        Some(build_request(self.poll, transmit))
    }

    /// Feeds a datagram from this source's address. A valid reply lands in the filter.
    pub fn receive(&mut self, reply: &[u8], t4_ns: i64, precision: i8) -> Result<(), Rejection> {
        self.receive_sampling(reply, t4_ns, precision, true)
    }

    /// As [`Source::receive`]; with `keep` false a valid reply counts for reachability but its
    /// sample is dropped (it was taken across a leap second).
    pub fn receive_sampling(&mut self, reply: &[u8], t4_ns: i64, precision: i8, keep: bool) -> Result<(), Rejection> {
        let Some(out) = self.outstanding else {
            self.mismatched += 1;
            return Err(Rejection::NotExpected);
        };
        let result = validate(out.transmit, out.t1_ns, reply, t4_ns, precision);
        match result {
            // Nothing ties it to our request (a spoofer needs only our address and port to
            // send it): keep waiting, the genuine reply may still come.
            Err(Rejection::OriginMismatch | Rejection::TooShort) => {
                self.mismatched += 1;
            }
            Err(e) => {
                self.outstanding = None;
                self.last_rejection = Some(e);
                if let Rejection::Kiss(code) = e {
                    self.kiss(code, out.t1_ns);
                }
            }
            Ok(sample) => {
                self.outstanding = None;
                self.last_rejection = None;
                self.reach |= 1;
                self.missed = 0;
                self.last_reply_ns = Some(t4_ns);
                if !keep {
                    return Ok(());
                }
                let precision_s = 2f64.powi(precision.into());
                // How far the sample is from what the source predicted, against its distance.
                let miss = self
                    .filter
                    .estimate(sample.local_ns, precision_s)
                    .filter(|e| e.samples >= 2)
                    .map(|e| ((sample.offset - e.offset).abs(), sample.delay / 2.0 + sample.dispersion));
                self.filter.add(sample);
                let window = self
                    .filter
                    .estimate(sample.local_ns, precision_s)
                    .map_or(1, |e| e.samples);
                self.adjust_poll(poll_adjustment(miss, window));
            }
        }
        result.map(|_| ())
    }

    /// chrony's adjust_poll: whole steps of the accumulated score move the poll exponent.
    fn adjust_poll(&mut self, adjustment: f64) {
        self.poll_score += adjustment;
        if self.poll_score >= 1.0 {
            let up = self.poll_score.trunc();
            self.poll = self.poll.saturating_add(up as i8);
            self.poll_score -= up;
        } else if self.poll_score < 0.0 {
            let down = (self.poll_score - 1.0).trunc();
            self.poll = self.poll.saturating_add(down as i8);
            self.poll_score -= down;
        }
        let floor = self.minpoll.max(self.rate_floor.unwrap_or(MIN_POLL));
        if self.poll < floor {
            self.poll = floor;
            self.poll_score = 0.0;
        } else if self.poll > self.maxpoll.max(floor) {
            self.poll = self.maxpoll.max(floor);
            self.poll_score = 1.0;
        }
    }

    fn kiss(&mut self, code: RefId, sent_ns: i64) {
        match code {
            RefId::DENY | RefId::RSTR => {
                self.denied = Some(code);
                self.burst_left = 0;
            }
            RefId::RATE => {
                // RFC 5905 section 7.4: at least double the interval, and never below minpoll+1.
                let p = (self.poll + 1).max(self.minpoll + 1).min(MAX_POLL);
                self.poll = p;
                self.rate_floor = Some(p);
                self.burst_left = 0;
                self.poll_score = 0.0;
                self.next_poll_ns = sent_ns + self.interval_ns();
            }
            // Unknown codes: RFC 5905 says to treat them as "do not use this reply".
            _ => {}
        }
    }

    /// Replies may count as a source for selection: reachable, not denied, with a sample.
    pub fn is_reachable(&self) -> bool {
        self.reach != 0 && self.denied.is_none()
    }

    /// A pool member that is dead or refused us: drop it and ask DNS for another.
    pub fn should_drop(&self) -> bool {
        self.pool && (self.denied.is_some() || self.missed >= DROP_AFTER_MISSED)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{NtpShort, ServerInfo, respond};

    const PREC: i8 = -20;

    fn info(stratum: u8) -> ServerInfo {
        ServerInfo {
            leap: LeapIndicator::NoWarning,
            stratum,
            precision: -20,
            root_delay: NtpShort::from_seconds_ceil(0.001),
            root_dispersion: NtpShort::from_seconds_ceil(0.002),
            reference_id: RefId(*b"GPS\0"),
            reference_timestamp: NtpTimestamp::from_unix(1_700_000_000, 0),
        }
    }

    /// Server 0.5 s ahead, 10 ms each way.
    fn exchange(req: &[u8; 48], t1_ns: i64, info: &ServerInfo) -> ([u8; 48], i64) {
        exchange_ahead(req, t1_ns, info, 500_000_000)
    }

    /// Server `ahead_ns` ahead, 10 ms each way.
    fn exchange_ahead(req: &[u8; 48], t1_ns: i64, info: &ServerInfo, ahead_ns: i64) -> ([u8; 48], i64) {
        let t2 = t1_ns + 10_000_000 + ahead_ns;
        let t3 = t2 + 1_000;
        let reply = respond(
            req,
            info,
            NtpTimestamp::from_unix_nanos(t2.into()),
            NtpTimestamp::from_unix_nanos(t3.into()),
        )
        .unwrap();
        (reply, t3 - ahead_ns + 10_000_000)
    }

    /// The reply turned into a Kiss-o'-Death with `code`.
    fn kissed(mut reply: [u8; 48], code: RefId) -> [u8; 48] {
        let mut h = Header::decode(&reply).unwrap();
        h.stratum = 0;
        h.leap = LeapIndicator::Unsynchronized;
        h.reference_id = code;
        h.encode(&mut reply);
        reply
    }

    fn src(iburst: bool) -> Source {
        let mut cfg = UpstreamConfig::new("127.0.0.1");
        cfg.iburst = iburst;
        cfg.minpoll = 4;
        Source::new("s", "127.0.0.1:123".parse().unwrap(), &cfg, 1_700_000_000_000_000_000)
    }

    #[test]
    fn offset_and_delay_per_rfc5905() {
        let t1 = 1_700_000_000_000_000_000i64;
        let tx = NtpTimestamp(0x1234_5678_9abc_def0);
        let (reply, t4) = exchange(&build_request(6, tx), t1, &info(1));
        let s = validate(tx, t1, &reply, t4, PREC).unwrap();
        assert!((s.offset - 0.5).abs() < 1e-8, "{}", s.offset);
        assert!((s.delay - 0.020).abs() < 1e-8, "{}", s.delay);
        assert_eq!(s.stratum, 1);
        assert!(s.root_delay >= 0.001 && s.root_dispersion >= 0.002);
    }

    #[test]
    fn request_does_not_leak_our_clock() {
        let tx = NtpTimestamp(0xdead_beef_0000_0001);
        let h = Header::decode(&build_request(6, tx)).unwrap();
        assert_eq!(h.transmit_timestamp, tx);
        assert_eq!(h.mode, Mode::Client);
        assert_eq!(h.origin_timestamp, NtpTimestamp::ZERO);
        assert_eq!(h.receive_timestamp, NtpTimestamp::ZERO);
        assert_eq!(h.reference_timestamp, NtpTimestamp::ZERO);
    }

    #[test]
    fn rejections() {
        let t1 = 1_700_000_000_000_000_000i64;
        let tx = NtpTimestamp(42);
        let req = build_request(6, tx);
        let (good, t4) = exchange(&req, t1, &info(2));
        assert!(validate(tx, t1, &good, t4, PREC).is_ok());
        assert_eq!(
            validate(NtpTimestamp(43), t1, &good, t4, PREC),
            Err(Rejection::OriginMismatch)
        );
        assert_eq!(validate(tx, t1, &good[..47], t4, PREC), Err(Rejection::TooShort));
        let mut m = good;
        m[0] = (m[0] & !7) | 5;
        assert_eq!(validate(tx, t1, &m, t4, PREC), Err(Rejection::NotServerMode));
        let (unsync, _) = exchange(&req, t1, &ServerInfo::unsynchronized(-20));
        assert_eq!(validate(tx, t1, &unsync, t4, PREC), Err(Rejection::Unsynchronized));
        let (s16, _) = exchange(&req, t1, &info(16));
        assert_eq!(validate(tx, t1, &s16, t4, PREC), Err(Rejection::Unsynchronized));
        let mut far = info(2);
        far.root_dispersion = NtpShort::from_seconds_ceil(3.5);
        let (far, _) = exchange(&req, t1, &far);
        assert!(matches!(validate(tx, t1, &far, t4, PREC), Err(Rejection::TooFar(d)) if d > 3.5));
        let kod = kissed(good, RefId::RATE);
        assert_eq!(validate(tx, t1, &kod, t4, PREC), Err(Rejection::Kiss(RefId::RATE)));
        // A spoofed KoD (wrong origin) is not believed.
        assert_eq!(
            validate(NtpTimestamp(7), t1, &kod, t4, PREC),
            Err(Rejection::OriginMismatch)
        );
    }

    #[test]
    fn datagrams_without_our_origin_leave_the_exchange_alone() {
        let mut s = src(false);
        let now = s.next_poll_at().unwrap();
        let req = s.poll(now, 99).unwrap();
        let (reply, t4) = exchange(&req, now, &info(1));
        // Truncated, and a reflected request (mode 3, not our origin), from the source's address.
        assert_eq!(s.receive(&reply[..20], t4, PREC), Err(Rejection::TooShort));
        assert_eq!(s.receive(&req, t4, PREC), Err(Rejection::OriginMismatch));
        assert_eq!((s.mismatched, s.last_rejection), (2, None));
        assert_eq!(s.receive(&reply, t4, PREC), Ok(()));
        assert_eq!(s.reach, 1);
    }

    #[test]
    fn negative_delay_clamped_to_precision() {
        let t1 = 1_700_000_000_000_000_000i64;
        let tx = NtpTimestamp(9);
        let req = build_request(6, tx);
        let t = NtpTimestamp::from_unix_nanos((t1 + 5).into());
        let reply = respond(&req, &info(1), t, NtpTimestamp::from_unix_nanos((t1 + 10).into())).unwrap();
        let s = validate(tx, t1, &reply, t1 + 2, PREC).unwrap();
        assert_eq!(s.delay, 2f64.powi(PREC.into()));
    }

    #[test]
    fn iburst_then_regular_polls_and_reach() {
        let mut s = src(true);
        let mut now = 1_700_000_000_000_000_000i64;
        // The first request waits out the start-up.
        assert_eq!(s.poll(now, 99), None);
        assert_eq!(s.next_poll_at(), Some(now + INITIAL_DELAY_NS));
        let mut times = Vec::new();
        for i in 0..30u64 {
            now = s.next_poll_at().unwrap();
            let req = s.poll(now, i + 1).unwrap();
            times.push(now);
            let (reply, t4) = exchange(&req, now, &info(1));
            s.receive(&reply, t4, PREC).unwrap();
        }
        assert!(
            times.windows(2).take(6).all(|w| w[1] - w[0] == IBURST_SPACING_NS),
            "{times:?}"
        );
        assert!(times[7] - times[6] >= 16_000_000_000);
        assert_eq!(s.reach, 0xff);
        assert!(s.poll > 4, "poll raised once the window holds the target: {}", s.poll);
        // A duplicate of an already taken reply is not expected any more.
        let (reply, t4) = exchange(&build_request(4, NtpTimestamp(10)), now, &info(1));
        assert_eq!(s.receive(&reply, t4, PREC), Err(Rejection::NotExpected));
        assert_eq!(s.mismatched, 1);
    }

    #[test]
    fn poll_follows_the_regression_window() {
        assert_eq!(poll_adjustment(None, 8), 0.0);
        assert!(poll_adjustment(None, 16) > 0.0);
        assert_eq!(poll_adjustment(None, 4), -2.0 * poll_adjustment(None, 12));
        // Missed by 8 times its distance: three steps shorter at once.
        assert_eq!(poll_adjustment(Some((8e-3, 1e-3)), 16), -3.0);
        // Steady samples take the interval up.
        let mut s = src(false);
        for i in 0..60u64 {
            let now = s.next_poll_at().unwrap();
            let req = s.poll(now, i + 1).unwrap();
            let (reply, t4) = exchange_ahead(&req, now, &info(1), 0);
            s.receive(&reply, t4, PREC).unwrap();
        }
        let steady = s.poll;
        assert!(steady >= 6, "{steady}");
        // Then a sample 100 ms off the prediction, 10 times its distance (half the 20 ms delay;
        // the clock's frequency jumped, say): the interval comes down by log2(10) steps at once.
        let now = s.next_poll_at().unwrap();
        let req = s.poll(now, 1000).unwrap();
        let (reply, t4) = exchange_ahead(&req, now, &info(1), 100_000_000);
        s.receive(&reply, t4, PREC).unwrap();
        assert!(s.poll <= steady - 3, "{} after {steady}", s.poll);
    }

    #[test]
    fn silence_empties_reach_and_backs_off() {
        let mut s = src(false);
        for i in 0..40u64 {
            let now = s.next_poll_at().unwrap();
            s.poll(now, i).unwrap();
        }
        assert_eq!(s.reach, 0);
        assert_eq!(s.missed, 39);
        assert!(s.poll > 4);
        assert!(!s.is_reachable());
    }

    #[test]
    fn kiss_rate_lengthens_poll_and_deny_stops() {
        let mut s = src(false);
        let now = s.next_poll_at().unwrap();
        let req = s.poll(now, 77).unwrap();
        let (reply, t4) = exchange(&req, now, &info(1));
        let kod = kissed(reply, RefId::RATE);
        let before = s.poll;
        assert_eq!(s.receive(&kod, t4, PREC), Err(Rejection::Kiss(RefId::RATE)));
        assert!(s.poll > before && s.poll > s.minpoll);
        assert!(s.next_poll_at().unwrap() - now >= 2 * (1_000_000_000 << before));

        let now = s.next_poll_at().unwrap();
        let req = s.poll(now, 78).unwrap();
        let (reply, t4) = exchange(&req, now, &info(1));
        let kod = kissed(reply, RefId::DENY);
        assert_eq!(s.receive(&kod, t4, PREC), Err(Rejection::Kiss(RefId::DENY)));
        assert_eq!(s.next_poll_at(), None);
        assert_eq!(s.poll(now + 1_000_000_000_000, 1), None);
    }
}
