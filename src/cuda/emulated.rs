//! Launches into the emulation build of the kernels (`kernels/emulation/`), which runs every
//! CUDA thread of a block as a CPU thread and returns when the grid is done.
//!
//! Blocks run one after another by default. `HIDDEN_ALIGN_EMULATED_BLOCKS=n` (or
//! [`set_concurrent_blocks`]) runs up to n blocks of a launch at once (n at most
//! [`max_concurrent_blocks`]), so that the protocols between blocks run concurrently.

use std::ffi::{CString, c_char, c_void};
use std::sync::atomic::{AtomicI32, Ordering};

use super::{BLOCK, Grid};
use crate::error::{Error, Result};

unsafe extern "C" {
    fn ha_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_shared_bytes: usize,
        params: *const c_void,
        slots: i32,
    ) -> i32;
    fn ha_emu_max_slots() -> i32;
}

/// 0: not read from the environment yet.
static CONCURRENT_BLOCKS: AtomicI32 = AtomicI32::new(0);

/// The most blocks the emulator can run at once (the copies of the kernels it was built with).
pub fn max_concurrent_blocks() -> usize {
    // SAFETY: a constant getter of the emulation library.
    unsafe { ha_emu_max_slots() as usize }
}

/// Blocks of one launch run at once (1: one after another).
pub fn concurrent_blocks() -> usize {
    match CONCURRENT_BLOCKS.load(Ordering::Relaxed) {
        0 => {
            let n = std::env::var("HIDDEN_ALIGN_EMULATED_BLOCKS")
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(1)
                .clamp(1, max_concurrent_blocks());
            CONCURRENT_BLOCKS.store(n as i32, Ordering::Relaxed);
            n
        }
        n => n as usize,
    }
}

/// Sets how many blocks of one launch run at once, from 1 to [`max_concurrent_blocks`].
pub fn set_concurrent_blocks(n: usize) -> Result<()> {
    let max = max_concurrent_blocks();
    if n == 0 || n > max {
        return Err(Error::value(
            "blocks",
            format!("an integer from 1 to {max}"),
            n,
        ));
    }
    CONCURRENT_BLOCKS.store(n as i32, Ordering::Relaxed);
    Ok(())
}

/// Runs `kernel` over `grid` with `params` (the kernel's parameter block) to completion.
pub fn launch(kernel: &str, grid: Grid, params: *const c_void) -> Result<()> {
    let name = CString::new(kernel).expect("kernel names have no NUL");
    let block = [BLOCK, 1, 1];
    let slots = concurrent_blocks() as i32;
    // SAFETY: `params` points to the #[repr(C)] mirror of the kernel's parameter struct, alive
    // for this call; every pointer in it addresses CPU memory the caller borrows for the call.
    let rc = unsafe {
        ha_emu_launch(
            name.as_ptr(),
            grid.blocks.as_ptr(),
            block.as_ptr(),
            0,
            params,
            slots,
        )
    };
    if rc != 0 {
        return Err(Error::Kernel {
            op: "emulated launch",
            message: format!("kernel {kernel}: launcher returned {rc} ({slots} block slots)"),
        });
    }
    Ok(())
}
