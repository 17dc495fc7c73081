//! Launches into the emulation build of the kernels (`kernels/emulation/`), which runs every
//! CUDA thread of a block as a CPU thread and returns when the grid is done.

use std::ffi::{CString, c_char, c_void};

use super::{BLOCK, Grid};
use crate::error::{Error, Result};

unsafe extern "C" {
    fn ha_emu_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        dynamic_shared_bytes: usize,
        params: *const c_void,
    ) -> i32;
}

/// Runs `kernel` over `grid` with `params` (the kernel's parameter block) to completion.
pub fn launch(kernel: &str, grid: Grid, params: *const c_void) -> Result<()> {
    let name = CString::new(kernel).expect("kernel names have no NUL");
    let block = [BLOCK, 1, 1];
    // SAFETY: `params` points to the #[repr(C)] mirror of the kernel's parameter struct, alive
    // for this call; every pointer in it addresses CPU memory the caller borrows for the call.
    let rc = unsafe {
        ha_emu_launch(
            name.as_ptr(),
            grid.blocks.as_ptr(),
            block.as_ptr(),
            0,
            params,
        )
    };
    if rc != 0 {
        return Err(Error::Kernel {
            op: "emulated launch",
            message: format!("no kernel named {kernel}"),
        });
    }
    Ok(())
}
