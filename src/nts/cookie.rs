//! Cookies and the master keys that seal them: a cookie is the key id, a nonce and the
//! AES-SIV sealed (algorithm, C2S key, S2C key), so any server holding the key set opens it.
//!
//! Fleet servers derive the same key set from one shared secret and the key epoch (HKDF-SHA256),
//! so a cookie from any KE server of the fleet opens on any NTP server of it with no run-time
//! coordination. Key material never appears in `Debug` output.

use aes_siv::KeyInit;
use aes_siv::siv::Aes128Siv;
use core::fmt;
use hkdf::Hkdf;
use sha2::Sha256;

/// Key length of AEAD_AES_SIV_CMAC_256 (two AES-128 keys).
pub const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// aead id (2) + reserved (2, keeps the cookie a multiple of 4) + C2S + S2C.
const PLAINTEXT_LEN: usize = 4 + 2 * KEY_LEN;
/// The length of every cookie this server makes.
pub const COOKIE_LEN: usize = 4 + NONCE_LEN + TAG_LEN + PLAINTEXT_LEN;
/// Most master keys held at once (the current one and the old ones still accepted).
pub const MAX_KEYS: usize = 8;
const HKDF_SALT: &[u8] = b"gnomon NTS cookie master key";

/// What NTS-KE established for one client.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    pub aead: u16,
    pub c2s: [u8; KEY_LEN],
    pub s2c: [u8; KEY_LEN],
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionKeys {{ aead: {}, .. }}", self.aead)
    }
}

/// Why a cookie does not open. Every one of them is an NTS NAK on the NTP side.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum CookieError {
    /// Not [`COOKIE_LEN`] bytes.
    BadLength,
    /// A key id not in the set: too old, from another fleet, or made up.
    UnknownKey,
    /// The seal does not verify: forged or corrupted.
    Forged,
    /// Opens, but names an algorithm this server does not serve.
    BadAlgorithm,
}

/// The master keys in force, newest first. Shared read-only by the KE threads and the workers.
#[derive(Clone)]
pub struct KeySet {
    keys: Vec<(u32, [u8; KEY_LEN])>,
}

impl fmt::Debug for KeySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ids: Vec<u32> = self.keys.iter().map(|k| k.0).collect();
        write!(f, "KeySet {{ ids: {ids:?} }}")
    }
}

/// The key epoch at `unix_seconds` for keys that rotate every `period_seconds`.
pub fn epoch_at(unix_seconds: u64, period_seconds: u64) -> u64 {
    unix_seconds / period_seconds.max(1)
}

impl KeySet {
    /// Keys from explicit (id, key) pairs, newest first; for tests and the derivation below.
    pub fn from_keys(keys: Vec<(u32, [u8; KEY_LEN])>) -> KeySet {
        assert!(!keys.is_empty() && keys.len() <= MAX_KEYS, "1..={MAX_KEYS} master keys");
        KeySet { keys }
    }

    /// The key set of `epoch`: its own key and the `keep_old` before it, each
    /// HKDF-SHA256(secret, info = epoch) with the low 32 bits of its epoch as id.
    pub fn derive(secret: &[u8], epoch: u64, keep_old: usize) -> KeySet {
        let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), secret);
        let keys = (0..=keep_old.min(MAX_KEYS - 1) as u64)
            .filter_map(|back| epoch.checked_sub(back))
            .map(|e| {
                let mut key = [0u8; KEY_LEN];
                hk.expand(&e.to_be_bytes(), &mut key)
                    .expect("32 bytes is a valid HKDF-SHA256 length");
                (e as u32, key)
            })
            .collect();
        KeySet { keys }
    }

    pub fn current_id(&self) -> u32 {
        self.keys[0].0
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.iter().map(|k| k.0)
    }
}

/// One thread's cipher state for a key set: the AES key schedules are built once per key set,
/// not per cookie.
pub struct CookieJar {
    ciphers: Vec<(u32, Aes128Siv)>,
}

impl CookieJar {
    pub fn new(keys: &KeySet) -> CookieJar {
        CookieJar {
            ciphers: keys
                .keys
                .iter()
                .map(|(id, key)| (*id, Aes128Siv::new(key.into())))
                .collect(),
        }
    }

    /// Seals `keys` under the current master key with `nonce` (fresh random bytes per cookie,
    /// or two cookies would be linkable).
    pub fn seal(&mut self, keys: &SessionKeys, nonce: &[u8; NONCE_LEN], out: &mut [u8; COOKIE_LEN]) {
        let (id, cipher) = &mut self.ciphers[0];
        out[..4].copy_from_slice(&id.to_be_bytes());
        out[4..4 + NONCE_LEN].copy_from_slice(nonce);
        let (head, body) = out.split_at_mut(4 + NONCE_LEN + TAG_LEN);
        body[..2].copy_from_slice(&keys.aead.to_be_bytes());
        body[2..4].fill(0);
        body[4..4 + KEY_LEN].copy_from_slice(&keys.c2s);
        body[4 + KEY_LEN..].copy_from_slice(&keys.s2c);
        let tag = cipher
            .encrypt_in_place_detached([&head[..4], &head[4..4 + NONCE_LEN]], body)
            .expect("a 68-byte plaintext is within AES-SIV limits");
        head[4 + NONCE_LEN..].copy_from_slice(&tag);
    }

