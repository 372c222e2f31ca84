//! Building blocks shared by the adapters: seeded initialisers, the linear/conv op, Tucker and
//! Kronecker rebuilds, the Cayley transform (with an exact, differentiable matrix inverse),
//! dropouts, DoRA, and [`LowRankAdapter`] — the wrapper that gives every additive algorithm
//! (LyCORIS LoCon, LoHa, LoKr, DyLoRA, GLoRA, ABBA) the same rebuild/bypass/DoRA/multiplier
//! behaviour described in `reference/algorithms.md` §0.
//!
//! Only candle ops that have a backward are used here (no fused softmax / layer_norm /
//! rms_norm), so every trainable tensor receives its gradient.

use std::sync::Mutex;

use candle_core::{bail, DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::{Adapter, BaseLayer, LayerKind, NetworkOptions};
use crate::grad_checkpoint::replayable;

/// `torch.finfo(torch.float32).eps`, added to DoRA's weight norm exactly as LyCORIS does.
pub(crate) const EPS_F32: f64 = f32::EPSILON as f64;

// ---------------------------------------------------------------------------------------------
// Random numbers
// ---------------------------------------------------------------------------------------------

/// A seeded generator owned by one adapter: initial values, module/rank-dropout decisions and
/// DyLoRA's block draw come from it, so they are reproducible from `NetworkOptions::seed` and
/// the layer name. (Element-wise network dropout masks are activation-sized and come from the
/// tensor's device generator instead.) Behind a mutex because `Adapter::forward` takes `&self`.
pub(crate) struct AdapterRng(Mutex<StdRng>);

impl AdapterRng {
    pub fn new(seed: u64) -> Self {
        Self(Mutex::new(StdRng::seed_from_u64(seed)))
    }

    fn with<T>(&self, f: impl FnOnce(&mut StdRng) -> T) -> T {
        let mut guard = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        f(&mut guard)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&self) -> f64 {
        self.with(|r| r.random::<f64>())
    }

    /// [`AdapterRng::uniform`] drawn in a forward: replayed when gradient checkpointing
    /// recomputes the block.
    pub fn forward_uniform(&self) -> Result<f64> {
        replayable(|| Ok(self.uniform()))
    }

    /// Uniform integer in [0, n), drawn in a forward (replayed by gradient checkpointing).
    pub fn below(&self, n: usize) -> Result<usize> {
        replayable(|| Ok(self.with(|r| r.random_range(0..n))))
    }

    /// Keep-mask of length `n`: 1 where a uniform draw exceeds `p` (torch: `rand(n) > p`).
    /// Drawn in a forward (replayed by gradient checkpointing).
    pub fn keep_mask(&self, n: usize, p: f64) -> Result<Vec<f32>> {
        replayable(|| Ok(self.with(|r| (0..n).map(|_| if r.random::<f64>() > p { 1.0 } else { 0.0 }).collect())))
    }

    /// `torch.nn.init.kaiming_uniform_(a=√5)`: U(−b, b) with b = 1/√fan_in, where fan_in is
    /// `shape[1]·∏shape[2..]` (the input width times the kernel area).
    pub fn kaiming_uniform(&self, shape: &[usize]) -> Vec<f32> {
        let fan_in: usize = if shape.len() >= 2 { shape[1..].iter().product() } else { shape[0] };
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        let n: usize = shape.iter().product();
        self.with(|r| (0..n).map(|_| r.random_range(-bound..bound) as f32).collect())
    }

    /// N(0, std²) values.
    pub fn normal(&self, shape: &[usize], std: f64) -> Vec<f32> {
        let n: usize = shape.iter().product();
        self.with(|r| {
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(r);
                    (z * std) as f32
                })
                .collect()
        })
    }

    /// `torch.nn.init.orthogonal_` (gain 1): the tensor viewed as `shape[0] × rest` gets
    /// orthonormal rows when it has at most as many rows as columns, orthonormal columns
    /// otherwise. Built as the Q factor of a Gaussian matrix (Gram–Schmidt, done twice for
    /// accuracy), which is what "Orthogonalize" initialises down projections with.
    pub fn orthogonal(&self, shape: &[usize]) -> Vec<f32> {
        let rows = shape[0];
        let cols: usize = shape[1..].iter().product::<usize>().max(1);
        let gauss: Vec<f64> = self.with(|r| (0..rows * cols).map(|_| StandardNormal.sample(r)).collect::<Vec<f64>>());
        if rows <= cols {
            let mut m = gauss;
            orthonormalize_rows(&mut m, rows, cols);
            m.into_iter().map(|v| v as f32).collect()
        } else {
            // Orthonormal columns: orthonormalise the rows of the transpose.
            let mut t = vec![0f64; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    t[j * rows + i] = gauss[i * cols + j];
                }
            }
            orthonormalize_rows(&mut t, cols, rows);
            let mut out = vec![0f32; rows * cols];
            for i in 0..rows {
                for j in 0..cols {
                    out[i * cols + j] = t[j * rows + i] as f32;
                }
            }
            out
        }
    }
}

