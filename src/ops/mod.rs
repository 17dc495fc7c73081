//! Backend-free op definitions: validate arguments, then dispatch to a backend.

pub mod align;
pub mod anchors;
pub mod dapo;
pub mod groups;
pub mod rows;

use crate::error::{Error, Result};
use crate::tensor::{Device, TensorRef};

/// Fails unless every tensor in `others` is on the device of `first` and that device is the
/// CPU: the check of the CPU backend's entry points (`cuda::select` routes CUDA tensors to the
/// kernels before they get here).
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

/// The tensor of a grouping, if it has one.
pub(crate) fn grouping_tensor<'a>(g: &'a groups::Grouping<'a>) -> Option<&'a TensorRef<'a>> {
    match g {
        groups::Grouping::Ids(t) => Some(t),
        groups::Grouping::Size(_) => None,
    }
}
