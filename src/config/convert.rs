//! `gnomon convert-config`: an ntpd/NTPsec `ntp.conf` or a chrony `chrony.conf` turned into a
//! gnomon.toml, with what could not be carried over listed line by line, and why. Pure: text and
//! a file name in, TOML text and notes out; the caller reads and writes the files.
//!
//! The semantics carried over are each daemon's own, not what the keywords suggest: ntpd ORs the
//! flags of repeated `restrict` lines for one address into one entry, serves everyone unless told
//! otherwise, and serves its LOCAL clock one stratum above the fudged one; chrony serves nobody
//! without an `allow`, drops denied clients silently, rate limits only with `ratelimit` (whose
//! interval and leak are powers of two), and lets a later, wider `allow`/`deny` overwrite an
//! earlier narrower one that sits in the same 4-bit table level of its address tree.

use crate::policy::{Action, Prefix};
use crate::sync::{MAX_POLL, MAX_POOL_SOURCES, MIN_POLL};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write};
use std::net::IpAddr;
use std::str::FromStr;

/// Which daemon's config file it is.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Format {
    /// ntpd's or NTPsec's `ntp.conf`.
    Ntp,
    /// chrony's `chrony.conf`.
    Chrony,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Ntp => "ntp.conf (ntpd, NTPsec)",
            Format::Chrony => "chrony.conf",
        }
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "ntp" | "ntpd" | "ntpsec" => Ok(Format::Ntp),
            "chrony" | "chronyd" => Ok(Format::Chrony),
            _ => Err(format!("unknown format `{s}` (expected ntp or chrony)")),
        }
    }
}

/// One line (or part of one) that the output does not carry, and why.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Note {
    pub line: usize,
    /// The directive as written (whitespace normalised).
    pub directive: String,
    pub why: String,
}

/// The result of a conversion.
#[derive(Clone, Debug)]
pub struct Converted {
    pub format: Format,
    /// A gnomon.toml that `Config::parse` accepts.
    pub toml: String,
    /// In line order.
    pub notes: Vec<Note>,
}

/// Neither format could be recognised.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Undetected {
    pub file: String,
}

impl fmt::Display for Undetected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: cannot tell an ntp.conf from a chrony.conf by its keywords: give --from ntp or --from chrony",
            self.file
        )
    }
}

impl std::error::Error for Undetected {}

/// Lines of the notes as `file:line: directive: why`.
pub fn render_notes(file: &str, notes: &[Note]) -> String {
    let mut out = String::new();
    for n in notes {
        let _ = writeln!(out, "{file}:{}: `{}`: {}", n.line, n.directive, n.why);
    }
    out
}

/// Directives only ntpd or NTPsec know.
const NTP_ONLY: &[&str] = &[
    "restrict",
    "fudge",
    "includefile",
    "keys",
    "trustedkey",
    "requestkey",
    "controlkey",
    "statsdir",
    "statistics",
    "filegen",
    "tos",
    "tinker",
    "discard",
    "logfile",
    "logconfig",
    "leapfile",
    "enable",
    "disable",
    "broadcastclient",
    "manycastserver",
    "manycastclient",
    "multicastclient",
    "interface",
    "nic",
    "crypto",
    "setvar",
    "nts",
    "mru",
    "unpeer",
    "unrestrict",
    "delrestrict",
    "phone",
    "revoke",
    "trap",
    "saveconfigdir",
];

/// Directives only chrony knows.
const CHRONY_ONLY: &[&str] = &[
    "allow",
    "deny",
    "ratelimit",
    "makestep",
    "rtcsync",
    "local",
    "sourcedir",
    "confdir",
    "include",
    "keyfile",
    "logdir",
    "log",
    "leapsectz",
    "leapseclist",
    "ntsdumpdir",
    "dumpdir",
    "maxupdateskew",
    "bindaddress",
    "bindcmdaddress",
    "cmdallow",
    "cmddeny",
    "cmdport",
    "hwtimestamp",
    "initstepslew",
    "smoothtime",
    "clientloglimit",
    "noclientlog",
    "rtcfile",
    "rtconutc",
    "rtcdevice",
    "rtcautotrim",
    "maxdistance",
    "maxjitter",
    "minsources",
    "combinelimit",
    "maxchange",
    "maxslewrate",
    "maxclockerror",
    "reselectdist",
    "stratumweight",
    "lock_all",
    "sched_priority",
    "user",
    "leapsecmode",
    "manual",
    "acquisitionport",
    "port",
    "ntsserverkey",
    "ntsservercert",
    "ntsratelimit",
    "ntstrustedcerts",
    "authselectmode",
    "refclock",
];

/// Guesses the format from the directives (and, on a tie, the file name).
pub fn detect(text: &str, file: &str) -> Option<Format> {
    let (mut ntp, mut chrony) = (0usize, 0usize);
    for line in text.lines() {
        let words = split_words(line, Format::Ntp);
        let Some(first) = words.first() else { continue };
        let first = first.to_ascii_lowercase();
        // NTPsec has `refclock` too; ntpd's reference clocks are 127.127.t.u addresses.
        if NTP_ONLY.contains(&first.as_str()) || words.get(1).is_some_and(|a| a.starts_with("127.127.")) {
            ntp += 1;
        } else if CHRONY_ONLY.contains(&first.as_str()) {
            chrony += 1;
        }
    }
    let name = file.rsplit('/').next().unwrap_or(file).to_ascii_lowercase();
    match ntp.cmp(&chrony) {
        std::cmp::Ordering::Greater => Some(Format::Ntp),
        std::cmp::Ordering::Less => Some(Format::Chrony),
        _ if name.contains("chrony") => Some(Format::Chrony),
        _ if name.contains("ntp") => Some(Format::Ntp),
        _ => None,
    }
}

/// Converts `text` (named `file` in the output) from `format`, or from the detected format.
pub fn convert(text: &str, file: &str, format: Option<Format>) -> Result<Converted, Undetected> {
    let format = match format.or_else(|| detect(text, file)) {
        Some(f) => f,
        None => return Err(Undetected { file: file.to_string() }),
    };
    let mut out = Out::default();
    match format {
        Format::Ntp => ntp(text, &mut out),
        Format::Chrony => chrony(text, &mut out),
    }
    // `restrict default` is two entries (IPv4, IPv6) of one line: say things about it once.
    let mut seen = std::collections::HashSet::new();
    out.notes.retain(|n| seen.insert(n.clone()));
    out.notes.sort_by_key(|n| n.line);
    Ok(Converted {
        format,
        toml: out.render(file, format),
        notes: out.notes,
    })
}

/// Words of a line without its comment. ntpd starts a comment at any `#`; chrony only at the
/// start of a line, with any of `#`, `%`, `!` or `;`.
fn split_words(line: &str, format: Format) -> Vec<&str> {
    let line = line.trim();
    let line = match format {
        Format::Ntp => line.split('#').next().unwrap_or(""),
        Format::Chrony if line.starts_with(['#', '%', '!', ';']) => "",
        Format::Chrony => line,
    };
    line.split_whitespace().collect()
}

#[derive(Clone, Debug, Default)]
struct Upstream {
    pool: bool,
    address: String,
    port: Option<u16>,
    iburst: bool,
    prefer: bool,
    trust: bool,
    minpoll: Option<i8>,
    maxpoll: Option<i8>,
    max_sources: Option<u8>,
    /// `file:line`-less origin: the line number and the text.
    line: usize,
    text: String,
}

#[derive(Clone, Debug)]
struct OutRule {
    address: String,
    action: Action,
    line: usize,
    text: String,
}

