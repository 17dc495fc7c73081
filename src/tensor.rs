//! Backend-free descriptions of borrowed tensors.
//!
//! The Python edge builds a [`TensorRef`] from a DLPack capsule; ops validate it and hand
//! typed strided views to a backend. Memory always belongs to the caller (PyTorch): nothing
//! here allocates or frees tensor storage.

use std::fmt;
use std::marker::PhantomData;

use crate::error::{Error, Result};

/// Element types the ops understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    /// `torch.bool`, one byte per element.
    Bool,
    /// `torch.uint8`.
    U8,
    /// `torch.int32`.
    I32,
    /// `torch.int64`.
    I64,
    /// `torch.float16`.
    F16,
    /// `torch.bfloat16`.
    BF16,
    /// `torch.float32`.
    F32,
    /// `torch.float64`.
    F64,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::F32 => 4,
            DType::I64 | DType::F64 => 8,
        }
    }

    /// True for the floating-point types.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
        };
        f.write_str(name)
    }
}

/// Where a tensor lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// Host memory.
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(i32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A borrowed strided tensor: data pointer (byte offset applied), dtype, device, sizes and
/// strides in elements.
///
/// Invariant (established by whoever builds it, see [`TensorRef::from_raw_parts`]): every
/// element addressed by `shape` and `strides` lies inside one live allocation for `'a`.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    name: &'static str,
    ptr: *mut u8,
    dtype: DType,
    device: Device,
    shape: Vec<usize>,
    strides: Vec<isize>,
    _borrow: PhantomData<&'a mut u8>,
}

// SAFETY: a TensorRef is a borrowed view with no interior state; ops that write through it
// take care that concurrent writers touch disjoint elements.
unsafe impl Send for TensorRef<'_> {}
// SAFETY: as above; shared access is read-only unless an op documents otherwise.
unsafe impl Sync for TensorRef<'_> {}

impl<'a> TensorRef<'a> {
    /// Builds a view from raw parts.
    ///
    /// # Safety
    /// `ptr` must address elements of `dtype` such that every index in `shape` combined with
    /// `strides` lands inside one allocation that stays alive and is not freed for `'a`.
    pub unsafe fn from_raw_parts(
        name: &'static str,
        ptr: *mut u8,
        dtype: DType,
        device: Device,
        shape: Vec<usize>,
        strides: Vec<isize>,
    ) -> Self {
        TensorRef {
            name,
            ptr,
            dtype,
            device,
            shape,
            strides,
            _borrow: PhantomData,
        }
    }

