//! `find_anchors` on the CPU: each row scanned from the end (last occurrence) or the start
//! (first), stopping at the first start column where a spelling (or a marker text) matches.

use super::float::Strided2;
use super::{Bound, map_range, simd};
use crate::error::Result;
use crate::op::anchors::{FindAnchors, Occurrence, TextMarkers, can_start, pieces, place};
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
    // Rows in parallel from 64k tokens: at B=512, T=8192 two threads scan a batch without a
    // marker in 5.3 ms against 8.3 ms on one (interleaved with torch ops, whose idle OpenMP
    // threads share the cores), bench-results/find-anchors.md.
    let anchors = map_range(b, b * t, Bound::Compute, |r| {
        simd::vectorized(
            #[inline(always)]
            || row(r),
        )
    });
    out.copy_from_slice(&anchors);
}

/// The vocabulary and marker texts of a text search, read from CPU tensors.
pub struct TextSearch<'a> {
    bytes: &'a [u8],
    offsets: &'a [i64],
    starts: &'a [u8],
    markers: Vec<&'a [u8]>,
}

impl<'a> TextSearch<'a> {
    /// Reads the tensors of `m` (checked by [`TextMarkers::check`]) and the marker texts.
    pub fn new(m: &'a TextMarkers) -> Result<Self> {
        Ok(TextSearch {
            bytes: m.vocab_bytes.as_slice::<u8>()?,
            offsets: m.vocab_offsets.as_slice::<i64>()?,
            starts: m.token_starts.as_slice::<u8>()?,
            markers: pieces("markers", &m.marker_bytes, &m.marker_offsets, true)?,
        })
    }

    /// The bytes token `id` spells; None outside the vocabulary (or for malformed offsets,
    /// which are then never read out of bounds).
    #[inline]
    fn token(&self, id: i64) -> Option<&'a [u8]> {
        let v = usize::try_from(id)
            .ok()
            .filter(|&v| v < self.starts.len())?;
        let (lo, hi) = (self.offsets[v], self.offsets[v + 1]);
        self.bytes
            .get(usize::try_from(lo).ok()?..usize::try_from(hi).ok()?)
    }

    /// Whether a marker may start inside token `id` (the precomputed filter).
    #[inline]
    fn may_start(&self, id: i64) -> bool {
        usize::try_from(id)
            .ok()
            .and_then(|v| self.starts.get(v))
            .is_some_and(|&f| f != 0)
    }
}

/// Fills `out` (`[V]`) with 1 where a match of one of `markers` can start inside token v of
/// `vocab` (its bytes), 0 elsewhere: the filter [`find_text_anchors`] and the kernel apply
/// before verifying a column.
pub fn text_marker_starts(vocab: &[&[u8]], markers: &[&[u8]], out: &mut [u8]) {
    let flags = map_range(vocab.len(), vocab.len() * 8, Bound::Compute, |v| {
        can_start(vocab[v], markers) as u8
    });
    out.copy_from_slice(&flags);
}

/// Fills `out` (`[B]`) as [`find_anchors`] does, for marker texts: column s matches when a
/// marker's first byte lies in the token at s and its bytes continue through the following
/// response tokens.
pub fn find_text_anchors<I: TokenId, M: Scalar + Copy>(
    inp: &FindAnchors,
    (b, t): (usize, usize),
    search: &TextSearch,
    out: &mut [i64],
) {
    let tokens = Strided2::of(&inp.token_ids);
    let mask = Strided2::of(&inp.response_mask);
    // SAFETY (both): r < B and c < T, inside the [B, T] tensors of the stated types.
    let id = |r: usize, c: usize| unsafe { tokens.get::<I>(r, c).id() };
    let live = |r: usize, c: usize| unsafe { mask.get::<M>(r, c).to_f64() != 0.0 };
    // Whether `marker` continues from byte `j` of the token at (r, s) through the response.
    let continues = |r: usize, s: usize, first: &[u8], marker: &[u8]| -> bool {
        let (mut rest, mut piece, mut c) = (marker, first, s);
        loop {
            let k = piece.len().min(rest.len());
            if piece[..k] != rest[..k] {
                return false;
            }
            rest = &rest[k..];
            if rest.is_empty() {
                return true;
            }
            c += 1;
            if c >= t || !live(r, c) {
                return false;
            }
            match search.token(id(r, c)) {
                Some(next) => piece = next,
                None => return false,
            }
        }
    };
    let matches_at = |r: usize, s: usize| -> bool {
        let tok = id(r, s);
        if !search.may_start(tok) || !live(r, s) {
            return false;
        }
        let Some(bytes) = search.token(tok) else {
            return false;
        };
        (0..bytes.len()).any(|j| {
            search
                .markers
                .iter()
                .any(|m| continues(r, s, &bytes[j..], m))
        })
    };
    let (occurrence, offset) = (inp.occurrence, inp.offset);
    let row = |r: usize| -> i64 {
        let found = match occurrence {
            Occurrence::Last => (0..t).rev().find(|&s| matches_at(r, s)),
            Occurrence::First => (0..t).find(|&s| matches_at(r, s)),
        };
        found.map_or(-1, |s| place(s, offset, t))
    };
    // Rows in parallel from 64k tokens, as the id scan.
    let anchors = map_range(b, b * t, Bound::Compute, |r| {
        simd::vectorized(
            #[inline(always)]
            || row(r),
        )
    });
    out.copy_from_slice(&anchors);
}