/// Modified Gram–Schmidt over the `rows` rows (length `cols`) of a row-major matrix, run twice.
fn orthonormalize_rows(m: &mut [f64], rows: usize, cols: usize) {
    for _pass in 0..2 {
        for i in 0..rows {
            for j in 0..i {
                let dot: f64 = (0..cols).map(|c| m[i * cols + c] * m[j * cols + c]).sum();
                for c in 0..cols {
                    m[i * cols + c] -= dot * m[j * cols + c];
                }
            }
            let norm: f64 = (0..cols).map(|c| m[i * cols + c].powi(2)).sum::<f64>().sqrt();
            let norm = if norm > 0.0 { norm } else { 1.0 };
            for c in 0..cols {
                m[i * cols + c] /= norm;
            }
        }
    }
}

/// Stable 64-bit FNV-1a hash, used to derive a per-layer seed from the layer name.
pub(crate) fn fnv1a(text: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.as_bytes() {
        hash ^= *byte as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

// ---------------------------------------------------------------------------------------------
// Tensors and variables
// ---------------------------------------------------------------------------------------------

/// A trainable variable holding `data` (row-major) with `shape`.
pub(crate) fn var_from(data: Vec<f32>, shape: &[usize], dtype: DType, device: &Device) -> Result<Var> {
    let t = Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?;
    Var::from_tensor(&t)
}

pub(crate) fn var_zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Var> {
    Var::zeros(shape, dtype, device)
}

pub(crate) fn var_ones(shape: &[usize], dtype: DType, device: &Device) -> Result<Var> {
    Var::ones(shape, dtype, device)
}

/// A trainable copy of a loaded tensor, in the adapter's parameter dtype.
pub(crate) fn var_copy(t: &Tensor, dtype: DType, device: &Device) -> Result<Var> {
    Var::from_tensor(&t.to_device(device)?.to_dtype(dtype)?.contiguous()?)
}

/// Multiplies by the trainable `use_scalar` scalar when there is one.
pub(crate) fn times_scalar(t: &Tensor, scalar: &Option<Var>) -> Result<Tensor> {
    match scalar {
        Some(s) => t.broadcast_mul(s.as_tensor()),
        None => Ok(t.clone()),
    }
}

/// The `use_scalar` variable: a 0-d tensor starting at 0.
pub(crate) fn new_scalar(use_scalar: bool, dtype: DType, device: &Device) -> Result<Option<Var>> {
    if use_scalar {
        Ok(Some(Var::from_tensor(&Tensor::zeros((), dtype, device)?)?))
    } else {
        Ok(None)
    }
}

/// Looks a tensor up in a loaded state dict, with an error naming the layer and the key.
pub(crate) fn required<'a>(
    tensors: &'a std::collections::HashMap<String, Tensor>,
    key: &str,
    layer: &str,
    algo: &str,
) -> Result<&'a Tensor> {
    match tensors.get(key) {
        Some(t) => Ok(t),
        None => bail!("layer {layer}: {algo} tensors need `{key}`, which is missing"),
    }
}

/// Reads the scalar `alpha` tensor of a loaded state dict, if present.
pub(crate) fn alpha_from(tensors: &std::collections::HashMap<String, Tensor>) -> Result<Option<f64>> {
    match tensors.get("alpha") {
        Some(t) => Ok(Some(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])),
        None => Ok(None),
    }
}

