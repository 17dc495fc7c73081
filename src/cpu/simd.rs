//! The instruction set the CPU kernels run with, chosen at run time.
//!
//! The wheel is built for the baseline of its architecture (x86-64 without AVX, or aarch64), so
//! that it runs on every machine. The hot loops are written once, as plain Rust the compiler
//! vectorises, and [`vectorized`] runs them inside a function compiled for the best level this
//! CPU has (the `pulp` crate detects the features and enables them on that function; the loop
//! bodies are `#[inline(always)]` so that they are compiled there). The environment variable
//! `HIDDEN_ALIGN_SIMD` (read by the Python package at import) or [`force`] selects a lower level.
//!
//! Every level computes the same values bit for bit: the kernels fix their summation order in
//! code (interleaved lanes of a set width, not the vector width), never contract `a * b + c`
//! into a fused multiply-add, and use their own `exp`, so a wider vector only changes how many
//! lanes one instruction handles.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{Error, Result};

/// An instruction-set level of the CPU kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The architecture's baseline: SSE2 on x86-64, NEON on aarch64 (always present there).
    Baseline,
    /// x86-64-v3: AVX2, FMA, BMI.
    Avx2,
    /// x86-64-v4: AVX-512 F, BW, CD, DQ, VL.
    Avx512,
}

impl Level {
    /// The name `HIDDEN_ALIGN_SIMD` and `hidden_align.simd_level()` use.
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline if cfg!(target_arch = "aarch64") => "neon",
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    fn from_name(name: &str) -> Option<Level> {
        match name {
            "baseline" | "neon" => Some(Level::Baseline),
            "avx2" => Some(Level::Avx2),
            "avx512" => Some(Level::Avx512),
            _ => None,
        }
    }

    fn code(self) -> u8 {
        self as u8 + 1
    }

    fn from_code(c: u8) -> Level {
        match c {
            3 => Level::Avx512,
            2 => Level::Avx2,
            _ => Level::Baseline,
        }
    }
}

/// The best level this CPU supports.
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V4::is_available() {
            return Level::Avx512;
        }
        if pulp::x86::V3::is_available() {
            return Level::Avx2;
        }
    }
    Level::Baseline
}

/// Every level this CPU supports, lowest first.
pub fn available() -> Vec<Level> {
    [Level::Baseline, Level::Avx2, Level::Avx512]
        .into_iter()
        .filter(|&l| l <= detected())
        .collect()
}

/// 0: not chosen yet (the detected level is used); otherwise [`Level::code`].
static CHOSEN: AtomicU8 = AtomicU8::new(0);

/// The level the kernels run with now.
#[inline]
pub fn current() -> Level {
    match CHOSEN.load(Ordering::Relaxed) {
        0 => {
            let best = detected();
            CHOSEN.store(best.code(), Ordering::Relaxed);
            best
        }
        c => Level::from_code(c),
    }
}

/// Runs the kernels at `name` (a level this CPU has), or at the best one for `None`. Returns
/// the level now in use. Calls running on other threads finish at the level they started with.
pub fn force(name: Option<&str>) -> Result<Level> {
    let level = match name {
        None => detected(),
        Some(n) => {
            let names: Vec<&str> = available().iter().map(|l| l.name()).collect();
            let expected = format!("one of {} (the levels this CPU has)", names.join(", "));
            match Level::from_name(n.trim().to_ascii_lowercase().as_str()) {
                Some(l) if l <= detected() => l,
                _ => return Err(Error::value("HIDDEN_ALIGN_SIMD", expected, n)),
            }
        }
    };
    CHOSEN.store(level.code(), Ordering::Relaxed);
    Ok(level)
}

/// Runs `f` compiled for the current level. `f` and what it calls in its loops must be
/// `#[inline(always)]` (closures too: `vectorized(#[inline(always)] || ...)`), or they keep the
/// baseline code.
#[inline(always)]
pub fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    match current() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `current` never returns a level above `detected`.
        Level::Avx512 => unsafe { pulp::x86::V4::new_unchecked() }.vectorize(f),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { pulp::x86::V3::new_unchecked() }.vectorize(f),
        _ => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_force_and_refuse() {
        let best = detected();
        assert_eq!(force(Some("baseline")).unwrap(), Level::Baseline);
        assert_eq!(current(), Level::Baseline);
        assert!(force(Some("sse9")).is_err());
        if best < Level::Avx512 {
            assert!(force(Some("avx512")).is_err());
        }
        assert_eq!(force(None).unwrap(), best);
        assert_eq!(vectorized(|| 1 + 1), 2);
    }
}