    /// Borrows a Rust slice as a contiguous CPU tensor (used by tests and benches).
    pub fn from_slice<T: HasDType>(name: &'static str, data: &'a mut [T], shape: &[usize]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "shape does not match data"
        );
        // SAFETY: the slice is live and mutably borrowed for 'a; contiguous strides address
        // exactly its elements.
        unsafe {
            Self::from_raw_parts(
                name,
                data.as_mut_ptr().cast(),
                T::DTYPE,
                Device::Cpu,
                shape.to_vec(),
                contiguous_strides(shape),
            )
        }
    }

    /// The argument name used in error messages.
    pub fn name(&self) -> &'static str {
        self.name
    }
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Device.
    pub fn device(&self) -> Device {
        self.device
    }
    /// Sizes.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Strides in elements.
    pub fn strides(&self) -> &[isize] {
        &self.strides
    }
    /// Number of dimensions.
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Data pointer with the byte offset applied.
    pub fn data_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Fails unless the dtype is one of `allowed`.
    pub fn expect_dtype(&self, allowed: &[DType]) -> Result<()> {
        if allowed.contains(&self.dtype) {
            return Ok(());
        }
        let names: Vec<String> = allowed.iter().map(|d| d.to_string()).collect();
        Err(Error::Dtype {
            arg: self.name,
            expected: names.join(" or "),
            got: self.dtype.to_string(),
        })
    }

    /// Fails unless the tensor has exactly `ndim` dimensions.
    pub fn expect_ndim(&self, ndim: usize, what: &str) -> Result<()> {
        if self.ndim() == ndim {
            Ok(())
        } else {
            Err(Error::shape(self.name, what, &self.shape))
        }
    }

    /// Fails unless the tensor lives on `device`.
    pub fn expect_device(&self, device: Device) -> Result<()> {
        if self.device == device {
            Ok(())
        } else {
            Err(Error::Device {
                arg: self.name,
                expected: device.to_string(),
                got: self.device.to_string(),
            })
        }
    }

    /// Reads a one-dimensional integer tensor (int32 or int64) into a vector.
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        self.expect_dtype(&[DType::I64, DType::I32])?;
        self.expect_ndim(1, "a 1-d tensor")?;
        self.expect_device(Device::Cpu)?;
        let n = self.shape[0];
        let s = self.strides[0];
        // SAFETY: dtype, rank and device were checked; the TensorRef invariant covers every
        // index below shape[0].
        let out = unsafe {
            match self.dtype {
                DType::I64 => {
                    let p = self.ptr as *const i64;
                    (0..n).map(|i| *p.offset(i as isize * s)).collect()
                }
                _ => {
                    let p = self.ptr as *const i32;
                    (0..n).map(|i| *p.offset(i as isize * s) as i64).collect()
                }
            }
        };
        Ok(out)
    }

    /// Reads the value of a one-element CPU tensor (0-d or any shape of one element) as f64.
    pub fn item_f64(&self, arg: &'static str) -> Result<f64> {
        self.expect_device(Device::Cpu)?;
        if self.numel() != 1 {
            return Err(Error::shape(arg, "one element", &self.shape));
        }
        crate::dispatch_any!(self.dtype, T => {
            // SAFETY: the single element sits at the data pointer (all indices are 0).
            Ok(unsafe { *(self.ptr as *const T) }.to_f64())
        })
    }

    /// Reads a one-dimensional tensor of any supported dtype as f64 values.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        self.expect_ndim(1, "a 1-d tensor")?;
        self.expect_device(Device::Cpu)?;
        let n = self.shape[0];
        let s = self.strides[0];
        crate::dispatch_any!(self.dtype, T => {
            let p = self.ptr as *const T;
            // SAFETY: i < shape[0], covered by the TensorRef invariant; T is the dtype the
            // tensor declares.
            Ok((0..n).map(|i| unsafe { *p.offset(i as isize * s) }.to_f64()).collect())
        })
    }
}

/// Row-major strides for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut strides = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1] as isize;
    }
    strides
}

/// Rust element types with a [`DType`].
pub trait HasDType: Copy + Send + Sync + 'static {
    /// The matching dtype.
    const DTYPE: DType;
}

macro_rules! has_dtype {
    ($($t:ty => $d:ident),*) => { $(impl HasDType for $t { const DTYPE: DType = DType::$d; })* };
}
has_dtype!(bool => Bool, u8 => U8, i32 => I32, i64 => I64, half::f16 => F16,
           half::bf16 => BF16, f32 => F32, f64 => F64);

