//! The GPU side of the kernel backend: NVRTC compiles each op family's program for the
//! device's architecture on first use (cached per process, per device), the driver loads it,
//! and launches go on the raw stream PyTorch gave. cudarc loads libcuda and libnvrtc
//! dynamically, so none of this is touched on machines without CUDA; the Python package
//! preloads the NVRTC that came with PyTorch (see `python/hidden_align/_cuda.py`), which
//! cudarc then finds by its soname.
//!
//! What to compile to is decided in `target.rs`, compiling (through the on-disk cache of
//! `disk_cache.rs`) is `compile.rs`, and `kernel_names.rs` reads the kernels an image defines.

use std::collections::HashMap;
use std::ffi::{CString, c_int, c_void};
use std::sync::{LazyLock, Mutex, OnceLock};

use cudarc::driver::{DriverError, result as dres, sys as dsys};
use cudarc::nvrtc::sys as nsys;

use super::compile::{image, load_or_recompile};
use super::kernel_names::image_kernels;
use super::target::{driver_version, nvrtc_version, target_of};
use super::{BLOCK, Family, Grid};
use crate::error::{Error, Result};

/// What was found on this machine (for `hidden_align.cuda_status()`).
#[derive(Clone, Debug, Default)]
pub struct Status {
    /// libcuda could be loaded.
    pub driver_found: bool,
    /// libnvrtc could be loaded.
    pub nvrtc_found: bool,
    /// `cuDriverGetVersion`, e.g. 13000.
    pub driver_version: Option<i32>,
    /// NVRTC (major, minor).
    pub nvrtc_version: Option<(i32, i32)>,
    /// Number of CUDA devices.
    pub devices: Option<i32>,
    /// Why the backend cannot run, when it cannot.
    pub reason: Option<String>,
    /// What NVRTC compiles the kernels to for the devices (`sm_90`: a CUBIN, `compute_90`:
    /// PTX the driver finishes), per device when they differ; none when it cannot.
    pub kernel_target: Option<String>,
    /// Why that target (or why none can be loaded), from
    /// [`choose_target`](super::target::choose_target).
    pub kernel_target_reason: Option<String>,
}

fn describe(e: DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    format!("{name}: {text}")
}

pub(super) fn driver_error(what: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Kernel {
        op: "CUDA driver",
        message: format!("{what} failed: {}", describe(e)),
    }
}

static INIT: OnceLock<std::result::Result<(), String>> = OnceLock::new();

/// Loads the libraries and initialises the driver, once per process.
fn ensure_init() -> Result<()> {
    let outcome = INIT.get_or_init(|| {
        // SAFETY: the presence probes only try to load and unload the libraries.
        let (driver, nvrtc) = unsafe { (dsys::is_culib_present(), nsys::is_culib_present()) };
        if !driver {
            return Err(
                "the CUDA driver library (libcuda.so.1) was not found: no NVIDIA \
                        driver is installed, or it is not on the loader path"
                    .into(),
            );
        }
        if !nvrtc {
            return Err(
                "NVRTC (libnvrtc.so.13 or libnvrtc.so.12) was not found; it ships \
                        with PyTorch's CUDA wheels (nvidia/cu13/lib or nvidia/cuda_nvrtc/lib) \
                        and with `pip install nvidia-cuda-nvrtc`"
                    .into(),
            );
        }
        dres::init().map_err(|e| format!("cuInit failed: {}", describe(e)))
    });
    outcome
        .clone()
        .map_err(|reason| Error::CudaUnavailable { reason })
}

/// The state of the CUDA libraries, without failing.
pub fn status() -> Status {
    let mut s = Status::default();
    // SAFETY: as in ensure_init.
    (s.driver_found, s.nvrtc_found) =
        unsafe { (dsys::is_culib_present(), nsys::is_culib_present()) };
    s.nvrtc_version = nvrtc_version();
    if s.driver_found {
        s.driver_version = driver_version();
    }
    match ensure_init() {
        Ok(()) => {
            let mut count: c_int = 0;
            // SAFETY: one out-parameter after a successful cuInit.
            match unsafe { dsys::cuDeviceGetCount(&mut count) }.result() {
                Ok(()) => s.devices = Some(count),
                Err(e) => s.reason = Some(format!("cuDeviceGetCount failed: {}", describe(e))),
            }
        }
        Err(Error::CudaUnavailable { reason }) => s.reason = Some(reason),
        Err(e) => s.reason = Some(e.to_string()),
    }
    if s.reason.is_none() && s.devices.unwrap_or(0) > 0 {
        describe_targets(&mut s);
    }
    s
}