/// 0-d f32 tensor holding `alpha`, as LyCORIS and sd-scripts save it.
pub(crate) fn alpha_tensor(alpha: f64, device: &Device) -> Result<Tensor> {
    Tensor::new(alpha as f32, device)
}

/// Checks that a loaded tensor has the shape the layer needs.
pub(crate) fn expect_shape(t: &Tensor, shape: &[usize], what: &str, layer: &str) -> Result<()> {
    if t.dims() != shape {
        bail!("layer {layer}: `{what}` has shape {:?} but this layer needs {:?}", t.dims(), shape);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------------

/// LyCORIS's rank scale: alpha 0 means alpha = r; scale = alpha/r, or alpha/√r with
/// `rs_lora`, in which case the saved alpha is alpha·√r so that loaders computing
/// `alpha/r` get the same scale back.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RankScale {
    pub scale: f64,
    pub saved_alpha: f64,
}

impl RankScale {
    pub fn lycoris(rank: usize, alpha: f64, rs_lora: bool) -> Self {
        let alpha = if alpha == 0.0 { rank as f64 } else { alpha };
        let r_factor = if rs_lora { (rank as f64).sqrt() } else { rank as f64 };
        Self { scale: alpha / r_factor, saved_alpha: alpha * (rank as f64 / r_factor) }
    }

    /// Scale read back from a file: always `alpha/r` (rs_lora is already folded into alpha).
    pub fn from_saved(rank: usize, saved_alpha: Option<f64>) -> Self {
        let alpha = match saved_alpha {
            Some(a) if a != 0.0 => a,
            _ => rank as f64,
        };
        Self { scale: alpha / rank as f64, saved_alpha: alpha }
    }
}

// ---------------------------------------------------------------------------------------------
// Ops
// ---------------------------------------------------------------------------------------------

/// `F.linear` over the last dim (see [`crate::ops::linear`]: no weight gradient unless trained).
pub(crate) fn linear_op(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    crate::ops::linear(x, w, b)
}

/// `F.conv2d` with symmetric stride/padding, dilation 1, one group (see [`crate::ops::conv2d`]:
/// the input gradient as a forward conv, no weight gradient unless trained).
pub fn conv_op(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    crate::ops::conv2d(x, w, b, stride, padding)
}

/// The base layer's own op (`F.linear` or `F.conv2d`) with a given weight and bias; the
/// weight is reshaped to the layer's weight shape (so flattened conv weights are accepted).
pub(crate) fn layer_op(kind: &LayerKind, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    // A weight in another dtype than x is cast inside the op (forward and backward), so the
    // graph keeps the weight as given, not a cast copy of it (an fp8 base, an f32 W′ in fp16).
    let w = w.clone();
    let b = match b {
        Some(b) if b.dtype() != x.dtype() => Some(b.to_dtype(x.dtype())?),
        Some(b) => Some(b.clone()),
        None => None,
    };
    match kind {
        LayerKind::Linear { .. } => linear_op(x, &w, b.as_ref()),
        LayerKind::Conv2d { stride, padding, .. } => {
            let w = w.reshape(kind.weight_shape())?;
            conv_op(x, &w, b.as_ref(), *stride, *padding)
        }
        LayerKind::LayerNorm { .. } | LayerKind::GroupNorm { .. } => {
            bail!("layer_op is only defined for Linear and Conv2d layers")
        }
    }
}

/// 2-D matmul of `a` viewed as `(a.dim(0), rest)` and `b` viewed as `(b.dim(0), rest)`.
pub(crate) fn mm(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = a.flatten_from(1)?;
    let b = b.flatten_from(1)?;
    a.matmul(&b)
}

/// Tucker rebuild, LyCORIS `rebuild_tucker`: `t (i, j, kh, kw)`, `wa (i, p)`, `wb (j, q)` →
/// `(p, q, kh, kw)` with `out[p, q, :] = Σ_ij t[i, j, :]·wa[i, p]·wb[j, q]`.
pub(crate) fn tucker(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<Tensor> {
    let (i, j, kh, kw) = t.dims4()?;
    let p = wa.dim(1)?;
    let q = wb.dim(1)?;
    let kk = kh * kw;
    // (p, i) @ (i, j·kk) → (p, j, kk) → (p, kk, j)
    let tmp = wa.t()?.matmul(&t.reshape((i, j * kk))?)?;
    let tmp = tmp.reshape((p, j, kk))?.transpose(1, 2)?.reshape((p * kk, j))?;
    // (p·kk, j) @ (j, q) → (p, kk, q) → (p, q, kk)
    let out = tmp.matmul(wb)?.reshape((p, kk, q))?.transpose(1, 2)?;
    out.reshape((p, q, kh, kw))
}

/// Kronecker product as LoKr uses it: `w1 (a, c)` ⊗ `w2 (b, d, rest…)` → `(a·b, c·d, rest…)`
/// (w1 is treated as having size-1 trailing kernel dims, like LyCORIS's `make_kron`).
pub(crate) fn kron(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let w2_dims = w2.dims().to_vec();
    let (b, d) = (w2_dims[0], w2_dims[1]);
    let rest = &w2_dims[2..];
    let mut s1 = vec![a, 1, c, 1];
    s1.extend(rest.iter().map(|_| 1));
    let mut s2 = vec![1, b, 1, d];
    s2.extend_from_slice(rest);
    let prod = w1.reshape(s1)?.broadcast_mul(&w2.reshape(s2)?)?;
    let mut out = vec![a * b, c * d];
    out.extend_from_slice(rest);
    prod.reshape(out)
}

/// Inverse of each matrix in a batch `(n, b, b)` by Gauss–Jordan elimination written with
/// differentiable candle ops only (narrow, broadcast, mul, sub), so autograd follows it and the
/// gradient is the exact derivative of the inverse.
///
/// No pivoting: it is used on `I − Q` with `Q` skew-symmetric, whose symmetric part is the
/// identity; every Schur complement then keeps a positive-definite symmetric part, so the
/// pivots are never zero and elimination is stable. Run in f64 and cast back for ~1e-15
/// accuracy; the blocks are small (b ≤ √width for DIAG-OFT, ≤ lora_dim for BOFT).
pub(crate) fn batched_inverse(a: &Tensor) -> Result<Tensor> {
    let dtype = a.dtype();
    let device = a.device().clone();
    let (n, b, b2) = a.dims3()?;
    if b != b2 {
        bail!("batched_inverse needs square matrices, got {b}×{b2}");
    }
    let a64 = a.to_dtype(DType::F64)?;
    let eye = Tensor::eye(b, DType::F64, &device)?.unsqueeze(0)?.broadcast_as((n, b, b))?;
    // Augmented [A | I]; after elimination it holds [I | A⁻¹].
    let mut m = Tensor::cat(&[&a64, &eye], 2)?;
    for j in 0..b {
        let row = m.narrow(1, j, 1)?; // (n, 1, 2b)
        let pivot = row.narrow(2, j, 1)?; // (n, 1, 1)
        let normalized = row.broadcast_div(&pivot)?;
        // Column j minus e_j: subtracting (col − e_j) ⊗ normalized zeroes column j everywhere
        // except row j, which becomes the normalised pivot row.
        let mut e_j = vec![0f64; b];
        e_j[j] = 1.0;
        let e_j = Tensor::from_vec(e_j, (1, b, 1), &device)?;
        let col = m.narrow(2, j, 1)?.broadcast_sub(&e_j)?; // (n, b, 1)
        m = (m - col.broadcast_mul(&normalized)?)?;
    }
    m.narrow(2, b, b)?.contiguous()?.to_dtype(dtype)
}

/// Cayley transform `R = (I + Q)(I − Q)⁻¹` of a batch of skew-symmetric `Q (n, b, b)`,
/// computed in f64 (LyCORIS computes it in fp32) and returned in `Q`'s dtype.
pub(crate) fn cayley(q: &Tensor) -> Result<Tensor> {
    // The batched kernel (worker/kernels/cayley.cu) where it runs: blocks up to 256, and on a
    // GPU not in f64 (which stays on this exact f64 path).
    if crate::kernels::use_kernels(q) && q.dim(1)? <= 256 && (q.device().is_cpu() || q.dtype() != DType::F64) {
        return super::fused::cayley(q);
    }
    let dtype = q.dtype();
    let (n, b, _) = q.dims3()?;
    let q64 = q.to_dtype(DType::F64)?;
    let eye = Tensor::eye(b, DType::F64, q.device())?.unsqueeze(0)?.broadcast_as((n, b, b))?;
    let inv = batched_inverse(&eye.sub(&q64)?)?;
    eye.add(&q64)?.matmul(&inv)?.to_dtype(dtype)
}

/// Identity batch `(n, b, b)`.
pub(crate) fn eye_batch(n: usize, b: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Tensor::eye(b, dtype, device)?.unsqueeze(0)?.broadcast_as((n, b, b))?.contiguous()
}

/// Frobenius norm of the whole tensor, as a 0-d tensor.
pub(crate) fn frobenius(t: &Tensor) -> Result<Tensor> {
    t.sqr()?.sum_all()?.sqrt()
}

// ---------------------------------------------------------------------------------------------
// Dropouts
// ---------------------------------------------------------------------------------------------

/// The three dropouts of LyCORIS/kohya modules (`reference/algorithms.md` §0).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Dropouts {
    /// `dropout`: element dropout on the bypass output (ignored in rebuild mode).
    pub dropout: f64,
    /// `rank_dropout`: keep-mask over ranks (bypass LoCon) or output rows of ΔW (rebuild).
    pub rank_dropout: f64,
    /// `rank_dropout_scale`: divide the rank mask by its mean.
    pub rank_dropout_scale: bool,
    /// `module_dropout`: with this probability a training step sees only the base layer.
    pub module_dropout: f64,
}

impl Dropouts {
    pub fn from_options(o: &NetworkOptions) -> Self {
        Self {
            dropout: o.dropout,
            rank_dropout: o.rank_dropout,
            rank_dropout_scale: o.rank_dropout_scale,
            module_dropout: o.module_dropout,
        }
    }
}

/// `nn.Dropout(p)` in training mode: zero each element with probability p and scale the
/// survivors by 1/(1−p). The mask comes from the tensor's device generator.
pub(crate) fn element_dropout(t: &Tensor, p: f64) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(t.clone());
    }
    if p >= 1.0 {
        return t.zeros_like();
    }
    let r = replayable(|| Tensor::rand(0f32, 1f32, t.shape(), t.device()))?;
    let keep = r.ge(p as f32)?.to_dtype(t.dtype())?;
    (t * keep)?.affine(1.0 / (1.0 - p), 0.0)
}

