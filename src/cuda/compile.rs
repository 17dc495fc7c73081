//! Compiling an op family's program with NVRTC to the image (CUBIN or PTX) a device loads,
//! through the on-disk cache of `disk_cache.rs`, and compiling afresh, once, when an image
//! taken from that cache does not load.

use std::ffi::{CString, c_char};
use std::path::PathBuf;

use cudarc::nvrtc::{result as nres, sys as nsys};

use super::Family;
use super::disk_cache::{
    CACHE_HEADER, cache_dir, cache_key, decode_cached, encode_cached, write_atomically,
};
use super::target::{Target, nvrtc_version};
use crate::error::{Error, Result};

/// A compiled image; `cached` is the cache file it was read from, if it was.
pub(super) struct Image {
    bytes: Vec<u8>,
    cached: Option<PathBuf>,
}

/// Compiles `family` for `target` through the on-disk cache (read only when `read_cache`;
/// a fresh image is always written to it). A cache file that does not validate is compiled
/// afresh and replaced; a cache that cannot be written costs a compile next time, never the
/// op. Needs NVRTC, not a GPU.
pub(super) fn image(family: Family, target: Target, read_cache: bool) -> Result<Image> {
    let version = nvrtc_version().ok_or_else(|| Error::CudaUnavailable {
        reason: "NVRTC (libnvrtc.so.13 or libnvrtc.so.12) was not found".into(),
    })?;
    let path = cache_dir().map(|d| d.join(cache_key(family, target, version)));
    if read_cache
        && let Some(path) = &path
        && let Ok(mut file) = std::fs::read(path)
        && let Ok(image) = decode_cached(&file)
    {
        let len = image.len();
        file.drain(..CACHE_HEADER);
        file.truncate(len);
        return Ok(Image {
            bytes: file,
            cached: Some(path.clone()),
        });
    }
    let bytes = nvrtc_image(family, &family.program(), target)?;
    if let Some(path) = &path {
        let _ = write_atomically(path, &encode_cached(&bytes));
    }
    Ok(Image {
        bytes,
        cached: None,
    })
}

/// Compiles `family` for `target` through the on-disk cache, keyed by a hash of the program
/// and the options, the target and the NVRTC version. Needs NVRTC, not a GPU.
pub fn compile_image(family: Family, target: Target) -> Result<Vec<u8>> {
    image(family, target, true).map(|i| i.bytes)
}

/// Loads the image `image(true)` gives; when that image came from the disk cache and does not
/// load (a file damaged in a way its hash cannot see, or written by a setup the driver does not
/// accept), removes the file and loads a fresh compile (`image(false)`), once.
pub(super) fn load_or_recompile<M>(
    mut image: impl FnMut(bool) -> Result<Image>,
    mut load: impl FnMut(&[u8]) -> Result<M>,
) -> Result<M> {
    let first = image(true)?;
    match (load(&first.bytes), first.cached) {
        (Ok(loaded), _) => Ok(loaded),
        (Err(_), Some(path)) => {
            let _ = std::fs::remove_file(path);
            load(&image(false)?.bytes)
        }
        (Err(e), None) => Err(e),
    }
}

pub(super) fn nvrtc_image(family: Family, program: &str, target: Target) -> Result<Vec<u8>> {
    let arch = target.arch();
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::cuda::disk_cache::tests::TempDir;

    fn image_of(bytes: &[u8], cached: Option<&Path>) -> Result<Image> {
        Ok(Image {
            bytes: bytes.to_vec(),
            cached: cached.map(Path::to_path_buf),
        })
    }

    fn load_error() -> Error {
        Error::Kernel {
            op: "test",
            message: "cannot load".into(),
        }
    }

    #[test]
    fn a_cached_image_that_does_not_load_is_removed_and_compiled_afresh_once() {
        let dir = TempDir::new("reload");
        let path = dir.0.join("k.cubin");
        std::fs::write(&path, b"bad").unwrap();
        let mut asked = Vec::new();
        let loaded = load_or_recompile(
            |read| {
                asked.push(read);
                if read {
                    image_of(b"bad", Some(&path))
                } else {
                    image_of(b"good", None)
                }
            },
            |bytes| {
                if bytes == b"good" {
                    Ok(1)
                } else {
                    Err(load_error())
                }
            },
        );
        assert_eq!(loaded.unwrap(), 1);
        assert_eq!(asked, [true, false]);
        assert!(!path.exists());
    }

    #[test]
    fn a_fresh_image_that_does_not_load_is_an_error_without_retry() {
        let mut asked = Vec::new();
        let mut loads = 0;
        let loaded: Result<()> = load_or_recompile(
            |read| {
                asked.push(read);
                image_of(b"fresh", None)
            },
            |_| {
                loads += 1;
                Err(load_error())
            },
        );
        assert!(loaded.is_err());
        assert_eq!((asked.as_slice(), loads), ([true].as_slice(), 1));
        // A cached one retried once, and the second failure is the answer.
        let (mut asked, mut loads) = (0, 0);
        let loaded: Result<()> = load_or_recompile(
            |_| {
                asked += 1;
                image_of(b"cached", Some(Path::new("/nonexistent/k.cubin")))
            },
            |_| {
                loads += 1;
                Err(load_error())
            },
        );
        assert!(loaded.is_err());
        assert_eq!((asked, loads), (2, 2));
    }
}
