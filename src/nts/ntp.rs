//! The NTP side of NTS (RFC 8915 section 5): extension fields in, an authenticated reply, an
//! NTS NAK or nothing out, written over the request in place with no allocation.

use super::cookie::{COOKIE_LEN, CookieError, CookieJar, KeySet};
use super::ke::COOKIES_PER_KE;
use super::siv::{Siv, tags_equal};
use crate::proto::{HEADER_LEN, NtpTimestamp, RefId, ReplyTemplate, stamp_transmit, write_reply};
use rand_chacha::ChaCha12Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};

/// Extension field types (RFC 8915 section 5.7).
pub mod field {
    pub const UNIQUE_IDENTIFIER: u16 = 0x0104;
    pub const NTS_COOKIE: u16 = 0x0204;
    pub const COOKIE_PLACEHOLDER: u16 = 0x0304;
    pub const AUTHENTICATOR: u16 = 0x0404;
}

/// The kiss code of an NTS NAK.
pub const NTSN: RefId = RefId(*b"NTSN");
/// RFC 7822 section 3: an extension field is at least 16 bytes and a multiple of 4.
const MIN_FIELD_LEN: usize = 16;
/// RFC 8915 section 5.3: the Unique Identifier carries at least 32 bytes.
const MIN_UNIQUE_ID_LEN: usize = 32;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 16;
const MAX_CLIENT_NONCE_LEN: usize = 64;
/// One cookie as an extension field.
const COOKIE_FIELD_LEN: usize = 4 + COOKIE_LEN;

/// Why an NTS request got a NAK or nothing. Flat and `Copy`, so the hot path can count it.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
#[repr(usize)]
pub enum Reason {
    /// Answered with an authenticated reply.
    Answered,
    /// An extension field with a bad length, or fields after the authenticator.
    Malformed,
    /// Two Unique Identifiers, cookies or authenticators.
    Duplicate,
    /// No Unique Identifier, or one shorter than 32 bytes.
    NoUniqueId,
    NoCookie,
    NoAuthenticator,
    /// The authenticator's nonce and ciphertext lengths do not fit its field.
    BadAuthenticator,
    /// NAK: the cookie is not one of ours.
    CookieBadLength,
    /// NAK: the cookie's key rotated out (or never existed).
    CookieUnknownKey,
    /// NAK: the cookie's seal does not verify.
    CookieForged,
    /// NAK: the cookie names an algorithm not served.
    CookieBadAlgorithm,
    /// NAK: the request's authenticator does not verify under the cookie's C2S key.
    AuthenticationFailed,
}

impl Reason {
    pub const COUNT: usize = 12;
    pub const ALL: [Reason; Reason::COUNT] = [
        Reason::Answered,
        Reason::Malformed,
        Reason::Duplicate,
        Reason::NoUniqueId,
        Reason::NoCookie,
        Reason::NoAuthenticator,
        Reason::BadAuthenticator,
        Reason::CookieBadLength,
        Reason::CookieUnknownKey,
        Reason::CookieForged,
        Reason::CookieBadAlgorithm,
        Reason::AuthenticationFailed,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Reason::Answered => "nts_answered",
            Reason::Malformed => "nts_malformed",
            Reason::Duplicate => "nts_duplicate_field",
            Reason::NoUniqueId => "nts_no_unique_id",
            Reason::NoCookie => "nts_no_cookie",
            Reason::NoAuthenticator => "nts_no_authenticator",
            Reason::BadAuthenticator => "nts_bad_authenticator",
            Reason::CookieBadLength => "nts_nak_cookie_length",
            Reason::CookieUnknownKey => "nts_nak_unknown_key",
            Reason::CookieForged => "nts_nak_forged_cookie",
            Reason::CookieBadAlgorithm => "nts_nak_cookie_algorithm",
            Reason::AuthenticationFailed => "nts_nak_authentication",
        }
    }

    fn from_cookie(e: CookieError) -> Reason {
        match e {
            CookieError::BadLength => Reason::CookieBadLength,
            CookieError::UnknownKey => Reason::CookieUnknownKey,
            CookieError::Forged => Reason::CookieForged,
            CookieError::BadAlgorithm => Reason::CookieBadAlgorithm,
        }
    }
}