// ---------------------------------------------------------------------------------------------
// Per-adapter context
// ---------------------------------------------------------------------------------------------

/// What every adapter knows about its layer and its run-time options.
pub(crate) struct Ctx {
    /// Layer name, used in error messages and to derive the seed.
    pub layer: String,
    pub kind: LayerKind,
    /// The frozen base weight (a cheap reference-counted handle, not a copy).
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// Dtype of the trainable tensors (f32, f64 when the base weight is f64, or the half dtype
    /// of `full_fp16` / `full_bf16`).
    pub dtype: DType,
    pub device: Device,
    pub multiplier: f64,
    pub bypass: bool,
    pub drops: Dropouts,
    pub rng: AdapterRng,
}

impl Ctx {
    pub fn new(opts: &NetworkOptions, base: &BaseLayer, layer: &str) -> Result<Self> {
        base.check()?;
        let dtype = match opts.param_dtype {
            Some(d) => d,
            None if base.weight.dtype() == DType::F64 => DType::F64,
            None => DType::F32,
        };
        Ok(Self {
            layer: layer.to_string(),
            kind: base.kind.clone(),
            weight: base.weight.clone(),
            bias: base.bias.clone(),
            dtype,
            device: base.weight.device().clone(),
            multiplier: opts.multiplier,
            bypass: opts.bypass_mode,
            drops: Dropouts::from_options(opts),
            rng: AdapterRng::new(opts.seed ^ fnv1a(layer)),
        })
    }

