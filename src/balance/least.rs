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
pub(crate) struct Pending {
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
struct Slotted {
    slot: u32,
    cand: u32,
}

/// Candidates of one weight, in slab order.
struct Class {
    weight: u64,
    order: Vec<Slotted>,
}

/// LeastConnections state: candidates grouped by weight, each group in slab
/// order so that its counters are read sequentially.
///
/// Within a group of equal weight the least loaded is the one with the
/// fewest in flight: one load and one comparison per endpoint. The group
/// minima are then compared per unit of weight. A full scan, O(N), at well
/// under a nanosecond per endpoint; an O(log N) tree kept in load order, as
/// HAProxy's `leastconn` keeps, would need every release, on any thread, to
/// take that tree's lock.
pub(crate) struct LeastConnections {
    classes: Vec<Class>,
    reader: SlabReader,
    cursor: usize,
}

impl LeastConnections {
    pub(crate) fn new(cands: &[Candidate], reader: SlabReader) -> Self {
        let mut classes: Vec<Class> = Vec::new();
        for (i, c) in cands.iter().enumerate() {
            let weight = u64::from(c.weight.max(1));
            let entry = Slotted { slot: c.endpoint.load.index(), cand: i as u32 };
            match classes.iter_mut().find(|k| k.weight == weight) {
                Some(k) => k.order.push(entry),
                None => classes.push(Class { weight, order: vec![entry] }),
            }
        }
        for k in &mut classes {
            k.order.sort_unstable_by_key(|s| s.slot);
        }
        LeastConnections { classes, reader, cursor: 0 }
    }

    /// The least loaded candidate per unit of weight, over all of them.
    ///
    /// Scans start at a cursor that advances each pick, and strict `<` keeps
    /// the first of equal minima, so ties rotate instead of always landing on
    /// the same endpoint.
    #[inline]
    pub(crate) fn pick(&mut self) -> Option<usize> {
        let k = self.classes.len();
        if k == 0 {
            return None;
        }
        let cursor = self.cursor;
        self.cursor = cursor.wrapping_add(1);
        let mut best: Option<(Pending, u32)> = None;
        for i in 0..k {
            let class = &self.classes[(cursor + i) % k];
            let (head, tail) = class.order.split_at(cursor % class.order.len());
            let (load, cand) = self.min_in(tail, head);
            let load = Pending { load: u64::from(load) + 1, weight: class.weight };
            if best.is_none_or(|(b, _)| load.less_than(b)) {
                best = Some((load, cand));
            }
        }
        best.map(|(_, cand)| cand as usize)
    }

    /// The first minimum of the in-flight counts over `first` then `then`
    /// (`first` is not empty), and its candidate.
    #[inline(always)]
    fn min_in(&self, first: &[Slotted], then: &[Slotted]) -> (u32, u32) {
        let mut best = first[0].cand;
        let mut best_load = self.reader.get(first[0].slot);
        // Two plain loops rather than a chained iterator: the compiler unrolls these.
        for part in [&first[1..], then] {
            for s in part {
                let load = self.reader.get(s.slot);
                if load < best_load {
                    best = s.cand;
                    best_load = load;
                }
            }
        }
        (best_load, best)
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

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        !self.less_than(*other) && !other.less_than(*self)
    }
}

/// Compared exactly, as fractions, so that p2c can use it as a cost.
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        use std::cmp::Ordering::*;
        Some(if self.less_than(*other) {
            Less
        } else if other.less_than(*self) {
            Greater
        } else {
            Equal
        })
    }
}

/// LeastRequest's cost: the pending work per unit of weight.
#[inline]
pub(crate) fn pending_cost(c: &Candidate) -> Pending {
    Pending::of(c)
}

/// PeakEwma: latency estimate × (in-flight + 1) / weight. The estimate is
/// floored at 1 ns so that in-flight work still counts when it has decayed to zero.
///
/// An endpoint never measured costs nothing while it has nothing in flight:
/// it receives one probe request at a time until its first sample, instead
/// of being judged by the default estimate (and never chosen next to an
/// endpoint measured faster) or flooded before its first answer.
#[inline]
pub(crate) fn peak_ewma_cost(c: &Candidate, now: Nanos, cfg: &EwmaConfig) -> f64 {
    let in_flight = c.endpoint.in_flight();
    if in_flight == 0 && !c.endpoint.ewma.is_measured() {
        return 0.0;
    }
    let latency = c.endpoint.ewma.estimate(now, cfg).max(1.0);
    latency * (f64::from(in_flight) + 1.0) / f64::from(c.weight.max(1))
}
