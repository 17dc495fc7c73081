//! Python entry points of the alignment loss. Outputs are allocated by the caller (torch)
//! and filled here.

use pyo3::prelude::*;

use super::errors::run;
use super::tensor::{Borrowed, import, import_opt, view_opt, write_floats};
use crate::error::Result;
use crate::ops::align::{self, AlignConfig};
use crate::ops::anchors::{self, AnchorPlan, Anchors};
use crate::ops::groups::Grouping;
use crate::tensor::{DType, TensorRef};

fn write_bools(out: &mut TensorRef, vals: &[bool]) -> Result<()> {
    // SAFETY: a fresh output allocated for this call.
    let dst = unsafe { out.as_mut_slice::<bool>()? };
    dst.iter_mut().zip(vals).for_each(|(o, &v)| *o = v);
    Ok(())
}

fn write_i64(out: &mut TensorRef, vals: impl Iterator<Item = i64>) -> Result<()> {
    // SAFETY: a fresh output allocated for this call.
    let dst = unsafe { out.as_mut_slice::<i64>()? };
    dst.iter_mut().zip(vals).for_each(|(o, v)| *o = v);
    Ok(())
}

/// Forward of the alignment loss. Fills the outputs and returns the number of groups.
///
/// Outputs: `out_rows`/`out_groups` int64 `[B]` and `out_correct` bool `[B]` (the plan the
/// backward needs), `out_group_loss` `[B]` and `out_group_valid` bool `[B]` (first G
/// entries used), `out_scalars` `[4]` = loss, mean cosine, valid groups, anchored correct.
#[pyfunction]
#[pyo3(signature = (hidden, mask, rewards, group_ids, group_size, cu_seqlens, loss_type,
                    reduction, threshold, eps, tau, out_rows, out_groups, out_correct,
                    out_group_loss, out_group_valid, out_scalars))]
#[allow(clippy::too_many_arguments)]
pub fn align_forward(
    py: Python<'_>,
    hidden: &Bound<'_, PyAny>,
    mask: &Bound<'_, PyAny>,
    rewards: &Bound<'_, PyAny>,
    group_ids: Option<&Bound<'_, PyAny>>,
    group_size: Option<i64>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    loss_type: &str,
    reduction: &str,
    threshold: f64,
    eps: f64,
    tau: f64,
    out_rows: &Bound<'_, PyAny>,
    out_groups: &Bound<'_, PyAny>,
    out_correct: &Bound<'_, PyAny>,
    out_group_loss: &Bound<'_, PyAny>,
    out_group_valid: &Bound<'_, PyAny>,
    out_scalars: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let hidden = import(hidden, "hidden")?;
    let mask = import(mask, "mask")?;
    let rewards = import(rewards, "rewards")?;
    let group_ids = import_opt(group_ids, "group_ids")?;
    let cu_seqlens = import_opt(cu_seqlens, "cu_seqlens")?;
    let outs = [
        import(out_rows, "out_rows")?,
        import(out_groups, "out_groups")?,
        import(out_correct, "out_correct")?,
        import(out_group_loss, "out_group_loss")?,
        import(out_group_valid, "out_group_valid")?,
        import(out_scalars, "out_scalars")?,
    ];
    let (loss_type, reduction) = (loss_type.to_owned(), reduction.to_owned());
    run(py, "hidden_align.loss", move || {
        let cfg = AlignConfig::new(&loss_type, &reduction, eps, tau)?;
        let hidden = hidden.view()?;
        let mask = mask.view()?;
        let anchors = match mask.dtype() {
            DType::Bool | DType::U8 => Anchors::Mask(mask),
            _ => Anchors::Index(mask),
        };
        let grouping = Grouping::from_args(view_opt(&group_ids)?, group_size)?;
        let plan = anchors::plan(
            &hidden,
            &anchors,
            &rewards.view()?,
            &grouping,
            threshold,
            view_opt(&cu_seqlens)?.as_ref(),
        )?;
        let fwd = align::forward(&hidden, &plan, &cfg)?;
        let mut v: Vec<TensorRef> = outs.iter().map(Borrowed::view).collect::<Result<_>>()?;
        write_i64(&mut v[0], plan.rows.iter().copied())?;
        write_i64(&mut v[1], plan.group.iter().map(|&g| g as i64))?;
        write_bools(&mut v[2], &plan.correct)?;
        write_floats(&mut v[3], fwd.group_loss.iter().copied())?;
        write_bools(&mut v[4], &fwd.group_valid)?;
        let scalars = [
            fwd.loss,
            fwd.mean_cosine,
            fwd.valid_groups as f64,
            fwd.anchored_correct as f64,
        ];
        write_floats(&mut v[5], scalars.into_iter())?;
        Ok(plan.num_groups)
    })
}

