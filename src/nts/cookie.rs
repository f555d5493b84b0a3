//! Cookies and the master keys that seal them: a cookie is the key id, the algorithm and a
//! nonce (its associated data, one S2V component), then the AES-SIV tag and the sealed C2S and
//! S2C keys, so any server holding the key set opens it.
//!
//! Fleet servers derive the same key set from one shared secret and the key epoch (HKDF-SHA256),
//! so a cookie from any KE server of the fleet opens on any NTP server of it with no run-time
//! coordination. Key material never appears in `Debug` output.
//!
//! The format is this server's own (RFC 8915 section 6 leaves it to the server) and is chosen
//! for few AES blocks: one associated data of 24 bytes and a plaintext of exactly four blocks.
//! Cookies of an older format do not verify and get an NTS NAK, so clients run NTS-KE again.

use super::siv::{Prefix, Siv, TAG_LEN, tags_equal};
use core::fmt;
use hkdf::Hkdf;
use sha2::Sha256;

/// Key length of AEAD_AES_SIV_CMAC_256 (two AES-128 keys).
pub const KEY_LEN: usize = super::siv::KEY_LEN;
const NONCE_LEN: usize = 16;
/// Key id (4), algorithm (2), reserved (2, zero) and nonce: the associated data.
const AD_LEN: usize = 8 + NONCE_LEN;
/// C2S then S2C.
const PLAINTEXT_LEN: usize = 2 * KEY_LEN;
/// The length of every cookie this server makes.
pub const COOKIE_LEN: usize = AD_LEN + TAG_LEN + PLAINTEXT_LEN;
/// Most master keys held at once (the current one and the old ones still accepted).
pub const MAX_KEYS: usize = 8;
/// Most cookies sealed together: what one KE response or one reply carries.
pub const MAX_NEW_COOKIES: usize = super::ke::COOKIES_PER_KE;
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

/// New cookies for one session, sealed together: their S2Vs go through the cipher in the same
/// steps (see [`CookieJar::s2v`]).
pub struct NewCookies {
    aead: u16,
    ads: [[u8; AD_LEN]; MAX_NEW_COOKIES],
    n: usize,
    plaintext: [u8; PLAINTEXT_LEN],
}

impl NewCookies {
    pub fn new(keys: &SessionKeys) -> NewCookies {
        let mut plaintext = [0u8; PLAINTEXT_LEN];
        plaintext[..KEY_LEN].copy_from_slice(&keys.c2s);
        plaintext[KEY_LEN..].copy_from_slice(&keys.s2c);
        NewCookies {
            aead: keys.aead,
            ads: [[0; AD_LEN]; MAX_NEW_COOKIES],
            n: 0,
            plaintext,
        }
    }

