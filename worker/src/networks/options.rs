//! Typed network options: the sd-scripts / LyCORIS `network_args` of every algorithm, with
//! their upstream names and defaults, and the cross-field rules that make a combination
//! invalid.

use candle_core::{bail, Result};
use serde::{Deserialize, Serialize};

use super::{LayerKind, NetworkAlgo};

/// Every option an adapter reads. Field names are the sd-scripts argument or LyCORIS
/// `network_args` key; defaults follow `lycoris/kohya.py` and sd-scripts `train_network.py`.
/// Options that do not apply to the chosen algorithm are ignored by it (see
/// `reference/network-options.md` for which algorithm shows which option).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NetworkOptions {
    /// `network_dim`: the rank r (LoKr: the rank of the decomposed side; DIAG-OFT/BOFT: the
    /// block-size hint passed to `factorization`/`power2factorization`).
    #[serde(alias = "network_dim", alias = "rank")]
    pub dim: usize,
    /// `network_alpha`; 0 means "alpha = r" (scale 1). sd-scripts' default is 1.
    #[serde(alias = "network_alpha")]
    pub alpha: f64,
    /// `conv_dim`: rank for k×k convolutions (k > 1). `None`: kohya adapts no k×k conv;
    /// LyCORIS uses `dim`. 1×1 convolutions always use `dim`.
    pub conv_dim: Option<usize>,
    /// `conv_alpha`. `None`: kohya uses 1.0, LyCORIS uses `alpha`.
    pub conv_alpha: Option<f64>,
    /// `dropout` (`--network_dropout`): element dropout on the adapter's bypass output
    /// (kohya: after lora_down). Rebuild mode ignores it, as LyCORIS does.
    pub dropout: f64,
    /// `rank_dropout`: keep-mask over ranks (bypass LoCon, kohya) or over output rows of ΔW.
    pub rank_dropout: f64,
    /// `rank_dropout_scale`: divide the rank mask by its mean.
    pub rank_dropout_scale: bool,
    /// `module_dropout`: probability that a training step skips the adapter.
    pub module_dropout: f64,
    /// `multiplier` (network_multiplier): the strength m.
    pub multiplier: f64,
    /// `dora_wd`: weight decomposition (LyCORIS LoCon, LoHa, LoKr, ABBA).
    pub dora_wd: bool,
    /// `wd_on_output`: DoRA magnitude per output row (true, LyCORIS's default) or per input
    /// column (false).
    pub wd_on_output: bool,
    /// `use_tucker` (also `use_cp`, `use_conv_cp`): Tucker decomposition of k×k convs.
    #[serde(alias = "use_cp", alias = "use_conv_cp")]
    pub use_tucker: bool,
    /// Loft's "Orthogonalize": initialise the down projection (lora_down, LoKr's w1 side,
    /// GLoRA's a1) with orthonormal rows — the Q factor of a Gaussian matrix — instead of
    /// kaiming-uniform. Not an upstream LyCORIS 4.1.3 argument.
    pub orthogonalize: bool,
    /// `rs_lora`: scale alpha/√r; the saved alpha becomes alpha·√r.
    pub rs_lora: bool,
    /// `train_norm`: also train LayerNorm/GroupNorm weight and bias (`w_norm`, `b_norm`).
    pub train_norm: bool,
    /// `use_scalar`: a trainable scalar (starting at 0) multiplies ΔW; folded in on save.
    pub use_scalar: bool,
    /// `bypass_mode`: y = org(x) + m·f_ΔW(x) instead of rebuilding W′.
    pub bypass_mode: bool,
    /// IA3 `train_on_input`: scale the input columns instead of the output rows.
    pub train_on_input: bool,
    /// LoKr `factor`; −1 picks the most balanced split.
    pub factor: i64,
    /// LoKr `unbalanced_factorization`: swap the output split.
    pub unbalanced_factorization: bool,
    /// LoKr `full_matrix`: always use a full w2.
    pub full_matrix: bool,
    /// LoKr `decompose_both`: also factor w1 when r < max(a, c)/2.
    pub decompose_both: bool,
    /// DyLoRA `block_size` (LyCORIS) = `unit` (kohya) = "DyLoRA Unit".
    #[serde(alias = "unit", alias = "dylora_unit")]
    pub block_size: usize,
    /// DIAG-OFT/BOFT `constraint`: 0 is off; otherwise ‖Q‖_F is capped at constraint·out.
    pub constraint: f64,
    /// DIAG-OFT/BOFT `rescaled`: a trainable per-row `rescale`.
    pub rescaled: bool,
    /// Seed for initial values and dropout masks (mixed with a hash of the layer name).
    pub seed: u64,
    /// The dtype of the trained tensors: `None` keeps them f32 (f64 over an f64 layer);
    /// `full_fp16` / `full_bf16` train them in half precision, as sd-scripts' `network.to(weight_dtype)`
    /// does. Initial values are drawn in f32 and then cast, as there.
    #[serde(skip)]
    pub param_dtype: Option<candle_core::DType>,
}

