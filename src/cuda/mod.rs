//! The kernel backend: the CUDA C++ kernels of `kernels/`, launched on a GPU through cudarc
//! (NVRTC compile, module cache, launch on PyTorch's stream), or run on the CPU by the
//! emulation build (feature `emulation`) from the very same launch code.
//!
//! Each op family has one file here that turns validated tensors into the kernel's parameter
//! block (a `#[repr(C)]` mirror of the C++ struct, passed as the kernel's only argument) and
//! its grid; [`Executor::launch`] sends it to the device or to the emulator.

pub mod align;
pub mod anchors;
pub mod compile;
pub mod dapo;
mod disk_cache;
pub mod driver;
#[cfg(feature = "emulation")]
mod emulated;
pub mod kernel_names;
pub mod logprobs;
pub mod rows;
pub mod target;

use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};

/// NVRTC options besides the architecture. No fused multiply-add contraction: every product
/// and sum rounds on its own, as in PyTorch's eager ops and the CPU backend.
pub const NVRTC_OPTIONS: &[&str] = &["--fmad=false"];

/// Threads per block of every kernel (`HA_BLOCK` in `kernels/common.cuh`).
pub const BLOCK: u32 = 256;

/// The source files, one per op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// `kernels/rows.cu`.
    Rows,
    /// `kernels/dapo.cu`.
    Dapo,
    /// `kernels/anchor_align.cu`.
    AnchorAlign,
    /// `kernels/anchors.cu`.
    Anchors,
    /// `kernels/logprobs.cu`.
    Logprobs,
}

const COMMON: &str = include_str!("../../kernels/common.cuh");

impl Family {
    /// Every family.
    pub const ALL: [Family; 5] = [
        Family::Rows,
        Family::Dapo,
        Family::AnchorAlign,
        Family::Anchors,
        Family::Logprobs,
    ];

    /// File name under `kernels/`.
    pub fn file(self) -> &'static str {
        match self {
            Family::Rows => "rows.cu",
            Family::Dapo => "dapo.cu",
            Family::AnchorAlign => "anchor_align.cu",
            Family::Anchors => "anchors.cu",
            Family::Logprobs => "logprobs.cu",
        }
    }

    /// The program NVRTC compiles: the family's source with `common.cuh` inlined, so the
    /// compiler needs no include path.
    pub fn program(self) -> String {
        let source = match self {
            Family::Rows => include_str!("../../kernels/rows.cu"),
            Family::Dapo => include_str!("../../kernels/dapo.cu"),
            Family::AnchorAlign => include_str!("../../kernels/anchor_align.cu"),
            Family::Anchors => include_str!("../../kernels/anchors.cu"),
            Family::Logprobs => include_str!("../../kernels/logprobs.cu"),
        };
        source.replace("#include \"common.cuh\"", COMMON)
    }
}

/// Where kernels run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Executor {
    /// A CUDA device, on the raw stream handle PyTorch gave (`torch.cuda.current_stream()`).
    Device {
        /// Device ordinal.
        ordinal: i32,
        /// `CUstream` as an integer (0: the legacy default stream).
        stream: usize,
    },
    /// The emulation build on CPU tensors.
    Emulated,
}

/// Grid and block of one launch; blocks always have [`BLOCK`] threads and kernels use only
/// static shared memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Blocks along x, y, z.
    pub blocks: [u32; 3],
}

impl Grid {
    /// A one-dimensional grid of `n` blocks.
    pub fn blocks(n: usize) -> Result<Self> {
        Self::blocks_2d(n, 1)
    }

    /// `x` by `y` blocks.
    pub fn blocks_2d(x: usize, y: usize) -> Result<Self> {
        let limit = |n: usize, max: usize, what: &str| {
            if n <= max {
                Ok(n as u32)
            } else {
                Err(Error::value(
                    "input",
                    format!("at most {max} {what} for the CUDA kernels"),
                    n,
                ))
            }
        };
        Ok(Grid {
            blocks: [
                limit(x, (1 << 31) - 1, "blocks")?,
                limit(y, 65535, "column blocks")?,
                1,
            ],
        })
    }

    /// Enough blocks of [`BLOCK`] threads for one thread per item.
    pub fn threads(items: usize) -> Result<Self> {
        Self::blocks(items.div_ceil(BLOCK as usize).max(1))
    }
}

