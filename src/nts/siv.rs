//! AES-SIV (RFC 5297) as AEAD_AES_SIV_CMAC_256, the NTS algorithm, built for the hot path:
//! encrypt-only key schedules, the CMAC subkeys and S2V's first value computed once per key, and
//! S2V's component CMACs advanced in lock-step so their AES blocks go through the cipher together.
//!
//! S2V's components (each associated data, then the message) are independent CMAC chains under
//! one key until the message's last 16 bytes, which take the combined value. A serial
//! implementation waits for one AES per block; here one step encrypts the next block of every
//! chain in one call, so the chains cost the longest of them, not their sum. Several S2Vs under
//! one key (the cookies of a reply) share the steps too, and [`S2v::step`] lets a caller
//! interleave S2Vs under different keys. Cross-checked against the `aes-siv` crate and RFC 5297
//! appendix A in the tests.

use aes::Aes128Enc;
use aes::cipher::consts::U16;
use aes::cipher::{BlockBackend, BlockClosure, BlockEncrypt, BlockSizeUser, KeyInit};

/// Key length of AEAD_AES_SIV_CMAC_256: the S2V (CMAC) key, then the CTR key.
pub const KEY_LEN: usize = 32;
/// The synthetic IV, which is also the tag.
pub const TAG_LEN: usize = 16;
const BLOCK: usize = 16;

type Block = aes::Block;

/// Doubling in GF(2^128) (RFC 5297 section 2.3), constant time.
fn dbl(x: u128) -> u128 {
    (x << 1) ^ ((x >> 127) * 0x87)
}

fn be(b: &[u8]) -> u128 {
    let mut a = [0u8; BLOCK];
    a.copy_from_slice(&b[..BLOCK]);
    u128::from_be_bytes(a)
}

/// `b` (shorter than a block) followed by 0x80 and zeros (RFC 4493's padding).
fn pad(b: &[u8]) -> u128 {
    let mut a = [0u8; BLOCK];
    a[..b.len()].copy_from_slice(b);
    a[b.len()] = 0x80;
    u128::from_be_bytes(a)
}

/// The S2V half of a key: its AES schedule, the CMAC subkeys K1 and K2 (RFC 4493) and
/// D0 = CMAC(K, 0^128), the first value of every S2V.
struct Cmac {
    cipher: Aes128Enc,
    k1: u128,
    k2: u128,
    d0: u128,
}

impl Cmac {
    fn new(key: &[u8; 16]) -> Cmac {
        let mut c = Cmac {
            cipher: Aes128Enc::new(key.into()),
            k1: 0,
            k2: 0,
            d0: 0,
        };
        c.derive();
        c
    }

    fn derive(&mut self) {
        self.k1 = dbl(self.encrypt(0));
        self.k2 = dbl(self.k1);
        // CMAC of one full block: AES(0 ^ K1).
        self.d0 = self.encrypt(self.k1);
    }

    fn encrypt(&self, x: u128) -> u128 {
        let mut b = Block::from(x.to_be_bytes());
        self.cipher.encrypt_block(&mut b);
        u128::from_be_bytes(b.into())
    }
}

/// One AEAD_AES_SIV_CMAC_256 key, ready to use. Per-client keys are built per request as
/// locals, where they are constructed in place (a reused slot costs a copy of the schedule).
pub struct Siv {
    mac: Cmac,
    /// `None` for a key made to check tags over empty messages only.
    ctr: Option<Aes128Enc>,
}

/// The tag does not verify: forged, corrupted, or the wrong key.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Unauthentic;

impl Siv {
    pub fn new(key: &[u8; KEY_LEN]) -> Siv {
        let (mac, ctr) = halves(key);
        Siv {
            mac: Cmac::new(mac),
            ctr: Some(Aes128Enc::new(ctr.into())),
        }
    }

    /// The S2V half only, enough to check a tag over an empty message (what an NTS client's
    /// authenticator carries): one key expansion fewer. [`Siv::ctr`] on it takes empty data only.
    pub fn new_s2v_only(key: &[u8; KEY_LEN]) -> Siv {
        Siv {
            mac: Cmac::new(halves(key).0),
            ctr: None,
        }
    }