/// Columns compared at once by [`scan`]: enough for the compiler to vectorise the comparison
/// without a branch per element.
const LANES: usize = 16;

/// The last (or first) column `s` of `ids` with `candidate(ids[s])` and `matches(s)`.
/// Candidates are found `LANES` columns at a time, with no early exit inside a group.
#[inline(always)]
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
    use crate::op::anchors::Markers;
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
            markers: Markers::Tokens {
                tokens: TensorRef::from_slice("marker_tokens", &mut flat, &[nf]),
                offsets: TensorRef::from_slice("marker_offsets", &mut offsets, &[no]),
            },
            occurrence: occ.parse().unwrap(),
            offset,
        };
        let Markers::Tokens { tokens, offsets } = &inp.markers else {
            unreachable!()
        };
        let spellings = pieces("markers", tokens, offsets, true).unwrap();
        let mut out = vec![0i64; b];
        find_anchors::<i32, f32>(&inp, (b, t), &spellings, &mut out);
        out
    }

    /// Cuts `pieces` into (bytes, offsets).
    fn packed(pieces: &[&[u8]]) -> (Vec<u8>, Vec<i64>) {
        let mut offsets = vec![0i64];
        for p in pieces {
            offsets.push(offsets.last().unwrap() + p.len() as i64);
        }
        (pieces.concat(), offsets)
    }

    /// The text search over a vocabulary of `vocab` (token v spells `vocab[v]`).
    fn run_text(
        tokens: &[i64],
        t: usize,
        vocab: &[&[u8]],
        markers: &[&[u8]],
        occ: &str,
    ) -> Vec<i64> {
        let b = tokens.len() / t;
        let mut tokens = tokens.to_vec();
        let mut mask = vec![1u8; tokens.len()];
        let (mut vb, mut vo) = packed(vocab);
        let (mut mb, mut mo) = packed(markers);
        let mut starts: Vec<u8> = vocab.iter().map(|v| can_start(v, markers) as u8).collect();
        let (nvb, nvo, nmb, nmo, v) = (vb.len(), vo.len(), mb.len(), mo.len(), vocab.len());
        let inp = FindAnchors {
            token_ids: TensorRef::from_slice("token_ids", &mut tokens, &[b, t]),
            response_mask: TensorRef::from_slice("response_mask", &mut mask, &[b, t]),
            markers: Markers::Text(TextMarkers {
                vocab_bytes: TensorRef::from_slice("vocab_bytes", &mut vb, &[nvb]),
                vocab_offsets: TensorRef::from_slice("vocab_offsets", &mut vo, &[nvo]),
                token_starts: TensorRef::from_slice("token_starts", &mut starts, &[v]),
                marker_bytes: TensorRef::from_slice("marker_bytes", &mut mb, &[nmb]),
                marker_offsets: TensorRef::from_slice("marker_offsets", &mut mo, &[nmo]),
            }),
            occurrence: occ.parse().unwrap(),
            offset: -1,
        };
        inp.check().unwrap();
        let Markers::Text(text) = &inp.markers else {
            unreachable!()
        };
        let mut out = vec![0i64; b];
        find_text_anchors::<i64, u8>(&inp, (b, t), &TextSearch::new(text).unwrap(), &mut out);
        out
    }

    #[test]
    fn marker_texts_match_across_merged_tokens() {
        // "x", " \", "boxed", "{-", "3", "}", "{", "Answer", ":**", " Ans", "wer:", "", "\boxed"
        let vocab: [&[u8]; 13] = [
            b"x", b" \\", b"boxed", b"{-", b"3", b"}", b"{", b"Answer", b":**", b" Ans", b"wer:",
            b"", b"\\boxed",
        ];
        let boxed: [&[u8]; 1] = [b"\\boxed{"];
        // x \boxed{-3}: the marker ends inside "{-"; its first byte is in " \\" (column 1).
        assert_eq!(
            run_text(&[0, 1, 2, 3, 4, 5], 6, &vocab, &boxed, "last"),
            [0]
        );
        // An empty token inside the marker holds no byte and does not break it.
        assert_eq!(
            run_text(&[0, 0, 1, 11, 2, 6], 6, &vocab, &boxed, "last"),
            [1]
        );
        // The marker cut short by the row's end, or by an out-of-vocabulary id, is no match.
        assert_eq!(
            run_text(&[0, 0, 0, 0, 1, 2], 6, &vocab, &boxed, "last"),
            [-1]
        );
        assert_eq!(
            run_text(&[0, 0, 0, 1, 99, 2], 6, &vocab, &boxed, "last"),
            [-1]
        );
        // Two occurrences: last and first.
        let row = [12, 6, 0, 12, 3, 0];
        assert_eq!(run_text(&row, 6, &vocab, &boxed, "last"), [2]);
        assert_eq!(run_text(&row, 6, &vocab, &boxed, "first"), [-1]);
        // "**Answer:**" spelled "Answer" ":**"; " Ans" "wer:" elsewhere.
        let answer: [&[u8]; 1] = [b"Answer:"];
        assert_eq!(
            run_text(&[0, 7, 8, 0, 0, 0], 6, &vocab, &answer, "last"),
            [0]
        );
        assert_eq!(
            run_text(&[0, 0, 9, 10, 0, 0], 6, &vocab, &answer, "last"),
            [1]
        );
        assert_eq!(
            run_text(&[0, 0, 9, 0, 10, 0], 6, &vocab, &answer, "last"),
            [-1]
        );
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
