//! The XDP program, assembled here as eBPF instructions so the server needs no compiler (as
//! [`crate::server::steering`] assembles its classic BPF program).
//!
//! It applies [`super::frame::classify`]'s rules in the same order with the same reasons,
//! redirects a match to the AF_XDP socket of its RX queue (`bpf_redirect_map` on an XSKMAP,
//! `XDP_PASS` when no socket is bound there) and passes everything else to the kernel. Each
//! verdict is counted in a per-CPU array indexed by [`Pass`] / `COUNT_*`, so counting takes no
//! atomic and no shared cache line.
#![forbid(unsafe_code)]

use super::frame::{
    COUNT_NO_SOCKET, COUNT_REDIRECTED, ETH_HLEN, IPPROTO_UDP, IPV4_HLEN, IPV6_HLEN, NTP_MIN, Pass, Target, UDP_HLEN,
    VLAN_HLEN,
};

/// One eBPF instruction (`struct bpf_insn`): `regs` holds dst in the low nibble, src in the high.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

// Opcodes from linux/bpf.h and linux/bpf_common.h.
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const STX: u8 = 0x03;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const DW: u8 = 0x18;
const IMM: u8 = 0x00;
const MEM: u8 = 0x60;
const K: u8 = 0x00;
const X: u8 = 0x08;
const ADD: u8 = 0x00;
const SUB: u8 = 0x10;
const AND: u8 = 0x50;
const MOV: u8 = 0xb0;
const END: u8 = 0xd0;
const TO_BE: u8 = 0x08;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JGE: u8 = 0x30;
const JSET: u8 = 0x40;
const JNE: u8 = 0x50;
const JLT: u8 = 0xa0;
const CALL: u8 = 0x80;
const EXIT: u8 = 0x90;
const PSEUDO_MAP_FD: u8 = 1;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_REDIRECT: i32 = 23;
const FN_REDIRECT_MAP: i32 = 51;
const FN_XDP_ADJUST_META: i32 = 54;
/// Kernel 6.1+.
const FN_KTIME_GET_TAI_NS: i32 = 208;

/// Bytes of metadata the program puts before a redirected frame: its CLOCK_TAI receive time.
pub const META_LEN: usize = 8;

/// XDP verdicts (enum xdp_action).
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;

// struct xdp_md offsets.
const MD_DATA: i16 = 0;
const MD_DATA_END: i16 = 4;
const MD_DATA_META: i16 = 8;
const MD_RX_QUEUE_INDEX: i16 = 16;

#[derive(Clone, Copy)]
struct Label(usize);

/// A tiny assembler: instructions with forward jumps to labels, resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

fn regs(dst: u8, src: u8) -> u8 {
    dst | (src << 4)
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }
    fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.insns.len());
    }
    fn emit(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: regs(dst, src),
            off,
            imm,
        });
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.emit(ALU64 | MOV | K, dst, 0, 0, imm);
    }
    fn mov(&mut self, dst: u8, src: u8) {
        self.emit(ALU64 | MOV | X, dst, src, 0, 0);
    }
    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.emit(ALU64 | ADD | K, dst, 0, 0, imm);
    }
    fn add(&mut self, dst: u8, src: u8) {
        self.emit(ALU64 | ADD | X, dst, src, 0, 0);
    }
    fn load(&mut self, size: u8, dst: u8, src: u8, off: i16) {
        self.emit(LDX | MEM | size, dst, src, off, 0);
    }
    /// A 16-bit network-order field as a number, bounded to 16 bits for the verifier.
    fn load_be16(&mut self, dst: u8, src: u8, off: i16) {
        self.load(H, dst, src, off);
        self.emit(ALU | END | TO_BE, dst, 0, 0, 16);
        self.emit(ALU64 | AND | K, dst, 0, 0, 0xffff);
    }
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, to: Label) {
        self.fixups.push((self.insns.len(), to));
        self.emit(code, dst, src, 0, imm);
    }
    fn goto(&mut self, to: Label) {
        self.jump(JMP | JA, 0, 0, 0, to);
    }
    /// Jumps unless the low 32 bits of `dst` equal `imm` (a loaded word is zero-extended, an
    /// immediate sign-extended: only a 32-bit compare is right for both).
    fn jne32(&mut self, dst: u8, imm: u32, to: Label) {
        self.jump(JMP32 | JNE | K, dst, 0, imm as i32, to);
    }
    fn ld_map_fd(&mut self, dst: u8, fd: i32) {
        self.emit(LD | DW | IMM, dst, PSEUDO_MAP_FD, 0, fd);
        self.emit(0, 0, 0, 0, 0);
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, l) in self.fixups {
            let to = self.labels[l.0].expect("unbound label");
            self.insns[at].off = (to as isize - at as isize - 1) as i16;
        }
        self.insns
    }
}

