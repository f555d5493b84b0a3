//! Who gets answered: the subnet access table and the per-client rate limiter. Pure: time and
//! randomness are arguments, nothing here does I/O on the request path.

pub mod access;
pub mod ratelimit;
pub mod set;

pub use access::{AccessTable, Action, Match, Prefix, PrefixError, Rule, UnknownAction, linear_lookup};
pub use ratelimit::{Checked, Limit, Peek, RateLimitConfig, RateLimiter};
pub use set::{PolicyConfig, PolicySet, RuleLines, SharedPolicy};
