//! Who else serves our addresses: the instance lock beside the control socket, and the kernel's
//! table of UDP sockets (`/proc/net/udp`, `/proc/net/udp6`). SO_REUSEPORT would let a second
//! gnomon, or a chronyd or ntpd that also sets it, silently split the traffic with us; until a
//! deliberate handover exists, sharing is a start-up error that names the other process.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// One socket of the kernel's UDP table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpEntry {
    pub local: SocketAddr,
    pub uid: u32,
    pub inode: u64,
}

/// Reads an address as `/proc/net/udp{,6}` prints it: each 32-bit word of the address as the
/// host holds it in memory (network order bytes read as a native integer), in hex, then the port.
fn parse_hex_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(w, 16).ok()?.to_ne_bytes())
    };
    let ip = match addr.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The sockets listed in the text of `/proc/net/udp` or `/proc/net/udp6`; lines that do not
/// parse (the header, a format this code does not know) are left out.
pub fn parse_proc_net_udp(text: &str) -> Vec<UdpEntry> {
    text.lines()
        .filter_map(|line| {
            // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 || !f[0].ends_with(':') {
                return None;
            }
            Some(UdpEntry {
                local: parse_hex_addr(f[1])?,
                uid: f[7].parse().ok()?,
                inode: f[9].parse().ok()?,
            })
        })
        .collect()
}

/// The IPv4 address an IPv4-mapped IPv6 address stands for: a socket bound to `::ffff:a.b.c.d`
/// receives IPv4 traffic to a.b.c.d.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether a socket bound to `theirs` receives datagrams meant for our listener on `ours`.
/// `/proc/net/udp6` does not say whether a socket on `[::]` is IPv6-only, so it counts against
/// our IPv4 addresses too; ours on `[::]` are always IPv6-only (see `socket::bind_udp`).
pub fn overlaps(ours: SocketAddr, theirs: SocketAddr) -> bool {
    if ours.port() != theirs.port() || ours.port() == 0 {
        return false;
    }
    let (a, b) = (unmap(ours.ip()), unmap(theirs.ip()));
    match (a, b) {
        (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
            a == b || a.is_unspecified() || b.is_unspecified()
        }
        (IpAddr::V4(_), IpAddr::V6(v6)) => v6.is_unspecified(),
        (IpAddr::V6(_), IpAddr::V4(_)) => false,
    }
}

/// The sockets of `table` other than `own` (inodes) that would share `ours`.
pub fn conflicts<'a>(ours: SocketAddr, table: &'a [UdpEntry], own: &[u64]) -> Vec<&'a UdpEntry> {
    table
        .iter()
        .filter(|e| !own.contains(&e.inode) && overlaps(ours, e.local))
        .collect()
}

/// Both UDP tables of this network namespace. A missing file is an empty table: without IPv6
/// in the kernel there is no `/proc/net/udp6`.
pub fn read_udp_table() -> io::Result<Vec<UdpEntry>> {
    let mut all = Vec::new();
    for path in ["/proc/net/udp", "/proc/net/udp6"] {
        match std::fs::read_to_string(path) {
            Ok(text) => all.extend(parse_proc_net_udp(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
        }
    }
    Ok(all)
}

/// The inode of the socket behind a `/proc/PID/fd/N` link (`socket:[INODE]`).
fn link_inode(link: &Path) -> Option<u64> {
    let target = std::fs::read_link(link).ok()?;
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The inode of one of our own sockets.
pub fn socket_inode(fd: RawFd) -> Option<u64> {
    link_inode(&PathBuf::from(format!("/proc/self/fd/{fd}")))
}

/// The process holding the socket `inode`, as (pid, command name), if /proc lets us see it
/// (other users' processes are hidden unless we run as root).
pub fn socket_owner(inode: u64) -> Option<(u32, String)> {
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else {
            continue;
        };
        if fds.flatten().any(|fd| link_inode(&fd.path()) == Some(inode)) {
            let comm = std::fs::read_to_string(proc_entry.path().join("comm")).unwrap_or_default();
            return Some((pid, comm.trim().to_string()));
        }
    }
    None
}

/// "chronyd (pid 812)", or the uid and inode when the owner is hidden from us.
pub fn describe(e: &UdpEntry) -> String {
    match socket_owner(e.inode) {
        Some((pid, comm)) => format!("{comm} (pid {pid}, bound to {})", e.local),
        None => format!(
            "a process of uid {} that this user cannot see (socket inode {}, bound to {})",
            e.uid, e.inode, e.local
        ),
    }
}

/// The holders of `entries`, each process once (a server has a socket per worker).
fn describe_all(entries: &[&UdpEntry]) -> String {
    let mut seen: Vec<String> = Vec::new();
    for e in entries {
        let d = describe(e);
        if !seen.contains(&d) {
            seen.push(d);
        }
    }
    seen.join(", ")
}

/// Refuses `ours` when another socket than `own` would share it.
pub fn check_unshared(ours: SocketAddr, own: &[u64]) -> io::Result<()> {
    // A server that just exited can leave its sockets behind for a moment: the kernel tears an
    // io_uring down after the process is gone, and its sockets go with it. A restart must not
    // take those for another server, so a conflict is looked at again for up to 2 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let table = loop {
        let table = match read_udp_table() {
            Ok(t) => t,
            Err(e) => {
                // The instance lock still keeps a second gnomon out; other servers go unnoticed.
                log::warn!("cannot check who else listens on {ours}: {e}");
                return Ok(());
            }
        };
        if conflicts(ours, &table, own).is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            break table;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let others = conflicts(ours, &table, own);
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!(
            "{ours} is already served by {}: refusing to share it through SO_REUSEPORT (stop the other server or change `listen`)",
            describe_all(&others)
        ),
    ))
}

