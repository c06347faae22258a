//! Endpoints and endpoint sets.
//!
//! An [`Endpoint`] is the state Fulcrum keeps about one backend address: health
//! and load statistics. It lives behind an `Arc` and is shared by every
//! balancer and every in-flight [`Pick`](super::Pick), so health checkers,
//! balancers on different threads and the request path all see the same
//! numbers without a lock.
//!
//! An [`EndpointSet`] is an immutable snapshot of the endpoints with their
//! per-snapshot settings (weight, track). Discovery produces a new snapshot with
//! [`EndpointSet::update`], which keeps the `Endpoint` of every address that
//! stays, so in-flight counts, latency estimates and health survive the change.
//!
//! No I/O here: health is set by whoever checks it, time comes from the set's clock.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use super::affinity::AffinityToken;
use super::clock::{Clock, Nanos, duration_nanos};
use super::load::PeakEwma;
use super::slab::{Slab, SlabReader, Slot};

/// Track an endpoint belongs to when none is named.
pub const DEFAULT_TRACK: &str = "stable";

/// What discovery knows about one endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSpec {
    /// The endpoint's address, which is also its identity.
    pub addr: SocketAddr,
    /// Relative weight; 0 means "send no new traffic".
    pub weight: u32,
    /// Deployment track (for example `stable` or `canary`) for traffic splits.
    pub track: Arc<str>,
    /// The zone the endpoint runs in (an EndpointSlice's `zone`), if known.
    pub zone: Option<Arc<str>>,
}

impl EndpointSpec {
    /// An endpoint of weight 1 on the default track.
    pub fn new(addr: SocketAddr) -> Self {
        EndpointSpec { addr, weight: 1, track: Arc::from(DEFAULT_TRACK), zone: None }
    }

    /// The same endpoint with another weight.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// The same endpoint on another track.
    pub fn track(mut self, track: &str) -> Self {
        self.track = Arc::from(track);
        self
    }

    /// The same endpoint in `zone`.
    pub fn zone(mut self, zone: Option<Arc<str>>) -> Self {
        self.zone = zone;
        self
    }
}

/// Why an endpoint may not receive new traffic. An endpoint with no reason is available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum HealthFlag {
    /// The active health check declared it down.
    ActiveCheckFailed = 1,
    /// Passive outlier detection ejected it.
    Ejected = 2,
    /// Discovery reports it not ready (for example an EndpointSlice condition).
    NotReady = 4,
    /// It is terminating: in-flight work finishes, no new work starts, not even in panic mode.
    Draining = 8,
}

/// The set of [`HealthFlag`]s raised on an endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Health(u8);

impl Health {
    /// No flag raised.
    pub const AVAILABLE: Health = Health(0);

    /// True when no flag is raised: the endpoint takes new traffic.
    pub fn is_available(self) -> bool {
        self.0 == 0
    }

    /// True when `flag` is raised.
    pub fn has(self, flag: HealthFlag) -> bool {
        self.0 & flag as u8 != 0
    }

    /// True when the endpoint may still be used in panic mode (anything but draining).
    pub fn is_panic_eligible(self) -> bool {
        !self.has(HealthFlag::Draining)
    }
}

/// Settings of the per-endpoint latency estimator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EwmaConfig {
    /// Time constant of the exponential decay: after this long without a new
    /// sample the estimate has decayed to 1/e of its value.
    pub decay: Duration,
    /// Estimate of an endpoint that has no sample yet.
    pub default_rtt: Duration,
}

impl Default for EwmaConfig {
    fn default() -> Self {
        EwmaConfig { decay: Duration::from_secs(10), default_rtt: Duration::from_millis(30) }
    }
}

/// What every endpoint of a set family shares: the clock and the health epoch.
pub(crate) struct SetContext {
    pub(crate) clock: Arc<dyn Clock>,
    /// Bumped on every health change, so balancers know when to rebuild their views.
    pub(crate) epoch: AtomicU64,
    pub(crate) ewma: EwmaConfig,
    pub(crate) slab: Slab,
}

impl SetContext {
    fn new(clock: Arc<dyn Clock>, ewma: EwmaConfig) -> Arc<Self> {
        Arc::new(SetContext { clock, epoch: AtomicU64::new(0), ewma, slab: Slab::default() })
    }
}

