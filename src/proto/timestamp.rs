//! NTP time formats: the 64-bit timestamp (era-aware), signed 32.32 durations and the 16.16 short format.

use core::fmt;

/// Seconds from the NTP prime epoch (1900-01-01) to the Unix epoch (1970-01-01).
pub const NTP_UNIX_OFFSET: i64 = 2_208_988_800;
const NANOS_PER_SEC: i128 = 1_000_000_000;
/// One NTP era is 2^32 seconds (about 136 years); era 1 starts on 2036-02-07.
pub const ERA_SECONDS: i64 = 1 << 32;

/// An NTP 64-bit timestamp: 32 bits of seconds since the start of its era, 32 bits of fraction.
///
/// The wire format does not carry the era, so conversion to absolute time needs a pivot
/// (a time known to be within 68 years of the value); see [`NtpTimestamp::to_unix_nanos`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NtpTimestamp(pub u64);

impl NtpTimestamp {
    pub const ZERO: NtpTimestamp = NtpTimestamp(0);

    pub const fn from_bits(bits: u64) -> Self {
        NtpTimestamp(bits)
    }

    pub const fn to_bits(self) -> u64 {
        self.0
    }

    pub const fn from_be_bytes(b: [u8; 8]) -> Self {
        NtpTimestamp(u64::from_be_bytes(b))
    }

    pub const fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub const fn seconds(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub const fn fraction(self) -> u32 {
        self.0 as u32
    }

    /// Converts nanoseconds since the Unix epoch (any era, negative allowed) to the wire form.
    /// The fraction is rounded to nearest, so a round trip through nanoseconds is exact.
    pub const fn from_unix_nanos(unix_nanos: i128) -> Self {
        let ntp_nanos = unix_nanos + NTP_UNIX_OFFSET as i128 * NANOS_PER_SEC;
        // From 1900 to 2484 the count fits a u64, whose division by a constant compiles to a
        // multiply; i128's is a library call, and every reply's T2 comes through here.
        if ntp_nanos >= 0 && ntp_nanos <= u64::MAX as i128 {
            let n = ntp_nanos as u64;
            let (secs, nanos) = (n / 1_000_000_000, n % 1_000_000_000);
            let frac = ((nanos << 32) + 500_000_000) / 1_000_000_000;
            // The shift keeps the seconds within the era; a fraction rounded up to 2^32 carries
            // into them, and past the era's last second wraps to 0, as below.
            return NtpTimestamp((secs << 32).wrapping_add(frac));
        }
        let secs = ntp_nanos.div_euclid(NANOS_PER_SEC);
        let nanos = ntp_nanos.rem_euclid(NANOS_PER_SEC);
        // nanos < 1e9, so nanos << 32 fits easily in i128.
        let mut frac = ((nanos << 32) + NANOS_PER_SEC / 2) / NANOS_PER_SEC;
        let mut secs = secs;
        if frac == 1 << 32 {
            frac = 0;
            secs += 1;
        }
        let secs_in_era = secs.rem_euclid(ERA_SECONDS as i128) as u64;
        NtpTimestamp((secs_in_era << 32) | frac as u64)
    }

    pub const fn from_unix(secs: i64, nanos: u32) -> Self {
        Self::from_unix_nanos(secs as i128 * NANOS_PER_SEC + nanos as i128)
    }

    /// Nanoseconds since the Unix epoch, choosing the era that puts the result
    /// closest to `pivot_unix_secs` (RFC 5905 section 6: timestamps are unambiguous
    /// within 68 years of a known time).
    pub const fn to_unix_nanos(self, pivot_unix_secs: i64) -> i128 {
        let pivot_ntp = pivot_unix_secs + NTP_UNIX_OFFSET;
        let pivot_era = pivot_ntp.div_euclid(ERA_SECONDS);
        let secs_in_era = self.seconds() as i64;
        // Candidate in the pivot's era, then move by one era if that is closer.
        let mut secs = pivot_era * ERA_SECONDS + secs_in_era;
        let half = ERA_SECONDS / 2;
        if secs - pivot_ntp > half {
            secs -= ERA_SECONDS;
        } else if pivot_ntp - secs > half {
            secs += ERA_SECONDS;
        }
        let frac_nanos = ((self.fraction() as i128) * NANOS_PER_SEC + (1 << 31)) >> 32;
        (secs - NTP_UNIX_OFFSET) as i128 * NANOS_PER_SEC + frac_nanos
    }

    /// Signed difference `self - earlier`, correct whenever the two are within 68 years.
    pub const fn since(self, earlier: NtpTimestamp) -> NtpDuration {
        NtpDuration(self.0.wrapping_sub(earlier.0) as i64)
    }

    pub const fn add(self, d: NtpDuration) -> NtpTimestamp {
        NtpTimestamp(self.0.wrapping_add(d.0 as u64))
    }
}

impl fmt::Debug for NtpTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NtpTimestamp({:#010x}.{:08x})", self.seconds(), self.fraction())
    }
}

/// A signed duration in NTP's 32.32 fixed point (range about ±68 years, resolution 233 ps).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug)]
pub struct NtpDuration(pub i64);

impl NtpDuration {
    pub const ZERO: NtpDuration = NtpDuration(0);

