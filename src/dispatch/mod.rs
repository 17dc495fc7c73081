//! Dispatch: picks the backend of a call (the process-wide choice and the tensors' device) and
//! runs the op there.

pub mod align;
pub mod anchors;
pub mod dapo;
pub mod logprobs;
pub mod rows;

use std::sync::atomic::{AtomicU8, Ordering};

use crate::cuda::{Executor, emulation_built, no_emulation};
use crate::error::{Error, Result};
use crate::tensor::{Device, TensorRef};

/// Which backend runs the ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// By the tensors' device: CUDA tensors on the GPU, CPU tensors on the CPU backend.
    Auto,
    /// The CPU backend (CPU tensors only).
    Cpu,
    /// The CUDA kernels (CUDA tensors only).
    Cuda,
    /// The CUDA kernels run by the emulator (CPU tensors only).
    CudaEmulated,
}

static CHOICE: AtomicU8 = AtomicU8::new(0);

impl Choice {
    const NAMES: [(&'static str, Choice); 4] = [
        ("auto", Choice::Auto),
        ("cpu", Choice::Cpu),
        ("cuda", Choice::Cuda),
        ("cuda-emulated", Choice::CudaEmulated),
    ];

    /// The process-wide choice.
    pub fn current() -> Choice {
        Self::NAMES[CHOICE.load(Ordering::Relaxed) as usize].1
    }

    /// Sets the process-wide choice by name.
    pub fn set(name: &str) -> Result<()> {
        let i = Self::NAMES
            .iter()
            .position(|(n, _)| *n == name)
            .ok_or_else(|| {
                Error::value(
                    "backend",
                    "one of 'auto', 'cpu', 'cuda', 'cuda-emulated'",
                    format!("{name:?}"),
                )
            })?;
        if Self::NAMES[i].1 == Choice::CudaEmulated && !emulation_built() {
            return Err(no_emulation());
        }
        CHOICE.store(i as u8, Ordering::Relaxed);
        Ok(())
    }

    /// The name of the process-wide choice.
    pub fn current_name() -> &'static str {
        Self::NAMES[CHOICE.load(Ordering::Relaxed) as usize].0
    }
}

/// The backend of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// `src/cpu/`.
    Cpu,
    /// The kernels of `kernels/`.
    Kernels(Executor),
}

/// Picks the backend for tensors on the device of `first` (every tensor in `others` must be
/// on the same device). `stream` is PyTorch's current stream of that device, when CUDA.
pub fn select(
    first: &TensorRef,
    others: &[Option<&TensorRef>],
    stream: Option<usize>,
) -> Result<Backend> {
    for t in others.iter().flatten() {
        if t.device() != first.device() {
            return Err(Error::Device {
                arg: t.name(),
                expected: format!("{} (the device of {})", first.device(), first.name()),
                got: t.device().to_string(),
            });
        }
    }
    let wrong = |expected: &str| Error::Device {
        arg: first.name(),
        expected: format!(
            "{expected} (backend {:?} is selected)",
            Choice::current_name()
        ),
        got: first.device().to_string(),
    };
    match (Choice::current(), first.device()) {
        (Choice::Auto | Choice::Cpu, Device::Cpu) => Ok(Backend::Cpu),
        (Choice::CudaEmulated, Device::Cpu) => Ok(Backend::Kernels(Executor::Emulated)),
        (Choice::Auto | Choice::Cuda, Device::Cuda(ordinal)) => {
            let stream = stream.ok_or_else(|| Error::Kernel {
                op: "backend selection",
                message: "no CUDA stream was passed with CUDA tensors".into(),
            })?;
            Ok(Backend::Kernels(Executor::Device { ordinal, stream }))
        }
        (Choice::Cuda, Device::Cpu) => Err(wrong("a CUDA device")),
        (Choice::Cpu | Choice::CudaEmulated, Device::Cuda(_)) => Err(wrong("the CPU")),
    }
}