    /// The frozen weight in the parameter dtype, shaped as the layer's weight.
    pub fn weight_p(&self) -> Result<Tensor> {
        crate::ops::cast(&self.weight, self.dtype)
    }

    pub fn bias_p(&self) -> Result<Option<Tensor>> {
        self.bias.as_ref().map(|b| b.to_dtype(self.dtype)).transpose()
    }

    /// Weight shape: `(out, in)` or `(out, in, kh, kw)`.
    pub fn weight_shape(&self) -> Vec<usize> {
        self.kind.weight_shape()
    }

    pub fn out_dim(&self) -> usize {
        self.kind.out_dim()
    }

    pub fn in_dim(&self) -> usize {
        self.kind.in_dim()
    }

    /// `in · kh · kw`: the width of the weight flattened to 2-D.
    pub fn in_flat(&self) -> usize {
        self.weight_shape()[1..].iter().product()
    }

    /// Trailing kernel dims, empty for Linear.
    pub fn kernel_dims(&self) -> Vec<usize> {
        self.weight_shape()[2..].to_vec()
    }

    pub fn is_conv(&self) -> bool {
        matches!(self.kind, LayerKind::Conv2d { .. })
    }

    /// Draws module dropout: true means "this training step sees only the base layer".
    pub fn module_dropped(&self, train: bool) -> Result<bool> {
        Ok(train && self.drops.module_dropout > 0.0 && self.rng.forward_uniform()? < self.drops.module_dropout)
    }

