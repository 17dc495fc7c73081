//! Python entry points of anchors from tokens and of group ids from uid strings.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::errors::run;
use super::tensor::import_on;
use crate::dispatch;
use crate::op::anchors::FindAnchors;
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
            marker_tokens: marker_tokens.view()?,
            marker_offsets: marker_offsets.view()?,
            occurrence: occurrence.parse()?,
            offset,
        };
        dispatch::anchors::find_anchors(&inputs, &mut out.view()?, stream)
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
