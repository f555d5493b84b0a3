//! Fuzz target: an access table built from arbitrary rules answers what the linear oracle does,
//! at every rule's edges and at addresses taken from the input.
#![no_main]

use gnomon::policy::{AccessTable, Action, Prefix, Rule, linear_lookup};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One rule per 18 bytes: flags (bit 7: IPv6; low bits: action), length, 16 address bytes
/// (IPv4 uses the first 4). Inputs with few distinct address bytes make nested prefixes.
fn rule(chunk: &[u8; 18]) -> Rule {
    let mut a = [0u8; 16];
    a.copy_from_slice(&chunk[2..]);
    let (addr, width) = if chunk[0] & 0x80 != 0 {
        (IpAddr::V6(Ipv6Addr::from(a)), 129)
    } else {
        (IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])), 33)
    };
    Rule {
        prefix: Prefix::truncate(addr, chunk[1] % width).expect("length within width"),
        action: Action::ALL[usize::from(chunk[0] & 0x7f) % Action::ALL.len()],
    }
}

fn probe(addr: IpAddr, step: i8) -> [IpAddr; 2] {
    match addr {
        IpAddr::V4(a) => {
            let x = Ipv4Addr::from(u32::from(a).wrapping_add_signed(step.into()));
            [IpAddr::V4(x), IpAddr::V6(x.to_ipv6_mapped())]
        }
        IpAddr::V6(a) => [IpAddr::V6(Ipv6Addr::from(u128::from(a).wrapping_add_signed(step.into()))); 2],
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&d, body)) = data.split_first() else { return };
    let default = Action::ALL[usize::from(d) % Action::ALL.len()];
    let rules: Vec<Rule> = body.chunks_exact(18).map(|c| rule(c.try_into().unwrap())).collect();
    let table = AccessTable::new(&rules, default);
    let check = |a: IpAddr| {
        let want = linear_lookup(&rules, default, a);
        assert_eq!(table.lookup(a), want, "{a}");
        assert_eq!(table.action(a), want.action, "{a}");
    };
    for r in &rules {
        for (edge, step) in [
            (r.prefix.addr(), -1),
            (r.prefix.addr(), 0),
            (r.prefix.last(), 0),
            (r.prefix.last(), 1),
        ] {
            probe(edge, step).into_iter().for_each(check);
        }
    }
    // Input bytes as addresses of both families, wherever they fall.
    for c in body.chunks_exact(16) {
        let b: [u8; 16] = c.try_into().unwrap();
        check(IpAddr::V6(Ipv6Addr::from(b)));
        check(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3])));
    }
});