/// One backend address and what is known about it. Shared, lock-free.
// Fields the request path touches come first, so that they share a cache line.
#[repr(C)]
pub struct Endpoint {
    pub(crate) load: Slot,
    consecutive_failures: AtomicU32,
    requests: AtomicU64,
    pub(crate) ewma: PeakEwma,
    pub(crate) ctx: Arc<SetContext>,
    failures: AtomicU64,
    addr: SocketAddr,
    token: AffinityToken,
    health: AtomicU8,
    /// 0 when the endpoint is warm; otherwise 1 + the time its slow start began.
    ramp_from: AtomicU64,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.addr)
            .field("health", &self.health())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    fn new(addr: SocketAddr, ctx: Arc<SetContext>, ramp_from: Option<Nanos>) -> Self {
        let ewma = PeakEwma::new(ctx.ewma.default_rtt);
        Endpoint {
            addr,
            token: AffinityToken::of(addr),
            load: ctx.slab.alloc(),
            ctx,
            health: AtomicU8::new(0),
            ramp_from: AtomicU64::new(ramp_from.map_or(0, |t| t.0.saturating_add(1))),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            ewma,
        }
    }

    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The session-affinity token that pins a client to this endpoint.
    pub fn affinity_token(&self) -> AffinityToken {
        self.token
    }

    /// Current health.
    pub fn health(&self) -> Health {
        Health(self.health.load(Ordering::Relaxed))
    }

    /// Raises (`on = true`) or clears a health flag. Returns true when the flag changed.
    ///
    /// When the endpoint becomes available again its slow start restarts, as
    /// after any absence: a recovered backend has cold caches too.
    pub fn set_flag(&self, flag: HealthFlag, on: bool) -> bool {
        let bit = flag as u8;
        let before = if on {
            self.health.fetch_or(bit, Ordering::AcqRel)
        } else {
            self.health.fetch_and(!bit, Ordering::AcqRel)
        };
        let after = if on { before | bit } else { before & !bit };
        if before == after {
            return false;
        }
        if before != 0 && after == 0 {
            let now = self.ctx.clock.now();
            self.ramp_from.store(now.0.saturating_add(1), Ordering::Relaxed);
        }
        self.ctx.epoch.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Requests (or connections) currently in flight to this endpoint.
    pub fn in_flight(&self) -> u32 {
        self.load.counter().load(Ordering::Relaxed)
    }

    /// Requests (or connections) completed, whatever their outcome.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests (or connections) that failed.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Failures since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency estimate, decayed to now.
    pub fn latency_estimate(&self) -> Duration {
        let now = self.ctx.clock.now();
        Duration::from_nanos(self.ewma.estimate(now, &self.ctx.ewma) as u64)
    }

    /// When the current slow start began, `None` when the endpoint is warm.
    pub fn slow_start_since(&self) -> Option<Nanos> {
        match self.ramp_from.load(Ordering::Relaxed) {
            0 => None,
            t => Some(Nanos(t - 1)),
        }
    }

    /// Forgets the current run of failures (after an ejection ends).
    pub(crate) fn reset_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, failed: bool, cancelled: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        } else if !cancelled {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.ctx.slab.release(&self.load);
    }
}

/// Why a set of endpoint specs was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetError {
    /// Two specs name the same address.
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(SocketAddr),
    /// More endpoints than a balancer can index.
    #[error("{0} endpoints is more than the supported {max}", max = u32::MAX)]
    TooMany(usize),
}

/// An endpoint together with its settings in one snapshot.
#[derive(Clone, Debug)]
pub struct Member {
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) weight: u32,
    pub(crate) track: u32,
    pub(crate) zone: Option<Arc<str>>,
}

impl Member {
    /// The shared endpoint state.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Configured weight.
    pub fn weight(&self) -> u32 {
        self.weight
    }

    /// The endpoint's zone, if known.
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }
}

/// An immutable snapshot of the endpoints, sorted by address.
pub struct EndpointSet {
    ctx: Arc<SetContext>,
    members: Vec<Member>,
    tracks: Vec<Arc<str>>,
    /// (affinity token, member index), sorted by token.
    tokens: Vec<(AffinityToken, u32)>,
}

impl std::fmt::Debug for EndpointSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSet").field("members", &self.members).finish_non_exhaustive()
    }
}

impl EndpointSet {
    /// The first snapshot of a family. Its endpoints count as warm: slow start
    /// is for endpoints that join an already serving set.
    pub fn new(
        clock: Arc<dyn Clock>,
        ewma: EwmaConfig,
        specs: impl IntoIterator<Item = EndpointSpec>,
    ) -> Result<Self, SetError> {
        let ctx = SetContext::new(clock, ewma);
        Self::build(ctx, specs, None)
    }

