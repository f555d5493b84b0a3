//! Dropping root after binding: `user` and `group` from the config, looked up in the passwd and
//! group databases, and the capabilities the clock mode needs (none in software mode,
//! CAP_SYS_TIME in system mode), as chronyd does with its `-u` user.
//!
//! The drop happens while the process has a single thread. setuid(2) through glibc is applied
//! to every thread (glibc signals each one), but capset(2) and prctl(2) act on the calling
//! thread only, and a thread started earlier would keep root's capabilities. So the daemon binds
//! everything first, drops here, and only then starts the sync, worker and control threads,
//! which inherit the reduced credentials. [`drop_to`] refuses to run with more than one thread.

use std::ffi::{CStr, CString};
use std::io;

/// Capability numbers (linux/capability.h).
pub const CAP_NET_BIND_SERVICE: u32 = 10;
pub const CAP_SYS_TIME: u32 = 25;

/// A set of capabilities as a bit mask (bit N = capability N).
pub type CapMask = u64;

/// The capabilities the server keeps for its clock mode: the kernel clock is steered only in
/// system mode.
pub fn capabilities_for(mode: crate::sync::ClockMode) -> CapMask {
    match mode {
        crate::sync::ClockMode::Software => 0,
        crate::sync::ClockMode::System => 1 << CAP_SYS_TIME,
    }
}

/// Names for the capabilities this module keeps, for log lines.
pub fn describe(mask: CapMask) -> String {
    if mask == 0 {
        return "no capabilities".to_string();
    }
    let names: Vec<String> = (0..64)
        .filter(|c| mask & (1 << c) != 0)
        .map(|c| match c {
            CAP_NET_BIND_SERVICE => "CAP_NET_BIND_SERVICE".to_string(),
            CAP_SYS_TIME => "CAP_SYS_TIME".to_string(),
            c => format!("capability {c}"),
        })
        .collect();
    names.join(", ")
}

/// Who the server becomes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub user: String,
    pub uid: u32,
    pub group: String,
    pub gid: u32,
}

/// A NUL-free copy of a name for the C lookups.
fn c_name(what: &str, name: &str) -> Result<CString, String> {
    CString::new(name).map_err(|_| format!("{what} `{name}` contains a NUL byte"))
}

/// Runs a `get*_r` lookup with a buffer that grows on ERANGE; `call` returns the errno and
/// whether an entry was found.
fn with_buffer(mut call: impl FnMut(&mut [libc::c_char]) -> (libc::c_int, bool)) -> io::Result<bool> {
    let mut buf = vec![0 as libc::c_char; 1024];
    loop {
        match call(&mut buf) {
            (0, found) => return Ok(found),
            (libc::ERANGE, _) if buf.len() < 1 << 20 => buf.resize(buf.len() * 2, 0),
            (e, _) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
}

/// The uid and primary gid of `user`.
fn lookup_user(user: &str) -> Result<(u32, u32), String> {
    let name = c_name("user", user)?;
    // SAFETY: passwd is plain data; all-zero is a valid (empty) value that getpwnam_r fills in.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let found = with_buffer(|buf| {
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: the name is NUL-terminated, `pw` and
        // `result` are writable, and `buf` is writable for `buf.len()` bytes.
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut result) };
        (rc, !result.is_null())
    })
    .map_err(|e| format!("cannot look up user `{user}`: {e}"))?;
    if !found {
        return Err(format!(
            "user `{user}` does not exist (no entry in the passwd database)"
        ));
    }
    Ok((pw.pw_uid, pw.pw_gid))
}

/// The gid of `group`.
fn lookup_group(group: &str) -> Result<u32, String> {
    let name = c_name("group", group)?;
    // SAFETY: group is plain data; all-zero is a valid (empty) value that getgrnam_r fills in.
    let mut gr: libc::group = unsafe { std::mem::zeroed() };
    let found = with_buffer(|buf| {
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in lookup_user.
        let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut gr, buf.as_mut_ptr(), buf.len(), &mut result) };
        (rc, !result.is_null())
    })
    .map_err(|e| format!("cannot look up group `{group}`: {e}"))?;
    if !found {
        return Err(format!(
            "group `{group}` does not exist (no entry in the group database)"
        ));
    }
    Ok(gr.gr_gid)
}