impl Executor {
    /// Launches `kernel` of `family` with `params` (the kernel's only argument) on `grid`.
    /// An empty grid launches nothing.
    pub fn launch<P: Copy>(
        &self,
        family: Family,
        kernel: &str,
        grid: Grid,
        params: &P,
    ) -> Result<()> {
        if grid.blocks.contains(&0) {
            return Ok(());
        }
        let params = params as *const P as *const std::ffi::c_void;
        match *self {
            Executor::Device { ordinal, stream } => {
                driver::launch(ordinal, stream, family, kernel, grid, params)
            }
            #[cfg(feature = "emulation")]
            Executor::Emulated => emulated::launch(kernel, grid, params),
            #[cfg(not(feature = "emulation"))]
            Executor::Emulated => Err(no_emulation()),
        }
    }
}

pub(crate) fn no_emulation() -> Error {
    Error::CudaUnavailable {
        reason: "this build has no emulated CUDA backend (build with the cargo feature \
                 `emulation`, as scripts/test.sh does)"
            .into(),
    }
}

/// Whether this build contains the emulated backend.
pub fn emulation_built() -> bool {
    cfg!(feature = "emulation")
}

/// How many blocks of one launch the emulated backend runs at once (1: one after another);
/// `None` without the emulation build.
pub fn emulated_blocks() -> Option<usize> {
    #[cfg(feature = "emulation")]
    return Some(emulated::concurrent_blocks());
    #[cfg(not(feature = "emulation"))]
    None
}

/// Sets how many blocks of one launch the emulated backend runs at once.
pub fn set_emulated_blocks(n: usize) -> Result<()> {
    #[cfg(feature = "emulation")]
    return emulated::set_concurrent_blocks(n);
    #[cfg(not(feature = "emulation"))]
    {
        let _ = n;
        Err(no_emulation())
    }
}

/// Storage types the kernels take for the main float inputs (float64 is CPU-only).
pub fn expect_kernel_float(t: &TensorRef) -> Result<()> {
    if matches!(t.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return Ok(());
    }
    Err(Error::Dtype {
        arg: t.name(),
        expected: "float32, bfloat16 or float16 (float64 runs on the CPU backend only)".into(),
        got: t.dtype().to_string(),
    })
}

/// Kernel name suffix of a storage type (`HA_KERNEL_FLOATS`).
pub fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// dtype code of side inputs (`enum Code` in `kernels/common.cuh`).
pub fn code_of(dtype: DType) -> i64 {
    match dtype {
        DType::Bool => 0,
        DType::U8 => 9,
        DType::I32 => 1,
        DType::I64 => 2,
        DType::F32 => 3,
        DType::BF16 => 4,
        DType::F16 => 5,
        DType::F64 => 6,
    }
}

/// A side input (`struct Side` in `kernels/common.cuh`): pointer, dtype code, element stride
/// of its first dimension.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Side {
    /// Data pointer (0: absent).
    pub ptr: u64,
    /// [`code_of`] its dtype.
    pub code: i64,
    /// Element stride of dimension 0 (0 for 0-d tensors).
    pub stride: i64,
}

impl Side {
    /// An absent side input.
    pub const NONE: Side = Side {
        ptr: 0,
        code: 0,
        stride: 0,
    };

    /// Describes `t`.
    pub fn of(t: &TensorRef) -> Side {
        Side {
            ptr: ptr(t),
            code: code_of(t.dtype()),
            stride: t.strides().first().copied().unwrap_or(0) as i64,
        }
    }

    /// [`Side::of`] for optional tensors.
    pub fn of_opt(t: Option<&TensorRef>) -> Side {
        t.map_or(Side::NONE, Side::of)
    }
}

/// The data pointer of `t` as the kernels take it.
pub fn ptr(t: &TensorRef) -> u64 {
    t.data_ptr() as u64
}

/// Element stride of dimension `d`, or 0 when `t` has fewer dimensions.
pub fn stride(t: &TensorRef, d: usize) -> i64 {
    t.strides().get(d).copied().unwrap_or(0) as i64
}

/// Fails unless `t` is contiguous with `shape` and `dtype` (outputs and scratch from Python).
pub fn expect_buffer(t: &TensorRef, shape: &[usize], dtype: DType) -> Result<()> {
    t.expect_buffer(shape, dtype)
}

/// The scratch tensor the kernel backend needs as `name`, checked as [`expect_buffer`].
pub fn expect_scratch<'r, 'a>(
    t: Option<&'r TensorRef<'a>>,
    name: &'static str,
    shape: &[usize],
    dtype: DType,
) -> Result<&'r TensorRef<'a>> {
    let t =
        t.ok_or_else(|| Error::value(name, "a scratch tensor for the kernel backend", "None"))?;
    expect_buffer(t, shape, dtype)?;
    Ok(t)
}

#[cfg(all(test, feature = "emulation"))]
mod tests;
