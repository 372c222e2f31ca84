//! The kernels compiled for the CPU emulation (worker/kernels/emulation.cpp): extern "C" entry
//! points `emu_NAME(grid, block, args…)` that run kernel NAME on host memory, one block after
//! another, a block's threads as OS threads. For tests: slow, and exact about indexing,
//! synchronisation and rounding.

use half::{bf16, f16};

/// CUDA's `dim3`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl Dim3 {
    pub const fn x(x: u32) -> Self {
        Self { x, y: 1, z: 1 }
    }
    pub const fn xy(x: u32, y: u32) -> Self {
        Self { x, y, z: 1 }
    }
}

/// Sets the order in which the emulator runs a block's threads between synchronisation
/// points (forward by default); a race shows as a wrong result in one order or the other.
pub fn set_reverse_order(reverse: bool) {
    unsafe { loft_emu_set_reverse_order(reverse) }
}

/// The emulator's float → half conversion (round to nearest even), as bits.
pub fn f32_to_f16_bits(v: f32) -> u16 {
    unsafe { loft_emu_f32_to_f16(v) }
}
pub fn f16_bits_to_f32(v: u16) -> f32 {
    unsafe { loft_emu_f16_to_f32(v) }
}
pub fn f32_to_bf16_bits(v: f32) -> u16 {
    unsafe { loft_emu_f32_to_bf16(v) }
}

extern "C" {
    fn loft_emu_set_reverse_order(reverse: bool);
    fn loft_emu_f32_to_f16(v: f32) -> u16;
    fn loft_emu_f16_to_f32(v: u16) -> f32;
    fn loft_emu_f32_to_bf16(v: f32) -> u16;

    pub fn emu_selftest_tree_sum(grid: Dim3, block: Dim3, x: *const f32, out: *mut f32, n: i32);
    pub fn emu_selftest_tree_sum_racy(grid: Dim3, block: Dim3, x: *const f32, out: *mut f32, n: i32);
    pub fn emu_selftest_shuffle_sum(grid: Dim3, block: Dim3, x: *const f32, sums: *mut f32, total: *mut f32, negatives: *mut u32, n: i32);
    pub fn emu_selftest_divergent_barrier(grid: Dim3, block: Dim3, out: *mut f32);
}

/// A kernel element type: f32, f16 or bf16, with its emulated entry points.
pub trait Element: Copy + Send + Sync + 'static {
    const SUFFIX: &'static str;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Element for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}
impl Element for f16 {
    const SUFFIX: &'static str = "f16";
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}
impl Element for bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}


/// The emulated norm kernels (worker/kernels/norm.cu) for one element type.
pub trait NormKernels: Element {
    /// # Safety
    /// The pointers must cover the shapes the arguments describe.
    #[allow(clippy::too_many_arguments)]
    unsafe fn norm_fwd(silu: bool, grid: Dim3, block: Dim3, x: *const Self, gamma: *const f32, beta: *const f32, y: *mut Self, mean: *mut f32, rstd: *mut f32, n: i32, g: i32, cpg: i32, inner: i32, eps: f32);
    /// # Safety
    /// As [`NormKernels::norm_fwd`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn norm_bwd_dx(silu: bool, grid: Dim3, block: Dim3, x: *const Self, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const Self, dx: *mut Self, n: i32, g: i32, cpg: i32, inner: i32);
    /// # Safety
    /// As [`NormKernels::norm_fwd`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn group_norm_bwd_affine(silu: bool, grid: Dim3, block: Dim3, x: *const Self, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const Self, dgamma: *mut f32, dbeta: *mut f32, b: i32, c: i32, g: i32, inner: i32);
    /// # Safety
    /// As [`NormKernels::norm_fwd`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn layer_norm_bwd_affine(grid: Dim3, block: Dim3, x: *const Self, mean: *const f32, rstd: *const f32, dy: *const Self, dgamma: *mut f32, dbeta: *mut f32, r: i32, c: i32);
}