    /// A rank-dropout keep-mask of length `n` (with `rank_dropout_scale`, divided by its
    /// mean), or `None` when rank dropout is off or not training.
    /// Whether rank dropout masks ΔW's rows at this call.
    pub fn rank_dropout_active(&self, train: bool) -> bool {
        train && self.drops.rank_dropout > 0.0
    }

    pub fn rank_mask(&self, n: usize, train: bool) -> Result<Option<Tensor>> {
        if !train || self.drops.rank_dropout <= 0.0 {
            return Ok(None);
        }
        let mut mask = self.rng.keep_mask(n, self.drops.rank_dropout)?;
        if self.drops.rank_dropout_scale {
            let mean = mask.iter().map(|v| *v as f64).sum::<f64>() / n as f64;
            if mean > 0.0 {
                mask.iter_mut().for_each(|v| *v = (*v as f64 / mean) as f32);
            }
        }
        Ok(Some(Tensor::from_vec(mask, n, &self.device)?.to_dtype(self.dtype)?))
    }

    /// LyCORIS's rebuild-mode rank dropout: a keep-mask over the output rows of ΔW.
    pub fn drop_rows(&self, delta: &Tensor, train: bool) -> Result<Tensor> {
        match self.rank_mask(delta.dim(0)?, train)? {
            None => Ok(delta.clone()),
            Some(mask) => {
                let mut shape = vec![1usize; delta.rank()];
                shape[0] = delta.dim(0)?;
                delta.broadcast_mul(&mask.to_dtype(delta.dtype())?.reshape(shape)?)
            }
        }
    }

    /// Network dropout on a bypass output, only while training.
    pub fn out_dropout(&self, t: &Tensor, train: bool) -> Result<Tensor> {
        if train && self.drops.dropout > 0.0 {
            element_dropout(t, self.drops.dropout)
        } else {
            Ok(t.clone())
        }
    }

    /// Builds a trainable variable with the given initialiser.
    pub fn var(&self, shape: &[usize], init: Init) -> Result<Var> {
        match init {
            Init::Zeros => var_zeros(shape, self.dtype, &self.device),
            Init::Ones => var_ones(shape, self.dtype, &self.device),
            Init::Kaiming => var_from(self.rng.kaiming_uniform(shape), shape, self.dtype, &self.device),
            Init::Orthogonal => var_from(self.rng.orthogonal(shape), shape, self.dtype, &self.device),
            Init::Normal(std) => var_from(self.rng.normal(shape, std), shape, self.dtype, &self.device),
        }
    }

    /// A trainable copy of a loaded tensor.
    pub fn var_copy(&self, t: &Tensor) -> Result<Var> {
        var_copy(t, self.dtype, &self.device)
    }
}

/// Initialisers used by the adapters.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Init {
    Zeros,
    Ones,
    /// `kaiming_uniform_(a=√5)`.
    Kaiming,
    /// `orthogonal_` — the "Orthogonalize" option for down projections.
    Orthogonal,
    Normal(f64),
}

