//! Anchors from tokens: per rollout, the position next to the last (or first) occurrence of an
//! answer marker in its response; a match lies wholly inside the response. Markers come in two
//! kinds: token-id spellings, matched token for token, or marker texts, matched on the bytes
//! the tokens spell (so a tokenizer that merges the marker's first or last character with its
//! neighbours still matches; docs/design.md, "Anchors").

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::tensor::{DType, HasDType, TensorRef};

/// Which occurrence of the marker names the anchor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Occurrence {
    /// The match with the greatest start (ties: the longest spelling).
    Last,
    /// The match with the smallest start (ties: the longest spelling).
    First,
}

impl FromStr for Occurrence {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "last" => Ok(Occurrence::Last),
            "first" => Ok(Occurrence::First),
            other => Err(Error::value(
                "occurrence",
                "one of 'last', 'first'",
                format!("{other:?}"),
            )),
        }
    }
}

/// Marker texts and the vocabulary whose bytes they are matched against.
///
/// A match of text m starts in the token that holds m's first byte (at any byte of it) and
/// continues through the following tokens of the response until m's last byte; the start
/// column is that first token's. Token ids outside `0..V` spell no known text: they neither
/// start nor continue a match.
pub struct TextMarkers<'a> {
    /// Every token's bytes one after another: contiguous uint8 `[N]`.
    pub vocab_bytes: TensorRef<'a>,
    /// Token v spells `vocab_bytes[offsets[v]..offsets[v + 1]]`: contiguous int64 `[V + 1]`.
    pub vocab_offsets: TensorRef<'a>,
    /// Contiguous uint8 `[V]`: nonzero where some marker can start inside the token (see
    /// [`text_marker_starts`]); the scan verifies only those tokens.
    pub token_starts: TensorRef<'a>,
    /// Every marker's bytes one after another: contiguous uint8 `[K]`.
    pub marker_bytes: TensorRef<'a>,
    /// Marker m is `marker_bytes[offsets[m]..offsets[m + 1]]`: contiguous int64 `[M + 1]`.
    pub marker_offsets: TensorRef<'a>,
}

/// What a match is made of.
// One value per call, on the stack: boxing the larger variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Markers<'a> {
    /// Token-id spellings, matched token for token.
    Tokens {
        /// Every spelling's token ids one after another: contiguous int64 `[total]`.
        tokens: TensorRef<'a>,
        /// Spelling m is `tokens[offsets[m]..offsets[m + 1]]`: contiguous int64 `[M + 1]`.
        offsets: TensorRef<'a>,
    },
    /// Marker texts, matched on the bytes of the tokens.
    Text(TextMarkers<'a>),
}

/// The inputs of `find_anchors`.
pub struct FindAnchors<'a> {
    /// int32/int64 `[B, T]`, any strides.
    pub token_ids: TensorRef<'a>,
    /// `[B, T]` of any dtype, any strides: nonzero marks a response token.
    pub response_mask: TensorRef<'a>,
    /// The markers.
    pub markers: Markers<'a>,
    /// Which occurrence wins.
    pub occurrence: Occurrence,
    /// The anchor is `start + offset` (-1: the token before the marker).
    pub offset: i64,
}

/// A contiguous 1-d tensor of one of `dtypes`.
fn expect_flat(t: &TensorRef, dtypes: &[DType]) -> Result<()> {
    t.expect_dtype(dtypes)?;
    if t.ndim() != 1 || !t.is_contiguous() {
        return Err(Error::shape(t.name(), "a contiguous 1-d tensor", t.shape()));
    }
    Ok(())
}

