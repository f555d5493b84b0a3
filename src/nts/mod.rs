//! Network Time Security (RFC 8915): NTS-KE records, cookies and master keys, and the NTP-side
//! request handling, all sans-IO; `server` runs NTS-KE over TLS on its own threads.
#![forbid(unsafe_code)]

mod aes128;
pub mod client;
pub mod cookie;
pub mod ke;
pub mod ke_client;
pub mod ntp;
pub mod server;
pub mod siv;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The `[nts]` table, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NtsConfig {
    /// Where NTS-KE listens (TCP).
    pub listen: SocketAddr,
    /// PEM certificate chain, leaf first.
    pub certificate: PathBuf,
    /// PEM private key of the leaf.
    pub private_key: PathBuf,
    /// The fleet's shared secret; without it each start makes its own random one, and cookies
    /// work on this process only.
    pub secret_file: Option<PathBuf>,
    /// How often the master key changes.
    pub key_rotation: Duration,
    /// Old master keys still accepted after a rotation.
    pub keys_kept: usize,
    /// Announced in the KE response (Server and Port records) when NTP is served elsewhere.
    pub ntp_server: Option<String>,
    pub ntp_port: Option<u16>,
    /// KE connections served at once; more wait in the kernel's backlog, then are refused.
    pub max_connections: usize,
    /// A whole KE exchange (handshake, request, response) must end within this.
    pub timeout: Duration,
}

pub const DEFAULT_KE_PORT: u16 = 4460;

/// Whether this CPU runs the AES code of this build. On x86-64 the build enables AES-NI at
/// compile time (`.cargo/config.toml`), so `aes128` and the aes crate use it without asking the
/// CPU; one without it would stop on an illegal instruction at the first cookie. Checked where
/// NTS starts (the KE server, every key exchange as a client), so plain NTP still runs on such a
/// CPU.
pub fn check_cpu() -> std::io::Result<()> {
    #[cfg(all(target_arch = "x86_64", target_feature = "aes"))]
    {
        // CPUID leaf 1, ECX bit 25: AES-NI. `is_x86_feature_detected!` would answer from the
        // compile-time features, so the CPU itself is asked.
        if (core::arch::x86_64::__cpuid(1).ecx >> 25) & 1 == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "NTS: this gnomon was built for CPUs with AES-NI (.cargo/config.toml) and this CPU \
                 has none: rebuild it with RUSTFLAGS=\"\" set (the AES code then checks the CPU at \
                 run time), or run without NTS",
            ));
        }
    }
    Ok(())
}

impl NtsConfig {
    pub fn new(certificate: PathBuf, private_key: PathBuf) -> NtsConfig {
        NtsConfig {
            listen: SocketAddr::from(([0u16; 8], DEFAULT_KE_PORT)),
            certificate,
            private_key,
            secret_file: None,
            key_rotation: Duration::from_secs(86_400),
            keys_kept: 2,
            ntp_server: None,
            ntp_port: None,
            max_connections: 64,
            timeout: Duration::from_secs(5),
        }
    }
}
