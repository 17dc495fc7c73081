//! The kernels a compiled image defines, read from the image itself: the `.entry` directives
//! of PTX, or the entry symbols in a CUBIN's ELF symbol table. The driver resolves every one
//! when it loads a module, so no list of kernel names is kept anywhere.

use super::target::Target;

/// The kernels (entry functions) of a compiled image, in the image's order: the `.entry`
/// directives of PTX, or the symbols a CUBIN marks as entries (`STT_FUNC`, global, with
/// `STO_CUDA_ENTRY` in `st_other`). Read from the very image the driver loads, so every kernel
/// of every dtype is found whatever macro in `kernels/` defined it, with no list to keep in
/// sync; `Err` says why the image could not be read.
pub fn image_kernels(image: &[u8], target: Target) -> std::result::Result<Vec<String>, String> {
    let names = match target {
        Target::Ptx(_) => ptx_entries(image),
        Target::Cubin(_) => cubin_entries(image)?,
    };
    if names.is_empty() {
        return Err(format!("the {} image defines no kernel", target.kind()));
    }
    Ok(names)
}

/// `NAME` of every `[.visible|.weak] .entry NAME(` line of PTX text.
fn ptx_entries(ptx: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(ptx)
        .lines()
        .filter(|line| line.trim_start().starts_with('.'))
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|&w| w == ".entry")?;
            let name = words.next()?.split('(').next()?;
            (!name.is_empty()).then(|| name.to_owned())
        })
        .collect()
}

/// `st_other` flag of CUDA kernel entry symbols in a CUBIN.
const STO_CUDA_ENTRY: u8 = 0x10;

