//! The client side of NTS-KE over TLS 1.3 (blocking, bounded by one deadline): what `gnomon
//! query --nts`, the sync thread and the load generator need to get cookies and keys.

use super::cookie::KEY_LEN;
use super::ke::{self, AEAD_AES_SIV_CMAC_256, EXPORTER_LABEL, record};
use super::server::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Debian's bundle of the system's trusted roots (package ca-certificates).
pub const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What one key exchange gave.
#[derive(Clone)]
pub struct KeSession {
    pub cookies: Vec<Vec<u8>>,
    pub aead: u16,
    pub c2s: [u8; KEY_LEN],
    pub s2c: [u8; KEY_LEN],
    /// Where to send NTP, when the KE server named another host or port.
    pub ntp_server: Option<String>,
    pub ntp_port: Option<u16>,
}

impl std::fmt::Debug for KeSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeSession {{ cookies: {}, aead: {}, ntp_server: {:?}, ntp_port: {:?}, .. }}",
            self.cookies.len(),
            self.aead,
            self.ntp_server,
            self.ntp_port
        )
    }
}

fn bad(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

/// Trust anchors from a PEM file (a private CA, a test certificate, or [`SYSTEM_ROOTS`]).
pub fn roots(pem: &Path) -> io::Result<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pem).map_err(|e| bad(format!("{}: {e}", pem.display())))? {
        let c = c.map_err(|e| bad(format!("{}: {e}", pem.display())))?;
        // A bundle may hold certificates webpki cannot use; the others still count.
        let _ = store.add(c);
    }
    if store.is_empty() {
        return Err(bad(format!("{}: no usable certificate", pem.display())));
    }
    Ok(store)
}

/// One NTS-KE exchange with `addr`, checking the certificate against `roots` for `server_name`.
pub fn key_exchange(
    addr: SocketAddr,
    server_name: &str,
    roots: rustls::RootCertStore,
    timeout: Duration,
) -> io::Result<KeSession> {
    super::check_cpu()?;
    let deadline = Instant::now() + timeout;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN.to_vec()];
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| bad(e.to_string()))?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(io::Error::other)?;
    let sock = TcpStream::connect_timeout(&addr, timeout)?;
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut req = Vec::new();
    ke::encode(&mut req, true, record::NEXT_PROTOCOL, &ke::PROTOCOL_NTPV4.to_be_bytes());
    ke::encode(
        &mut req,
        true,
        record::AEAD_ALGORITHM,
        &AEAD_AES_SIV_CMAC_256.to_be_bytes(),
    );
    ke::encode(&mut req, true, record::END_OF_MESSAGE, &[]);
    let left = |d: Instant| {
        let l = d.saturating_duration_since(Instant::now());
        if l.is_zero() {
            Err(io::Error::from(io::ErrorKind::TimedOut))
        } else {
            Ok(l)
        }
    };
    tls.sock.set_write_timeout(Some(left(deadline)?))?;
    tls.write_all(&req)?;
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match ke::decode(&resp) {
            Ok(_) => break,
            Err(ke::DecodeError::Malformed) => return Err(bad("malformed NTS-KE response")),
            Err(ke::DecodeError::Incomplete) => {}
        }
        tls.sock.set_read_timeout(Some(left(deadline)?))?;
        match tls.read(&mut buf)? {
            0 => return Err(bad("NTS-KE response cut short")),
            n => resp.extend_from_slice(&buf[..n]),
        }
        if resp.len() > 65_536 {
            return Err(bad("NTS-KE response too long"));
        }
    }
    if tls.conn.alpn_protocol() != Some(ALPN) {
        return Err(bad("the server did not negotiate ALPN ntske/1"));
    }
    let mut s = KeSession {
        cookies: Vec::new(),
        aead: 0,
        c2s: [0; KEY_LEN],
        s2c: [0; KEY_LEN],
        ntp_server: None,
        ntp_port: None,
    };
    let mut ntpv4 = false;
    for r in ke::decode(&resp).map_err(|_| bad("malformed NTS-KE response"))? {
        match r.record_type {
            record::ERROR => {
                let code = r.body.get(..2).map_or(u16::MAX, |b| u16::from_be_bytes([b[0], b[1]]));
                return Err(bad(format!("the server answered NTS-KE error {code}")));
            }
            record::NEXT_PROTOCOL => ntpv4 = r.body == ke::PROTOCOL_NTPV4.to_be_bytes(),
            record::AEAD_ALGORITHM if r.body.len() == 2 => s.aead = u16::from_be_bytes([r.body[0], r.body[1]]),
            record::NEW_COOKIE => s.cookies.push(r.body.to_vec()),
            record::SERVER => s.ntp_server = Some(String::from_utf8_lossy(r.body).into_owned()),
            record::PORT if r.body.len() == 2 => s.ntp_port = Some(u16::from_be_bytes([r.body[0], r.body[1]])),
            _ if r.critical && r.record_type > record::PORT => {
                return Err(bad(format!("unknown critical record {}", r.record_type)));
            }
            _ => {}
        }
    }
    if !ntpv4 || s.aead != AEAD_AES_SIV_CMAC_256 {
        return Err(bad("the server offered neither NTPv4 nor AEAD_AES_SIV_CMAC_256"));
    }
    if s.cookies.is_empty() {
        return Err(bad("the server sent no cookie"));
    }
    tls.conn
        .export_keying_material(&mut s.c2s, EXPORTER_LABEL, Some(&ke::exporter_context(s.aead, false)))
        .map_err(io::Error::other)?;
    tls.conn
        .export_keying_material(&mut s.s2c, EXPORTER_LABEL, Some(&ke::exporter_context(s.aead, true)))
        .map_err(io::Error::other)?;
    Ok(s)
}

/// Random bytes for unique identifiers and nonces (the OS's CSPRNG; off the hot path).
pub fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source");
    b
}
