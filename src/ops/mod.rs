//! Backend-free op definitions: validate arguments, then dispatch to a backend.

pub mod align;
pub mod dapo;
pub mod groups;
pub mod rows;
