//! The CPU backend (ndarray + rayon): the executable specification of every op.

pub mod align;
pub mod float;
pub mod rows;
