//! Which worker gets a packet: classic BPF programs for `SO_ATTACH_REUSEPORT_CBPF`.
//!
//! The kernel runs the program for every datagram arriving at the reuseport group and hands the
//! datagram to the socket whose index it returns (sockets are indexed in bind order, so socket i
//! belongs to worker i). `tuning/README.md` explains the trade-off between the policies.

/// How datagrams are spread over the workers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Steering {
    /// The kernel's default 4-tuple hash: one client with many source ports meets several workers.
    Hash,
    /// By source address (IPv4 address, IPv6 /64): one client always meets the same worker, so its
    /// rate-limiter entry stays in one core's cache and decisions are exact even without sharing.
    Source,
    /// By the CPU that received the packet (RSS queue / softirq core): cache-local with NIC RSS;
    /// assumes worker i is pinned to CPU i.
    Cpu,
}

impl std::str::FromStr for Steering {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hash" => Ok(Steering::Hash),
            "source" => Ok(Steering::Source),
            "cpu" => Ok(Steering::Cpu),
            _ => Err(format!("unknown steering `{s}` (expected source, cpu or hash)")),
        }
    }
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

// Opcodes from linux/filter.h and linux/bpf_common.h.
const BPF_LD: u16 = 0x00;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_ALU: u16 = 0x04;
const BPF_RSH: u16 = 0x70;
const BPF_XOR: u16 = 0xa0;
const BPF_MOD: u16 = 0x90;
const BPF_K: u16 = 0x00;
const BPF_X: u16 = 0x08;
const BPF_RET: u16 = 0x06;
const BPF_A: u16 = 0x10;
const BPF_MISC: u16 = 0x07;
const BPF_TAX: u16 = 0x00;
/// Negative offsets reach the network header and ancillary data (linux/filter.h).
const SKF_NET_OFF: i32 = -0x0010_0000;
const SKF_AD_OFF: i32 = -0x1000;
const SKF_AD_CPU: i32 = 36;

const fn insn(code: u16, k: u32) -> Insn {
    Insn { code, jt: 0, jf: 0, k }
}

fn load_net_word(offset: i32) -> Insn {
    insn(BPF_LD | BPF_W | BPF_ABS, (SKF_NET_OFF + offset) as u32)
}

/// The program for a reuseport group of `workers` sockets; `None` for the kernel's own hash.
pub fn program(steering: Steering, ipv6: bool, workers: u32) -> Option<Vec<Insn>> {
    if workers <= 1 {
        return None;
    }
    let fold_and_pick = [
        insn(BPF_MISC | BPF_TAX, 0),
        insn(BPF_ALU | BPF_RSH | BPF_K, 16),
        insn(BPF_ALU | BPF_XOR | BPF_X, 0),
        insn(BPF_ALU | BPF_MOD | BPF_K, workers),
        insn(BPF_RET | BPF_A, 0),
    ];
    match steering {
        Steering::Hash => None,
        Steering::Cpu => Some(vec![
            insn(BPF_LD | BPF_W | BPF_ABS, (SKF_AD_OFF + SKF_AD_CPU) as u32),
            insn(BPF_ALU | BPF_MOD | BPF_K, workers),
            insn(BPF_RET | BPF_A, 0),
        ]),
        Steering::Source if !ipv6 => {
            // IPv4 source address: bytes 12..16 of the IP header.
            let mut p = vec![load_net_word(12)];
            p.extend_from_slice(&fold_and_pick);
            Some(p)
        }
        Steering::Source => {
            // IPv6 source /64: bytes 8..16 of the IP header, the two words XORed.
            let mut p = vec![
                load_net_word(8),
                insn(BPF_MISC | BPF_TAX, 0),
                load_net_word(12),
                insn(BPF_ALU | BPF_XOR | BPF_X, 0),
            ];
            p.extend_from_slice(&fold_and_pick);
            Some(p)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the instructions used above, to check the programs' arithmetic.
    fn run(p: &[Insn], net: &[u8], cpu: u32) -> u32 {
        let (mut a, mut x) = (0u32, 0u32);
        for i in p {
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    let k = i.k as i32;
                    a = if k == SKF_AD_OFF + SKF_AD_CPU {
                        cpu
                    } else {
                        let o = (k - SKF_NET_OFF) as usize;
                        u32::from_be_bytes(net[o..o + 4].try_into().unwrap())
                    };
                }
                c if c == BPF_MISC | BPF_TAX => x = a,
                c if c == BPF_ALU | BPF_RSH | BPF_K => a >>= i.k,
                c if c == BPF_ALU | BPF_XOR | BPF_X => a ^= x,
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c == BPF_RET | BPF_A => return a,
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
        panic!("no return")
    }

    fn v4_header(src: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[12..16].copy_from_slice(&src);
        h
    }

    #[test]
    fn source_steering_is_per_address_and_spreads() {
        let p = program(Steering::Source, false, 2).unwrap();
        let mut seen = [0u32; 2];
        for last in 0..=255u8 {
            let w = run(&p, &v4_header([203, 0, 113, last]), 0);
            assert!(w < 2);
            // Same address, same worker, whatever else differs.
            assert_eq!(w, run(&p, &v4_header([203, 0, 113, last]), 1));
            seen[w as usize] += 1;
        }
        assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
    }

    #[test]
    fn ipv6_steering_keys_on_the_64() {
        let p = program(Steering::Source, true, 3).unwrap();
        let mut h = vec![0u8; 40];
        h[8..16].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 7]);
        let w = run(&p, &h, 0);
        for iid in 0..50u8 {
            h[16..24].copy_from_slice(&[iid; 8]);
            assert_eq!(run(&p, &h, 0), w, "hosts of one /64 split");
        }
    }

    #[test]
    fn cpu_steering_follows_the_cpu() {
        let p = program(Steering::Cpu, false, 2).unwrap();
        assert_eq!(run(&p, &v4_header([1, 2, 3, 4]), 0), 0);
        assert_eq!(run(&p, &v4_header([1, 2, 3, 4]), 1), 1);
        assert_eq!(run(&p, &v4_header([1, 2, 3, 4]), 3), 1);
    }

    #[test]
    fn one_worker_or_hash_needs_no_program() {
        assert!(program(Steering::Source, false, 1).is_none());
        assert!(program(Steering::Hash, false, 4).is_none());
    }
}