    /// Opens a cookie; any failure means the client must run NTS-KE again.
    pub fn open(&mut self, cookie: &[u8]) -> Result<SessionKeys, CookieError> {
        let cookie: &[u8; COOKIE_LEN] = cookie.try_into().map_err(|_| CookieError::BadLength)?;
        let id = u32::from_be_bytes([cookie[0], cookie[1], cookie[2], cookie[3]]);
        let cipher = match self.ciphers.iter_mut().find(|c| c.0 == id) {
            Some((_, c)) => c,
            None => return Err(CookieError::UnknownKey),
        };
        let mut body = [0u8; PLAINTEXT_LEN];
        body.copy_from_slice(&cookie[4 + NONCE_LEN + TAG_LEN..]);
        let tag = aes_siv::Tag::from_slice(&cookie[4 + NONCE_LEN..4 + NONCE_LEN + TAG_LEN]);
        cipher
            .decrypt_in_place_detached([&cookie[..4], &cookie[4..4 + NONCE_LEN]], &mut body, tag)
            .map_err(|_| CookieError::Forged)?;
        let aead = u16::from_be_bytes([body[0], body[1]]);
        if aead != super::ke::AEAD_AES_SIV_CMAC_256 {
            return Err(CookieError::BadAlgorithm);
        }
        let mut keys = SessionKeys {
            aead,
            c2s: [0; KEY_LEN],
            s2c: [0; KEY_LEN],
        };
        keys.c2s.copy_from_slice(&body[4..4 + KEY_LEN]);
        keys.s2c.copy_from_slice(&body[4 + KEY_LEN..]);
        Ok(keys)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SessionKeys {
        SessionKeys {
            aead: 15,
            c2s: [1; KEY_LEN],
            s2c: [2; KEY_LEN],
        }
    }

    fn cookie(jar: &mut CookieJar, nonce: u8) -> [u8; COOKIE_LEN] {
        let mut out = [0u8; COOKIE_LEN];
        jar.seal(&session(), &[nonce; NONCE_LEN], &mut out);
        out
    }

    #[test]
    fn round_trip_and_unlinkable() {
        let mut jar = CookieJar::new(&KeySet::derive(b"secret", 100, 2));
        let a = cookie(&mut jar, 1);
        let b = cookie(&mut jar, 2);
        assert_eq!(COOKIE_LEN % 4, 0);
        assert_eq!(jar.open(&a).unwrap(), session());
        assert_eq!(jar.open(&b).unwrap(), session());
        // The same keys under two nonces share nothing past the key id.
        assert_ne!(a[4..], b[4..]);
        assert!(!a.windows(KEY_LEN).any(|w| w == [1; KEY_LEN] || w == [2; KEY_LEN]));
    }

    #[test]
    fn rotation_keeps_old_keys_for_the_window() {
        let secret = b"fleet secret";
        let mut day1 = CookieJar::new(&KeySet::derive(secret, 100, 2));
        let old = cookie(&mut day1, 3);
        // Another server of the fleet, two rotations later: still opens it.
        let mut day3 = CookieJar::new(&KeySet::derive(secret, 102, 2));
        assert_eq!(day3.open(&old).unwrap(), session());
        // Three rotations later the key is gone.
        let mut day4 = CookieJar::new(&KeySet::derive(secret, 103, 2));
        assert_eq!(day4.open(&old), Err(CookieError::UnknownKey));
        // Another secret with the same epoch: the id matches but the seal does not.
        let mut other = CookieJar::new(&KeySet::derive(b"other fleet", 100, 2));
        assert_eq!(other.open(&old), Err(CookieError::Forged));
    }

    #[test]
    fn forged_and_truncated_cookies() {
        let mut jar = CookieJar::new(&KeySet::derive(b"secret", 7, 0));
        let good = cookie(&mut jar, 9);
        assert_eq!(jar.open(&good[..COOKIE_LEN - 1]), Err(CookieError::BadLength));
        assert_eq!(jar.open(&[]), Err(CookieError::BadLength));
        for i in 4..COOKIE_LEN {
            let mut bad = good;
            bad[i] ^= 0x40;
            assert_eq!(jar.open(&bad), Err(CookieError::Forged), "bit flip at {i}");
        }
        let mut unknown = good;
        unknown[0] ^= 1;
        assert_eq!(jar.open(&unknown), Err(CookieError::UnknownKey));
    }

    #[test]
    fn derivation_is_deterministic_and_debug_hides_keys() {
        let a = KeySet::derive(b"s", 5, 3);
        let b = KeySet::derive(b"s", 5, 3);
        assert_eq!(a.keys, b.keys);
        assert_eq!(a.ids().collect::<Vec<_>>(), vec![5, 4, 3, 2]);
        assert_ne!(a.keys[0].1, a.keys[1].1);
        assert_eq!(format!("{a:?}"), "KeySet { ids: [5, 4, 3, 2] }");
        assert_eq!(KeySet::derive(b"s", 1, 3).ids().count(), 2);
        assert_eq!(epoch_at(86_400 * 3 + 5, 86_400), 3);
    }

    /// AES-SIV known answer, RFC 5297 appendix A.1, through the same crate API the cookies use.
    #[test]
    fn aes_siv_known_answer() {
        let key: [u8; 32] = hex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff");
        let ad = hex::<24>("101112131415161718191a1b1c1d1e1f2021222324252627");
        let mut pt = hex::<14>("112233445566778899aabbccddee");
        let mut siv = Aes128Siv::new((&key).into());
        let tag = siv.encrypt_in_place_detached([&ad[..]], &mut pt).unwrap();
        assert_eq!(tag.as_slice(), hex::<16>("85632d07c6e8f37f950acd320a2ecc93"));
        assert_eq!(pt, hex::<14>("40c02b9690c4dc04daef7f6afe5c"));
    }

    fn hex<const N: usize>(s: &str) -> [u8; N] {
        let mut out = [0u8; N];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
}