/// The name of group `gid`, or the number when it has none.
fn group_name(gid: u32) -> String {
    let mut name = None;
    let _ = with_buffer(|buf| {
        // SAFETY: as in lookup_user.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: as in lookup_user.
        let rc = unsafe { libc::getgrgid_r(gid, &mut gr, buf.as_mut_ptr(), buf.len(), &mut result) };
        if rc == 0 && !result.is_null() && !gr.gr_name.is_null() {
            // SAFETY: on success gr_name points at a NUL-terminated string in `buf`, copied out
            // before the buffer goes.
            name = Some(unsafe { CStr::from_ptr(gr.gr_name) }.to_string_lossy().into_owned());
        }
        (rc, !result.is_null())
    });
    name.unwrap_or_else(|| gid.to_string())
}

/// Looks up `user` and `group` (default: the user's primary group).
pub fn lookup(user: &str, group: Option<&str>) -> Result<Account, String> {
    let (uid, primary) = lookup_user(user)?;
    let (group, gid) = match group {
        Some(g) => (g.to_string(), lookup_group(g)?),
        None => (group_name(primary), primary),
    };
    Ok(Account {
        user: user.to_string(),
        uid,
        group,
        gid,
    })
}

/// The effective uid of the process.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The effective gid of the process.
pub fn egid() -> u32 {
    // SAFETY: getegid has no preconditions and cannot fail.
    unsafe { libc::getegid() }
}

fn check(what: &str, rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    Err(io::Error::new(e.kind(), format!("{what}: {e}")))
}

fn prctl(what: &str, option: libc::c_int, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the prctl options used here take integer arguments only and touch no memory.
    check(what, unsafe {
        libc::prctl(option, arg, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong)
    })
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets as two 32-bit words.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's (effective, permitted, inheritable) capabilities.
pub fn capget() -> io::Result<(CapMask, CapMask, CapMask)> {
    let mut hdr = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 reads a header and writes two CapData, both valid and writable here.
    check("capget", unsafe {
        libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) as libc::c_int
    })?;
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | (u64::from(f(&data[1])) << 32);
    Ok((join(|d| d.effective), join(|d| d.permitted), join(|d| d.inheritable)))
}

/// Sets the calling thread's effective and permitted capabilities to `keep`, inheritable none.
fn capset(keep: CapMask) -> io::Result<()> {
    let mut hdr = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |i: u32| (keep >> (32 * i)) as u32;
    let data = [
        CapData {
            effective: word(0),
            permitted: word(0),
            inheritable: 0,
        },
        CapData {
            effective: word(1),
            permitted: word(1),
            inheritable: 0,
        },
    ];
    // SAFETY: version 3 reads a header and two CapData, both valid for the call.
    check("capset", unsafe {
        libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) as libc::c_int
    })
}

/// The number of threads of this process, from /proc/self/status.
fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads: line in /proc/self/status"))
}

/// The highest capability number this kernel knows.
fn last_capability() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63)
}

/// Becomes `account` for good, keeping exactly the capabilities in `keep`: bounding set reduced
/// to `keep`, no supplementary groups, real/effective/saved ids all the account's, no ambient or
/// inheritable capabilities, and no_new_privs. Verified afterwards; any failure is an error (the
/// caller exits rather than serve with more privilege than it asked for).
pub fn drop_to(account: &Account, keep: CapMask) -> io::Result<()> {
    let threads = thread_count()?;
    if threads != 1 {
        return Err(io::Error::other(format!(
            "dropping privileges with {threads} threads running: capabilities are per thread, so \
             the drop must come before any thread starts"
        )));
    }
    // Needs CAP_SETPCAP, so before the uid changes. Capabilities above what the kernel knows
    // are refused with EINVAL and are not there to drop.
    for cap in 0..=last_capability() {
        if keep & (1 << cap) == 0 {
            prctl("drop from the bounding set", libc::PR_CAPBSET_DROP, cap.into())?;
        }
    }
    // Without it, setresuid from root to another user empties the permitted set.
    prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, u64::from(keep != 0))?;
    // SAFETY: a count of 0 with a null list is the documented way to clear the groups.
    check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    let (uid, gid) = (account.uid, account.gid);
    // SAFETY: plain integer arguments; glibc applies the change to every thread (there is one).
    check("setresgid", unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: as above.
    check("setresuid", unsafe { libc::setresuid(uid, uid, uid) })?;
    capset(keep)?;
    prctl("PR_SET_KEEPCAPS", libc::PR_SET_KEEPCAPS, 0)?;
    prctl(
        "clear the ambient set",
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
    )?;
    prctl("PR_SET_NO_NEW_PRIVS", libc::PR_SET_NO_NEW_PRIVS, 1)?;
    verify(account, keep)
}

