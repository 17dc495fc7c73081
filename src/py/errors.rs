//! Mapping of [`Error`] to the Python exception classes of `hidden_align.errors`, and the
//! guard that keeps panics from reaching Python.

use std::panic::{AssertUnwindSafe, catch_unwind};

use pyo3::prelude::*;
use pyo3::types::PyType;

use crate::error::Error;

/// The Python class for each variant (one arm per variant).
fn class_name(e: &Error) -> &'static str {
    match e {
        Error::Shape { .. } => "ShapeError",
        Error::Dtype { .. } => "DtypeError",
        Error::Device { .. } => "DeviceError",
        Error::Value { .. } => "ArgumentError",
        Error::CudaUnavailable { .. } => "CudaUnavailableError",
        Error::Kernel { .. } => "KernelError",
    }
}

/// Converts an op error into an instance of its `hidden_align.errors` class.
pub fn to_pyerr(py: Python<'_>, e: Error) -> PyErr {
    let class = py
        .import("hidden_align.errors")
        .and_then(|m| m.getattr(class_name(&e)))
        .and_then(|c| Ok(c.cast_into::<PyType>()?));
    match class {
        Ok(class) => PyErr::from_type(class, e.to_string()),
        Err(lookup) => lookup,
    }
}

/// Runs `work` without the GIL, turning errors and panics into Python exceptions.
pub fn run<T: Send>(
    py: Python<'_>,
    op: &'static str,
    work: impl FnOnce() -> crate::error::Result<T> + Send,
) -> PyResult<T> {
    let outcome = py.detach(|| catch_unwind(AssertUnwindSafe(work)));
    match outcome {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(to_pyerr(py, e)),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Err(to_pyerr(py, Error::Kernel { op, message }))
        }
    }
}