    pub fn from_seconds_f64(s: f64) -> Self {
        NtpDuration((s * 4_294_967_296.0) as i64)
    }

    pub fn to_seconds_f64(self) -> f64 {
        self.0 as f64 / 4_294_967_296.0
    }

    pub const fn from_nanos(n: i64) -> Self {
        NtpDuration(((n as i128) * (1i128 << 32) / NANOS_PER_SEC) as i64)
    }

    pub const fn to_nanos(self) -> i64 {
        ((self.0 as i128 * NANOS_PER_SEC) >> 32) as i64
    }
}

/// NTP short format: unsigned 16.16 seconds, used for root delay and root dispersion.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Debug)]
pub struct NtpShort(pub u32);

impl NtpShort {
    pub const ZERO: NtpShort = NtpShort(0);
    pub const MAX: NtpShort = NtpShort(u32::MAX);

    pub const fn from_be_bytes(b: [u8; 4]) -> Self {
        NtpShort(u32::from_be_bytes(b))
    }

    pub const fn to_be_bytes(self) -> [u8; 4] {
        self.0.to_be_bytes()
    }

    /// Rounded up, so an advertised error bound is never smaller than the true one.
    /// Negative and NaN become zero; values past the range saturate.
    pub fn from_seconds_ceil(s: f64) -> Self {
        if s.is_nan() || s <= 0.0 {
            return NtpShort(0);
        }
        let v = (s * 65536.0).ceil();
        if v >= u32::MAX as f64 {
            NtpShort(u32::MAX)
        } else {
            NtpShort(v as u32)
        }
    }

