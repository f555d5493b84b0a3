//! Source selection (RFC 5905 section 11.2): interval intersection with a strict majority
//! (Marzullo, as chrony does it), cluster pruning, system peer choice and the weighted combine.
//!
//! Each candidate says "the true offset is within `offset ± root_distance`". The region covered
//! by the most intervals wins if more than half of the candidates cover it; candidates whose
//! interval does not contain that region are falsetickers. Without a majority nothing is
//! selected and the clock is not steered.

use crate::proto::LeapIndicator;

/// RFC 5905 NMIN: cluster pruning stops at this many survivors.
pub const MIN_CLUSTER: usize = 3;
/// chrony's `combinelimit`: survivors farther than this many times the system peer's root
/// distance are not combined.
pub const COMBINE_LIMIT: f64 = 3.0;

/// What selection made of one candidate; maps to the `ntpq -p` tally code.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verdict {
    /// '*': the system peer.
    SystemPeer,
    /// '+': survivor, combined.
    Combined,
    /// '-': discarded by cluster pruning (outlier among the truechimers).
    Outlier,
    /// '#': survivor not combined, root distance over [`COMBINE_LIMIT`] times the peer's.
    Distant,
    /// 'x': its interval misses the majority's region.
    Falseticker,
    /// ' ': no majority agreement among the candidates, so nobody is selected.
    NoMajority,
}

impl Verdict {
    pub fn tally(self) -> char {
        match self {
            Verdict::SystemPeer => '*',
            Verdict::Combined => '+',
            Verdict::Outlier => '-',
            Verdict::Distant => '#',
            Verdict::Falseticker => 'x',
            Verdict::NoMajority => ' ',
        }
    }
}

/// One source's claim, all at the same instant.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Candidate {
    /// Upstream time minus local realtime (s).
    pub offset: f64,
    pub frequency: f64,
    pub frequency_sigma: f64,
    pub offset_sigma: f64,
    /// RFC 5905 lambda (s).
    pub root_distance: f64,
    /// Peer jitter (s).
    pub jitter: f64,
    pub stratum: u8,
    pub leap: LeapIndicator,
    pub prefer: bool,
    pub trust: bool,
}

/// The combined result when a majority agrees.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Outcome {
    /// Index into the candidate slice.
    pub system_peer: usize,
    /// Combined offset (s), weighted by 1 / root distance.
    pub offset: f64,
    pub offset_sigma: f64,
    /// Combined frequency, weighted by inverse variance.
    pub frequency: f64,
    pub frequency_sigma: f64,
    /// RFC 5905 system jitter: RMS of the combined survivors' offsets about the peer's.
    pub jitter: f64,
    /// Held by more than half of the survivors, else no warning.
    pub leap: LeapIndicator,
    pub survivors: usize,
}

#[derive(Clone, PartialEq, Debug)]
pub struct Selection {
    pub verdicts: Vec<Verdict>,
    pub outcome: Option<Outcome>,
    /// Size of the largest agreeing group, for the operator.
    pub agreeing: usize,
}

