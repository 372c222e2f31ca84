//! The wrappable layers every model is built from, and the differentiable ops they share.
//!
//! Every `Linear`, `Conv2d`, `LayerNorm` and `GroupNorm` of a model is a [`Layer`]: a frozen
//! [`BaseLayer`] (kind, weight, bias) under its module path (`down_blocks.0.attentions.0.
//! transformer_blocks.0.attn1.to_q`, `text_model.encoder.layers.0.mlp.fc1`, …) with an optional
//! [`LayerHook`] that replaces its forward. A model records its layers in build order
//! ([`LayerRegistry`]); a network attaches adapters by walking that list, never by knowing the
//! model's structure. Hooks sit behind a lock, so attaching one needs only `&Layer`.
//!
//! All ops here have a backward in candle: no fused `softmax_last_dim`, `layer_norm` or
//! `rms_norm` (they silently cut gradients, see DESIGN.md "Facts about the stack").

use std::sync::{Arc, RwLock};

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::networks::{BaseLayer, LayerKind};
pub use crate::ops::attention::AttentionChoice;

/// Replaces a layer's forward, e.g. with an adapter (`Adapter::forward(base, x, train)`).
pub trait LayerHook: Send + Sync {
    /// The layer's output for `x`; `base` is the frozen layer the hook was attached to.
    fn forward(&self, base: &BaseLayer, x: &Tensor) -> Result<Tensor>;
}

/// Any `Fn(&BaseLayer, &Tensor) -> Result<Tensor>` closure is a hook.
impl<F> LayerHook for F
where
    F: Fn(&BaseLayer, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn forward(&self, base: &BaseLayer, x: &Tensor) -> Result<Tensor> {
        self(base, x)
    }
}

/// One Linear / Conv2d / LayerNorm / GroupNorm layer of a model, reachable by its module path.
pub struct Layer {
    name: String,
    kind: LayerKind,
    /// Replaced only by [`Layer::set_base`] (a merge into the frozen weights).
    base: RwLock<BaseLayer>,
    hook: RwLock<Option<Arc<dyn LayerHook>>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("name", &self.name)
            .field("kind", &self.base().kind)
            .field("hooked", &self.hook.read().map(|h| h.is_some()).unwrap_or(false))
            .finish()
    }
}

impl Layer {
    pub fn new(name: impl Into<String>, base: BaseLayer) -> Self {
        Self { name: name.into(), kind: base.kind.clone(), base: RwLock::new(base), hook: RwLock::new(None) }
    }

    /// The module path, as in the diffusers / transformers state dict without `.weight`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> &LayerKind {
        &self.kind
    }

    /// The frozen layer (weight and bias in the compute dtype; the tensors are shared, not
    /// copied).
    pub fn base(&self) -> BaseLayer {
        self.base.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the frozen weights (same kind and shapes): `base_weights` merged into the model
    /// before training, which the trained adapters then see as the base.
    pub fn set_base(&self, base: BaseLayer) -> Result<()> {
        if base.kind != self.kind || base.weight.dims() != self.base().weight.dims() {
            candle_core::bail!("layer {}: a merged weight must keep the layer's kind and shape", self.name);
        }
        *self.base.write().unwrap_or_else(|e| e.into_inner()) = base;
        Ok(())
    }

    pub fn is_linear(&self) -> bool {
        matches!(self.kind, LayerKind::Linear { .. })
    }

    pub fn is_conv(&self) -> bool {
        matches!(self.kind, LayerKind::Conv2d { .. })
    }

    pub fn is_norm(&self) -> bool {
        self.kind.is_norm()
    }

    /// Attaches (or with `None` removes) the hook that replaces this layer's forward.
    pub fn set_hook(&self, hook: Option<Arc<dyn LayerHook>>) {
        *self.hook.write().unwrap_or_else(|e| e.into_inner()) = hook;
    }

    pub fn hook(&self) -> Option<Arc<dyn LayerHook>> {
        self.hook.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The layer's output: the hook's if one is attached, else the frozen layer's. Norms
    /// compute their statistics in f32 when `x` is f16/bf16.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Read under the lock rather than cloned: this runs for every layer call.
        let base = self.base.read().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = self.hook() {
            return h.forward(&base, x);
        }
        forward_in_dtype(&base, x)
    }

    /// `activation(act, self.forward(x))`, with a GroupNorm followed by SiLU as one fused
    /// kernel op where the kernels run (no adapter on the norm).
    pub fn forward_then(&self, x: &Tensor, act: &str) -> Result<Tensor> {
        let base = self.base.read().unwrap_or_else(|e| e.into_inner());
        if let (None, LayerKind::GroupNorm { groups, eps, .. }, "silu" | "swish") = (self.hook(), &base.kind, act) {
            if crate::kernels::use_kernels(x) {
                return crate::ops::group_norm_silu(x, *groups, &base.weight, base.bias.as_ref(), *eps);
            }
        }
        drop(base);
        activation(act, &self.forward(x)?)
    }
}