    /// Encrypts `data` in place; returns the tag (the synthetic IV).
    pub fn encrypt_in_place(&self, ads: &[&[u8]], data: &mut [u8]) -> [u8; TAG_LEN] {
        let mut s2v = S2v::<4, 1>::new(self);
        s2v.push(ads, data);
        s2v.run();
        let tag = s2v.tag(0);
        self.ctr(&tag, data);
        tag
    }

    /// Decrypts `data` in place if `tag` verifies; otherwise `data` is left as it was.
    pub fn decrypt_in_place(&self, ads: &[&[u8]], data: &mut [u8], tag: &[u8; TAG_LEN]) -> Result<(), Unauthentic> {
        self.ctr(tag, data);
        let mut s2v = S2v::<4, 1>::new(self);
        s2v.push(ads, data);
        s2v.run();
        if tags_equal(&s2v.tag(0), tag) {
            Ok(())
        } else {
            // Unauthenticated plaintext is never handed out.
            self.ctr(tag, data);
            Err(Unauthentic)
        }
    }

    /// The CTR half (RFC 5297 section 2.5): XORs `data` with the key stream of `iv`, the
    /// counter being the IV with bits 63 and 31 cleared. Encrypts and decrypts.
    pub fn ctr(&self, iv: &[u8; TAG_LEN], data: &mut [u8]) {
        if data.is_empty() {
            return;
        }
        let cipher = self.ctr.as_ref().expect("a key for S2V only was given data to encrypt");
        let q = u128::from_be_bytes(*iv) & !((1 << 63) | (1 << 31));
        let mut counter = q;
        // Always eight blocks per call, the unused ones too: the AES-NI backend pipelines
        // eight at once, and fewer go one by one at a higher cost than the spare ones.
        for chunk in data.chunks_mut(8 * BLOCK) {
            let mut ks = [Block::default(); 8];
            for k in &mut ks {
                *k = Block::from(counter.to_be_bytes());
                counter = counter.wrapping_add(1);
            }
            cipher.encrypt_blocks(&mut ks);
            for (d, k) in chunk.chunks_mut(BLOCK).zip(&ks) {
                if let Ok(d) = <&mut [u8; BLOCK]>::try_from(&mut *d) {
                    *d = xor(d, &(*k).into()).into();
                } else {
                    d.iter_mut().zip(k).for_each(|(d, k)| *d ^= k);
                }
            }
        }
    }
}

fn halves(key: &[u8; KEY_LEN]) -> (&[u8; 16], &[u8; 16]) {
    let (mac, ctr) = key.split_at(16);
    (mac.try_into().expect("16"), ctr.try_into().expect("16"))
}

/// Compares two tags in time independent of where they differ.
pub fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    (u128::from_be_bytes(*a) ^ u128::from_be_bytes(*b)) == 0
}

/// One component CMAC chain of an S2V in progress: the whole blocks still to go (`head` first,
/// then `body`), then CMAC's last block if the chain ends with one.
#[derive(Clone, Copy)]
struct Lane<'a> {
    head: &'a [u8],
    body: &'a [u8],
    /// Full and XORed with K1, or padded and XORed with K2; `None` for the leading blocks of a
    /// message, whose chain the S2V's end continues.
    last: Option<[u8; BLOCK]>,
}

impl<'a> Lane<'a> {
    const EMPTY: Lane<'static> = Lane {
        head: &[],
        body: &[],
        last: None,
    };

    fn next_input(&mut self) -> Option<[u8; BLOCK]> {
        if let Some((b, rest)) = self.head.split_first_chunk::<BLOCK>() {
            self.head = rest;
            return Some(*b);
        }
        if let Some((b, rest)) = self.body.split_first_chunk::<BLOCK>() {
            self.body = rest;
            return Some(*b);
        }
        self.last.take()
    }
}

/// `a ^ b`, ready for the cipher (byte order does not matter to XOR).
fn xor(a: &[u8; BLOCK], b: &[u8; BLOCK]) -> Block {
    Block::from((u128::from_ne_bytes(*a) ^ u128::from_ne_bytes(*b)).to_ne_bytes())
}

