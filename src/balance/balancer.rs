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

/// Zone-aware routing divides a track's traffic between zones in parts of this.
const ZONE_PARTS: u64 = 10_000;

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
    /// Weight in the split between tracks and zones (the track's weight ×
    /// the zone's part); a group at zero takes no traffic, not even retries.
    share: u64,
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
        // A hashed request keeps its group (track, zone) as it keeps its
        // endpoint; others follow the smooth rotation of the split.
        let first = match req.hash {
            Some(h) if groups > 1 => self.view.split.at(h)?,
            _ => self.view.split.next()?,
        };
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
            groups = self.build_groups(members.iter(), 1, now, &mut refresh_at);
        } else {
            track_open = set
                .tracks()
                .iter()
                .map(|t| self.config.tracks.iter().any(|(name, w)| **name == **t && *w > 0))
                .collect();
            for (name, weight) in &self.config.tracks {
                let in_track = members.iter().filter(|m| set.track_of(m) == name);
                groups.extend(self.build_groups(in_track, *weight, now, &mut refresh_at));
            }
            if groups.iter().all(|g| g.share == 0) {
                // No listed track has anything to offer: availability beats the split.
                groups = self.build_groups(members.iter(), 1, now, &mut refresh_at);
            }
        }
        // The shares as the split's weights, scaled down together if needed.
        let top = groups.iter().map(|g| g.share).max().unwrap_or(0);
        let shift = (64 - top.leading_zeros()).saturating_sub(31);
        let split = SmoothWrr::new(
            groups
                .iter()
                .map(|g| if g.share == 0 { 0 } else { u32::try_from(g.share >> shift).unwrap_or(u32::MAX).max(1) }),
        );
        self.view = View { epoch, refresh_at, groups, split, track_open };
    }

    /// The groups of one track of weight `weight`: one, or with zone-aware
    /// routing one per zone that takes part of the track's traffic. A track
    /// with nothing to offer gets one empty group at share 0.
    fn build_groups<'m>(
        &self,
        members: impl Iterator<Item = &'m Member>,
        weight: u32,
        now: Nanos,
        refresh_at: &mut Nanos,
    ) -> Vec<Group> {
        let eligible: Vec<&Member> =
            members.filter(|m| m.weight > 0 && m.endpoint.health().is_panic_eligible()).collect();
        self.zone_split(eligible)
            .into_iter()
            .map(|(members, part)| {
                let mut group = self.build_group(members, now, refresh_at);
                group.share = if group.cands.is_empty() { 0 } else { u64::from(weight) * part };
                group
            })
            .collect()
    }

    /// Zone-aware routing: which endpoints take a track's traffic, and in
    /// what parts of [`ZONE_PARTS`].
    ///
    /// The local zone takes everything while at least
    /// `zone_min_healthy_percent` of its endpoints are available and its
    /// share of the available endpoints is at least the local proxies' share
    /// of the proxies; with a smaller share it takes the part its capacity
    /// covers (endpoint share ÷ proxy share), and the rest goes to the other
    /// zones in proportion to their spare capacity (endpoint share − proxy
    /// share), as Envoy's zone-aware routing does, so that every endpoint
    /// gets the same load when every proxy gets the same traffic.
    fn zone_split<'m>(&self, eligible: Vec<&'m Member>) -> Vec<(Vec<&'m Member>, u64)> {
        let Some(zone) = &self.config.local_zone else { return vec![(eligible, ZONE_PARTS)] };
        let up = |m: &Member| m.endpoint.health().is_available();
        let in_zone = |m: &&Member, z: &str| m.zone.as_deref().unwrap_or_default() == z;
        let (local, remote): (Vec<&Member>, Vec<&Member>) = eligible.iter().partition(|m| in_zone(m, zone));
        let local_up = local.iter().filter(|m| up(m)).count() as u64;
        let min = u64::from(self.config.zone_min_healthy_percent);
        if local_up == 0 || local_up * 100 < min * local.len() as u64 {
            return vec![(eligible, ZONE_PARTS)];
        }
        let proxies = &self.config.zone_proxies;
        let all_proxies: u64 = proxies.iter().map(|(_, n)| u64::from(*n)).sum();
        let proxies_in = |z: &str| proxies.iter().filter(|(pz, _)| **pz == *z).map(|(_, n)| u64::from(*n)).sum::<u64>();
        let local_proxies = proxies_in(zone);
        let all_up = eligible.iter().filter(|m| up(m)).count() as u64;
        // Compare local_up / all_up with local_proxies / all_proxies.
        if local_proxies == 0 || local_up * all_proxies >= local_proxies * all_up {
            return vec![(local, ZONE_PARTS)];
        }
        let local_part = local_up * all_proxies * ZONE_PARTS / (local_proxies * all_up);
        // Spare capacity of each other zone, in units of 1 / (all_up × all_proxies).
        let mut zones: Vec<&str> = remote.iter().map(|m| m.zone.as_deref().unwrap_or_default()).collect();
        zones.sort_unstable();
        zones.dedup();
        let spare: Vec<u64> = zones
            .iter()
            .map(|z| {
                let z_up = remote.iter().filter(|m| in_zone(m, z) && up(m)).count() as u64;
                (z_up * all_proxies).saturating_sub(proxies_in(z) * all_up)
            })
            .collect();
        let all_spare: u64 = spare.iter().sum();
        let mut parts = vec![(local, local_part)];
        if all_spare == 0 {
            parts.push((remote, ZONE_PARTS - local_part));
            return parts;
        }
        for (z, s) in zones.iter().zip(&spare).filter(|(_, s)| **s > 0) {
            let members = remote.iter().copied().filter(|m| in_zone(m, z)).collect();
            parts.push((members, (ZONE_PARTS - local_part) * s / all_spare));
        }
        parts
    }

    fn build_group(&self, eligible: Vec<&Member>, now: Nanos, refresh_at: &mut Nanos) -> Group {
        let algorithm = self.config.algorithm;
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
