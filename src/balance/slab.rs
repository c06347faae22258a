//! In-flight counters in contiguous memory.
//!
//! Every endpoint's in-flight counter lives in a slot of a chunked array that
//! belongs to its set family, rather than inside the endpoint's own heap
//! allocation. LeastConnections reads every candidate's counter on every
//! pick; reading them in slot order walks memory sequentially (about 0.5 ns
//! per endpoint) instead of chasing one pointer per endpoint. Chunks never
//! move or shrink, so a slot stays valid while its endpoint lives; a freed
//! slot is reused by the next new endpoint. The locks here are taken only
//! when endpoints are created or dropped, never on the request path.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Counters per chunk.
pub(crate) const CHUNK: usize = 256;

pub(crate) struct Chunk {
    counters: [AtomicU32; CHUNK],
}

/// One endpoint's counter.
pub(crate) struct Slot {
    chunk: Arc<Chunk>,
    index: u32,
}

impl Slot {
    #[inline]
    pub(crate) fn counter(&self) -> &AtomicU32 {
        &self.chunk.counters[self.index as usize % CHUNK]
    }

    /// Position in the slab, for reading in slot order.
    pub(crate) fn index(&self) -> u32 {
        self.index
    }
}

#[derive(Default)]
pub(crate) struct Slab {
    inner: Mutex<SlabInner>,
}

#[derive(Default)]
struct SlabInner {
    chunks: Vec<Arc<Chunk>>,
    free: Vec<u32>,
}

impl Slab {
    pub(crate) fn alloc(&self) -> Slot {
        // Poisoning cannot leave the lists inconsistent: every mutation is one push or pop.
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let index = match inner.free.pop() {
            Some(i) => i,
            None => {
                let base = (inner.chunks.len() * CHUNK) as u32;
                inner.chunks.push(Arc::new(Chunk { counters: std::array::from_fn(|_| AtomicU32::new(0)) }));
                inner.free.extend((base + 1..base + CHUNK as u32).rev());
                base
            }
        };
        let chunk = inner.chunks[index as usize / CHUNK].clone();
        chunk.counters[index as usize % CHUNK].store(0, Ordering::Relaxed);
        Slot { chunk, index }
    }

    pub(crate) fn release(&self, slot: &Slot) {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).free.push(slot.index);
    }

    /// The chunks as they are now, for a reader that indexes slots directly.
    pub(crate) fn chunks(&self) -> Vec<Arc<Chunk>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner).chunks.clone()
    }
}

/// Reads counters by slot index from a snapshot of the chunks.
pub(crate) struct SlabReader {
    chunks: Vec<Arc<Chunk>>,
}

impl SlabReader {
    pub(crate) fn new(slab: &Slab) -> Self {
        SlabReader { chunks: slab.chunks() }
    }

    /// The counter at `index`, or zero for a slot allocated after the snapshot
    /// (which the reader's owner never asks for: it snapshots after its endpoints exist).
    #[inline]
    pub(crate) fn get(&self, index: u32) -> u32 {
        let i = index as usize;
        match self.chunks.get(i / CHUNK) {
            Some(c) => c.counters[i % CHUNK].load(Ordering::Relaxed),
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_reused_and_start_at_zero() {
        let slab = Slab::default();
        let a = slab.alloc();
        let b = slab.alloc();
        assert_ne!(a.index(), b.index());
        a.counter().store(5, Ordering::Relaxed);
        let reader = SlabReader::new(&slab);
        assert_eq!(reader.get(a.index()), 5);
        slab.release(&a);
        let c = slab.alloc();
        assert_eq!(c.index(), a.index());
        assert_eq!(c.counter().load(Ordering::Relaxed), 0);
    }

    #[test]
    fn chunks_grow_without_moving_slots() {
        let slab = Slab::default();
        let slots: Vec<Slot> = (0..3 * CHUNK).map(|_| slab.alloc()).collect();
        slots[7].counter().fetch_add(1, Ordering::Relaxed);
        let reader = SlabReader::new(&slab);
        assert_eq!(reader.get(slots[7].index()), 1);
        assert_eq!(reader.get(slots[2 * CHUNK + 1].index()), 0);
    }
}