/// One S2V in an [`S2v`] batch.
#[derive(Clone, Copy)]
struct Job<'a> {
    first_lane: usize,
    ads: usize,
    /// `None` until [`S2v::message`] gives it.
    msg: Option<&'a [u8]>,
    /// The lane of the message's blocks before its last 16 bytes, if it has any (S2Vs of one
    /// message share it).
    prefix: Option<usize>,
    /// The final CMAC blocks, which depend on every other chain: inputs and count.
    tail: [[u8; BLOCK]; 2],
    tail_blocks: usize,
    acc: [u8; BLOCK],
}

impl Job<'_> {
    const EMPTY: Job<'static> = Job {
        first_lane: 0,
        ads: 0,
        msg: None,
        prefix: None,
        tail: [[0; BLOCK]; 2],
        tail_blocks: 0,
        acc: [0; BLOCK],
    };
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Chains,
    Tails(usize),
    Done,
}

/// Up to `JOBS` S2Vs under one key with up to `LANES` component chains in all, computed together:
/// each [`S2v::step`] encrypts the next block of every unfinished chain in one call.
pub struct S2v<'a, const LANES: usize, const JOBS: usize> {
    key: &'a Cmac,
    lanes: [Lane<'a>; LANES],
    acc: [[u8; BLOCK]; LANES],
    n_lanes: usize,
    jobs: [Job<'a>; JOBS],
    n_jobs: usize,
    phase: Phase,
}

impl<'a, const LANES: usize, const JOBS: usize> S2v<'a, LANES, JOBS> {
    pub fn new(key: &'a Siv) -> Self {
        S2v {
            key: &key.mac,
            lanes: [Lane::EMPTY; LANES],
            acc: [[0; BLOCK]; LANES],
            n_lanes: 0,
            jobs: [Job::EMPTY; JOBS],
            n_jobs: 0,
            phase: Phase::Chains,
        }
    }

    /// Adds S2V(`ads`..., `msg`) (RFC 5297 section 2.4, the message last); returns its index for
    /// [`S2v::tag`]. Panics past the capacity, which the caller's types fix.
    pub fn push(&mut self, ads: &[&'a [u8]], msg: &'a [u8]) -> usize {
        let job = self.start_job();
        for ad in ads {
            self.add_ad(&[], ad);
        }
        self.jobs[job].ads = ads.len();
        self.message(job, msg);
        job
    }

    /// Adds S2V(`ads`..., the message of S2V `like`): the message's leading blocks, the same
    /// under the same key, go through the cipher once for both.
    pub fn push_same_message(&mut self, ads: &[&'a [u8]], like: usize) -> usize {
        let (msg, prefix) = (self.jobs[like].msg, self.jobs[like].prefix);
        assert!(msg.is_some(), "S2V {like} has no message yet");
        let job = self.start_job();
        for ad in ads {
            self.add_ad(&[], ad);
        }
        let j = &mut self.jobs[job];
        (j.ads, j.msg, j.prefix) = (ads.len(), msg, prefix);
        job
    }

    /// Adds an S2V whose associated data are each the concatenation of two slices (the first a
    /// whole number of blocks) and whose message comes later, by [`S2v::message`]: its chains
    /// start while the message is still being made.
    pub fn push_ads(&mut self, ads: &[[&'a [u8]; 2]]) -> usize {
        let job = self.start_job();
        for [head, data] in ads {
            self.add_ad(head, data);
        }
        self.jobs[job].ads = ads.len();
        job
    }

    /// The message of S2V `job`, once per job (before its last step, or it never ends).
    pub fn message(&mut self, job: usize, msg: &'a [u8]) {
        assert!(
            self.phase == Phase::Chains && self.jobs[job].msg.is_none(),
            "message given twice"
        );
        // The blocks that end before the message's last 16 bytes do not depend on the others.
        let free = (msg.len() / BLOCK).saturating_sub(1);
        if free > 0 {
            let lane = self.add_lane(Lane {
                body: &msg[..free * BLOCK],
                ..Lane::EMPTY
            });
            self.jobs[job].prefix = Some(lane);
        }
        self.jobs[job].msg = Some(msg);
    }

    fn start_job(&mut self) -> usize {
        assert!(
            self.phase == Phase::Chains && self.n_jobs < JOBS,
            "S2v batch is full or running"
        );
        self.jobs[self.n_jobs] = Job {
            first_lane: self.n_lanes,
            ..Job::EMPTY
        };
        self.n_jobs += 1;
        self.n_jobs - 1
    }

    /// A chain over `head` (whole blocks) then `data`, ending with CMAC's last block.
    fn add_ad(&mut self, mut head: &'a [u8], data: &'a [u8]) {
        debug_assert!(head.len().is_multiple_of(BLOCK));
        let (body, rest) = if data.is_empty() && !head.is_empty() {
            let (h, last) = head.split_at(head.len() - BLOCK);
            head = h;
            (data, last)
        } else {
            // The last block is the last 1..=16 bytes of `data` (or none at all).
            data.split_at(data.len().saturating_sub(1) / BLOCK * BLOCK)
        };
        let last = if rest.len() == BLOCK {
            be(rest) ^ self.key.k1
        } else {
            pad(rest) ^ self.key.k2
        };
        self.add_lane(Lane {
            head,
            body,
            last: Some(last.to_be_bytes()),
        });
    }

    fn add_lane(&mut self, lane: Lane<'a>) -> usize {
        assert!(self.n_lanes < LANES, "S2v batch has too many components");
        self.lanes[self.n_lanes] = lane;
        self.acc[self.n_lanes] = [0; BLOCK];
        self.n_lanes += 1;
        self.n_lanes - 1
    }

    /// Advances every unfinished chain by one block; false once all tags are ready. True
    /// without work while a message is awaited.
    pub fn step(&mut self) -> bool {
        let mut more = false;
        let key = self.key;
        key.cipher.encrypt_with_backend(Steps {
            s2v: self,
            more: &mut more,
            all: false,
        });
        more
    }

    /// Steps until every tag is ready.
    pub fn run(&mut self) {
        let key = self.key;
        key.cipher.encrypt_with_backend(Steps {
            s2v: self,
            more: &mut false,
            all: true,
        });
    }

    /// One step with the key's AES backend in hand (inside one dispatch of the aes crate, so
    /// the blocks cost the AES instructions and not a call each).
    // Inlined into the dispatch, where the AES rounds are inlined too: no call per block.
    #[inline(always)]
    fn step_with(&mut self, aes: &mut impl BlockBackend<BlockSize = U16>) -> bool {
        // Each chain's block goes to the cipher as soon as it is ready: the chains are
        // independent, so the CPU runs their AES rounds side by side.
        let mut any = false;
        if self.phase == Phase::Chains {
            for (lane, acc) in self.lanes[..self.n_lanes].iter_mut().zip(&mut self.acc) {
                if let Some(input) = lane.next_input() {
                    let mut b = xor(acc, &input);
                    aes.proc_block_inplace(&mut b);
                    *acc = b.into();
                    any = true;
                }
            }
            if any || self.jobs[..self.n_jobs].iter().any(|j| j.msg.is_none()) {
                return true;
            }
            self.start_tails();
            self.phase = Phase::Tails(0);
        }
        let Phase::Tails(t) = self.phase else {
            return false;
        };
        for job in &mut self.jobs[..self.n_jobs] {
            if t < job.tail_blocks {
                let mut b = xor(&job.acc, &job.tail[t]);
                aes.proc_block_inplace(&mut b);
                job.acc = b.into();
                any = true;
            }
        }
        self.phase = if any { Phase::Tails(t + 1) } else { Phase::Done };
        any
    }

    /// The chains are done: combine each S2V's components into D and set up the message's last
    /// blocks (RFC 5297 section 2.4: xorend for a message of 16 bytes or more, else dbl and pad).
    fn start_tails(&mut self) {
        let key = self.key;
        for job in &mut self.jobs[..self.n_jobs] {
            let mut d = key.d0;
            for acc in &self.acc[job.first_lane..job.first_lane + job.ads] {
                d = dbl(d) ^ u128::from_be_bytes(*acc);
            }
            let msg = job.msg.expect("checked by step");
            if msg.len() >= BLOCK {
                let start = (msg.len() / BLOCK - 1) * BLOCK;
                let mut t = [0u8; 2 * BLOCK];
                let t_len = msg.len() - start;
                t[..t_len].copy_from_slice(&msg[start..]);
                let end = be(&t[t_len - BLOCK..t_len]) ^ d;
                t[t_len - BLOCK..t_len].copy_from_slice(&end.to_be_bytes());
                job.acc = job.prefix.map_or([0; BLOCK], |p| self.acc[p]);
                if t_len == BLOCK {
                    job.tail[0] = (be(&t) ^ key.k1).to_be_bytes();
                    job.tail_blocks = 1;
                } else {
                    job.tail[0] = be(&t).to_be_bytes();
                    job.tail[1] = (pad(&t[BLOCK..t_len]) ^ key.k2).to_be_bytes();
                    job.tail_blocks = 2;
                }
            } else {
                // T = dbl(D) ^ pad(msg) is one full block: CMAC's K1 case.
                job.tail[0] = (dbl(d) ^ pad(msg) ^ key.k1).to_be_bytes();
                job.tail_blocks = 1;
                job.acc = [0; BLOCK];
            }
        }
    }

    /// The tag of S2V number `job`, once [`S2v::step`] returned false.
    pub fn tag(&self, job: usize) -> [u8; TAG_LEN] {
        assert!(self.phase == Phase::Done && job < self.n_jobs, "S2v not finished");
        self.jobs[job].acc
    }
}

/// [`S2v::step`] or [`S2v::run`] as a closure over the key's AES backend.
struct Steps<'s, 'a, const LANES: usize, const JOBS: usize> {
    s2v: &'s mut S2v<'a, LANES, JOBS>,
    more: &'s mut bool,
    all: bool,
}

impl<const LANES: usize, const JOBS: usize> BlockSizeUser for Steps<'_, '_, LANES, JOBS> {
    type BlockSize = U16;
}

impl<const LANES: usize, const JOBS: usize> BlockClosure for Steps<'_, '_, LANES, JOBS> {
    fn call<B: BlockBackend<BlockSize = U16>>(self, aes: &mut B) {
        *self.more = self.s2v.step_with(aes);
        while self.all && self.s2v.step_with(aes) {}
    }
}

/// Runs two batches under different keys to the end, a step of each in turn, with both keys'
/// backends in hand: the chains of one overlap the other's in the CPU, and no step pays a call.
pub fn run_together<const L1: usize, const J1: usize, const L2: usize, const J2: usize>(
    a: &mut S2v<'_, L1, J1>,
    b: &mut S2v<'_, L2, J2>,
) {
    let key = a.key;
    key.cipher.encrypt_with_backend(Outer { a, b });
}

struct Outer<'s, 'a, 'b, const L1: usize, const J1: usize, const L2: usize, const J2: usize> {
    a: &'s mut S2v<'a, L1, J1>,
    b: &'s mut S2v<'b, L2, J2>,
}

impl<const L1: usize, const J1: usize, const L2: usize, const J2: usize> BlockSizeUser
    for Outer<'_, '_, '_, L1, J1, L2, J2>
{
    type BlockSize = U16;
}

impl<const L1: usize, const J1: usize, const L2: usize, const J2: usize> BlockClosure
    for Outer<'_, '_, '_, L1, J1, L2, J2>
{
    fn call<B: BlockBackend<BlockSize = U16>>(self, aes_a: &mut B) {
        let key = self.b.key;
        key.cipher.encrypt_with_backend(Inner {
            a: self.a,
            b: self.b,
            aes_a,
        });
    }
}

struct Inner<'s, 'a, 'b, 'x, B, const L1: usize, const J1: usize, const L2: usize, const J2: usize> {
    a: &'s mut S2v<'a, L1, J1>,
    b: &'s mut S2v<'b, L2, J2>,
    aes_a: &'x mut B,
}

impl<B, const L1: usize, const J1: usize, const L2: usize, const J2: usize> BlockSizeUser
    for Inner<'_, '_, '_, '_, B, L1, J1, L2, J2>
{
    type BlockSize = U16;
}

impl<B: BlockBackend<BlockSize = U16>, const L1: usize, const J1: usize, const L2: usize, const J2: usize> BlockClosure
    for Inner<'_, '_, '_, '_, B, L1, J1, L2, J2>
{
    fn call<B2: BlockBackend<BlockSize = U16>>(self, aes_b: &mut B2) {
        while self.a.step_with(self.aes_a) | self.b.step_with(aes_b) {}
    }
}

#[cfg(test)]
mod tests;
