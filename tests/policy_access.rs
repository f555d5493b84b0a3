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
        let t = AccessTable::new(&rules, default);
        for a in probes(&rules, &extra) {
            let want = linear_lookup(&rules, default, a);
            prop_assert_eq!(t.lookup(a), want, "address {}", a);
            prop_assert_eq!(t.action(a), want.action, "address {}", a);
        }
    }

    /// Enough rules that the direct index is built; fewer cases since the oracle is O(n).
    #[test]
    fn indexed_tables_match_oracle(
        rules in proptest::collection::vec(arb_rule(), 200..400),
        default in arb_default(),
        extra in proptest::collection::vec(any::<IpAddr>(), 0..50),
    ) {
        let t = AccessTable::new(&rules, default);
        for a in probes(&rules, &extra) {
            let want = linear_lookup(&rules, default, a);
            prop_assert_eq!(t.lookup(a), want, "address {}", a);
            prop_assert_eq!(t.action(a), want.action, "address {}", a);
        }
    }

    /// Display then parse gives the same prefix; parsing never panics.
    #[test]
    fn prefix_text_round_trips(rule in arb_rule(), junk in "\\PC{0,40}") {
        prop_assert_eq!(rule.prefix.to_string().parse::<Prefix>(), Ok(rule.prefix));
        let _ = junk.parse::<Prefix>();
    }
}