    pub fn to_seconds_f64(self) -> f64 {
        self.0 as f64 / 65536.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unix_epoch_is_2208988800() {
        let t = NtpTimestamp::from_unix(0, 0);
        assert_eq!(t.seconds(), 2_208_988_800);
        assert_eq!(t.fraction(), 0);
        assert_eq!(t.to_unix_nanos(0), 0);
    }

    #[test]
    fn half_second_is_half_fraction() {
        let t = NtpTimestamp::from_unix(1, 500_000_000);
        assert_eq!(t.fraction(), 1 << 31);
    }

    #[test]
    fn era_boundary_2036() {
        // 2036-02-07T06:28:16Z is NTP second 2^32, i.e. era 1 second 0.
        let boundary_unix = ERA_SECONDS - NTP_UNIX_OFFSET;
        assert_eq!(boundary_unix, 2_085_978_496);
        let before = NtpTimestamp::from_unix(boundary_unix - 1, 0);
        let at = NtpTimestamp::from_unix(boundary_unix, 0);
        assert_eq!(before.seconds(), u32::MAX);
        assert_eq!(at.seconds(), 0);
        // With a pivot in 2026 both decode correctly across the wrap.
        let pivot_2026 = 1_795_000_000;
        assert_eq!(
            before.to_unix_nanos(pivot_2026),
            (boundary_unix - 1) as i128 * 1_000_000_000
        );
        assert_eq!(at.to_unix_nanos(pivot_2026), boundary_unix as i128 * 1_000_000_000);
        // The difference across the wrap is one second.
        assert_eq!(at.since(before), NtpDuration(1 << 32));
        assert_eq!(before.since(at), NtpDuration(-(1 << 32)));
    }

    #[test]
    fn era_zero_value_after_2036_with_late_pivot() {
        // Seconds value 100 means 1900 with an early pivot but 2036 with a late one.
        let t = NtpTimestamp((100u64) << 32);
        assert_eq!(
            t.to_unix_nanos(-NTP_UNIX_OFFSET),
            (100 - NTP_UNIX_OFFSET) as i128 * 1_000_000_000
        );
        let late = 2_100_000_000; // 2036-07
        assert_eq!(
            t.to_unix_nanos(late),
            (ERA_SECONDS + 100 - NTP_UNIX_OFFSET) as i128 * 1_000_000_000
        );
    }

    #[test]
    fn short_format_rounds_up() {
        assert_eq!(NtpShort::from_seconds_ceil(0.0), NtpShort(0));
        assert_eq!(NtpShort::from_seconds_ceil(1.0), NtpShort(65536));
        assert_eq!(NtpShort::from_seconds_ceil(1e-9), NtpShort(1));
        assert_eq!(NtpShort::from_seconds_ceil(-1.0), NtpShort(0));
        assert_eq!(NtpShort::from_seconds_ceil(f64::NAN), NtpShort(0));
        assert_eq!(NtpShort::from_seconds_ceil(1e9), NtpShort::MAX);
    }

    proptest! {
        #[test]
        fn nanos_round_trip_within_68_years_of_pivot(
            pivot in -2_208_988_800i64..4_000_000_000i64,
            delta in -2_000_000_000i64..2_000_000_000i64,
            nanos in 0u32..1_000_000_000,
        ) {
            let secs = pivot + delta;
            let t = NtpTimestamp::from_unix(secs, nanos);
            let back = t.to_unix_nanos(pivot);
            prop_assert_eq!(back, secs as i128 * 1_000_000_000 + nanos as i128);
        }

        #[test]
        fn the_u64_path_agrees_with_i128_arithmetic(unix_nanos in -2_208_988_800_000_000_000i128..16_000_000_000_000_000_000i128) {
            let ntp = unix_nanos + NTP_UNIX_OFFSET as i128 * NANOS_PER_SEC;
            let mut secs = ntp.div_euclid(NANOS_PER_SEC);
            let mut frac = ((ntp.rem_euclid(NANOS_PER_SEC) << 32) + NANOS_PER_SEC / 2) / NANOS_PER_SEC;
            if frac == 1 << 32 {
                frac = 0;
                secs += 1;
            }
            let want = ((secs.rem_euclid(ERA_SECONDS as i128) as u64) << 32) | frac as u64;
            prop_assert_eq!(NtpTimestamp::from_unix_nanos(unix_nanos).0, want);
        }

        #[test]
        fn bits_round_trip(bits: u64) {
            let t = NtpTimestamp::from_be_bytes(bits.to_be_bytes());
            prop_assert_eq!(t.to_bits(), bits);
            prop_assert_eq!(t.to_be_bytes(), bits.to_be_bytes());
        }

        #[test]
        fn since_matches_nanos(a in 0i64..4_000_000_000i64, b in -2_000_000_000i64..2_000_000_000i64) {
            let ta = NtpTimestamp::from_unix(a, 0);
            let tb = NtpTimestamp::from_unix(a + b, 0);
            prop_assert_eq!(tb.since(ta).to_nanos(), b * 1_000_000_000);
        }

        #[test]
        fn short_never_understates(s in 0.0f64..65535.0) {
            prop_assert!(NtpShort::from_seconds_ceil(s).to_seconds_f64() >= s);
        }
    }
}
