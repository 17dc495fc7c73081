//! Resolving who takes part in the alignment loss: per rollout its anchor row of `hidden` (from
//! a mask or indices, padded or packed layout), its dense group and whether it is correct.

use crate::error::{Error, Result};
use crate::op::groups::{Grouping, dense_groups};
use crate::op::same_cpu_device;
use crate::tensor::{DType, TensorRef};

/// Where the anchors come from.
pub enum Anchors<'a> {
    /// bool/uint8 mask with at most one true element per rollout: `[B, T]` for padded
    /// hidden, `[N]` for packed hidden (with `cu_seqlens`).
    Mask(TensorRef<'a>),
    /// int64 `[B]`: position in `T` (padded) or row in `N` (packed); -1 for no anchor.
    Index(TensorRef<'a>),
}

/// How a flat row index maps into `hidden`: padded `[B, T, H]` rows are `b * T + t`,
/// packed `[N, H]` rows are `n`.
#[derive(Clone, Copy, Debug)]
pub struct RowSpace {
    /// Number of addressable rows (`B * T` or `N`).
    pub rows: usize,
    /// Rows per outer index (`T`, or `N` for packed so the outer index is always 0).
    pub inner: usize,
    /// Element stride of the outer index.
    pub outer_stride: isize,
    /// Element stride of the inner index.
    pub inner_stride: isize,
    /// Hidden size `H`.
    pub hidden_size: usize,
    /// Element stride along `H`.
    pub feature_stride: isize,
    /// True for the packed layout.
    pub packed: bool,
}

impl RowSpace {
    /// Describes `hidden` (`[B, T, H]` or `[N, H]`, a floating-point dtype).
    pub fn of(hidden: &TensorRef) -> Result<Self> {
        hidden.expect_dtype(&[DType::F32, DType::BF16, DType::F16, DType::F64])?;
        let (s, st) = (hidden.shape(), hidden.strides());
        match hidden.ndim() {
            3 => Ok(RowSpace {
                rows: s[0] * s[1],
                inner: s[1],
                outer_stride: st[0],
                inner_stride: st[1],
                hidden_size: s[2],
                feature_stride: st[2],
                packed: false,
            }),
            2 => Ok(RowSpace {
                rows: s[0],
                inner: s[0],
                outer_stride: 0,
                inner_stride: st[0],
                hidden_size: s[1],
                feature_stride: st[1],
                packed: true,
            }),
            _ => Err(Error::shape(
                "hidden",
                "[B, T, H] (padded) or [N, H] (packed)",
                s,
            )),
        }
    }

    /// Element offset of the first feature of flat row `row` (< `rows`).
    pub fn offset(&self, row: usize) -> isize {
        (row / self.inner) as isize * self.outer_stride
            + (row % self.inner) as isize * self.inner_stride
    }
}

/// Who takes part: per rollout its anchor row (-1: none), dense group and correctness.
#[derive(Clone, Debug, PartialEq)]
pub struct AnchorPlan {
    /// Flat anchor row per rollout, -1 when the rollout has no anchor.
    pub rows: Vec<i64>,
    /// Dense group index per rollout, in `0..num_groups` (sorted order of the labels).
    pub group: Vec<usize>,
    /// Correctness per rollout.
    pub correct: Vec<bool>,
    /// Number of distinct groups.
    pub num_groups: usize,
}

impl AnchorPlan {
    /// Number of rollouts.
    pub fn batch(&self) -> usize {
        self.rows.len()
    }
}

/// Validates every argument and resolves anchors, groups and correctness.
pub fn plan(
    hidden: &TensorRef,
    anchors: &Anchors,
    rewards: &TensorRef,
    grouping: &Grouping,
    threshold: f64,
    cu_seqlens: Option<&TensorRef>,
) -> Result<AnchorPlan> {
    let space = RowSpace::of(hidden)?;
    let anchor_tensor = match anchors {
        Anchors::Mask(t) | Anchors::Index(t) => t,
    };
    let others = [
        Some(rewards),
        cu_seqlens,
        Some(anchor_tensor),
        grouping.tensor(),
    ];
    same_cpu_device(hidden, &others)?;
    let batch = check_metadata(
        hidden, &space, anchors, rewards, grouping, threshold, cu_seqlens,
    )?;
    let correct: Vec<bool> = if rewards.dtype() == DType::Bool {
        rewards
            .to_f64_vec()?
            .into_iter()
            .map(|r| r != 0.0)
            .collect()
    } else {
        // NaN rewards compare false: a NaN-scored rollout counts as incorrect.
        rewards
            .to_f64_vec()?
            .into_iter()
            .map(|r| r > threshold)
            .collect()
    };
    let segments = match cu_seqlens {
        Some(cu) => Some(segments_of(cu, space.rows)?),
        None => None,
    };

    let rows = match anchors {
        Anchors::Mask(mask) => rows_from_mask(mask, &space, batch, segments.as_deref())?,
        Anchors::Index(index) => rows_from_index(index, &space, segments.as_deref())?,
    };
    let (group, num_groups) = dense_groups(grouping, batch)?;
    Ok(AnchorPlan {
        rows,
        group,
        correct,
        num_groups,
    })
}

/// `cu_seqlens` `[B + 1]` (shape checked) → per-rollout row ranges of the packed hidden.
fn segments_of(cu: &TensorRef, rows: usize) -> Result<Vec<(usize, usize)>> {
    let v = cu.to_i64_vec()?;
    let ok = v[0] == 0 && v.windows(2).all(|w| w[0] <= w[1]) && *v.last().unwrap() as usize <= rows;
    if !ok {
        return Err(Error::value(
            "cu_seqlens",
            format!("non-decreasing offsets starting at 0 and ending at most at N = {rows}"),
            format!("{v:?}"),
        ));
    }
    Ok(v.windows(2)
        .map(|w| (w[0] as usize, w[1] as usize))
        .collect())
}

fn rows_from_mask(
    mask: &TensorRef,
    space: &RowSpace,
    batch: usize,
    segments: Option<&[(usize, usize)]>,
) -> Result<Vec<i64>> {
    // Both layouts reduce to a flat boolean row space cut into per-rollout segments (dtype,
    // shape and the presence of cu_seqlens for packed hidden were checked by check_metadata).
    let segments: Vec<(usize, usize)> = match segments {
        Some(segments) => segments.to_vec(),
        None => {
            let t = space.inner;
            (0..batch).map(|b| (b * t, (b + 1) * t)).collect()
        }
    };
    let flat = read_bool_flat(mask)?;
    let mut rows = vec![-1i64; batch];
    for (b, &(lo, hi)) in segments.iter().enumerate() {
        for (r, _) in flat[lo..hi].iter().enumerate().filter(|(_, on)| **on) {
            if rows[b] >= 0 {
                return Err(Error::value(
                    "mask",
                    "at most one anchor (true element) per rollout",
                    format!("several in rollout {b}"),
                ));
            }
            rows[b] = (lo + r) as i64;
        }
    }
    Ok(rows)
}

fn read_bool_flat(mask: &TensorRef) -> Result<Vec<bool>> {
    // Read through the strides so transposed or sliced masks work without a copy.
    let shape = mask.shape();
    let strides = mask.strides();
    let mut out = Vec::with_capacity(mask.numel());
    let p = mask.data_ptr() as *const u8;
    let mut index = vec![0usize; shape.len()];
    for _ in 0..mask.numel() {
        let off: isize = index
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i as isize * s)
            .sum();
        // SAFETY: index < shape in every dimension, covered by the TensorRef invariant;
        // bool and uint8 are one byte each.
        out.push(unsafe { *p.offset(off) } != 0);
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    Ok(out)
}

fn rows_from_index(
    index: &TensorRef,
    space: &RowSpace,
    segments: Option<&[(usize, usize)]>,
) -> Result<Vec<i64>> {
    let limit = if space.packed {
        space.rows
    } else {
        space.inner
    };
    let what = if space.packed {
        "a row in [0, N)"
    } else {
        "a position in [0, T)"
    };
    index
        .to_i64_vec()?
        .into_iter()
        .enumerate()
        .map(|(b, i)| {
            if i == -1 {
                return Ok(-1);
            }
            if i < 0 || i as usize >= limit {
                return Err(Error::value(
                    "mask",
                    format!("-1 or {what} with bound {limit}"),
                    format!("{i} for rollout {b}"),
                ));
            }
            if let Some(seg) = segments {
                let (lo, hi) = seg[b];
                if (i as usize) < lo || i as usize >= hi {
                    return Err(Error::value(
                        "mask",
                        format!("row of rollout {b} inside its sequence [{lo}, {hi})"),
                        i,
                    ));
                }
            }
            Ok(if space.packed {
                i
            } else {
                (b * space.inner) as i64 + i
            })
        })
        .collect()
}

/// The checks of [`plan`] that need no element of any tensor (shapes, dtypes, devices were
/// checked by the backend selection): what the kernel backend can verify without reading
/// device memory. Returns B. Value checks (anchors in range, one anchor per mask row,
/// `cu_seqlens` offsets) happen in the kernels, which make the loss NaN instead of raising.
pub fn check_metadata(
    hidden: &TensorRef,
    space: &RowSpace,
    anchors: &Anchors,
    rewards: &TensorRef,
    grouping: &Grouping,
    threshold: f64,
    cu_seqlens: Option<&TensorRef>,
) -> Result<usize> {
    rewards.expect_ndim(1, "[B]")?;
    let batch = rewards.shape()[0];
    if !threshold.is_finite() {
        return Err(Error::value("threshold", "a finite number", threshold));
    }
    if !space.packed && hidden.shape()[0] != batch {
        return Err(Error::Shape {
            arg: "hidden",
            expected: format!("[B, T, H] with B = {batch} (the length of rewards)"),
            got: format!("{:?}", hidden.shape()),
        });
    }
    let ints = [DType::I64, DType::I32];
    match (space.packed, cu_seqlens) {
        (false, Some(_)) => {
            return Err(Error::value(
                "cu_seqlens",
                "None for padded hidden [B, T, H]",
                "a tensor",
            ));
        }
        (true, Some(cu)) => {
            cu.expect_dtype(&ints)?;
            if cu.shape() != [batch + 1] {
                return Err(Error::shape(
                    "cu_seqlens",
                    format!("[B + 1] = [{}]", batch + 1),
                    cu.shape(),
                ));
            }
        }
        _ => {}
    }
    match anchors {
        Anchors::Mask(mask) => {
            mask.expect_dtype(&[DType::Bool, DType::U8])?;
            if space.packed {
                if cu_seqlens.is_none() {
                    return Err(Error::value(
                        "cu_seqlens",
                        "a [B + 1] tensor when mask is a bool mask over packed hidden [N, H]",
                        "None",
                    ));
                }
                if mask.shape() != [space.rows] {
                    return Err(Error::shape(
                        "mask",
                        format!("[N] = [{}]", space.rows),
                        mask.shape(),
                    ));
                }
            } else if mask.shape() != [batch, space.inner] {
                return Err(Error::shape(
                    "mask",
                    format!("[B, T] = [{batch}, {}] or an int64 index [B]", space.inner),
                    mask.shape(),
                ));
            }
        }
        Anchors::Index(index) => {
            if !ints.contains(&index.dtype()) {
                return Err(Error::Dtype {
                    arg: "mask",
                    expected: "bool or uint8 (an anchor mask) or int64 (anchor indices)".into(),
                    got: index.dtype().to_string(),
                });
            }
            if index.shape() != [batch] {
                return Err(Error::shape(
                    "mask",
                    format!("an index [B] = [{batch}]"),
                    index.shape(),
                ));
            }
        }
    }
    grouping.check_metadata(batch)?;
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::groups::Grouping;

    fn hidden(data: &mut [f32], b: usize, t: usize, h: usize) -> TensorRef<'_> {
        TensorRef::from_slice("hidden", data, &[b, t, h])
    }

    #[test]
    fn mask_with_two_anchors_in_a_row_is_refused() {
        let mut h = vec![0f32; 2 * 3 * 2];
        let mut m = vec![false, true, true, false, false, true];
        let mut r = vec![1f32, 1.0];
        let err = plan(
            &hidden(&mut h, 2, 3, 2),
            &Anchors::Mask(TensorRef::from_slice("mask", &mut m, &[2, 3])),
            &TensorRef::from_slice("rewards", &mut r, &[2]),
            &Grouping::Size(2),
            0.5,
            None,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Value { arg: "mask", .. }), "{err}");
    }

    #[test]
    fn labels_become_dense_indices_in_sorted_order() {
        let mut h = vec![0f32; 8];
        let mut idx = vec![0i64, 1, -1, 0];
        let mut r = vec![1f32, 0.0, 1.0, 0.7];
        let mut ids = vec![42i64, -3, 42, 7];
        let p = plan(
            &hidden(&mut h, 4, 2, 1),
            &Anchors::Index(TensorRef::from_slice("mask", &mut idx, &[4])),
            &TensorRef::from_slice("rewards", &mut r, &[4]),
            &Grouping::Ids(TensorRef::from_slice("group_ids", &mut ids, &[4])),
            0.5,
            None,
        )
        .unwrap();
        assert_eq!(p.group, vec![2, 0, 2, 1]);
        assert_eq!(p.num_groups, 3);
        assert_eq!(p.rows, vec![0, 3, -1, 6]);
        assert_eq!(p.correct, vec![true, false, true, true]);
    }

    #[test]
    fn group_size_must_divide_the_batch() {
        let mut h = vec![0f32; 3];
        let mut idx = vec![0i64, 0, 0];
        let mut r = vec![1f32; 3];
        let err = plan(
            &hidden(&mut h, 3, 1, 1),
            &Anchors::Index(TensorRef::from_slice("mask", &mut idx, &[3])),
            &TensorRef::from_slice("rewards", &mut r, &[3]),
            &Grouping::Size(2),
            0.5,
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("group_size: expected a divisor"),
            "{err}"
        );
    }
}
