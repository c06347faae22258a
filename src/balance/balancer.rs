//! The balancer: one algorithm applied within tracks, with session affinity,
//! slow start, panic mode and the track split around it.
//!
//! A `Balancer` is owned by one thread and picks with `&mut self`, so its
//! algorithm state (rotation cursors, RNG) needs no lock; the load and health
//! it reads live in the shared, lock-free [`Endpoint`]s, so several balancers
//! (one per worker thread, as in Envoy) see the same in-flight counts.
//!
//! The per-pick path does no allocation: the list of available candidates
//! per track (the "view") is rebuilt only when health changes, the endpoint
//! set is replaced, or a slow-start step is due.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::affinity::AffinityToken;
use super::clock::Nanos;
use super::config::{Algorithm, BalancerConfig, ConfigError};
use super::endpoint::{Endpoint, EndpointSet, Member, addr_bytes};
use super::least::{LeastConnections, p2c, peak_ewma_cost, pending_cost};
use super::load::Pick;
use super::maglev::{Maglev, table_size};
use super::random::WeightedRandom;
use super::smooth_wrr::SmoothWrr;

/// Slow start ramps in this many steps, from 1/STEPS of the weight to all of it.
const RAMP_STEPS: u32 = 10;

/// What the balancer may know about a request.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request<'a> {
    /// Hash of the consistent-hashing key ([`hash_key`](super::hash_key)).
    /// Without one, ConsistentHash picks at random.
    pub hash: Option<u64>,
    /// The affinity token the client presented.
    pub affinity: Option<AffinityToken>,
    /// Endpoints not to choose (those a retry already tried).
    pub exclude: &'a [SocketAddr],
}

/// An endpoint the balancer may choose, with its effective weight.
#[derive(Clone, Debug)]
pub(crate) struct Candidate {
    pub(crate) endpoint: Arc<Endpoint>,
    /// Configured weight (or 1 where weights are ignored) × slow-start step.
    pub(crate) weight: u32,
}

enum Selector {
    Rotation(SmoothWrr),
    Random(WeightedRandom),
    LeastConnections(LeastConnections),
    LeastRequest,
    PeakEwma,
    Maglev(Maglev),
}

struct Group {
    cands: Vec<Candidate>,
    selector: Selector,
    panic: bool,
    /// Weight in the track split; a group at zero takes no traffic, not even retries.
    share: u32,
}

/// The cached, per-track list of candidates.
struct View {
    epoch: u64,
    /// When the next slow-start step is due.
    refresh_at: Nanos,
    groups: Vec<Group>,
    split: SmoothWrr,
    /// Per track index of the set: may the track receive traffic at all.
    track_open: Vec<bool>,
}

impl View {
    fn stale() -> Self {
        View {
            epoch: u64::MAX,
            refresh_at: Nanos::ZERO,
            groups: Vec::new(),
            split: SmoothWrr::default(),
            track_open: Vec::new(),
        }
    }
}

/// Chooses an endpoint for each request or connection.
pub struct Balancer {
    config: BalancerConfig,
    set: Arc<EndpointSet>,
    rng: fastrand::Rng,
    view: View,
}

impl std::fmt::Debug for Balancer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balancer").field("config", &self.config).field("endpoints", &self.set.len()).finish()
    }
}