impl Init {
    /// Kaiming, or orthogonal when the "Orthogonalize" option is on.
    pub fn down(orthogonalize: bool) -> Self {
        if orthogonalize {
            Init::Orthogonal
        } else {
            Init::Kaiming
        }
    }
}

// ---------------------------------------------------------------------------------------------
// DoRA
// ---------------------------------------------------------------------------------------------

/// Weight decomposition (`dora_wd`): a trainable magnitude `dora_scale`, the norm of each
/// output row of W `(out, 1[, 1, 1])`, or with `wd_on_output = false` of each input column
/// `(1, in[, 1, 1])`.
pub(crate) struct Dora {
    pub scale: Var,
    pub on_output: bool,
}

impl Dora {
    /// Row or column norms of `w` (kept as broadcastable shapes).
    pub fn norms(w: &Tensor, on_output: bool) -> Result<Tensor> {
        let sq = w.sqr()?;
        if on_output {
            let mut s = sq;
            for d in (1..w.rank()).rev() {
                s = s.sum_keepdim(d)?;
            }
            s.sqrt()
        } else {
            let mut s = sq.sum_keepdim(0)?;
            for d in (2..w.rank()).rev() {
                s = s.sum_keepdim(d)?;
            }
            s.sqrt()
        }
    }

    pub fn new(ctx: &Ctx, on_output: bool) -> Result<Self> {
        let norms = Self::norms(&ctx.weight_p()?, on_output)?;
        Ok(Self { scale: Var::from_tensor(&norms)?, on_output })
    }

    /// From a loaded `dora_scale`; the orientation follows its shape.
    pub fn from_tensor(ctx: &Ctx, t: &Tensor) -> Result<Self> {
        let shape = ctx.weight_shape();
        let mut out_shape = vec![1usize; shape.len()];
        out_shape[0] = shape[0];
        let mut in_shape = vec![1usize; shape.len()];
        in_shape[1] = shape[1];
        let on_output = if t.dims() == out_shape.as_slice() {
            true
        } else if t.dims() == in_shape.as_slice() {
            false
        } else {
            bail!(
                "layer {}: `dora_scale` has shape {:?}; expected {:?} (wd_on_output) or {:?}",
                ctx.layer,
                t.dims(),
                out_shape,
                in_shape
            )
        };
        Ok(Self { scale: ctx.var_copy(t)?, on_output })
    }

    /// W′ = (W+ΔW)·s with s = dora_scale/(‖W+ΔW‖ + eps); for m ≠ 1, s ← m(s−1)+1 (ΔW itself is
    /// not multiplied by m). The norm is not detached.
    pub fn apply(&self, w_plus_delta: &Tensor, multiplier: f64) -> Result<Tensor> {
        let norm = Self::norms(w_plus_delta, self.on_output)?.affine(1.0, EPS_F32)?;
        let mut s = self.scale.as_tensor().broadcast_div(&norm)?;
        if multiplier != 1.0 {
            s = s.affine(multiplier, 1.0 - multiplier)?;
        }
        w_plus_delta.broadcast_mul(&s)
    }
}

// ---------------------------------------------------------------------------------------------
// The additive wrapper
// ---------------------------------------------------------------------------------------------

/// The algorithm-specific part of an additive adapter (W′ = W + m·ΔW, or DoRA).
pub(crate) trait LowRankDelta: Send + Sync {
    fn algo_name(&self) -> &'static str;

    /// ΔW with the rank scale and `use_scalar` applied, without the multiplier, shaped like
    /// the base weight. While `train`, rank dropout (and DyLoRA's random rank) apply.
    fn delta(&self, ctx: &Ctx, train: bool) -> Result<Tensor>;

    /// f_ΔW(x) for bypass mode, without the multiplier and without network dropout (the
    /// wrapper applies both). The default materialises ΔW; LoCon/GLoRA/DyLoRA override it
    /// with the factored path.
    fn bypass_delta(&self, ctx: &Ctx, x: &Tensor, train: bool) -> Result<Tensor> {
        let d = self.delta(ctx, train)?;
        layer_op(&ctx.kind, x, &d, None)
    }

