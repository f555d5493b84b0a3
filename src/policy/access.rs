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
//! answer is constant. The table stores, per family, the interval starts sorted, plus a direct
//! index on up to 16 address bits that narrows the search to the few intervals beginning in that
//! slice of the space; those are counted over a fixed window of 8 entries, which has no branch to
//! mispredict, with a short binary search for the few buckets holding more, and a table of its own
//! (the same structure, one level down) for a bucket holding many more, as clustered rules do. A
//! lookup is then one index load and one cache line of starts: about the cost of a poptrie
//! lookup, with a build that is a sort and one sweep and an obvious correctness argument (it is
//! the oracle's answer, precomputed per interval). A multibit trie would need prefix expansion
//! and leaf pushing to match that, and a plain binary trie takes up to 128 dependent loads.
//!
//! The index bits are those right after the longest prefix all interval starts share, so that
//! IPv6 rules, which mostly sit in 2000::/3, spread over the whole index rather than a few
//! buckets. What the lookup touches is 8 bytes an interval whatever the family: the 60 bits of
//! the start after the bits its bucket fixes, with the action (see `Ranges`). That keeps
//! 100,000 random IPv6 rules (200,000 intervals) at 1.6 MB hot, inside a 2 MiB L2, where 128-bit
//! starts beside their answers took 4.8 MB and a cache miss past L2 on most lookups. Clustered
//! rules cost more (nested tables, below): up to about 30 MB for 100,000 rules built to crowd
//! every level, linear in the rules, never more.
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
    /// Answer NTS-authenticated requests, subject to the rate limiter; drop plain ones (as
    /// ntpd-rs's `require-nts = "ignore"`): a DENY would be an unauthenticated answer to a
    /// spoofable request, so a reflector, and tells an attacker nothing it needs.
    NtsOnly = 5,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Serve,
        Action::Ignore,
        Action::Deny,
        Action::Limited,
        Action::Exempt,
        Action::NtsOnly,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Action::Serve => "serve",
            Action::Ignore => "ignore",
            Action::Deny => "deny",
            Action::Limited => "limited",
            Action::Exempt => "exempt",
            Action::NtsOnly => "nts-only",
        }
    }

    /// Whether the rate limiter applies to the answers of this action.
    pub const fn rate_limited(self) -> bool {
        matches!(self, Action::Limited | Action::Deny | Action::NtsOnly)
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
        f.write_str("unknown action (expected serve, ignore, deny, limited, exempt or nts-only)")
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

/// Bounds on the bits of the direct index in front of the search: about one bucket per interval.
const MIN_INDEX_BITS: u32 = 4;
const MAX_INDEX_BITS: u32 = 16;
/// Up to this many candidate intervals are counted in a fixed window, more are binary-searched
/// (in a few cache lines), and over `SUB_TABLE_MIN` get a table of their own.
const WINDOW: usize = 8;
/// Random rules crowd about 2% of buckets past the window, mostly by a few: a table each would
/// cost more memory (and L2) than the short search it saves.
const SUB_TABLE_MIN: usize = 32;
/// Levels of such tables; a bucket still crowded below the last is binary-searched. Each level
/// copies an interval at most once, so memory stays linear in the rules whatever their shape.
const MAX_DEPTH: u32 = 5;
/// Bits of an interval start kept in its hot entry, after the bits its bucket already fixes.
const KEY_BITS: u32 = 60;
/// Hot entry flag: the start has bits below the [`KEY_BITS`] kept, held in `Ranges::low`.
const INEXACT: u64 = 1 << 3;

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
            action: action_bits(self.0.into()),
            rule: (self.0 >> 3).checked_sub(1),
        }
    }
}

#[inline]
fn action_bits(x: u64) -> Action {
    Action::ALL[(x & 7) as usize]
}

