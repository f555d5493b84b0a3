//! Subnet restriction: prefixes with an action, and the longest-prefix-match table the hot path asks.
//!
//! # Semantics (ntpd's `restrict`)
//! The most specific prefix containing the client address wins; among rules with the identical
//! prefix the **last** one wins, so a later line in the config overrides an earlier one, as when
//! a file is appended to. An address no rule covers gets the table's default action.
//! [`linear_lookup`] is that rule written out naively; the table is property-tested and fuzzed
//! against it.
//!
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are IPv4 clients (a dual-stack socket reports
//! IPv4 peers that way), so they are looked up as IPv4. Likewise a rule written inside
//! `::ffff:0:0/96` is stored as the IPv4 prefix it denotes. Other IPv6 rules, even `::/0`, never
//! match IPv4 clients.
//!
//! # Why sorted ranges and not a trie
//! A set of prefixes cuts each address space into at most `2n + 1` intervals on which the
//! answer is constant. The table stores, per family, the interval starts sorted with each
//! interval's answer beside its start (8 bytes an entry for IPv4, 24 for IPv6), plus a direct
//! index on 16 address bits that narrows the search to the few intervals beginning in that
//! slice of the space; those are counted over a fixed window of 8 entries, which has no branch to
//! mispredict, with a binary search only for crowded buckets. A lookup is then one index load
//! and one or two adjacent cache lines: about the cost of a poptrie lookup, with a build that is
//! a sort and one sweep and an obvious correctness argument (it is the oracle's answer,
//! precomputed per interval). A multibit trie would need prefix expansion and leaf pushing to
//! match that, and a plain binary trie takes up to 128 dependent loads.
//!
//! The 16 index bits are those right after the longest prefix all interval starts share, so that
//! IPv6 rules, which mostly sit in 2000::/3, spread over the whole index rather than a few
//! buckets. Tables with fewer than 64 intervals skip the 256 KiB index and binary-search.
//! With 100,000 random rules the IPv4 table (1.4 MiB) stays in L2 and meets the 50 ns goal;
//! the IPv6 one (4.8 MiB) waits on one cache miss past L2 per lookup (see benches/policy.rs).
#![forbid(unsafe_code)]

use core::fmt;
use core::str::FromStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// What to do with a request from a matching client.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(u8)]
pub enum Action {
    /// Answer, without rate limiting.
    Serve = 0,
    /// Drop silently.
    Ignore = 1,
    /// Answer with a Kiss-o'-Death `DENY`.
    Deny = 2,
    /// Answer, subject to the rate limiter.
    Limited = 3,
    /// Answer, never rate-limited (pool monitors and measurement networks score a KoD as "down").
    Exempt = 4,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::Serve,
        Action::Ignore,
        Action::Deny,
        Action::Limited,
        Action::Exempt,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Action::Serve => "serve",
            Action::Ignore => "ignore",
            Action::Deny => "deny",
            Action::Limited => "limited",
            Action::Exempt => "exempt",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The string is not one of [`Action::name`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct UnknownAction;

impl fmt::Display for UnknownAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("unknown action (expected serve, ignore, deny, limited or exempt)")
    }
}

impl std::error::Error for UnknownAction {}

impl FromStr for Action {
    type Err = UnknownAction;
    fn from_str(s: &str) -> Result<Action, UnknownAction> {
        Action::ALL.into_iter().find(|a| a.name() == s).ok_or(UnknownAction)
    }
}

/// Why a string is not a [`Prefix`].
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum PrefixError {
    /// Empty, or not an IPv4/IPv6 address (`default` included: the config handles it).
    BadAddress,
    /// The part after `/` is not a decimal number.
    BadLength,
    /// Longer than 32 (IPv4) or 128 (IPv6).
    LengthTooLong,
    /// The part after `mask` is not an address of the same family.
    BadMask,
    /// The mask's one bits are not contiguous from the top (e.g. `255.0.255.0`).
    NonContiguousMask,
    /// The address has bits set past the prefix length (`10.0.0.1/8`): probably a typo, so it is
    /// refused rather than silently widened. [`Prefix::truncate`] masks instead.
    HostBitsSet,
}

impl fmt::Display for PrefixError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PrefixError::BadAddress => "not an IPv4 or IPv6 address",
            PrefixError::BadLength => "prefix length is not a number",
            PrefixError::LengthTooLong => "prefix length longer than the address",
            PrefixError::BadMask => "mask is not an address of the same family",
            PrefixError::NonContiguousMask => "mask bits are not contiguous",
            PrefixError::HostBitsSet => "address has bits set beyond the prefix length",
        })
    }
}

