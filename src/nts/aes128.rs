//! AES-128 encryption (FIPS 197) for NTS's AES-SIV: on x86-64 with AES-NI enabled at build time,
//! the AES-NI instructions on blocks held in vector registers; elsewhere the aes crate.
//!
//! A CMAC chain is one AES block after another, each waiting for the last, so what is around
//! each block counts: through the aes crate each block is a call on a 16-byte array, converted
//! in and out, and the whole NTS request cost about 15% more (in-process A/B, the same S2V code
//! on either). Here a chain's value stays in a register and the round keys are read where they
//! are. The instructions come through `safe_arch`, whose safe wrappers exist only when the build
//! enables the feature for the whole crate, as it does AES-NI (`.cargo/config.toml`;
//! `nts::check_cpu` refuses NTS at start on a CPU without it); a build without it takes the aes
//! crate. Both are checked against FIPS 197's example and against each other in the tests.

pub use imp::{Aes128, Block};

#[cfg(all(target_arch = "x86_64", target_feature = "aes"))]
mod imp {
    use safe_arch::{
        aes_encrypt_last_m128i, aes_encrypt_m128i, aes_key_gen_assist_m128i, bitxor_m128i, byte_shl_imm_u128_m128i,
        m128i, shuffle_ai_f32_all_m128i, zeroed_m128i,
    };

    /// One AES block in a vector register.
    #[derive(Clone, Copy)]
    pub struct Block(m128i);

    impl Block {
        #[inline(always)]
        pub fn zero() -> Block {
            Block(zeroed_m128i())
        }

        #[inline(always)]
        pub fn load(b: &[u8; 16]) -> Block {
            Block(m128i::from(*b))
        }

        #[inline(always)]
        pub fn bytes(self) -> [u8; 16] {
            self.0.into()
        }

        #[inline(always)]
        pub fn xor(self, other: Block) -> Block {
            Block(bitxor_m128i(self.0, other.0))
        }
    }

    /// An AES-128 encryption key schedule.
    #[derive(Clone)]
    pub struct Aes128 {
        round_keys: [m128i; 11],
    }

    /// One round key from the previous: AESKEYGENASSIST gives RotWord(SubWord(w3)) ^ RCON in
    /// its top word, broadcast, then word j becomes w0 ^ .. ^ wj ^ that.
    #[inline(always)]
    fn expand_step<const RCON: i32>(k: m128i) -> m128i {
        let t = shuffle_ai_f32_all_m128i::<0xff>(aes_key_gen_assist_m128i::<RCON>(k));
        let k = bitxor_m128i(k, byte_shl_imm_u128_m128i::<4>(k));
        let k = bitxor_m128i(k, byte_shl_imm_u128_m128i::<8>(k));
        bitxor_m128i(k, t)
    }

    impl Aes128 {
        #[inline(always)]
        pub fn new(key: &[u8; 16]) -> Aes128 {
            let k0 = m128i::from(*key);
            let k1 = expand_step::<0x01>(k0);
            let k2 = expand_step::<0x02>(k1);
            let k3 = expand_step::<0x04>(k2);
            let k4 = expand_step::<0x08>(k3);
            let k5 = expand_step::<0x10>(k4);
            let k6 = expand_step::<0x20>(k5);
            let k7 = expand_step::<0x40>(k6);
            let k8 = expand_step::<0x80>(k7);
            let k9 = expand_step::<0x1b>(k8);
            let k10 = expand_step::<0x36>(k9);
            Aes128 {
                round_keys: [k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10],
            }
        }

        #[inline(always)]
        pub fn encrypt(&self, b: Block) -> Block {
            let rk = &self.round_keys;
            let mut x = bitxor_m128i(b.0, rk[0]);
            for k in &rk[1..10] {
                x = aes_encrypt_m128i(x, *k);
            }
            Block(aes_encrypt_last_m128i(x, rk[10]))
        }

