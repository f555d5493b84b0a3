//! The I/O layer of the XDP path: raw `bpf()` calls to create the maps, load the assembled
//! program and attach it with a `bpf_link`. The only `unsafe` of `xdp`.
//!
//! A `bpf_link` (kernel 5.9+) is owned by its fd: when the process exits, even by SIGKILL, the
//! kernel closes the fd and detaches the program, so a crash leaves no stale program behind and
//! the next start attaches afresh. An interface that already has an XDP program attached by other
//! means (netlink, `xdp-loader`) refuses the link with EBUSY/EEXIST: that program is not ours to
//! replace.

use super::frame::{COUNTERS, Target};
use super::program::{self, Insn};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;

/// How the program is attached (XDP_FLAGS_* of linux/if_link.h).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Whatever the driver offers (native if it can).
    Any,
    /// Generic XDP, after the skb is built: works everywhere, saves little.
    Skb,
    /// In the driver (veth, virtio_net, most NIC drivers).
    Native,
}

impl Mode {
    fn flags(self) -> u32 {
        match self {
            Mode::Any => 0,
            Mode::Skb => 1 << 1,
            Mode::Native => 1 << 2,
        }
    }
}

#[repr(C)]
#[derive(Default)]
struct MapCreate {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
}

#[repr(C)]
#[derive(Default)]
struct MapElem {
    map_fd: u32,
    pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_ifindex: u32,
    attach_type: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRun {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

/// `bpf(cmd, attr)`: returns the non-negative result (an fd for the creating commands).
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<i32> {
    // SAFETY: `attr` is a live, initialised `repr(C)` prefix of `union bpf_attr` for `cmd`, and
    // its size is passed, so the kernel reads and writes only inside it; the user pointers inside
    // it point at buffers that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i32)
    }
}

fn fd_result(r: io::Result<i32>) -> io::Result<OwnedFd> {
    // SAFETY: a successful creating bpf() command returns a new fd that nothing else owns.
    r.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

fn name16(name: &str) -> [u8; 16] {
    let mut n = [0u8; 16];
    let b = name.as_bytes();
    let len = b.len().min(15);
    n[..len].copy_from_slice(&b[..len]);
    n
}

fn map_create(map_type: u32, value_size: u32, max_entries: u32, name: &str) -> io::Result<OwnedFd> {
    let mut a = MapCreate {
        map_type,
        key_size: 4,
        value_size,
        max_entries,
        map_name: name16(name),
        ..Default::default()
    };
    fd_result(bpf(BPF_MAP_CREATE, &mut a))
}

/// Number of possible CPUs: a per-CPU map's value has one slot per possible CPU.
fn possible_cpus() -> io::Result<usize> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    let mut n = 0;
    for part in s.trim().split(',') {
        let mut ends = part.split('-').map(|x| x.parse::<usize>());
        let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("cpu list `{s}`"));
        let lo = ends.next().ok_or_else(bad)?.map_err(|_| bad())?;
        let hi = match ends.next() {
            Some(h) => h.map_err(|_| bad())?,
            None => lo,
        };
        n = n.max(hi + 1);
    }
    Ok(n)
}

/// Why loading failed: the errno and, for a verifier refusal, its log.
#[derive(Debug)]
pub struct LoadError {
    pub error: io::Error,
    pub log: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loading the XDP program: {}", self.error)?;
        if let Some(last) = self.log.lines().rev().find(|l| !l.trim().is_empty()) {
            write!(f, " (verifier: {last})")?;
        }
        Ok(())
    }
}

impl std::error::Error for LoadError {}

impl From<io::Error> for LoadError {
    fn from(error: io::Error) -> Self {
        LoadError {
            error,
            log: String::new(),
        }
    }
}

/// Loads an XDP program; on a refusal, loads it again with the verifier's log, only to say why.
fn prog_load(insns: &[Insn], name: &str) -> Result<OwnedFd, LoadError> {
    let license = CString::new("GPL").unwrap();
    let mut log = vec![0u8; 1 << 16];
    let mut a = ProgLoad {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name16(name),
        expected_attach_type: BPF_XDP,
        ..Default::default()
    };
    match fd_result(bpf(BPF_PROG_LOAD, &mut a)) {
        Ok(fd) => Ok(fd),
        Err(error) => {
            a.log_level = 1;
            a.log_size = log.len() as u32;
            a.log_buf = log.as_mut_ptr() as u64;
            let _ = fd_result(bpf(BPF_PROG_LOAD, &mut a));
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            Err(LoadError {
                error,
                log: String::from_utf8_lossy(&log[..end]).into_owned(),
            })
        }
    }
}

