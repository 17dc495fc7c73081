//! Element and accumulator types of the CPU kernels: half-precision and float32 inputs
//! accumulate in f32, float64 inputs in f64 (so gradcheck sees float64 all the way).

use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

use num_traits::Float;

use crate::tensor::HasDType;

/// An accumulator type: f32 or f64.
pub trait Acc: Float + Sum + AddAssign + SubAssign + MulAssign + Default + Send + Sync {
    /// Conversion from an f64 argument (eps, tau, a gradient scale).
    fn of(x: f64) -> Self;
    /// Conversion to f64 for results handed back to Python.
    fn f64(self) -> f64;
}

impl Acc for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Acc for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn f64(self) -> f64 {
        self
    }
}

/// A floating-point storage type and the accumulator it is computed in.
pub trait Elem: HasDType {
    /// The accumulator.
    type Acc: Acc;
    /// Widens a stored value.
    fn load(self) -> Self::Acc;
    /// Rounds an accumulator back to storage (round to nearest even).
    fn store(a: Self::Acc) -> Self;
}

impl Elem for f32 {
    type Acc = f32;
    fn load(self) -> f32 {
        self
    }
    fn store(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type Acc = f64;
    fn load(self) -> f64 {
        self
    }
    fn store(a: f64) -> Self {
        a
    }
}

impl Elem for half::bf16 {
    type Acc = f32;
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> Self {
        half::bf16::from_f32(a)
    }
}

impl Elem for half::f16 {
    type Acc = f32;
    fn load(self) -> f32 {
        self.to_f32()
    }
    fn store(a: f32) -> Self {
        half::f16::from_f32(a)
    }
}

/// Runs `$body` with `$t` bound to the Rust type of a floating-point [`crate::tensor::DType`].
/// Non-float dtypes must be rejected before this point.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_float {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::tensor::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::tensor::DType::F64 => {
                type $t = f64;
                $body
            }
            $crate::tensor::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            $crate::tensor::DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => {
                return Err($crate::error::Error::Kernel {
                    op: "dispatch",
                    message: format!("non-float dtype {other} reached a float kernel"),
                })
            }
        }
    };
}
