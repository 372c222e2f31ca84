//! Network adapters: the 13 LoRA-family algorithms of `reference/network-options.md` (plus
//! `train_norm`) as candle modules, with the math of LyCORIS / sd-scripts
//! (`reference/algorithms.md`).
//!
//! # Shape of the API
//!
//! A model layer is described by a [`BaseLayer`] (its [`LayerKind`] and frozen weight/bias).
//! [`build_adapter`] makes a freshly initialised adapter for it; [`adapter_from_tensors`]
//! makes one with exact parameters (a saved file, a parity fixture, a resumed checkpoint).
//! Both return a `Box<dyn` [`Adapter`]`>`, which
//! - runs the adapted layer ([`Adapter::forward`]; rebuild or bypass mode, multiplier,
//!   dropouts while training),
//! - reports its update ([`Adapter::delta_weight`], [`Adapter::merged_weight`]),
//! - lists what the optimizer trains ([`Adapter::trainable`]) and what a file stores
//!   ([`Adapter::state_tensors`]) under the exact LyCORIS / kohya tensor names.
//!
//! Every op used has a backward in candle (no fused softmax / layer_norm / rms_norm), and the
//! tests check that every trainable tensor receives a non-zero gradient.
//!
//! Tests: `cargo test -p loft-worker networks` (unit tests next to each algorithm: shapes, ΔW
//! against independent f64 loops, rebuild/bypass/reload equivalence, gradients, a fit) and
//! `cargo test -p loft-worker --test network_parity` (fixtures from the Python references).
//!
//! # Deliberate differences from upstream (all where upstream is wrong or inconsistent)
//! - LoHa/LoKr: ΔW is scaled once (LyCORIS's `get_diff_weight` scales twice).
//! - LoKr and GLoRA bypass apply alpha/r exactly once (LyCORIS 3.x omits or squares it).
//! - GLoRA and GLoRA-Ex save alpha·√r with `rs_lora` like the other algorithms (LyCORIS saves
//!   the raw alpha, so its own loader reads a different scale).
//! - DyLoRA trains with scale alpha/(active rank); see [`dylora`] for why.
//! - FULL applies the multiplier once (LyCORIS multiplies the diff twice when m ≠ 1).
//! - DIAG-OFT bypass with `rescaled` rescales the rotated output only.
//! - GLoRA bypass rank dropout keeps ranks with probability 1−p (LyCORIS keeps them with p).

pub mod abba;
pub mod boft;
pub(crate) mod common;
pub mod diag_oft;
pub mod dylora;
pub mod factorization;
pub mod full;
mod fused;
pub mod glora;
pub mod glora_ex;
pub mod ia3;
pub mod locon;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod norm;
pub mod options;
pub(crate) mod split_lora;

#[cfg(test)]
pub(crate) mod testutil;

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use common::conv_op;
pub use factorization::{factorization, power2factorization};
pub use options::NetworkOptions;

/// The network algorithms, with the names the job config and the field registry use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkAlgo {
    /// kohya LoRA (`networks.lora`): Linear and 1×1 conv; k×k conv only with `conv_dim`.
    Lora,
    /// kohya LoCon: the same module with `conv_dim` for k×k convolutions.
    Locon,
    /// LyCORIS LoCon (`algo=locon` / `lora`), with Tucker, DoRA, scalar, bypass, rs_lora.
    LycorisLocon,
    /// LyCORIS LoHa (Hadamard product of two low-rank products).
    Loha,
    /// LyCORIS (IA)³: a learned per-channel scale.
    Ia3,
    /// LyCORIS LoKr (Kronecker product).
    Lokr,
    /// LyCORIS DyLoRA (`block_size`).
    Dylora,
    /// LyCORIS DIAG-OFT (block-diagonal orthogonal rotation).
    DiagOft,
    /// LyCORIS BOFT (butterfly orthogonal rotation).
    Boft,
    /// LyCORIS GLoRA.
    Glora,
    /// GLoRA-Extended (Ktiseos-Nyx fork), rebuild mode only.
    GloraEx,
    /// ABBA (Hadamard product of two LoRAs, SVD-initialised).
    Abba,
    /// LyCORIS FULL (train the whole weight, save the difference).
    Full,
}