/// A frozen layer's output for `x`. Weights stored in another dtype than `x` (f16 weights
/// computed in f32, to halve a model's memory) are cast for this call only; norms compute their
/// statistics in f32 when `x` is f16/bf16.
pub fn forward_in_dtype(base: &BaseLayer, x: &Tensor) -> Result<Tensor> {
    if base.kind.is_norm() && crate::kernels::use_kernels(x) {
        // The norm kernels take x in f32/f16/bf16 as it is (f32 statistics) and the weight and
        // bias in f32 whatever their stored dtype.
        return base.forward(x);
    }
    if base.kind.is_norm() && x.dtype() != DType::F32 && x.dtype() != DType::F64 {
        return forward_in_dtype(base, &x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    if base.weight.dtype() != x.dtype() && x.dtype().is_float() {
        // Linear and Conv2d cast their weight inside the op (forward and backward), so the
        // graph holds the stored weight rather than a copy; norms are cast here.
        let weight = if base.kind.is_norm() { base.weight.to_dtype(x.dtype())? } else { base.weight.clone() };
        let cast = BaseLayer {
            kind: base.kind.clone(),
            weight,
            bias: base.bias.as_ref().map(|b| b.to_dtype(x.dtype())).transpose()?,
        };
        return cast.forward(x);
    }
    base.forward(x)
}

/// The layers of a model in build order, shared by its builders.
#[derive(Clone, Default, Debug)]
pub struct LayerRegistry(Arc<RwLock<Vec<Arc<Layer>>>>);

impl LayerRegistry {
    pub fn push(&self, layer: Arc<Layer>) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).push(layer);
    }

    pub fn to_vec(&self) -> Vec<Arc<Layer>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A [`VarBuilder`] plus the registry the layers it builds go into. Layer names are the
/// builder's prefix (the diffusers module path).
#[derive(Clone)]
pub struct Builder<'a> {
    pub vb: VarBuilder<'a>,
    pub registry: LayerRegistry,
    /// The attention every attention layer of the model computes, switchable after building.
    pub attention: AttentionChoice,
}

/// Weight init used only when building from a `VarMap` (tests, from-scratch training).
const W_INIT: Init = candle_nn::init::DEFAULT_KAIMING_NORMAL;
const B_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

impl<'a> Builder<'a> {
    pub fn new(vb: VarBuilder<'a>) -> Self {
        Self { vb, registry: LayerRegistry::default(), attention: AttentionChoice::default() }
    }

    pub fn pp(&self, s: impl ToString) -> Self {
        Self { vb: self.vb.pp(s), registry: self.registry.clone(), attention: self.attention.clone() }
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &candle_core::Device {
        self.vb.device()
    }

    fn register(&self, base: BaseLayer) -> Arc<Layer> {
        let layer = Arc::new(Layer::new(self.vb.prefix(), base));
        self.registry.push(layer.clone());
        layer
    }

    /// A tensor that is not a layer (embeddings, text projection, …).
    pub fn tensor(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.vb.get_with_hints(shape, name, Init::Randn { mean: 0.0, stdev: 0.02 })
    }

    pub fn linear(&self, in_features: usize, out_features: usize, bias: bool) -> Result<Arc<Layer>> {
        let w = self.vb.get_with_hints((out_features, in_features), "weight", W_INIT)?;
        let b = if bias { Some(self.vb.get_with_hints(out_features, "bias", B_INIT)?) } else { None };
        Ok(self.register(BaseLayer::linear(w, b)?))
    }

    pub fn conv2d(
        &self,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Arc<Layer>> {
        let w = self.vb.get_with_hints((out_channels, in_channels, kernel, kernel), "weight", W_INIT)?;
        let b = Some(self.vb.get_with_hints(out_channels, "bias", B_INIT)?);
        Ok(self.register(BaseLayer::conv2d(w, b, stride, padding)?))
    }

    pub fn group_norm(&self, groups: usize, channels: usize, eps: f64) -> Result<Arc<Layer>> {
        let w = self.vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let b = Some(self.vb.get_with_hints(channels, "bias", Init::Const(0.0))?);
        let base = BaseLayer { kind: LayerKind::GroupNorm { groups, channels, eps }, weight: w, bias: b };
        base.check()?;
        Ok(self.register(base))
    }

    pub fn layer_norm(&self, features: usize, eps: f64) -> Result<Arc<Layer>> {
        let w = self.vb.get_with_hints(features, "weight", Init::Const(1.0))?;
        let b = Some(self.vb.get_with_hints(features, "bias", Init::Const(0.0))?);
        let base = BaseLayer { kind: LayerKind::LayerNorm { features, eps }, weight: w, bias: b };
        base.check()?;
        Ok(self.register(base))
    }
}

// ---------------------------------------------------------------------------------------------
// Differentiable ops
// ---------------------------------------------------------------------------------------------

/// Softmax over the last dim from primitive ops. The max is a constant shift; it enters as a
/// small leaf variable rather than a detached tensor because candle's backward keeps, until it
/// ends, a full-size gradient for every *untracked* operand of a tracked op (here a 64 MB
/// attention map at 1024 tokens, batch 4, per attention); a leaf's gradient is reduced to its
/// own small shape at once. Nothing reads that gradient: results are as with a detached max.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let max = if x.track_op() { candle_core::Var::from_tensor(&max)?.into_inner() } else { max };
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `x·sigmoid(1.702·x)` (CLIP's quick_gelu).
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x.mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?)
}

/// An activation by its config name (`silu`, `gelu`, `quick_gelu`, `gelu_new`…).
pub fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    match name {
        "silu" | "swish" => crate::ops::silu(x),
        "gelu" => crate::ops::gelu_erf(x),
        "gelu_new" | "gelu_pytorch_tanh" => x.gelu(),
        "quick_gelu" => quick_gelu(x),
        "relu" => x.relu(),
        other => candle_core::bail!("unsupported activation function {other:?}"),
    }
}

