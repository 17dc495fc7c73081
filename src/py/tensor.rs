//! DLPack import of torch tensors (zero-copy) into backend-free [`TensorRef`]s.

use std::ffi::c_void;

use dlpark::ffi::{DLDataType, DLDevice, DLDeviceType};
use dlpark::python::consumer::stream;
use dlpark::python::{DlpackStream, ImportedDlpack, StreamArg, from_dlpack};
use pyo3::prelude::*;

use crate::error::{Error, Result};
use crate::tensor::{DType, Device, TensorRef};

/// A tensor borrowed from Python through DLPack; its memory stays alive while this lives.
pub struct Borrowed {
    name: &'static str,
    owner: ImportedDlpack,
}

/// The stream our kernels run on (PyTorch's current stream, `CUstream` as an integer), as the
/// DLPack consumer stream: a producer working on the same stream needs no ordering at all.
struct ConsumerStream(usize);

// SAFETY: the handle is PyTorch's live current stream of the tensor's device, passed with the
// CUDA convention of the Python DLPack protocol.
unsafe impl DlpackStream for ConsumerStream {
    fn as_python_arg(&self, _py: Python<'_>, device: DLDevice) -> PyResult<StreamArg> {
        Ok(match device.device_type {
            DLDeviceType::CUDA => stream::cuda(self.0 as *mut c_void),
            _ => stream::none(),
        })
    }

    unsafe fn wait_for_producer(&self, _device: DLDevice, producer: *mut c_void) -> PyResult<bool> {
        // Same stream: already ordered. Otherwise the Python protocol orders the streams
        // (an event the consumer stream waits on; no host synchronisation).
        Ok(producer as usize == self.0)
    }
}

/// Imports `obj` (anything with `__dlpack__`) without copying.
pub fn import(obj: &Bound<'_, PyAny>, name: &'static str) -> PyResult<Borrowed> {
    import_on(obj, name, None)
}

/// [`import`] for a tensor our kernels will use on CUDA stream `stream`.
pub fn import_on(
    obj: &Bound<'_, PyAny>,
    name: &'static str,
    on: Option<usize>,
) -> PyResult<Borrowed> {
    let consumer = on.map(ConsumerStream);
    let consumer = consumer.as_ref().map(|s| s as &dyn DlpackStream);
    let owner = from_dlpack(obj.as_borrowed(), consumer, None).map_err(|e| {
        super::errors::to_pyerr(
            obj.py(),
            Error::value(name, "a tensor exchangeable through DLPack", e.to_string()),
        )
    })?;
    Ok(Borrowed { name, owner })
}

/// [`import_on`] for optional arguments.
pub fn import_opt_on(
    obj: Option<&Bound<'_, PyAny>>,
    name: &'static str,
    on: Option<usize>,
) -> PyResult<Option<Borrowed>> {
    obj.map(|o| import_on(o, name, on)).transpose()
}

/// [`Borrowed::view`] for optional arguments.
pub fn view_opt(b: &Option<Borrowed>) -> Result<Option<TensorRef<'_>>> {
    b.as_ref().map(Borrowed::view).transpose()
}

impl Borrowed {
    /// The validated view: dtype, device, sizes and strides checked and converted.
    pub fn view(&self) -> Result<TensorRef<'_>> {
        let bad = |what: &str| Error::value(self.name, "a valid DLPack tensor", what.to_string());
        let t = self.owner.validate().map_err(|e| bad(&e.to_string()))?;
        let dtype = dtype_of(t.dtype()).ok_or_else(|| Error::Dtype {
            arg: self.name,
            expected: "bool, uint8, int32, int64, float16, bfloat16, float32 or float64".into(),
            got: describe(t.dtype()),
        })?;
        let device = match t.device().device_type {
            DLDeviceType::CPU => Device::Cpu,
            DLDeviceType::CUDA => Device::Cuda(t.device().device_id),
            other => {
                return Err(Error::Device {
                    arg: self.name,
                    expected: "cpu or cuda".into(),
                    got: format!("DLPack device type {}", other.0),
                });
            }
        };
        let shape: Vec<usize> = t.shape().iter().map(|&s| s as usize).collect();
        let strides: Vec<isize> = t
            .strides_or_compact()
            .map_err(|e| bad(&e.to_string()))?
            .iter()
            .map(|&s| s as isize)
            .collect();
        // SAFETY: validate() checked the descriptor; byte_offset is added to the base
        // pointer exactly as DLPack specifies and nothing is dereferenced here.
        let ptr = unsafe { (t.data_ptr() as *mut u8).add(t.byte_offset() as usize) };
        // SAFETY: the producer (torch) guarantees every element addressed by shape and
        // strides lies in its allocation, which `self.owner` keeps alive for '_.
        Ok(unsafe { TensorRef::from_raw_parts(self.name, ptr, dtype, device, shape, strides) })
    }
}

/// A DLPack dtype in the words PyTorch uses (`int16`, `complex64`, ...).
fn describe(d: DLDataType) -> String {
    let kind = match d.code.0 {
        0 => "int",
        1 => "uint",
        2 => "float",
        4 => "bfloat",
        5 => "complex",
        6 => "bool",
        code => return format!("DLPack dtype code {code} of {} bits", d.bits),
    };
    let lanes = if d.lanes == 1 {
        String::new()
    } else {
        format!(" x{}", d.lanes)
    };
    format!("{kind}{}{lanes}", d.bits)
}

fn dtype_of(d: DLDataType) -> Option<DType> {
    if d.lanes != 1 {
        return None;
    }
    let table = [
        (DLDataType::BOOL, DType::Bool),
        (DLDataType::U8, DType::U8),
        (DLDataType::I32, DType::I32),
        (DLDataType::I64, DType::I64),
        (DLDataType::F16, DType::F16),
        (DLDataType::BF16, DType::BF16),
        (DLDataType::F32, DType::F32),
        (DLDataType::F64, DType::F64),
    ];
    table.iter().find(|(dl, _)| *dl == d).map(|(_, ours)| *ours)
}

/// Writes `vals` into a contiguous float32/float64 output.
pub fn write_floats(out: &mut TensorRef, vals: impl ExactSizeIterator<Item = f64>) -> Result<()> {
    if out.numel() < vals.len() {
        return Err(Error::shape(
            out.name(),
            format!("at least {} elements", vals.len()),
            out.shape(),
        ));
    }
    match out.dtype() {
        // SAFETY (both arms): outputs are fresh tensors allocated for this call.
        DType::F64 => unsafe { out.as_mut_slice::<f64>()? }
            .iter_mut()
            .zip(vals)
            .for_each(|(o, v)| *o = v),
        _ => unsafe { out.as_mut_slice::<f32>()? }
            .iter_mut()
            .zip(vals)
            .for_each(|(o, v)| *o = v as f32),
    }
    Ok(())
}
