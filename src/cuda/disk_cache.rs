//! The on-disk cache of compiled kernel images: where it lives (`HIDDEN_ALIGN_CACHE_DIR`, else
//! the user's cache directory), the name of each file (a hash of the program and the options,
//! the target and the NVRTC version), the file format (a header with the image's length and
//! hash, so a truncated or overwritten file is detected), and writes that are atomic and safe
//! for many processes and machines sharing the directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Family;
use super::target::Target;

/// FNV-1a: a stable 64-bit hash (the program text in the cache key, the image in the cache
/// file's header).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Directory of compiled kernels: `HIDDEN_ALIGN_CACHE_DIR` (empty: no disk cache), else
/// `$XDG_CACHE_HOME/hidden_align` or `~/.cache/hidden_align`.
pub(super) fn cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HIDDEN_ALIGN_CACHE_DIR") {
        return (!dir.is_empty()).then(|| dir.into());
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("hidden_align"))
}

/// First bytes of a cache file.
const CACHE_MAGIC: [u8; 8] = *b"HAKERNEL";
/// Layout version of the cache file.
const CACHE_FORMAT: u32 = 1;
/// Magic (8 bytes), format (u32), reserved (u32, 0), image length (u64), FNV-1a of the image
/// (u64); little-endian; then the image.
pub(super) const CACHE_HEADER: usize = 32;

/// The cache file of `image`: the header, then the image.
pub(super) fn encode_cached(image: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(CACHE_HEADER + image.len());
    file.extend_from_slice(&CACHE_MAGIC);
    file.extend_from_slice(&CACHE_FORMAT.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&(image.len() as u64).to_le_bytes());
    file.extend_from_slice(&fnv1a(image).to_le_bytes());
    file.extend_from_slice(image);
    file
}

/// The image in a cache file, or why the file is not a whole one (truncated, overwritten, of
/// another format or an older release, which wrote bare images).
pub(super) fn decode_cached(file: &[u8]) -> std::result::Result<&[u8], &'static str> {
    let (header, image) = file
        .split_at_checked(CACHE_HEADER)
        .ok_or("shorter than the header")?;
    let u32_at = |i: usize| u32::from_le_bytes(header[i..i + 4].try_into().unwrap());
    let u64_at = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().unwrap());
    if header[..8] != CACHE_MAGIC {
        return Err("not a hidden_align kernel cache file");
    }
    if u32_at(8) != CACHE_FORMAT {
        return Err("another cache format");
    }
    if u64_at(16) != image.len() as u64 {
        return Err("the image has the wrong length (truncated?)");
    }
    if image.is_empty() {
        return Err("an empty image");
    }
    if u64_at(24) != fnv1a(image) {
        return Err("the image does not match its hash");
    }
    Ok(image)
}

/// This machine's name for temporary file names, reduced to `[A-Za-z0-9_-]`.
fn host_name() -> &'static str {
    static HOST: OnceLock<String> = OnceLock::new();
    HOST.get_or_init(|| {
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .or_else(|| std::env::var("COMPUTERNAME").ok())
            .unwrap_or_default();
        let name: String = name
            .trim()
            .chars()
            .map(|c| match c {
                'A'..='Z' | 'a'..='z' | '0'..='9' | '-' | '_' => c,
                _ => '_',
            })
            .take(64)
            .collect();
        if name.is_empty() { "host".into() } else { name }
    })
}

/// A temporary name beside `path`, unique across threads, processes and machines sharing the
/// directory: host name, process id, a per-process counter and a random nonce (std's
/// `RandomState` is seeded from the OS). It ends in `.tmp`, never a cache key's extension.
fn temp_path(path: &Path) -> PathBuf {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    if let Ok(t) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(t.as_nanos());
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let unique = format!(
        "{name}.{}-{}-{n}-{:016x}.tmp",
        host_name(),
        std::process::id(),
        h.finish()
    );
    path.with_file_name(unique)
}

/// Writes `contents` to `path` whole or not at all: into a new temporary file of its own in
/// the same directory, then renamed over `path` (atomic on POSIX file systems), so a reader
/// sees the old file or the new one. The temporary file is created exclusively, so another
/// writer's is never touched, and it is removed when anything fails.
pub(super) fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = temp_path(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    let written = file.write_all(contents);
    drop(file);
    let renamed = written.and_then(|()| std::fs::rename(&tmp, path));
    if renamed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    renamed
}

