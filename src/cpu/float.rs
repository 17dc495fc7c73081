//! Element and accumulator types of the CPU kernels: half-precision and float32 inputs
//! accumulate in f32, float64 inputs in f64 (so gradcheck sees float64 all the way).

use std::iter::Sum;
use std::ops::{AddAssign, MulAssign, SubAssign};

use num_traits::Float;

use crate::tensor::HasDType;

/// Lanes of the fixed-order reductions below: sums that run over 8 interleaved partial sums
/// vectorise (a single running sum cannot be reordered by the compiler) and stay bitwise
/// reproducible, since the order does not depend on threads or data.
const LANES: usize = 8;

/// Sum of `x` in a fixed order over [`LANES`] interleaved lanes.
#[inline(always)]
pub fn lane_sum<A: Acc>(x: &[A]) -> A {
    let mut lanes = [A::zero(); LANES];
    let chunks = x.chunks_exact(LANES);
    let total = chunks.remainder().iter().fold(A::zero(), |a, &b| a + b);
    for c in chunks {
        for j in 0..LANES {
            lanes[j] += c[j];
        }
    }
    lanes.into_iter().fold(total, |a, b| a + b)
}

/// Dot product in the same fixed lane order as [`lane_sum`].
#[inline(always)]
pub fn dot<A: Acc>(a: &[A], b: &[A]) -> A {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [A::zero(); LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let mut total = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(A::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ca.zip(cb) {
        for j in 0..LANES {
            lanes[j] += x[j] * y[j];
        }
    }
    for l in lanes {
        total += l;
    }
    total
}

/// An accumulator type: f32 or f64.
pub trait Acc: Float + Sum + AddAssign + SubAssign + MulAssign + Default + Send + Sync {
    /// Conversion from an f64 argument (eps, tau, a gradient scale).
    fn of(x: f64) -> Self;
    /// Conversion to f64 for results handed back to Python.
    fn f64(self) -> f64;
    /// `e^x`, branch-free so that loops over it vectorise (f32), or the libm `exp` (f64).
    fn exp_fast(self) -> Self;
}

impl Acc for f32 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32(self)
    }
}

/// `e^x` in f32 within 2 ulp: `x = n ln2 + r` with |r| <= ln2/2, a degree-7 Taylor polynomial
/// for `e^r` (truncation below 1e-8), and `2^n` applied as two exact power-of-two factors so
/// that results down to the subnormal range and up to overflow come out right. NaN stays NaN.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Round to nearest through the 1.5 * 2^23 trick (vectorises, unlike f32::round).
    const SHIFT: f32 = 12_582_912.0;
    let xc = x.clamp(-104.0, 89.0);
    let shifted = xc * LOG2E + SHIFT;
    let n = shifted - SHIFT;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    // n as an integer, read from the mantissa of 1.5 * 2^23 + n (an `as i32` cast does not
    // vectorise: its saturation is done one lane at a time).
    let n = shifted.to_bits() as i32 - SHIFT.to_bits() as i32;
    let half = n >> 1;
    let scale = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let y = p * scale(half) * scale(n - half);
    if x.is_nan() { x } else { y }
}

impl Acc for f64 {
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn exp_fast(self) -> Self {
        self.exp()
    }
}

/// A floating-point storage type and the accumulator it is computed in.
pub trait Elem: HasDType {
    /// The accumulator.
    type Acc: Pooled;
    /// Widens a stored value.
    fn load(self) -> Self::Acc;
    /// Rounds an accumulator back to storage (round to nearest even).
    fn store(a: Self::Acc) -> Self;
}

impl Elem for f32 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type Acc = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(a: f64) -> Self {
        a
    }
}

impl Elem for half::bf16 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        bf16_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        half::bf16::from_bits(f32_to_bf16(a))
    }
}

/// bfloat16 bits to f32, as `half` converts them (a NaN made quiet), branch-free so that
/// loops over it vectorise.
#[inline(always)]
pub fn bf16_to_f32(x: u16) -> f32 {
    let wide = (x as u32) << 16;
    let nan = x & 0x7FFF > 0x7F80;
    f32::from_bits(if nan { wide | 0x0040_0000 } else { wide })
}

/// f32 to bfloat16 bits rounded to nearest even, as `half` rounds them (a NaN keeps its sign
/// and top payload bits and is made quiet), branch-free so that loops over it vectorise.
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    // Adding 0x7FFF plus the lowest kept bit carries into the kept bits exactly when the
    // dropped half is above one half, or exactly one half with an odd kept value.
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = b & 0x7FFF_FFFF > 0x7F80_0000;
    (if nan { (b >> 16) | 0x0040 } else { rounded }) as u16
}

impl Elem for half::f16 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(a: f32) -> Self {
        half::f16::from_f32(a)
    }
}

/// A strided 2-D read view: element `(r, c)` at `base + r * rs + c * cs` (a stride of 0
/// broadcasts, e.g. per-rollout advantages over tokens).
#[derive(Clone, Copy)]
pub struct Strided2 {
    base: usize,
    rs: isize,
    cs: isize,
}

