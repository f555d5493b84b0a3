//! What the operator sees: per-source and system state, and their text renderings for
//! `gnomon sources` (like `ntpq -p`, plus why a source is not in use) and `gnomon status`
//! (like `chronyc tracking`). Pure data and formatting.

use crate::logging::Event;
use std::fmt::Write;
use std::net::SocketAddr;

#[derive(Clone, PartialEq, Debug, serde::Serialize)]
pub struct SourceReport {
    /// The configured name (host, address or pool name).
    pub name: String,
    /// None when the name did not resolve.
    pub addr: Option<SocketAddr>,
    /// '*' system peer, '+' combined, '-' outlier, '#' not combined (too far), 'x' falseticker,
    /// ' ' not a candidate.
    pub tally: char,
    /// The upstream's refid as text.
    pub refid: String,
    pub stratum: u8,
    /// 'u' unicast, 'p' pool member.
    pub kind: char,
    /// Seconds since the last valid reply.
    pub when_s: Option<u64>,
    pub poll_log2: i8,
    pub reach: u8,
    pub delay_ms: Option<f64>,
    pub offset_ms: Option<f64>,
    pub jitter_ms: Option<f64>,
    /// Why this source is not the one in use, in words (None for the system peer).
    pub why: Option<String>,
    /// An NTS source: its session in words ("authenticated, 8 cookies", or why not).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nts: Option<String>,
}

#[derive(Clone, PartialEq, Debug, serde::Serialize)]
pub struct SystemReport {
    /// What replies say right now (holdover past its limit counts as unsynchronised).
    pub synced: bool,
    /// Why not synchronised, in words.
    pub why_unsynced: Option<String>,
    /// Synchronised, but no source is selected now: coasting on the last estimate.
    pub holdover: bool,
    pub stratum: u8,
    pub refid: String,
    /// The system peer, as `name (address)`.
    pub system_peer: Option<String>,
    /// Phase error left to slew at the last update (s).
    pub offset_s: f64,
    /// True time minus kernel realtime now (software mode's correction, s).
    pub correction_s: f64,
    /// Rate of the correction (ppm); minus the kernel clock's frequency error while not slewing.
    pub frequency_ppm: f64,
    pub root_delay_s: f64,
    /// Now, including growth since the last update.
    pub root_dispersion_s: f64,
    /// "normal", "insert second", "delete second" or "not synchronised".
    pub leap: String,
    /// True time of the last clock update (Unix seconds).
    pub last_update_unix_s: Option<f64>,
    /// Seconds since then.
    pub since_update_s: Option<f64>,
    /// "software" or "system".
    pub mode: String,
    /// The kernel's frequency setting (ppm): steered in system mode, left alone in software mode.
    pub kernel_frequency_ppm: f64,
    /// Steps of the kernel clock by other programs since start (each compensated).
    pub external_steps: u32,
    /// The last thing that happened to the kernel clock, in words, with when.
    pub kernel_event: Option<String>,
    /// The leap second scheduled, or why an announcement or list is not used, in words.
    pub leap_note: Option<String>,
    /// Leap seconds applied since start.
    pub leaps_applied: u32,
    /// The sources' correction refused as over the panic threshold, in words.
    pub refused: Option<String>,
    /// Fewer than 3 sources to select from, in words.
    pub few_sources: Option<String>,
}

/// Datagrams at the sync socket that were not a reply to a request of ours, by reason. None of
/// them touched a source's state.
#[derive(Clone, Copy, Default, PartialEq, Eq, Debug, serde::Serialize)]
pub struct StrayReport {
    /// From an address that is not a source.
    pub unknown_source: u64,
    /// Shorter than an NTP header.
    pub too_short: u64,
    /// From a source, but the origin timestamp is not the one we sent: spoofed, or a late reply
    /// to an earlier request.
    pub wrong_origin: u64,
    /// From a source with no request outstanding: a duplicate, or the reply was already taken.
    pub unexpected: u64,
}

impl StrayReport {
    pub fn total(&self) -> u64 {
        self.unknown_source + self.too_short + self.wrong_origin + self.unexpected
    }
}

#[derive(Clone, PartialEq, Debug, serde::Serialize)]
pub struct SyncReport {
    pub sources: Vec<SourceReport>,
    pub system: SystemReport,
    pub stray: StrayReport,
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.3}"))
}

fn remote(s: &SourceReport) -> String {
    match s.addr {
        Some(a) if a.ip().to_string() == s.name => a.to_string(),
        Some(a) if a.port() == 123 => a.ip().to_string(),
        Some(a) => a.to_string(),
        None => s.name.clone(),
    }
}