impl std::error::Error for PrefixError {}

/// An IPv4 or IPv6 network: address plus prefix length.
///
/// Invariants: the host bits are zero, and a prefix inside `::ffff:0:0/96` is stored as the IPv4
/// prefix it denotes (see the module docs), so equal networks compare equal.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

/// Where IPv4-mapped IPv6 addresses sit: `::ffff:0:0/96`.
const V4_MAPPED: u128 = 0xffff_0000_0000;

impl Prefix {
    /// Strict: refuses host bits set, like [`Prefix::from_str`].
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix, PrefixError> {
        let p = Prefix::truncate(addr, len)?;
        if p.addr != canonical(addr) {
            return Err(PrefixError::HostBitsSet);
        }
        Ok(p)
    }

    /// Lenient: clears the host bits (`10.1.2.3/8` becomes `10.0.0.0/8`), as ntpd does.
    pub fn truncate(addr: IpAddr, len: u8) -> Result<Prefix, PrefixError> {
        match addr {
            IpAddr::V4(a) => {
                if len > 32 {
                    return Err(PrefixError::LengthTooLong);
                }
                Ok(Prefix {
                    addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & !host_mask(32, len) as u32)),
                    len,
                })
            }
            IpAddr::V6(a) => {
                if len > 128 {
                    return Err(PrefixError::LengthTooLong);
                }
                let bits = u128::from(a) & !host_mask(128, len);
                if len >= 96 && bits >> 32 == V4_MAPPED >> 32 {
                    return Ok(Prefix {
                        addr: IpAddr::V4(Ipv4Addr::from(bits as u32)),
                        len: len - 96,
                    });
                }
                Ok(Prefix {
                    addr: IpAddr::V6(Ipv6Addr::from(bits)),
                    len,
                })
            }
        }
    }

    /// The network address (host bits zero).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The last address of the network (the first is [`Prefix::addr`]).
    pub fn last(&self) -> IpAddr {
        let (_, last) = self.range();
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(last as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(last)),
        }
    }

    /// The prefix length in bits.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` lies inside this network (IPv4-mapped addresses count as IPv4).
    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, canonical(addr)) {
            (IpAddr::V4(n), IpAddr::V4(a)) => (u32::from(a) ^ u32::from(n)) as u128 & !host_mask(32, self.len) == 0,
            (IpAddr::V6(n), IpAddr::V6(a)) => (u128::from(a) ^ u128::from(n)) & !host_mask(128, self.len) == 0,
            _ => false,
        }
    }

    /// First and last address as integers of the family's width.
    fn range(&self) -> (u128, u128) {
        let (start, width) = match self.addr {
            IpAddr::V4(a) => (u32::from(a) as u128, 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        };
        (start, start | host_mask(width, self.len))
    }
}

/// The low `width - len` bits set: the host part of a `/len` in a `width`-bit address.
pub(super) fn host_mask(width: u32, len: u8) -> u128 {
    let host = width - u32::from(len);
    if host == 128 { u128::MAX } else { (1u128 << host) - 1 }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; anything else unchanged.
#[inline]
pub(super) fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => addr,
        },
        v4 => v4,
    }
}

fn parse_len(s: &str) -> Result<u8, PrefixError> {
    // u8::from_str would accept "+8"; a config should not.
    if s.is_empty() || s.len() > 3 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PrefixError::BadLength);
    }
    s.parse::<u8>().map_err(|_| PrefixError::LengthTooLong)
}

