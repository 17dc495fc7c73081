//! Backend-free op definitions: options, results, argument checks and the plan a backend
//! executes. The backends (`cpu`, `cuda`) import this module; dispatch (`dispatch`) picks one.

pub mod align;
pub mod anchor_plan;
pub mod anchors;
pub mod dapo;
pub mod groups;
pub mod logprobs;

use crate::error::{Error, Result};
use crate::tensor::{Device, TensorRef};

/// Fails unless every tensor in `others` is on the device of `first` and that device is the
/// CPU: the check of the CPU backend's entry points (`dispatch::select` routes CUDA tensors to
/// the kernels before they get here).
pub(crate) fn same_cpu_device(first: &TensorRef, others: &[Option<&TensorRef>]) -> Result<()> {
    for t in others.iter().flatten() {
        if t.device() != first.device() {
            return Err(Error::Device {
                arg: t.name(),
                expected: format!("{} (the device of {})", first.device(), first.name()),
                got: t.device().to_string(),
            });
        }
    }
    if first.device() == Device::Cpu {
        return Ok(());
    }
    Err(Error::CudaUnavailable {
        reason: format!(
            "{} is on {}, but the CPU backend runs on CPU tensors only",
            first.name(),
            first.device()
        ),
    })
}