/// The entry symbols of a CUBIN (a little-endian ELF64 file).
fn cubin_entries(elf: &[u8]) -> std::result::Result<Vec<String>, String> {
    let bad = |what: &str| format!("the CUBIN is not a readable ELF64 file ({what})");
    let bytes = |at: usize, n: usize| {
        at.checked_add(n)
            .and_then(|end| elf.get(at..end))
            .ok_or_else(|| bad("truncated"))
    };
    let u16_at = |at| bytes(at, 2).map(|b| u16::from_le_bytes(b.try_into().unwrap()) as usize);
    let u32_at = |at| bytes(at, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    let u64_at = |at| bytes(at, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    if bytes(0, 6)? != b"\x7fELF\x02\x01" {
        return Err(bad("not ELF64 little-endian"));
    }
    let (shoff, shentsize, shnum) = (u64_at(0x28)?, u16_at(0x3a)?, u16_at(0x3c)?);
    if shentsize < 0x40 {
        return Err(bad("section header size"));
    }
    // (type, offset, size, link, entry size) of section `i`.
    let section = |i: usize| -> std::result::Result<_, String> {
        let at = shoff.saturating_add(i.saturating_mul(shentsize));
        Ok((
            u32_at(at.saturating_add(4))?,
            u64_at(at.saturating_add(0x18))?,
            u64_at(at.saturating_add(0x20))?,
            u32_at(at.saturating_add(0x28))?,
            u64_at(at.saturating_add(0x38))?,
        ))
    };
    const SHT_SYMTAB: usize = 2;
    let mut names = Vec::new();
    for i in 0..shnum {
        let (kind, offset, size, link, entsize) = section(i)?;
        if kind != SHT_SYMTAB {
            continue;
        }
        if entsize < 24 || link >= shnum {
            return Err(bad("symbol table"));
        }
        let (_, str_offset, str_size, _, _) = section(link)?;
        let strings = bytes(str_offset, str_size)?;
        for s in 0..size / entsize {
            let sym = bytes(offset.saturating_add(s.saturating_mul(entsize)), 24)?;
            let (info, other) = (sym[4], sym[5]);
            let (function, global) = (info & 0xf == 2, info >> 4 == 1);
            if !(function && global && other & STO_CUDA_ENTRY != 0) {
                continue;
            }
            let start = u32::from_le_bytes(sym[..4].try_into().unwrap()) as usize;
            let name = strings
                .get(start..)
                .and_then(|t| t.split(|&b| b == 0).next())
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad("symbol name"))?;
            names.push(String::from_utf8_lossy(name).into_owned());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::Family;
    use crate::cuda::compile::nvrtc_image;
    use crate::cuda::target::nvrtc_version;

    #[test]
    fn ptx_entries_are_the_entry_directives() {
        let ptx = b"//\n// .entry in_a_comment(\n.version 9.0\n.target sm_80\n\
            .visible .entry first_f32(\n\t.param .align 8 .b8 first_f32_param_0[96]\n)\n{\n}\n\
            .func (.param .b32 r) helper(\n)\n.weak .entry second (\n)\n.entry third()\n\0";
        assert_eq!(ptx_entries(ptx), ["first_f32", "second", "third"]);
        assert!(image_kernels(b".version 9.0\n\0", Target::Ptx(80)).is_err());
    }

    /// A little-endian ELF64 file with one symbol table of `(name, st_info, st_other)`.
    fn elf_with_symbols(symbols: &[(&str, u8, u8)]) -> Vec<u8> {
        let mut strtab = vec![0u8];
        let mut symtab = vec![0u8; 24];
        for (name, info, other) in symbols {
            let mut sym = [0u8; 24];
            sym[..4].copy_from_slice(&(strtab.len() as u32).to_le_bytes());
            (sym[4], sym[5]) = (*info, *other);
            symtab.extend_from_slice(&sym);
            strtab.extend_from_slice(name.as_bytes());
            strtab.push(0);
        }
        let (strtab_at, symtab_at) = (0x40, 0x40 + strtab.len());
        let shoff = symtab_at + symtab.len();
        let mut elf = vec![0u8; 0x40];
        elf[..6].copy_from_slice(b"\x7fELF\x02\x01");
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&0x40u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf.extend_from_slice(&strtab);
        elf.extend_from_slice(&symtab);
        let header = |kind: u32, offset: usize, size: usize, link: u32, entsize: u64| {
            let mut h = [0u8; 0x40];
            h[4..8].copy_from_slice(&kind.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&(offset as u64).to_le_bytes());
            h[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            h[0x28..0x2c].copy_from_slice(&link.to_le_bytes());
            h[0x38..0x40].copy_from_slice(&entsize.to_le_bytes());
            h
        };
        elf.extend_from_slice(&header(0, 0, 0, 0, 0));
        elf.extend_from_slice(&header(3, strtab_at, strtab.len(), 0, 0));
        elf.extend_from_slice(&header(2, symtab_at, symtab.len(), 1, 24));
        elf
    }

    #[test]
    fn cubin_entries_are_the_global_functions_marked_as_entries() {
        const GLOBAL_FUNC: u8 = 0x12;
        let elf = elf_with_symbols(&[
            (".text.kernel_f16", 0x03, 0),          // section symbol
            ("$__internal_0_$__cuda_div", 0x02, 0), // local function
            ("kernel_f16", GLOBAL_FUNC, STO_CUDA_ENTRY),
            ("a_device_function", GLOBAL_FUNC, 0), // not an entry
            ("kernel_f32", GLOBAL_FUNC, STO_CUDA_ENTRY),
            ("an_object", 0x11, STO_CUDA_ENTRY),
        ]);
        assert_eq!(
            image_kernels(&elf, Target::Cubin(90)),
            Ok(vec!["kernel_f16".to_owned(), "kernel_f32".to_owned()])
        );
        for len in [0, 5, 0x40, elf.len() - 1] {
            assert!(cubin_entries(&elf[..len]).is_err(), "cut at {len}");
        }
        assert!(image_kernels(b"not an ELF file at all", Target::Cubin(90)).is_err());
        assert!(image_kernels(&elf_with_symbols(&[]), Target::Cubin(90)).is_err());
    }

    /// On the images NVRTC produces: the CUBIN's entry symbols are the PTX's entries, every
    /// dtype of the templated kernels the launch code names is there, and no name is in two
    /// families (the handle cache is keyed by name per device); with the emulation build,
    /// every one is also a kernel it registered. Needs NVRTC on the loader path (e.g.
    /// `LD_LIBRARY_PATH=.../site-packages/nvidia/cu13/lib`); skipped without.
    #[test]
    fn the_kernels_of_nvrtc_images_are_every_kernel_of_the_sources() {
        if nvrtc_version().is_none() {
            eprintln!("skipped: NVRTC is not on the loader path");
            return;
        }
        let mut all = Vec::new();
        for family in Family::ALL {
            let names = |target| {
                let image = nvrtc_image(family, &family.program(), target).unwrap();
                let mut names = image_kernels(&image, target).unwrap();
                names.sort();
                names
            };
            let cubin = names(Target::Cubin(80));
            assert_eq!(cubin, names(Target::Ptx(80)), "{}", family.file());
            all.extend(cubin);
        }
        let distinct: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
        use crate::tensor::DType;
        for name in ["scatter_add_rows", "policy_forward", "align_backward"] {
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let kernel = format!("{name}_{}", super::super::suffix(dtype));
                assert!(all.contains(&kernel), "{kernel} not in {all:?}");
            }
        }
        #[cfg(feature = "emulation")]
        for name in &all {
            let empty = super::super::Grid { blocks: [0, 1, 1] };
            super::super::emulated::launch(name, empty, std::ptr::null())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}
