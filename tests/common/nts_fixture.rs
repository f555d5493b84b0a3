//! One authenticated NTS request and the master keys that open its cookie, for the NTS bench and
//! the NTS zero-allocation check (included by path from both).
// Each of the two uses only some of the fields.
#![allow(dead_code)]

use gnomon::nts::client;
use gnomon::nts::cookie::{COOKIE_LEN, CookieJar, KeySet, SessionKeys};

pub struct Fixture {
    /// Derived from the secret given.
    pub keys: KeySet,
    /// What the cookie carries.
    pub session: SessionKeys,
    pub cookie: [u8; COOKIE_LEN],
    /// Mode 3 with the cookie and the placeholders asked for, authenticated with the C2S key.
    pub request: Vec<u8>,
}

/// The fixture for master keys from `secret` and a request with `placeholders` placeholders.
pub fn request(secret: &[u8], placeholders: usize) -> Fixture {
    let keys = KeySet::derive(secret, 1, 2);
    let session = SessionKeys {
        aead: 15,
        c2s: [3; 32],
        s2c: [4; 32],
    };
    let mut cookie = [0u8; COOKIE_LEN];
    CookieJar::new(&keys).seal(&session, &[1; 16], &mut cookie);
    let mut header = [0u8; 48];
    header[0] = 0x23;
    let request = client::request(&header, &[7; 32], &cookie, placeholders, &session.c2s, &[8; 16]);
    Fixture {
        keys,
        session,
        cookie,
        request,
    }
}