/// What a failed bind of `addr` says, naming the holder of the address when the kernel refused
/// because it is taken (a socket without SO_REUSEPORT, or a reuseport group of another user).
pub fn bind_error(addr: SocketAddr, e: io::Error, own: &[u64]) -> io::Error {
    if e.raw_os_error() == Some(libc::EACCES) && addr.port() < unprivileged_port_start() {
        return io::Error::new(
            e.kind(),
            format!(
                "bind {addr}: {e}: binding port {} needs CAP_NET_BIND_SERVICE (or root): ports below {} \
                 are privileged here (sysctl net.ipv4.ip_unprivileged_port_start)",
                addr.port(),
                unprivileged_port_start()
            ),
        );
    }
    if e.raw_os_error() != Some(libc::EADDRINUSE) {
        return io::Error::new(e.kind(), format!("bind {addr}: {e}"));
    }
    let holders = read_udp_table()
        .map(|t| describe_all(&conflicts(addr, &t, own)))
        .unwrap_or_default();
    let by = if holders.is_empty() {
        String::new()
    } else {
        format!(" by {holders}")
    };
    io::Error::new(
        e.kind(),
        format!("bind {addr}: {e}: the address is in use{by} (stop the other server or change `listen`)"),
    )
}

/// The lowest port a process without CAP_NET_BIND_SERVICE may bind (1024 unless the sysctl
/// says otherwise; it applies to IPv6 too).
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024)
}

/// An exclusive `flock` on `<control socket>.lock`, held for the life of the process: a second
/// gnomon with the same control socket refuses to start, whatever its listen addresses.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
    pub path: PathBuf,
}

