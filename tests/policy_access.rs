//! Property tests: the access table answers exactly what the naive linear oracle answers.

use gnomon::policy::{AccessTable, Action, Prefix, Rule, linear_lookup};
use proptest::prelude::*;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Few distinct bases and all lengths, so prefixes nest, overlap, and repeat.
fn arb_rule() -> impl Strategy<Value = Rule> {
    let v4 = (0..8u32, any::<u32>(), 0..=32u8).prop_map(|(base, noise, len)| {
        let a = (base << 29) ^ (noise & 0x00ff_00ff);
        Prefix::truncate(IpAddr::V4(Ipv4Addr::from(a)), len).unwrap()
    });
    let v6 = (0..8u128, any::<u128>(), 0..=128u8).prop_map(|(base, noise, len)| {
        let a = (0x2001_0db8u128 << 96) ^ (base << 80) ^ (noise & 0xffff_0000_ffff_0000_ffff);
        Prefix::truncate(IpAddr::V6(Ipv6Addr::from(a)), len).unwrap()
    });
    let prefix = prop_oneof![v4, v6];
    (prefix, 0..5usize).prop_map(|(prefix, a)| Rule {
        prefix,
        action: Action::ALL[a],
    })
}

/// Addresses at and around every rule's edges, plus IPv4-mapped forms of the IPv4 ones.
fn probes(rules: &[Rule], extra: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = extra.to_vec();
    for r in rules {
        for (edge, step) in [
            (r.prefix.addr(), -1i8),
            (r.prefix.addr(), 0),
            (r.prefix.last(), 0),
            (r.prefix.last(), 1),
        ] {
            match edge {
                IpAddr::V4(a) => {
                    let x = Ipv4Addr::from(u32::from(a).wrapping_add_signed(step.into()));
                    out.extend([IpAddr::V4(x), IpAddr::V6(x.to_ipv6_mapped())]);
                }
                IpAddr::V6(a) => out.push(IpAddr::V6(Ipv6Addr::from(
                    u128::from(a).wrapping_add_signed(step.into()),
                ))),
            }
        }
    }
    out
}

/// Clustered rules: one base per family (the bottom, the top, a private range or random), then
/// bits from a few narrow bands far apart, mostly host routes: every level of nested tables meets
/// a crowded bucket, in IPv4 as in IPv6.
fn clustered_rules() -> impl Strategy<Value = Vec<Rule>> {
    let base4 = prop_oneof![Just(0u32), Just(u32::MAX), Just(0x0a00_0000), any::<u32>()];
    let base6 = prop_oneof![Just(0u128), Just(u128::MAX), Just(0x2001_0db8 << 96), any::<u128>()];
    let raw = (any::<bool>(), any::<u64>(), 0..100u8, 0..5usize);
    (base4, base6, proptest::collection::vec(raw, 300..1500)).prop_map(|(b4, b6, raw)| {
        raw.into_iter()
            .map(|(v6, x, pick, a)| {
                let prefix = if v6 {
                    // 2 bits in each of 8 bands 16 apart, plus 2 low bits.
                    let mut noise = u128::from((x >> 20) & 3);
                    for band in 0..8 {
                        noise |= u128::from((x >> (2 * band)) & 3) << (112 - 16 * band);
                    }
                    let len = if pick < 85 { 128 } else { (x >> 40) as u8 % 129 };
                    Prefix::truncate(IpAddr::V6(Ipv6Addr::from(b6 ^ noise)), len)
                } else {
                    let mut noise = 0u32;
                    for (k, bit) in [31u32, 30, 22, 21, 13, 12, 4, 3, 1, 0].into_iter().enumerate() {
                        noise |= (((x >> k) & 1) as u32) << bit;
                    }
                    let len = if pick < 85 { 32 } else { (x >> 40) as u8 % 33 };
                    Prefix::truncate(IpAddr::V4(Ipv4Addr::from(b4 ^ noise)), len)
                };
                Rule {
                    prefix: prefix.unwrap(),
                    action: Action::ALL[a],
                }
            })
            .collect()
    })
}

