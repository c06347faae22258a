//! Smooth weighted round robin (the NGINX sequence) in O(distinct weights) per pick.
//!
//! The textbook algorithm adds every endpoint's weight to its `current`, picks
//! the largest `current` (first in order on ties) and subtracts the total
//! weight from it: O(N) per pick. Endpoints of equal weight, though, always
//! sit at `current` values that differ by whole multiples of the total, and
//! among them the least-picked, lowest-index one wins, so a class of equal
//! weights behaves as a plain rotation. Keeping one `current` per weight
//! class and a rotation cursor inside it yields exactly the textbook sequence
//! (a property test checks this against the reference) while a pick costs
//! one step per distinct weight: one for RoundRobin, a handful for typical
//! weighted sets, whatever the number of endpoints.
//!
//! RoundRobin is this with all weights equal; the track split uses it too.

/// A smooth WRR schedule over indices `0..n`.
#[derive(Clone, Debug, Default)]
pub(crate) struct SmoothWrr {
    classes: Vec<Class>,
    total: i64,
}

#[derive(Clone, Debug)]
struct Class {
    weight: i64,
    /// Indices of this weight, ascending.
    members: Vec<u32>,
    /// Members before `next` have been picked once more than the others this round.
    next: usize,
    /// `current` of the members at and after `next`.
    current: i64,
}

impl SmoothWrr {
    /// A schedule over `weights` (index = position). Zero weights are never picked.
    pub(crate) fn new(weights: impl IntoIterator<Item = u32>) -> Self {
        let mut classes: Vec<Class> = Vec::new();
        let mut total = 0i64;
        for (i, w) in weights.into_iter().enumerate() {
            if w == 0 {
                continue;
            }
            let w = i64::from(w);
            total += w;
            match classes.iter_mut().find(|c| c.weight == w) {
                Some(c) => c.members.push(i as u32),
                None => classes.push(Class { weight: w, members: vec![i as u32], next: 0, current: 0 }),
            }
        }
        SmoothWrr { classes, total }
    }

    /// The next index of the sequence.
    #[inline]
    pub(crate) fn next(&mut self) -> Option<usize> {
        if let [only] = self.classes.as_mut_slice() {
            // One weight: a rotation. `current` stays at zero (it gains
            // `weight * len` per round and loses the same total).
            let i = only.members[only.next];
            only.next += 1;
            if only.next == only.members.len() {
                only.next = 0;
            }
            return Some(i as usize);
        }
        let mut best: Option<usize> = None;
        for k in 0..self.classes.len() {
            let c = &mut self.classes[k];
            c.current += c.weight;
            let better = match best {
                None => true,
                Some(b) => {
                    let b = &self.classes[b];
                    let c = &self.classes[k];
                    c.current > b.current || (c.current == b.current && c.members[c.next] < b.members[b.next])
                }
            };
            if better {
                best = Some(k);
            }
        }
        let c = &mut self.classes[best?];
        let i = c.members[c.next];
        c.next += 1;
        if c.next == c.members.len() {
            c.next = 0;
            c.current -= self.total;
        }
        Some(i as usize)
    }

    /// The index a 64-bit hash falls on, in proportion to the weights: the
    /// same hash, the same index, while the weights stay.
    pub(crate) fn at(&self, hash: u64) -> Option<usize> {
        if self.total <= 0 {
            return None;
        }
        // Scramble first, so that the index does not follow the bits the
        // endpoint choice uses (Maglev takes the hash modulo its table).
        let mut x = (hash.rotate_left(29).wrapping_mul(0x9E37_79B9_7F4A_7C15) % self.total as u64) as i64;
        for c in &self.classes {
            let span = c.weight * c.members.len() as i64;
            if x < span {
                return Some(c.members[(x / c.weight) as usize] as usize);
            }
            x -= span;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The textbook NGINX algorithm, the specification.
    fn reference(weights: &[u32], picks: usize) -> Vec<usize> {
        let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
        let mut current = vec![0i64; weights.len()];
        let mut out = Vec::with_capacity(picks);
        for _ in 0..picks {
            let mut best: Option<usize> = None;
            for (i, &w) in weights.iter().enumerate() {
                if w == 0 {
                    continue;
                }
                current[i] += i64::from(w);
                if best.is_none_or(|b| current[i] > current[b]) {
                    best = Some(i);
                }
            }
            let Some(b) = best else { break };
            current[b] -= total;
            out.push(b);
        }
        out
    }

    #[test]
    fn nginx_example_sequence() {
        let mut s = SmoothWrr::new([5, 1, 1]);
        let seq: Vec<usize> = (0..7).filter_map(|_| s.next()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn no_weights_picks_nothing() {
        assert_eq!(SmoothWrr::new([]).next(), None);
        assert_eq!(SmoothWrr::new([0, 0]).next(), None);
    }

    #[test]
    fn hashes_fall_on_indices_in_proportion_to_the_weights() {
        let s = SmoothWrr::new([3, 0, 1]);
        let mut counts = [0u32; 3];
        for h in 0..40_000u64 {
            counts[s.at(h.wrapping_mul(0xD6E8_FEB8_6659_FD93)).unwrap()] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((29_000..31_000).contains(&counts[0]), "{counts:?}");
        assert_eq!(s.at(12345), s.at(12345));
        assert_eq!(SmoothWrr::new([0]).at(1), None);
    }

    proptest! {
        #[test]
        fn equals_the_textbook_sequence(weights in prop::collection::vec(0u32..8, 1..40)) {
            let total: u32 = weights.iter().sum();
            let picks = 3 * total as usize + 5;
            let mut s = SmoothWrr::new(weights.iter().copied());
            let ours: Vec<usize> = (0..picks).map_while(|_| s.next()).collect();
            prop_assert_eq!(ours, reference(&weights, picks));
        }
    }
}