impl NetworkAlgo {
    pub const ALL: [NetworkAlgo; 13] = [
        NetworkAlgo::Lora,
        NetworkAlgo::Locon,
        NetworkAlgo::LycorisLocon,
        NetworkAlgo::Loha,
        NetworkAlgo::Ia3,
        NetworkAlgo::Lokr,
        NetworkAlgo::Dylora,
        NetworkAlgo::DiagOft,
        NetworkAlgo::Boft,
        NetworkAlgo::Glora,
        NetworkAlgo::GloraEx,
        NetworkAlgo::Abba,
        NetworkAlgo::Full,
    ];

    /// The serde / config name (`lora`, `lycoris_locon`, `diag_oft`, …).
    pub fn name(self) -> &'static str {
        match self {
            NetworkAlgo::Lora => "lora",
            NetworkAlgo::Locon => "locon",
            NetworkAlgo::LycorisLocon => "lycoris_locon",
            NetworkAlgo::Loha => "loha",
            NetworkAlgo::Ia3 => "ia3",
            NetworkAlgo::Lokr => "lokr",
            NetworkAlgo::Dylora => "dylora",
            NetworkAlgo::DiagOft => "diag_oft",
            NetworkAlgo::Boft => "boft",
            NetworkAlgo::Glora => "glora",
            NetworkAlgo::GloraEx => "glora_ex",
            NetworkAlgo::Abba => "abba",
            NetworkAlgo::Full => "full",
        }
    }

    /// sd-scripts' own `networks.lora` (kohya LoRA / LoCon) rather than LyCORIS.
    pub fn is_kohya(self) -> bool {
        matches!(self, NetworkAlgo::Lora | NetworkAlgo::Locon)
    }

    /// Algorithms with weight decomposition (`dora_wd`).
    pub fn supports_dora(self) -> bool {
        matches!(self, NetworkAlgo::LycorisLocon | NetworkAlgo::Loha | NetworkAlgo::Lokr | NetworkAlgo::Abba)
    }
}

/// The kind and geometry of a layer an adapter wraps.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerKind {
    /// `nn.Linear`: weight `(out_features, in_features)`; input `(…, in_features)`.
    Linear { in_features: usize, out_features: usize },
    /// `nn.Conv2d` (dilation 1, one group): weight `(out, in, kh, kw)`; input `(B, in, H, W)`.
    Conv2d { in_channels: usize, out_channels: usize, kernel: (usize, usize), stride: usize, padding: usize },
    /// `nn.LayerNorm` over the last dimension (only adapted with `train_norm`).
    LayerNorm { features: usize, eps: f64 },
    /// `nn.GroupNorm` over `(B, C, …)` (only adapted with `train_norm`).
    GroupNorm { groups: usize, channels: usize, eps: f64 },
}

impl LayerKind {
    /// The weight's shape.
    pub fn weight_shape(&self) -> Vec<usize> {
        match self {
            LayerKind::Linear { in_features, out_features } => vec![*out_features, *in_features],
            LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
                vec![*out_channels, *in_channels, kernel.0, kernel.1]
            }
            LayerKind::LayerNorm { features, .. } => vec![*features],
            LayerKind::GroupNorm { channels, .. } => vec![*channels],
        }
    }

    pub fn out_dim(&self) -> usize {
        self.weight_shape()[0]
    }

    /// Input width (channels for conv; the normalised width for norms).
    pub fn in_dim(&self) -> usize {
        let s = self.weight_shape();
        if s.len() > 1 {
            s[1]
        } else {
            s[0]
        }
    }

    pub fn is_norm(&self) -> bool {
        matches!(self, LayerKind::LayerNorm { .. } | LayerKind::GroupNorm { .. })
    }
}

