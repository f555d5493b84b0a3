//! `--nts`: key exchanges made before the run, and the authenticated requests and reply checks
//! built on them with gnomon's own NTS client (`gnomon::nts::client`). Cookies are reused across
//! simulated clients: a server's work per request is the same for a fresh or a reused cookie,
//! and a load generator that ran NTS-KE per client would measure its own TLS instead.

use gnomon::nts::client::{self, ReplyError};
use gnomon::nts::ke_client::{self, KeSession};
use gnomon::nts::siv::Siv;
use gnomon::proto::HEADER_LEN;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where to run NTS-KE and how many sessions to make.
#[derive(Clone, Debug)]
pub struct NtsPlan {
    pub ke: SocketAddr,
    /// The name the certificate must carry.
    pub server_name: String,
    /// Trust anchors (PEM).
    pub ca: PathBuf,
    pub sessions: usize,
}

/// The sessions of a run. Request `seq` uses session `seq % n` and one of its cookies, so the
/// receiver finds the keys and the Unique Identifier from the sequence number alone.
pub struct NtsKeys {
    sessions: Vec<Session>,
}

/// A key exchange's result with its keys expanded once: per request, only the AES blocks.
struct Session {
    ke: KeSession,
    c2s: Siv,
    s2c: Siv,
}

impl NtsKeys {
    pub fn establish(plan: &NtsPlan) -> Result<NtsKeys, String> {
        let mut sessions = Vec::with_capacity(plan.sessions);
        for _ in 0..plan.sessions.max(1) {
            let roots = ke_client::roots(&plan.ca).map_err(|e| e.to_string())?;
            let s = ke_client::key_exchange(plan.ke, &plan.server_name, roots, Duration::from_secs(5))
                .map_err(|e| format!("NTS-KE with {}: {e}", plan.ke))?;
            sessions.push(Session {
                c2s: Siv::new_s2v_only(&s.c2s),
                s2c: Siv::new(&s.s2c),
                ke: s,
            });
        }
        Ok(NtsKeys { sessions })
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn session(&self, seq: u64) -> &Session {
        &self.sessions[(seq % self.sessions.len() as u64) as usize]
    }

    /// The authenticated request for `header` (which carries `seq`), into `out`.
    pub fn request(&self, out: &mut Vec<u8>, header: &[u8; HEADER_LEN], seq: u64) {
        let s = self.session(seq);
        let cookies = &s.ke.cookies;
        let cookie = &cookies[((seq / self.sessions.len() as u64) % cookies.len() as u64) as usize];
        // AES-SIV needs no secret nonce; a unique one per request is what the RFC asks.
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&seq.to_be_bytes());
        client::request_to(out, header, &unique_id(seq), cookie, 0, &s.c2s, &nonce);
    }

    /// Checks the reply to request `seq`: its Unique Identifier and authenticator.
    pub fn verify(&self, reply: &[u8], seq: u64, scratch: &mut Vec<u8>) -> Result<(), ReplyError> {
        client::verify_reply_with(reply, &unique_id(seq), &self.session(seq).s2c, scratch, |_| {}).map(|_| ())
    }
}

fn unique_id(seq: u64) -> [u8; 32] {
    let mut u = [0x6e; 32];
    u[..8].copy_from_slice(&seq.to_be_bytes());
    u
}