#[derive(Default)]
struct Out {
    listen: Vec<String>,
    listen_from: Option<usize>,
    /// Served stratum, and where it came from.
    local_stratum: Option<(u8, String)>,
    upstreams: Vec<Upstream>,
    default: Option<(Action, String)>,
    rules: Vec<OutRule>,
    /// `[rate_limit]` keys in output order: key, TOML value, origin.
    rate_limit: Vec<(&'static str, String, String)>,
    /// chrony's `makestep THRESHOLD LIMIT`, and the line it came from.
    makestep: Option<(f64, i64, usize, String)>,
    /// ntpd's `tinker panic N`: the largest correction accepted (s; 0: any), and its line.
    panic: Option<(f64, usize, String)>,
    /// `[leap]` keys in output order: key, TOML value, origin.
    leap: Vec<(&'static str, String, String)>,
    notes: Vec<Note>,
}

impl Out {
    fn note(&mut self, line: usize, words: &[&str], why: impl Into<String>) {
        self.notes.push(Note {
            line,
            directive: words.join(" "),
            why: why.into(),
        });
    }

    fn leap(&mut self, key: &'static str, value: String, origin: String) {
        self.leap.retain(|(k, _, _)| *k != key);
        self.leap.push((key, value, origin));
    }

    fn rate(&mut self, key: &'static str, value: String, origin: String) {
        self.rate_limit.retain(|(k, _, _)| *k != key);
        self.rate_limit.push((key, value, origin));
    }

    fn render(&self, file: &str, format: Format) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "# gnomon.toml converted by `gnomon convert-config` from {file}, read as {}.",
            format.name()
        );
        t.push_str("# Each entry names the line it came from; what could not be carried over is listed at the end.\n");
        t.push_str("# Check it with `gnomon check-config FILE`.\n\n");
        if !self.listen.is_empty() {
            let list: Vec<String> = self.listen.iter().map(|l| quote(l)).collect();
            if let Some(l) = self.listen_from {
                let _ = writeln!(t, "# line {l}: port / bindaddress");
            }
            let _ = writeln!(t, "listen = [{}]\n", list.join(", "));
        }
        if let Some((s, origin)) = &self.local_stratum {
            let _ = writeln!(t, "# {origin}");
            if self.upstreams.is_empty() {
                let _ = writeln!(t, "local_stratum = {s}\n");
            } else {
                // gnomon serves its own clock only with no upstream; see the notes.
                let _ = writeln!(
                    t,
                    "# local_stratum = {s}   # used only when no upstream is configured\n"
                );
            }
        }
        if !self.upstreams.is_empty() {
            t.push_str(
                "# Both daemons steer the kernel clock; so does gnomon in system mode (needs CAP_SYS_TIME,\n\
                 # which the systemd unit grants). \"software\" leaves the kernel clock alone instead.\n",
            );
            t.push_str("clock_mode = \"system\"\n\n");
        }
        for u in &self.upstreams {
            let _ = writeln!(t, "{}", if u.pool { "[[pool]]" } else { "[[upstream]]" });
            let _ = writeln!(t, "# line {}: {}", u.line, u.text);
            let _ = writeln!(t, "address = {}", quote(&u.address));
            if let Some(p) = u.port {
                let _ = writeln!(t, "port = {p}");
            }
            for (key, on) in [("iburst", u.iburst), ("prefer", u.prefer), ("trust", u.trust)] {
                if on {
                    let _ = writeln!(t, "{key} = true");
                }
            }
            if let Some(p) = u.minpoll {
                let _ = writeln!(t, "minpoll = {p}");
            }
            if let Some(p) = u.maxpoll {
                let _ = writeln!(t, "maxpoll = {p}");
            }
            if let Some(m) = u.max_sources {
                let _ = writeln!(t, "max_sources = {m}");
            }
            t.push('\n');
        }
        if let Some((action, origin)) = &self.default {
            let _ = writeln!(
                t,
                "[[restrict]]\n# {origin}\naddress = \"default\"\naction = \"{action}\"\n"
            );
        }
        for r in &self.rules {
            let _ = writeln!(
                t,
                "[[restrict]]\n# line {}: {}\naddress = {}\naction = \"{}\"\n",
                r.line,
                r.text,
                quote(&r.address),
                r.action
            );
        }
        if !self.rate_limit.is_empty() {
            t.push_str("[rate_limit]\n");
            for (k, v, origin) in &self.rate_limit {
                let _ = writeln!(t, "{k} = {v}   # {origin}");
            }
            t.push('\n');
        }
        if self.makestep.is_some() || self.panic.is_some() {
            t.push_str("[makestep]\n");
            if let Some((threshold, limit, line, text)) = &self.makestep {
                let _ = writeln!(t, "# line {line}: {text}\nthreshold = {threshold:?}\nlimit = {limit}");
            }
            if let Some((panic, line, text)) = &self.panic {
                let _ = writeln!(t, "# line {line}: {text}\nmax_correction = {panic:?}");
            }
            t.push('\n');
        }
        if !self.leap.is_empty() {
            t.push_str("[leap]\n");
            for (k, v, origin) in &self.leap {
                let _ = writeln!(t, "{k} = {v}   # {origin}");
            }
            t.push('\n');
        }
        if !self.notes.is_empty() {
            t.push_str("# Not carried over:\n");
            for n in &self.notes {
                let _ = writeln!(t, "#   line {}: {}: {}", n.line, n.directive, n.why);
            }
        }
        t
    }
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

const WHY_DRIFT: &str = "gnomon keeps no drift file: the frequency is estimated afresh at each start";
const WHY_LOG: &str = "gnomon logs to stderr (the journal under systemd): there is no log file to set";
const WHY_STATS: &str =
    "gnomon writes no statistics files: `gnomon stats`, `gnomon sources` and `gnomon status` show the same";
const WHY_INCLUDE: &str = "included files are not read: convert each of them too and merge the results";
const WHY_KEYS: &str =
    "gnomon has no symmetric-key authentication and no remote control (ntpq/ntpdc/chronyc): keys are not used";
const WHY_NTS: &str = "gnomon has no Autokey, and its NTS is set in its own [nts] table (certificate, key) \
                       and with `nts = true` on an [[upstream]]: not carried over";
const WHY_LEAP: &str = "gnomon takes a leap second from its upstreams (the majority of the selected sources) or \
                        from a leap-seconds list ([leap] list); it has no time-zone database setting";
const WHY_RTC: &str = "gnomon never touches the real-time clock";
const WHY_MCAST: &str = "gnomon does no broadcast, multicast or manycast: unicast client/server only";
const WHY_TUNE: &str = "the selection and discipline constants are fixed in gnomon (a strict majority of sources, \
                        chrony's maxdistance of 3 s)";
const WHY_CMD: &str =
    "gnomon's control interface is a local Unix socket (`control_socket`, mode 0600), never the network";
const WHY_PROCESS: &str = "the systemd unit sets the user, privileges and pid tracking; workers are pinned with `cpus`";
const WHY_REFCLOCK: &str = "gnomon has no reference clock drivers: its time comes from NTP upstreams only";
const WHY_PEER: &str = "symmetric (peer) mode is not supported: polled as an [[upstream]] server instead, so the \
                        peer must serve time to this host";
const WHY_LOCAL_BESIDE: &str = "the LOCAL clock as a fallback beside upstreams is not carried over: gnomon serves its own \
                                clock only when no upstream is configured; with upstreams it holds over, then answers \
                                unsynchronised (LI 3), so it is left commented out";

/// Why a directive that has no mapping is left out, for directives both daemons share.
fn common_why(word: &str) -> Option<&'static str> {
    Some(match word {
        "driftfile" => WHY_DRIFT,
        "pidfile" | "user" | "lock_all" | "sched_priority" => WHY_PROCESS,
        "broadcast" | "broadcastclient" | "manycastserver" | "manycastclient" | "multicastclient" => WHY_MCAST,
        "refclock" => WHY_REFCLOCK,
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// ntp.conf

/// ntpd's `restrict` flags gnomon has nothing to do with: they govern control (mode 6/7), peer
/// and trap traffic, which gnomon never answers.
const NTP_HARMLESS_FLAGS: &[&str] = &[
    "nomodify",
    "notrap",
    "nopeer",
    "noquery",
    "noepeer",
    "lowpriotrap",
    "nomrulist",
    "mssntp",
];

#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum RestrictKey {
    Default4,
    Default6,
    Prefix(String),
}

struct RestrictEntry {
    address: String,
    flags: BTreeSet<String>,
    line: usize,
    text: String,
}

fn ntp(text: &str, out: &mut Out) {
    let mut restricts: BTreeMap<RestrictKey, RestrictEntry> = BTreeMap::new();
    let mut order: Vec<RestrictKey> = Vec::new();
    // LOCAL clock `server` lines (address, line) and fudge stratum per address.
    let mut local: Vec<(String, usize, String)> = Vec::new();
    let mut fudge: BTreeMap<String, (u8, usize)> = BTreeMap::new();
    let mut discard_interval: Option<(f64, usize)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let words = split_words(raw, Format::Ntp);
        let Some(first) = words.first() else { continue };
        let head = first.to_ascii_lowercase();
        match head.as_str() {
            "server" | "pool" | "peer" => {
                let mut args: Vec<&str> = words[1..].to_vec();
                if args.first().is_some_and(|a| *a == "-4" || *a == "-6") {
                    out.note(
                        line,
                        &words,
                        "the -4/-6 qualifier is not carried over: gnomon uses the addresses the name resolves to",
                    );
                    args.remove(0);
                }
                let Some(addr) = args.first().copied() else {
                    out.note(line, &words, "no address: skipped");
                    continue;
                };
                if let Some(rest) = addr.strip_prefix("127.127.") {
                    let kind = rest.split('.').next().unwrap_or("");
                    if kind == "1" {
                        local.push((addr.to_string(), line, words.join(" ")));
                    } else {
                        out.note(
                            line,
                            &words,
                            format!("reference clock driver type {kind}: {WHY_REFCLOCK}"),
                        );
                    }
                    continue;
                }
                add_upstream(&head, addr, &args[1..], Format::Ntp, line, &words, out);
            }
            "fudge" => {
                let addr = words.get(1).copied().unwrap_or("");
                let mut rest = words.iter().skip(2);
                let mut stratum = None;
                while let Some(w) = rest.next() {
                    if *w == "stratum" {
                        stratum = rest.next().and_then(|s| s.parse::<u8>().ok());
                    }
                }
                match stratum {
                    Some(s) if addr.starts_with("127.127.1.") => {
                        fudge.insert(addr.to_string(), (s, line));
                        let others: Vec<&&str> = words.iter().skip(2).collect();
                        if others.len() > 2 {
                            out.note(line, &words, "only the stratum of the LOCAL clock is carried over");
                        }
                    }
                    _ if addr.starts_with("127.127.1.") => {
                        out.note(line, &words, "only the stratum of the LOCAL clock is carried over")
                    }
                    _ => out.note(line, &words, format!("fudge of a reference clock: {WHY_REFCLOCK}")),
                }
            }
            "restrict" => ntp_restrict(&words, line, out, &mut restricts, &mut order),
            "discard" => {
                let mut rest = words.iter().skip(1);
                let mut other = false;
                while let Some(w) = rest.next() {
                    match (*w, rest.next().and_then(|v| v.parse::<i32>().ok())) {
                        ("average", Some(a)) if (0..=16).contains(&a) => {
                            discard_interval = Some((2f64.powi(a), line));
                        }
                        _ => other = true,
                    }
                }
                if other {
                    out.note(
                        line,
                        &words,
                        "only `average` is carried over (as [rate_limit] interval = 2^average s): gnomon's limiter \
                         has a burst instead of ntpd's `minimum` spacing, and no monitor threshold",
                    );
                }
            }
            "disable" if words.len() == 2 && words[1] == "monitor" => {
                out.note(
                    line,
                    &words,
                    "nothing to carry over: gnomon never answers mode 7 (monlist) requests",
                );
            }
            "enable" | "disable" => out.note(
                line,
                &words,
                "system flags (monitor, kernel, ntp, stats, calibrate...) have no gnomon equivalent",
            ),
            "driftfile" | "pidfile" | "broadcast" | "broadcastclient" | "manycastserver" | "manycastclient"
            | "multicastclient" | "refclock" => {
                out.note(line, &words, common_why(&head).unwrap_or(""));
            }
            "logfile" | "logconfig" => out.note(line, &words, WHY_LOG),
            "statsdir" | "statistics" | "filegen" => out.note(line, &words, WHY_STATS),
            "includefile" => out.note(line, &words, WHY_INCLUDE),
            "keys" | "trustedkey" | "requestkey" | "controlkey" | "revoke" => out.note(line, &words, WHY_KEYS),
            "crypto" | "nts" => out.note(line, &words, WHY_NTS),
            "leapfile" => match words.get(1) {
                Some(path) if words.len() == 2 => out.leap("list", quote(path), format!("line {line}: leapfile")),
                _ => out.note(line, &words, "expected `leapfile PATH`: skipped"),
            },
            "tinker" => {
                let mut it = words.iter().skip(1);
                while let Some(w) = it.next() {
                    let v = it.next().copied().unwrap_or("");
                    match (*w, v.parse::<f64>()) {
                        // ntpd's `panic 0` disables the check, as gnomon's 0 does.
                        ("panic", Ok(p)) if p.is_finite() && p >= 0.0 => out.panic = Some((p, line, words.join(" "))),
                        _ => out.note(line, &words, format!("`tinker {w} {v}`: {WHY_TUNE}")),
                    }
                }
            }
            "tos" => out.note(line, &words, WHY_TUNE),
            "interface" | "nic" => out.note(
                line,
                &words,
                "set `listen` to the addresses to answer on (wildcards answer on every interface)",
            ),
            _ => out.note(line, &words, "no gnomon equivalent"),
        }
    }
    ntp_finish_restricts(out, &restricts, &order, discard_interval);
    // The LOCAL clock: ntpd's default driver stratum is 5, and like any reference it serves one
    // stratum above it.
    if let Some((addr, line, text)) = local.first() {
        let (driver, origin) = match fudge.get(addr) {
            Some((s, fl)) => (*s, format!("lines {line} and {fl}: {text} + fudge stratum {s}")),
            None => (5, format!("line {line}: {text} (driver stratum 5 by default)")),
        };
        let served = driver.saturating_add(1).clamp(1, 15);
        out.local_stratum = Some((served, format!("{origin}: ntpd serves it one stratum higher, {served}")));
        if !out.upstreams.is_empty() {
            out.note(*line, &[text.as_str()], WHY_LOCAL_BESIDE);
        }
        for (_, l, t) in local.iter().skip(1) {
            out.note(
                *l,
                &[t.as_str()],
                "a second LOCAL clock adds nothing: the first one is used",
            );
        }
    }
    for (addr, (_, l)) in &fudge {
        if !local.iter().any(|(a, _, _)| a == addr) {
            out.note(
                *l,
                &["fudge", addr.as_str()],
                "fudge of a LOCAL clock that no `server` line configures",
            );
        }
    }
}

fn ntp_restrict(
    words: &[&str],
    line: usize,
    out: &mut Out,
    restricts: &mut BTreeMap<RestrictKey, RestrictEntry>,
    order: &mut Vec<RestrictKey>,
) {
    let mut args: Vec<&str> = words[1..].to_vec();
    let family = match args.first() {
        Some(&"-4") => Some(4),
        Some(&"-6") => Some(6),
        _ => None,
    };
    if family.is_some() {
        args.remove(0);
    }
    let Some(addr) = args.first().copied() else {
        out.note(line, words, "no address: skipped");
        return;
    };
    let mut flags_at = 1;
    let (keys, address) = if addr == "default" {
        let keys = match family {
            Some(4) => vec![RestrictKey::Default4],
            Some(_) => vec![RestrictKey::Default6],
            None => vec![RestrictKey::Default4, RestrictKey::Default6],
        };
        (keys, "default".to_string())
    } else if addr == "source" {
        out.note(
            line,
            words,
            "`restrict source` governs ntpd's own upstream associations; gnomon's rules apply to clients only",
        );
        return;
    } else {
        let mut written = addr.to_string();
        if args.get(1) == Some(&"mask") {
            let Some(mask) = args.get(2) else {
                out.note(line, words, "`mask` without a mask: skipped");
                return;
            };
            written = format!("{addr} mask {mask}");
            flags_at = 3;
        }
        let prefix = match parse_ntp_prefix(&written) {
            Ok(p) => p,
            Err(why) => {
                out.note(line, words, why);
                return;
            }
        };
        // Keep the operator's form when gnomon reads it as is; else the masked CIDR form.
        let address = if written.parse::<Prefix>().as_ref() == Ok(&prefix) {
            written
        } else {
            out.note(
                line,
                words,
                format!("the address has host bits set; ntpd masks them, so it becomes {prefix}"),
            );
            prefix.to_string()
        };
        (vec![RestrictKey::Prefix(prefix.to_string())], address)
    };
    let mut flags = BTreeSet::new();
    for f in &args[flags_at..] {
        let f = f.to_ascii_lowercase();
        match f.as_str() {
            "ignore" | "noserve" | "limited" | "kod" => {
                flags.insert(f);
            }
            "notrust" => {
                out.note(
                    line,
                    words,
                    "notrust: ntpd serves only clients authenticated by symmetric keys or Autokey, which gnomon \
                     lacks, so none is served here: ignore (with an [nts] table, action `nts-only` serves \
                     NTS-authenticated clients only)",
                );
                flags.insert(f);
            }
            _ if NTP_HARMLESS_FLAGS.contains(&f.as_str()) => {
                flags.insert(f);
            }
            _ => {
                out.note(
                    line,
                    words,
                    format!("flag `{f}` has no gnomon equivalent and is left out"),
                );
                flags.insert(f);
            }
        }
    }
    for key in keys {
        match restricts.get_mut(&key) {
            // ntpd adds the flags of a repeated address+mask to the existing entry.
            Some(e) => {
                e.flags.extend(flags.iter().cloned());
                e.text = format!("{}; line {line}: {}", e.text, words.join(" "));
            }
            None => {
                order.push(key.clone());
                restricts.insert(
                    key,
                    RestrictEntry {
                        address: address.clone(),
                        flags: flags.clone(),
                        line,
                        text: words.join(" "),
                    },
                );
            }
        }
    }
}

/// ntpd's address forms: an address, `ADDR mask MASK`, or NTPsec's `ADDR/LEN`; host bits are
/// masked off, as ntpd does.
fn parse_ntp_prefix(s: &str) -> Result<Prefix, String> {
    let mut words = s.split_whitespace();
    let addr = words.next().unwrap_or("");
    let (ip, len) = match (words.next(), words.next()) {
        (Some(_), Some(mask)) => {
            let m: IpAddr = mask.parse().map_err(|_| format!("mask `{mask}` is not an address"))?;
            let (bits, width) = match m {
                IpAddr::V4(v) => (u128::from(u32::from(v)) << 96, 32),
                IpAddr::V6(v) => (u128::from(v), 128),
            };
            let len = bits.leading_ones().min(width) as u8;
            if bits.count_ones() != u32::from(len) {
                return Err(format!("mask `{mask}` is not contiguous: gnomon takes prefixes only"));
            }
            (addr, len)
        }
        _ => match addr.split_once('/') {
            Some((a, l)) => (a, l.parse::<u8>().map_err(|_| format!("`{addr}`: bad prefix length"))?),
            None => (addr, u8::MAX),
        },
    };
    let ip: IpAddr = ip.parse().map_err(|_| {
        format!("`{ip}` is not an IP address: host names in rules are not carried over (gnomon's rules take addresses)")
    })?;
    let len = if len == u8::MAX {
        if ip.is_ipv4() { 32 } else { 128 }
    } else {
        len
    };
    Prefix::truncate(ip, len).map_err(|e| format!("`{s}`: {e}"))
}

/// ntpd's flags as one gnomon action. KoD is returned apart: gnomon has one `kod` setting.
fn ntp_action(flags: &BTreeSet<String>, default: bool) -> Action {
    if flags.contains("ignore") || flags.contains("noserve") || flags.contains("notrust") {
        Action::Ignore
    } else if flags.contains("limited") {
        Action::Limited
    } else if flags.is_empty() && !default {
        // An entry with no flags is ntpd's "unrestricted", as tutorials give loopback and monitors.
        Action::Exempt
    } else {
        Action::Serve
    }
}

fn ntp_finish_restricts(
    out: &mut Out,
    restricts: &BTreeMap<RestrictKey, RestrictEntry>,
    order: &[RestrictKey],
    discard_interval: Option<(f64, usize)>,
) {
    let empty = BTreeSet::new();
    let d4 = restricts.get(&RestrictKey::Default4);
    let d6 = restricts.get(&RestrictKey::Default6);
    let a4 = ntp_action(d4.map_or(&empty, |e| &e.flags), true);
    let a6 = ntp_action(d6.map_or(&empty, |e| &e.flags), true);
    let origin = |e: Option<&RestrictEntry>| {
        e.map_or_else(
            || "no `restrict default`: ntpd serves everyone".to_string(),
            |e| format!("line {}: {}", e.line, e.text),
        )
    };
    out.default = Some((a4, origin(d4)));
    if a6 != a4 {
        // `::/0` never matches IPv4 clients, so it is exactly ntpd's IPv6 default entry.
        let e = d6.expect("an IPv6 default that differs was written");
        out.rules.push(OutRule {
            address: "::/0".into(),
            action: a6,
            line: e.line,
            text: e.text.clone(),
        });
    }
    let mut kod_lines = Vec::new();
    let mut plain_limited = Vec::new();
    let mut any_limited = a4 == Action::Limited || a6 == Action::Limited;
    for key in order {
        let e = &restricts[key];
        let action = ntp_action(&e.flags, !matches!(key, RestrictKey::Prefix(_)));
        if action == Action::Limited {
            any_limited = true;
            if e.flags.contains("kod") {
                kod_lines.push(e.line);
            } else {
                plain_limited.push(e.line);
            }
        } else if e.flags.contains("kod") && action != Action::Ignore {
            out.notes.push(Note {
                line: e.line,
                directive: e.text.clone(),
                why: "kod without limited has no effect in gnomon (ntpd sends it for limited clients)".into(),
            });
        }
        if let RestrictKey::Prefix(_) = key {
            out.rules.push(OutRule {
                address: e.address.clone(),
                action,
                line: e.line,
                text: e.text.clone(),
            });
        }
    }
    if let Some(&first) = kod_lines.first() {
        out.rate("kod", "true".into(), format!("kod on the limited rule of line {first}"));
        for l in plain_limited {
            out.notes.push(Note {
                line: l,
                directive: restricts
                    .values()
                    .find(|e| e.line == l)
                    .map_or(String::new(), |e| e.text.clone()),
                why: format!(
                    "limited without kod: gnomon's kod is one setting for every limited client, taken from line {first}"
                ),
            });
        }
    }
    match discard_interval {
        Some((interval, line)) => out.rate(
            "interval",
            format!("{interval:?}"),
            format!("line {line}: discard average"),
        ),
        None if any_limited => out.rate(
            "interval",
            "8.0".into(),
            "ntpd's default `discard average 3` (8 s)".into(),
        ),
        None => {}
    }
    if any_limited {
        out.rate(
            "leak",
            "0".into(),
            "ntpd answers no over-limit request (gnomon's default answers 1 in 4, against spoofed floods)".into(),
        );
    }
}

/// What gnomon's `address` takes: an IP address or a DNS name (never HOST:PORT).
fn host_or_address(s: &str) -> bool {
    s.parse::<IpAddr>().is_ok()
        || (!s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
}

/// Options of a `server`/`pool`/`peer` line. Returns false when the source is not to be added.
/// A `server`, `pool` or `peer` line of either format, once its address is known.
fn add_upstream(head: &str, addr: &str, options: &[&str], format: Format, line: usize, words: &[&str], out: &mut Out) {
    let mut up = Upstream {
        pool: head == "pool",
        address: addr.to_string(),
        line,
        text: words.join(" "),
        ..Upstream::default()
    };
    if head == "peer" {
        out.note(line, words, WHY_PEER);
    }
    if !host_or_address(addr) {
        out.note(line, words, "not a host name or IP address: left out");
        return;
    }
    if server_options(options, format, &mut up, line, words, out) {
        out.upstreams.push(up);
    }
}

fn server_options(
    opts: &[&str],
    format: Format,
    up: &mut Upstream,
    line: usize,
    words: &[&str],
    out: &mut Out,
) -> bool {
    let mut it = opts.iter();
    let mut keep = true;
    while let Some(&o) = it.next() {
        let lower = o.to_ascii_lowercase();
        match lower.as_str() {
            "iburst" => up.iburst = true,
            "prefer" => up.prefer = true,
            "trust" if format == Format::Chrony => up.trust = true,
            "true" if format == Format::Ntp => {
                up.trust = true;
                out.note(line, words, "`true` becomes `trust = true`: gnomon lets a trusted source win selection without a majority, it does not exempt it from the clock filter");
            }
            "minpoll" | "maxpoll" => {
                let v = it.next().and_then(|v| v.parse::<i32>().ok());
                match v {
                    Some(p) if (i32::from(MIN_POLL)..=i32::from(MAX_POLL)).contains(&p) => {
                        if lower == "minpoll" {
                            up.minpoll = Some(p as i8);
                        } else {
                            up.maxpoll = Some(p as i8);
                        }
                    }
                    _ => out.note(
                        line,
                        words,
                        format!(
                            "{lower} must be between {MIN_POLL} and {MAX_POLL} (log2 s) in gnomon: left at its default"
                        ),
                    ),
                }
            }
            "port" if format == Format::Chrony => match it.next().and_then(|v| v.parse::<u16>().ok()) {
                Some(p) if p > 0 => up.port = Some(p),
                _ => out.note(line, words, "port must be between 1 and 65535: left at 123"),
            },
            "maxsources" if format == Format::Chrony => match it.next().and_then(|v| v.parse::<u8>().ok()) {
                Some(m) if up.pool && (1..=MAX_POOL_SOURCES).contains(&m) => up.max_sources = Some(m),
                Some(m) if up.pool && m > MAX_POOL_SOURCES => {
                    up.max_sources = Some(MAX_POOL_SOURCES);
                    out.note(
                        line,
                        words,
                        format!("maxsources {m} is more than gnomon's {MAX_POOL_SOURCES}: capped"),
                    );
                }
                _ => out.note(line, words, "maxsources applies to a pool of 1 to 16 members: left out"),
            },
            "noselect" => {
                keep = false;
                out.note(
                    line,
                    words,
                    "noselect: gnomon has no monitor-only sources, and using it for time would change the \
                     selection, so the source is left out",
                );
            }
            "key" | "version" | "mode" | "ttl" | "bias" | "ident" | "minstratum" | "polltarget" | "presend"
            | "maxdelay" | "maxdelayratio" | "maxdelaydevratio" | "maxdelayquant" | "mindelay" | "asymmetry"
            | "offset" | "filter" | "maxsamples" | "minsamples" | "certset" | "ntsport" | "extfield" => {
                let v = it.next().copied().unwrap_or("");
                let why = match lower.as_str() {
                    "key" => WHY_KEYS.to_string(),
                    "version" => "gnomon polls with NTPv4".to_string(),
                    _ => "no gnomon equivalent".to_string(),
                };
                out.note(line, words, format!("option `{o} {v}` is left out: {why}"));
            }
            "nts" | "autokey" => out.note(line, words, format!("option `{o}` is left out: {WHY_NTS}")),
            "burst" => out.note(
                line,
                words,
                "option `burst` is left out: gnomon polls once per interval (iburst only at start)",
            ),
            _ => out.note(
                line,
                words,
                format!("option `{o}` has no gnomon equivalent and is left out"),
            ),
        }
    }
    if let (Some(lo), Some(hi)) = (up.minpoll, up.maxpoll)
        && hi < lo
    {
        out.note(
            line,
            words,
            format!("maxpoll {hi} is below minpoll {lo}: both left at their defaults"),
        );
        up.minpoll = None;
        up.maxpoll = None;
    }
    // gnomon's defaults are 6 and 10: a lone minpoll above 10 or maxpoll below 6 needs the other.
    if let (Some(lo), None) = (up.minpoll, up.maxpoll)
        && lo > 10
    {
        up.maxpoll = Some(lo);
    }
    if let (None, Some(hi)) = (up.minpoll, up.maxpoll)
        && hi < 6
    {
        up.minpoll = Some(hi);
    }
    keep
}

// ---------------------------------------------------------------------------------------------
// chrony.conf

struct ChronyRule {
    prefix: Prefix,
    allow: bool,
    line: usize,
    text: String,
}

/// chrony's address tree has one table per 4 bits; a subnet is written at the level of its last
/// nibble.
fn chrony_level(len: u8) -> u8 {
    len.div_ceil(4)
}

/// chrony's subnet forms: `A.B.C.D/L`, `A.B.C` (the length from the number of parts), `0/0`,
/// IPv6 with or without `/L`.
fn parse_chrony_subnet(s: &str) -> Result<Prefix, String> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (
            a,
            Some(l.parse::<u8>().map_err(|_| format!("`{s}`: bad prefix length"))?),
        ),
        None => (s, None),
    };
    let ip: IpAddr = if addr.contains(':') {
        addr.parse().map_err(|_| format!("`{addr}` is not an IPv6 address"))?
    } else {
        let parts: Vec<&str> = addr.split('.').collect();
        let mut octets = [0u8; 4];
        if parts.len() > 4 {
            return Err(format!("`{addr}` is not an IPv4 address"));
        }
        for (o, p) in octets.iter_mut().zip(&parts) {
            *o = p.parse().map_err(|_| {
                format!(
                    "`{s}` is not an address: host names in rules are not carried over (gnomon's rules take addresses)"
                )
            })?;
        }
        let ip = IpAddr::from(octets);
        if len.is_none() {
            return Prefix::truncate(ip, 8 * parts.len() as u8).map_err(|e| format!("`{s}`: {e}"));
        }
        ip
    };
    let len = len.unwrap_or(if ip.is_ipv4() { 32 } else { 128 });
    Prefix::truncate(ip, len).map_err(|e| format!("`{s}`: {e}"))
}

