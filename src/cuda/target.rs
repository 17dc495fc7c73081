//! What NVRTC compiles the kernels to for a device: a CUBIN for its architecture, or PTX that
//! the driver finishes at load time. [`choose_target`] decides, as a pure function of the NVRTC
//! version, the driver's CUDA version, the device's compute capability and the architectures
//! NVRTC lists; the probes of the loaded libraries and of the device that feed it are here too.

use std::ffi::c_int;

use cudarc::driver::{result as dres, sys as dsys};
use cudarc::nvrtc::sys as nsys;

use super::driver::driver_error;
use crate::error::{Error, Result};

/// What NVRTC produces for a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Machine code for `sm_<arch>`.
    Cubin(u32),
    /// PTX for `compute_<arch>`, which the driver compiles for a newer device at load time.
    Ptx(u32),
}

impl Target {
    /// The NVRTC architecture name: `sm_90` (CUBIN) or `compute_90` (PTX).
    pub fn arch(self) -> String {
        match self {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        }
    }

    pub(super) fn kind(self) -> &'static str {
        match self {
            Target::Cubin(_) => "cubin",
            Target::Ptx(_) => "ptx",
        }
    }
}

/// A [`Target`] and why it was chosen (shown by `hidden_align.cuda_status()`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetChoice {
    /// What NVRTC compiles to.
    pub target: Target,
    /// Why, in words.
    pub reason: String,
}

/// `(major, minor)` of a CUDA version as the driver reports it (12040 is CUDA 12.4).
fn cuda_version(v: i32) -> (i32, i32) {
    (v / 1000, (v % 1000) / 10)
}

