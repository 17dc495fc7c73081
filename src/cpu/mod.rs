//! The CPU backend (ndarray + rayon): the executable specification of every op.

pub mod align;
pub mod anchors;
pub mod dapo;
pub mod float;
pub mod logprobs;
pub mod rows;
pub mod simd;

use rayon::prelude::*;

/// What limits a loop, which decides whether waking the rayon pool pays.
///
/// Entering the pool from the (non-worker) Python thread is a cross-thread hand-off of
/// ~10-50 us. Compute-bound loops (the DAPO token math) gain from two threads above ~64K element
/// operations. Memory-bound passes (gathering or scattering anchor rows) gain nothing at the
/// sizes of a training step and only contend with PyTorch's OpenMP threads, which keep spinning
/// for a while after every torch op: measured as several milliseconds added to a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// Arithmetic per element dominates.
    Compute,
    /// Moving memory dominates.
    Memory,
}

impl Bound {
    /// Whether `work` element operations of this kind are worth the pool.
    pub fn parallel(self, work: usize) -> bool {
        work >= match self {
            Bound::Compute => 1 << 16,
            Bound::Memory => 1 << 24,
        }
    }
}

/// `(0..n).map(f).collect()`, in parallel when `work` (total element operations) is large.
pub fn map_range<R: Send>(
    n: usize,
    work: usize,
    bound: Bound,
    f: impl Fn(usize) -> R + Sync + Send,
) -> Vec<R> {
    if bound.parallel(work) {
        (0..n).into_par_iter().map(f).collect()
    } else {
        (0..n).map(f).collect()
    }
}

/// Calls `f(i, chunk)` for the consecutive `chunk_len`-element chunks of `data`, in parallel
/// when `data` is large.
pub fn for_each_chunk<A: Send>(
    data: &mut [A],
    chunk_len: usize,
    bound: Bound,
    f: impl Fn(usize, &mut [A]) + Sync + Send,
) {
    let chunk_len = chunk_len.max(1);
    if bound.parallel(data.len()) {
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// Like [`for_each_chunk`], with one element of `state` per chunk handed to `f` as well.
pub fn for_each_chunk_with<A: Send, S: Send>(
    data: &mut [A],
    chunk_len: usize,
    state: &mut [S],
    bound: Bound,
    f: impl Fn(usize, &mut [A], &mut S) + Sync + Send,
) {
    let chunk_len = chunk_len.max(1);
    if bound.parallel(data.len()) {
        data.par_chunks_mut(chunk_len)
            .zip(state)
            .enumerate()
            .for_each(|(i, (c, s))| f(i, c, s));
    } else {
        data.chunks_mut(chunk_len)
            .zip(state)
            .enumerate()
            .for_each(|(i, (c, s))| f(i, c, s));
    }
}