/// Fills in the kernel target of every device: one line when they agree, else one per device.
/// When no device can load the kernels, that is also why the backend cannot run.
fn describe_targets(s: &mut Status) {
    let choices: Vec<(Option<String>, String)> = (0..s.devices.unwrap_or(0))
        .map(|ordinal| match target_of(ordinal) {
            Ok(c) => (Some(c.target.arch()), c.reason),
            Err(Error::CudaUnavailable { reason }) => (None, reason),
            Err(e) => (None, e.to_string()),
        })
        .collect();
    if choices.windows(2).all(|w| w[0] == w[1]) {
        let (target, reason) = choices[0].clone();
        (s.kernel_target, s.kernel_target_reason) = (target, Some(reason));
    } else {
        let mut targets = Vec::new();
        let mut reasons = Vec::new();
        for (i, (target, reason)) in choices.iter().enumerate() {
            targets.push(format!("cuda:{i} {}", target.as_deref().unwrap_or("none")));
            reasons.push(format!("cuda:{i} {reason}"));
        }
        s.kernel_target = Some(targets.join("; "));
        s.kernel_target_reason = Some(reasons.join("; "));
    }
    if choices.iter().all(|(target, _)| target.is_none()) {
        s.reason = s.kernel_target_reason.clone();
    }
}

/// Handles are raw pointers; they cross threads as integers behind the cache's lock.
#[derive(Default)]
struct Cache {
    /// Primary context per device.
    contexts: HashMap<i32, usize>,
    /// Loaded module per (device, family).
    modules: HashMap<(i32, Family), usize>,
    /// Kernel handle per (device, name).
    functions: HashMap<i32, HashMap<String, usize>>,
}

static CACHE: LazyLock<Mutex<Cache>> = LazyLock::new(Mutex::default);

fn context(cache: &mut Cache, ordinal: i32) -> Result<dsys::CUcontext> {
    if let Some(&ctx) = cache.contexts.get(&ordinal) {
        return Ok(ctx as dsys::CUcontext);
    }
    let dev = dres::device::get(ordinal).map_err(driver_error("cuDeviceGet"))?;
    // SAFETY: a valid device; the primary context is the one PyTorch uses, retained for the
    // life of the process.
    let ctx = unsafe { dres::primary_ctx::retain(dev) }
        .map_err(driver_error("cuDevicePrimaryCtxRetain"))?;
    cache.contexts.insert(ordinal, ctx as usize);
    Ok(ctx)
}

/// Whether the driver has `cuFuncLoad` (CUDA 12.4 and later).
fn has_func_load() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        type FuncLoad = unsafe extern "C" fn(dsys::CUfunction) -> dsys::CUresult;
        // SAFETY: only looks the symbol up in the loaded driver library.
        unsafe { dsys::culib().get::<FuncLoad>(b"cuFuncLoad").is_ok() }
    })
}

/// Looks up `kernel` in `module` and, under lazy loading (`CUDA_MODULE_LOADING=LAZY`, the
/// default since CUDA 12.2), finishes loading it now rather than at its first launch.
fn resolve(module: dsys::CUmodule, kernel: &str) -> Result<dsys::CUfunction> {
    let name = CString::new(kernel).expect("kernel names have no NUL");
    // SAFETY: a loaded module and a NUL-terminated name.
    let f = unsafe { dres::module::get_function(module, name) }
        .map_err(driver_error("cuModuleGetFunction"))?;
    if has_func_load() {
        // SAFETY: a function handle of a loaded module; loading a loaded one does nothing.
        unsafe { dsys::cuFuncLoad(f) }
            .result()
            .map_err(driver_error("cuFuncLoad"))?;
    }
    Ok(f)
}

/// The loaded module of `family` on device `ordinal` (its context current), compiled on first
/// use, with the handle of every kernel it defines resolved into the cache: no later launch
/// looks one up (a launch inside CUDA graph capture must not load anything).
fn module(cache: &mut Cache, ordinal: i32, family: Family) -> Result<dsys::CUmodule> {
    if let Some(&m) = cache.modules.get(&(ordinal, family)) {
        return Ok(m as dsys::CUmodule);
    }
    let choice = target_of(ordinal)?;
    let failed = |what: &str, detail: String| Error::Kernel {
        op: "CUDA driver",
        message: format!(
            "{what} of kernels/{} failed: {detail} (the image: {})",
            family.file(),
            choice.reason
        ),
    };
    let load = |bytes: &[u8]| {
        let names =
            image_kernels(bytes, choice.target).map_err(|e| failed("listing the kernels", e))?;
        // SAFETY: a complete CUBIN or NUL-terminated PTX image for this device, with its
        // context current.
        unsafe { dres::module::load_data(bytes.as_ptr() as *const c_void) }
            .map(|m| (m, names))
            .map_err(|e| failed("cuModuleLoadData", describe(e)))
    };
    let (m, names) = load_or_recompile(|read| image(family, choice.target, read), load)?;
    // Every handle before anything is cached: a module is cached only with all its kernels.
    let mut handles = Vec::with_capacity(names.len());
    for kernel in names {
        match resolve(m, &kernel) {
            Ok(f) => handles.push((kernel, f as usize)),
            Err(e) => {
                // SAFETY: the module loaded above, not cached, so nothing else holds it.
                let _ = unsafe { dres::module::unload(m) };
                return Err(e);
            }
        }
    }
    cache.modules.insert((ordinal, family), m as usize);
    cache.functions.entry(ordinal).or_default().extend(handles);
    Ok(m)
}