/// Attaches `prog` to the interface `ifindex` (of the calling thread's network namespace) until
/// the returned link is dropped or the process ends.
fn link(prog: &OwnedFd, ifindex: u32, mode: Mode) -> io::Result<Link> {
    let mut a = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_XDP,
        flags: mode.flags(),
    };
    Ok(Link {
        _fd: fd_result(bpf(BPF_LINK_CREATE, &mut a))?,
    })
}

/// A loaded [`program::assemble_redirect`]: every frame on to another interface.
pub struct Redirect {
    prog: OwnedFd,
}

impl Redirect {
    pub fn load(to_ifindex: u32) -> Result<Redirect, LoadError> {
        Ok(Redirect {
            prog: prog_load(&program::assemble_redirect(to_ifindex), "gnomon_redirect")?,
        })
    }

    /// As [`Program::attach`].
    pub fn attach(&self, ifindex: u32, mode: Mode) -> io::Result<Link> {
        link(&self.prog, ifindex, mode)
    }

    /// As [`Program::test_run`].
    pub fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        test_run(&self.prog, frame)
    }
}

/// The loaded program and its maps; not attached anywhere yet.
pub struct Program {
    prog: OwnedFd,
    xsks: OwnedFd,
    counters: OwnedFd,
    cpus: usize,
}

/// An attachment of the program to one interface; dropping it detaches the program.
pub struct Link {
    _fd: OwnedFd,
}

impl Program {
    /// Creates the maps (an XSKMAP with `queues` entries, the per-CPU counters) and loads the
    /// program for `target`.
    pub fn load(target: &Target, queues: u32) -> Result<Program, LoadError> {
        let xsks = map_create(BPF_MAP_TYPE_XSKMAP, 4, queues.max(1), "gnomon_xsks")?;
        let counters = map_create(BPF_MAP_TYPE_PERCPU_ARRAY, 8, COUNTERS, "gnomon_counts")?;
        let insns: Vec<Insn> = program::assemble(target, xsks.as_raw_fd(), counters.as_raw_fd());
        Ok(Program {
            prog: prog_load(&insns, "gnomon_ntp")?,
            xsks,
            counters,
            cpus: possible_cpus()?,
        })
    }

    /// Attaches the program to the interface `ifindex` (of the calling thread's network
    /// namespace) until the returned link is dropped or the process ends.
    pub fn attach(&self, ifindex: u32, mode: Mode) -> io::Result<Link> {
        link(&self.prog, ifindex, mode)
    }

    /// Hands RX queue `queue`'s matching frames to the AF_XDP socket `xsk`.
    pub fn bind_queue(&self, queue: u32, xsk: i32) -> io::Result<()> {
        let (key, value) = (queue, xsk as u32);
        let mut a = MapElem {
            map_fd: self.xsks.as_raw_fd() as u32,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
    }

    /// The program's counters summed over the CPUs, indexed by `COUNT_*` / [`super::frame::Pass`].
    pub fn counters(&self) -> io::Result<[u64; COUNTERS as usize]> {
        let mut out = [0u64; COUNTERS as usize];
        let mut per_cpu = vec![0u64; self.cpus];
        for (key, total) in out.iter_mut().enumerate() {
            let key = key as u32;
            let mut a = MapElem {
                map_fd: self.counters.as_raw_fd() as u32,
                key: &key as *const u32 as u64,
                value: per_cpu.as_mut_ptr() as u64,
                ..Default::default()
            };
            bpf(BPF_MAP_LOOKUP_ELEM, &mut a)?;
            *total = per_cpu.iter().sum();
        }
        Ok(out)
    }

    /// Runs the program once on `frame` in the kernel without any interface
    /// (BPF_PROG_TEST_RUN) and returns its verdict; the counters count it as usual.
    pub fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        test_run(&self.prog, frame)
    }
}

fn test_run(prog: &OwnedFd, frame: &[u8]) -> io::Result<u32> {
    let mut a = TestRun {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: 1,
        ..Default::default()
    };
    bpf(BPF_PROG_TEST_RUN, &mut a)?;
    Ok(a.retval)
}
