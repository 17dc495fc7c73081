//! The Python edge: the only code that names pyo3. DLPack import, argument plumbing and
//! error mapping; all work happens in `dispatch` and the backends.

pub mod align;
pub mod anchors;
pub mod backend;
pub mod dapo;
pub mod errors;
pub mod logprobs;
pub mod tensor;
