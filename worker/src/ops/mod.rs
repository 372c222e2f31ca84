//! Device-generic ops with a backward of their own.
//!
//! candle's autograd computes the gradient of every operand of every op and keeps each one
//! until the backward ends — for a frozen Linear/Conv2d weight a weight-sized buffer and about
//! a third of the backward's work, for a broadcast bias an activation-sized one, for a softmax
//! every intermediate score map. The ops here compute their forward with plain candle ops on
//! detached tensors, put one node on the graph in their place ([`graph::attach`]), and in
//! their backward return only the gradients that a trained tensor needs.
//!
//! Each op keeps its plain-candle formulation as the reference: inside
//! [`with_reference_ops`] every op here runs as candle composes it, with candle's own
//! backward, so tests can compare the two on the same model.

pub mod activation;
pub mod attention;
pub mod check;
pub mod conv;
mod graph;
mod im2col;
pub mod linear;
pub mod norm;

use std::cell::Cell;

use candle_core::Tensor;

pub use activation::{gelu_erf, silu};
pub use attention::attention;
pub(crate) use graph::{attach, copy_of, Backward};
pub use conv::conv2d;
pub use linear::linear;
pub use norm::{group_norm, group_norm_silu, layer_norm};

thread_local! {
    static REFERENCE_OPS: Cell<bool> = const { Cell::new(false) };
    static DEVICE_GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the reference formulation of every op in this module (plain candle ops and
/// candle's backward) on this thread.
pub fn with_reference_ops<T>(f: impl FnOnce() -> T) -> T {
    let before = REFERENCE_OPS.with(|r| r.replace(true));
    let out = f();
    REFERENCE_OPS.with(|r| r.set(before));
    out
}

/// Whether [`with_reference_ops`] is in force on this thread.
pub(crate) fn reference_ops() -> bool {
    REFERENCE_OPS.with(|r| r.get())
}

/// Runs `f` with the ops' device-generic code (candle ops, what a GPU runs) instead of their
/// fused CPU loops on this thread, so the CPU tests cover both.
pub fn with_device_generic_ops<T>(f: impl FnOnce() -> T) -> T {
    let before = DEVICE_GENERIC.with(|r| r.replace(true));
    let out = f();
    DEVICE_GENERIC.with(|r| r.set(before));
    out
}

/// Whether an optimizer steps `t` with its host loops (a CPU tensor, outside
/// [`with_device_generic_ops`]) rather than with tensor ops on the tensor's device.
pub(crate) fn host_loops(t: &Tensor) -> bool {
    t.device().is_cpu() && !DEVICE_GENERIC.with(|r| r.get())
}

/// Whether `t` may take an op's fused CPU loop: an f32 CPU tensor, outside
/// [`with_device_generic_ops`].
pub(crate) fn cpu_fused(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && !DEVICE_GENERIC.with(|r| r.get())
}

/// `t.to_dtype(dtype)`, with float8 e4m3 → f16/f32 on the CPU through a 256-entry table
/// (an fp8 base's weights are cast at every layer call; candle converts each element through
/// f32 in software). A no-op when the dtypes agree. The table cast records no backward: it is
/// for frozen weights only, which nothing differentiates.
pub fn cast(t: &candle_core::Tensor, dtype: candle_core::DType) -> candle_core::Result<candle_core::Tensor> {
    use candle_core::{DType, Tensor};
    use std::sync::OnceLock;
    if t.dtype() == dtype {
        return Ok(t.clone());
    }
    if t.dtype() != DType::F8E4M3 || !t.device().is_cpu() || t.track_op() || !matches!(dtype, DType::F16 | DType::F32) {
        return t.to_dtype(dtype);
    }
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    let table = TABLE.get_or_init(|| std::array::from_fn(|i| float8::F8E4M3::from_bits(i as u8).to_f32()));
    let bits: Vec<float8::F8E4M3> = t.flatten_all()?.to_vec1()?;
    if dtype == DType::F32 {
        Tensor::from_vec(bits.iter().map(|b| table[b.to_bits() as usize]).collect::<Vec<f32>>(), t.shape(), t.device())
    } else {
        static TABLE16: OnceLock<[half::f16; 256]> = OnceLock::new();
        let table16 = TABLE16.get_or_init(|| std::array::from_fn(|i| half::f16::from_f32(table[i])));
        Tensor::from_vec(bits.iter().map(|b| table16[b.to_bits() as usize]).collect::<Vec<half::f16>>(), t.shape(), t.device())
    }
}

#[cfg(test)]
mod cast_tests {
    use candle_core::{DType, Device, Tensor};

    #[test]
    fn the_fp8_table_equals_candles_conversion() {
        let every_byte: Vec<f32> = (0..=255u8).map(|b| float8::F8E4M3::from_bits(b).to_f32()).filter(|v| v.is_finite()).collect();
        let fp8 = Tensor::new(every_byte.as_slice(), &Device::Cpu).unwrap().to_dtype(DType::F8E4M3).unwrap().reshape((every_byte.len(), 1)).unwrap();
        for dtype in [DType::F16, DType::F32] {
            let fast = super::cast(&fp8, dtype).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let candle = fp8.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(fast, candle, "{dtype:?}");
            assert_eq!(super::cast(&fp8, dtype).unwrap().dims(), fp8.dims());
        }
    }
}
