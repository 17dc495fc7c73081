//! The one error type of the crate. The Python edge maps each variant to its own
//! exception class (see `python/hidden_align/errors.py`).

/// Every failure an op can report. Messages name the argument and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A tensor has the wrong rank or sizes.
    #[error("{arg}: expected shape {expected}, got {got}")]
    Shape {
        /// Argument name as the user spelled it.
        arg: &'static str,
        /// What the op needs.
        expected: String,
        /// What it received.
        got: String,
    },
    /// A tensor has an unsupported element type.
    #[error("{arg}: expected dtype {expected}, got {got}")]
    Dtype {
        /// Argument name as the user spelled it.
        arg: &'static str,
        /// What the op needs.
        expected: String,
        /// What it received.
        got: String,
    },
    /// A tensor lives on the wrong device, or tensors disagree on their device.
    #[error("{arg}: expected a tensor on {expected}, got one on {got}")]
    Device {
        /// Argument name as the user spelled it.
        arg: &'static str,
        /// What the op needs.
        expected: String,
        /// What it received.
        got: String,
    },
    /// An argument has a value the op cannot accept (an option, a count, an index).
    #[error("{arg}: expected {expected}, got {got}")]
    Value {
        /// Argument name as the user spelled it.
        arg: &'static str,
        /// What the op needs.
        expected: String,
        /// What it received.
        got: String,
    },
    /// The CUDA backend cannot run here.
    #[error("CUDA backend unavailable: {reason}")]
    CudaUnavailable {
        /// Why, in words.
        reason: String,
    },
    /// A kernel failed in a way the arguments cannot explain (a bug: please report it).
    #[error("internal error in {op}: {message}")]
    Kernel {
        /// The op that failed.
        op: &'static str,
        /// What happened.
        message: String,
    },
}

/// Result type of every op.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Shorthand for [`Error::Value`].
    pub fn value(arg: &'static str, expected: impl Into<String>, got: impl ToString) -> Self {
        Error::Value {
            arg,
            expected: expected.into(),
            got: got.to_string(),
        }
    }

    /// Shorthand for [`Error::Shape`].
    pub fn shape(arg: &'static str, expected: impl Into<String>, got: &[usize]) -> Self {
        Error::Shape {
            arg,
            expected: expected.into(),
            got: format!("{got:?}"),
        }
    }
}