/// Length of a contiguous netmask.
fn mask_len(mask: IpAddr) -> Result<u8, PrefixError> {
    let (bits, width) = match mask {
        IpAddr::V4(m) => ((u32::from(m) as u128) << 96, 32),
        IpAddr::V6(m) => (u128::from(m), 128),
    };
    let ones = bits.leading_ones();
    if ones < 128 && bits << ones != 0 {
        return Err(PrefixError::NonContiguousMask);
    }
    Ok(ones.min(width) as u8)
}

/// Accepts `10.0.0.0/8`, `10.1.2.3` (a host: /32 or /128), `2001:db8::/32`, `::1` and ntpd's
/// `192.168.1.0 mask 255.255.255.0` (any whitespace around `mask`). Host bits must be zero.
impl FromStr for Prefix {
    type Err = PrefixError;
    fn from_str(s: &str) -> Result<Prefix, PrefixError> {
        let s = s.trim();
        let mut words = s.split_whitespace();
        let first = words.next().ok_or(PrefixError::BadAddress)?;
        if let Some(kw) = words.next() {
            if !kw.eq_ignore_ascii_case("mask") {
                return Err(PrefixError::BadAddress);
            }
            let mask = words.next().ok_or(PrefixError::BadMask)?;
            if words.next().is_some() {
                return Err(PrefixError::BadMask);
            }
            let addr: IpAddr = first.parse().map_err(|_| PrefixError::BadAddress)?;
            let mask: IpAddr = mask.parse().map_err(|_| PrefixError::BadMask)?;
            if addr.is_ipv4() != mask.is_ipv4() {
                return Err(PrefixError::BadMask);
            }
            return Prefix::new(addr, mask_len(mask)?);
        }
        let (addr, len) = match first.split_once('/') {
            Some((a, l)) => (a, Some(parse_len(l)?)),
            None => (first, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| PrefixError::BadAddress)?;
        let len = len.unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        Prefix::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One restriction line.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Rule {
    pub prefix: Prefix,
    pub action: Action,
}

/// The answer for one client address.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub struct Match {
    pub action: Action,
    /// Index into the rules the table was built from; `None` = the default applied.
    pub rule: Option<u32>,
}

/// The reference semantics, in O(rules): most specific prefix wins, the last of identical
/// prefixes wins. Tests and fuzz targets compare [`AccessTable::lookup`] with it.
pub fn linear_lookup(rules: &[Rule], default: Action, addr: IpAddr) -> Match {
    let mut best: Option<(u8, usize)> = None;
    for (i, r) in rules.iter().enumerate() {
        if r.prefix.contains(addr) && best.is_none_or(|(len, _)| r.prefix.len >= len) {
            best = Some((r.prefix.len, i));
        }
    }
    match best {
        Some((_, i)) => Match {
            action: rules[i].action,
            rule: Some(i as u32),
        },
        None => Match {
            action: default,
            rule: None,
        },
    }
}

/// Bits of the direct index in front of the binary search.
const INDEX_BITS: u32 = 16;
/// Up to this many candidate intervals are counted in a fixed window rather than binary-searched.
const LINEAR_MAX: usize = 8;
/// Below this many intervals the index costs more memory than the search steps it saves.
const INDEX_MIN_INTERVALS: usize = 64;

/// A [`Match`] in 4 bytes: the action in the low 3 bits, rule index + 1 above (0: the default).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Packed(u32);

/// Rule indices must fit [`Packed`]; 2^29 rules would take over 10 GB to even describe.
const MAX_RULES: usize = (1 << 29) - 1;

impl Packed {
    fn new(m: Match) -> Packed {
        Packed((m.rule.map_or(0, |r| r + 1) << 3) | m.action as u32)
    }

    #[inline]
    fn unpack(self) -> Match {
        Match {
            action: Action::ALL[(self.0 & 7) as usize],
            rule: (self.0 >> 3).checked_sub(1),
        }
    }
}

/// An interval's first address in the family's width, compared as an unsigned integer.
trait Key: Copy {
    fn from_wide(x: u128) -> Self;
    fn wide(self) -> u128;
}

impl Key for u32 {
    fn from_wide(x: u128) -> u32 {
        x as u32
    }

    #[inline]
    fn wide(self) -> u128 {
        self.into()
    }
}

/// IPv6 as two words: 8-byte alignment keeps an [`Entry`] at 24 bytes where `u128` would pad it
/// to 32.
impl Key for [u64; 2] {
    fn from_wide(x: u128) -> [u64; 2] {
        [(x >> 64) as u64, x as u64]
    }

    #[inline]
    fn wide(self) -> u128 {
        (u128::from(self[0]) << 64) | u128::from(self[1])
    }
}

/// Start and answer side by side, so the search's last cache line also holds the answer.
#[derive(Clone, Copy, Debug)]
struct Entry<K> {
    start: K,
    answer: Packed,
}

/// The intervals of one family, sorted by start.
#[derive(Clone, Debug)]
struct Ranges<K> {
    /// `entries[0].start == 0`; interval `i` runs up to `entries[i + 1].start - 1`.
    entries: Box<[Entry<K>]>,
    /// Empty, or `2^INDEX_BITS + 1` entries: `index[b]` is the interval holding the first address
    /// of the region whose index bits are `b`; the last entry is the last interval.
    index: Box<[u32]>,
    /// The region: the longest prefix that all starts but the first share (capped so that the
    /// index bits fit after it), as a mask and a value. The index covers the region only:
    /// below it the answer is the first interval's, above it the last interval's.
    region_mask: u128,
    region_base: u128,
    /// Where the index bits sit: `(key >> index_shift) & (2^INDEX_BITS - 1)`.
    index_shift: u32,
}

impl<K: Key> Ranges<K> {
    /// `prefixes`: (first, last, answer) in a `width`-bit space.
    fn build(mut prefixes: Vec<(u128, u128, usize)>, rules: &[Rule], default: Action, width: u32) -> Ranges<K> {
        let max = host_mask(width, 0);
        let default = Match {
            action: default,
            rule: None,
        };
        let answer = |i: usize| Match {
            action: rules[i].action,
            rule: Some(i as u32),
        };
        // Containers before their contents; of identical prefixes only the last rule survives.
        prefixes.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        prefixes.dedup_by(|later, earlier| {
            let same = (later.0, later.1) == (earlier.0, earlier.1);
            if same {
                earlier.2 = later.2;
            }
            same
        });

        let mut out: Vec<(u128, Match)> = vec![(0, default)];
        // An answer that starts at `at`; a later answer at the same point is more specific.
        let mut emit = |at: u128, m: Match| {
            if let Some(last) = out.last_mut()
                && last.0 == at
            {
                last.1 = m;
                if out.len() >= 2 && out[out.len() - 2].1 == m {
                    out.pop();
                }
                return;
            }
            if out.last().is_some_and(|last| last.1 != m) {
                out.push((at, m));
            }
        };
        // Prefixes nest or are disjoint, so open ones form a stack: a sweep in start order.
        let mut open: Vec<(u128, Match)> = Vec::new();
        for (first, last, i) in prefixes {
            while let Some(&(end, _)) = open.last()
                && end < first
            {
                open.pop();
                emit(end + 1, open.last().map_or(default, |o| o.1));
            }
            emit(first, answer(i));
            open.push((last, answer(i)));
        }
        while let Some((end, _)) = open.pop() {
            if end < max {
                emit(end + 1, open.last().map_or(default, |o| o.1));
            }
        }

        let entries: Box<[Entry<K>]> = out
            .iter()
            .map(|&(s, m)| Entry {
                start: K::from_wide(s),
                answer: Packed::new(m),
            })
            .collect();
        let (mut index, mut region_mask, mut region_base, mut index_shift) = (Vec::new(), 0, 0, 0);
        if out.len() >= INDEX_MIN_INTERVALS {
            // Real IPv6 rules sit mostly in 2000::/3 and all in a few /16s: indexing the bits
            // after their common prefix spreads them over the buckets instead of a handful.
            let (lo, hi) = (out[1].0, out[out.len() - 1].0);
            let common = ((lo ^ hi).leading_zeros() - (128 - width)).min(width - INDEX_BITS);
            index_shift = width - common - INDEX_BITS;
            region_mask = max & !host_mask(width, common as u8);
            region_base = lo & region_mask;
            index.reserve_exact((1 << INDEX_BITS) + 1);
            let mut p = 0usize;
            for b in 0u128..1 << INDEX_BITS {
                let first = region_base | (b << index_shift);
                while p + 1 < out.len() && out[p + 1].0 <= first {
                    p += 1;
                }
                index.push(p as u32);
            }
            index.push((out.len() - 1) as u32);
        }
        Ranges {
            entries,
            index: index.into_boxed_slice(),
            region_mask,
            region_base,
            index_shift,
        }
    }

    /// `key` is the address in the family's width.
    #[inline]
    fn find(&self, key: u128) -> Match {
        let wide = key;
        let last = self.entries.len() - 1;
        let (lo, hi) = if self.index.is_empty() {
            (0, last)
        } else if wide & self.region_mask != self.region_base {
            return self.entries[if wide < self.region_base { 0 } else { last }]
                .answer
                .unpack();
        } else {
            let b = (wide >> self.index_shift) as usize & ((1 << INDEX_BITS) - 1);
            (self.index[b] as usize, self.index[b + 1] as usize)
        };
        // start[lo] <= key < start[hi + 1]: count the starts in between that are <= key. A
        // bucket mostly holds a few, so count over a fixed window: every start past `hi` is
        // greater than the key and adds nothing, and a fixed trip count has no branch to
        // mispredict, unlike a binary search.
        let n = match self.entries.get(lo + 1..lo + 1 + LINEAR_MAX) {
            Some(window) if hi - lo <= LINEAR_MAX => window.iter().map(|e| usize::from(e.start.wide() <= key)).sum(),
            _ => self.entries[lo + 1..=hi].partition_point(|e| e.start.wide() <= key),
        };
        self.entries[lo + n].answer.unpack()
    }

    fn memory_bytes(&self) -> usize {
        size_of_val(&*self.entries) + size_of_val(&*self.index)
    }
}

/// Longest-prefix-match table, immutable once built (rebuild and swap the whole table on reload).
#[derive(Clone, Debug)]
pub struct AccessTable {
    v4: Ranges<u32>,
    v6: Ranges<[u64; 2]>,
    rules: usize,
}

impl AccessTable {
    /// Most specific prefix wins; of identical prefixes the last rule wins; `default` elsewhere.
    /// O(n log n). Rules past the first 2^29 - 1 are ignored (they would need gigabytes anyway).
    pub fn new(rules: &[Rule], default: Action) -> AccessTable {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (i, r) in rules.iter().enumerate().take(MAX_RULES) {
            let (first, last) = r.prefix.range();
            match r.prefix.addr {
                IpAddr::V4(_) => v4.push((first, last, i)),
                IpAddr::V6(_) => v6.push((first, last, i)),
            }
        }
        AccessTable {
            v4: Ranges::build(v4, rules, default, 32),
            v6: Ranges::build(v6, rules, default, 128),
            rules: rules.len(),
        }
    }

    /// The action for a client address. IPv4-mapped IPv6 addresses are looked up as IPv4.
    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Match {
        match canonical(addr) {
            IpAddr::V4(a) => self.v4.find(u32::from(a).into()),
            IpAddr::V6(a) => self.v6.find(u128::from(a)),
        }
    }

    /// How many rules the table was built from.
    pub fn rule_count(&self) -> usize {
        self.rules
    }

    /// Heap bytes held by the table.
    pub fn memory_bytes(&self) -> usize {
        self.v4.memory_bytes() + self.v6.memory_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Prefix {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_forms() {
        assert_eq!(p("10.0.0.0/8").addr(), ip("10.0.0.0"));
        assert_eq!(p("10.0.0.0/8").len(), 8);
        assert_eq!(p("10.1.2.3").len(), 32);
        assert_eq!(p("2001:db8::/32").len(), 32);
        assert_eq!(p("::1").len(), 128);
        assert_eq!(p("::/0").len(), 0);
        assert_eq!(p("0.0.0.0/0").len(), 0);
        assert_eq!(p("192.168.1.0 mask 255.255.255.0"), p("192.168.1.0/24"));
        assert_eq!(p("  192.168.0.0   MASK\t255.255.0.0 "), p("192.168.0.0/16"));
        assert_eq!(p("10.0.0.1 mask 255.255.255.255"), p("10.0.0.1/32"));
        assert_eq!(p("0.0.0.0 mask 0.0.0.0"), p("0.0.0.0/0"));
        assert_eq!(p("2001:db8:: mask ffff:ffff::"), p("2001:db8::/32"));
        assert_eq!(p("::ffff:10.0.0.0/104"), p("10.0.0.0/8"));
        assert_eq!(p("::ffff:10.1.2.3"), p("10.1.2.3/32"));
        assert_eq!(p("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(p("2001:db8::/32").to_string(), "2001:db8::/32");
    }

    #[test]
    fn parse_errors() {
        use PrefixError::*;
        let cases = [
            ("", BadAddress),
            ("default", BadAddress),
            ("10.0.0.0/", BadLength),
            ("10.0.0.0/+8", BadLength),
            ("10.0.0.0/-1", BadLength),
            ("10.0.0.0/8/8", BadLength),
            ("10.0.0.0/1000", BadLength),
            ("10.0.0.0/33", LengthTooLong),
            ("10.0.0.0/256", LengthTooLong),
            ("::/129", LengthTooLong),
            ("10.0.0.1/8", HostBitsSet),
            ("2001:db8::1/32", HostBitsSet),
            ("10.0.0.0 mask 255.0.255.0", NonContiguousMask),
            ("10.0.0.0 mask 0.255.255.255", NonContiguousMask),
            ("10.0.0.0 mask", BadMask),
            ("10.0.0.0 mask 255.0.0.0 x", BadMask),
            ("10.0.0.0 mask ffff::", BadMask),
            ("10.0.0.0 mask banana", BadMask),
            ("10.0.0.0 nomask 255.0.0.0", BadAddress),
            ("10.0.0.1 mask 255.0.0.0", HostBitsSet),
            ("10.0.0", BadAddress),
            ("fe80::1%eth0", BadAddress),
        ];
        for (s, e) in cases {
            assert_eq!(s.parse::<Prefix>(), Err(e), "{s:?}");
        }
    }

    #[test]
    fn truncate_masks_host_bits() {
        assert_eq!(Prefix::truncate(ip("10.1.2.3"), 8), Ok(p("10.0.0.0/8")));
        assert_eq!(Prefix::truncate(ip("2001:db8::1"), 0), Ok(p("::/0")));
        assert_eq!(Prefix::truncate(ip("10.1.2.3"), 33), Err(PrefixError::LengthTooLong));
        assert_eq!(p("10.0.0.0/8").last(), ip("10.255.255.255"));
        assert_eq!(p("2001:db8::/32").last(), ip("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"));
        assert_eq!(p("::/0").last(), ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"));
    }

    #[test]
    fn action_names_round_trip() {
        for a in Action::ALL {
            assert_eq!(a.name().parse::<Action>(), Ok(a));
        }
        assert_eq!("Serve".parse::<Action>(), Err(UnknownAction));
        assert_eq!("default".parse::<Action>(), Err(UnknownAction));
    }

    #[test]
    fn contains() {
        assert!(p("10.0.0.0/8").contains(ip("10.255.0.1")));
        assert!(!p("10.0.0.0/8").contains(ip("11.0.0.0")));
        assert!(p("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
        assert!(!p("::/0").contains(ip("10.0.0.1")));
        assert!(!p("::/0").contains(ip("::ffff:10.0.0.1")));
        assert!(p("::/0").contains(ip("2001:db8::1")));
        assert!(p("0.0.0.0/0").contains(ip("255.255.255.255")));
    }

    fn rule(s: &str, action: Action) -> Rule {
        Rule { prefix: p(s), action }
    }

    #[test]
    fn most_specific_wins_then_last() {
        let rules = [
            rule("192.168.1.0/24", Action::Serve),
            rule("192.168.0.0/16", Action::Deny),
            rule("192.168.1.128/25", Action::Exempt),
            rule("192.168.0.0/16", Action::Ignore),
            rule("2001:db8::/32", Action::Limited),
            rule("::ffff:172.16.0.0/108", Action::Serve),
        ];
        let t = AccessTable::new(&rules, Action::Limited);
        let m = |action, rule| Match { action, rule };
        assert_eq!(t.lookup(ip("192.168.1.1")), m(Action::Serve, Some(0)));
        assert_eq!(t.lookup(ip("192.168.1.200")), m(Action::Exempt, Some(2)));
        assert_eq!(t.lookup(ip("192.168.2.1")), m(Action::Ignore, Some(3)));
        assert_eq!(t.lookup(ip("::ffff:192.168.1.1")), m(Action::Serve, Some(0)));
        assert_eq!(t.lookup(ip("2001:db8:1::1")), m(Action::Limited, Some(4)));
        assert_eq!(t.lookup(ip("172.16.3.4")), m(Action::Serve, Some(5)));
        assert_eq!(t.lookup(ip("8.8.8.8")), m(Action::Limited, None));
        assert_eq!(t.lookup(ip("2001:db9::1")), m(Action::Limited, None));
        for a in [
            "192.168.1.1",
            "192.168.1.200",
            "192.168.2.1",
            "8.8.8.8",
            "2001:db8::5",
            "::1",
        ] {
            assert_eq!(t.lookup(ip(a)), linear_lookup(&rules, Action::Limited, ip(a)), "{a}");
        }
    }

    #[test]
    fn edges_of_the_space() {
        let rules = [
            rule("0.0.0.0/0", Action::Serve),
            rule("255.255.255.255/32", Action::Deny),
            rule("0.0.0.0/32", Action::Ignore),
            rule("::/0", Action::Exempt),
            rule("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff/128", Action::Deny),
        ];
        let t = AccessTable::new(&rules, Action::Limited);
        assert_eq!(t.lookup(ip("255.255.255.255")).rule, Some(1));
        assert_eq!(t.lookup(ip("255.255.255.254")).rule, Some(0));
        assert_eq!(t.lookup(ip("0.0.0.0")).rule, Some(2));
        assert_eq!(t.lookup(ip("0.0.0.1")).rule, Some(0));
        assert_eq!(t.lookup(ip("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")).rule, Some(4));
        assert_eq!(t.lookup(ip("::")).rule, Some(3));
        let empty = AccessTable::new(&[], Action::Deny);
        assert_eq!(
            empty.lookup(ip("1.2.3.4")),
            Match {
                action: Action::Deny,
                rule: None
            }
        );
        assert_eq!(
            empty.lookup(ip("::1")),
            Match {
                action: Action::Deny,
                rule: None
            }
        );
    }

    #[test]
    fn indexed_table_matches_oracle() {
        // Enough rules to switch the index on; deterministic spread over the space.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let rules: Vec<Rule> = (0..2000)
            .map(|i| {
                let x = next();
                let addr = IpAddr::V4(Ipv4Addr::from((x >> 32) as u32));
                Rule {
                    prefix: Prefix::truncate(addr, (x % 33) as u8).unwrap(),
                    action: Action::ALL[i % 5],
                }
            })
            .collect();
        let t = AccessTable::new(&rules, Action::Serve);
        assert!(!t.v4.index.is_empty());
        for _ in 0..20_000 {
            let a = IpAddr::V4(Ipv4Addr::from(next() as u32));
            assert_eq!(t.lookup(a), linear_lookup(&rules, Action::Serve, a), "{a}");
        }
    }

    #[test]
    fn shareable_between_workers() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AccessTable>();
        send_sync::<crate::policy::RateLimiter>();
    }
}