/// Backward of the alignment loss: fills `out_grad_rows` `[B, H]` (float32, or float64 for
/// float64 hidden) with `dL/dh` at each rollout's anchor row.
#[pyfunction]
#[pyo3(signature = (hidden, rows, groups, correct, num_groups, grad_output, loss_type,
                    reduction, eps, tau, out_grad_rows))]
#[allow(clippy::too_many_arguments)]
pub fn align_backward(
    py: Python<'_>,
    hidden: &Bound<'_, PyAny>,
    rows: &Bound<'_, PyAny>,
    groups: &Bound<'_, PyAny>,
    correct: &Bound<'_, PyAny>,
    num_groups: usize,
    grad_output: &Bound<'_, PyAny>,
    loss_type: &str,
    reduction: &str,
    eps: f64,
    tau: f64,
    out_grad_rows: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let hidden = import(hidden, "hidden")?;
    let rows = import(rows, "rows")?;
    let groups = import(groups, "groups")?;
    let correct = import(correct, "correct")?;
    let grad_output = import(grad_output, "grad_output")?;
    let out = import(out_grad_rows, "out_grad_rows")?;
    let (loss_type, reduction) = (loss_type.to_owned(), reduction.to_owned());
    run(py, "hidden_align.loss backward", move || {
        let cfg = AlignConfig::new(&loss_type, &reduction, eps, tau)?;
        let plan = AnchorPlan {
            rows: rows.view()?.to_i64_vec()?,
            group: groups
                .view()?
                .to_i64_vec()?
                .into_iter()
                .map(|g| g as usize)
                .collect(),
            correct: correct
                .view()?
                .to_f64_vec()?
                .into_iter()
                .map(|c| c != 0.0)
                .collect(),
            num_groups,
        };
        let grad = grad_output.view()?;
        let upstream = if grad.ndim() == 0 {
            let mut one = grad.clone();
            one = reshape_scalar(one);
            one.to_f64_vec()?
        } else {
            grad.to_f64_vec()?
        };
        align::backward(&hidden.view()?, &plan, &cfg, &upstream, &mut out.view()?)
    })
}

/// A 0-d tensor seen as `[1]`.
fn reshape_scalar(t: TensorRef<'_>) -> TensorRef<'_> {
    // SAFETY: same pointer, one element, which the 0-d tensor owns.
    unsafe {
        TensorRef::from_raw_parts(
            t.name(),
            t.data_ptr(),
            t.dtype(),
            t.device(),
            vec![1],
            vec![1],
        )
    }
}

/// `dst[rows[j]] += vals[j]` in place (see `ops::rows::scatter_add`).
#[pyfunction]
pub fn scatter_add_rows(
    py: Python<'_>,
    dst: &Bound<'_, PyAny>,
    rows: &Bound<'_, PyAny>,
    vals: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let dst = import(dst, "dst")?;
    let rows = import(rows, "rows")?;
    let vals = import(vals, "vals")?;
    run(py, "scatter_add_rows", move || {
        crate::ops::rows::scatter_add(&mut dst.view()?, &rows.view()?, &vals.view()?)
    })
}

/// The data pointer Rust sees for `tensor` after the DLPack import (for zero-copy checks).
#[pyfunction]
pub fn data_ptr(py: Python<'_>, tensor: &Bound<'_, PyAny>) -> PyResult<usize> {
    let t = import(tensor, "tensor")?;
    run(py, "data_ptr", move || Ok(t.view()?.data_ptr() as usize))
}