/// Selects among `candidates` (all fit: reachable, sane distance). `current_peer` is kept as the
/// system peer while it survives and is not much worse than the best, to avoid clock hopping.
pub fn select(candidates: &[Candidate], current_peer: Option<usize>) -> Selection {
    let n = candidates.len();
    let mut verdicts = vec![Verdict::NoMajority; n];
    let Some((lo, hi, depth)) = best_region(candidates) else {
        return Selection {
            verdicts,
            outcome: None,
            agreeing: 0,
        };
    };
    let any_trusted = candidates.iter().any(|c| c.trust);
    if depth * 2 <= n && !any_trusted {
        return Selection {
            verdicts,
            outcome: None,
            agreeing: depth,
        };
    }
    let mut survivors: Vec<usize> = Vec::with_capacity(n);
    for (i, c) in candidates.iter().enumerate() {
        if c.offset - c.root_distance <= lo && c.offset + c.root_distance >= hi {
            survivors.push(i);
        } else {
            verdicts[i] = Verdict::Falseticker;
        }
    }
    // Cluster pruning (RFC 5905 section 11.2.2): drop the survivor with the largest selection
    // jitter while that exceeds the smallest peer jitter.
    while survivors.len() > MIN_CLUSTER {
        let selection_jitter = |i: usize| {
            let s: f64 = survivors
                .iter()
                .map(|&j| (candidates[j].offset - candidates[i].offset).powi(2))
                .sum();
            (s / (survivors.len() - 1) as f64).sqrt()
        };
        let (worst_pos, worst) = survivors
            .iter()
            .enumerate()
            .map(|(p, &i)| (p, selection_jitter(i)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("non-empty");
        let min_peer_jitter = survivors
            .iter()
            .map(|&i| candidates[i].jitter)
            .fold(f64::INFINITY, f64::min);
        if worst <= min_peer_jitter {
            break;
        }
        verdicts[survivors[worst_pos]] = Verdict::Outlier;
        survivors.remove(worst_pos);
    }
    let best = *survivors
        .iter()
        .min_by(|&&a, &&b| candidates[a].root_distance.total_cmp(&candidates[b].root_distance))
        .expect("a majority region has survivors");
    let best_distance = candidates[best].root_distance;
    let peer = survivors
        .iter()
        .copied()
        .filter(|&i| candidates[i].prefer)
        .min_by(|&a, &b| candidates[a].root_distance.total_cmp(&candidates[b].root_distance))
        .or(current_peer.filter(|p| survivors.contains(p) && candidates[*p].root_distance <= 1.5 * best_distance))
        .unwrap_or(best);
    let limit = COMBINE_LIMIT * candidates[peer].root_distance;
    let mut combined = Vec::with_capacity(survivors.len());
    for &i in &survivors {
        if i == peer {
            verdicts[i] = Verdict::SystemPeer;
            combined.push(i);
        } else if candidates[i].root_distance <= limit {
            verdicts[i] = Verdict::Combined;
            combined.push(i);
        } else {
            verdicts[i] = Verdict::Distant;
        }
    }
    let weight = |i: usize| 1.0 / candidates[i].root_distance.max(1e-9);
    let sw: f64 = combined.iter().map(|&i| weight(i)).sum();
    let offset = combined.iter().map(|&i| weight(i) * candidates[i].offset).sum::<f64>() / sw;
    let offset_sigma = combined
        .iter()
        .map(|&i| weight(i) * candidates[i].offset_sigma)
        .sum::<f64>()
        / sw;
    let fweight = |i: usize| 1.0 / candidates[i].frequency_sigma.max(1e-12).powi(2);
    let fw: f64 = combined.iter().map(|&i| fweight(i)).sum();
    let frequency = combined
        .iter()
        .map(|&i| fweight(i) * candidates[i].frequency)
        .sum::<f64>()
        / fw;
    let jitter = (combined
        .iter()
        .map(|&i| weight(i) * (candidates[i].offset - candidates[peer].offset).powi(2))
        .sum::<f64>()
        / sw)
        .sqrt();
    let leap = [LeapIndicator::AddSecond, LeapIndicator::DeleteSecond]
        .into_iter()
        .find(|&l| survivors.iter().filter(|&&i| candidates[i].leap == l).count() * 2 > survivors.len())
        .unwrap_or(LeapIndicator::NoWarning);
    Selection {
        verdicts,
        outcome: Some(Outcome {
            system_peer: peer,
            offset,
            offset_sigma,
            frequency,
            frequency_sigma: (1.0 / fw).sqrt(),
            jitter,
            leap,
            survivors: survivors.len(),
        }),
        agreeing: depth,
    }
}

/// Marzullo's sweep: the first region covered by the most intervals, and how many cover it.
/// With trusted candidates, only regions covered by a trusted interval count.
fn best_region(candidates: &[Candidate]) -> Option<(f64, f64, usize)> {
    if candidates.is_empty() {
        return None;
    }
    // (value, +1 for a lower end, -1 for an upper end, trusted)
    let mut ends: Vec<(f64, i32, bool)> = Vec::with_capacity(2 * candidates.len());
    for c in candidates {
        ends.push((c.offset - c.root_distance, 1, c.trust));
        ends.push((c.offset + c.root_distance, -1, c.trust));
    }
    // Lower ends first at equal values, so touching intervals count as overlapping.
    ends.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
    let any_trusted = candidates.iter().any(|c| c.trust);
    let (mut depth, mut trusted_depth) = (0i32, 0i32);
    let mut best: Option<(f64, f64, usize)> = None;
    for (k, &(v, step, trust)) in ends.iter().enumerate() {
        depth += step;
        if trust {
            trusted_depth += step;
        }
        if step == 1 && (!any_trusted || trusted_depth > 0) && best.is_none_or(|b| depth as usize > b.2) {
            let hi = ends[k + 1..].iter().find(|e| e.1 == -1).map_or(v, |e| e.0);
            best = Some((v, hi, depth as usize));
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(offset: f64, distance: f64) -> Candidate {
        Candidate {
            offset,
            frequency: 0.0,
            frequency_sigma: 1e-6,
            offset_sigma: 1e-4,
            root_distance: distance,
            jitter: 1e-4,
            stratum: 1,
            leap: LeapIndicator::NoWarning,
            prefer: false,
            trust: false,
        }
    }

    #[test]
    fn falsetickers_marked_and_majority_wins() {
        let cands = [
            c(0.001, 0.01),
            c(-0.001, 0.01),
            c(0.0, 0.012),
            c(1.0, 0.01),
            c(0.0005, 0.02),
        ];
        let s = select(&cands, None);
        assert_eq!(s.verdicts[3], Verdict::Falseticker);
        let o = s.outcome.unwrap();
        assert!(o.offset.abs() < 0.002, "{}", o.offset);
        assert_eq!(s.verdicts[o.system_peer], Verdict::SystemPeer);
        assert_eq!(s.agreeing, 4);
    }

    #[test]
    fn no_majority_no_outcome() {
        let cands = [c(0.0, 0.01), c(0.001, 0.01), c(1.0, 0.01), c(-1.0, 0.01), c(2.0, 0.01)];
        let s = select(&cands, None);
        assert!(s.outcome.is_none());
        assert!(s.verdicts.iter().all(|&v| v == Verdict::NoMajority));
        assert_eq!(s.agreeing, 2);
        // Two against two is not a strict majority either.
        let s = select(&[c(0.0, 0.01), c(0.0, 0.01), c(1.0, 0.01), c(1.0, 0.01)], None);
        assert!(s.outcome.is_none());
    }

    #[test]
    fn trusted_source_decides_without_majority() {
        let mut t = c(1.0, 0.01);
        t.trust = true;
        let s = select(&[c(0.0, 0.01), c(0.0, 0.01), t], None);
        let o = s.outcome.unwrap();
        assert_eq!(o.system_peer, 2);
        assert_eq!(s.verdicts[0], Verdict::Falseticker);
    }

    #[test]
    fn prefer_and_hysteresis() {
        let mut p = c(0.0, 0.02);
        p.prefer = true;
        let s = select(&[c(0.0, 0.01), p, c(0.0, 0.011)], None);
        assert_eq!(s.outcome.unwrap().system_peer, 1);
        let cands = [c(0.0, 0.01), c(0.0, 0.011), c(0.0, 0.012)];
        assert_eq!(select(&cands, None).outcome.unwrap().system_peer, 0);
        assert_eq!(select(&cands, Some(2)).outcome.unwrap().system_peer, 2);
    }

    #[test]
    fn leap_by_majority_and_distant_not_combined() {
        let mut a = c(0.0, 0.01);
        a.leap = LeapIndicator::AddSecond;
        let s = select(&[a, c(0.0, 0.01), c(0.0, 0.5)], None);
        let o = s.outcome.unwrap();
        assert_eq!(o.leap, LeapIndicator::NoWarning);
        assert_eq!(s.verdicts[2], Verdict::Distant);
        let s = select(&[a, a, c(0.0, 0.01)], None);
        assert_eq!(s.outcome.unwrap().leap, LeapIndicator::AddSecond);
    }

    #[test]
    fn cluster_prunes_the_spread_out_one() {
        // All intervals overlap (wide distances) but one sits far from the tight group.
        let cands = [
            c(0.0, 0.5),
            c(0.0001, 0.5),
            c(-0.0001, 0.5),
            c(0.00005, 0.5),
            c(0.3, 0.5),
        ];
        let s = select(&cands, None);
        assert_eq!(s.verdicts[4], Verdict::Outlier);
        assert!(s.outcome.unwrap().offset.abs() < 0.001);
    }
}
