//! Leap seconds, as chrony does them by default: which one is due (the majority of the selected
//! sources, or the operator's `leap-seconds.list`), accepted only for the end of June or
//! December and announced (LI 1/2) only during that last day, and the instant it takes effect
//! in served time. Sans-IO: the engine feeds votes and times.
//!
//! In Unix (and NTP) time a leap second is a step: an inserted 23:59:60 repeats 23:59:59 (the
//! clock goes back 1 s at midnight), a deleted 23:59:59 is skipped (forward 1 s at 23:59:59).
//! The published snapshot carries that instant, so every reply on either side of it is exact;
//! the engine then moves its samples and correction by the same second (see
//! [`super::SyncCore`]), as chrony corrects its sample history when the clock leaps.

use super::ClockMode;
use crate::clock::ClockState;
use crate::proto::LeapIndicator;
use core::fmt;

const NS: i64 = 1_000_000_000;
const DAY_S: i64 = 86_400;
/// NTP era 0 starts 2208988800 s before the Unix epoch.
const NTP_UNIX_OFFSET: i64 = 2_208_988_800;
/// Samples this close (s) to a leap second are dropped: an upstream may leap a little early or
/// late, and an exchange that spans the leap measures neither side (chrony's LEAP_SECOND_CLOSE).
pub const LEAP_CLOSE_NS: i64 = 5 * NS;

/// What to do about leap seconds (`[leap] mode`).
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub enum LeapMode {
    /// Announce it on the last day and apply it at 23:59:60 (chrony's default, no smear).
    #[default]
    Apply,
    /// Never announce or apply one: after a leap the sources are a second off and the
    /// discipline slews it out over hours (chrony's `leapsecmode ignore`).
    Ignore,
}

impl LeapMode {
    pub fn name(self) -> &'static str {
        match self {
            LeapMode::Apply => "apply",
            LeapMode::Ignore => "ignore",
        }
    }
}

/// `[leap]` as configured.
#[derive(Clone, PartialEq, Debug, Default)]
pub struct LeapConfig {
    pub mode: LeapMode,
    /// A leap-seconds list, read at start; while it has not expired it alone decides.
    pub list: Option<LeapList>,
}

/// An inserted or a deleted second.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Leap {
    Insert,
    Delete,
}

impl Leap {
    pub fn indicator(self) -> LeapIndicator {
        match self {
            Leap::Insert => LeapIndicator::AddSecond,
            Leap::Delete => LeapIndicator::DeleteSecond,
        }
    }

    fn of(li: LeapIndicator) -> Option<Leap> {
        match li {
            LeapIndicator::AddSecond => Some(Leap::Insert),
            LeapIndicator::DeleteSecond => Some(Leap::Delete),
            _ => None,
        }
    }

    /// What served (Unix) time does at the leap: back a second, or forward one.
    pub fn step_ns(self) -> i64 {
        match self {
            Leap::Insert => -NS,
            Leap::Delete => NS,
        }
    }

    /// The Unix instant the step happens at, for a leap at the end of the day that ends at
    /// `midnight_ns`: midnight for an insert (23:59:60 then reads 23:59:59 again), 23:59:59 for
    /// a delete (the second that is skipped).
    pub fn at_ns(self, midnight_ns: i64) -> i64 {
        match self {
            Leap::Insert => midnight_ns,
            Leap::Delete => midnight_ns - NS,
        }
    }
}

/// Days since 1970-01-01 as (year, month, day), after Howard Hinnant's civil_from_days.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Whether the UTC day of Unix time `unix_s` is the last of June or December: the only days a
/// leap second may end (chrony's is_leap_second_day; the IERS has only ever used these).
pub fn is_leap_day(unix_s: i64) -> bool {
    let (_, m, d) = civil_from_days(unix_s.div_euclid(DAY_S));
    (m == 6 && d == 30) || (m == 12 && d == 31)
}