/// What to do with a request after [`NtsServer::handle`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    /// No NTS field in it: the plain path answers it as before.
    NotNts,
    /// `buf[..n]` is the authenticated reply, already stamped with T3 (the authenticator covers it).
    Reply(usize),
    /// `buf[..n]` is an NTS NAK (KoD NTSN with the Unique Identifier echoed).
    Nak(usize, Reason),
    /// Send nothing.
    Drop(Reason),
}

/// Where the fields of a request are (byte ranges of `buf`).
struct Fields {
    unique_id: (usize, usize),
    cookie: (usize, usize),
    placeholders: usize,
    /// Start of the authenticator field: everything before it is the associated data.
    auth: usize,
    nonce: (usize, usize),
    ciphertext: (usize, usize),
}

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes([b[at], b[at + 1]]) as usize
}

const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// Finds the NTS fields. `Ok(None)` when the request carries none (a plain request, perhaps
/// with a legacy MAC or another extension).
fn parse(req: &[u8]) -> Result<Option<Fields>, Reason> {
    let (mut unique_id, mut cookie, mut auth) = (None, None, None);
    let mut placeholders = 0;
    let mut seen_nts = false;
    let mut pos = HEADER_LEN;
    while pos < req.len() {
        let rest = req.len() - pos;
        let (ty, len) = if rest >= 4 {
            (be16(req, pos) as u16, be16(req, pos + 2))
        } else {
            (0, 0)
        };
        if rest < 4 || len < MIN_FIELD_LEN || !len.is_multiple_of(4) || len > rest || auth.is_some() {
            // Not extension fields at all: a MAC, say. Only a request that already showed NTS
            // fields is an NTS request gone wrong.
            return if seen_nts { Err(Reason::Malformed) } else { Ok(None) };
        }
        let body = (pos + 4, pos + len);
        let slot = match ty {
            field::UNIQUE_IDENTIFIER => Some(&mut unique_id),
            field::NTS_COOKIE => Some(&mut cookie),
            field::AUTHENTICATOR => Some(&mut auth),
            field::COOKIE_PLACEHOLDER => {
                placeholders += 1;
                seen_nts = true;
                None
            }
            _ => None,
        };
        if let Some(slot) = slot {
            seen_nts = true;
            if slot.replace(body).is_some() {
                return Err(Reason::Duplicate);
            }
        }
        pos += len;
    }
    if !seen_nts {
        return Ok(None);
    }
    let unique_id = unique_id
        .filter(|u| u.1 - u.0 >= MIN_UNIQUE_ID_LEN)
        .ok_or(Reason::NoUniqueId)?;
    let cookie = cookie.ok_or(Reason::NoCookie)?;
    let auth_body = auth.ok_or(Reason::NoAuthenticator)?;
    let (b0, b1) = auth_body;
    if b1 - b0 < 4 {
        return Err(Reason::BadAuthenticator);
    }
    let nonce_len = be16(req, b0);
    let ct_len = be16(req, b0 + 2);
    if nonce_len == 0
        || nonce_len > MAX_CLIENT_NONCE_LEN
        || ct_len < TAG_LEN
        || 4 + pad4(nonce_len) + pad4(ct_len) > b1 - b0
    {
        return Err(Reason::BadAuthenticator);
    }
    let nonce = (b0 + 4, b0 + 4 + nonce_len);
    let ct_start = b0 + 4 + pad4(nonce_len);
    Ok(Some(Fields {
        unique_id: (unique_id.0 - 4, unique_id.1),
        cookie,
        placeholders,
        auth: b0 - 4,
        nonce,
        ciphertext: (ct_start, ct_start + ct_len),
    }))
}

/// How the reply header is made: the batch's template and the request's T2, and T3 taken when
/// the reply is sealed.
pub struct ReplyHeader<'a> {
    pub template: &'a ReplyTemplate,
    pub receive: NtpTimestamp,
    pub transmit: NtpTimestamp,
}

/// One worker's NTS state: the cookie ciphers for the published key set and a CSPRNG for nonces.
pub struct NtsServer {
    jar: CookieJar,
    rng: ChaCha12Rng,
    nak: ReplyTemplate,
    counts: [u64; Reason::COUNT],
    /// The reply's new cookies and their fields, built aside while the request's cookie is still
    /// read: kept here, because as locals they were zeroed (1.7 KB) on every request.
    sealed: [[u8; COOKIE_LEN]; COOKIES_PER_KE],
    fields: [u8; COOKIES_PER_KE * COOKIE_FIELD_LEN],
}