/// The lock file beside a control socket.
pub fn lock_path(control_socket: &Path) -> PathBuf {
    let mut s: OsString = control_socket.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

impl InstanceLock {
    /// Takes the lock for `control_socket`, or says which process holds it.
    pub fn acquire(control_socket: &Path) -> io::Result<InstanceLock> {
        let path = lock_path(control_socket);
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("lock file {}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(ctx)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            // A link planted in a shared directory must not make us write somewhere else.
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(ctx)?;
        // SAFETY: flock on a file descriptor we own and keep open; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(ctx(e));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim().parse::<u32>() {
                Ok(pid) => format!("gnomon pid {pid}"),
                Err(_) => "another gnomon".to_string(),
            };
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is locked by {holder}: a server with control socket {} is already running",
                    path.display(),
                    control_socket.display()
                ),
            ));
        }
        // The pid is only for the message above; the lock itself is the flock.
        file.set_len(0).map_err(ctx)?;
        file.rewind().map_err(ctx)?;
        writeln!(file, "{}", std::process::id()).map_err(ctx)?;
        Ok(InstanceLock { _file: file, path })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table line as the kernel formats it, for any host byte order.
    fn line(sl: u32, ip: IpAddr, port: u16, uid: u32, inode: u64) -> String {
        let hex: String = match ip {
            IpAddr::V4(v4) => format!("{:08X}", u32::from_ne_bytes(v4.octets())),
            IpAddr::V6(v6) => v6
                .octets()
                .chunks(4)
                .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
                .collect(),
        };
        let zero = if ip.is_ipv4() {
            "00000000".to_string()
        } else {
            "0".repeat(32)
        };
        format!(
            "{sl:5}: {hex}:{port:04X} {zero}:0000 07 00000000:00000000 00:00000000 00000000 {uid:5}        0 {inode} 2 0000000000000000 0"
        )
    }

    const HEADER: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops";

    #[test]
    fn parses_both_families_and_skips_the_header() {
        let text = [
            HEADER.to_string(),
            line(1, "127.0.0.1".parse().unwrap(), 45123, 0, 12663),
            line(2, "0.0.0.0".parse().unwrap(), 123, 101, 7),
            line(3, "2001:db8::1".parse().unwrap(), 1123, 5, 99),
            "garbage".to_string(),
        ]
        .join("\n");
        let t = parse_proc_net_udp(&text);
        assert_eq!(
            t,
            vec![
                UdpEntry {
                    local: "127.0.0.1:45123".parse().unwrap(),
                    uid: 0,
                    inode: 12663
                },
                UdpEntry {
                    local: "0.0.0.0:123".parse().unwrap(),
                    uid: 101,
                    inode: 7
                },
                UdpEntry {
                    local: "[2001:db8::1]:1123".parse().unwrap(),
                    uid: 5,
                    inode: 99
                },
            ]
        );
    }

    /// Lines copied from this machine's /proc/net/udp and udp6 (little-endian x86-64).
    #[cfg(target_endian = "little")]
    #[test]
    fn parses_real_kernel_lines() {
        let v4 = " 13743: 0100007F:B043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 12663 2 00000000d93eb4e9 0";
        let v6 = "  611: 00000000000000000000000001000000:007B 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   106        0 31337 2 0000000000000000 0";
        let t = parse_proc_net_udp(&format!("{HEADER}\n{v4}\n{v6}\n"));
        assert_eq!(t[0].local, "127.0.0.1:45123".parse().unwrap());
        assert_eq!((t[0].uid, t[0].inode), (0, 12663));
        assert_eq!(t[1].local, "[::1]:123".parse().unwrap());
        assert_eq!((t[1].uid, t[1].inode), (106, 31337));
    }

    #[test]
    fn overlap_rules() {
        let o = |a: &str, b: &str| overlaps(a.parse().unwrap(), b.parse().unwrap());
        assert!(o("127.0.0.1:123", "127.0.0.1:123"));
        assert!(o("127.0.0.1:123", "0.0.0.0:123"), "their wildcard over our address");
        assert!(o("0.0.0.0:123", "127.0.0.1:123"), "our wildcard over their address");
        assert!(!o("127.0.0.1:123", "127.0.0.2:123"));
        assert!(!o("127.0.0.1:123", "127.0.0.1:124"));
        assert!(o("[::1]:123", "[::]:123"));
        assert!(o("[::]:123", "[::1]:123"));
        assert!(!o("[::1]:123", "[::2]:123"));
        assert!(o("127.0.0.1:123", "[::]:123"), "a [::] socket may be dual-stack");
        assert!(o("127.0.0.1:123", "[::ffff:127.0.0.1]:123"));
        assert!(!o("[::]:123", "0.0.0.0:123"), "ours on [::] is IPv6-only");
        assert!(!o("127.0.0.1:0", "127.0.0.1:0"), "port 0 is nothing to check");
    }

    #[test]
    fn own_sockets_are_not_conflicts() {
        let t = parse_proc_net_udp(
            &[
                line(1, "0.0.0.0".parse().unwrap(), 123, 0, 1),
                line(2, "127.0.0.1".parse().unwrap(), 123, 0, 2),
                line(3, "127.0.0.1".parse().unwrap(), 124, 0, 3),
            ]
            .join("\n"),
        );
        let ours = "127.0.0.1:123".parse().unwrap();
        let c: Vec<u64> = conflicts(ours, &t, &[2]).iter().map(|e| e.inode).collect();
        assert_eq!(c, vec![1]);
        assert!(conflicts(ours, &t, &[1, 2]).is_empty());
    }

    #[test]
    fn finds_the_owner_of_our_own_socket() {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let inode = socket_inode(s.as_raw_fd()).expect("inode of our socket");
        let t = read_udp_table().unwrap();
        let e = t
            .iter()
            .find(|e| e.inode == inode)
            .expect("our socket in /proc/net/udp");
        assert_eq!(e.local, s.local_addr().unwrap());
        assert_eq!(socket_owner(inode).map(|(pid, _)| pid), Some(std::process::id()));
        let err = check_unshared(e.local, &[]).unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        assert!(check_unshared(e.local, &[inode]).is_ok());
    }

    #[test]
    fn a_second_lock_is_refused_with_the_holders_pid() {
        let dir = std::env::temp_dir().join(format!("gnomon-lock-{}", std::process::id()));
        let control = dir.join("sub/control.sock");
        let first = InstanceLock::acquire(&control).unwrap();
        assert_eq!(first.path, dir.join("sub/control.sock.lock"));
        // flock locks belong to the open file, so a second open in the same process conflicts.
        let e = InstanceLock::acquire(&control).unwrap_err().to_string();
        assert!(e.contains(&format!("gnomon pid {}", std::process::id())), "{e}");
        drop(first);
        InstanceLock::acquire(&control).expect("free again once the holder is gone");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