macro_rules! norm_kernels {
    ($ty:ty, $fwd:ident, $silu_fwd:ident, $dx:ident, $silu_dx:ident, $gn:ident, $silu_gn:ident, $ln:ident) => {
        extern "C" {
            fn $fwd(grid: Dim3, block: Dim3, x: *const $ty, gamma: *const f32, beta: *const f32, y: *mut $ty, mean: *mut f32, rstd: *mut f32, n: i32, g: i32, cpg: i32, inner: i32, eps: f32);
            fn $silu_fwd(grid: Dim3, block: Dim3, x: *const $ty, gamma: *const f32, beta: *const f32, y: *mut $ty, mean: *mut f32, rstd: *mut f32, n: i32, g: i32, cpg: i32, inner: i32, eps: f32);
            fn $dx(grid: Dim3, block: Dim3, x: *const $ty, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const $ty, dx: *mut $ty, n: i32, g: i32, cpg: i32, inner: i32);
            fn $silu_dx(grid: Dim3, block: Dim3, x: *const $ty, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const $ty, dx: *mut $ty, n: i32, g: i32, cpg: i32, inner: i32);
            fn $gn(grid: Dim3, block: Dim3, x: *const $ty, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const $ty, dgamma: *mut f32, dbeta: *mut f32, b: i32, c: i32, g: i32, inner: i32);
            fn $silu_gn(grid: Dim3, block: Dim3, x: *const $ty, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const $ty, dgamma: *mut f32, dbeta: *mut f32, b: i32, c: i32, g: i32, inner: i32);
            fn $ln(grid: Dim3, block: Dim3, x: *const $ty, mean: *const f32, rstd: *const f32, dy: *const $ty, dgamma: *mut f32, dbeta: *mut f32, r: i32, c: i32);
        }
        impl NormKernels for $ty {
            unsafe fn norm_fwd(silu: bool, grid: Dim3, block: Dim3, x: *const Self, gamma: *const f32, beta: *const f32, y: *mut Self, mean: *mut f32, rstd: *mut f32, n: i32, g: i32, cpg: i32, inner: i32, eps: f32) {
                if silu { $silu_fwd(grid, block, x, gamma, beta, y, mean, rstd, n, g, cpg, inner, eps) } else { $fwd(grid, block, x, gamma, beta, y, mean, rstd, n, g, cpg, inner, eps) }
            }
            unsafe fn norm_bwd_dx(silu: bool, grid: Dim3, block: Dim3, x: *const Self, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const Self, dx: *mut Self, n: i32, g: i32, cpg: i32, inner: i32) {
                if silu { $silu_dx(grid, block, x, gamma, beta, mean, rstd, dy, dx, n, g, cpg, inner) } else { $dx(grid, block, x, gamma, beta, mean, rstd, dy, dx, n, g, cpg, inner) }
            }
            unsafe fn group_norm_bwd_affine(silu: bool, grid: Dim3, block: Dim3, x: *const Self, gamma: *const f32, beta: *const f32, mean: *const f32, rstd: *const f32, dy: *const Self, dgamma: *mut f32, dbeta: *mut f32, b: i32, c: i32, g: i32, inner: i32) {
                if silu { $silu_gn(grid, block, x, gamma, beta, mean, rstd, dy, dgamma, dbeta, b, c, g, inner) } else { $gn(grid, block, x, gamma, beta, mean, rstd, dy, dgamma, dbeta, b, c, g, inner) }
            }
            unsafe fn layer_norm_bwd_affine(grid: Dim3, block: Dim3, x: *const Self, mean: *const f32, rstd: *const f32, dy: *const Self, dgamma: *mut f32, dbeta: *mut f32, r: i32, c: i32) {
                $ln(grid, block, x, mean, rstd, dy, dgamma, dbeta, r, c)
            }
        }
    };
}

norm_kernels!(f32, emu_loft_norm_fwd_f32, emu_loft_norm_silu_fwd_f32, emu_loft_norm_bwd_dx_f32, emu_loft_norm_silu_bwd_dx_f32, emu_loft_group_norm_bwd_affine_f32, emu_loft_group_norm_silu_bwd_affine_f32, emu_loft_layer_norm_bwd_affine_f32);
norm_kernels!(f16, emu_loft_norm_fwd_f16, emu_loft_norm_silu_fwd_f16, emu_loft_norm_bwd_dx_f16, emu_loft_norm_silu_bwd_dx_f16, emu_loft_group_norm_bwd_affine_f16, emu_loft_group_norm_silu_bwd_affine_f16, emu_loft_layer_norm_bwd_affine_f16);
norm_kernels!(bf16, emu_loft_norm_fwd_bf16, emu_loft_norm_silu_fwd_bf16, emu_loft_norm_bwd_dx_bf16, emu_loft_norm_silu_bwd_dx_bf16, emu_loft_group_norm_bwd_affine_bf16, emu_loft_group_norm_silu_bwd_affine_bf16, emu_loft_layer_norm_bwd_affine_bf16);