/// A frozen layer of the model: its kind, weight and bias. Cloning is cheap (candle tensors
/// are reference counted), so adapters keep a clone of the weight they were built for.
#[derive(Clone, Debug)]
pub struct BaseLayer {
    pub kind: LayerKind,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl BaseLayer {
    /// A Linear layer; the kind is read from the weight's shape `(out, in)`.
    pub fn linear(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        let layer = Self { kind: LayerKind::Linear { in_features, out_features }, weight, bias };
        layer.check()?;
        Ok(layer)
    }

    /// A Conv2d layer; the kind is read from the weight's shape `(out, in, kh, kw)`.
    pub fn conv2d(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Result<Self> {
        let (out_channels, in_channels, kh, kw) = weight.dims4()?;
        let kind = LayerKind::Conv2d { in_channels, out_channels, kernel: (kh, kw), stride, padding };
        let layer = Self { kind, weight, bias };
        layer.check()?;
        Ok(layer)
    }

    /// Checks that the weight and bias shapes agree with the kind.
    pub fn check(&self) -> Result<()> {
        let want = self.kind.weight_shape();
        if self.weight.dims() != want.as_slice() {
            bail!("base layer weight has shape {:?} but {:?} needs {:?}", self.weight.dims(), self.kind, want);
        }
        if let Some(b) = &self.bias {
            if b.dims() != [want[0]] {
                bail!("base layer bias has shape {:?} but needs [{}]", b.dims(), want[0]);
            }
        }
        if let LayerKind::Conv2d { stride, .. } = self.kind {
            if stride == 0 {
                bail!("conv stride must be at least 1");
            }
        }
        if let LayerKind::GroupNorm { groups, channels, .. } = self.kind {
            if groups == 0 || channels % groups != 0 {
                bail!("GroupNorm needs channels ({channels}) divisible by groups ({groups})");
            }
        }
        Ok(())
    }

    /// The original layer: `org(x)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, &self.weight, self.bias.as_ref())
    }

    /// The layer's op with another weight and bias (e.g. a merged W′).
    pub fn forward_with(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        match &self.kind {
            LayerKind::Linear { .. } | LayerKind::Conv2d { .. } => common::layer_op(&self.kind, x, weight, bias),
            LayerKind::LayerNorm { eps, .. } => norm::layer_norm(x, weight, bias, *eps),
            LayerKind::GroupNorm { groups, eps, .. } => norm::group_norm(x, *groups, weight, bias, *eps),
        }
    }
}

/// One adapter attached to one layer.
///
/// Conventions: the multiplier m is the adapter's current strength (from
/// [`NetworkOptions::multiplier`], changeable with [`Adapter::set_multiplier`]); dropouts and
/// random ranks act only when `train` is true; every tensor is in the adapter's parameter
/// dtype (f32, or f64 for an f64 base) except `forward`'s output, which follows `x`.
pub trait Adapter: Send + Sync {
    /// The algorithm's config name (`lora`, `lokr`, …; `norm` for train_norm adapters).
    fn algo_name(&self) -> &'static str;

    /// ΔW = W′ − W at multiplier 1, without dropout, shaped like the base weight. Includes the
    /// alpha scale and `use_scalar`. For the non-additive algorithms (DoRA, IA3, DIAG-OFT, BOFT)
    /// it is the difference their W′ makes. For norms it is `w_norm`.
    fn delta_weight(&self) -> Result<Tensor>;

    /// The bias difference at multiplier 1, where the algorithm changes the bias (FULL's
    /// `diff_b`, GLoRA-Ex, train_norm's `b_norm`); `None` otherwise.
    fn delta_bias(&self) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// The layer's output with the adapter applied (rebuild or bypass mode per options).
    /// `base` must be the layer the adapter was built for.
    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor>;

    /// W′ at the current multiplier (what merging the adapter into the model writes).
    fn merged_weight(&self, base: &BaseLayer) -> Result<Tensor>;

    /// b′ at the current multiplier (the base bias where the algorithm leaves it alone).
    fn merged_bias(&self, base: &BaseLayer) -> Result<Option<Tensor>> {
        Ok(base.bias.clone())
    }

    /// The variables an optimizer updates, named as in the saved file (`lora_down.weight`,
    /// `hada_w1_a`, `lokr_w2_b`, `oft_blocks`, `dora_scale`, `a1.weight`, …; plus `scalar`
    /// with `use_scalar`, which is folded into another tensor on save).
    fn trainable(&self) -> Vec<(String, Var)>;