/// The intervals of one address family, sorted by start.
///
/// The hot path reads only `index` and `hot`: 8 bytes an interval, so that 100,000 IPv6 rules
/// (200,000 intervals) fit in a 2 MiB L2 beside the index. A hot entry is the [`KEY_BITS`] of
/// the start right after the bits the bucket fixes, a flag, and the action. Starts compared
/// within one bucket share those fixed bits, so comparing the kept bits orders them exactly
/// unless two agree on all of them; only starts with bits set further down (rules longer than
/// the shared prefix plus the index bits plus 60: /79 for rules spread over 2000::/3, /64 at
/// worst) can then be wrong, and those carry [`INEXACT`] and their remaining bits in `low`.
/// The rule index, which only diagnostics want, sits apart in `answers`.
#[derive(Clone, Debug)]
struct Ranges {
    /// Interval `i` starts at the `i`-th start and runs up to the next one; the first starts at
    /// 0. Padded with [`WINDOW`] entries so the fixed window never reads past the end.
    hot: Box<[u64]>,
    /// The full answer per interval.
    answers: Box<[Packed]>,
    /// Per interval, the start's bits below the kept ones; empty when no start has any.
    low: Box<[u64]>,
    /// `2^index_bits + 1` entries: `index[b]` is how many starts lie below the region's bucket
    /// `b`, so bucket `b` holds the starts `index[b]..index[b + 1]`.
    index: Box<[u32]>,
    /// The region: the longest prefix that all starts but the first share (capped so that the
    /// index bits fit after it), as a mask and a value. The index covers the region only:
    /// below it the answer is the first interval's, above it the last interval's.
    region_mask: u128,
    region_base: u128,
    /// Bucket of a key: `(key >> index_shift) & bucket_mask`.
    index_shift: u32,
    bucket_mask: usize,
    /// Kept bits of a key: `(key << key_shift) >> (128 - KEY_BITS)`.
    key_shift: u32,
    /// The bits below the kept ones, for `low`.
    low_mask: u128,
    /// Tables of crowded buckets, by bucket: (bucket, position of its first interval here,
    /// table). Its position `j` is `base + j` here.
    subs: Box<[(u32, usize, Ranges)]>,
}

impl Ranges {
    /// `prefixes`: (first, last, answer) in a `width`-bit space.
    fn build(mut prefixes: Vec<(u128, u128, usize)>, rules: &[Rule], default: Action, width: u32) -> Ranges {
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

        Ranges::from_intervals(&out, width, 0)
    }

    /// The table over sorted intervals `out`, looked up only with keys >= `out[0].0`. Crowded
    /// buckets get a table of their own, down to `MAX_DEPTH` levels.
    fn from_intervals(out: &[(u128, Match)], width: u32, depth: u32) -> Ranges {
        let max = host_mask(width, 0);
        let n = out.len();
        let index_bits = (usize::BITS - (n - 1).leading_zeros()).clamp(MIN_INDEX_BITS, MAX_INDEX_BITS);
        // Real IPv6 rules sit mostly in 2000::/3 and all in a few /16s: indexing the bits after
        // their common prefix spreads them over the buckets instead of a handful. At least one
        // bit stays below the index, and at least MIN_INDEX_BITS sit above the kept key bits, so
        // that the bits below those fit a u64.
        let (lo, hi) = if n >= 2 { (out[1].0, out[n - 1].0) } else { (0, 0) };
        let common = ((lo ^ hi).leading_zeros() - (128 - width)).min(width - index_bits - 1);
        let index_shift = width - common - index_bits;
        let key_shift = 128 - index_shift;
        let low_mask = host_mask(128, (key_shift + KEY_BITS).min(128) as u8);
        let region_mask = max & !host_mask(width, common as u8);
        let region_base = lo & region_mask;

        let mut hot = Vec::with_capacity(n + WINDOW);
        let mut low = Vec::with_capacity(n);
        for &(start, m) in out {
            let rest = (start & low_mask) as u64;
            let kept = ((start << key_shift) >> (128 - KEY_BITS)) as u64;
            hot.push(kept << 4 | if rest != 0 { INEXACT } else { 0 } | m.action as u64);
            low.push(rest);
        }
        hot.resize(n + WINDOW, u64::MAX);
        if low.iter().all(|&r| r == 0) {
            low = Vec::new();
        }

        let mut index = Vec::with_capacity((1 << index_bits) + 1);
        let mut below = 0usize;
        for b in 0u128..1 << index_bits {
            let first = region_base | (b << index_shift);
            while below < n && out[below].0 < first {
                below += 1;
            }
            index.push(below as u32);
        }
        index.push(n as u32);

        // A bucket with more starts than the window gets its own table over the bits after
        // what its starts share: clustered rules (a /48 full of /64s, thousands of hosts of one
        // network) then cost another level, not a binary search over thousands.
        let mut subs = Vec::new();
        if depth < MAX_DEPTH {
            for b in 0..1usize << index_bits {
                let (from, to) = (index[b] as usize, index[b + 1] as usize);
                if to - from <= SUB_TABLE_MIN {
                    continue;
                }
                // The interval holding the bucket's first address, then the bucket's starts.
                let base = from.saturating_sub(1);
                let mut list = out[base..to].to_vec();
                list[0].0 = list[0].0.max(region_base | ((b as u128) << index_shift));
                subs.push((b as u32, base, Ranges::from_intervals(&list, width, depth + 1)));
            }
        }
        Ranges {
            subs: subs.into_boxed_slice(),
            hot: hot.into_boxed_slice(),
            answers: out.iter().map(|&(_, m)| Packed::new(m)).collect(),
            low: low.into_boxed_slice(),
            index: index.into_boxed_slice(),
            region_mask,
            region_base,
            index_shift,
            bucket_mask: (1 << index_bits) - 1,
            key_shift,
            low_mask,
        }
    }