/// `ntpq -p` style table. With `why`, each line ends with the reason the source is not in use.
pub fn render_sources(report: &SyncReport, why: bool) -> String {
    let mut out = String::new();
    let _ = write!(
        out,
        "     {:<26} {:<15} {:>2} t {:>5} {:>4} {:>5} {:>9} {:>10} {:>8}",
        "remote", "refid", "st", "when", "poll", "reach", "delay", "offset", "jitter"
    );
    if why {
        out.push_str("  why");
    }
    out.push('\n');
    out.push_str(&"=".repeat(if why { 120 } else { 97 }));
    out.push('\n');
    for s in &report.sources {
        let when = s.when_s.map_or_else(|| "-".to_string(), |w| w.to_string());
        let mut name = remote(s);
        if name.len() > 30 {
            name.truncate(30);
        }
        let _ = write!(
            out,
            "{}{:<30} {:<15} {:>2} {} {:>5} {:>4} {:>5o} {:>9} {:>10} {:>8}",
            s.tally,
            name,
            s.refid,
            s.stratum,
            s.kind,
            when,
            1u64 << s.poll_log2.clamp(0, 17),
            s.reach,
            ms(s.delay_ms),
            ms(s.offset_ms),
            ms(s.jitter_ms)
        );
        if why {
            let _ = write!(out, "  {}", s.why.as_deref().unwrap_or("in use (system peer)"));
        }
        out.push('\n');
    }
    if report.sources.is_empty() {
        out.push_str("(no upstream sources configured)\n");
    }
    let nts: Vec<_> = report.sources.iter().filter(|s| s.nts.is_some()).collect();
    if !nts.is_empty() {
        out.push('\n');
        for s in nts {
            let _ = writeln!(out, "NTS  {:<30} {}", remote(s), s.nts.as_deref().unwrap_or_default());
        }
    }
    out
}