    /// One more cookie under `jar`'s current key, with `nonce` (fresh random bytes per cookie,
    /// or two cookies would be linkable). At most [`MAX_NEW_COOKIES`].
    pub fn push(&mut self, jar: &CookieJar, nonce: &[u8; NONCE_LEN]) {
        let ad = &mut self.ads[self.n];
        ad[..4].copy_from_slice(&jar.ciphers[0].0.to_be_bytes());
        ad[4..6].copy_from_slice(&self.aead.to_be_bytes());
        ad[6..8].fill(0);
        ad[8..].copy_from_slice(nonce);
        self.n += 1;
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// One thread's cipher state for a key set: the AES key schedules are built once per key set,
/// not per cookie.
pub struct CookieJar {
    ciphers: Vec<(u32, Siv)>,
}

impl CookieJar {
    pub fn new(keys: &KeySet) -> CookieJar {
        CookieJar {
            ciphers: keys.keys.iter().map(|(id, key)| (*id, Siv::new(key))).collect(),
        }
    }

    /// Seals `keys` under the current master key with `nonce` (fresh random bytes per cookie,
    /// or two cookies would be linkable).
    pub fn seal(&self, keys: &SessionKeys, nonce: &[u8; NONCE_LEN], out: &mut [u8; COOKIE_LEN]) {
        let mut new = NewCookies::new(keys);
        new.push(self, nonce);
        self.seal_all(&new, core::slice::from_mut(out));
    }

    /// Seals the cookies of `new` into `out` (one each).
    pub fn seal_all(&self, new: &NewCookies, out: &mut [[u8; COOKIE_LEN]]) {
        let siv = &self.ciphers[0].1;
        seal_with(siv, new, &siv.message_prefix(&new.plaintext), out);
    }

    /// Opens a cookie; any failure means the client must run NTS-KE again.
    pub fn open(&self, cookie: &[u8]) -> Result<SessionKeys, CookieError> {
        self.open_and_seal(cookie, &[], &mut [])
    }

    /// Opens a cookie and seals, into `out`, one new cookie for the same keys per nonce of
    /// `nonces` (fresh random bytes each). Under the current master key (the common case) the
    /// cookie and the new ones share key and plaintext, so the plaintext's leading blocks go
    /// through the cipher once for all. `out` is meaningless on error.
    pub fn open_and_seal(
        &self,
        cookie: &[u8],
        nonces: &[[u8; NONCE_LEN]],
        out: &mut [[u8; COOKIE_LEN]],
    ) -> Result<SessionKeys, CookieError> {
        let cookie: &[u8; COOKIE_LEN] = cookie.try_into().map_err(|_| CookieError::BadLength)?;
        let id = u32::from_be_bytes([cookie[0], cookie[1], cookie[2], cookie[3]]);
        let Some(index) = self.ciphers.iter().position(|c| c.0 == id) else {
            return Err(CookieError::UnknownKey);
        };
        let siv = &self.ciphers[index].1;
        let (ad, rest) = cookie.split_at(AD_LEN);
        let tag: &[u8; TAG_LEN] = rest[..TAG_LEN].try_into().expect("tag");
        let mut body = [0u8; PLAINTEXT_LEN];
        body.copy_from_slice(&rest[TAG_LEN..]);
        siv.ctr(tag, &mut body);
        let aead = u16::from_be_bytes([ad[4], ad[5]]);
        let mut keys = SessionKeys {
            aead,
            c2s: [0; KEY_LEN],
            s2c: [0; KEY_LEN],
        };
        keys.c2s.copy_from_slice(&body[..KEY_LEN]);
        keys.s2c.copy_from_slice(&body[KEY_LEN..]);
        let prefix = siv.message_prefix(&body);
        if !tags_equal(&siv.s2v_prefixed(&[ad], &body, &prefix), tag) {
            return Err(CookieError::Forged);
        }
        if aead != super::ke::AEAD_AES_SIV_CMAC_256 {
            return Err(CookieError::BadAlgorithm);
        }
        let mut new = NewCookies::new(&keys);
        for nonce in nonces {
            new.push(self, nonce);
        }
        if index == 0 {
            // The current key and the same plaintext: the opened cookie's prefix serves.
            seal_with(siv, &new, &prefix, out);
        } else if !nonces.is_empty() {
            // Under an older key: the new cookies are sealed under the current one, apart.
            self.seal_all(&new, out);
        }
        Ok(keys)
    }
}

/// Seals the cookies of `new` under `siv` into `out`, given the chain over their common
/// plaintext under that key: its leading blocks go through the cipher once for all.
fn seal_with(siv: &Siv, new: &NewCookies, prefix: &Prefix, out: &mut [[u8; COOKIE_LEN]]) {
    for (ad, out) in new.ads[..new.n].iter().zip(out) {
        let tag = siv.s2v_prefixed(&[&ad[..]], &new.plaintext, prefix);
        write(siv, ad, &tag, &new.plaintext, out);
    }
}

/// A cookie from its associated data, tag and plaintext (encrypted here).
fn write(
    siv: &Siv,
    ad: &[u8; AD_LEN],
    tag: &[u8; TAG_LEN],
    plaintext: &[u8; PLAINTEXT_LEN],
    out: &mut [u8; COOKIE_LEN],
) {
    out[..AD_LEN].copy_from_slice(ad);
    out[AD_LEN..AD_LEN + TAG_LEN].copy_from_slice(tag);
    let body = &mut out[AD_LEN + TAG_LEN..];
    body.copy_from_slice(plaintext);
    siv.ctr(tag, body);
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

    fn cookie(jar: &CookieJar, nonce: u8) -> [u8; COOKIE_LEN] {
        let mut out = [0u8; COOKIE_LEN];
        jar.seal(&session(), &[nonce; NONCE_LEN], &mut out);
        out
    }

    #[test]
    fn round_trip_and_unlinkable() {
        let jar = CookieJar::new(&KeySet::derive(b"secret", 100, 2));
        let a = cookie(&jar, 1);
        let b = cookie(&jar, 2);
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
        let day1 = CookieJar::new(&KeySet::derive(secret, 100, 2));
        let old = cookie(&day1, 3);
        // Another server of the fleet, two rotations later: still opens it.
        let day3 = CookieJar::new(&KeySet::derive(secret, 102, 2));
        assert_eq!(day3.open(&old).unwrap(), session());
        // Three rotations later the key is gone.
        let day4 = CookieJar::new(&KeySet::derive(secret, 103, 2));
        assert_eq!(day4.open(&old), Err(CookieError::UnknownKey));
        // Another secret with the same epoch: the id matches but the seal does not.
        let other = CookieJar::new(&KeySet::derive(b"other fleet", 100, 2));
        assert_eq!(other.open(&old), Err(CookieError::Forged));
    }

    #[test]
    fn forged_and_truncated_cookies() {
        let jar = CookieJar::new(&KeySet::derive(b"secret", 7, 0));
        let good = cookie(&jar, 9);
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

    /// Cookies sealed together open as the ones sealed alone, each nonce giving its own; a
    /// cookie naming another algorithm opens but is refused.
    #[test]
    fn batched_cookies_match_single_ones_and_algorithm_is_checked() {
        let jar = CookieJar::new(&KeySet::derive(b"secret", 3, 1));
        let mut new = NewCookies::new(&session());
        for n in 0..MAX_NEW_COOKIES as u8 {
            new.push(&jar, &[n; NONCE_LEN]);
        }
        let mut batched = [[0u8; COOKIE_LEN]; MAX_NEW_COOKIES];
        jar.seal_all(&new, &mut batched);
        for (n, c) in batched.iter().enumerate() {
            assert_eq!(*c, cookie(&jar, n as u8));
            assert_eq!(jar.open(c).unwrap(), session());
        }
        let other = SessionKeys { aead: 16, ..session() };
        let mut out = [0u8; COOKIE_LEN];
        jar.seal(&other, &[1; NONCE_LEN], &mut out);
        assert_eq!(jar.open(&out), Err(CookieError::BadAlgorithm));
    }

    /// Opening and sealing in one go gives the cookies sealing alone gives, under the current
    /// key also when the cookie opened is under an older one; a cookie that does not open seals
    /// nothing usable.
    #[test]
    fn open_and_seal_matches_open_then_seal() {
        let secret = b"fleet secret";
        let old = cookie(&CookieJar::new(&KeySet::derive(secret, 100, 2)), 4);
        let today = CookieJar::new(&KeySet::derive(secret, 101, 2));
        let current = cookie(&today, 5);
        let nonces: Vec<[u8; NONCE_LEN]> = (0..3).map(|n| [n + 10; NONCE_LEN]).collect();
        for c in [old, current] {
            let mut out = [[0u8; COOKIE_LEN]; 3];
            assert_eq!(today.open_and_seal(&c, &nonces, &mut out).unwrap(), session());
            for (n, o) in out.iter().enumerate() {
                assert_eq!(*o, cookie(&today, n as u8 + 10));
                assert_eq!(o[..4], 101u32.to_be_bytes());
            }
        }
        let mut forged = cookie(&today, 6);
        forged[COOKIE_LEN - 1] ^= 1;
        let mut out = [[0u8; COOKIE_LEN]; 1];
        assert_eq!(
            today.open_and_seal(&forged, &nonces[..1], &mut out),
            Err(CookieError::Forged)
        );
    }

    /// A cookie of the format before this one (key id | nonce | tag | sealed aead, C2S, S2C;
    /// id and nonce as two associated data), sealed under a key of the set, does not open: it
    /// gets an NTS NAK and its client runs NTS-KE again.
    #[test]
    fn cookies_of_the_previous_format_are_refused() {
        use aes_siv::KeyInit;
        let keys = KeySet::derive(b"secret", 9, 1);
        let (id, key) = keys.keys[0];
        let nonce = [7u8; NONCE_LEN];
        let mut body = [0u8; 4 + 2 * KEY_LEN];
        body[..2].copy_from_slice(&15u16.to_be_bytes());
        body[4..4 + KEY_LEN].copy_from_slice(&session().c2s);
        body[4 + KEY_LEN..].copy_from_slice(&session().s2c);
        let tag = aes_siv::siv::Aes128Siv::new((&key).into())
            .encrypt_in_place_detached([&id.to_be_bytes()[..], &nonce[..]], &mut body)
            .unwrap();
        let old: Vec<u8> = [&id.to_be_bytes()[..], &nonce, &tag, &body].concat();
        assert_eq!(old.len(), COOKIE_LEN);
        assert_eq!(CookieJar::new(&keys).open(&old), Err(CookieError::Forged));
    }
}
