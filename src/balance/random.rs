//! Weighted random choice: uniform when all weights are equal, otherwise a
//! binary search over cumulative weights (O(log N), no allocation per pick).

/// A sampler over indices `0..n` with probability proportional to weight.
#[derive(Clone, Debug, Default)]
pub(crate) struct WeightedRandom {
    /// Cumulative weights; empty when all weights are equal (uniform).
    cumulative: Vec<u64>,
    n: usize,
}

impl WeightedRandom {
    pub(crate) fn new(weights: &[u32]) -> Self {
        let positive = weights.iter().filter(|&&w| w > 0).count();
        let uniform = positive == weights.len() && weights.windows(2).all(|w| w[0] == w[1]);
        let cumulative = if uniform {
            Vec::new()
        } else {
            weights
                .iter()
                .scan(0u64, |acc, &w| {
                    *acc += u64::from(w);
                    Some(*acc)
                })
                .collect()
        };
        WeightedRandom { cumulative, n: if positive == 0 { 0 } else { weights.len() } }
    }

    #[inline]
    pub(crate) fn pick(&self, rng: &mut fastrand::Rng) -> Option<usize> {
        if self.n == 0 {
            return None;
        }
        match self.cumulative.last() {
            None => Some(rng.usize(..self.n)),
            Some(&total) => {
                let r = rng.u64(..total);
                Some(self.cumulative.partition_point(|&c| c <= r))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_weights_are_never_drawn() {
        let s = WeightedRandom::new(&[0, 3, 0, 1]);
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            let i = s.pick(&mut rng).unwrap();
            assert!(i == 1 || i == 3);
        }
    }

    #[test]
    fn nothing_to_draw_from() {
        let mut rng = fastrand::Rng::with_seed(7);
        assert_eq!(WeightedRandom::new(&[]).pick(&mut rng), None);
        assert_eq!(WeightedRandom::new(&[0, 0]).pick(&mut rng), None);
    }
}