    /// The interval holding `key` (the address in the family's width).
    #[inline(always)]
    fn position(&self, key: u128) -> usize {
        let last = self.answers.len() - 1;
        if key & self.region_mask != self.region_base {
            return if key < self.region_base { 0 } else { last };
        }
        let b = (key >> self.index_shift) as usize & self.bucket_mask;
        let (from, to) = (self.index[b] as usize, self.index[b + 1] as usize);
        let kept = ((key << self.key_shift) >> (128 - KEY_BITS)) as u64;
        // A hot entry is <= this exactly when its kept bits are <= the key's.
        let probe = kept << 4 | 0xf;
        // The interval before the bucket's first start holds the bucket's first address, so the
        // answer is that one plus the bucket's starts <= key. A bucket mostly holds a few, so
        // count over a fixed window masked to the bucket: a fixed trip count has no branch to
        // mispredict, unlike a binary search.
        let len = to - from;
        if len > WINDOW {
            return self.crowded(b as u32, from, to, probe, key);
        }
        let window: &[u64; WINDOW] = self.hot[from..from + WINDOW].try_into().expect("padded");
        let n: usize = (0..WINDOW).map(|k| usize::from((window[k] <= probe) & (k < len))).sum();
        // `from == 0` only for the bucket holding address 0, whose start 0 is counted.
        let mut pos = from + n - 1;
        let e = self.hot[pos];
        if e & INEXACT != 0 && e >> 4 == kept {
            // Starts that agree with the key on every kept bit were all counted; undo those whose
            // remaining bits are greater. They sort last among the equal ones, and the window
            // holds at most WINDOW of them.
            let rest = (key & self.low_mask) as u64;
            while pos >= from.max(1) && self.hot[pos] >> 4 == kept && self.low[pos] > rest {
                pos -= 1;
            }
        }
        pos
    }

    /// How many of the starts `from..to` (a crowded bucket) are <= `key`: one binary search,
    /// on the kept bits and, where a start has them, the low bits too, so that a long run of
    /// starts equal in their kept bits (100,000 hosts of one /96 beside a far rule) costs
    /// log2 steps, not a walk a spoofed source could aim at.
    #[inline(never)]
    fn crowded(&self, bucket: u32, from: usize, to: usize, probe: u64, key: u128) -> usize {
        if let Ok(k) = self.subs.binary_search_by_key(&bucket, |s| s.0) {
            let (_, base, sub) = &self.subs[k];
            return base + sub.position(key);
        }
        from + self.count_crowded(from, to, probe, key) - 1
    }

    /// A binary search over a bucket with no table of its own.
    fn count_crowded(&self, from: usize, to: usize, probe: u64, key: u128) -> usize {
        let hot = &self.hot[from..to];
        if self.low.is_empty() {
            return hot.partition_point(|&e| e <= probe);
        }
        let low = &self.low[from..to];
        let full = |j: usize| (u128::from(hot[j] >> 4) << 64) | u128::from(low[j]);
        let target = (u128::from(probe >> 4) << 64) | (key & self.low_mask);
        // Branch-free halving (as std's partition_point): the steps' loads can overlap, and a
        // compare that goes either way half the time costs no mispredictions.
        let (mut base, mut size) = (0, hot.len());
        while size > 1 {
            let half = size / 2;
            base = if full(base + half) <= target { base + half } else { base };
            size -= half;
        }
        base + usize::from(full(base) <= target)
    }