impl Strided2 {
    /// View of a `[R, C]` tensor, or of a `[R]` tensor broadcast over columns.
    pub fn of(t: &crate::tensor::TensorRef) -> Self {
        let st = t.strides();
        let (rs, cs) = match st.len() {
            2 => (st[0], st[1]),
            1 => (st[0], 0),
            _ => (0, 0),
        };
        Strided2 {
            base: t.data_ptr() as usize,
            rs,
            cs,
        }
    }

    /// Elements `(r, c0..c0 + n)` as a slice when columns are contiguous.
    ///
    /// # Safety
    /// As for [`Strided2::get`], for every column in the range.
    #[inline(always)]
    pub unsafe fn row_slice<T>(&self, r: usize, c0: usize, n: usize) -> Option<&[T]> {
        if self.cs != 1 {
            return None;
        }
        if n == 0 {
            // An empty tensor's data pointer may be null, which no slice may hold.
            return Some(&[]);
        }
        // SAFETY: contiguous columns, in bounds by the caller's promise.
        Some(unsafe {
            let p = (self.base as *const T).offset(r as isize * self.rs + c0 as isize);
            std::slice::from_raw_parts(p, n)
        })
    }

    /// Reads element `(r, c)`.
    ///
    /// # Safety
    /// `(r, c)` must be inside the tensor this view was made of, and `T` its element type.
    #[inline(always)]
    pub unsafe fn get<T: Copy>(&self, r: usize, c: usize) -> T {
        // SAFETY: the caller keeps (r, c) in bounds and T the element type.
        unsafe { *(self.base as *const T).offset(r as isize * self.rs + c as isize * self.cs) }
    }
}

#[cfg(test)]
mod tests {
    use super::{bf16_to_f32, exp_f32, f32_to_bf16};

    /// The branch-free conversions give `half`'s bits: every bfloat16 pattern one way, and
    /// f32 patterns around every rounding boundary, the specials and a stride the other way.
    #[test]
    fn bf16_conversions_match_half_bitwise() {
        for x in 0..=u16::MAX {
            let want = half::bf16::from_bits(x).to_f32().to_bits();
            assert_eq!(bf16_to_f32(x).to_bits(), want, "{x:#06x}");
        }
        let check = |b: u32| {
            let want = half::bf16::from_f32(f32::from_bits(b)).to_bits();
            assert_eq!(f32_to_bf16(f32::from_bits(b)), want, "{b:#010x}");
        };
        for hi in (0..=u16::MAX as u32).step_by(7) {
            for lo in [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF, 0x1234, 0xC000] {
                check(hi << 16 | lo);
            }
        }
        for b in [
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001,
            0xFFFF_FFFF,
            0x7F7F_FFFF,
        ] {
            check(b);
        }
        let mut b = 0u32;
        while let Some(next) = b.checked_add(65_537) {
            check(b);
            b = next;
        }
    }

    #[test]
    fn exp_f32_within_two_ulp_everywhere() {
        let mut worst = 0f64;
        let mut x = -103.0f32;
        while x < 88.7 {
            let exact = (x as f64).exp();
            let got = exp_f32(x) as f64;
            let ulp = (exact as f32).abs() * f32::EPSILON;
            if exact > 1e-37 {
                worst = worst.max((got - exact).abs() / ulp as f64);
            }
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(100.0), f32::INFINITY);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
    }
}

/// Accumulator types with a per-thread pool of scratch buffers.
///
/// A kernel's `[m, H]` scratch would otherwise be a fresh allocation per call, which the
/// system allocator maps and the kernel zero-fills page by page: measured as the largest cost
/// of the alignment forward. Buffers return to the pool of the thread that took them; the pool
/// keeps at most [`POOL_KEEP`] of them.
pub trait Pooled: Acc {
    /// Runs `f` on this type's pool.
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R;
}

/// Buffers a pool keeps per thread and type.
const POOL_KEEP: usize = 4;

thread_local! {
    static POOL_F32: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
    static POOL_F64: std::cell::RefCell<Vec<Vec<f64>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Pooled for f32 {
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R {
        POOL_F32.with(|p| f(&mut p.borrow_mut()))
    }
}

impl Pooled for f64 {
    fn with_pool<R>(f: impl FnOnce(&mut Vec<Vec<Self>>) -> R) -> R {
        POOL_F64.with(|p| f(&mut p.borrow_mut()))
    }
}

/// A zero-filled buffer of `len` elements, reusing pooled memory when there is some.
pub fn take_zeroed<A: Pooled>(len: usize) -> Vec<A> {
    let mut v = A::with_pool(|p| p.pop()).unwrap_or_default();
    v.clear();
    v.resize(len, A::zero());
    v
}

/// Returns a buffer from [`take_zeroed`] to the pool.
pub fn give_back<A: Pooled>(v: Vec<A>) {
    A::with_pool(|p| {
        if p.len() < POOL_KEEP {
            p.push(v);
        }
    });
}
