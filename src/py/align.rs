//! Python entry points of the alignment loss. Outputs are allocated by the caller (torch)
//! and filled here.

use pyo3::prelude::*;

use super::errors::run;
use super::tensor::{Borrowed, import, import_on, import_opt_on, view_opt, write_floats};
use crate::dispatch::align;
use crate::dispatch::{self, Backend};
use crate::error::Result;
use crate::op::align::{AlignBuffers, AlignConfig, AlignInputs};
use crate::op::anchor_plan::{self, AnchorPlan, Anchors};
use crate::op::groups::Grouping;
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

/// Forward of the alignment loss. Fills the outputs and returns `(number of groups, whether
/// the kernel backend ran)`; on the kernel backend with group labels the number is B, an
/// upper bound (counting the labels would need a read of device memory).
///
/// Outputs: `out_rows`/`out_groups` int64 `[B]` and `out_correct` bool `[B]` (the plan the
/// backward needs), `out_group_loss` `[B]` and `out_group_valid` bool `[B]` (first G
/// entries used), `out_loss` and `out_mean_cosine` (0-d, float32 or float64 for float64
/// hidden), `out_counts` int64 `[2]` = valid groups, anchored correct rollouts.
/// The kernel backend also fills `work` (float32 `[8, B]`) and `links` (int32 `[4 B + 1]`),
/// which its backward reads.
#[pyfunction]
#[pyo3(signature = (hidden, mask, rewards, group_ids, group_size, cu_seqlens, loss_type,
                    reduction, threshold, eps, tau, out_rows, out_groups, out_correct,
                    out_group_loss, out_group_valid, out_loss, out_mean_cosine, out_counts,
                    work=None, links=None, stream=None))]
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
    out_loss: &Bound<'_, PyAny>,
    out_mean_cosine: &Bound<'_, PyAny>,
    out_counts: &Bound<'_, PyAny>,
    work: Option<&Bound<'_, PyAny>>,
    links: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<(usize, bool)> {
    let hidden = import_on(hidden, "hidden", stream)?;
    let mask = import_on(mask, "mask", stream)?;
    let rewards = import_on(rewards, "rewards", stream)?;
    let group_ids = import_opt_on(group_ids, "group_ids", stream)?;
    let cu_seqlens = import_opt_on(cu_seqlens, "cu_seqlens", stream)?;
    let outs = [
        import_on(out_rows, "out_rows", stream)?,
        import_on(out_groups, "out_groups", stream)?,
        import_on(out_correct, "out_correct", stream)?,
        import_on(out_group_loss, "out_group_loss", stream)?,
        import_on(out_group_valid, "out_group_valid", stream)?,
        import_on(out_loss, "out_loss", stream)?,
        import_on(out_mean_cosine, "out_mean_cosine", stream)?,
        import_on(out_counts, "out_counts", stream)?,
    ];
    let work = import_opt_on(work, "work", stream)?;
    let links = import_opt_on(links, "links", stream)?;
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
        let rewards = rewards.view()?;
        let cu_seqlens = view_opt(&cu_seqlens)?;
        let anchor_tensor = match &anchors {
            Anchors::Mask(t) | Anchors::Index(t) => t,
        };
        let others = [
            Some(&rewards),
            Some(anchor_tensor),
            cu_seqlens.as_ref(),
            grouping.tensor(),
        ];
        if let Backend::Kernels(exec) = dispatch::select(&hidden, &others, stream)? {
            let v: Vec<TensorRef> = outs.iter().map(Borrowed::view).collect::<Result<_>>()?;
            let missing = |name| crate::error::Error::value(name, "a scratch tensor", "None");
            let work = view_opt(&work)?.ok_or_else(|| missing("work"))?;
            let links = view_opt(&links)?.ok_or_else(|| missing("links"))?;
            let bufs = AlignBuffers {
                rows: &v[0],
                groups: &v[1],
                correct: &v[2],
                group_loss: &v[3],
                group_valid: &v[4],
                loss: &v[5],
                mean_cosine: &v[6],
                counts: &v[7],
                work: &work,
                links: &links,
            };
            let inputs = AlignInputs {
                anchors: &anchors,
                rewards: &rewards,
                threshold,
                grouping: &grouping,
                cu_seqlens: cu_seqlens.as_ref(),
            };
            let groups = align::forward_kernels(&exec, &hidden, &inputs, &cfg, &bufs)?;
            return Ok((groups, true));
        }
        let plan = anchor_plan::plan(
            &hidden,
            &anchors,
            &rewards,
            &grouping,
            threshold,
            cu_seqlens.as_ref(),
        )?;
        let fwd = align::forward(&hidden, &plan, &cfg)?;
        let mut v: Vec<TensorRef> = outs.iter().map(Borrowed::view).collect::<Result<_>>()?;
        write_i64(&mut v[0], plan.rows.iter().copied())?;
        write_i64(&mut v[1], plan.group.iter().map(|&g| g as i64))?;
        write_bools(&mut v[2], &plan.correct)?;
        write_floats(&mut v[3], fwd.group_loss.iter().copied())?;
        write_bools(&mut v[4], &fwd.group_valid)?;
        write_floats(&mut v[5], [fwd.loss].into_iter())?;
        write_floats(&mut v[6], [fwd.mean_cosine].into_iter())?;
        let counts = [fwd.valid_groups as i64, fwd.anchored_correct as i64];
        write_i64(&mut v[7], counts.into_iter())?;
        Ok((plan.num_groups, false))
    })
}

