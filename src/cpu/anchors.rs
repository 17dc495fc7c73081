//! `find_anchors` on the CPU: each row scanned from the end (last occurrence) or the start
//! (first), stopping at the first start column where a spelling matches.

use super::float::Strided2;
use super::{Bound, map_range};
use crate::op::anchors::{FindAnchors, Occurrence, place};
use crate::tensor::Scalar;

/// A token id as stored (int32 or int64), compared exactly as int64.
pub trait TokenId: Copy {
    /// The id widened to int64.
    fn id(self) -> i64;
}

impl TokenId for i32 {
    fn id(self) -> i64 {
        self as i64
    }
}

impl TokenId for i64 {
    fn id(self) -> i64 {
        self
    }
}

/// Fills `out` (`[B]`) with each row's anchor, -1 where no spelling matches inside the
/// response or the anchor falls outside the row. `I` is the storage type of `token_ids`, `M`
/// that of `response_mask`; `(b, t)` and `spellings` were checked by the caller.
pub fn find_anchors<I: TokenId, M: Scalar + Copy>(
    inp: &FindAnchors,
    (b, t): (usize, usize),
    spellings: &[&[i64]],
    out: &mut [i64],
) {
    let tokens = Strided2::of(&inp.token_ids);
    let mask = Strided2::of(&inp.response_mask);
    // Longest spelling matching at (r, s) wholly inside the response; 0 when none does.
    let longest_at = |r: usize, s: usize| -> usize {
        let mut best = 0;
        for m in spellings {
            if m.len() <= best || s + m.len() > t {
                continue;
            }
            // SAFETY: r < B and s + j < T, inside both [B, T] tensors of the stated types.
            let hit = m.iter().enumerate().all(|(j, &want)| unsafe {
                tokens.get::<I>(r, s + j).id() == want && mask.get::<M>(r, s + j).to_f64() != 0.0
            });
            if hit {
                best = m.len();
            }
        }
        best
    };
    let (occurrence, offset) = (inp.occurrence, inp.offset);
    let mut firsts: Vec<i64> = spellings.iter().map(|m| m[0]).collect();
    firsts.sort_unstable();
    firsts.dedup();
    let row = |r: usize| -> i64 {
        // SAFETY: r < B; a contiguous row of T elements of type I.
        let found = match unsafe { tokens.row_slice::<I>(r, 0, t) } {
            // Contiguous rows: a vectorised search for the first tokens of the spellings picks
            // the candidate starts; only those are checked in full.
            Some(ids) => match firsts.as_slice() {
                [a] => scan(ids, occurrence, |x| x == *a, |s| longest_at(r, s) > 0),
                [a, b] => scan(
                    ids,
                    occurrence,
                    |x| (x == *a) | (x == *b),
                    |s| longest_at(r, s) > 0,
                ),
                many => scan(
                    ids,
                    occurrence,
                    |x| many.contains(&x),
                    |s| longest_at(r, s) > 0,
                ),
            },
            None => match occurrence {
                Occurrence::Last => (0..t).rev().find(|&s| longest_at(r, s) > 0),
                Occurrence::First => (0..t).find(|&s| longest_at(r, s) > 0),
            },
        };
        found.map_or(-1, |s| place(s, offset, t))
    };
    let anchors = map_range(b, b * t, Bound::Memory, row);
    out.copy_from_slice(&anchors);
}

/// Columns compared at once by [`scan`]: enough for the compiler to vectorise the comparison
/// without a branch per element.
const LANES: usize = 16;

/// The last (or first) column `s` of `ids` with `candidate(ids[s])` and `matches(s)`.
/// Candidates are found `LANES` columns at a time, with no early exit inside a group.
fn scan<I: TokenId>(
    ids: &[I],
    occurrence: Occurrence,
    candidate: impl Fn(i64) -> bool,
    matches: impl Fn(usize) -> bool,
) -> Option<usize> {
    let any = |group: &[I]| group.iter().fold(false, |acc, &x| acc | candidate(x.id()));
    match occurrence {
        Occurrence::Last => {
            let mut end = ids.len();
            while end > 0 {
                let start = end.saturating_sub(LANES);
                let group = &ids[start..end];
                if any(group) {
                    let hit = (start..end)
                        .rev()
                        .find(|&s| candidate(ids[s].id()) && matches(s));
                    if hit.is_some() {
                        return hit;
                    }
                }
                end = start;
            }
            None
        }
        Occurrence::First => {
            let mut start = 0;
            while start < ids.len() {
                let end = (start + LANES).min(ids.len());
                if any(&ids[start..end]) {
                    let hit = (start..end).find(|&s| candidate(ids[s].id()) && matches(s));
                    if hit.is_some() {
                        return hit;
                    }
                }
                start = end;
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorRef;

    fn run(
        tokens: &[i32],
        mask: &[f32],
        t: usize,
        spellings: &[&[i64]],
        occ: &str,
        offset: i64,
    ) -> Vec<i64> {
        let b = tokens.len() / t;
        let (mut tokens, mut mask) = (tokens.to_vec(), mask.to_vec());
        let mut flat: Vec<i64> = spellings.iter().flat_map(|s| s.iter().copied()).collect();
        let mut offsets = vec![0i64];
        for s in spellings {
            offsets.push(offsets.last().unwrap() + s.len() as i64);
        }
        let (nf, no) = (flat.len(), offsets.len());
        let inp = FindAnchors {
            token_ids: TensorRef::from_slice("token_ids", &mut tokens, &[b, t]),
            response_mask: TensorRef::from_slice("response_mask", &mut mask, &[b, t]),
            marker_tokens: TensorRef::from_slice("marker_tokens", &mut flat, &[nf]),
            marker_offsets: TensorRef::from_slice("marker_offsets", &mut offsets, &[no]),
            occurrence: occ.parse().unwrap(),
            offset,
        };
        let mut out = vec![0i64; b];
        find_anchors::<i32, f32>(&inp, (b, t), &inp.spellings().unwrap(), &mut out);
        out
    }

    #[test]
    fn last_and_first_occurrence_with_ties_masks_and_offsets() {
        // Row 0: "5 6" at 1 and "5 6 7" at 4; row 1: the marker straddles the response start.
        let tokens = [1, 5, 6, 2, 5, 6, 7, 3, 9, 5, 6, 4, 4, 4];
        let mask = [1., 1., 1., 1., 1., 1., 1., 0., 0., 0., 1., 1., 1., 1.];
        let m: [&[i64]; 2] = [&[5, 6], &[5, 6, 7]];
        assert_eq!(run(&tokens, &mask, 7, &m, "last", -1), [3, -1]);
        assert_eq!(run(&tokens, &mask, 7, &m, "first", -1), [0, -1]);
        assert_eq!(run(&tokens, &mask, 7, &m, "first", 0), [1, -1]);
        // Anchors outside the row are -1, never a wrapped position.
        assert_eq!(run(&tokens, &mask, 7, &m, "first", -2), [-1, -1]);
        assert_eq!(run(&tokens, &mask, 7, &m, "last", 3), [-1, -1]);
        assert_eq!(run(&tokens, &mask, 7, &m, "last", i64::MAX), [-1, -1]);
        assert_eq!(run(&tokens, &mask, 7, &m, "last", i64::MIN), [-1, -1]);
        // Row 1 with the whole row in the response: the match at 2 counts.
        let full = [1.0f32; 14];
        assert_eq!(run(&tokens, &full, 7, &m, "last", -1), [3, 1]);
    }
}
