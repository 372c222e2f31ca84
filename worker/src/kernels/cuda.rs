//! Launching Loft's PTX kernels on candle's CUDA device (the `cuda` feature).
//!
//! Arguments go to a kernel as raw device pointers into contiguous tensors. The tensors are
//! kept alive by the caller until the launch is queued; candle frees memory in stream order on
//! its one stream, so a buffer dropped after the launch is not reused before the kernel ran.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{bail, DType, Device, Result, Storage, Tensor};

pub(crate) const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
pub(crate) const OPTIM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
pub(crate) const LOWRANK_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/lowrank.ptx"));
pub(crate) const CAYLEY_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cayley.ptx"));
pub(crate) const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// One kernel argument.
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

pub(crate) fn device(t: &Tensor) -> Result<CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => bail!("a kernel got a tensor on {other:?}, not on a CUDA device"),
    }
}

/// The device address of a contiguous CUDA tensor's first element.
pub(crate) fn ptr(t: &Tensor) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        bail!("a kernel argument must be contiguous (shape {:?})", t.dims());
    }
    let Storage::Cuda(cuda) = &*storage else { bail!("a kernel argument is not on a CUDA device") };
    let stream = cuda.device().cuda_stream();
    let base = match t.dtype() {
        DType::F32 => cuda.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::F16 => cuda.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::BF16 => cuda.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0,
        DType::U8 => cuda.as_cuda_slice::<u8>()?.device_ptr(&stream).0,
        DType::U32 => cuda.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        DType::I64 => cuda.as_cuda_slice::<i64>()?.device_ptr(&stream).0,
        DType::F64 => cuda.as_cuda_slice::<f64>()?.device_ptr(&stream).0,
        other => bail!("no kernel takes {other:?} tensors"),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// A kernel's name suffix for an element type.
pub(crate) fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("no kernel takes {other:?} tensors"),
    })
}

/// Launches `name` from the PTX module `module` on `dev`'s stream.
pub(crate) fn launch(dev: &CudaDevice, module: &str, ptx: &'static str, name: &str, grid: (u32, u32, u32), block: (u32, u32, u32), args: &[Arg]) -> Result<()> {
    if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
        return Ok(()); // nothing to do (CUDA refuses an empty grid)
    }
    let func = dev.get_or_load_custom_func(name, module, ptx)?;
    let mut builder = func.builder();
    for arg in args {
        match arg {
            Arg::Ptr(p) => builder.arg(p),
            Arg::I32(v) => builder.arg(v),
            Arg::I64(v) => builder.arg(v),
            Arg::F32(v) => builder.arg(v),
        };
    }
    // SAFETY: the arguments match the kernel's parameters (each caller mirrors its .cu
    // signature), and the pointers address live, contiguous buffers of the sizes given.
    unsafe { builder.launch(LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: 0 }) }.w()?;
    Ok(())
}