impl FindAnchors<'_> {
    /// The tensors that must share the device of `token_ids`.
    pub fn others(&self) -> [Option<&TensorRef<'_>>; 6] {
        match &self.markers {
            Markers::Tokens { tokens, offsets } => [
                Some(&self.response_mask),
                Some(tokens),
                Some(offsets),
                None,
                None,
                None,
            ],
            Markers::Text(m) => [
                Some(&self.response_mask),
                Some(&m.vocab_bytes),
                Some(&m.vocab_offsets),
                Some(&m.token_starts),
                Some(&m.marker_bytes),
                Some(&m.marker_offsets),
            ],
        }
    }

    /// Checks dtypes and shapes (nothing that reads elements); returns `(B, T)`.
    pub fn check(&self) -> Result<(usize, usize)> {
        let ids = &self.token_ids;
        if !matches!(ids.dtype(), DType::I32 | DType::I64) {
            return Err(Error::Dtype {
                arg: "token_ids",
                expected: "int64 or int32".into(),
                got: ids.dtype().to_string(),
            });
        }
        ids.expect_ndim(2, "[B, T]")?;
        let (b, t) = (ids.shape()[0], ids.shape()[1]);
        if self.response_mask.shape() != [b, t] {
            return Err(Error::shape(
                "response_mask",
                format!("[B, T] = [{b}, {t}] (the shape of token_ids)"),
                self.response_mask.shape(),
            ));
        }
        match &self.markers {
            Markers::Tokens { tokens, offsets } => {
                expect_flat(tokens, &[DType::I64])?;
                expect_flat(offsets, &[DType::I64])?;
                if offsets.numel() < 2 {
                    return Err(Error::value(
                        "markers",
                        "at least one token-id sequence",
                        "none",
                    ));
                }
            }
            Markers::Text(m) => m.check()?,
        }
        Ok((b, t))
    }
}

impl TextMarkers<'_> {
    /// Checks dtypes and shapes: `token_starts` has one entry per token, and there is at least
    /// one marker. The offsets are read where they are used, bounds-checked there.
    pub fn check(&self) -> Result<()> {
        for t in [&self.vocab_bytes, &self.token_starts, &self.marker_bytes] {
            expect_flat(t, &[DType::U8])?;
        }
        for t in [&self.vocab_offsets, &self.marker_offsets] {
            expect_flat(t, &[DType::I64])?;
        }
        let vocab = self.vocab_offsets.numel().saturating_sub(1);
        if self.vocab_offsets.numel() < 1 || self.token_starts.numel() != vocab {
            return Err(Error::shape(
                "token_starts",
                format!("[V] with V = {vocab} (one entry per token of the vocabulary)"),
                self.token_starts.shape(),
            ));
        }
        if self.marker_offsets.numel() < 2 {
            return Err(Error::value("markers", "at least one marker text", "none"));
        }
        Ok(())
    }
}

/// `bytes` cut at `offsets` (`[n + 1]`) into `n` slices, read from CPU tensors: each checked
/// to lie inside `bytes` and, with `non_empty`, to hold at least one element. `arg` names the
/// argument in errors.
pub fn pieces<'a, T: HasDType>(
    arg: &'static str,
    bytes: &'a TensorRef,
    offsets: &TensorRef,
    non_empty: bool,
) -> Result<Vec<&'a [T]>> {
    let data = bytes.as_slice::<T>()?;
    let offsets = offsets.as_slice::<i64>()?;
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for (m, w) in offsets.windows(2).enumerate() {
        let (lo, hi) = (w[0], w[1]);
        if lo < 0 || hi < lo || (non_empty && hi == lo) || hi as usize > data.len() {
            let expected = if non_empty {
                "non-empty sequences"
            } else {
                "offsets that cut the bytes into pieces"
            };
            return Err(Error::value(
                arg,
                expected,
                format!("an empty or malformed sequence at index {m}"),
            ));
        }
        out.push(&data[lo as usize..hi as usize]);
    }
    Ok(out)
}

/// Whether a match of one of `markers` can start inside a token spelling `token`: some
/// suffix of it (at least one byte) agrees with a marker's beginning, or the marker lies
/// inside it.
pub fn can_start(token: &[u8], markers: &[&[u8]]) -> bool {
    markers.iter().any(|m| {
        (0..token.len()).any(|j| {
            let k = (token.len() - j).min(m.len());
            token[j..j + k] == m[..k]
        })
    })
}

/// The anchor of a match starting at column `start` of a row of `cols` columns: `start +
/// offset` when that lies in `0..cols`, else -1. Written without forming a sum that could
/// overflow for any `offset`.
pub fn place(start: usize, offset: i64, cols: usize) -> i64 {
    let (s, t) = (start as i64, cols as i64);
    if offset >= -s && offset < t - s {
        s + offset
    } else {
        -1
    }
}