    fn memory_bytes(&self) -> usize {
        size_of_val(&*self.hot)
            + size_of_val(&*self.answers)
            + size_of_val(&*self.low)
            + size_of_val(&*self.index)
            + self
                .subs
                .iter()
                .map(|s| size_of::<(u32, usize, Ranges)>() + s.2.memory_bytes())
                .sum::<usize>()
    }

    /// (deepest level of nested tables, how many there are).
    fn nesting(&self) -> (u32, usize) {
        self.subs.iter().fold((0, self.subs.len()), |(depth, count), s| {
            let (d, c) = s.2.nesting();
            (depth.max(d + 1), count + c)
        })
    }
}

/// Longest-prefix-match table, immutable once built (rebuild and swap the whole table on reload).
#[derive(Clone, Debug)]
pub struct AccessTable {
    v4: Ranges,
    v6: Ranges,
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

    /// The action for a client address: the hot path's question. IPv4-mapped IPv6 addresses are
    /// looked up as IPv4.
    #[inline(always)]
    pub fn action(&self, addr: IpAddr) -> Action {
        let (ranges, key) = self.family(addr);
        action_bits(ranges.hot[ranges.position(key)])
    }

    /// The action and the rule that gave it, for diagnostics and tests; same answer as
    /// [`AccessTable::action`].
    pub fn lookup(&self, addr: IpAddr) -> Match {
        let (ranges, key) = self.family(addr);
        ranges.answers[ranges.position(key)].unpack()
    }

    /// The family's intervals and the address as their key. [`canonical`] by integer compare:
    /// `Ipv6Addr::to_ipv4_mapped` works on segments and costs more than the rest of a lookup.
    #[inline(always)]
    fn family(&self, addr: IpAddr) -> (&Ranges, u128) {
        match addr {
            IpAddr::V4(a) => (&self.v4, u32::from(a).into()),
            IpAddr::V6(a) => {
                let x = u128::from(a);
                if x >> 32 == V4_MAPPED >> 32 {
                    (&self.v4, x & 0xffff_ffff)
                } else {
                    (&self.v6, x)
                }
            }
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

    /// For IPv4 then IPv6: how deep buckets crowded past a binary search nest tables of their
    /// own, and how many such tables there are. Tests use it to show they reach every level.
    pub fn nesting(&self) -> [(u32, usize); 2] {
        [self.v4.nesting(), self.v6.nesting()]
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
        assert!(t.v4.index.len() > 1 << 10, "the index grows with the table");
        for _ in 0..20_000 {
            let a = IpAddr::V4(Ipv4Addr::from(next() as u32));
            assert_eq!(t.lookup(a), linear_lookup(&rules, Action::Serve, a), "{a}");
        }
    }

    #[test]
    fn starts_that_differ_only_past_the_kept_bits() {
        // Hosts next to each other inside one /80 agree on every kept bit of their starts, so
        // only the low bits tell them apart; with the index on (many rules elsewhere) too.
        // A long run of them, as a config listing many hosts of one network would have.
        let mut rules: Vec<Rule> = (0..300u128)
            .map(|i| {
                let a = (0x2001_0db8u128 << 96) | (i * 2 + 1);
                Rule {
                    prefix: Prefix::new(IpAddr::V6(Ipv6Addr::from(a)), 128).unwrap(),
                    action: Action::ALL[i as usize % 5],
                }
            })
            .chain([Rule {
                // Far away, so that the starts share no prefix the table could drop.
                prefix: "ff00::/8".parse().unwrap(),
                action: Action::Deny,
            }])
            .collect();
        for (n, extra) in [(0, 0u128), (500, 1 << 100)] {
            rules.extend((0..n).map(|i| Rule {
                prefix: Prefix::truncate(IpAddr::V6(Ipv6Addr::from(extra * (i + 2))), 48).unwrap(),
                action: Action::Deny,
            }));
            let t = AccessTable::new(&rules, Action::Serve);
            assert!(!t.v6.low.is_empty(), "the starts must need their low bits");
            assert!(!t.v6.subs.is_empty(), "300 hosts crowd one bucket: a table of its own");
            for i in 0..620u128 {
                let a = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | i));
                let want = linear_lookup(&rules, Action::Serve, a);
                assert_eq!(t.lookup(a), want, "{a}");
                assert_eq!(t.action(a), want.action, "{a}");
            }
        }
    }

    #[test]
    fn shareable_between_workers() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<AccessTable>();
        send_sync::<crate::policy::RateLimiter>();
    }
}
