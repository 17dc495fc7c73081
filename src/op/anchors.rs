//! Anchors from tokens: per rollout, the position next to the last (or first) occurrence of an
//! answer marker in its response. A marker may have several spellings (token-id sequences);
//! a match lies wholly inside the response.

use std::str::FromStr;

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

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

/// The inputs of `find_anchors`.
pub struct FindAnchors<'a> {
    /// int32/int64 `[B, T]`, any strides.
    pub token_ids: TensorRef<'a>,
    /// `[B, T]` of any dtype, any strides: nonzero marks a response token.
    pub response_mask: TensorRef<'a>,
    /// Every spelling's token ids one after another: contiguous int64 `[total]`.
    pub marker_tokens: TensorRef<'a>,
    /// Spelling m is `marker_tokens[offsets[m]..offsets[m + 1]]`: contiguous int64 `[M + 1]`.
    pub marker_offsets: TensorRef<'a>,
    /// Which occurrence wins.
    pub occurrence: Occurrence,
    /// The anchor is `start + offset` (-1: the token before the marker).
    pub offset: i64,
}

impl FindAnchors<'_> {
    /// The tensors that must share the device of `token_ids`.
    pub fn others(&self) -> [Option<&TensorRef<'_>>; 3] {
        [
            Some(&self.response_mask),
            Some(&self.marker_tokens),
            Some(&self.marker_offsets),
        ]
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
        for m in [&self.marker_tokens, &self.marker_offsets] {
            m.expect_dtype(&[DType::I64])?;
            if m.ndim() != 1 || !m.is_contiguous() {
                return Err(Error::shape(m.name(), "a contiguous 1-d tensor", m.shape()));
            }
        }
        if self.marker_offsets.numel() < 2 {
            return Err(Error::value(
                "markers",
                "at least one token-id sequence",
                "none",
            ));
        }
        Ok((b, t))
    }

    /// The spellings, read from CPU tensors, each checked to be non-empty.
    pub fn spellings(&self) -> Result<Vec<&[i64]>> {
        let tokens = self.marker_tokens.as_slice::<i64>()?;
        let offsets = self.marker_offsets.as_slice::<i64>()?;
        let mut out = Vec::with_capacity(offsets.len() - 1);
        for (m, w) in offsets.windows(2).enumerate() {
            let (lo, hi) = (w[0], w[1]);
            if lo < 0 || hi <= lo || hi as usize > tokens.len() {
                return Err(Error::value(
                    "markers",
                    "non-empty token-id sequences",
                    format!("an empty or malformed sequence at index {m}"),
                ));
            }
            out.push(&tokens[lo as usize..hi as usize]);
        }
        Ok(out)
    }
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
