//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), with Envoy's
//! weighted table filling.
//!
//! Every endpoint walks its own permutation of the table slots (offset and
//! skip from two hashes of its address) and claims the next free one, in
//! turns, until the table is full. Each endpoint ends up owning a share of
//! slots proportional to its weight, the same key always lands on the same
//! slot, and removing one endpoint mostly frees only the slots it owned.
//! The table size is prime (so every skip generates a full permutation) and
//! at least 100 × endpoints, which bounds the imbalance to about 1%.

use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Default table size: the prime DESIGN.md names.
pub const DEFAULT_TABLE_SIZE: u64 = 65_537;

const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031; // "maglev01"
const SKIP_SEED: u64 = 0x6d61_676c_6576_3032; // "maglev02"
const KEY_SEED: u64 = 0x6675_6c63_6b65_7931; // "fulckey1"

/// Hashes a request key (source IP octets, a header or cookie value) for
/// consistent hashing. Stable across processes and versions of Fulcrum.
#[inline]
pub fn hash_key(key: &[u8]) -> u64 {
    xxh3_64_with_seed(key, KEY_SEED)
}

/// The smallest table size for `n` endpoints: the first prime at or above
/// both `min_size` and 100 × n.
pub fn table_size(n: usize, min_size: u64) -> u64 {
    next_prime(min_size.max(100 * n as u64))
}

fn next_prime(mut n: u64) -> u64 {
    if n <= 2 {
        return 2;
    }
    if n.is_multiple_of(2) {
        n += 1;
    }
    while !is_prime(n) {
        n += 2;
    }
    n
}

/// Trial division; table sizes are small (a few million at most).
pub(crate) fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// A built lookup table: slot → index of the endpoint that owns it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Maglev {
    table: Vec<u32>,
}

impl Maglev {
    /// Builds the table for endpoints named by `ids` (stable bytes, such as
    /// their address) with `weights`. `size` must be prime and larger than
    /// the number of endpoints with positive weight.
    pub(crate) fn build<'a>(ids: impl ExactSizeIterator<Item = &'a [u8]>, weights: &[u32], size: u64) -> Self {
        debug_assert!(is_prime(size));
        struct Entry {
            index: u32,
            skip: u64,
            /// Slot of the next candidate in this endpoint's permutation.
            pos: u64,
            weight: u64,
            target: u64,
        }
        impl Entry {
            /// Next slot of the permutation; `pos` and `skip` are below `size`,
            /// so a subtraction replaces the (much slower) modulo.
            #[inline(always)]
            fn advance(&mut self, size: u64) {
                self.pos += self.skip;
                if self.pos >= size {
                    self.pos -= size;
                }
            }
        }
        let max_weight = weights.iter().copied().max().unwrap_or(0) as u64;
        let mut entries: Vec<Entry> = ids
            .zip(weights)
            .enumerate()
            .filter(|(_, (_, w))| **w > 0)
            .map(|(i, (id, &w))| {
                let offset = xxh3_64_with_seed(id, OFFSET_SEED) % size;
                let skip = xxh3_64_with_seed(id, SKIP_SEED) % (size - 1) + 1;
                Entry { index: i as u32, skip, pos: offset, weight: u64::from(w), target: 0 }
            })
            .collect();
        if entries.is_empty() || size as usize <= entries.len() {
            return Maglev { table: Vec::new() };
        }
        const FREE: u32 = u32::MAX;
        let mut table = vec![FREE; size as usize];
        let mut filled = 0u64;
        let mut round = 1u64;
        while filled < size {
            for e in entries.iter_mut() {
                if filled == size {
                    break;
                }
                // An endpoint of weight w takes a turn in w of every
                // max_weight rounds (Envoy's weighted Maglev).
                if round * e.weight < e.target {
                    continue;
                }
                e.target += max_weight;
                while table[e.pos as usize] != FREE {
                    e.advance(size);
                }
                table[e.pos as usize] = e.index;
                e.advance(size);
                filled += 1;
            }
            round += 1;
        }
        Maglev { table }
    }

    /// The endpoint owning the key's slot (`k = 0`) or the `k`-th slot after
    /// it, a fall-back that is as stable per key as the first choice.
    #[inline]
    pub(crate) fn lookup(&self, hash: u64, k: u64) -> Option<usize> {
        let n = self.table.len() as u64;
        if n == 0 {
            return None;
        }
        Some(self.table[((hash % n + k) % n) as usize] as usize)
    }

    /// Slots per endpoint index, for tests and diagnostics.
    #[cfg(test)]
    pub(crate) fn slots(&self) -> &[u32] {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        assert!(is_prime(65_537));
        assert!(!is_prime(65_535));
        assert_eq!(table_size(10, DEFAULT_TABLE_SIZE), 65_537);
        let big = table_size(1000, DEFAULT_TABLE_SIZE);
        assert!(big >= 100_000 && is_prime(big));
    }

    #[test]
    fn weights_give_proportional_slots() {
        let ids: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i]).collect();
        let m = Maglev::build(ids.iter().map(|v| v.as_slice()), &[1, 2, 1], 10_007);
        let mut counts = [0usize; 3];
        for &s in m.slots() {
            counts[s as usize] += 1;
        }
        let share = counts[1] as f64 / 10_007.0;
        assert!((share - 0.5).abs() < 0.01, "{counts:?}");
    }
}