fn function(
    cache: &mut Cache,
    ordinal: i32,
    family: Family,
    kernel: &str,
) -> Result<dsys::CUfunction> {
    // Looked up by &str: no allocation on the launch path once the kernel is known.
    if let Some(&f) = cache.functions.get(&ordinal).and_then(|m| m.get(kernel)) {
        return Ok(f as dsys::CUfunction);
    }
    // Loading the module resolves every kernel it defines; a name it did not is looked up.
    let module = module(cache, ordinal, family)?;
    if let Some(&f) = cache.functions.get(&ordinal).and_then(|m| m.get(kernel)) {
        return Ok(f as dsys::CUfunction);
    }
    let f = resolve(module, kernel)?;
    cache
        .functions
        .entry(ordinal)
        .or_default()
        .insert(kernel.to_owned(), f as usize);
    Ok(f)
}

/// Makes the primary context of a device current for a scope and puts back whatever was
/// current before: the CUDA runtime (and so PyTorch's idea of the current device) follows the
/// current context, which a launch on another device must not change.
struct ContextScope {
    previous: Option<dsys::CUcontext>,
    switched: bool,
}

impl ContextScope {
    fn enter(ctx: dsys::CUcontext) -> Result<Self> {
        let previous = dres::ctx::get_current().map_err(driver_error("cuCtxGetCurrent"))?;
        let switched = previous != Some(ctx);
        if switched {
            // SAFETY: the retained primary context of the tensors' device.
            unsafe { dres::ctx::set_current(ctx) }.map_err(driver_error("cuCtxSetCurrent"))?;
        }
        Ok(ContextScope { previous, switched })
    }
}

impl Drop for ContextScope {
    fn drop(&mut self) {
        if self.switched {
            let previous = self.previous.unwrap_or(std::ptr::null_mut());
            // SAFETY: the context that was current on entry (or none), still alive: contexts
            // this process retains are never destroyed.
            let _ = unsafe { dres::ctx::set_current(previous) };
        }
    }
}

/// The locked cache, with device `ordinal`'s primary context current until the scope drops.
fn on_device(ordinal: i32) -> Result<(std::sync::MutexGuard<'static, Cache>, ContextScope)> {
    ensure_init()?;
    let mut cache = CACHE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let ctx = context(&mut cache, ordinal)?;
    let scope = ContextScope::enter(ctx)?;
    Ok((cache, scope))
}

/// Compiles (or takes from the disk cache) and loads every kernel family on device `ordinal`
/// and resolves the handle of every kernel of every dtype, so that no later call loads or
/// looks up anything: needed before capturing a CUDA graph, where loading a module is not
/// allowed.
pub fn prepare(ordinal: i32) -> Result<()> {
    let (mut cache, _scope) = on_device(ordinal)?;
    for family in Family::ALL {
        // A module is cached only with the handles of all its kernels.
        module(&mut cache, ordinal, family)?;
    }
    Ok(())
}

/// Launches `kernel` with its parameter block on `stream` of device `ordinal`; returns as
/// soon as the launch is queued (no synchronisation).
pub fn launch(
    ordinal: i32,
    stream: usize,
    family: Family,
    kernel: &str,
    grid: Grid,
    params: *const c_void,
) -> Result<()> {
    let (mut cache, _scope) = on_device(ordinal)?;
    let f = function(&mut cache, ordinal, family, kernel)?;
    drop(cache);
    let mut args = [params as *mut c_void];
    let [x, y, z] = grid.blocks;
    // SAFETY: `f` takes exactly one parameter, the struct `params` points to (its #[repr(C)]
    // mirror); the driver copies it at launch. The stream belongs to PyTorch and outlives the
    // queued work; every pointer inside `params` addresses memory of tensors on this device.
    unsafe {
        dres::launch_kernel(
            f,
            (x, y, z),
            (BLOCK, 1, 1),
            0,
            stream as dsys::CUstream,
            &mut args,
        )
    }
    .map_err(driver_error(kernel))
}
