//! The policy the workers apply, as one immutable set, and the handle that swaps a new set in
//! on reload while the workers run.

use super::{AccessTable, Action, RateLimitConfig, RateLimiter, Rule};
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the config says about access and rate limits.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    pub rules: Vec<Rule>,
    /// The action for addresses no rule matches (`address = "default"`; `serve` if absent).
    pub default: Action,
    pub rate_limit: RateLimitConfig,
    /// Where each rule is written, for `gnomon explain`.
    pub lines: RuleLines,
}

/// The config line of each rule (in the order of `rules`) and of the `default` rule; empty
/// when the policy does not come from a file.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct RuleLines {
    pub rules: Vec<usize>,
    pub default: Option<usize>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            rules: Vec::new(),
            default: Action::Serve,
            rate_limit: RateLimitConfig::default(),
            lines: RuleLines::default(),
        }
    }
}

/// One immutable policy: the access table and the rate limiter it feeds.
pub struct PolicySet {
    pub config: PolicyConfig,
    pub access: AccessTable,
    /// Shared by every worker, so a client's budget is the same whichever worker it meets.
    pub limiter: Arc<RateLimiter>,
}

impl PolicySet {
    /// Builds the set; the limiter of `previous` is kept (with its clients' state) when the rate
    /// limit settings did not change, so a reload that only edits rules forgives no one.
    pub fn build(config: PolicyConfig, previous: Option<&PolicySet>) -> PolicySet {
        let access = AccessTable::new(&config.rules, config.default);
        let limiter = match previous {
            Some(p) if p.config.rate_limit == config.rate_limit => p.limiter.clone(),
            _ => Arc::new(RateLimiter::new(&config.rate_limit)),
        };
        PolicySet {
            config,
            access,
            limiter,
        }
    }
}

/// The current set, swapped atomically. Workers check `generation` once per batch (one relaxed
/// load) and take a new `Arc` only when it changed.
pub struct SharedPolicy {
    current: ArcSwap<PolicySet>,
    generation: AtomicU64,
}

impl SharedPolicy {
    pub fn new(set: PolicySet) -> SharedPolicy {
        SharedPolicy {
            current: ArcSwap::from_pointee(set),
            generation: AtomicU64::new(1),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn load(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Swaps in a new set built from `config`; returns the new generation.
    pub fn replace(&self, config: PolicyConfig) -> u64 {
        let old = self.current.load_full();
        self.current.store(Arc::new(PolicySet::build(config, Some(&old))));
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn cfg(rules: &[(&str, Action)], default: Action) -> PolicyConfig {
        PolicyConfig {
            rules: rules
                .iter()
                .map(|(p, a)| Rule {
                    prefix: p.parse().unwrap(),
                    action: *a,
                })
                .collect(),
            default,
            lines: Default::default(),
            rate_limit: RateLimitConfig {
                table_bytes: 4096,
                ..RateLimitConfig::default()
            },
        }
    }

    #[test]
    fn replace_swaps_rules_and_keeps_an_unchanged_limiter() {
        let shared = SharedPolicy::new(PolicySet::build(
            cfg(&[("10.0.0.0/8", Action::Deny)], Action::Serve),
            None,
        ));
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let first = shared.load();
        assert_eq!(first.access.lookup(ip).action, Action::Deny);
        let g = shared.replace(cfg(&[("10.0.0.0/8", Action::Ignore)], Action::Serve));
        assert_eq!(g, shared.generation());
        let second = shared.load();
        assert_eq!(second.access.lookup(ip).action, Action::Ignore);
        assert!(Arc::ptr_eq(&first.limiter, &second.limiter));
        // New limits: a new table.
        let mut c = cfg(&[], Action::Limited);
        c.rate_limit.burst = 2;
        shared.replace(c);
        assert!(!Arc::ptr_eq(&second.limiter, &shared.load().limiter));
    }
}