        /// Encrypts `N` independent blocks round by round, so their rounds overlap in the CPU.
        #[inline(always)]
        pub fn encrypt_n<const N: usize>(&self, blocks: &mut [Block; N]) {
            let rk = &self.round_keys;
            for b in blocks.iter_mut() {
                b.0 = bitxor_m128i(b.0, rk[0]);
            }
            for k in &rk[1..10] {
                for b in blocks.iter_mut() {
                    b.0 = aes_encrypt_m128i(b.0, *k);
                }
            }
            for b in blocks.iter_mut() {
                b.0 = aes_encrypt_last_m128i(b.0, rk[10]);
            }
        }
    }
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "aes")))]
mod imp {
    use aes::Aes128Enc;
    use aes::cipher::{BlockEncrypt, KeyInit};

    /// One AES block.
    #[derive(Clone, Copy)]
    pub struct Block(u128);

    impl Block {
        pub fn zero() -> Block {
            Block(0)
        }

        #[inline(always)]
        pub fn load(b: &[u8; 16]) -> Block {
            Block(u128::from_le_bytes(*b))
        }

        #[inline(always)]
        pub fn bytes(self) -> [u8; 16] {
            self.0.to_le_bytes()
        }

        #[inline(always)]
        pub fn xor(self, other: Block) -> Block {
            Block(self.0 ^ other.0)
        }
    }

    /// An AES-128 encryption key schedule.
    #[derive(Clone)]
    pub struct Aes128(Aes128Enc);

    impl Aes128 {
        pub fn new(key: &[u8; 16]) -> Aes128 {
            Aes128(Aes128Enc::new(key.into()))
        }

        pub fn encrypt(&self, b: Block) -> Block {
            let mut a = aes::Block::from(b.bytes());
            self.0.encrypt_block(&mut a);
            Block::load(&a.into())
        }

        pub fn encrypt_n<const N: usize>(&self, blocks: &mut [Block; N]) {
            let mut a = blocks.map(|b| aes::Block::from(b.bytes()));
            self.0.encrypt_blocks(&mut a);
            for (b, a) in blocks.iter_mut().zip(a) {
                *b = Block::load(&a.into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aes::cipher::{BlockEncrypt, KeyInit};
    use proptest::prelude::*;

    /// FIPS 197 appendix C.1.
    #[test]
    fn fips197_c1() {
        let key: [u8; 16] = core::array::from_fn(|i| i as u8);
        let plaintext: [u8; 16] = core::array::from_fn(|i| (i as u8) * 0x11);
        let expected = [
            0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30, 0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a,
        ];
        let aes = Aes128::new(&key);
        assert_eq!(aes.encrypt(Block::load(&plaintext)).bytes(), expected);
        let mut blocks = [Block::load(&plaintext), Block::zero(), Block::load(&plaintext)];
        aes.encrypt_n(&mut blocks);
        assert_eq!(blocks[0].bytes(), expected);
        assert_eq!(blocks[2].bytes(), expected);
    }

    proptest! {
        /// Every key's schedule (all ten rounds and their constants) and every block, against
        /// the aes crate.
        #[test]
        fn matches_the_aes_crate(key: [u8; 16], block: [u8; 16], other: [u8; 16]) {
            let theirs = aes::Aes128Enc::new(&key.into());
            let mut expected = aes::Block::from(block);
            theirs.encrypt_block(&mut expected);
            let ours = Aes128::new(&key);
            prop_assert_eq!(ours.encrypt(Block::load(&block)).bytes(), <[u8; 16]>::from(expected));
            let mut expected_other = aes::Block::from(other);
            theirs.encrypt_block(&mut expected_other);
            let mut blocks = [Block::load(&other), Block::load(&block)];
            ours.encrypt_n(&mut blocks);
            prop_assert_eq!(blocks[0].bytes(), <[u8; 16]>::from(expected_other));
            prop_assert_eq!(blocks[1].bytes(), <[u8; 16]>::from(expected));
            prop_assert_eq!(Block::load(&block).xor(Block::load(&other)).bytes(),
                core::array::from_fn::<u8, 16, _>(|i| block[i] ^ other[i]));
        }
    }
}