impl TensorRef<'_> {
    /// True when the strides are row-major contiguous (size-1 dimensions may have any stride).
    pub fn is_contiguous(&self) -> bool {
        // As torch: a tensor without elements addresses nothing, whatever its strides.
        if self.numel() == 0 {
            return true;
        }
        let mut expected = 1isize;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n as isize;
        }
        true
    }

    /// The element count of a contiguous CPU tensor of type `T`, or the error saying which of
    /// those it is not.
    fn contiguous_cpu_len<T: HasDType>(&self) -> Result<usize> {
        self.expect_dtype(&[T::DTYPE])?;
        self.expect_device(Device::Cpu)?;
        if !self.is_contiguous() {
            return Err(Error::value(
                self.name,
                "a contiguous tensor",
                "a strided view",
            ));
        }
        Ok(self.numel())
    }

    /// Borrows a contiguous CPU tensor of type `T` as a mutable slice.
    ///
    /// # Safety
    /// No other live reference may read or write the tensor's elements while the slice lives
    /// (the Python edge only calls this on outputs it allocated for this call).
    pub unsafe fn as_mut_slice<T: HasDType>(&mut self) -> Result<&mut [T]> {
        let n = self.contiguous_cpu_len::<T>()?;
        if n == 0 {
            return Ok(&mut []);
        }
        // SAFETY: dtype, device and contiguity were checked, so the n elements from ptr are
        // the tensor's storage; exclusivity is the caller's promise.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, n) })
    }

    /// Fails unless the tensor is contiguous with `shape` and `dtype` (outputs and scratch
    /// allocated by the Python layer).
    pub fn expect_buffer(&self, shape: &[usize], dtype: DType) -> Result<()> {
        self.expect_dtype(&[dtype])?;
        if self.shape() != shape || !self.is_contiguous() {
            return Err(Error::shape(
                self.name(),
                format!("a contiguous {shape:?}"),
                self.shape(),
            ));
        }
        Ok(())
    }

    /// Borrows a contiguous CPU tensor of type `T` as a slice.
    pub fn as_slice<T: HasDType>(&self) -> Result<&[T]> {
        let n = self.contiguous_cpu_len::<T>()?;
        if n == 0 {
            return Ok(&[]);
        }
        // SAFETY: dtype, device and contiguity were checked; reads only.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr as *const T, n) })
    }
}

/// Any element type read as a number (masks, lengths, metrics, labels).
pub trait Scalar: HasDType {
    /// The value as f64 (`true` is 1).
    fn to_f64(self) -> f64;
}

macro_rules! scalar_as {
    ($($t:ty),*) => { $(impl Scalar for $t { #[inline(always)] fn to_f64(self) -> f64 { self as f64 } })* };
}
scalar_as!(u8, i32, i64, f32, f64);

impl Scalar for bool {
    #[inline(always)]
    fn to_f64(self) -> f64 {
        if self { 1.0 } else { 0.0 }
    }
}
impl Scalar for half::f16 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}
impl Scalar for half::bf16 {
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
}

/// Runs `$body` once per listed dtype with `$t` bound to its Rust type; the optional `else`
/// arm handles the dtypes not listed. The dispatch macros below are its two uses.
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_dtype {
    ($dtype:expr, $t:ident => $body:expr, [$($variant:ident => $ty:ty),*] $(, else $other:ident => $fallback:expr)?) => {
        match $dtype {
            $($crate::tensor::DType::$variant => {
                type $t = $ty;
                $body
            })*
            $($other => $fallback)?
        }
    };
}

/// Runs `$body` with `$t` bound to the Rust type of a floating-point [`DType`]; any other
/// dtype returns a `Kernel` error (they must be rejected before this point).
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_float {
    ($dtype:expr, $t:ident => $body:expr) => {
        $crate::dispatch_dtype!($dtype, $t => $body,
            [F32 => f32, F64 => f64, BF16 => half::bf16, F16 => half::f16],
            else other => return Err($crate::error::Error::Kernel {
                op: "dispatch",
                message: format!("non-float dtype {other} reached a float kernel"),
            }))
    };
}

/// Runs `$body` with `$t` bound to the Rust type of any [`DType`].
#[macro_export]
#[doc(hidden)]
macro_rules! dispatch_any {
    ($dtype:expr, $t:ident => $body:expr) => {
        $crate::dispatch_dtype!($dtype, $t => $body,
            [Bool => bool, U8 => u8, I32 => i32, I64 => i64,
             F16 => half::f16, BF16 => half::bf16, F32 => f32, F64 => f64])
    };
}
