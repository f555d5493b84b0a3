//! AES-SIV against RFC 5297's known answers and against the `aes-siv` crate on random inputs, and
//! the batched S2V against the same S2Vs computed one by one.

use super::*;
use aes_siv::KeyInit;
use aes_siv::siv::Aes128Siv;
use proptest::prelude::*;

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn key(s: &str) -> [u8; KEY_LEN] {
    hex(s).try_into().unwrap()
}

/// Encrypts with ours and checks the tag and ciphertext, then decrypts.
fn known_answer(key: [u8; KEY_LEN], ads: &[Vec<u8>], plaintext: &[u8], tag: &str, ciphertext: &str) {
    let siv = Siv::new(&key);
    let ads: Vec<&[u8]> = ads.iter().map(|a| &a[..]).collect();
    let mut data = plaintext.to_vec();
    let t = siv.encrypt_in_place(&ads, &mut data);
    assert_eq!(t.to_vec(), hex(tag));
    assert_eq!(data, hex(ciphertext));
    siv.decrypt_in_place(&ads, &mut data, &t).unwrap();
    assert_eq!(data, plaintext);
}

/// RFC 5297 appendix A.1: deterministic authenticated encryption.
#[test]
fn rfc5297_a1() {
    known_answer(
        key("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff"),
        &[hex("101112131415161718191a1b1c1d1e1f2021222324252627")],
        &hex("112233445566778899aabbccddee"),
        "85632d07c6e8f37f950acd320a2ecc93",
        "40c02b9690c4dc04daef7f6afe5c",
    );
}

/// RFC 5297 appendix A.2: nonce-based, two associated data and a nonce.
#[test]
fn rfc5297_a2() {
    known_answer(
        key("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f"),
        &[
            hex("00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100"),
            hex("102030405060708090a0"),
            hex("09f911029d74e35bd84156c5635688c0"),
        ],
        &hex("7468697320697320736f6d6520706c61696e7465787420746f20656e6372797074207573696e67205349562d414553"),
        "7bdb6e3b432667eb06f4d14bff2fbd0f",
        "cb900f2fddbe404326601965c889bf17dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d",
    );
}

fn inputs() -> impl Strategy<Value = ([u8; KEY_LEN], Vec<Vec<u8>>, Vec<u8>)> {
    (
        any::<[u8; KEY_LEN]>(),
        proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..80), 0..=3),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Same tag and ciphertext as `aes-siv`; our decryption opens it; any flipped bit of the tag,
    /// the ciphertext or an associated data makes it fail and leaves the data as it was.
    #[test]
    fn same_as_aes_siv_and_flips_fail((k, ads, pt) in inputs(), flip in any::<prop::sample::Index>()) {
        let mut theirs = pt.clone();
        let their_tag = Aes128Siv::new((&k).into()).encrypt_in_place_detached(&ads, &mut theirs).unwrap();
        let siv = Siv::new(&k);
        let refs: Vec<&[u8]> = ads.iter().map(|a| &a[..]).collect();
        let mut ours = pt.clone();
        let tag = siv.encrypt_in_place(&refs, &mut ours);
        prop_assert_eq!(&tag[..], their_tag.as_slice());
        prop_assert_eq!(&ours, &theirs);
        let mut opened = ours.clone();
        siv.decrypt_in_place(&refs, &mut opened, &tag).unwrap();
        prop_assert_eq!(&opened, &pt);

        let ad_bits: usize = ads.iter().map(|a| a.len() * 8).sum();
        let bit = flip.index(TAG_LEN * 8 + ours.len() * 8 + ad_bits);
        let (mut tag2, mut ct2, mut ads2) = (tag, ours.clone(), ads.clone());
        if bit < TAG_LEN * 8 {
            tag2[bit / 8] ^= 1 << (bit % 8);
        } else if bit < (TAG_LEN + ct2.len()) * 8 {
            let b = bit - TAG_LEN * 8;
            ct2[b / 8] ^= 1 << (b % 8);
        } else {
            let mut b = bit - (TAG_LEN + ct2.len()) * 8;
            for ad in &mut ads2 {
                if b < ad.len() * 8 {
                    ad[b / 8] ^= 1 << (b % 8);
                    break;
                }
                b -= ad.len() * 8;
            }
        }
        let refs2: Vec<&[u8]> = ads2.iter().map(|a| &a[..]).collect();
        let before = ct2.clone();
        prop_assert_eq!(siv.decrypt_in_place(&refs2, &mut ct2, &tag2), Err(Unauthentic));
        prop_assert_eq!(ct2, before);
    }

    /// S2V with a message prefix shared across associated data, and S2V with associated data in
    /// two pieces, give the tags of the plain S2V, which the tests above check against the
    /// `aes-siv` crate.
    #[test]
    fn prefixed_and_split_s2v_match_plain(
        (k, ads, pt) in inputs(),
        others in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..60), 1..=4),
    ) {
        let siv = Siv::new(&k);
        let prefix = siv.message_prefix(&pt);
        for ad in &others {
            prop_assert_eq!(siv.s2v_prefixed(&[&ad[..]], &pt, &prefix), siv.s2v(&[&ad[..]], &pt));
        }
        let joined = ads.concat();
        let cut = (joined.len() / 16) * 16;
        let split = siv.s2v_split(&[[&joined[..cut], &joined[cut..]], [&[][..], &pt[..]]], &others[0]);
        prop_assert_eq!(split, siv.s2v(&[&joined[..], &pt[..]], &others[0]));
        // A head only, ending on a whole block.
        let split = siv.s2v_split(&[[&joined[..cut], &[][..]]], &pt);
        prop_assert_eq!(split, siv.s2v(&[&joined[..cut]], &pt));
    }
}