/// Multi-head scaled dot-product attention. `q` is `(B, Nq, H·d)`, `k`/`v` are `(B, Nk, H·d)`;
/// `mask` (if any) is added to the scores and broadcasts to `(B, H, Nq, Nk)`. Without a mask
/// and with `choice` on, the memory-efficient [`crate::ops::attention`]; otherwise
/// [`plain_attention`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, choice: &AttentionChoice) -> Result<Tensor> {
    match mask {
        None if choice.memory_efficient() => crate::ops::attention(q, k, v, heads),
        _ => plain_attention(q, k, v, heads, mask),
    }
}

/// Attention as candle composes it (every score map kept for candle's backward). Scores and
/// softmax run in f32 for f16/bf16 inputs (diffusers' `upcast_softmax`).
pub fn plain_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Result<Tensor> {
    let d = q.dim(2)? / heads;
    plain_attention_scaled(q, k, v, heads, mask, 1.0 / (d as f64).sqrt())
}

/// [`plain_attention`] with the scores scaled by `scale` instead of 1/√d (T5 uses 1). The
/// scale is applied to q·kᵀ in the input dtype, as PyTorch does.
pub fn plain_attention_scaled(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, scale: f64) -> Result<Tensor> {
    let (b, nq, inner) = q.dims3()?;
    let nk = k.dim(1)?;
    let d = inner / heads;
    let split = |t: &Tensor, n: usize| t.reshape((b, n, heads, d))?.transpose(1, 2)?.contiguous();
    let q = split(q, nq)?;
    let k = split(k, nk)?;
    let v = split(v, nk)?;
    let dtype = q.dtype();
    let mut scores = q.matmul(&k.t()?)?;
    if scale != 1.0 {
        scores = (scores * scale)?;
    }
    if dtype == DType::F16 || dtype == DType::BF16 {
        scores = scores.to_dtype(DType::F32)?;
    }
    if let Some(m) = mask {
        scores = scores.broadcast_add(&m.to_dtype(scores.dtype())?)?;
    }
    let probs = softmax_last(&scores)?.to_dtype(dtype)?;
    let out = probs.matmul(&v)?; // (B, H, Nq, d)
    out.transpose(1, 2)?.reshape((b, nq, inner))
}

/// Nearest-neighbour upsampling of `(B, C, H, W)` to `(B, C, oh, ow)` with PyTorch's
/// `mode="nearest"` index rule (`src = floor(dst·in/out)`), from ops with a backward.
pub fn upsample_nearest(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if oh == 2 * h && ow == 2 * w {
        return x
            .reshape((b, c, h, 1, w, 1))?
            .broadcast_as((b, c, h, 2, w, 2))?
            .contiguous()?
            .reshape((b, c, oh, ow));
    }
    let idx = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let v: Vec<u32> = (0..n_out).map(|i| ((i * n_in) / n_out).min(n_in - 1) as u32).collect();
        Tensor::new(v, x.device())
    };
    x.index_select(&idx(h, oh)?, 2)?.index_select(&idx(w, ow)?, 3)
}