/// `YYYY-MM-DD hh:mm:ss` of a Unix time (UTC).
pub fn utc_text(unix_s: i64) -> String {
    let (y, m, d) = civil_from_days(unix_s.div_euclid(DAY_S));
    let sod = unix_s.rem_euclid(DAY_S);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// A `leap-seconds.list` problem, with its line (1-based).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LeapListError {
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for LeapListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for LeapListError {}

/// The IERS/NIST `leap-seconds.list` (Debian's tzdata ships it as
/// `/usr/share/zoneinfo/leap-seconds.list`): lines of `NTP-seconds TAI-UTC`, each the instant
/// from which the new TAI-UTC holds, `#@` the expiry and `#$` the last update.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LeapList {
    /// Where it was read from, for the status.
    pub path: String,
    /// (Unix seconds, TAI-UTC from then on), in order.
    pub entries: Vec<(i64, i32)>,
    /// Unix seconds after which the list no longer says anything about the future.
    pub expires_unix_s: i64,
}

impl LeapList {
    pub fn parse(text: &str, path: &str) -> Result<LeapList, LeapListError> {
        let mut entries: Vec<(i64, i32)> = Vec::new();
        let mut expires = None;
        let err = |line: usize, message: String| LeapListError {
            line: Some(line),
            message,
        };
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            if let Some(rest) = raw.strip_prefix("#@") {
                let ntp: i64 = rest
                    .trim()
                    .parse()
                    .map_err(|_| err(n, format!("expiry `{}` is not NTP seconds", rest.trim())))?;
                expires = Some(ntp - NTP_UNIX_OFFSET);
                continue;
            }
            let data = raw.split('#').next().unwrap_or("").trim();
            if data.is_empty() {
                continue;
            }
            let mut fields = data.split_whitespace();
            let (Some(t), Some(dtai), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(err(n, format!("expected `NTP-seconds TAI-UTC`, got `{data}`")));
            };
            let t: i64 = t.parse().map_err(|_| err(n, format!("`{t}` is not NTP seconds")))?;
            let dtai: i32 = dtai
                .parse()
                .map_err(|_| err(n, format!("`{dtai}` is not a TAI-UTC offset")))?;
            let unix = t - NTP_UNIX_OFFSET;
            if unix.rem_euclid(DAY_S) != 0 {
                return Err(err(n, format!("{t} is not a midnight (UTC)")));
            }
            if entries.last().is_some_and(|&(prev, _)| unix <= prev) {
                return Err(err(n, format!("{t} is not after the line before")));
            }
            entries.push((unix, dtai));
        }
        let Some(expires_unix_s) = expires else {
            return Err(LeapListError {
                line: None,
                message: "no expiry line (`#@ NTP-seconds`): a list that cannot expire cannot be trusted".into(),
            });
        };
        if entries.is_empty() {
            return Err(LeapListError {
                line: None,
                message: "no leap second lines".into(),
            });
        }
        Ok(LeapList {
            path: path.to_string(),
            entries,
            expires_unix_s,
        })
    }

    pub fn expired(&self, unix_s: i64) -> bool {
        unix_s >= self.expires_unix_s
    }

    /// The leap second that ends the UTC day of `unix_s`, if the list has one.
    pub fn leap_ending_day_of(&self, unix_s: i64) -> Option<Leap> {
        let midnight = (unix_s.div_euclid(DAY_S) + 1) * DAY_S;
        let k = self.entries.iter().position(|e| e.0 == midnight)?;
        let prev = self.entries.get(k.checked_sub(1)?)?.1;
        match self.entries[k].1 - prev {
            1 => Some(Leap::Insert),
            -1 => Some(Leap::Delete),
            _ => None,
        }
    }
}

/// Who announced the leap second that is due.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Announcer {
    /// The majority of the sources that survived selection.
    Sources,
    /// The operator's leap-seconds list.
    List,
}

/// A leap second accepted for the end of today.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Scheduled {
    pub leap: Leap,
    /// Unix nanoseconds at which served time steps (see [`Leap::at_ns`]).
    pub at_unix_ns: i64,
    pub by: Announcer,
}

