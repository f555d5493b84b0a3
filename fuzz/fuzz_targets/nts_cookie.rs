//! Fuzz target: opening arbitrary bytes as a cookie never panics and never succeeds (a forgery
//! would need the master key), and NTS-KE record decoding and the server's response to whatever
//! decodes never panic.
#![no_main]

use gnomon::nts::cookie::{CookieJar, KeySet};
use gnomon::nts::ke;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let jar = CookieJar::new(&KeySet::derive(b"fuzz secret", 1, 1));
    assert!(jar.open(data).is_err());
    if let Ok(records) = ke::decode(data) {
        let _ = ke::respond(&records, &ke::Negotiation::default());
    }
});
