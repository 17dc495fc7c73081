//! The CPU backend (ndarray + rayon): the executable specification of every op.

pub mod align;
pub mod dapo;
pub mod float;
pub mod rows;

use rayon::prelude::*;

/// Below this many element operations a parallel section costs more than it saves: entering
/// the rayon pool from the (non-worker) Python thread is a cross-thread hand-off of ~10-50 us,
/// more than a whole small op.
pub const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `(0..n).map(f).collect()`, in parallel when `work` (total element operations) is large.
pub fn map_range<R: Send>(n: usize, work: usize, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
    if work < PARALLEL_MIN_WORK {
        (0..n).map(f).collect()
    } else {
        (0..n).into_par_iter().map(f).collect()
    }
}

/// Calls `f(i, chunk)` for the consecutive `chunk_len`-element chunks of `data`, in parallel
/// when `data` is large.
pub fn for_each_chunk<A: Send>(
    data: &mut [A],
    chunk_len: usize,
    f: impl Fn(usize, &mut [A]) + Sync + Send,
) {
    let chunk_len = chunk_len.max(1);
    if data.len() < PARALLEL_MIN_WORK {
        data.chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    } else {
        data.par_chunks_mut(chunk_len)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// Like [`for_each_chunk`], with one element of `state` per chunk handed to `f` as well.
pub fn for_each_chunk_with<A: Send, S: Send>(
    data: &mut [A],
    chunk_len: usize,
    state: &mut [S],
    f: impl Fn(usize, &mut [A], &mut S) + Sync + Send,
) {
    let chunk_len = chunk_len.max(1);
    if data.len() < PARALLEL_MIN_WORK {
        data.chunks_mut(chunk_len)
            .zip(state)
            .enumerate()
            .for_each(|(i, (c, s))| f(i, c, s));
    } else {
        data.par_chunks_mut(chunk_len)
            .zip(state)
            .enumerate()
            .for_each(|(i, (c, s))| f(i, c, s));
    }
}
