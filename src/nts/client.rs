//! The client's half of NTS on NTP, sans-IO: builds an authenticated request and checks a reply.
//! Used by `gnomon query --nts`, the sync thread, the load generator and the tests; the
//! randomness (unique identifiers, nonces) comes from the caller.

use super::ntp::{NTSN, field};
use super::siv::{Siv, TAG_LEN};
use crate::proto::{HEADER_LEN, RefId};

fn put_field(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
    put_field_zeroed(out, ty, body, body.len());
}

/// A field whose body is `body` and then zeros up to `body_len` bytes (a placeholder is all
/// zeros), padded to a multiple of 4 and at least 16 bytes in all.
fn put_field_zeroed(out: &mut Vec<u8>, ty: u16, body: &[u8], body_len: usize) {
    let len = (4 + body_len).next_multiple_of(4).max(16);
    out.extend_from_slice(&ty.to_be_bytes());
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(body);
    out.resize(out.len() + len - 4 - body.len(), 0);
}

/// An NTS request: `header` (48 bytes, mode 3), the Unique Identifier, the cookie, `placeholders`
/// placeholders of the cookie's length and an authenticator sealed with `c2s` under `nonce`.
pub fn request(
    header: &[u8; HEADER_LEN],
    unique_id: &[u8],
    cookie: &[u8],
    placeholders: usize,
    c2s: &[u8; 32],
    nonce: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    let c2s = Siv::new_s2v_only(c2s);
    request_to(&mut out, header, unique_id, cookie, placeholders, &c2s, nonce);
    out
}

/// As [`request`], into `out` (cleared first), with the C2S key already expanded
/// ([`Siv::new_s2v_only`] is enough: the request encrypts nothing). A caller that keeps the key
/// and reuses `out`, as the load generator does for each session, allocates nothing and expands
/// no key per request.
pub fn request_to(
    out: &mut Vec<u8>,
    header: &[u8; HEADER_LEN],
    unique_id: &[u8],
    cookie: &[u8],
    placeholders: usize,
    c2s: &Siv,
    nonce: &[u8],
) {
    out.clear();
    out.extend_from_slice(header);
    put_field(out, field::UNIQUE_IDENTIFIER, unique_id);
    put_field(out, field::NTS_COOKIE, cookie);
    for _ in 0..placeholders {
        put_field_zeroed(out, field::COOKIE_PLACEHOLDER, &[], cookie.len());
    }
    let tag = c2s.encrypt_in_place(&[&out[..], nonce], &mut []);
    let mut body = [0u8; 4 + 64 + TAG_LEN];
    let nl = nonce.len().min(64);
    body[..2].copy_from_slice(&(nl as u16).to_be_bytes());
    body[2..4].copy_from_slice(&(TAG_LEN as u16).to_be_bytes());
    body[4..4 + nl].copy_from_slice(&nonce[..nl]);
    let cs = 4 + nl.next_multiple_of(4);
    body[cs..cs + TAG_LEN].copy_from_slice(&tag);
    put_field(out, field::AUTHENTICATOR, &body[..cs + TAG_LEN]);
}

/// Why a reply is not accepted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ReplyError {
    /// A KoD NTSN: the cookie was refused; run NTS-KE again.
    Nak,
    Malformed,
    /// No Unique Identifier, or not ours: not an answer to our request.
    WrongUniqueId,
    /// The authenticator does not verify under the S2C key.
    Unauthenticated,
}

/// Checks a reply to a request with `unique_id`; returns the new cookies it carries.
pub fn verify_reply(reply: &[u8], unique_id: &[u8], s2c: &[u8; 32]) -> Result<Vec<Vec<u8>>, ReplyError> {
    let mut cookies = Vec::new();
    verify_reply_with(reply, unique_id, &Siv::new(s2c), &mut Vec::new(), |c| {
        cookies.push(c.to_vec())
    })?;
    Ok(cookies)
}