/// `chronyc tracking` style summary.
pub fn render_status(report: &SyncReport) -> String {
    let s = &report.system;
    let mut out = String::new();
    let refid = match &s.system_peer {
        Some(p) => format!("{}, system peer {p}", s.refid),
        None => s.refid.clone(),
    };
    let _ = writeln!(out, "Reference ID    : {refid}");
    let _ = writeln!(out, "Stratum         : {}", s.stratum);
    let last = match (s.last_update_unix_s, s.since_update_s) {
        (Some(t), Some(ago)) => format!("{} ({ago:.0} s ago)", utc(t)),
        _ => "never".to_string(),
    };
    let _ = writeln!(out, "Ref time (UTC)  : {last}");
    let _ = writeln!(
        out,
        "Correction      : {:+.9} seconds (true time minus kernel clock)",
        s.correction_s
    );
    let _ = writeln!(out, "Last offset     : {:+.9} seconds", s.offset_s);
    let _ = writeln!(out, "Frequency       : {:+.3} ppm", s.frequency_ppm);
    let _ = writeln!(out, "Root delay      : {:.9} seconds", s.root_delay_s);
    let _ = writeln!(out, "Root dispersion : {:.9} seconds", s.root_dispersion_s);
    let _ = writeln!(out, "Leap status     : {}", s.leap);
    if let Some(n) = &s.leap_note {
        let _ = writeln!(out, "Leap second     : {n}");
    }
    let _ = writeln!(out, "Clock mode      : {}", s.mode);
    let kernel = if s.mode == "system" { "steered" } else { "left alone" };
    let _ = writeln!(
        out,
        "Kernel clock    : {kernel}, frequency setting {:+.3} ppm, {} external step(s)",
        s.kernel_frequency_ppm, s.external_steps
    );
    if let Some(e) = &s.kernel_event {
        let _ = writeln!(out, "Kernel event    : {e}");
    }
    let synced = match (&s.why_unsynced, s.synced) {
        (_, true) if s.holdover => "yes (holdover: no source selected, root dispersion growing)".to_string(),
        (_, true) => "yes".to_string(),
        (Some(w), false) => format!("no ({w})"),
        (None, false) => "no".to_string(),
    };
    let _ = writeln!(out, "Synchronised    : {synced}");
    let nts = report.sources.iter().filter(|s| s.nts.is_some()).count();
    if nts > 0 {
        let authenticated = report
            .sources
            .iter()
            .filter(|s| s.nts.as_deref().is_some_and(|n| n.starts_with("authenticated")))
            .count();
        let peer = report.sources.iter().find(|s| s.tally == '*').map_or("", |s| {
            if s.nts.is_some() {
                ", system peer by NTS"
            } else {
                ", system peer not NTS"
            }
        });
        let _ = writeln!(
            out,
            "NTS             : {nts} source(s), {authenticated} authenticated{peer}"
        );
    }
    for w in [&s.refused, &s.few_sources].into_iter().flatten() {
        let _ = writeln!(out, "Warning         : {w}");
    }
    let st = &report.stray;
    let _ = writeln!(
        out,
        "Stray replies   : {} (unknown source {}, wrong origin {}, unexpected {}, too short {})",
        st.total(),
        st.unknown_source,
        st.wrong_origin,
        st.unexpected,
        st.too_short
    );
    out
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss` (UTC).
fn utc(unix_s: f64) -> String {
    super::leap::utc_text(unix_s.floor() as i64)
}

/// The state changes between two reports, one [`Event`] each, for the log: a pure function, so
/// the shell only compares the report it just built with the one before.
pub fn changes(old: &SyncReport, new: &SyncReport) -> Vec<Event> {
    let mut out = Vec::new();
    let in_use = |t: char| t == '*' || t == '+';
    for n in &new.sources {
        let Some(addr) = n.addr else { continue };
        let Some(o) = old.sources.iter().find(|o| o.addr == Some(addr) && o.name == n.name) else {
            continue;
        };
        let who = remote(n);
        let why = n.why.as_deref().unwrap_or("in use");
        match (o.reach != 0, n.reach != 0) {
            (false, true) if o.when_s.is_some() => {
                out.push(Event::info("reach", &who, format!("source {who} reachable again")));
            }
            (false, true) => out.push(Event::info("reach", &who, format!("source {who} reachable"))),
            (true, false) => out.push(Event::warn("reach", &who, format!("source {who} unreachable: {why}"))),
            _ => {}
        }
        match (in_use(o.tally), in_use(n.tally)) {
            (false, true) => {
                let how = if n.tally == '*' { "system peer" } else { "combined" };
                out.push(Event::info("select", &who, format!("source {who} selected ({how})")));
            }
            (true, false) => out.push(Event::warn("select", &who, format!("source {who} deselected: {why}"))),
            _ => {}
        }
    }
    let (o, n) = (&old.system, &new.system);
    if o.system_peer != n.system_peer {
        match (&o.system_peer, &n.system_peer) {
            (Some(was), Some(now)) => out.push(Event::info("peer", "", format!("system peer {now} (was {was})"))),
            (None, Some(now)) => out.push(Event::info("peer", "", format!("system peer {now}"))),
            (Some(was), None) => out.push(Event::warn("peer", "", format!("no system peer (was {was})"))),
            (None, None) => {}
        }
    }
    match (o.holdover, n.holdover) {
        (false, true) => out.push(Event::warn(
            "holdover",
            "",
            format!(
                "holdover: no source selected, serving the last estimate (root dispersion {:.6} s, growing)",
                n.root_dispersion_s
            ),
        )),
        (true, false) if n.synced => out.push(Event::info(
            "holdover",
            "",
            "holdover left: a source is selected".into(),
        )),
        _ => {}
    }
    match (o.synced, n.synced) {
        (false, true) => out.push(Event::info(
            "sync",
            "",
            format!("synchronised: stratum {}, refid {}", n.stratum, n.refid),
        )),
        (true, false) => out.push(Event::warn(
            "sync",
            "",
            format!(
                "unsynchronised: {}",
                n.why_unsynced.as_deref().unwrap_or("no usable time")
            ),
        )),
        _ => {}
    }
    let leap = |l: &str| l == "insert second" || l == "delete second";
    if n.leaps_applied > o.leaps_applied {
        let what = if o.leap == "delete second" {
            "23:59:59 deleted"
        } else {
            "23:59:60 inserted"
        };
        out.push(Event::info("leap", "", format!("leap second applied: {what}")));
    } else if o.leap != n.leap && (leap(&o.leap) || leap(&n.leap)) {
        out.push(match leap(&n.leap) {
            true => Event::warn("leap", "", format!("leap second announced: {}", n.leap)),
            false => Event::info(
                "leap",
                "",
                format!("leap second announcement withdrawn (leap {})", n.leap),
            ),
        });
    }
    for (kind, old, new, back) in [
        (
            "panic",
            &o.refused,
            &n.refused,
            "correction no longer over the panic threshold",
        ),
        (
            "few",
            &o.few_sources,
            &n.few_sources,
            "enough sources selectable to outvote a falseticker",
        ),
    ] {
        match (old, new) {
            (None, Some(w)) => out.push(Event::warn(kind, "", w.clone())),
            (Some(_), None) => out.push(Event::info(kind, "", back.to_string())),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> SyncReport {
        SyncReport {
            sources: vec![
                SourceReport {
                    name: "127.0.0.1".into(),
                    addr: Some("127.0.0.1:11123".parse().unwrap()),
                    tally: '*',
                    refid: "LOCL".into(),
                    stratum: 1,
                    kind: 'u',
                    when_s: Some(3),
                    poll_log2: 6,
                    reach: 0o377,
                    delay_ms: Some(0.05),
                    offset_ms: Some(-0.012),
                    jitter_ms: Some(0.004),
                    why: None,
                    nts: None,
                },
                SourceReport {
                    name: "pool.example".into(),
                    addr: None,
                    tally: ' ',
                    refid: String::new(),
                    stratum: 0,
                    kind: 'p',
                    when_s: None,
                    poll_log2: 6,
                    reach: 0,
                    delay_ms: None,
                    offset_ms: None,
                    jitter_ms: None,
                    why: Some("DNS failure: no address".into()),
                    nts: None,
                },
            ],
            system: SystemReport {
                synced: true,
                why_unsynced: None,
                holdover: false,
                stratum: 2,
                refid: "127.0.0.1".into(),
                system_peer: Some("127.0.0.1:11123".into()),
                offset_s: 1e-6,
                correction_s: 0.1,
                frequency_ppm: -100.0,
                root_delay_s: 0.001,
                root_dispersion_s: 0.0002,
                leap: "normal".into(),
                last_update_unix_s: Some(1_700_000_000.0),
                since_update_s: Some(12.0),
                mode: "software".into(),
                kernel_frequency_ppm: 0.0,
                external_steps: 1,
                kernel_event: Some(
                    "kernel clock stepped by +5.000000 s by another program (compensated), 3 s ago".into(),
                ),
                leap_note: None,
                leaps_applied: 0,
                refused: None,
                few_sources: None,
            },
            stray: StrayReport {
                unknown_source: 4,
                too_short: 1,
                wrong_origin: 2,
                unexpected: 3,
            },
        }
    }

    #[test]
    fn sources_table() {
        let r = report();
        let t = render_sources(&r, false);
        let line = t.lines().nth(2).unwrap();
        assert!(line.starts_with("*127.0.0.1:11123"), "{line}");
        assert!(line.contains(" 377 "), "reach in octal: {line}");
        assert!(line.contains("   64 "), "poll in seconds: {line}");
        assert!(!t.contains("DNS failure"));
        let w = render_sources(&r, true);
        assert!(w.contains("DNS failure: no address"));
        assert!(w.lines().nth(3).unwrap().starts_with(" pool.example"));
    }

    #[test]
    fn a_source_lost_and_back_gives_one_event_per_change() {
        let up = report();
        let mut down = report();
        down.sources[0].reach = 0;
        down.sources[0].tally = ' ';
        down.sources[0].why = Some("unreachable (no reply to 8 polls)".into());
        down.system.system_peer = None;
        down.system.holdover = true;
        let lost = changes(&up, &down);
        let texts: Vec<&str> = lost.iter().map(|e| e.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "source 127.0.0.1:11123 unreachable: unreachable (no reply to 8 polls)",
                "source 127.0.0.1:11123 deselected: unreachable (no reply to 8 polls)",
                "no system peer (was 127.0.0.1:11123)",
                "holdover: no source selected, serving the last estimate (root dispersion 0.000200 s, growing)",
            ]
        );
        assert!(lost.iter().all(|e| e.level == log::Level::Warn));
        assert!(changes(&down, &down).is_empty(), "no change, no event");
        let back = changes(&down, &up);
        assert_eq!(back[0].text, "source 127.0.0.1:11123 reachable again");
        assert_eq!(back[1].text, "source 127.0.0.1:11123 selected (system peer)");
        assert!(back.iter().all(|e| e.level == log::Level::Info), "{back:?}");
        let mut unsynced = down.clone();
        unsynced.system.synced = false;
        unsynced.system.holdover = false;
        unsynced.system.why_unsynced = Some("holdover limit reached".into());
        unsynced.system.leap = "not synchronised".into();
        let e = changes(&down, &unsynced);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].text, "unsynchronised: holdover limit reached");
        let mut leap = up.clone();
        leap.system.leap = "insert second".into();
        assert_eq!(changes(&up, &leap)[0].text, "leap second announced: insert second");
    }

    #[test]
    fn status_text() {
        let t = render_status(&report());
        assert!(t.contains("Stratum         : 2"));
        assert!(t.contains("2023-11-14 22:13:20 (12 s ago)"), "{t}");
        assert!(t.contains("-100.000 ppm"));
        assert!(t.contains("Synchronised    : yes"));
        assert!(
            t.contains("Kernel clock    : left alone, frequency setting +0.000 ppm, 1 external step(s)"),
            "{t}"
        );
        assert!(
            t.contains("Kernel event    : kernel clock stepped by +5.000000 s"),
            "{t}"
        );
        assert!(
            t.contains("Stray replies   : 10 (unknown source 4, wrong origin 2, unexpected 3, too short 1)"),
            "{t}"
        );
    }
}