/// The emulated attention kernels (worker/kernels/attention.cu) for one element type; `d` is
/// the head size (40, 64, 80, 128 or 160).
pub trait AttentionKernels: Element {
    /// # Safety
    /// The pointers must cover the shapes the arguments describe.
    #[allow(clippy::too_many_arguments)]
    unsafe fn attention_fwd(grid: Dim3, block: Dim3, d: i32, q: *const Self, k: *const Self, v: *const Self, out: *mut Self, lse: *mut f32, h: i32, nq: i32, nk: i32, scale: f32);
    /// # Safety
    /// As [`AttentionKernels::attention_fwd`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn attention_bwd(grid: Dim3, block: Dim3, d: i32, q: *const Self, k: *const Self, v: *const Self, dout: *const Self, lse: *const f32, rowdot: *const f32, dq: *mut f32, dk: *mut Self, dv: *mut Self, h: i32, nq: i32, nk: i32, scale: f32);
    /// # Safety
    /// As [`AttentionKernels::attention_fwd`].
    unsafe fn attention_rowdot(grid: Dim3, block: Dim3, out: *const Self, dout: *const Self, rowdot: *mut f32, rows: i64, d: i32);
}

macro_rules! attention_kernels {
    ($ty:ty, $fwd:ident, $bwd:ident, $rowdot:ident) => {
        extern "C" {
            fn $fwd(grid: Dim3, block: Dim3, d: i32, q: *const $ty, k: *const $ty, v: *const $ty, out: *mut $ty, lse: *mut f32, h: i32, nq: i32, nk: i32, scale: f32);
            fn $bwd(grid: Dim3, block: Dim3, d: i32, q: *const $ty, k: *const $ty, v: *const $ty, dout: *const $ty, lse: *const f32, rowdot: *const f32, dq: *mut f32, dk: *mut $ty, dv: *mut $ty, h: i32, nq: i32, nk: i32, scale: f32);
            fn $rowdot(grid: Dim3, block: Dim3, out: *const $ty, dout: *const $ty, rowdot: *mut f32, rows: i64, d: i32);
        }
        impl AttentionKernels for $ty {
            unsafe fn attention_fwd(grid: Dim3, block: Dim3, d: i32, q: *const Self, k: *const Self, v: *const Self, out: *mut Self, lse: *mut f32, h: i32, nq: i32, nk: i32, scale: f32) {
                $fwd(grid, block, d, q, k, v, out, lse, h, nq, nk, scale)
            }
            unsafe fn attention_bwd(grid: Dim3, block: Dim3, d: i32, q: *const Self, k: *const Self, v: *const Self, dout: *const Self, lse: *const f32, rowdot: *const f32, dq: *mut f32, dk: *mut Self, dv: *mut Self, h: i32, nq: i32, nk: i32, scale: f32) {
                $bwd(grid, block, d, q, k, v, dout, lse, rowdot, dq, dk, dv, h, nq, nk, scale)
            }
            unsafe fn attention_rowdot(grid: Dim3, block: Dim3, out: *const Self, dout: *const Self, rowdot: *mut f32, rows: i64, d: i32) {
                $rowdot(grid, block, out, dout, rowdot, rows, d)
            }
        }
    };
}

attention_kernels!(f32, emu_attention_fwd_f32, emu_attention_bwd_f32, emu_loft_attention_rowdot_f32);
attention_kernels!(f16, emu_attention_fwd_f16, emu_attention_bwd_f16, emu_loft_attention_rowdot_f16);
attention_kernels!(bf16, emu_attention_fwd_bf16, emu_attention_bwd_bf16, emu_loft_attention_rowdot_bf16);