/// As [`verify_reply`], with the S2C key already expanded, decrypting in `scratch` and handing
/// each new cookie to `cookie`: a caller that keeps the key and reuses `scratch` allocates
/// nothing and expands no key per reply (the load generator).
pub fn verify_reply_with(
    reply: &[u8],
    unique_id: &[u8],
    s2c: &Siv,
    scratch: &mut Vec<u8>,
    mut cookie: impl FnMut(&[u8]),
) -> Result<usize, ReplyError> {
    if reply.len() < HEADER_LEN {
        return Err(ReplyError::Malformed);
    }
    let mut pos = HEADER_LEN;
    let mut uid_ok = false;
    while pos + 4 <= reply.len() {
        let ty = u16::from_be_bytes([reply[pos], reply[pos + 1]]);
        let len = u16::from_be_bytes([reply[pos + 2], reply[pos + 3]]) as usize;
        if len < 16 || !len.is_multiple_of(4) || pos + len > reply.len() {
            return Err(ReplyError::Malformed);
        }
        let body = &reply[pos + 4..pos + len];
        match ty {
            field::UNIQUE_IDENTIFIER => {
                uid_ok = body.starts_with(unique_id) && body[unique_id.len()..].iter().all(|&b| b == 0)
            }
            field::AUTHENTICATOR => {
                if !uid_ok {
                    return Err(ReplyError::WrongUniqueId);
                }
                if body.len() < 4 {
                    return Err(ReplyError::Malformed);
                }
                let nl = u16::from_be_bytes([body[0], body[1]]) as usize;
                let cl = u16::from_be_bytes([body[2], body[3]]) as usize;
                let cs = 4 + nl.next_multiple_of(4);
                if cl < TAG_LEN || cs + cl > body.len() {
                    return Err(ReplyError::Malformed);
                }
                scratch.clear();
                scratch.extend_from_slice(&body[cs + TAG_LEN..cs + cl]);
                let tag: &[u8; TAG_LEN] = body[cs..cs + TAG_LEN].try_into().expect("tag");
                s2c.decrypt_in_place(&[&reply[..pos], &body[4..4 + nl]], &mut scratch[..], tag)
                    .map_err(|_| ReplyError::Unauthenticated)?;
                let data = &scratch[..];
                let mut n = 0;
                let mut p = 0;
                while p + 4 <= data.len() {
                    let t = u16::from_be_bytes([data[p], data[p + 1]]);
                    let l = u16::from_be_bytes([data[p + 2], data[p + 3]]) as usize;
                    if l < 4 || p + l > data.len() {
                        return Err(ReplyError::Malformed);
                    }
                    if t == field::NTS_COOKIE {
                        cookie(&data[p + 4..p + l]);
                        n += 1;
                    }
                    p += l;
                }
                return Ok(n);
            }
            _ => {}
        }
        pos += len;
    }
    if reply[1] == 0 && RefId([reply[12], reply[13], reply[14], reply[15]]) == NTSN {
        return Err(if uid_ok {
            ReplyError::Nak
        } else {
            ReplyError::WrongUniqueId
        });
    }
    Err(if uid_ok {
        ReplyError::Unauthenticated
    } else {
        ReplyError::WrongUniqueId
    })
}

/// Cookies kept per server: what one KE gives (RFC 8915 section 4.1.6 asks for 8).
pub const COOKIES_WANTED: usize = super::ke::COOKIES_PER_KE;

/// One outstanding authenticated request: what checking its reply needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub unique_id: [u8; 32],
}

/// A client's NTS state for one server: the session keys and the cookies not yet spent. Each
/// request spends one cookie and asks, with placeholders, for as many as keep the jar full.
#[derive(Clone, Debug)]
pub struct Session {
    pub ke: super::ke_client::KeSession,
}

impl Session {
    pub fn new(ke: super::ke_client::KeSession) -> Session {
        Session { ke }
    }

    /// Cookies left; none means a new key exchange.
    pub fn cookies(&self) -> usize {
        self.ke.cookies.len()
    }

    /// An authenticated request for `header` (the caller's random `unique_id` and `nonce`), or
    /// `None` when no cookie is left.
    pub fn request(
        &mut self,
        header: &[u8; HEADER_LEN],
        unique_id: [u8; 32],
        nonce: [u8; 16],
    ) -> Option<(Vec<u8>, Pending)> {
        let cookie = self.ke.cookies.pop()?;
        let placeholders = COOKIES_WANTED.saturating_sub(self.ke.cookies.len() + 1);
        let req = request(header, &unique_id, &cookie, placeholders, &self.ke.c2s, &nonce);
        Some((req, Pending { unique_id }))
    }

    /// Checks a reply to `pending`, keeping the cookies it brings; returns how many it brought.
    /// A NAK empties the jar: the server refuses these cookies, so a new key exchange is due.
    pub fn reply(&mut self, reply: &[u8], pending: &Pending) -> Result<usize, ReplyError> {
        match verify_reply(reply, &pending.unique_id, &self.ke.s2c) {
            Ok(cookies) => {
                let n = cookies.len();
                for c in cookies {
                    if self.ke.cookies.len() < COOKIES_WANTED {
                        self.ke.cookies.push(c);
                    }
                }
                Ok(n)
            }
            Err(ReplyError::Nak) => {
                self.ke.cookies.clear();
                Err(ReplyError::Nak)
            }
            Err(e) => Err(e),
        }
    }
}