/// A program that sends every frame on to the interface `ifindex` (`bpf_redirect`). Not
/// gnomon's: the benches put it on the far end of a generator's veth pair, so that requests
/// reach the server's veth end as XDP frames, as from a NIC, and not as skbs that veth first
/// copies into a page for XDP (`examples/xdp_redirect.rs`).
pub fn assemble_redirect(ifindex: u32) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_imm(R1, ifindex as i32);
    a.mov_imm(R2, 0);
    a.emit(JMP | CALL, 0, 0, 0, FN_REDIRECT);
    a.emit(JMP | EXIT, 0, 0, 0, 0);
    a.finish()
}

/// A network-order field loaded as a little-endian word compares equal to this (loads are in
/// host order; the program is built for the host it runs on).
fn as_loaded(bytes: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w[..bytes.len()].copy_from_slice(bytes);
    u32::from_ne_bytes(w)
}

const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

/// An always-taken jump: a plain `goto` would leave the rest of the family's checks without an
/// edge into them, which the verifier refuses as unreachable code.
fn never_ours(a: &mut Asm, pass: Label) {
    a.jump(JMP | JGE | K, R5, 0, 0, pass);
}

/// The program for `target`, with the XSKMAP and the counter map given by their fds.
pub fn assemble(t: &Target, xsks_map: i32, counters_map: i32) -> Vec<Insn> {
    let mut a = Asm::default();
    let pass = a.label();
    let count = a.label();
    let redirect = a.label();
    let v4 = a.label();
    let untagged = a.label();
    let out = a.label();
    // r6 ctx, r2 data, r3 data_end, r8 IP header, r7 the reason so far, r9 the verdict.
    let reason = |a: &mut Asm, p: Pass| a.mov_imm(R7, p as i32);
    // Jumps to `pass` when fewer than `n` bytes follow `base`.
    let need = |a: &mut Asm, base: u8, n: usize| {
        a.mov(R4, base);
        a.add_imm(R4, n as i32);
        a.jump(JMP | JGT | X, R4, R3, 0, pass);
    };
    a.mov(R6, R1);
    a.load(W, R2, R6, MD_DATA);
    a.load(W, R3, R6, MD_DATA_END);
    reason(&mut a, Pass::Short);
    need(&mut a, R2, ETH_HLEN);
    reason(&mut a, Pass::GroupMac);
    a.load(B, R5, R2, 0);
    a.jump(JMP | JSET | K, R5, 0, 1, pass);
    a.load(B, R5, R2, 6);
    a.jump(JMP | JSET | K, R5, 0, 1, pass);
    a.mov(R8, R2);
    a.add_imm(R8, ETH_HLEN as i32);
    a.load(H, R5, R2, 12);
    a.jne32(R5, as_loaded(&0x8100u16.to_be_bytes()), untagged);
    reason(&mut a, Pass::Short);
    need(&mut a, R2, ETH_HLEN + VLAN_HLEN);
    a.load(H, R5, R2, 16);
    a.add_imm(R8, VLAN_HLEN as i32);
    a.bind(untagged);
    reason(&mut a, Pass::Ethertype);
    a.jump(JMP32 | JEQ | K, R5, 0, as_loaded(&0x0800u16.to_be_bytes()) as i32, v4);
    a.jne32(R5, as_loaded(&0x86ddu16.to_be_bytes()), pass);

    // IPv6: version 6, UDP as the next header, then address, port, lengths.
    reason(&mut a, Pass::Short);
    need(&mut a, R8, IPV6_HLEN + UDP_HLEN + NTP_MIN);
    reason(&mut a, Pass::IpHeader);
    a.load(B, R5, R8, 0);
    a.emit(ALU64 | AND | K, R5, 0, 0, 0xf0);
    a.jne32(R5, 0x60, pass);
    reason(&mut a, Pass::NotUdp);
    a.load(B, R5, R8, 6);
    a.jne32(R5, IPPROTO_UDP as u32, pass);
    reason(&mut a, Pass::Address);
    match t.v6 {
        Some(addr) => {
            for (i, w) in addr.octets().chunks_exact(4).enumerate() {
                a.load(W, R5, R8, 24 + 4 * i as i16);
                a.jne32(R5, as_loaded(w), pass);
            }
        }
        None => never_ours(&mut a, pass),
    }
    reason(&mut a, Pass::Port);
    a.load(H, R5, R8, 42);
    a.jne32(R5, as_loaded(&t.port.to_be_bytes()), pass);
    reason(&mut a, Pass::Length);
    a.load_be16(R9, R8, 4);
    a.jump(JMP | JLT | K, R9, 0, (UDP_HLEN + NTP_MIN) as i32, pass);
    a.mov(R4, R8);
    a.add_imm(R4, IPV6_HLEN as i32);
    a.add(R4, R9);
    a.jump(JMP | JGT | X, R4, R3, 0, pass);
    a.load_be16(R5, R8, 44);
    a.jump(JMP | JNE | X, R5, R9, 0, pass);
    a.goto(redirect);

    // IPv4: no options, reserved flag clear, not a fragment, UDP; address, port, lengths.
    a.bind(v4);
    reason(&mut a, Pass::Short);
    need(&mut a, R8, IPV4_HLEN + UDP_HLEN + NTP_MIN);
    reason(&mut a, Pass::IpHeader);
    a.load(B, R5, R8, 0);
    a.jne32(R5, 0x45, pass);
    a.load(B, R5, R8, 6);
    a.jump(JMP | JSET | K, R5, 0, 0x80, pass);
    reason(&mut a, Pass::Fragment);
    a.load(H, R5, R8, 6);
    a.jump(JMP | JSET | K, R5, 0, as_loaded(&0x3fffu16.to_be_bytes()) as i32, pass);
    reason(&mut a, Pass::NotUdp);
    a.load(B, R5, R8, 9);
    a.jne32(R5, IPPROTO_UDP as u32, pass);
    reason(&mut a, Pass::Address);
    match t.v4 {
        Some(addr) => {
            a.load(W, R5, R8, 16);
            a.jne32(R5, as_loaded(&addr.octets()), pass);
        }
        None => never_ours(&mut a, pass),
    }
    reason(&mut a, Pass::Port);
    a.load(H, R5, R8, 22);
    a.jne32(R5, as_loaded(&t.port.to_be_bytes()), pass);
    reason(&mut a, Pass::Length);
    a.load_be16(R9, R8, 2);
    a.jump(JMP | JLT | K, R9, 0, (IPV4_HLEN + UDP_HLEN + NTP_MIN) as i32, pass);
    a.mov(R4, R8);
    a.add(R4, R9);
    a.jump(JMP | JGT | X, R4, R3, 0, pass);
    a.load_be16(R5, R8, 24);
    a.emit(ALU64 | SUB | K, R9, 0, 0, IPV4_HLEN as i32);
    a.jump(JMP | JNE | X, R5, R9, 0, pass);

    // A request: its receive time (CLOCK_TAI) in the 8 bytes of metadata before the frame,
    // where the AF_XDP socket finds it as T2; then to the socket of this RX queue, or to the
    // kernel if none is bound there.
    a.bind(redirect);
    let send = a.label();
    a.emit(JMP | CALL, 0, 0, 0, FN_KTIME_GET_TAI_NS);
    a.mov(R8, R0);
    a.mov(R1, R6);
    a.mov_imm(R2, -(META_LEN as i32));
    a.emit(JMP | CALL, 0, 0, 0, FN_XDP_ADJUST_META);
    a.jump(JMP | JNE | K, R0, 0, 0, send);
    a.load(W, R2, R6, MD_DATA);
    a.load(W, R3, R6, MD_DATA_META);
    a.mov(R4, R3);
    a.add_imm(R4, META_LEN as i32);
    a.jump(JMP | JGT | X, R4, R2, 0, send);
    a.emit(STX | MEM | DW, R3, R8, 0, 0);
    a.bind(send);
    a.load(W, R2, R6, MD_RX_QUEUE_INDEX);
    a.ld_map_fd(R1, xsks_map);
    a.mov_imm(R3, XDP_PASS as i32);
    a.emit(JMP | CALL, 0, 0, 0, FN_REDIRECT_MAP);
    a.mov(R9, R0);
    a.mov_imm(R7, COUNT_REDIRECTED as i32);
    a.jump(JMP32 | JEQ | K, R0, 0, XDP_REDIRECT as i32, count);
    a.mov_imm(R7, COUNT_NO_SOCKET as i32);
    a.goto(count);

    a.bind(pass);
    a.mov_imm(R9, XDP_PASS as i32);
    a.bind(count);
    a.emit(STX | MEM | W, R10, R7, -4, 0);
    a.mov(R2, R10);
    a.add_imm(R2, -4);
    a.ld_map_fd(R1, counters_map);
    a.emit(JMP | CALL, 0, 0, 0, FN_MAP_LOOKUP_ELEM);
    a.jump(JMP | JEQ | K, R0, 0, 0, out);
    a.load(DW, R1, R0, 0);
    a.add_imm(R1, 1);
    a.emit(STX | MEM | DW, R0, R1, 0, 0);
    a.bind(out);
    a.mov(R0, R9);
    a.emit(JMP | EXIT, 0, 0, 0, 0);
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_inside_the_program_and_it_ends_in_exit() {
        let t = Target {
            v4: Some(std::net::Ipv4Addr::new(198, 18, 0, 1)),
            v6: None,
            port: 123,
        };
        let p = assemble(&t, 3, 4);
        assert_eq!(p.last().unwrap().code, JMP | EXIT);
        // Far below the verifier's limits; a jump offset is 16 bits.
        assert!(p.len() < 1000, "{} instructions", p.len());
        for (i, insn) in p.iter().enumerate() {
            let class = insn.code & 7;
            let op = insn.code & 0xf0;
            if (class == JMP || class == JMP32) && op != CALL && op != EXIT {
                let to = i as isize + 1 + insn.off as isize;
                assert!(to > i as isize && (to as usize) < p.len(), "insn {i} jumps to {to}");
            }
        }
    }
}