/// The engine's leap state.
#[derive(Clone, Debug)]
pub struct LeapControl {
    config: LeapConfig,
    mode: ClockMode,
    /// What the selected sources' majority said at the last selection.
    vote: LeapIndicator,
    pub scheduled: Option<Scheduled>,
    /// The step instant of the last leap applied: never scheduled again (an inserted second
    /// repeats 23:59:59 of the same leap day, whose sources still say LI 1).
    last_applied: Option<i64>,
    /// Leap seconds applied since start.
    pub applied: u32,
}

impl LeapControl {
    pub fn new(config: LeapConfig, mode: ClockMode) -> LeapControl {
        LeapControl {
            config,
            mode,
            vote: LeapIndicator::NoWarning,
            scheduled: None,
            last_applied: None,
            applied: 0,
        }
    }

    pub fn config(&self) -> &LeapConfig {
        &self.config
    }

    /// Decides, at served (Unix) time `true_ns`, after a selection whose majority said `vote`,
    /// which leap second (if any) ends today. A valid list decides alone; an expired one, or
    /// none, leaves it to the sources. Only on the last day of June or December.
    pub fn decide(&mut self, vote: LeapIndicator, true_ns: i64) {
        self.vote = vote;
        let unix_s = true_ns.div_euclid(NS);
        let midnight_ns = (unix_s.div_euclid(DAY_S) + 1) * DAY_S * NS;
        let wanted = match (&self.config.mode, &self.config.list) {
            (LeapMode::Ignore, _) => None,
            (LeapMode::Apply, Some(list)) if !list.expired(unix_s) => {
                list.leap_ending_day_of(unix_s).map(|l| (l, Announcer::List))
            }
            (LeapMode::Apply, _) => Leap::of(vote).map(|l| (l, Announcer::Sources)),
        };
        self.scheduled = wanted
            .filter(|_| is_leap_day(unix_s))
            .map(|(leap, by)| Scheduled {
                leap,
                at_unix_ns: leap.at_ns(midnight_ns),
                by,
            })
            .filter(|s| self.last_applied != Some(s.at_unix_ns) && true_ns < s.at_unix_ns);
    }

    /// The realtime (of `state`'s timeline) at which its served time reaches `unix_ns`.
    fn realtime_of(state: &ClockState, unix_ns: i64) -> i64 {
        let mut rt = unix_ns - state.offset_ns;
        for _ in 0..3 {
            rt += unix_ns - state.true_time_ns(rt);
        }
        rt
    }

    /// Puts the scheduled leap into a state to publish: LI 1/2 until it, the instant, and the
    /// step served time makes there (none in system mode, where the kernel clock steps itself).
    pub fn stamp(&self, mut state: ClockState) -> ClockState {
        state.leap_at_ns = i64::MAX;
        state.leap_step_ns = 0;
        if !state.is_synchronized() {
            return state;
        }
        state.leap = LeapIndicator::NoWarning;
        if let Some(s) = self.scheduled {
            state.leap = s.leap.indicator();
            state.leap_at_ns = Self::realtime_of(&state, s.at_unix_ns);
            if self.mode == ClockMode::Software {
                state.leap_step_ns = s.leap.step_ns();
            }
        }
        state
    }

    /// The scheduled leap took effect: forget it, and never schedule it again.
    pub fn done(&mut self) -> Option<Scheduled> {
        let s = self.scheduled.take()?;
        self.last_applied = Some(s.at_unix_ns);
        self.applied += 1;
        Some(s)
    }

