//! Python entry points of backend selection and CUDA diagnostics.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::to_pyerr;
use crate::cpu::simd;
use crate::cuda::{self, Family};
use crate::dispatch::Choice;

/// Sets the process-wide backend: "auto", "cpu", "cuda" or "cuda-emulated".
#[pyfunction]
pub fn set_backend(py: Python<'_>, name: &str) -> PyResult<()> {
    Choice::set(name).map_err(|e| to_pyerr(py, e))
}

/// Runs up to `n` blocks of each emulated launch at once (1: one after another), as
/// `HIDDEN_ALIGN_EMULATED_BLOCKS=n` does; the emulation build only.
#[pyfunction]
pub fn set_emulated_blocks(py: Python<'_>, n: usize) -> PyResult<()> {
    cuda::set_emulated_blocks(n).map_err(|e| to_pyerr(py, e))
}

/// Runs the CPU kernels at the named instruction-set level (`None`: the best this CPU has), as
/// `HIDDEN_ALIGN_SIMD` does; returns the level now in use.
#[pyfunction]
#[pyo3(signature = (level=None))]
pub fn set_simd_level(py: Python<'_>, level: Option<&str>) -> PyResult<&'static str> {
    simd::force(level)
        .map(simd::Level::name)
        .map_err(|e| to_pyerr(py, e))
}

/// `(in use, best this CPU has, every level it has)` of the CPU kernels' instruction set.
#[pyfunction]
pub fn simd_levels() -> (&'static str, &'static str, Vec<&'static str>) {
    (
        simd::current().name(),
        simd::detected().name(),
        simd::available()
            .into_iter()
            .map(simd::Level::name)
            .collect(),
    )
}

/// The process-wide backend's name.
#[pyfunction]
pub fn get_backend() -> &'static str {
    Choice::current_name()
}

/// What the CUDA backend found: libraries, versions, devices, or why it cannot run.
#[pyfunction]
pub fn cuda_status(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let s = py.detach(|| std::panic::catch_unwind(cuda::driver::status));
    let s = s.unwrap_or_else(|_| cuda::driver::Status {
        reason: Some("probing the CUDA libraries panicked".into()),
        ..Default::default()
    });
    let d = PyDict::new(py);
    d.set_item("driver_found", s.driver_found)?;
    d.set_item("nvrtc_found", s.nvrtc_found)?;
    d.set_item("driver_version", s.driver_version)?;
    d.set_item("nvrtc_version", s.nvrtc_version)?;
    d.set_item("devices", s.devices)?;
    d.set_item(
        "available",
        s.reason.is_none() && s.devices.unwrap_or(0) > 0,
    )?;
    d.set_item(
        "reason",
        s.reason
            .or_else(|| (s.devices == Some(0)).then(|| "no CUDA device".to_string())),
    )?;
    d.set_item("kernel_target", s.kernel_target)?;
    d.set_item("kernel_target_reason", s.kernel_target_reason)?;
    d.set_item("emulation_built", cuda::emulation_built())?;
    d.set_item("emulated_blocks", cuda::emulated_blocks())?;
    Ok(d)
}

/// `(file, program)` for every kernel family: the exact text NVRTC compiles.
#[pyfunction]
pub fn kernel_programs() -> Vec<(&'static str, String)> {
    Family::ALL
        .iter()
        .map(|f| (f.file(), f.program()))
        .collect()
}

/// Compiles every kernel family with NVRTC for `sm_<arch>` (CUBIN) or, with `ptx`,
/// `compute_<arch>` (PTX the driver finishes), through the runtime's own path and its on-disk
/// cache, without a GPU; returns `(file, image size in bytes)`.
#[pyfunction]
#[pyo3(signature = (arch, ptx=false))]
pub fn compile_kernels(
    py: Python<'_>,
    arch: u32,
    ptx: bool,
) -> PyResult<Vec<(&'static str, usize)>> {
    let target = if ptx {
        cuda::target::Target::Ptx(arch)
    } else {
        cuda::target::Target::Cubin(arch)
    };
    super::errors::run(py, "compile_kernels", move || {
        Family::ALL
            .iter()
            .map(|&f| Ok((f.file(), cuda::compile::compile_image(f, target)?.len())))
            .collect()
    })
}

/// Compiles (or takes from the disk cache) and loads every kernel family on CUDA device
/// `ordinal`, ahead of CUDA graph capture.
#[pyfunction]
pub fn prepare_cuda(py: Python<'_>, ordinal: i32) -> PyResult<()> {
    super::errors::run(py, "prepare_cuda", move || cuda::driver::prepare(ordinal))
}
