//! Rollout grouping shared by every op: explicit labels or contiguous blocks.

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// How rollouts are grouped.
pub enum Grouping<'a> {
    /// int64 (or int32) labels `[B]`, any order, not necessarily contiguous.
    Ids(TensorRef<'a>),
    /// Contiguous blocks of this many rollouts.
    Size(usize),
}

impl<'a> Grouping<'a> {
    /// Exactly one of `group_ids` and `group_size`, as the Python API takes them.
    pub fn from_args(ids: Option<TensorRef<'a>>, size: Option<i64>) -> Result<Self> {
        let one_of = "exactly one of group_ids and group_size";
        match (ids, size) {
            (Some(ids), None) => Ok(Grouping::Ids(ids)),
            (None, Some(g)) if g > 0 => Ok(Grouping::Size(g as usize)),
            (None, Some(g)) => Err(Error::value("group_size", "a positive integer", g)),
            (Some(_), Some(_)) => Err(Error::value("group_ids", one_of, "both")),
            (None, None) => Err(Error::value("group_ids", one_of, "neither")),
        }
    }
}

/// Labels → dense group indices in sorted label order (the order of `torch.unique`), and the
/// number of groups.
pub fn dense_groups(grouping: &Grouping, batch: usize) -> Result<(Vec<usize>, usize)> {
    match grouping {
        Grouping::Size(0) => Err(Error::value("group_size", "a positive integer", 0)),
        Grouping::Size(g) if batch % g != 0 => Err(Error::value(
            "group_size",
            format!("a divisor of the batch size B = {batch}"),
            g,
        )),
        Grouping::Size(g) => Ok(((0..batch).map(|b| b / g).collect(), batch / g)),
        Grouping::Ids(ids) => {
            if ids.shape() != [batch] {
                return Err(Error::shape(
                    "group_ids",
                    format!("[B] = [{batch}]"),
                    ids.shape(),
                ));
            }
            let labels = ids.to_i64_vec().map_err(|e| match e {
                Error::Dtype { got, .. } => Error::Dtype {
                    arg: "group_ids",
                    expected: "int64 or int32".into(),
                    got,
                },
                other => other,
            })?;
            let mut unique = labels.clone();
            unique.sort_unstable();
            unique.dedup();
            let dense = labels
                .iter()
                .map(|l| {
                    unique
                        .binary_search(l)
                        .expect("label is in its own sorted set")
                })
                .collect();
            Ok((dense, unique.len()))
        }
    }
}

/// Members of each dense group, in ascending rollout order.
pub fn members(group: &[usize], num_groups: usize) -> Vec<Vec<usize>> {
    let mut out = vec![Vec::new(); num_groups];
    for (b, &g) in group.iter().enumerate() {
        out[g].push(b);
    }
    out
}

impl<'a> Grouping<'a> {
    /// The label tensor, if the grouping has one.
    pub fn tensor(&self) -> Option<&TensorRef<'a>> {
        match self {
            Grouping::Ids(t) => Some(t),
            Grouping::Size(_) => None,
        }
    }

    /// Checks that need no label values: `[B]` int32/int64 labels, or a block size dividing
    /// B. Returns the number of groups when it is known without reading labels.
    pub fn check_metadata(&self, batch: usize) -> Result<Option<usize>> {
        match self {
            Grouping::Size(0) => Err(Error::value("group_size", "a positive integer", 0)),
            Grouping::Size(g) if batch % g != 0 => Err(Error::value(
                "group_size",
                format!("a divisor of the batch size B = {batch}"),
                g,
            )),
            Grouping::Size(g) => Ok(Some(batch / g)),
            Grouping::Ids(ids) => {
                if ids.shape() != [batch] {
                    return Err(Error::shape(
                        "group_ids",
                        format!("[B] = [{batch}]"),
                        ids.shape(),
                    ));
                }
                if !matches!(ids.dtype(), DType::I64 | DType::I32) {
                    return Err(Error::Dtype {
                        arg: "group_ids",
                        expected: "int64 or int32".into(),
                        got: ids.dtype().to_string(),
                    });
                }
                Ok(None)
            }
        }
    }
}

/// The group id of a uid string: the 8-byte BLAKE2b digest of its UTF-8 bytes read as a
/// little-endian int64 (`hashlib.blake2b(uid.encode(), digest_size=8)`). Stable across
/// processes, ranks and runs, unlike Python's salted `hash`.
pub fn uid_group_id(uid: &[u8]) -> i64 {
    use blake2::Blake2bVar;
    use blake2::digest::{Update, VariableOutput};
    let mut hasher = Blake2bVar::new(8).expect("8 bytes is a valid BLAKE2b digest size");
    hasher.update(uid);
    let mut digest = [0u8; 8];
    hasher
        .finalize_variable(&mut digest)
        .expect("the buffer has the digest size");
    i64::from_le_bytes(digest)
}

#[cfg(test)]
mod tests {
    use super::uid_group_id;

    /// Digests pinned from Python's `hashlib.blake2b(s.encode(), digest_size=8)`.
    #[test]
    fn uid_hash_is_hashlib_blake2b_of_8_bytes() {
        for (uid, want) in PINNED {
            assert_eq!(uid_group_id(uid.as_bytes()), *want, "{uid:?}");
        }
    }

    const PINNED: &[(&str, i64)] = &[
        ("", -5426141060434712860),
        ("a", 3405396810240292928),
        ("3f2b0c9e-1d2a-4b8e-9f00-123456789abc", -6991658127918832424),
        ("prompt-17", 6229880918185817228),
        ("\u{fc}n\u{ef}c\u{f8}d\u{e9} \u{2713}", -569160866146853634),
    ];
}