    /// For `gnomon status`: what is scheduled, or why a list is not used.
    pub fn note(&self, true_ns: i64) -> Option<String> {
        let unix_s = true_ns.div_euclid(NS);
        if let Some(s) = self.scheduled {
            let what = match s.leap {
                Leap::Insert => format!("insert 23:59:60 after {}", utc_text(s.at_unix_ns / NS - 1)),
                Leap::Delete => format!("delete {}", utc_text(s.at_unix_ns / NS)),
            };
            let by = match s.by {
                Announcer::Sources => "announced by the majority of selected sources".to_string(),
                Announcer::List => match &self.config.list {
                    Some(l) => format!("from {}", l.path),
                    None => "from the list".to_string(),
                },
            };
            return Some(format!("{what} UTC ({by})"));
        }
        if let Some(l) = &self.config.list
            && l.expired(unix_s)
        {
            return Some(format!(
                "{} expired on {} UTC: the sources' leap indicator is used",
                l.path,
                utc_text(l.expires_unix_s)
            ));
        }
        if self.config.mode == LeapMode::Ignore {
            return Some("ignored (leap = \"ignore\"): never announced or applied".into());
        }
        if Leap::of(self.vote).is_some() && !is_leap_day(unix_s) {
            return Some("announced by the sources, served only on the last day of June or December".into());
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The end of Debian's list (tzdata 2024): 2012, 2015 and 2016 inserts.
    pub const LIST: &str = "#\tleap-seconds.list\n#$\t3960835200\n#@\t3991593600\n\
        2272060800\t10\t# 1 Jan 1972\n3550089600\t35\t# 1 Jul 2012\n\
        3644697600\t36\t# 1 Jul 2015\n3692217600\t37\t# 1 Jan 2017\n\
        #h\t16edd0f0 3666784f 37db7d56 85b5ec7b 4a6a7a2d\n";

    /// 2017-01-01 00:00:00 UTC.
    const NY2017: i64 = 1_483_228_800;

    #[test]
    fn calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(utc_text(NY2017 - 1), "2016-12-31 23:59:59");
        assert!(is_leap_day(NY2017 - 1));
        assert!(!is_leap_day(NY2017));
        assert!(!is_leap_day(NY2017 - DAY_S - 1), "Dec 30");
        assert!(is_leap_day(1_435_708_800 - 1), "2015-06-30");
        assert!(!is_leap_day(1_435_708_800 - DAY_S * 30 - 1), "May 31");
    }

    #[test]
    fn list_parses_and_names_the_leaps() {
        let l = LeapList::parse(LIST, "leap-seconds.list").unwrap();
        assert_eq!(l.entries.len(), 4);
        assert_eq!(l.expires_unix_s, 3_991_593_600 - NTP_UNIX_OFFSET);
        assert_eq!(l.leap_ending_day_of(NY2017 - 10), Some(Leap::Insert));
        assert_eq!(l.leap_ending_day_of(NY2017 - DAY_S - 10), None);
        assert_eq!(l.leap_ending_day_of(NY2017 + 10), None);
        // The first line is the 1972 baseline, not a leap.
        assert_eq!(l.leap_ending_day_of(2_272_060_800 - NTP_UNIX_OFFSET - 10), None);
        let bad = LIST.replace("3644697600\t36", "3544697600\t36");
        let e = LeapList::parse(&bad, "x").unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
        let e = LeapList::parse(&LIST.replace("\t36", "\tx"), "x").unwrap_err();
        assert!(e.to_string().contains("line 6: `x` is not a TAI-UTC offset"), "{e}");
        let e = LeapList::parse(&LIST.replace("#@", "# "), "x").unwrap_err();
        assert!(e.to_string().contains("no expiry"), "{e}");
        let e = LeapList::parse(&LIST.replace("3692217600\t37", "3692217601\t37"), "x").unwrap_err();
        assert!(e.to_string().contains("line 7: 3692217601 is not a midnight"), "{e}");
        // Debian's own file, where this machine has one.
        if let Ok(text) = std::fs::read_to_string("/usr/share/zoneinfo/leap-seconds.list") {
            let l = LeapList::parse(&text, "tzdata").unwrap();
            assert_eq!(l.leap_ending_day_of(NY2017 - 1), Some(Leap::Insert));
        }
    }

    fn synced_at(base: i64) -> ClockState {
        ClockState {
            base_realtime_ns: base,
            offset_ns: 2_500_000_000,
            frequency: 1e-5,
            leap: LeapIndicator::NoWarning,
            stratum: 2,
            max_root_dispersion: 1.0,
            ..ClockState::unsynchronized(-20)
        }
    }

    #[test]
    fn votes_count_only_on_the_last_day_and_only_once() {
        let mut c = LeapControl::new(LeapConfig::default(), ClockMode::Software);
        let dec30 = (NY2017 - DAY_S - 3600) * NS;
        c.decide(LeapIndicator::AddSecond, dec30);
        assert_eq!(c.scheduled, None, "not the last day yet");
        assert!(c.note(dec30).unwrap().contains("only on the last day"));
        let dec31 = (NY2017 - 3600) * NS;
        c.decide(LeapIndicator::AddSecond, dec31);
        let s = c.scheduled.unwrap();
        assert_eq!(
            (s.leap, s.at_unix_ns, s.by),
            (Leap::Insert, NY2017 * NS, Announcer::Sources)
        );
        assert_eq!(
            c.note(dec31).unwrap(),
            "insert 23:59:60 after 2016-12-31 23:59:59 UTC (announced by the majority of selected sources)"
        );
        let state = c.stamp(synced_at(dec31 - 2_500_000_000));
        assert_eq!(state.leap, LeapIndicator::AddSecond);
        // Up to the instant served time runs on to midnight; there it reads 23:59:59 again.
        assert!((state.true_time_ns(state.leap_at_ns - 1) - (NY2017 * NS - 1)).abs() <= 2);
        assert!((state.true_time_ns(state.leap_at_ns) - (NY2017 - 1) * NS).abs() <= 2);
        assert_eq!(state.leap_step_ns, -NS);
        // In the repeated second the sources still say LI 1: not scheduled again.
        c.done();
        c.decide(LeapIndicator::AddSecond, NY2017 * NS - NS / 2);
        assert_eq!(c.scheduled, None);
        assert_eq!(c.stamp(state).leap, LeapIndicator::NoWarning);
        // Delete: the step is at 23:59:59; system mode leaves the step to the kernel.
        let mut c = LeapControl::new(LeapConfig::default(), ClockMode::System);
        c.decide(LeapIndicator::DeleteSecond, dec31);
        assert_eq!(c.scheduled.unwrap().at_unix_ns, (NY2017 - 1) * NS);
        let st = c.stamp(synced_at(dec31 - 2_500_000_000));
        assert_eq!((st.leap, st.leap_step_ns), (LeapIndicator::DeleteSecond, 0));
    }

    #[test]
    fn a_valid_list_decides_alone_an_expired_one_not() {
        let list = LeapList::parse(LIST, "leap-seconds.list").unwrap();
        let mut c = LeapControl::new(
            LeapConfig {
                mode: LeapMode::Apply,
                list: Some(list.clone()),
            },
            ClockMode::Software,
        );
        let dec31 = (NY2017 - 3600) * NS;
        c.decide(LeapIndicator::NoWarning, dec31);
        assert_eq!(c.scheduled.map(|s| s.by), Some(Announcer::List));
        // 2015-12-31: sources say insert, the list says none.
        let dec31_2015 = (1_451_606_400 - 3600) * NS;
        c.decide(LeapIndicator::AddSecond, dec31_2015);
        assert_eq!(c.scheduled, None);
        let mut expired = list;
        expired.expires_unix_s = NY2017 - 30 * DAY_S;
        let mut c = LeapControl::new(
            LeapConfig {
                mode: LeapMode::Apply,
                list: Some(expired),
            },
            ClockMode::Software,
        );
        c.decide(LeapIndicator::NoWarning, dec31);
        assert_eq!(c.scheduled, None);
        assert!(
            c.note(dec31).unwrap().contains("expired on 2016-12-02 00:00:00 UTC"),
            "{:?}",
            c.note(dec31)
        );
        let mut c = LeapControl::new(
            LeapConfig {
                mode: LeapMode::Ignore,
                list: None,
            },
            ClockMode::Software,
        );
        c.decide(LeapIndicator::AddSecond, dec31);
        assert_eq!(c.scheduled, None);
    }
}
