//! The GPU side of the kernel backend: NVRTC compiles each op family's program for the
//! device's architecture on first use (cached per process, per device), the driver loads it,
//! and launches go on the raw stream PyTorch gave. cudarc loads libcuda and libnvrtc
//! dynamically, so none of this is touched on machines without CUDA; the Python package
//! preloads the NVRTC that came with PyTorch (see `python/hidden_align/_cuda.py`), which
//! cudarc then finds by its soname.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};
use std::sync::{LazyLock, Mutex, OnceLock};

use cudarc::driver::{DriverError, result as dres, sys as dsys};
use cudarc::nvrtc::{result as nres, sys as nsys};

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

fn driver_error(what: &str) -> impl Fn(DriverError) -> Error + '_ {
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
        let mut version: c_int = 0;
        // SAFETY: one out-parameter; allowed before cuInit.
        if unsafe { dsys::cuDriverGetVersion(&mut version) }
            .result()
            .is_ok()
        {
            s.driver_version = Some(version);
        }
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
    s
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

/// What NVRTC produces for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Machine code for `sm_<arch>`.
    Cubin(u32),
    /// PTX for `compute_<arch>`, which the driver compiles for a newer device at load time.
    Ptx(u32),
}

/// Architectures the loaded NVRTC can compile for (e.g. 75, 80, ..., 120); empty if unknown.
fn supported_archs() -> Vec<u32> {
    let mut n: c_int = 0;
    // SAFETY: one out-parameter, then a buffer of that many entries; NVRTC is loaded.
    if unsafe { nsys::nvrtcGetNumSupportedArchs(&mut n) }
        .result()
        .is_err()
        || n <= 0
    {
        return Vec::new();
    }
    let mut archs = vec![0 as c_int; n as usize];
    if unsafe { nsys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .is_err()
    {
        return Vec::new();
    }
    archs.into_iter().map(|a| a as u32).collect()
}

/// Compiles `family` for device `ordinal`: a CUBIN for its architecture, or, when the NVRTC at
/// hand predates the device, PTX for the newest architecture it knows (the driver finishes it).
fn compile(ordinal: i32, family: Family) -> Result<Vec<u8>> {
    let dev = dres::device::get(ordinal).map_err(driver_error("cuDeviceGet"))?;
    let attr = |a| {
        // SAFETY: a valid device and attribute.
        unsafe { dres::device::get_attribute(dev, a) }.map_err(driver_error("cuDeviceGetAttribute"))
    };
    let major = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let cc = (major * 10 + minor) as u32;
    let supported = supported_archs();
    if supported.is_empty() || supported.contains(&cc) {
        return compile_image(family, Target::Cubin(cc));
    }
    match supported.iter().copied().filter(|&a| a <= cc).max() {
        Some(arch) => compile_image(family, Target::Ptx(arch)),
        None => Err(Error::CudaUnavailable {
            reason: format!(
                "the loaded NVRTC cannot compile for sm_{cc} (it supports {supported:?}); use \
                 a PyTorch wheel whose CUDA version supports this GPU"
            ),
        }),
    }
}

/// NVRTC (major, minor), when the library is present.
fn nvrtc_version() -> Option<(i32, i32)> {
    // SAFETY: the presence probe only loads and unloads the library.
    if !unsafe { nsys::is_culib_present() } {
        return None;
    }
    let (mut major, mut minor): (c_int, c_int) = (0, 0);
    // SAFETY: two out-parameters; the library is present.
    unsafe { nsys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .ok()
        .map(|()| (major, minor))
}

/// FNV-1a: a stable 64-bit hash of the program text for the on-disk cache key.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Directory of compiled kernels: `HIDDEN_ALIGN_CACHE_DIR` (empty: no disk cache), else
/// `$XDG_CACHE_HOME/hidden_align` or `~/.cache/hidden_align`.
fn cache_dir() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("HIDDEN_ALIGN_CACHE_DIR") {
        return (!dir.is_empty()).then(|| dir.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))?;
    Some(base.join("hidden_align"))
}

/// Compiles `family` for `target` through the on-disk cache, keyed by a hash of the program
/// and the options, the target and the NVRTC version. Needs NVRTC, not a GPU.
pub fn compile_image(family: Family, target: Target) -> Result<Vec<u8>> {
    let program = family.program();
    let (major, minor) = nvrtc_version().ok_or_else(|| Error::CudaUnavailable {
        reason: "NVRTC (libnvrtc.so.13 or libnvrtc.so.12) was not found".into(),
    })?;
    let (arch, kind) = match target {
        Target::Cubin(a) => (format!("sm_{a}"), "cubin"),
        Target::Ptx(a) => (format!("compute_{a}"), "ptx"),
    };
    let key = format!(
        "{}-{:016x}-{arch}-nvrtc{major}.{minor}.{kind}",
        family.file().trim_end_matches(".cu"),
        fnv1a(&format!("{program}\n{:?}", super::NVRTC_OPTIONS))
    );
    let cached = cache_dir().map(|d| d.join(&key));
    if let Some(bytes) = cached.as_ref().and_then(|p| std::fs::read(p).ok())
        && !bytes.is_empty()
    {
        return Ok(bytes);
    }
    let cubin = nvrtc_image(family, &program, target)?;
    if let Some(path) = cached {
        // Best effort: a cache that cannot be written costs a compile next time. Writing to a
        // temporary file and renaming lets a concurrent reader see the whole file or none.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let written = path
            .parent()
            .map(std::fs::create_dir_all)
            .transpose()
            .and_then(|_| std::fs::write(&tmp, &cubin))
            .and_then(|_| std::fs::rename(&tmp, &path));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
    Ok(cubin)
}

fn nvrtc_image(family: Family, program: &str, target: Target) -> Result<Vec<u8>> {
    let arch = match target {
        Target::Cubin(a) => format!("sm_{a}"),
        Target::Ptx(a) => format!("compute_{a}"),
    };
    let arch_option = format!("--gpu-architecture={arch}");
    let mut options = vec![arch_option.as_str()];
    options.extend_from_slice(super::NVRTC_OPTIONS);
    let failed = |what: &str, detail: String| Error::Kernel {
        op: "NVRTC",
        message: format!(
            "{what} of kernels/{} for {arch} failed: {detail}",
            family.file()
        ),
    };
    let source = CString::new(program).expect("kernel sources have no NUL");
    let name = CString::new(family.file()).expect("file names have no NUL");
    let prog = nres::create_program(&source, Some(&name))
        .map_err(|e| failed("nvrtcCreateProgram", format!("{e:?}")))?;
    // SAFETY: a live program and plain option strings.
    let compiled = unsafe { nres::compile_program(prog, &options) };
    let result = match compiled {
        Err(e) => {
            // SAFETY: the program is live.
            let log = unsafe { nres::get_program_log(prog) }
                .map(|l| {
                    let bytes: Vec<u8> =
                        l.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                })
                .unwrap_or_default();
            Err(failed("compilation", format!("{e:?}\n{log}")))
        }
        Ok(()) => match target {
            Target::Cubin(_) => cubin_of(prog).map_err(|e| failed("nvrtcGetCUBIN", e)),
            Target::Ptx(_) => ptx_of(prog).map_err(|e| failed("nvrtcGetPTX", e)),
        },
    };
    // SAFETY: the program is live and not used afterwards.
    let _ = unsafe { nres::destroy_program(prog) };
    result
}

/// The PTX of a compiled program, NUL-terminated as `cuModuleLoadData` wants it.
fn ptx_of(prog: nsys::nvrtcProgram) -> std::result::Result<Vec<u8>, String> {
    // SAFETY: a compiled program.
    let ptx = unsafe { nres::get_ptx(prog) }.map_err(|e| format!("{e:?}"))?;
    let mut bytes: Vec<u8> = ptx
        .iter()
        .map(|&c| c as u8)
        .take_while(|&c| c != 0)
        .collect();
    if bytes.is_empty() {
        return Err("an empty image".into());
    }
    bytes.push(0);
    Ok(bytes)
}

fn cubin_of(prog: nsys::nvrtcProgram) -> std::result::Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: a compiled program; one out-parameter, then a buffer of that size.
    unsafe { nsys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(|e| format!("{e:?}"))?;
    let mut cubin = vec![0u8; size];
    unsafe { nsys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(|e| format!("{e:?}"))?;
    if cubin.is_empty() {
        return Err("an empty image".into());
    }
    Ok(cubin)
}

/// The loaded module of `family` on device `ordinal` (its context current), compiled on first
/// use.
fn module(cache: &mut Cache, ordinal: i32, family: Family) -> Result<dsys::CUmodule> {
    if let Some(&m) = cache.modules.get(&(ordinal, family)) {
        return Ok(m as dsys::CUmodule);
    }
    let cubin = compile(ordinal, family)?;
    // SAFETY: a complete CUBIN image for this device, with its context current.
    let m = unsafe { dres::module::load_data(cubin.as_ptr() as *const c_void) }
        .map_err(driver_error("cuModuleLoadData"))?;
    cache.modules.insert((ordinal, family), m as usize);
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
    let module = module(cache, ordinal, family)?;
    let name = CString::new(kernel).expect("kernel names have no NUL");
    // SAFETY: a loaded module and a NUL-terminated name.
    let f = unsafe { dres::module::get_function(module, name) }
        .map_err(driver_error("cuModuleGetFunction"))?;
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

/// Compiles (or takes from the disk cache) and loads every kernel family on device `ordinal`,
/// so that no later call does it: needed before capturing a CUDA graph, where loading a
/// module is not allowed.
pub fn prepare(ordinal: i32) -> Result<()> {
    let (mut cache, _scope) = on_device(ordinal)?;
    for family in Family::ALL {
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