    /// Extra bias term (GLoRA-Ex only), without the multiplier.
    fn delta_bias(&self, _ctx: &Ctx, _train: bool) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn params(&self) -> Vec<(String, Var)>;
    fn state(&self, ctx: &Ctx) -> Result<Vec<(String, Tensor)>>;

    /// `W + m·ΔW` as one fused kernel op (LoHa, LoKr) where one applies; `None` otherwise.
    fn fused_merge(&self, _ctx: &Ctx, _w: &Tensor, _train: bool) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// An additive adapter: rebuild mode computes W′ = W + m·ΔW (or DoRA's W′) and runs the base
/// op once with it; bypass mode adds m·f_ΔW(x) to the base output.
pub(crate) struct LowRankAdapter<S: LowRankDelta> {
    pub ctx: Ctx,
    pub dora: Option<Dora>,
    pub src: S,
}

impl<S: LowRankDelta> LowRankAdapter<S> {
    fn merged(&self, train: bool) -> Result<Tensor> {
        let w = self.ctx.weight_p()?;
        if self.dora.is_none() && crate::kernels::use_kernels(&w) {
            if let Some(merged) = self.src.fused_merge(&self.ctx, &w, train)? {
                return Ok(merged);
            }
        }
        let delta = self.src.delta(&self.ctx, train)?;
        match &self.dora {
            Some(dora) => dora.apply(&(w + delta)?, self.ctx.multiplier),
            None => w + delta.affine(self.ctx.multiplier, 0.0)?,
        }
    }

    fn merged_b(&self, train: bool) -> Result<Option<Tensor>> {
        let delta_b = self.src.delta_bias(&self.ctx, train)?;
        let bias = self.ctx.bias_p()?;
        Ok(match (bias, delta_b) {
            (b, None) => b,
            (None, Some(d)) => Some(d.affine(self.ctx.multiplier, 0.0)?),
            (Some(b), Some(d)) => Some((b + d.affine(self.ctx.multiplier, 0.0)?)?),
        })
    }
}

impl<S: LowRankDelta> Adapter for LowRankAdapter<S> {
    fn algo_name(&self) -> &'static str {
        self.src.algo_name()
    }

    fn delta_weight(&self) -> Result<Tensor> {
        match &self.dora {
            Some(dora) => {
                let w = self.ctx.weight_p()?;
                let delta = self.src.delta(&self.ctx, false)?;
                dora.apply(&(&w + delta)?, 1.0)? - w
            }
            None => self.src.delta(&self.ctx, false),
        }
    }

    fn delta_bias(&self) -> Result<Option<Tensor>> {
        self.src.delta_bias(&self.ctx, false)
    }

    fn merged_weight(&self, _base: &BaseLayer) -> Result<Tensor> {
        self.merged(false)
    }

    fn merged_bias(&self, _base: &BaseLayer) -> Result<Option<Tensor>> {
        self.merged_b(false)
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.ctx.module_dropped(train)? {
            return base.forward(x);
        }
        if self.ctx.bypass {
            let org = base.forward(x)?;
            let diff = self.src.bypass_delta(&self.ctx, x, train)?.affine(self.ctx.multiplier, 0.0)?;
            let diff = self.ctx.out_dropout(&diff, train)?;
            let diff = diff.to_dtype(org.dtype())?;
            return org + diff;
        }
        let w = self.merged(train)?;
        let b = self.merged_b(train)?;
        layer_op(&self.ctx.kind, x, &w, b.as_ref())
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v = self.src.params();
        if let Some(d) = &self.dora {
            v.push(("dora_scale".to_string(), d.scale.clone()));
        }
        v
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut v = self.src.state(&self.ctx)?;
        if let Some(d) = &self.dora {
            v.push(("dora_scale".to_string(), d.scale.as_tensor().clone()));
        }
        Ok(v)
    }

    fn multiplier(&self) -> f64 {
        self.ctx.multiplier
    }

    fn set_multiplier(&mut self, multiplier: f64) {
        self.ctx.multiplier = multiplier;
    }
}

/// Applies the `use_scalar` fold-in for saving: `t · scalar` (or `t` itself).
pub(crate) fn folded(t: &Var, scalar: &Option<Var>) -> Result<Tensor> {
    times_scalar(t.as_tensor(), scalar)
}