/// The cache file name of `family` for `target`: a hash of the program and the options, the
/// target and the NVRTC version.
pub(super) fn cache_key(family: Family, target: Target, (major, minor): (i32, i32)) -> String {
    let program = format!("{}\n{:?}", family.program(), super::NVRTC_OPTIONS);
    format!(
        "{}-{:016x}-{}-nvrtc{major}.{minor}.{}",
        family.file().trim_end_matches(".cu"),
        fnv1a(program.as_bytes()),
        target.arch(),
        target.kind()
    )
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn a_whole_cache_file_gives_its_image() {
        let image: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = encode_cached(&image);
        assert_eq!(file.len(), CACHE_HEADER + image.len());
        assert_eq!(decode_cached(&file), Ok(image.as_slice()));
    }

    #[test]
    fn a_truncated_cache_file_is_rejected() {
        let image = vec![7u8; 500];
        let file = encode_cached(&image);
        for len in [
            0,
            1,
            CACHE_HEADER - 1,
            CACHE_HEADER,
            CACHE_HEADER + 1,
            file.len() - 1,
        ] {
            assert!(decode_cached(&file[..len]).is_err(), "cut at {len}");
        }
        // Bytes appended (another writer's longer file over a shorter one) too.
        let mut longer = file.clone();
        longer.push(0);
        assert!(decode_cached(&longer).is_err());
    }

    #[test]
    fn a_cache_file_whose_image_does_not_match_its_hash_is_rejected() {
        let image = b"a kernel image".repeat(40);
        let mut file = encode_cached(&image);
        let middle = CACHE_HEADER + image.len() / 2;
        file[middle] ^= 0x10;
        assert_eq!(
            decode_cached(&file),
            Err("the image does not match its hash")
        );
    }

    #[test]
    fn a_file_of_another_kind_or_format_is_rejected() {
        let image = b"\x7fELF and the rest of a cubin".repeat(10);
        // What earlier releases wrote: the bare image.
        assert!(decode_cached(&image).is_err());
        let mut file = encode_cached(&image);
        file[0] = b'X';
        assert_eq!(
            decode_cached(&file),
            Err("not a hidden_align kernel cache file")
        );
        let mut file = encode_cached(&image);
        file[8] = 2;
        assert_eq!(decode_cached(&file), Err("another cache format"));
        assert!(decode_cached(&encode_cached(&[])).is_err());
    }

    #[test]
    fn temporary_names_are_unique_and_beside_the_target() {
        let target = Path::new("/cache/rows-0123-sm_90-nvrtc13.0.cubin");
        let names: Vec<PathBuf> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..500).map(|_| temp_path(target)).collect::<Vec<_>>()))
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), names.len());
        let pid = format!("-{}-", std::process::id());
        for name in &names {
            assert_eq!(name.parent(), target.parent());
            let file = name.file_name().unwrap().to_str().unwrap();
            assert!(
                file.starts_with("rows-0123-sm_90-nvrtc13.0.cubin."),
                "{file}"
            );
            assert!(file.contains(host_name()) && file.contains(&pid), "{file}");
            assert!(file.ends_with(".tmp"), "{file}");
        }
    }

    /// A fresh directory under the system's temporary one, removed on drop.
    pub(in crate::cuda) struct TempDir(pub(in crate::cuda) PathBuf);

    impl TempDir {
        pub(in crate::cuda) fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "hidden-align-{name}-{}-{:x}",
                std::process::id(),
                fnv1a(temp_path(Path::new("x")).as_os_str().as_encoded_bytes())
            ));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn entries(&self) -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            names
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn atomic_writes_replace_the_file_and_leave_nothing_else() {
        let dir = TempDir::new("write");
        let path = dir.0.join("sub").join("k.cubin");
        write_atomically(&path, b"first").unwrap();
        write_atomically(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert_eq!(
            std::fs::read_dir(dir.0.join("sub")).unwrap().count(),
            1,
            "temporary files left"
        );
        // A directory that cannot hold the file: an error, and nothing left behind.
        let blocked = dir.0.join("k.cubin");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"").unwrap();
        assert!(write_atomically(&blocked, b"x").is_err());
        assert_eq!(dir.entries(), ["k.cubin", "sub"]);
    }
}