/// The table built from `rules` answers every probe as the linear oracle does, with both
/// `lookup` and `action`.
fn matches_oracle(rules: &[Rule], default: Action, extra: &[IpAddr]) -> Result<(), TestCaseError> {
    let t = AccessTable::new(rules, default);
    for a in probes(rules, extra) {
        let want = linear_lookup(rules, default, a);
        prop_assert_eq!(t.lookup(a), want, "address {}", a);
        prop_assert_eq!(t.action(a), want.action, "address {}", a);
    }
    Ok(())
}

fn arb_default() -> impl Strategy<Value = Action> {
    (0..5usize).prop_map(|i| Action::ALL[i])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn small_tables_match_oracle(
        rules in proptest::collection::vec(arb_rule(), 0..40),
        default in arb_default(),
        extra in proptest::collection::vec(any::<IpAddr>(), 0..20),
    ) {
        matches_oracle(&rules, default, &extra)?;
    }

    /// Enough rules that the direct index is built; fewer cases since the oracle is O(n).
    #[test]
    fn indexed_tables_match_oracle(
        rules in proptest::collection::vec(arb_rule(), 200..400),
        default in arb_default(),
        extra in proptest::collection::vec(any::<IpAddr>(), 0..50),
    ) {
        matches_oracle(&rules, default, &extra)?;
    }

    /// Display then parse gives the same prefix; parsing never panics.
    #[test]
    fn prefix_text_round_trips(rule in arb_rule(), junk in "\\PC{0,40}") {
        prop_assert_eq!(rule.prefix.to_string().parse::<Prefix>(), Ok(rule.prefix));
        let _ = junk.parse::<Prefix>();
    }
}

proptest! {
    // Up to 1,500 rules against an O(n) oracle: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Crowded buckets, down to the deepest nested tables (see `clustered_rules_nest_deep`).
    #[test]
    fn clustered_tables_match_oracle(
        rules in clustered_rules(),
        default in arb_default(),
        extra in proptest::collection::vec(any::<IpAddr>(), 0..50),
    ) {
        matches_oracle(&rules, default, &extra)?;
    }
}

/// The clustered generator reaches nested tables in both families and the deepest level in
/// IPv6, so `clustered_tables_match_oracle` tests them.
#[test]
fn clustered_rules_nest_deep() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut v4, mut v6) = (0, 0);
    for _ in 0..50 {
        let rules = clustered_rules().new_tree(&mut runner).unwrap().current();
        let [(d4, _), (d6, _)] = AccessTable::new(&rules, Action::Serve).nesting();
        v4 = v4.max(d4);
        v6 = v6.max(d6);
    }
    assert!(v4 >= 2, "IPv4 nests {v4} deep");
    assert_eq!(v6, 5, "IPv6 nests {v6} deep");
}

/// 4,096 hosts on a binary tree of address bits 10 apart crowd a bucket at every level, down to
/// the last, where the rest is binary-searched; with rules on either side of them.
#[test]
fn a_binary_tree_of_hosts_nests_to_the_last_level() {
    let mut rules: Vec<Rule> = (0..4096u128)
        .map(|i| {
            let a = (0..12).fold(1, |a, k| a | ((i >> k) & 1) << (120 - 10 * k));
            Rule {
                prefix: Prefix::truncate(IpAddr::V6(Ipv6Addr::from(a)), 128).unwrap(),
                action: Action::ALL[i as usize % 5],
            }
        })
        .collect();
    for (text, action) in [("::/1", Action::Deny), ("ffff::/16", Action::Ignore)] {
        rules.push(Rule {
            prefix: text.parse().unwrap(),
            action,
        });
    }
    assert_eq!(AccessTable::new(&rules, Action::Serve).nesting()[1].0, 5);
    matches_oracle(&rules, Action::Serve, &[]).unwrap();
}