impl NtsServer {
    pub fn new(keys: &KeySet, seed: [u8; 32]) -> NtsServer {
        NtsServer {
            jar: CookieJar::new(keys),
            rng: ChaCha12Rng::from_seed(seed),
            nak: ReplyTemplate::kiss(NTSN),
            counts: [0; Reason::COUNT],
            sealed: [[0; COOKIE_LEN]; COOKIES_PER_KE],
            fields: [0; COOKIES_PER_KE * COOKIE_FIELD_LEN],
        }
    }

    /// Takes a newly published key set (a rotation); once per change, not per request.
    pub fn set_keys(&mut self, keys: &KeySet) {
        self.jar = CookieJar::new(keys);
    }

    /// Requests counted by outcome since the last [`NtsServer::take_counts`].
    pub fn take_counts(&mut self) -> [u64; Reason::COUNT] {
        core::mem::replace(&mut self.counts, [0; Reason::COUNT])
    }

    /// Handles `buf[..len]`, a request whose header passed `proto::check_request`.
    pub fn handle(&mut self, buf: &mut [u8], len: usize, header: &ReplyHeader<'_>) -> Verdict {
        let verdict = self.handle_inner(buf, len, header);
        let reason = match verdict {
            Verdict::NotNts => return verdict,
            Verdict::Reply(_) => Reason::Answered,
            Verdict::Nak(_, r) | Verdict::Drop(r) => r,
        };
        self.counts[reason as usize] += 1;
        verdict
    }

    fn handle_inner(&mut self, buf: &mut [u8], len: usize, header: &ReplyHeader<'_>) -> Verdict {
        if len <= HEADER_LEN || len > buf.len() {
            return Verdict::NotNts;
        }
        let f = match parse(&buf[..len]) {
            Ok(None) => return Verdict::NotNts,
            Ok(Some(f)) => f,
            Err(r) => return Verdict::Drop(r),
        };
        // One new cookie per cookie and placeholder, as many as fit in the request's length.
        let uid_len = f.unique_id.1 - f.unique_id.0;
        let fixed = HEADER_LEN + uid_len + 4 + 4 + NONCE_LEN + TAG_LEN;
        let wanted = (1 + f.placeholders).min(COOKIES_PER_KE);
        let cookies = wanted.min(len.saturating_sub(fixed) / COOKIE_FIELD_LEN);
        let reply_len = fixed + cookies * COOKIE_FIELD_LEN;
        if reply_len > len {
            // Unreachable for any request that parsed (its cookie and authenticator are longer
            // than the reply's fixed part), kept as the rule's last guard.
            return Verdict::Drop(Reason::Malformed);
        }
        let mut nonces = [[0u8; NONCE_LEN]; COOKIES_PER_KE];
        for n in &mut nonces[..cookies] {
            self.rng.fill_bytes(n);
        }
        let cookie = &buf[f.cookie.0..f.cookie.1];
        let keys = match self
            .jar
            .open_and_seal(cookie, &nonces[..cookies], &mut self.sealed[..cookies])
        {
            Ok(k) => k,
            Err(e) => return self.nak(buf, &f, Reason::from_cookie(e)),
        };
        // Built in place on the stack (set into a slot, each would be built aside and copied).
        let c2s = if f.ciphertext.1 - f.ciphertext.0 > TAG_LEN {
            Siv::new(&keys.c2s)
        } else {
            // Nothing to decrypt (what clients send): the CTR half is never used.
            Siv::new_s2v_only(&keys.c2s)
        };
        let s2c = Siv::new(&keys.s2c);
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill_bytes(&mut nonce);
        // The reply's header and its cookie fields are made aside while the request is still
        // being authenticated: the reply's cookies go where the request's cookie is.
        let mut head = [0u8; HEADER_LEN];
        head.copy_from_slice(&buf[..HEADER_LEN]);
        write_reply(&mut head, header.template, header.receive);
        stamp_transmit(&mut head, header.transmit);
        let fields_len = cookies * COOKIE_FIELD_LEN;
        let fields = &mut self.fields[..fields_len];
        for (field, cookie) in fields.chunks_exact_mut(COOKIE_FIELD_LEN).zip(&self.sealed) {
            field[..2].copy_from_slice(&field::NTS_COOKIE.to_be_bytes());
            field[2..4].copy_from_slice(&(COOKIE_FIELD_LEN as u16).to_be_bytes());
            field[4..].copy_from_slice(cookie);
        }
        let tag = match Self::authenticate_and_seal(buf, &f, &c2s, &s2c, &head, &nonce, fields) {
            Some(tag) => tag,
            None => return self.nak(buf, &f, Reason::AuthenticationFailed),
        };
        buf.copy_within(f.unique_id.0..f.unique_id.1, HEADER_LEN);
        buf[..HEADER_LEN].copy_from_slice(&head);
        let auth = HEADER_LEN + uid_len;
        let ct_len = TAG_LEN + fields_len;
        buf[auth..auth + 2].copy_from_slice(&field::AUTHENTICATOR.to_be_bytes());
        buf[auth + 2..auth + 4].copy_from_slice(&((reply_len - auth) as u16).to_be_bytes());
        buf[auth + 4..auth + 6].copy_from_slice(&(NONCE_LEN as u16).to_be_bytes());
        buf[auth + 6..auth + 8].copy_from_slice(&(ct_len as u16).to_be_bytes());
        buf[auth + 8..auth + 8 + NONCE_LEN].copy_from_slice(&nonce);
        buf[auth + 8 + NONCE_LEN..auth + 8 + NONCE_LEN + TAG_LEN].copy_from_slice(&tag);
        let sealed = &mut buf[auth + 8 + NONCE_LEN + TAG_LEN..reply_len];
        sealed.copy_from_slice(fields);
        s2c.ctr(&tag, sealed);
        Verdict::Reply(reply_len)
    }

