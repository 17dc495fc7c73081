//! `hidden_align`: the Hidden-Align auxiliary loss and DAPO's token-level math for PyTorch
//! RL training.
//!
//! `op` defines the ops (options, checks, plans), `cpu` holds the CPU kernels, `cuda` launches
//! the CUDA kernels of `kernels/` (on a GPU, or emulated on the CPU), `dispatch` picks the
//! backend of a call and runs it there, `py` (feature `python`) is the only code that knows
//! about Python. The backends import `op` and never `dispatch`.
#![deny(missing_docs)]

pub mod cpu;
pub mod cuda;
pub mod dispatch;
pub mod error;
pub mod op;
pub mod tensor;

#[cfg(feature = "python")]
mod py;

#[cfg(feature = "python")]
#[pyo3::pymodule]
mod _native {
    #[pymodule_export]
    use crate::py::align::{align_backward, align_forward, data_ptr, scatter_add_rows};
    #[pymodule_export]
    use crate::py::anchors::{find_anchors, find_text_anchors, text_marker_starts, uid_group_ids};
    #[pymodule_export]
    use crate::py::backend::{
        compile_kernels, cuda_status, get_backend, kernel_programs, prepare_cuda, set_backend,
        set_emulated_blocks, set_simd_level, simd_levels,
    };
    #[pymodule_export]
    use crate::py::dapo::{
        dynamic_sampling_mask, group_advantages, overlong_penalty, policy_loss_backward,
        policy_loss_forward,
    };
    #[pymodule_export]
    use crate::py::logprobs::{accumulate_f32, token_logprobs_backward, token_logprobs_forward};

    #[pymodule_init]
    fn init(m: &pyo3::Bound<'_, pyo3::types::PyModule>) -> pyo3::PyResult<()> {
        use pyo3::types::PyModuleMethods;
        m.add("__version__", env!("CARGO_PKG_VERSION"))?;
        m.add("POLICY_CHUNK", crate::cuda::dapo::POLICY_CHUNK)?;
        m.add("ALIGN_WORK_ROWS", crate::cuda::align::WORK_ROWS)?;
        m.add("ALIGN_LINK_ROWS", crate::cuda::align::LINK_ROWS)?;
        m.add("NVRTC_OPTIONS", crate::cuda::NVRTC_OPTIONS.to_vec())
    }
}