impl Balancer {
    /// A balancer over `set`. `seed` makes every random choice reproducible.
    pub fn new(config: BalancerConfig, set: Arc<EndpointSet>, seed: u64) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Balancer { config, set, rng: fastrand::Rng::with_seed(seed), view: View::stale() })
    }

    /// Switches to a new snapshot of the endpoints.
    pub fn update_set(&mut self, set: Arc<EndpointSet>) {
        self.set = set;
        self.view = View::stale();
    }

    /// Switches to new settings; on error the old ones stay.
    pub fn update_config(&mut self, config: BalancerConfig) -> Result<(), ConfigError> {
        config.validate()?;
        self.config = config;
        self.view = View::stale();
        Ok(())
    }

    /// The current settings.
    pub fn config(&self) -> &BalancerConfig {
        &self.config
    }

    /// The current endpoint snapshot.
    pub fn set(&self) -> &Arc<EndpointSet> {
        &self.set
    }

    /// True when some track is in panic mode (too few available endpoints).
    pub fn in_panic(&mut self) -> bool {
        let now = self.set.clock().now();
        self.refresh(now);
        self.view.groups.iter().any(|g| g.panic)
    }

    /// Chooses an endpoint, or `None` when no endpoint can take traffic.
    pub fn pick(&mut self, req: &Request<'_>) -> Option<Pick> {
        let now = self.set.clock().now();
        self.pick_at(req, now)
    }

    /// [`pick`](Self::pick) at a time the caller already read from the set's
    /// clock: a proxy that times each request for its own metrics passes that
    /// reading and saves a second one.
    pub fn pick_at(&mut self, req: &Request<'_>, now: Nanos) -> Option<Pick> {
        self.refresh(now);
        if let Some(endpoint) = self.pinned(req) {
            return Some(Pick::start(endpoint, now));
        }
        let groups = self.view.groups.len();
        let first = self.view.split.next()?;
        for k in 0..groups {
            let g = (first + k) % groups;
            if self.view.groups[g].share == 0 {
                continue;
            }
            if let Some(i) = self.choose_in(g, req, now) {
                let endpoint = self.view.groups[g].cands[i].endpoint.clone();
                return Some(Pick::start(endpoint, now));
            }
        }
        None
    }

    /// The pinned endpoint, if the token names one that may take traffic.
    fn pinned(&self, req: &Request<'_>) -> Option<Arc<Endpoint>> {
        let m = self.set.by_token(req.affinity?)?;
        let open = self.view.track_open.get(m.track as usize).copied().unwrap_or(false);
        (open && m.weight > 0 && m.endpoint.health().is_available() && !req.exclude.contains(&m.endpoint.addr()))
            .then(|| m.endpoint.clone())
    }

    fn choose_in(&mut self, g: usize, req: &Request<'_>, now: Nanos) -> Option<usize> {
        let group = &mut self.view.groups[g];
        let cands = &group.cands;
        if cands.is_empty() {
            return None;
        }
        let excluded = |i: usize| req.exclude.contains(&cands[i].endpoint.addr());
        for attempt in 0..3u64 {
            let i = match &mut group.selector {
                Selector::Rotation(s) => s.next(),
                Selector::Random(r) => r.pick(&mut self.rng),
                Selector::LeastConnections(lc) => lc.pick(),
                Selector::LeastRequest => p2c(cands, &mut self.rng, pending_cost),
                Selector::PeakEwma => {
                    let cfg = self.set.ewma_config();
                    p2c(cands, &mut self.rng, |c| peak_ewma_cost(c, now, cfg))
                }
                Selector::Maglev(m) => match req.hash {
                    Some(h) => m.lookup(h, attempt),
                    None => Some(self.rng.usize(..cands.len())),
                },
            }?;
            if req.exclude.is_empty() || !excluded(i) {
                return Some(i);
            }
        }
        // Every attempt hit an excluded endpoint: take any other.
        let n = cands.len();
        let start = self.rng.usize(..n);
        (start..n).chain(0..start).find(|&i| !excluded(i))
    }

    fn refresh(&mut self, now: Nanos) {
        if self.view.epoch != self.set.epoch() || now >= self.view.refresh_at {
            self.rebuild(now);
        }
    }

    fn rebuild(&mut self, now: Nanos) {
        let epoch = self.set.epoch();
        let set = self.set.clone();
        let members = set.members();
        let mut refresh_at = Nanos(u64::MAX);
        let mut groups = Vec::new();
        let track_open: Vec<bool>;
        if self.config.tracks.is_empty() {
            track_open = vec![true; set.tracks().len()];
            groups.push(self.build_group(members.iter(), now, &mut refresh_at));
        } else {
            track_open = set
                .tracks()
                .iter()
                .map(|t| self.config.tracks.iter().any(|(name, w)| **name == **t && *w > 0))
                .collect();
            for (name, weight) in &self.config.tracks {
                let in_track = members.iter().filter(|m| set.track_of(m) == name);
                let mut group = self.build_group(in_track, now, &mut refresh_at);
                group.share = if group.cands.is_empty() { 0 } else { *weight };
                groups.push(group);
            }
            if groups.iter().all(|g| g.share == 0) {
                // No listed track has anything to offer: availability beats the split.
                groups = vec![self.build_group(members.iter(), now, &mut refresh_at)];
            }
        }
        let split = SmoothWrr::new(groups.iter().map(|g| g.share));
        self.view = View { epoch, refresh_at, groups, split, track_open };
    }

    fn build_group<'m>(&self, members: impl Iterator<Item = &'m Member>, now: Nanos, refresh_at: &mut Nanos) -> Group {
        let algorithm = self.config.algorithm;
        let mut eligible: Vec<&Member> =
            members.filter(|m| m.weight > 0 && m.endpoint.health().is_panic_eligible()).collect();
        // Zone-aware: the local zone's endpoints alone, while enough of them
        // are available to take the traffic; otherwise spill over to all.
        if let Some(zone) = &self.config.local_zone {
            let local: Vec<&Member> = eligible.iter().copied().filter(|m| m.zone.as_ref() == Some(zone)).collect();
            let up = local.iter().filter(|m| m.endpoint.health().is_available()).count();
            let min = usize::from(self.config.zone_min_healthy_percent);
            if up > 0 && up * 100 >= min * local.len() {
                eligible = local;
            }
        }
        let available = eligible.iter().filter(|m| m.endpoint.health().is_available()).count();
        let threshold = usize::from(self.config.panic_threshold_percent);
        let panic = !eligible.is_empty() && available * 100 < threshold * eligible.len();
        let slow_start = self.config.slow_start.filter(|_| algorithm.uses_slow_start());
        let cands: Vec<Candidate> = eligible
            .into_iter()
            .filter(|m| panic || m.endpoint.health().is_available())
            .map(|m| {
                let base = if algorithm.uses_weights() { m.weight } else { 1 };
                let step = slow_start.map_or(RAMP_STEPS, |w| ramp_step(m, w, now, refresh_at));
                Candidate { endpoint: m.endpoint.clone(), weight: base.saturating_mul(step) }
            })
            .collect();
        let weights: Vec<u32> = cands.iter().map(|c| c.weight).collect();
        let selector = match algorithm {
            Algorithm::RoundRobin | Algorithm::WeightedRoundRobin => Selector::Rotation(SmoothWrr::new(weights)),
            Algorithm::Random => Selector::Random(WeightedRandom::new(&weights)),
            Algorithm::LeastConnections => {
                Selector::LeastConnections(LeastConnections::new(&cands, self.set.load_reader()))
            }
            Algorithm::LeastRequest => Selector::LeastRequest,
            Algorithm::PeakEwma => Selector::PeakEwma,
            Algorithm::ConsistentHash => {
                let ids: Vec<([u8; 18], usize)> = cands.iter().map(|c| addr_bytes(c.endpoint.addr())).collect();
                let size = table_size(cands.len(), self.config.maglev_table_size);
                Selector::Maglev(Maglev::build(ids.iter().map(|(b, n)| &b[..*n]), &weights, size))
            }
        };
        Group { cands, selector, panic, share: 1 }
    }
}

/// The slow-start step (1..=RAMP_STEPS) of a member now, lowering
/// `refresh_at` to the time of its next step.
fn ramp_step(m: &Member, window: Duration, now: Nanos, refresh_at: &mut Nanos) -> u32 {
    let Some(since) = m.endpoint.slow_start_since() else { return RAMP_STEPS };
    let elapsed = now.since(since);
    if elapsed >= window {
        return RAMP_STEPS;
    }
    let steps = u128::from(RAMP_STEPS);
    let done = (elapsed.as_nanos() * steps / window.as_nanos().max(1)) as u32;
    let next = since.after(window.mul_f64(f64::from(done + 1) / f64::from(RAMP_STEPS)));
    *refresh_at = (*refresh_at).min(next);
    done.max(1)
}