    /// The next snapshot: endpoints whose address stays keep their state;
    /// new ones start their slow start now.
    pub fn update(&self, specs: impl IntoIterator<Item = EndpointSpec>) -> Result<Self, SetError> {
        let now = self.ctx.clock.now();
        let set = Self::build(self.ctx.clone(), specs, Some((self, now)))?;
        set.ctx.epoch.fetch_add(1, Ordering::AcqRel);
        Ok(set)
    }

    /// A snapshot of `specs`. With a `previous` snapshot, its endpoints are
    /// reused and newcomers ramp from the given time; without, all are warm.
    fn build(
        ctx: Arc<SetContext>,
        specs: impl IntoIterator<Item = EndpointSpec>,
        previous: Option<(&EndpointSet, Nanos)>,
    ) -> Result<Self, SetError> {
        let mut specs: Vec<EndpointSpec> = specs.into_iter().collect();
        if specs.len() > u32::MAX as usize {
            return Err(SetError::TooMany(specs.len()));
        }
        specs.sort_by_key(|s| s.addr);
        if let Some(w) = specs.windows(2).find(|w| w[0].addr == w[1].addr) {
            return Err(SetError::DuplicateEndpoint(w[0].addr));
        }
        let mut tracks: Vec<Arc<str>> = specs.iter().map(|s| s.track.clone()).collect();
        tracks.sort();
        tracks.dedup();
        let members: Vec<Member> = specs
            .into_iter()
            .map(|s| {
                let endpoint = match previous {
                    Some((prev, now)) => match prev.get(s.addr) {
                        Some(m) => m.endpoint.clone(),
                        None => Arc::new(Endpoint::new(s.addr, ctx.clone(), Some(now))),
                    },
                    None => Arc::new(Endpoint::new(s.addr, ctx.clone(), None)),
                };
                // Every spec's track is in `tracks`, and there are at most u32::MAX of them.
                let track = tracks.binary_search(&s.track).unwrap_or(0) as u32;
                Member { endpoint, weight: s.weight, track, zone: s.zone }
            })
            .collect();
        let mut tokens: Vec<(AffinityToken, u32)> =
            members.iter().enumerate().map(|(i, m)| (m.endpoint.token, i as u32)).collect();
        tokens.sort_unstable();
        Ok(EndpointSet { ctx, members, tracks, tokens })
    }

    /// The members, sorted by address.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// Number of endpoints.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// True when the set has no endpoint.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member at `addr`.
    pub fn get(&self, addr: SocketAddr) -> Option<&Member> {
        self.members.binary_search_by_key(&addr, |m| m.endpoint.addr).ok().map(|i| &self.members[i])
    }

    /// The member an affinity token pins to.
    pub fn by_token(&self, token: AffinityToken) -> Option<&Member> {
        self.tokens.binary_search_by_key(&token, |&(t, _)| t).ok().map(|i| &self.members[self.tokens[i].1 as usize])
    }

    /// Track names, sorted.
    pub fn tracks(&self) -> &[Arc<str>] {
        &self.tracks
    }

    /// The track of a member.
    pub fn track_of(&self, member: &Member) -> &str {
        self.tracks.get(member.track as usize).map_or(DEFAULT_TRACK, |t| t)
    }

    /// The clock every endpoint of this set family reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.ctx.clock
    }

    /// Changes whenever any endpoint's health changes or a snapshot replaces another.
    pub fn epoch(&self) -> u64 {
        self.ctx.epoch.load(Ordering::Acquire)
    }

    pub(crate) fn ewma_config(&self) -> &EwmaConfig {
        &self.ctx.ewma
    }

    pub(crate) fn load_reader(&self) -> SlabReader {
        SlabReader::new(&self.ctx.slab)
    }
}

/// Canonical bytes of an address, for hashing: the IP (v4 or v6) and the port.
pub(crate) fn addr_bytes(addr: SocketAddr) -> ([u8; 18], usize) {
    let mut buf = [0u8; 18];
    let n = match addr.ip() {
        IpAddr::V4(ip) => {
            buf[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            buf[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    buf[n..n + 2].copy_from_slice(&addr.port().to_be_bytes());
    (buf, n + 2)
}

/// Nanoseconds of a duration as f64, for estimators.
pub(crate) fn nanos_f64(d: Duration) -> f64 {
    duration_nanos(d) as f64
}
