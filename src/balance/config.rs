//! Balancer settings, validated once at construction.

use std::time::Duration;

use super::maglev::{DEFAULT_TABLE_SIZE, is_prime};

/// How a balancer chooses among the available endpoints of a track.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Each endpoint in turn, weights ignored.
    #[default]
    RoundRobin,
    /// Smooth weighted round robin (the NGINX sequence).
    WeightedRoundRobin,
    /// Weighted random.
    Random,
    /// The fewest in-flight requests per unit of weight, over all endpoints;
    /// ties rotate.
    LeastConnections,
    /// Power of two choices: the less loaded of two random endpoints.
    LeastRequest,
    /// Power of two choices over peak-EWMA latency × (in-flight + 1).
    PeakEwma,
    /// Maglev consistent hashing on a request key.
    ConsistentHash,
}

impl Algorithm {
    /// Every algorithm, in documentation order.
    pub const ALL: [Algorithm; 7] = [
        Algorithm::RoundRobin,
        Algorithm::WeightedRoundRobin,
        Algorithm::Random,
        Algorithm::LeastConnections,
        Algorithm::LeastRequest,
        Algorithm::PeakEwma,
        Algorithm::ConsistentHash,
    ];

    /// The name used in configuration files and the custom resource.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "RoundRobin",
            Algorithm::WeightedRoundRobin => "WeightedRoundRobin",
            Algorithm::Random => "Random",
            Algorithm::LeastConnections => "LeastConnections",
            Algorithm::LeastRequest => "LeastRequest",
            Algorithm::PeakEwma => "PeakEwma",
            Algorithm::ConsistentHash => "ConsistentHash",
        }
    }

    /// Whether configured endpoint weights matter.
    pub(crate) fn uses_weights(self) -> bool {
        !matches!(self, Algorithm::RoundRobin)
    }

    /// Whether slow start applies: not to consistent hashing, where changing
    /// weights would move keys between endpoints.
    pub(crate) fn uses_slow_start(self) -> bool {
        !matches!(self, Algorithm::ConsistentHash)
    }
}

impl std::str::FromStr for Algorithm {
    type Err = UnknownAlgorithm;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Algorithm::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| UnknownAlgorithm(s.to_owned()))
    }
}

/// A name that is not one of [`Algorithm::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown algorithm {0:?}; expected one of RoundRobin, WeightedRoundRobin, Random, LeastConnections, \
     LeastRequest, PeakEwma, ConsistentHash"
)]
pub struct UnknownAlgorithm(pub String);

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Settings of a [`Balancer`](super::Balancer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalancerConfig {
    /// The algorithm applied within each track.
    pub algorithm: Algorithm,
    /// Window over which a new or recovered endpoint's weight ramps from 10%
    /// to full, in tenths. `None` disables slow start.
    pub slow_start: Option<Duration>,
    /// When fewer than this percentage of a track's endpoints are available,
    /// balance over all of them (except draining ones) rather than overload
    /// the few. 0 disables.
    pub panic_threshold_percent: u8,
    /// Traffic split between tracks, as (track name, weight). Empty: one pool,
    /// tracks ignored. Tracks not listed receive no traffic unless no listed
    /// track has an endpoint to offer.
    pub tracks: Vec<(String, u32)>,
    /// Smallest Maglev table size (prime); grown to ≥ 100 × endpoints.
    pub maglev_table_size: u64,
    /// Zone-aware balancing: the proxy's own zone. Within each track, the
    /// endpoints of this zone take the traffic while at least
    /// `zone_min_healthy_percent` of them are available and they are at least
    /// as large a share of the available endpoints as the local proxies are
    /// of `zone_proxies`; with a smaller share the zone takes the part its
    /// capacity covers and the rest spills to the zones with capacity to
    /// spare (Envoy's zone-aware routing). Below `zone_min_healthy_percent`,
    /// every zone's endpoints take the traffic alike.
    pub local_zone: Option<std::sync::Arc<str>>,
    /// See `local_zone`.
    pub zone_min_healthy_percent: u8,
    /// How many proxies in each zone send traffic to these endpoints (the
    /// proxies' share of the traffic per zone). Empty: unknown, so the local
    /// zone takes all of this proxy's traffic while it is healthy enough.
    pub zone_proxies: Vec<(std::sync::Arc<str>, u32)>,
}

impl Default for BalancerConfig {
    fn default() -> Self {
        BalancerConfig {
            algorithm: Algorithm::RoundRobin,
            slow_start: None,
            panic_threshold_percent: 50,
            tracks: Vec::new(),
            maglev_table_size: DEFAULT_TABLE_SIZE,
            local_zone: None,
            zone_min_healthy_percent: 70,
            zone_proxies: Vec::new(),
        }
    }
}

impl BalancerConfig {
    /// The default settings with `algorithm`.
    pub fn new(algorithm: Algorithm) -> Self {
        BalancerConfig { algorithm, ..Default::default() }
    }

    /// Checks the settings, naming the first offending field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.panic_threshold_percent > 100 {
            return Err(ConfigError::PanicThreshold(self.panic_threshold_percent));
        }
        if self.slow_start == Some(Duration::ZERO) {
            return Err(ConfigError::SlowStart);
        }
        if !self.tracks.is_empty() && self.tracks.iter().all(|(_, w)| *w == 0) {
            return Err(ConfigError::TracksAllZero);
        }
        let mut names: Vec<&str> = self.tracks.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::DuplicateTrack(w[0].to_owned()));
        }
        if !is_prime(self.maglev_table_size) || self.maglev_table_size < 101 {
            return Err(ConfigError::TableSize(self.maglev_table_size));
        }
        Ok(())
    }
}

/// A balancer setting that cannot work.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Above 100.
    #[error("panicThresholdPercent: {0} is above 100")]
    PanicThreshold(u8),
    /// A zero window.
    #[error("slowStart: must be longer than zero (omit it to disable slow start)")]
    SlowStart,
    /// No track would receive traffic.
    #[error("tracks: at least one track needs a weight above zero")]
    TracksAllZero,
    /// A track named twice.
    #[error("tracks: {0:?} is listed twice")]
    DuplicateTrack(String),
    /// Not a prime above 100.
    #[error("maglevTableSize: {0} is not a prime number above 100")]
    TableSize(u64),
}