impl Default for NetworkOptions {
    fn default() -> Self {
        Self {
            dim: 4,
            alpha: 1.0,
            conv_dim: None,
            conv_alpha: None,
            dropout: 0.0,
            rank_dropout: 0.0,
            rank_dropout_scale: false,
            module_dropout: 0.0,
            multiplier: 1.0,
            dora_wd: false,
            wd_on_output: true,
            use_tucker: false,
            orthogonalize: false,
            rs_lora: false,
            train_norm: false,
            use_scalar: false,
            bypass_mode: false,
            train_on_input: false,
            factor: -1,
            unbalanced_factorization: false,
            full_matrix: false,
            decompose_both: false,
            block_size: 4,
            constraint: 0.0,
            rescaled: false,
            seed: 0,
            param_dtype: None,
        }
    }
}

impl NetworkOptions {
    /// The `(rank, alpha)` an adapter of `algo` uses on a layer of this kind, or `None` when
    /// the algorithm does not adapt it:
    /// - Linear and 1×1 conv: `(dim, alpha)`.
    /// - k×k conv, kohya (`lora`, `locon`): `(conv_dim, conv_alpha or 1.0)`, none without
    ///   `conv_dim`.
    /// - k×k conv, LyCORIS: `(conv_dim or dim, conv_alpha or alpha)`.
    /// - Norm layers: only with `train_norm` (rank unused, reported as 0).
    pub fn rank_alpha_for(&self, algo: NetworkAlgo, kind: &LayerKind) -> Option<(usize, f64)> {
        match kind {
            LayerKind::Linear { .. } => Some((self.dim, self.alpha)),
            LayerKind::Conv2d { kernel, .. } if *kernel == (1, 1) => Some((self.dim, self.alpha)),
            LayerKind::Conv2d { .. } => {
                if algo.is_kohya() {
                    self.conv_dim.filter(|d| *d > 0).map(|d| (d, self.conv_alpha.unwrap_or(1.0)))
                } else {
                    let dim = self.conv_dim.filter(|d| *d > 0).unwrap_or(self.dim);
                    Some((dim, self.conv_alpha.unwrap_or(self.alpha)))
                }
            }
            LayerKind::LayerNorm { .. } | LayerKind::GroupNorm { .. } => {
                if self.train_norm {
                    Some((0, 0.0))
                } else {
                    None
                }
            }
        }
    }

    /// Cross-field rules that hold for every layer; one message per broken rule.
    pub fn validate(&self, algo: NetworkAlgo) -> Result<()> {
        let mut problems: Vec<String> = Vec::new();
        for (name, v) in
            [("dropout", self.dropout), ("rank_dropout", self.rank_dropout), ("module_dropout", self.module_dropout)]
        {
            if !(0.0..1.0).contains(&v) {
                problems.push(format!("{name} must be in [0, 1), got {v}"));
            }
        }
        if self.dim == 0 && !matches!(algo, NetworkAlgo::Ia3 | NetworkAlgo::Full) {
            problems.push("dim (network_dim) must be at least 1".into());
        }
        if self.alpha < 0.0 {
            problems.push(format!("alpha must be ≥ 0, got {}", self.alpha));
        }
        if self.constraint < 0.0 {
            problems.push(format!("constraint must be ≥ 0, got {}", self.constraint));
        }
        if self.dora_wd && self.bypass_mode && algo.supports_dora() {
            problems.push(
                "dora_wd needs rebuild mode: weight decomposition rescales the merged weight, \
                 which bypass mode never forms; turn bypass_mode off"
                    .into(),
            );
        }
        if self.dora_wd && !algo.supports_dora() {
            problems.push(format!("dora_wd is not available for {}", algo.name()));
        }
        if self.bypass_mode && matches!(algo, NetworkAlgo::Full | NetworkAlgo::GloraEx) {
            problems.push(format!("{} supports rebuild mode only; turn bypass_mode off", algo.name()));
        }
        if algo == NetworkAlgo::Dylora {
            if self.block_size == 0 {
                problems.push("block_size (DyLoRA unit) must be at least 1".into());
            } else if self.dim % self.block_size != 0 {
                problems.push(format!(
                    "DyLoRA needs dim to be a multiple of block_size: dim {} is not a multiple of {}",
                    self.dim, self.block_size
                ));
            }
            if let Some(cd) = self.conv_dim.filter(|d| *d > 0) {
                if self.block_size > 0 && cd % self.block_size != 0 {
                    problems.push(format!(
                        "DyLoRA needs conv_dim to be a multiple of block_size: {cd} is not a multiple of {}",
                        self.block_size
                    ));
                }
            }
        }
        if algo == NetworkAlgo::Abba && self.dim < 2 {
            problems.push("ABBA splits the rank into two halves and needs dim ≥ 2".into());
        }
        if algo == NetworkAlgo::Lokr && self.factor == 0 {
            problems.push("LoKr factor must be -1 or a positive number".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}