fn chrony(text: &str, out: &mut Out) {
    let mut rules: Vec<ChronyRule> = Vec::new();
    let mut ratelimit = false;
    let mut port: Option<(u16, usize)> = None;
    let mut bind: Vec<(IpAddr, usize)> = Vec::new();
    let mut local: Option<(u8, usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let words = split_words(raw, Format::Chrony);
        let Some(first) = words.first() else { continue };
        let head = first.to_ascii_lowercase();
        match head.as_str() {
            "server" | "pool" | "peer" => {
                let Some(addr) = words.get(1).copied() else {
                    out.note(line, &words, "no address: skipped");
                    continue;
                };
                add_upstream(&head, addr, &words[2..], Format::Chrony, line, &words, out);
            }
            "allow" | "deny" => {
                let allow = head == "allow";
                let mut args = &words[1..];
                let all = args.first() == Some(&"all");
                if all {
                    args = &args[1..];
                }
                let prefixes: Vec<Prefix> = match args {
                    [] => vec![
                        Prefix::truncate(IpAddr::from([0u8; 4]), 0).expect("/0"),
                        Prefix::truncate(IpAddr::from([0u16; 8]), 0).expect("/0"),
                    ],
                    [s] => match parse_chrony_subnet(s) {
                        Ok(p) => vec![p],
                        Err(why) => {
                            out.note(line, &words, why);
                            continue;
                        }
                    },
                    _ => {
                        out.note(line, &words, "more than one subnet: skipped");
                        continue;
                    }
                };
                for p in prefixes {
                    // An identical subnet is replaced; `all` also clears every subnet inside it;
                    // otherwise only the narrower ones of the same table level are overwritten.
                    let mut erased = Vec::new();
                    rules.retain(|r| {
                        let inside = r.prefix.addr().is_ipv4() == p.addr().is_ipv4()
                            && r.prefix.len() >= p.len()
                            && p.contains(r.prefix.addr());
                        let gone =
                            inside && (all || r.prefix == p || chrony_level(r.prefix.len()) == chrony_level(p.len()));
                        if gone && r.prefix != p {
                            erased.push((r.line, r.text.clone()));
                        }
                        !gone
                    });
                    for (l, t) in erased {
                        out.notes.push(Note {
                            line: l,
                            directive: t,
                            why: format!(
                                "overridden in chronyd by line {line} (`all`, or the same 4-bit table level): left out"
                            ),
                        });
                    }
                    rules.push(ChronyRule {
                        prefix: p,
                        allow,
                        line,
                        text: words.join(" "),
                    });
                }
            }
            "ratelimit" => {
                ratelimit = true;
                chrony_ratelimit(&words, line, out);
            }
            "clientloglimit" => match words.get(1).and_then(|v| v.parse::<u64>().ok()) {
                Some(b) => {
                    let b = b.clamp(4096, 1 << 34);
                    out.rate("table_bytes", b.to_string(), format!("line {line}: clientloglimit"));
                }
                None => out.note(line, &words, "not a number of bytes"),
            },
            "local" => {
                let mut stratum = 10u8;
                let mut it = words.iter().skip(1);
                while let Some(w) = it.next() {
                    match *w {
                        "stratum" => match it.next().and_then(|v| v.parse::<u8>().ok()) {
                            Some(s) if (1..=15).contains(&s) => stratum = s,
                            _ => out.note(line, &words, "stratum must be between 1 and 15: 10 is used"),
                        },
                        "distance" | "activate" => {
                            let v = it.next().copied().unwrap_or("");
                            out.note(line, &words, format!("option `{w} {v}` has no gnomon equivalent"));
                        }
                        _ => out.note(
                            line,
                            &words,
                            format!("option `{w}` has no gnomon equivalent (gnomon has no orphan mode)"),
                        ),
                    }
                }
                local = Some((stratum, line, words.join(" ")));
            }
            "port" => match words.get(1).and_then(|v| v.parse::<u16>().ok()) {
                Some(0) => out.note(
                    line,
                    &words,
                    "port 0 (no NTP server) is not carried over: gnomon always serves on `listen`",
                ),
                Some(p) => port = Some((p, line)),
                None => out.note(line, &words, "not a port number"),
            },
            "bindaddress" => match words.get(1).and_then(|v| v.parse::<IpAddr>().ok()) {
                Some(a) => {
                    bind.retain(|(b, _)| b.is_ipv4() != a.is_ipv4());
                    bind.push((a, line));
                }
                None => out.note(
                    line,
                    &words,
                    "not an IP address (an interface name is not carried over)",
                ),
            },
            "makestep" => {
                let threshold = words.get(1).and_then(|v| v.parse::<f64>().ok());
                let limit = words.get(2).and_then(|v| v.parse::<i64>().ok());
                match (threshold, limit, words.len()) {
                    // chronyd takes any negative limit as "always"; gnomon spells that -1.
                    (Some(t), Some(l), 3) if t.is_finite() && t >= 0.0 && l <= 1_000_000 => {
                        out.makestep = Some((t, l.max(-1), line, words.join(" ")));
                    }
                    _ => out.note(
                        line,
                        &words,
                        "expected `makestep THRESHOLD LIMIT` (seconds, clock updates): skipped",
                    ),
                }
            }
            "driftfile" | "pidfile" | "user" | "lock_all" | "sched_priority" | "broadcast" | "refclock" => {
                out.note(line, &words, common_why(&head).unwrap_or(""));
            }
            "rtcsync" | "rtcfile" | "rtconutc" | "rtcdevice" | "rtcautotrim" => out.note(line, &words, WHY_RTC),
            "keyfile" => out.note(line, &words, WHY_KEYS),
            "logdir" | "log" | "logbanner" | "logchange" | "mailonchange" => out.note(line, &words, WHY_LOG),
            "leapseclist" => match words.get(1) {
                Some(path) if words.len() == 2 => out.leap("list", quote(path), format!("line {line}: leapseclist")),
                _ => out.note(line, &words, "expected `leapseclist PATH`: skipped"),
            },
            "leapsecmode" => match words.get(1).copied() {
                Some("ignore") => out.leap("mode", quote("ignore"), format!("line {line}: leapsecmode ignore")),
                // gnomon's default: the kernel makes the second in system mode, served time in software mode.
                Some("system" | "step") => {}
                Some(m) => out.note(
                    line,
                    &words,
                    format!("leapsecmode {m}: gnomon never slews or smears a leap second (public servers must not)"),
                ),
                None => out.note(line, &words, "expected `leapsecmode MODE`: skipped"),
            },
            "leapsectz" => out.note(line, &words, WHY_LEAP),
            "include" | "confdir" => out.note(line, &words, WHY_INCLUDE),
            "sourcedir" => out.note(
                line,
                &words,
                "gnomon has no directory of dynamic sources: add its servers as [[upstream]] entries",
            ),
            "dumpdir" | "dumponexit" => out.note(
                line,
                &words,
                "gnomon saves no source state across restarts: iburst makes the first sync quick instead",
            ),
            "smoothtime" => out.note(line, &words, "gnomon never smears time: public servers must not"),
            "noclientlog" => out.note(
                line,
                &words,
                "gnomon always keeps its fixed-size client table; set rules to serve/exempt to skip the rate limit",
            ),
            "cmdallow" | "cmddeny" | "bindcmdaddress" | "cmdport" | "cmdratelimit" => out.note(line, &words, WHY_CMD),
            h if h.starts_with("nts") => out.note(line, &words, WHY_NTS),
            "maxupdateskew" | "maxdistance" | "maxjitter" | "minsources" | "combinelimit" | "maxchange"
            | "maxslewrate" | "maxclockerror" | "reselectdist" | "stratumweight" | "corrtimeratio"
            | "fallbackdrift" | "initstepslew" | "manual" | "tempcomp" => out.note(line, &words, WHY_TUNE),
            "hwtimestamp" => out.note(
                line,
                &words,
                "gnomon uses kernel software receive timestamps (SO_TIMESTAMPNS), not NIC hardware timestamps",
            ),
            _ => out.note(line, &words, "no gnomon equivalent"),
        }
    }
    // Without `allow` chronyd serves nobody; denied clients get no answer at all.
    let allowed = if ratelimit { Action::Limited } else { Action::Serve };
    let action = |allow: bool| if allow { allowed } else { Action::Ignore };
    let root = |rules: &[ChronyRule], v4: bool| {
        rules
            .iter()
            .find(|r| r.prefix.len() == 0 && r.prefix.addr().is_ipv4() == v4)
            .map(|r| (action(r.allow), r.line, r.text.clone()))
    };
    let (r4, r6) = (root(&rules, true), root(&rules, false));
    let mut skip_roots = false;
    match (&r4, &r6) {
        (Some((a4, l, t)), Some((a6, _, _))) if a4 == a6 => {
            out.default = Some((*a4, format!("line {l}: {t}")));
            skip_roots = true;
        }
        _ if rules.is_empty() => {
            out.default = Some((
                Action::Ignore,
                "no `allow`: chronyd serves no client (gnomon then ignores every request)".into(),
            ));
        }
        _ => {
            out.default = Some((Action::Ignore, "chronyd denies every client no `allow` covers".into()));
        }
    }
    for r in &rules {
        if skip_roots && r.prefix.len() == 0 {
            continue;
        }
        out.rules.push(OutRule {
            address: r.prefix.to_string(),
            action: action(r.allow),
            line: r.line,
            text: r.text.clone(),
        });
    }
    if let Some((s, line, text)) = local {
        out.local_stratum = Some((s, format!("line {line}: {text}")));
        if !out.upstreams.is_empty() {
            out.note(line, &[text.as_str()], WHY_LOCAL_BESIDE);
        }
    }
    if port.is_some() || !bind.is_empty() {
        let p = port.map_or(123, |(p, _)| p);
        let pick = |v4: bool| {
            bind.iter()
                .find(|(a, _)| a.is_ipv4() == v4)
                .map_or(if v4 { "0.0.0.0".to_string() } else { "::".to_string() }, |(a, _)| {
                    a.to_string()
                })
        };
        out.listen = vec![format!("{}:{p}", pick(true)), format!("[{}]:{p}", pick(false))];
        out.listen_from = port.map(|(_, l)| l).or(bind.first().map(|(_, l)| *l));
    }
}