    /// What a file stores for this layer, under the LyCORIS / kohya names, with `alpha`
    /// (rs_lora folded in) and `use_scalar` folded in as LyCORIS does on save. Keys are
    /// relative to the layer (`lora_up.weight`, not `lora_unet_….lora_up.weight`).
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;

    /// Current multiplier m.
    fn multiplier(&self) -> f64;

    /// Changes m (e.g. for samples at another strength).
    fn set_multiplier(&mut self, multiplier: f64);
}

/// A kohya LoRA split by output rows (`split_qkv`): one rank-`opts.dim` LoRA per piece of
/// `rows`, saved as one block-diagonal LoRA (see [`split_lora`]).
pub fn build_split_lora(opts: &NetworkOptions, base: &BaseLayer, layer_name: &str, rows: &[usize]) -> Result<Box<dyn Adapter>> {
    opts.validate(NetworkAlgo::Lora).map_err(|e| candle_core::Error::Msg(format!("layer {layer_name}: {e}")))?;
    Ok(Box::new(split_lora::build(opts, base, layer_name, rows)?))
}

/// [`build_split_lora`] continuing from saved tensors (refused unless they were saved by one).
pub fn split_lora_from_tensors(opts: &NetworkOptions, base: &BaseLayer, tensors: &HashMap<String, Tensor>, layer_name: &str, rows: &[usize]) -> Result<Box<dyn Adapter>> {
    Ok(Box::new(split_lora::from_tensors(opts, base, tensors, layer_name, rows)?))
}

/// Builds a freshly initialised adapter of `algo` for `base`.
///
/// `layer_name` names the layer in error messages and seeds the initial values (with
/// [`NetworkOptions::seed`]). A norm layer (`LayerNorm`/`GroupNorm`) gets a train_norm
/// adapter when `train_norm` is on. Invalid combinations (a rank that cannot factor the
/// layer, odd widths for BOFT, DyLoRA ranks that are not multiples of the block size, …)
/// return an error naming the layer and the rule.
pub fn build_adapter(
    algo: NetworkAlgo,
    opts: &NetworkOptions,
    base: &BaseLayer,
    layer_name: &str,
) -> Result<Box<dyn Adapter>> {
    opts.validate(algo).map_err(|e| candle_core::Error::Msg(format!("layer {layer_name}: {e}")))?;
    if base.kind.is_norm() {
        if !opts.train_norm {
            bail!("layer {layer_name}: norm layers are adapted only with train_norm");
        }
        return Ok(Box::new(norm::NormAdapter::new(opts, base, layer_name)?));
    }
    let Some((rank, alpha)) = opts.rank_alpha_for(algo, &base.kind) else {
        bail!(
            "layer {layer_name}: {} does not adapt a {:?} layer without conv_dim (kohya LoRA adapts \
             Linear and 1×1 conv layers; set conv_dim for k×k convolutions)",
            algo.name(),
            base.kind
        );
    };
    match algo {
        NetworkAlgo::Lora | NetworkAlgo::Locon => lora::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::LycorisLocon => locon::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::Loha => loha::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::Ia3 => ia3::build(opts, base, layer_name),
        NetworkAlgo::Lokr => lokr::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::Dylora => dylora::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::DiagOft => diag_oft::build(opts, base, layer_name, rank),
        NetworkAlgo::Boft => boft::build(opts, base, layer_name, rank),
        NetworkAlgo::Glora => glora::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::GloraEx => glora_ex::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::Abba => abba::build(opts, base, layer_name, rank, alpha),
        NetworkAlgo::Full => full::build(opts, base, layer_name),
    }
}

/// Builds an adapter of `algo` for `base` with exactly the given parameters, keyed as in a
/// saved file (relative to the layer: `lora_up.weight`, `hada_w1_a`, `alpha`, …). Structure
/// (rank, Tucker, LoKr's full/decomposed sides, DoRA orientation, `rescale`, `on_input`) is
/// read from the tensors; run-time options (multiplier, bypass_mode, dropouts, DyLoRA's
/// block_size) come from `opts`. The scale is `alpha/r` with the stored alpha, which is how
/// every loader reads a file; `use_scalar` is already folded in, so no scalar is trained.
pub fn adapter_from_tensors(
    algo: NetworkAlgo,
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
) -> Result<Box<dyn Adapter>> {
    adapter_from_tensors_named(algo, opts, base, tensors, "<loaded>")
}

/// [`adapter_from_tensors`] with a layer name for error messages.
pub fn adapter_from_tensors_named(
    algo: NetworkAlgo,
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer_name: &str,
) -> Result<Box<dyn Adapter>> {
    if base.kind.is_norm() {
        return Ok(Box::new(norm::NormAdapter::from_tensors(opts, base, tensors, layer_name)?));
    }
    match algo {
        NetworkAlgo::Lora | NetworkAlgo::Locon => lora::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::LycorisLocon => locon::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Loha => loha::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Ia3 => ia3::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Lokr => lokr::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Dylora => dylora::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::DiagOft => diag_oft::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Boft => boft::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Glora => glora::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::GloraEx => glora_ex::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Abba => abba::from_tensors(opts, base, tensors, layer_name),
        NetworkAlgo::Full => full::from_tensors(opts, base, tensors, layer_name),
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use candle_core::DType;

    /// Options under which every algorithm adapts the standard test layers (out = 16).
    fn opts_for(algo: NetworkAlgo) -> NetworkOptions {
        let mut o = NetworkOptions { dim: 4, alpha: 2.0, block_size: 2, ..Default::default() };
        if algo.is_kohya() {
            o.conv_dim = Some(4);
            o.conv_alpha = Some(2.0);
        }
        o
    }

    #[test]
    fn algo_names_round_trip_through_serde() {
        let names = [
            "lora",
            "locon",
            "lycoris_locon",
            "loha",
            "ia3",
            "lokr",
            "dylora",
            "diag_oft",
            "boft",
            "glora",
            "glora_ex",
            "abba",
            "full",
        ];
        for (algo, name) in NetworkAlgo::ALL.iter().zip(names) {
            assert_eq!(algo.name(), name);
            assert_eq!(serde_json::to_string(algo).unwrap(), format!("\"{name}\""));
            let back: NetworkAlgo = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(back, *algo);
        }
    }

    #[test]
    fn options_deserialize_with_upstream_names_and_defaults() {
        let o: NetworkOptions =
            serde_json::from_str(r#"{"network_dim": 8, "network_alpha": 4, "use_cp": true, "unit": 2}"#).unwrap();
        assert_eq!((o.dim, o.alpha, o.use_tucker, o.block_size), (8, 4.0, true, 2));
        assert_eq!(o.factor, -1);
        assert!(o.wd_on_output, "LyCORIS's default");
        let msg = NetworkOptions { dropout: 1.5, ..Default::default() }.validate(NetworkAlgo::Loha).err().unwrap();
        assert!(msg.to_string().contains("dropout must be in [0, 1)"));
    }

    #[test]
    fn every_algorithm_on_every_layer_kind() -> Result<()> {
        for algo in NetworkAlgo::ALL {
            let o = opts_for(algo);
            for (base, x) in standard_cases()? {
                let a = build_adapter(algo, &o, &base, "all")?;
                assert_eq!(a.delta_weight()?.dims(), base.weight.dims(), "{}", algo.name());
                let y0 = base.forward(&x)?;
                let y = a.forward(&base, &x, false)?;
                assert_eq!(y.dims(), y0.dims(), "{}", algo.name());
                // Every adapter starts as the identity (up to ABBA's/DoRA's float noise).
                assert_close(&y, &y0, 1e-5, &format!("{} starts at identity", algo.name()));
                // Trainable names are file names (or the folded scalar).
                let state = state_map(a.as_ref())?;
                for (name, _) in a.trainable() {
                    assert!(name == "scalar" || state.contains_key(&name), "{}: `{name}` not saved", algo.name());
                }
                randomize(a.as_ref(), 99)?;
                let reload = adapter_from_tensors(algo, &o, &base, &state_map(a.as_ref())?)?;
                assert_close(&reload.forward(&base, &x, false)?, &a.forward(&base, &x, false)?, 1e-5, algo.name());
            }
        }
        Ok(())
    }

    /// The same layer with its weight and bias in `dtype`.
    fn layer_in(base: &BaseLayer, dtype: DType) -> Result<BaseLayer> {
        Ok(BaseLayer { kind: base.kind.clone(), weight: base.weight.to_dtype(dtype)?, bias: base.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()? })
    }

    /// Every algorithm, rebuild and bypass, on every standard layer: `check(algo, options, the
    /// f32 layer, its input, a randomised f32 adapter, that adapter's output, the layer in f16)`.
    fn each_half_case(mut check: impl FnMut(NetworkAlgo, &NetworkOptions, &Tensor, &dyn Adapter, &Tensor, &BaseLayer) -> Result<()>) -> Result<()> {
        for algo in NetworkAlgo::ALL {
            for bypass in [false, true] {
                let mut o = opts_for(algo);
                o.bypass_mode = bypass && !matches!(algo, NetworkAlgo::Full | NetworkAlgo::GloraEx);
                for (base, x) in standard_cases()? {
                    let a = build_adapter(algo, &o, &base, "half")?;
                    randomize(a.as_ref(), 5)?;
                    let want = a.forward(&base, &x, false)?;
                    check(algo, &o, &x, a.as_ref(), &want, &layer_in(&base, DType::F16)?)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn half_precision_trained_tensors_work() -> Result<()> {
        // full_fp16: every algorithm's trained tensors in f16 over an f16 layer (sd-scripts'
        // network.to(fp16)): the same initial values as f32 rounded to f16, an f16 output close
        // to the f32 adapter's, and an f16 gradient for every trained tensor.
        each_half_case(|algo, o, x, a, want, half| {
            let oh = NetworkOptions { param_dtype: Some(DType::F16), ..o.clone() };
            let fresh = build_adapter(algo, &oh, half, "half")?;
            // Initial values drawn in f32 (over the same, f16-rounded, layer: ABBA starts from
            // its SVD) and cast.
            let fresh32: HashMap<String, Var> = build_adapter(algo, o, &layer_in(half, DType::F32)?, "half")?.trainable().into_iter().collect();
            for (name, v) in fresh.trainable() {
                assert_eq!(v.dtype(), DType::F16, "{} {name}", algo.name());
                let rounded = fresh32[&name].as_tensor().to_dtype(DType::F16)?.to_dtype(DType::F32)?;
                assert_close(&v.as_tensor().to_dtype(DType::F32)?, &rounded, 0.0, &format!("{} {name}: f32 init cast", algo.name()));
            }
            let ah = adapter_from_tensors(algo, &oh, half, &state_map(a)?)?;
            let y = ah.forward(half, &x.to_dtype(DType::F16)?, true)?;
            assert_eq!(y.dtype(), DType::F16, "{}", algo.name());
            assert_close(&y.to_dtype(DType::F32)?, want, 2e-2, &format!("{} with f16 parameters", algo.name()));
            let grads = y.to_dtype(DType::F32)?.sqr()?.sum_all()?.backward()?;
            for (name, v) in ah.trainable() {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{} {name}: no gradient", algo.name()));
                assert_eq!((v.dtype(), g.dtype()), (DType::F16, DType::F16), "{} {name}", algo.name());
                let g: Vec<f32> = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|v| *v != 0.0), "{} {name}: gradient {g:?}", algo.name());
            }
            Ok(())
        })
    }

    #[test]
    fn half_precision_base_layers_work() -> Result<()> {
        // Adapters keep f32 parameters; a f16 base and f16 activations give a f16 output close to
        // the all-f32 result.
        each_half_case(|algo, o, x, a, want, half| {
            let ah = adapter_from_tensors(algo, o, half, &state_map(a)?)?;
            let y = ah.forward(half, &x.to_dtype(DType::F16)?, false)?;
            assert_eq!(y.dtype(), DType::F16, "{}", algo.name());
            assert_close(&y.to_dtype(DType::F32)?, want, 2e-2, &format!("{} in f16", algo.name()));
            Ok(())
        })
    }
}
