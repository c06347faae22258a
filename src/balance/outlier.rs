//! Passive health: outlier ejection on consecutive failures.
//!
//! The request path only counts (each completed [`Pick`](super::Pick) updates
//! its endpoint's run of consecutive failures); the detector reads those
//! counts in a periodic sweep, so ejection costs the hot path nothing. An
//! endpoint whose run reaches the threshold is ejected for the base time,
//! doubled on each repeat ejection up to a cap, unless that would eject more
//! than the allowed share of the set. An ejected endpoint returns when its
//! time is up, and its repeat count decays as it stays healthy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::clock::Nanos;
use super::endpoint::{EndpointSet, HealthFlag};

/// Settings of passive outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive failures that eject an endpoint.
    pub consecutive_failures: u32,
    /// Ejection time of a first ejection; doubled on each repeat.
    pub base_ejection: Duration,
    /// Longest ejection, however often it repeats.
    pub max_ejection: Duration,
    /// Never eject more than this percentage of the endpoints.
    pub max_ejection_percent: u8,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// What a sweep did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutlierEvent {
    /// The endpoint was ejected for this long.
    Ejected { addr: SocketAddr, duration: Duration },
    /// The endpoint's ejection ended.
    Restored { addr: SocketAddr },
    /// The endpoint reached the threshold, but ejecting it would exceed the allowed share.
    Spared { addr: SocketAddr },
}

#[derive(Clone, Copy, Debug, Default)]
struct State {
    /// Ejections that count towards the back-off.
    ejections: u32,
    /// While ejected: when it ends.
    until: Option<Nanos>,
    /// When the back-off count last changed, for its decay.
    since: Nanos,
}

/// Ejects endpoints that keep failing. One per endpoint set family.
#[derive(Debug, Default)]
pub struct OutlierDetector {
    config: OutlierConfig,
    states: HashMap<SocketAddr, State>,
}

impl OutlierDetector {
    /// A detector with `config`.
    pub fn new(config: OutlierConfig) -> Self {
        OutlierDetector { config, states: HashMap::new() }
    }

    /// Replaces the settings; current ejections run their course.
    pub fn set_config(&mut self, config: OutlierConfig) {
        self.config = config;
    }

    /// Ejects and restores endpoints of `set` as of `now`, and forgets
    /// endpoints that left the set. Call it periodically (every 100 ms, say)
    /// and after the set is replaced.
    pub fn sweep(&mut self, set: &EndpointSet, now: Nanos) -> Vec<OutlierEvent> {
        let mut events = Vec::new();
        self.states.retain(|addr, _| set.get(*addr).is_some());
        let total = set.len();
        let mut ejected = set.members().iter().filter(|m| m.endpoint().health().has(HealthFlag::Ejected)).count();
        let cfg = self.config;
        for m in set.members() {
            let e = m.endpoint();
            let state = self.states.entry(e.addr()).or_insert(State { since: now, ..State::default() });
            match state.until {
                Some(until) if now >= until => {
                    state.until = None;
                    state.since = now;
                    e.reset_failures();
                    e.set_flag(HealthFlag::Ejected, false);
                    ejected = ejected.saturating_sub(1);
                    events.push(OutlierEvent::Restored { addr: e.addr() });
                }
                Some(_) => {}
                None if cfg.consecutive_failures > 0 && e.consecutive_failures() >= cfg.consecutive_failures => {
                    if (ejected + 1) * 100 > usize::from(cfg.max_ejection_percent) * total {
                        events.push(OutlierEvent::Spared { addr: e.addr() });
                        continue;
                    }
                    state.ejections = state.ejections.saturating_add(1);
                    let duration = backoff(&cfg, state.ejections);
                    state.until = Some(now.after(duration));
                    state.since = now;
                    e.set_flag(HealthFlag::Ejected, true);
                    ejected += 1;
                    events.push(OutlierEvent::Ejected { addr: e.addr(), duration });
                }
                None => {
                    // Healthy for a base ejection time: one repeat forgiven.
                    if state.ejections > 0 && now.since(state.since) >= cfg.base_ejection {
                        state.ejections -= 1;
                        state.since = now;
                    }
                }
            }
        }
        events
    }
}

/// base × 2^(n − 1), capped.
fn backoff(cfg: &OutlierConfig, ejections: u32) -> Duration {
    let factor = 1u32.checked_shl(ejections.saturating_sub(1)).unwrap_or(u32::MAX);
    cfg.base_ejection.saturating_mul(factor).min(cfg.max_ejection)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let cfg = OutlierConfig::default();
        let got: Vec<u64> = (1..=6).map(|n| backoff(&cfg, n).as_secs()).collect();
        assert_eq!(got, [30, 60, 120, 240, 300, 300]);
        assert_eq!(backoff(&cfg, u32::MAX), cfg.max_ejection);
    }
}