/// The forward's buffers, which the kernel backend's backward reads: `(group_loss, group_valid,
/// loss, mean_cosine, counts, work, links)`.
type KernelState<'py> = (
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
);

/// Backward of the alignment loss: fills `out_grad_rows` `[B, H]` (float32, or float64 for
/// float64 hidden) with `dL/dh` at each rollout's anchor row. After a forward on the kernel
/// backend, `kernel_state` carries the forward's buffers and `centre` (float32 `[B, H]`) is
/// scratch.
#[pyfunction]
#[pyo3(signature = (hidden, rows, groups, correct, num_groups, grad_output, loss_type,
                    reduction, eps, tau, out_grad_rows, kernel_state=None, centre=None,
                    stream=None))]
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
    kernel_state: Option<KernelState<'_>>,
    centre: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let state = match &kernel_state {
        Some((group_loss, valid, loss, cosine, counts, work, links)) => Some([
            import_on(group_loss, "group_loss", stream)?,
            import_on(valid, "group_valid", stream)?,
            import_on(loss, "loss", stream)?,
            import_on(cosine, "mean_cosine", stream)?,
            import_on(counts, "counts", stream)?,
            import_on(work, "work", stream)?,
            import_on(links, "links", stream)?,
        ]),
        None => None,
    };
    let centre = import_opt_on(centre, "centre", stream)?;
    let hidden = import_on(hidden, "hidden", stream)?;
    let rows = import_on(rows, "rows", stream)?;
    let groups = import_on(groups, "groups", stream)?;
    let correct = import_on(correct, "correct", stream)?;
    let grad_output = import_on(grad_output, "grad_output", stream)?;
    let out = import_on(out_grad_rows, "out_grad_rows", stream)?;
    let (loss_type, reduction) = (loss_type.to_owned(), reduction.to_owned());
    run(py, "hidden_align.loss backward", move || {
        let cfg = AlignConfig::new(&loss_type, &reduction, eps, tau)?;
        if let Some(state) = &state {
            let hidden = hidden.view()?;
            let Backend::Kernels(exec) = dispatch::select(&hidden, &[], stream)? else {
                return Err(crate::error::Error::value(
                    "kernel_state",
                    "None after a forward on the CPU backend",
                    "a tuple",
                ));
            };
            let s: Vec<TensorRef> = state.iter().map(Borrowed::view).collect::<Result<_>>()?;
            let (rows, groups, correct) = (rows.view()?, groups.view()?, correct.view()?);
            let bufs = AlignBuffers {
                rows: &rows,
                groups: &groups,
                correct: &correct,
                group_loss: &s[0],
                group_valid: &s[1],
                loss: &s[2],
                mean_cosine: &s[3],
                counts: &s[4],
                work: &s[5],
                links: &s[6],
            };
            let centre = view_opt(&centre)?
                .ok_or_else(|| crate::error::Error::value("centre", "a scratch tensor", "None"))?;
            return align::backward_kernels(
                &exec,
                &hidden,
                &cfg,
                &bufs,
                num_groups,
                &grad_output.view()?,
                &centre,
                &out.view()?,
            );
        }
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

/// `dst[rows[j]] += vals[j]` in place (see `dispatch::rows::scatter_add`).
#[pyfunction]
#[pyo3(signature = (dst, rows, vals, links=None, stream=None))]
pub fn scatter_add_rows(
    py: Python<'_>,
    dst: &Bound<'_, PyAny>,
    rows: &Bound<'_, PyAny>,
    vals: &Bound<'_, PyAny>,
    links: Option<&Bound<'_, PyAny>>,
    stream: Option<usize>,
) -> PyResult<()> {
    let dst = import_on(dst, "dst", stream)?;
    let rows = import_on(rows, "rows", stream)?;
    let vals = import_on(vals, "vals", stream)?;
    let links = import_opt_on(links, "links", stream)?;
    run(py, "scatter_add_rows", move || {
        crate::dispatch::rows::scatter_add(
            &mut dst.view()?,
            &rows.view()?,
            &vals.view()?,
            view_opt(&links)?.as_ref(),
            stream,
        )
    })
}

/// The data pointer Rust sees for `tensor` after the DLPack import (for zero-copy checks).
#[pyfunction]
pub fn data_ptr(py: Python<'_>, tensor: &Bound<'_, PyAny>) -> PyResult<usize> {
    let t = import(tensor, "tensor")?;
    run(py, "data_ptr", move || Ok(t.view()?.data_ptr() as usize))
}
