//! Load-aware choices: LeastConnections (a full scan), and LeastRequest and
//! PeakEwma (power of two choices, generic over the load metric, as in
//! tower's `balance::p2c`).

use super::balancer::Candidate;
use super::clock::Nanos;
use super::endpoint::EwmaConfig;
use super::slab::SlabReader;

/// In-flight work per unit of weight, as the exact fraction (in-flight + 1) / weight.
///
/// The +1 counts the request being placed, so an idle heavy endpoint beats an
/// idle light one, as in HAProxy's `leastconn`.
#[derive(Clone, Copy, Debug)]
struct Pending {
    load: u64,
    weight: u64,
}

impl Pending {
    #[inline]
    fn of(c: &Candidate) -> Self {
        Pending { load: u64::from(c.endpoint.in_flight()) + 1, weight: u64::from(c.weight.max(1)) }
    }

    #[inline]
    fn less_than(self, other: Pending) -> bool {
        // Cross-multiplied: exact (loads and weights are below 2^32, so the
        // products fit), and no division in the scan loop.
        self.load * other.weight < other.load * self.weight
    }
}

/// LeastConnections' view of one candidate: where its counter lives.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Slotted {
    slot: u32,
    cand: u32,
    weight: u32,
}

/// LeastConnections state: candidates in slab order, read straight from the slab.
pub(crate) struct LeastConnections {
    order: Vec<Slotted>,
    reader: SlabReader,
    uniform: bool,
    cursor: usize,
}

impl LeastConnections {
    pub(crate) fn new(cands: &[Candidate], reader: SlabReader) -> Self {
        let mut order: Vec<Slotted> = cands
            .iter()
            .enumerate()
            .map(|(i, c)| Slotted { slot: c.endpoint.load.index(), cand: i as u32, weight: c.weight })
            .collect();
        order.sort_unstable_by_key(|s| s.slot);
        let uniform = cands.windows(2).all(|w| w[0].weight == w[1].weight);
        LeastConnections { order, reader, uniform, cursor: 0 }
    }

    /// The least loaded candidate over all of them, scanning from a cursor
    /// that advances each pick, so that ties rotate instead of always landing
    /// on the first. With uniform weights the comparison is on in-flight
    /// counts alone; strict `<` keeps the first of equal minima.
    #[inline]
    pub(crate) fn pick(&mut self) -> Option<usize> {
        let n = self.order.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor % n;
        self.cursor = start + 1;
        let (tail, head) = (&self.order[start..], &self.order[..start]);
        let reader = &self.reader;
        let mut best = tail[0];
        if self.uniform {
            let mut best_load = reader.get(best.slot);
            for s in tail[1..].iter().chain(head) {
                let load = reader.get(s.slot);
                if load < best_load {
                    best = *s;
                    best_load = load;
                }
            }
        } else {
            let pending =
                |s: &Slotted| Pending { load: u64::from(reader.get(s.slot)) + 1, weight: u64::from(s.weight.max(1)) };
            let mut best_load = pending(&best);
            for s in tail[1..].iter().chain(head) {
                let load = pending(s);
                if load.less_than(best_load) {
                    best = *s;
                    best_load = load;
                }
            }
        }
        Some(best.cand as usize)
    }
}

/// Power of two choices: two distinct random candidates, the one of lower
/// `cost` wins; a tie goes to the first drawn, which is itself random.
#[inline]
pub(crate) fn p2c<C: PartialOrd>(
    cands: &[Candidate],
    rng: &mut fastrand::Rng,
    cost: impl Fn(&Candidate) -> C,
) -> Option<usize> {
    let n = cands.len();
    match n {
        0 => None,
        1 => Some(0),
        _ => {
            let a = rng.usize(..n);
            let mut b = rng.usize(..n - 1);
            if b >= a {
                b += 1;
            }
            Some(if cost(&cands[b]) < cost(&cands[a]) { b } else { a })
        }
    }
}

/// LeastRequest: the pending-work cost, compared exactly.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingCost(Pending);

impl PartialEq for PendingCost {
    fn eq(&self, other: &Self) -> bool {
        !self.0.less_than(other.0) && !other.0.less_than(self.0)
    }
}

impl PartialOrd for PendingCost {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        use std::cmp::Ordering::*;
        Some(if self.0.less_than(other.0) {
            Less
        } else if other.0.less_than(self.0) {
            Greater
        } else {
            Equal
        })
    }
}

#[inline]
pub(crate) fn pending_cost(c: &Candidate) -> PendingCost {
    PendingCost(Pending::of(c))
}

/// PeakEwma: latency estimate × (in-flight + 1) / weight. The estimate is
/// floored at 1 ns so that in-flight work still counts when it has decayed to zero.
#[inline]
pub(crate) fn peak_ewma_cost(c: &Candidate, now: Nanos, cfg: &EwmaConfig) -> f64 {
    let latency = c.endpoint.ewma.estimate(now, cfg).max(1.0);
    latency * (f64::from(c.endpoint.in_flight()) + 1.0) / f64::from(c.weight.max(1))
}
