//! Loft's hand-written GPU kernels (worker/kernels/*.cu), the ops that launch them, and the CPU
//! references they are tested against.
//!
//! Each kernel family has one `.cu` file, compiled twice by worker/build.rs: to PTX with nvcc
//! under the `cuda` feature (loaded at run time through candle's CUDA device), and for the CPU
//! emulation (worker/kernels/cpu_emulation.h) with the host C++ compiler, so that
//! worker/tests/kernels.rs launches the very same source on every `cargo test` and compares it
//! with the reference. The ops here take candle tensors: on a CUDA tensor they launch the kernel,
//! on a CPU tensor they run the reference (a plain loop in f32/f64).
//!
//! The kernels are on by default in the `cuda` build; `LOFT_KERNELS=off` (or [`with_kernels`])
//! turns them off, and the engine then runs its candle-op formulation everywhere.

pub mod attention;
pub mod cayley;
pub mod check;
pub mod emulation;
pub mod norm;
pub mod lowrank;
pub mod optim;

#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);
static OP_CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many times a kernel op's forward has run in this process (on any device): lets a test
/// tell that a run really went through the kernel ops.
pub fn op_calls() -> usize {
    OP_CALLS.load(Ordering::Relaxed)
}

pub(crate) fn count_op_call() {
    OP_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Makes the kernel ops fill their output buffers with NaN before each launch (the device
/// check: an element a kernel never writes then shows), instead of zeros.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed)
}

/// A kernel's output buffer: zeros, or NaN under [`set_poison_outputs`]. (Buffers a kernel
/// accumulates into are made with `Tensor::zeros` instead.)
#[cfg(feature = "cuda")]
pub(crate) fn output(shape: impl Into<candle_core::Shape>, dtype: DType, device: &candle_core::Device) -> candle_core::Result<Tensor> {
    if POISON_OUTPUTS.load(Ordering::Relaxed) {
        Tensor::full(f32::NAN, shape, device)?.to_dtype(dtype)
    } else {
        Tensor::zeros(shape, dtype, device)
    }
}

thread_local! {
    static OVERRIDE: Cell<Option<bool>> = const { Cell::new(None) };
}

fn default_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| !matches!(std::env::var("LOFT_KERNELS").as_deref(), Ok("off" | "0" | "false")))
}

/// Runs `f` with the kernel ops on or off on this thread. On, a CPU tensor also takes the
/// kernel ops' path (their CPU reference), so CPU tests cover the ops' plumbing: what they
/// save for the backward, and how their gradients reach the graph.
pub fn with_kernels<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = OVERRIDE.with(|o| o.replace(Some(on)));
    let out = f();
    OVERRIDE.with(|o| o.set(before));
    out
}

/// Whether an op on `t` takes its kernel path: a CUDA tensor with the kernels on (the default),
/// or any tensor inside `with_kernels(true, …)`.
pub(crate) fn use_kernels(t: &Tensor) -> bool {
    let on = match OVERRIDE.with(|o| o.get()) {
        Some(on) => on,
        None => t.device().is_cuda() && default_on(),
    };
    // The kernels take f32, f16 and bf16; f64 (tests, exact paths) keeps candle's ops on a GPU
    // (on the CPU the kernel ops' references take any dtype).
    on && (t.device().is_cpu() || matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16))
}