fn chrony_ratelimit(words: &[&str], line: usize, out: &mut Out) {
    // chrony's defaults, which gnomon's own defaults equal except for the leak (1 in 4 both).
    let mut it = words.iter().skip(1);
    while let Some(&k) = it.next() {
        let v = it.next().and_then(|v| v.parse::<i32>().ok());
        match (k, v) {
            ("interval", Some(i)) if (-19..=12).contains(&i) => {
                // chrony's interval is log2 seconds; gnomon's is seconds, at least 1 ms.
                let s = 2f64.powi(i);
                if s < 0.001 {
                    out.note(
                        line,
                        words,
                        format!("interval 2^{i} s is below gnomon's 1 ms: 0.001 is used"),
                    );
                }
                out.rate(
                    "interval",
                    format!("{:?}", s.max(0.001)),
                    format!("line {line}: interval {i} = 2^{i} s"),
                );
            }
            ("burst", Some(b)) if (1..=255).contains(&b) => {
                out.rate("burst", b.to_string(), format!("line {line}: burst {b}"));
            }
            ("leak", Some(l)) if (0..=4).contains(&l) => {
                // chrony's leak is a power of 1/2; gnomon's is "1 in N", 0 for none.
                let n = if l == 0 { 0 } else { 1u32 << l };
                out.rate("leak", n.to_string(), format!("line {line}: leak {l} = 1 in 2^{l}"));
            }
            _ => out.note(
                line,
                words,
                format!("option `{k}` is not carried over (unknown or out of range)"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn conv(text: &str, f: Format) -> (Config, Converted) {
        let c = convert(text, "x.conf", Some(f)).unwrap();
        let cfg = Config::parse(&c.toml, "out.toml").unwrap_or_else(|e| panic!("{e}\n{}", c.toml));
        (cfg, c)
    }

    /// The converted rules as (prefix, action), in order.
    fn rules_of(cfg: &Config) -> Vec<(String, Action)> {
        cfg.policy
            .rules
            .iter()
            .map(|r| (r.prefix.to_string(), r.action))
            .collect()
    }

    fn noted(c: &Converted, line: usize, what: &str) -> bool {
        c.notes.iter().any(|n| n.line == line && n.why.contains(what))
    }

    #[test]
    fn detects_by_keywords_and_name() {
        assert_eq!(detect("restrict default ignore\nserver a\n", "f"), Some(Format::Ntp));
        assert_eq!(detect("server a iburst\nallow 10/8\n", "f"), Some(Format::Chrony));
        assert_eq!(detect("server 127.127.1.0\n", "f"), Some(Format::Ntp));
        assert_eq!(
            detect("server a iburst\n", "/etc/chrony/chrony.conf"),
            Some(Format::Chrony)
        );
        assert_eq!(detect("server a iburst\n", "/etc/ntp.conf"), Some(Format::Ntp));
        assert_eq!(detect("server a iburst\n", "x"), None);
        assert!(convert("server a\n", "x", None).is_err());
    }

    #[test]
    fn ntp_restrict_flag_sets() {
        let (cfg, c) = conv(
            "restrict default kod nomodify notrap nopeer noquery limited\n\
             restrict 127.0.0.1\nrestrict -6 ::1\n\
             restrict 192.168.1.0 mask 255.255.255.0 nomodify notrap\n\
             restrict 10.0.0.0 mask 255.0.0.0 ignore\nrestrict 172.16.0.0/12 noserve\n\
             restrict 10.1.2.3 mask 255.255.0.0 nomodify\nrestrict 198.51.100.0 mask 255.255.255.0 notrust\n",
            Format::Ntp,
        );
        assert_eq!(cfg.policy.default, Action::Limited);
        assert!(cfg.policy.rate_limit.kod);
        assert_eq!(cfg.policy.rate_limit.leak, 0);
        let lines: Vec<usize> = c.notes.iter().map(|n| n.line).collect();
        let mut once = lines.clone();
        once.dedup();
        assert_eq!(lines, once, "one note per line here: {:?}", c.notes);
        let rules = rules_of(&cfg);
        assert_eq!(
            rules,
            [
                ("127.0.0.1/32".to_string(), Action::Exempt),
                ("::1/128".to_string(), Action::Exempt),
                ("192.168.1.0/24".to_string(), Action::Serve),
                ("10.0.0.0/8".to_string(), Action::Ignore),
                ("172.16.0.0/12".to_string(), Action::Ignore),
                ("10.1.0.0/16".to_string(), Action::Serve),
                ("198.51.100.0/24".to_string(), Action::Ignore),
            ]
        );
        assert!(
            c.toml.contains("address = \"192.168.1.0 mask 255.255.255.0\""),
            "{}",
            c.toml
        );
        assert!(noted(&c, 7, "host bits"), "{:?}", c.notes);
    }

    #[test]
    fn ntp_defaults_per_family_and_repeated_lines_add_flags() {
        let (cfg, _) = conv(
            "restrict -4 default nomodify\nrestrict -6 default ignore\n",
            Format::Ntp,
        );
        assert_eq!(cfg.policy.default, Action::Serve);
        assert_eq!(cfg.policy.rules.len(), 1);
        assert_eq!(cfg.policy.rules[0].prefix.to_string(), "::/0");
        assert_eq!(cfg.policy.rules[0].action, Action::Ignore);
        let (cfg, c) = conv("restrict 192.0.2.1 nomodify\nrestrict 192.0.2.1 limited\n", Format::Ntp);
        assert_eq!(cfg.policy.rules.len(), 1, "{}", c.toml);
        assert_eq!(cfg.policy.rules[0].action, Action::Limited);
        assert_eq!(cfg.policy.rate_limit.interval, 8.0);
        assert!(!cfg.policy.rate_limit.kod);
        let (cfg, _) = conv("restrict default ignore\nrestrict -6 default ignore\n", Format::Ntp);
        assert_eq!((cfg.policy.default, cfg.policy.rules.len()), (Action::Ignore, 0));
        let (cfg, c) = conv(
            "restrict host.example nomodify\nrestrict 10.0.0.0 mask 255.0.255.0\n",
            Format::Ntp,
        );
        assert!(cfg.policy.rules.is_empty());
        assert!(
            noted(&c, 1, "not an IP address") && noted(&c, 2, "not contiguous"),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn ntp_servers_and_local_clock() {
        let (cfg, c) = conv(
            "server 192.0.2.1 iburst prefer minpoll 4 maxpoll 6\npool pool.example iburst\n\
             peer 192.0.2.2 key 3\nserver 127.127.28.0\nserver 192.0.2.3 noselect\nserver 192.0.2.4 minpoll 99\n",
            Format::Ntp,
        );
        let u = &cfg.sync.upstreams;
        assert_eq!(u.len(), 4, "{}", c.toml);
        assert_eq!(
            (
                u[0].address.as_str(),
                u[0].iburst,
                u[0].prefer,
                u[0].minpoll,
                u[0].maxpoll
            ),
            ("192.0.2.1", true, true, 4, 6)
        );
        assert_eq!(cfg.sync.mode, crate::sync::ClockMode::System);
        assert!(u.iter().any(|u| u.pool && u.address == "pool.example"));
        assert!(noted(&c, 3, "symmetric") && noted(&c, 3, "key 3"), "{:?}", c.notes);
        assert!(noted(&c, 4, "type 28"), "{:?}", c.notes);
        assert!(
            noted(&c, 5, "noselect") && noted(&c, 6, "minpoll must be"),
            "{:?}",
            c.notes
        );

        let (cfg, c) = conv("server 127.127.1.0\nfudge 127.127.1.0 stratum 10\n", Format::Ntp);
        assert_eq!(cfg.sync.local_stratum, Some(11), "{}", c.toml);
        assert!(cfg.sync.upstreams.is_empty());
        let (cfg, c) = conv("server a.example:123\nserver 127.127.1.0\n", Format::Ntp);
        assert!(noted(&c, 1, "not a host name"), "{:?}", c.notes);
        assert_eq!(cfg.sync.local_stratum, Some(6));
        // Beside an upstream gnomon would never use it: left commented out, and said so.
        let (cfg, c) = conv(
            "server 127.127.1.0\nfudge 127.127.1.0 stratum 10\nserver 192.0.2.1\n",
            Format::Ntp,
        );
        assert_eq!(cfg.sync.local_stratum, None);
        assert!(c.toml.contains("# local_stratum = 11"), "{}", c.toml);
        assert!(noted(&c, 1, "fallback"), "{:?}", c.notes);
    }

    #[test]
    fn ntp_files_and_keys_are_listed() {
        let (_, c) = conv(
            "driftfile /var/lib/ntp/drift\nincludefile /etc/ntp/crypto/pw\nkeys /etc/ntp/keys\n\
             tos maxclock 7\nstatsdir /var/log/\nlogfile /var/log/ntp.log\ntinker stepout 60\nfoo bar\n",
            Format::Ntp,
        );
        for (line, what) in [
            (1, "drift"),
            (2, "included"),
            (3, "authentication"),
            (4, "fixed"),
            (5, "statistics"),
            (6, "logs"),
            (7, "fixed"),
            (8, "no gnomon equivalent"),
        ] {
            assert!(noted(&c, line, what), "line {line}: {:?}", c.notes);
        }
        assert!(c.toml.contains("#   line 3: keys /etc/ntp/keys:"), "{}", c.toml);
    }

    #[test]
    fn chrony_allow_deny_and_defaults() {
        let (cfg, c) = conv("server a iburst\n", Format::Chrony);
        assert_eq!(cfg.policy.default, Action::Ignore, "{}", c.toml);
        let (cfg, _) = conv("allow\n", Format::Chrony);
        assert_eq!((cfg.policy.default, cfg.policy.rules.len()), (Action::Serve, 0));
        let (cfg, _) = conv("allow all\nratelimit\n", Format::Chrony);
        assert_eq!(cfg.policy.default, Action::Limited);
        let (cfg, c) = conv(
            "allow 192.168\ndeny 192.168.7.0/24\nallow 10/8\nallow 2001:db8::/32\nallow 0/0\nallow host.example\n",
            Format::Chrony,
        );
        assert_eq!(cfg.policy.default, Action::Ignore);
        let rules = rules_of(&cfg);
        assert_eq!(
            rules,
            [
                ("192.168.0.0/16".to_string(), Action::Serve),
                ("192.168.7.0/24".to_string(), Action::Ignore),
                ("10.0.0.0/8".to_string(), Action::Serve),
                ("2001:db8::/32".to_string(), Action::Serve),
                ("0.0.0.0/0".to_string(), Action::Serve),
            ]
        );
        assert!(noted(&c, 6, "host names"), "{:?}", c.notes);
        // A later, wider rule at the same table level overwrites an earlier one; `all` any level.
        let (cfg, c) = conv("allow 1.2.3.0/28\ndeny 1.2.3.0/25\n", Format::Chrony);
        assert_eq!(cfg.policy.rules.len(), 1);
        assert!(noted(&c, 1, "overridden"), "{:?}", c.notes);
        let (cfg, _) = conv("allow 1.2.3.0/29\ndeny 1.2.3.0/25\n", Format::Chrony);
        assert_eq!(cfg.policy.rules.len(), 2);
        let (cfg, _) = conv("allow 1.2.3.4\ndeny 1.2.3.0/24\nallow all 1.2.0.0/16\n", Format::Chrony);
        assert_eq!(cfg.policy.rules.len(), 1);
    }

    #[test]
    fn chrony_ratelimit_units() {
        let (cfg, c) = conv("allow 10/8\nratelimit interval 1 burst 16 leak 3\n", Format::Chrony);
        let rl = cfg.policy.rate_limit;
        assert_eq!((rl.interval, rl.burst, rl.leak), (2.0, 16, 8), "{}", c.toml);
        assert_eq!(cfg.policy.rules[0].action, Action::Limited);
        let (cfg, c) = conv("ratelimit interval -19 leak 0\n", Format::Chrony);
        assert_eq!((cfg.policy.rate_limit.interval, cfg.policy.rate_limit.leak), (0.001, 0));
        assert!(noted(&c, 1, "below"), "{:?}", c.notes);
    }

    #[test]
    fn panic_threshold_and_leap_settings_are_carried_over() {
        let (cfg, c) = conv("tinker panic 0 step 0.5\nserver 10.0.0.1\n", Format::Ntp);
        assert_eq!(cfg.sync.panic.threshold, None, "panic 0: no limit, as in ntpd");
        assert!(noted(&c, 1, "tinker step 0.5"), "{:?}", c.notes);
        let (cfg, _) = conv("tinker panic 600\nserver 10.0.0.1\n", Format::Ntp);
        assert_eq!(cfg.sync.panic.threshold, Some(600.0));
        assert!(cfg.sync.makestep.is_none(), "a panic threshold alone turns no steps on");
        // The list is read when the config is, so only the text is looked at here.
        let c = convert("leapfile /var/lib/ntp/leap-seconds.list\n", "x.conf", Some(Format::Ntp)).unwrap();
        assert!(
            c.toml.contains("[leap]\nlist = \"/var/lib/ntp/leap-seconds.list\""),
            "{}",
            c.toml
        );
        let c = convert(
            "leapseclist /usr/share/zoneinfo/leap-seconds.list\nleapsecmode slew\n",
            "x.conf",
            Some(Format::Chrony),
        )
        .unwrap();
        assert!(
            c.toml.contains("list = \"/usr/share/zoneinfo/leap-seconds.list\""),
            "{}",
            c.toml
        );
        assert!(noted(&c, 2, "never slews"), "{:?}", c.notes);
        let (cfg, c) = conv("leapsecmode ignore\nleapsecmode system\n", Format::Chrony);
        assert_eq!(cfg.sync.leap.mode, crate::sync::leap::LeapMode::Ignore);
        assert!(
            c.notes.is_empty() || !c.notes.iter().any(|n| n.line == 2),
            "{:?}",
            c.notes
        );
    }

    #[test]
    fn chrony_sources_local_and_listen() {
        let (cfg, c) = conv(
            "pool 2.debian.pool.ntp.org iburst maxsources 6\nserver 127.0.0.1 port 11123 minpoll 0 maxpoll 2 trust\n\
             local stratum 8 orphan\nmakestep 1 3\nport 1123\nbindaddress 127.0.0.1\n",
            Format::Chrony,
        );
        let (pool, server) = (
            cfg.sync.upstreams.iter().find(|u| u.pool).unwrap(),
            &cfg.sync.upstreams[0],
        );
        assert_eq!((pool.max_sources, pool.iburst), (6, true));
        assert_eq!(
            (server.port, server.minpoll, server.maxpoll, server.trust),
            (11123, 0, 2, true)
        );
        assert!(
            noted(&c, 3, "orphan") && noted(&c, 3, "fallback") && !c.notes.iter().any(|n| n.line == 4),
            "{:?}",
            c.notes
        );
        let m = cfg.sync.makestep.expect("makestep carried over");
        assert_eq!((m.threshold, m.limit), (1.0, Some(3)));
        let (always, _) = conv("makestep 0.1 -5\n", Format::Chrony);
        assert_eq!(
            always.sync.makestep.map(|m| m.limit),
            Some(None),
            "any negative limit: always"
        );
        for bad in ["makestep 1\n", "makestep x 3\n", "makestep -1 3\n"] {
            let (skipped, c) = conv(bad, Format::Chrony);
            assert!(
                skipped.sync.makestep.is_none() && noted(&c, 1, "THRESHOLD LIMIT"),
                "{bad}"
            );
        }
        let listen: Vec<String> = cfg.serve.listen.iter().map(|a| a.to_string()).collect();
        assert_eq!(listen, ["127.0.0.1:1123", "[::]:1123"]);
        let (cfg, _) = conv("local stratum 8\n", Format::Chrony);
        assert_eq!(cfg.sync.local_stratum, Some(8));
        assert_eq!(cfg.sync.mode, crate::sync::ClockMode::Software);
    }
}
