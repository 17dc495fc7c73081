//! Python entry points of anchors from tokens and of group ids from uid strings.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::errors::run;
use super::tensor::import_on;
use crate::dispatch;
use crate::op::anchors::{FindAnchors, Markers, TextMarkers};
use crate::op::groups::uid_group_id;
use crate::tensor::{DType, Device};

/// Fills `out` (int64 `[B]`) with the anchor of each row of `token_ids`; the markers come as
/// `marker_tokens` (int64, every spelling one after another) and `marker_offsets` (int64
/// `[M + 1]`).
#[pyfunction]
#[pyo3(signature = (token_ids, response_mask, marker_tokens, marker_offsets, occurrence,
                    offset, out, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn find_anchors(
    py: Python<'_>,
    token_ids: &Bound<'_, PyAny>,
    response_mask: &Bound<'_, PyAny>,
    marker_tokens: &Bound<'_, PyAny>,
    marker_offsets: &Bound<'_, PyAny>,
    occurrence: &str,
    offset: i64,
    out: &Bound<'_, PyAny>,
    stream: Option<usize>,
) -> PyResult<()> {
    let token_ids = import_on(token_ids, "token_ids", stream)?;
    let response_mask = import_on(response_mask, "response_mask", stream)?;
    let marker_tokens = import_on(marker_tokens, "marker_tokens", stream)?;
    let marker_offsets = import_on(marker_offsets, "marker_offsets", stream)?;
    let out = import_on(out, "out", stream)?;
    let occurrence = occurrence.to_owned();
    run(py, "hidden_align.find_anchors", move || {
        let inputs = FindAnchors {
            token_ids: token_ids.view()?,
            response_mask: response_mask.view()?,
            markers: Markers::Tokens {
                tokens: marker_tokens.view()?,
                offsets: marker_offsets.view()?,
            },
            occurrence: occurrence.parse()?,
            offset,
        };
        dispatch::anchors::find_anchors(&inputs, &mut out.view()?, stream)
    })
}

/// Fills `out` (int64 `[B]`) with the anchor of each row of `token_ids`, the markers given as
/// texts: `marker_bytes` / `marker_offsets` (uint8, int64 `[M + 1]`), matched on the bytes of
/// the vocabulary (`vocab_bytes` uint8, `vocab_offsets` int64 `[V + 1]`) through the per-token
/// filter `token_starts` (uint8 `[V]`, from [`text_marker_starts`]).
#[pyfunction]
#[pyo3(signature = (token_ids, response_mask, vocab_bytes, vocab_offsets, token_starts,
                    marker_bytes, marker_offsets, occurrence, offset, out, stream=None))]
#[allow(clippy::too_many_arguments)]
pub fn find_text_anchors(
    py: Python<'_>,
    token_ids: &Bound<'_, PyAny>,
    response_mask: &Bound<'_, PyAny>,
    vocab_bytes: &Bound<'_, PyAny>,
    vocab_offsets: &Bound<'_, PyAny>,
    token_starts: &Bound<'_, PyAny>,
    marker_bytes: &Bound<'_, PyAny>,
    marker_offsets: &Bound<'_, PyAny>,
    occurrence: &str,
    offset: i64,
    out: &Bound<'_, PyAny>,
    stream: Option<usize>,
) -> PyResult<()> {
    let token_ids = import_on(token_ids, "token_ids", stream)?;
    let response_mask = import_on(response_mask, "response_mask", stream)?;
    let vocab_bytes = import_on(vocab_bytes, "vocab_bytes", stream)?;
    let vocab_offsets = import_on(vocab_offsets, "vocab_offsets", stream)?;
    let token_starts = import_on(token_starts, "token_starts", stream)?;
    let marker_bytes = import_on(marker_bytes, "marker_bytes", stream)?;
    let marker_offsets = import_on(marker_offsets, "marker_offsets", stream)?;
    let out = import_on(out, "out", stream)?;
    let occurrence = occurrence.to_owned();
    run(py, "hidden_align.find_anchors", move || {
        let inputs = FindAnchors {
            token_ids: token_ids.view()?,
            response_mask: response_mask.view()?,
            markers: Markers::Text(TextMarkers {
                vocab_bytes: vocab_bytes.view()?,
                vocab_offsets: vocab_offsets.view()?,
                token_starts: token_starts.view()?,
                marker_bytes: marker_bytes.view()?,
                marker_offsets: marker_offsets.view()?,
            }),
            occurrence: occurrence.parse()?,
            offset,
        };
        dispatch::anchors::find_anchors(&inputs, &mut out.view()?, stream)
    })
}