/// What to compile the kernels to, from the NVRTC version, the driver's CUDA version (from
/// `cuDriverGetVersion`, when known), the device's compute capability (`major * 10 + minor`)
/// and the architectures NVRTC lists (empty when it lists none). A pure function of its
/// inputs; `Err` says why no image NVRTC can produce would load.
///
/// * A driver runs the images of any older toolkit (backward compatibility), so an NVRTC no
///   newer than the driver can produce either kind.
/// * A CUBIN of a newer NVRTC of the driver's major version loads (CUDA minor version
///   compatibility), but the PTX of a newer NVRTC has a PTX ISA version the driver's JIT does
///   not know (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`): NVRTC has no option to emit an older
///   ISA, so PTX needs `NVRTC <= driver`.
/// * An NVRTC of a newer major version than the driver produces nothing it is guaranteed to
///   load: refused up front, with what to install, rather than failing at load time.
/// * A device NVRTC lists gets a CUBIN; a device newer than NVRTC gets PTX for the newest
///   architecture it lists below the device (PTX runs on any later architecture); a device
///   older than everything NVRTC lists (CUDA 13 dropped Volta and older) cannot be served.
pub fn choose_target(
    nvrtc: (i32, i32),
    driver: Option<i32>,
    cc: u32,
    supported: &[u32],
) -> std::result::Result<TargetChoice, String> {
    let nv = format!("NVRTC {}.{}", nvrtc.0, nvrtc.1);
    let driver = driver.map(cuda_version);
    let drv = match driver {
        Some((major, minor)) => format!("the driver (CUDA {major}.{minor})"),
        None => "the driver (version unknown)".into(),
    };
    if let Some((major, minor)) = driver
        && nvrtc.0 > major
    {
        return Err(format!(
            "{nv} is newer than {drv}: a driver of CUDA {major}.{minor} cannot load the \
             kernels an NVRTC of CUDA {} compiles; install the NVRTC of CUDA {major} \
             (`pip install nvidia-cuda-nvrtc-cu{major}`, or a PyTorch wheel built for CUDA \
             {major}) or update the NVIDIA driver",
            nvrtc.0
        ));
    }
    let nvrtc_newer = driver.is_some_and(|d| nvrtc > d);
    if supported.is_empty() || supported.contains(&cc) {
        let target = Target::Cubin(cc);
        let reason = if supported.is_empty() {
            format!("CUBIN for sm_{cc}: {nv} does not list its architectures")
        } else if nvrtc_newer {
            format!(
                "CUBIN for sm_{cc}: {nv} is newer than {drv}, which loads its CUBINs (CUDA \
                 minor version compatibility) but could not compile its PTX"
            )
        } else {
            format!("CUBIN for sm_{cc}, which {nv} supports")
        };
        return Ok(TargetChoice { target, reason });
    }
    let newest = supported.iter().copied().max().unwrap_or(0);
    let Some(arch) = supported.iter().copied().filter(|&a| a <= cc).max() else {
        return Err(format!(
            "{nv} cannot compile for sm_{cc} (it supports sm_{} to sm_{newest}); use an NVRTC \
             of a CUDA version that supports this GPU (`pip install nvidia-cuda-nvrtc-cu12` \
             for GPUs CUDA 13 dropped)",
            supported.iter().copied().min().unwrap_or(0)
        ));
    };
    if nvrtc_newer {
        return Err(format!(
            "{nv} predates sm_{cc} (its newest is sm_{newest}), and its PTX is too new for \
             {drv} to compile; update the NVIDIA driver, or use an NVRTC that supports \
             sm_{cc}"
        ));
    }
    Ok(TargetChoice {
        target: Target::Ptx(arch),
        reason: format!(
            "PTX for compute_{arch}: {nv} predates sm_{cc} (its newest is sm_{newest}); {drv} \
             compiles it at load time"
        ),
    })
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

/// The compute capability of device `ordinal` as `major * 10 + minor` (needs cuInit).
fn compute_capability(ordinal: i32) -> Result<u32> {
    let dev = dres::device::get(ordinal).map_err(driver_error("cuDeviceGet"))?;
    let attr = |a| {
        // SAFETY: a valid device and attribute.
        unsafe { dres::device::get_attribute(dev, a) }.map_err(driver_error("cuDeviceGetAttribute"))
    };
    let major = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attr(dsys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Ok((major * 10 + minor) as u32)
}

/// [`choose_target`] for device `ordinal` with the loaded NVRTC and driver.
pub(super) fn target_of(ordinal: i32) -> Result<TargetChoice> {
    let cc = compute_capability(ordinal)?;
    let nvrtc = nvrtc_version().ok_or_else(|| Error::CudaUnavailable {
        reason: "NVRTC (libnvrtc.so.13 or libnvrtc.so.12) was not found".into(),
    })?;
    choose_target(nvrtc, driver_version(), cc, &supported_archs())
        .map_err(|reason| Error::CudaUnavailable { reason })
}

/// NVRTC (major, minor), when the library is present.
pub(super) fn nvrtc_version() -> Option<(i32, i32)> {
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

/// `cuDriverGetVersion` (e.g. 12040 for CUDA 12.4), when the driver library is present.
pub(super) fn driver_version() -> Option<i32> {
    // SAFETY: the presence probe only loads and unloads the library.
    if !unsafe { dsys::is_culib_present() } {
        return None;
    }
    let mut version: c_int = 0;
    // SAFETY: one out-parameter; allowed before cuInit.
    unsafe { dsys::cuDriverGetVersion(&mut version) }
        .result()
        .ok()
        .map(|()| version)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SM: [u32; 10] = [75, 80, 86, 87, 89, 90, 100, 103, 120, 121];
    const SM_12_4: [u32; 9] = [50, 52, 53, 60, 61, 62, 70, 72, 90];

    fn target(
        nvrtc: (i32, i32),
        driver: Option<i32>,
        cc: u32,
        supported: &[u32],
    ) -> std::result::Result<Target, String> {
        choose_target(nvrtc, driver, cc, supported).map(|c| c.target)
    }

    #[test]
    fn driver_versions_read_as_major_minor() {
        assert_eq!(cuda_version(12040), (12, 4));
        assert_eq!(cuda_version(12090), (12, 9));
        assert_eq!(cuda_version(13000), (13, 0));
        assert_eq!(cuda_version(13020), (13, 2));
    }

    #[test]
    fn a_device_nvrtc_knows_gets_a_cubin() {
        let c = choose_target((13, 0), Some(13020), 90, &SM).unwrap();
        assert_eq!(c.target, Target::Cubin(90));
        assert!(
            c.reason.contains("sm_90") && c.reason.contains("NVRTC 13.0"),
            "{}",
            c.reason
        );
        // An NVRTC older than the driver, even by a major version: backward compatibility.
        assert_eq!(
            target((12, 4), Some(13000), 90, &SM_12_4),
            Ok(Target::Cubin(90))
        );
        // The driver's version unknown: as before.
        assert_eq!(target((13, 0), None, 120, &SM), Ok(Target::Cubin(120)));
        // NVRTC lists nothing: the device's own architecture.
        assert_eq!(target((13, 0), Some(13000), 90, &[]), Ok(Target::Cubin(90)));
    }

    #[test]
    fn an_nvrtc_newer_than_the_driver_in_its_major_still_gives_cubins() {
        // CUDA minor version compatibility: a 12.8 CUBIN loads under a 12.4 driver.
        let c = choose_target((12, 8), Some(12040), 90, &SM).unwrap();
        assert_eq!(c.target, Target::Cubin(90));
        assert!(
            c.reason.contains("minor version compatibility"),
            "{}",
            c.reason
        );
        assert!(c.reason.contains("CUDA 12.4"), "{}", c.reason);
    }

    #[test]
    fn a_device_newer_than_nvrtc_gets_ptx_for_the_newest_arch_below_it() {
        let c = choose_target((12, 4), Some(12080), 100, &SM_12_4).unwrap();
        assert_eq!(c.target, Target::Ptx(90));
        assert!(
            c.reason.contains("compute_90") && c.reason.contains("sm_100"),
            "{}",
            c.reason
        );
        // Never an architecture above the device's: sm_87 gets compute_86, not compute_89.
        assert_eq!(
            target((12, 0), Some(12040), 87, &[80, 86, 89, 90]),
            Ok(Target::Ptx(86))
        );
        assert_eq!(target((12, 4), None, 120, &SM_12_4), Ok(Target::Ptx(90)));
    }

    #[test]
    fn ptx_of_an_nvrtc_newer_than_the_driver_is_refused() {
        // The PTX ISA of NVRTC 12.8 (8.7) is beyond a 12.4 driver's JIT (8.4).
        let e = target((12, 8), Some(12040), 100, &SM_12_4).unwrap_err();
        assert!(e.contains("PTX") && e.contains("CUDA 12.4"), "{e}");
    }

    #[test]
    fn an_nvrtc_of_a_newer_major_than_the_driver_is_refused_with_what_to_install() {
        let e = target((13, 0), Some(12090), 90, &SM).unwrap_err();
        assert!(e.contains("NVRTC 13.0") && e.contains("CUDA 12.9"), "{e}");
        assert!(e.contains("nvidia-cuda-nvrtc-cu12"), "{e}");
    }

    #[test]
    fn a_device_older_than_every_nvrtc_arch_is_refused() {
        // CUDA 13 dropped Volta.
        let e = target((13, 0), Some(13000), 70, &SM).unwrap_err();
        assert!(e.contains("sm_70") && e.contains("sm_75"), "{e}");
    }
}