    /// Verifies the request's authenticator under its C2S key and, meanwhile, computes the
    /// reply's S2V over `head`, the request's Unique Identifier field, `nonce` and the cookie
    /// `fields`. Returns the reply's tag, or `None` when the request does not verify.
    ///
    /// The two S2Vs are independent, so the CPU runs the reply's chains while the request's
    /// last blocks are still in flight. Encrypted fields of the request are decrypted in place
    /// (the buffer is overwritten by the reply) and not used.
    fn authenticate_and_seal(
        buf: &mut [u8],
        f: &Fields,
        c2s: &Siv,
        s2c: &Siv,
        head: &[u8; HEADER_LEN],
        nonce: &[u8; NONCE_LEN],
        fields: &[u8],
    ) -> Option<[u8; TAG_LEN]> {
        let (aad, rest) = buf.split_at_mut(f.auth);
        let (auth_head, ct) = rest.split_at_mut(f.ciphertext.0 - f.auth);
        let client_nonce = &auth_head[f.nonce.0 - f.auth..f.nonce.1 - f.auth];
        let (tag, data) = ct[..f.ciphertext.1 - f.ciphertext.0].split_at_mut(TAG_LEN);
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("tag");
        // Clients rarely encrypt fields; when they do, SIV decrypts before it can verify.
        c2s.ctr(tag, data);
        let request = c2s.s2v(&[&*aad, client_nonce], data);
        let uid = &aad[f.unique_id.0..f.unique_id.1];
        let reply = s2c.s2v_split(&[[&head[..], uid], [&[][..], &nonce[..]]], fields);
        tags_equal(&request, tag).then_some(reply)
    }

    /// An NTS NAK: a KoD NTSN carrying the request's Unique Identifier, never longer than it.
    fn nak(&self, buf: &mut [u8], f: &Fields, reason: Reason) -> Verdict {
        let uid_len = f.unique_id.1 - f.unique_id.0;
        buf.copy_within(f.unique_id.0..f.unique_id.1, HEADER_LEN);
        // A NAK is not authenticated; T2 and T3 of a kiss are not meant to be used.
        write_reply(buf, &self.nak, NtpTimestamp(0));
        Verdict::Nak(HEADER_LEN + uid_len, reason)
    }
}

#[cfg(test)]
mod tests;