/// Checks that the drop took: every id is the account's, no groups, the capability sets are
/// `keep`, and root cannot be had back.
fn verify(account: &Account, keep: CapMask) -> io::Result<()> {
    let (mut r, mut e, mut s) = (0, 0, 0);
    // SAFETY: the three pointers are valid and writable for the call.
    check("getresuid", unsafe { libc::getresuid(&mut r, &mut e, &mut s) })?;
    let uids_ok = [r, e, s].iter().all(|&u| u == account.uid);
    // SAFETY: as above.
    check("getresgid", unsafe { libc::getresgid(&mut r, &mut e, &mut s) })?;
    let gids_ok = [r, e, s].iter().all(|&g| g == account.gid);
    // SAFETY: a size of 0 only asks for the count and writes nothing.
    let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    let (eff, prm, inh) = capget()?;
    let uid0_back = account.uid != 0 && {
        // SAFETY: plain integer argument; it must fail here.
        unsafe { libc::setuid(0) == 0 }
    };
    if !uids_ok || !gids_ok || groups != 0 || eff != keep || prm != keep || inh != 0 || uid0_back {
        return Err(io::Error::other(format!(
            "privilege drop to {}:{} did not take (uids ok {uids_ok}, gids ok {gids_ok}, {groups} \
             groups, capabilities effective {eff:#x} permitted {prm:#x} inheritable {inh:#x}, \
             setuid(0) possible {uid0_back})",
            account.user, account.group
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sync::ClockMode;

    #[test]
    fn software_mode_keeps_nothing_and_system_mode_only_the_clock() {
        assert_eq!(capabilities_for(ClockMode::Software), 0);
        assert_eq!(capabilities_for(ClockMode::System), 1 << 25);
        assert_eq!(describe(0), "no capabilities");
        assert_eq!(describe(capabilities_for(ClockMode::System)), "CAP_SYS_TIME");
    }

    #[test]
    fn looks_up_users_and_groups() {
        let root = lookup("root", None).expect("root exists everywhere");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert_eq!(root.group, "root");
        let e = lookup("no-such-user-gnomon", None).unwrap_err();
        assert!(e.contains("user `no-such-user-gnomon` does not exist"), "{e}");
        let e = lookup("root", Some("no-such-group-gnomon")).unwrap_err();
        assert!(e.contains("group `no-such-group-gnomon` does not exist"), "{e}");
        assert!(lookup("ro\0ot", None).unwrap_err().contains("NUL"));
    }

    /// System mode's drop, which the end-to-end tests cannot run (they never steer the clock):
    /// in a forked child, which has a single thread whatever the test harness runs.
    #[test]
    fn a_drop_for_system_mode_keeps_exactly_cap_sys_time() {
        if euid() != 0 {
            eprintln!("SKIPPED: needs root");
            return;
        }
        let Ok(nobody) = lookup("nobody", None) else {
            eprintln!("SKIPPED: no user nobody");
            return;
        };
        let keep = capabilities_for(ClockMode::System);
        // SAFETY: the child only makes the drop's system calls and reads /proc (glibc keeps
        // malloc usable after fork), then leaves with _exit, never returning into the harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = match drop_to(&nobody, keep) {
                Err(_) => 1,
                Ok(()) => {
                    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                    let bnd = status.lines().find_map(|l| l.strip_prefix("CapBnd:")).map(str::trim);
                    let ok = capget().is_ok_and(|c| c == (keep, keep, 0)) && bnd == Some("0000000002000000");
                    if ok { 0 } else { 2 }
                }
            };
            // SAFETY: ends the child at once, without unwinding or running the parent's atexit.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: `status` is writable; `pid` is our child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        let code = libc::WEXITSTATUS(status);
        assert_eq!(code, 0, "1: the drop failed, 2: other capabilities than CAP_SYS_TIME");
    }

    #[test]
    fn capget_reads_this_thread() {
        let (eff, prm, _) = capget().unwrap();
        assert_eq!(eff & !prm, 0, "effective is always within permitted");
    }
}