/// Fills `out` (uint8 `[V]`, CPU) with 1 for each token of the vocabulary inside which one of
/// the marker texts can start, 0 elsewhere; every input a contiguous 1-d CPU tensor.
#[pyfunction]
pub fn text_marker_starts(
    py: Python<'_>,
    vocab_bytes: &Bound<'_, PyAny>,
    vocab_offsets: &Bound<'_, PyAny>,
    marker_bytes: &Bound<'_, PyAny>,
    marker_offsets: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let vocab_bytes = import_on(vocab_bytes, "vocab_bytes", None)?;
    let vocab_offsets = import_on(vocab_offsets, "vocab_offsets", None)?;
    let marker_bytes = import_on(marker_bytes, "marker_bytes", None)?;
    let marker_offsets = import_on(marker_offsets, "marker_offsets", None)?;
    let out = import_on(out, "out", None)?;
    run(py, "hidden_align.text_markers", move || {
        dispatch::anchors::text_marker_starts(
            &vocab_bytes.view()?,
            &vocab_offsets.view()?,
            &marker_bytes.view()?,
            &marker_offsets.view()?,
            &mut out.view()?,
        )
    })
}

/// Writes the stable group id of each uid of `uids` (any iterable: a numpy object array, a
/// list; bytes are hashed as they are, other items that are not strings go through `str()`)
/// into `out` (int64 `[len]`, CPU, contiguous).
///
/// verl repeats each prompt's uid object for its rollouts (`np.repeat` of an object array), so
/// an object seen before reuses its id: each distinct object is read and hashed once. Every
/// item is kept alive until the end, so no address can be reused by another object meanwhile.
/// Runs with the GIL held: reading the strings needs it, and the whole call is short.
#[pyfunction]
pub fn uid_group_ids(
    py: Python<'_>,
    uids: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
) -> PyResult<()> {
    let out = import_on(out, "out", None)?;
    let mut alive = Vec::new();
    let mut seen: HashMap<usize, i64, BuildHasherDefault<AddressHasher>> = HashMap::default();
    let mut ids = Vec::new();
    for item in uids.try_iter()? {
        let item = item?;
        let address = item.as_ptr() as usize;
        let id = match seen.get(&address) {
            Some(&id) => id,
            None => {
                let id = if let Ok(s) = item.cast_exact::<PyString>() {
                    uid_group_id(s.to_cow()?.as_bytes())
                } else if let Ok(b) = item.cast::<PyBytes>() {
                    // bytes uids (a numpy `S` array) are their own encoding.
                    uid_group_id(b.as_bytes())
                } else {
                    uid_group_id(item.str()?.to_cow()?.as_bytes())
                };
                seen.insert(address, id);
                alive.push(item);
                id
            }
        };
        ids.push(id);
    }
    run(py, "hidden_align.dapo.group_ids_from_uids", move || {
        let mut out = out.view()?;
        crate::cuda::expect_buffer(&out, &[ids.len()], DType::I64)?;
        out.expect_device(Device::Cpu)?;
        // SAFETY: out is a fresh output owned by this call.
        unsafe { out.as_mut_slice::<i64>()? }.copy_from_slice(&ids);
        Ok(())
    })
}

/// Hashes an object address in one multiplication: addresses are distinct by construction, so
/// a keyed hash (the default SipHash) would only cost time.
#[derive(Default)]
struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, address: usize) {
        // Fibonacci hashing; the low bits of an address are always zero, the high bits of the
        // product are not.
        self.0 = (address as u64)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(32);
    }
}
