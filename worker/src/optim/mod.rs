//! Optimizers for adapter training: AdamW, Lion, Prodigy and Adafactor, each a faithful port of
//! the step of its Python reference (checked step by step against fixtures made with the real
//! packages, see `tests/parity/make_optim_fixtures.py`).
//!
//! | Loft (`optimizer_type`) | reference |
//! |---|---|
//! | `AdamW`     | `torch.optim.AdamW` (decoupled weight decay, bias correction, eps outside the sqrt, amsgrad) |
//! | `AdamW8bit` | `bitsandbytes.optim.AdamW8bit` 0.50 (block-wise 8-bit moments, its CPU kernels' rounding) |
//! | `Lion`      | `lion_pytorch.Lion` 0.2.5 |
//! | `Prodigy`   | `prodigyopt.Prodigy` 1.1.2 (d estimate, d_coef, bias correction, safeguard warmup, decouple, growth rate) |
//! | `Adafactor` | `transformers.optimization.Adafactor` (factored second moment, relative step, scale parameter, warmup init, clipping, beta1) |
//!
//! ## Shape of the API
//!
//! Parameters come in [`ParamGroup`]s, each with its own base learning rate (the U-Net and the
//! text encoders are separate groups, as sd-scripts' `unet_lr` / `text_encoder_lr` make them).
//! Every parameter has a name unique across groups; the optimizer state is saved as named
//! tensors keyed by it ([`Optimizer::state`] / [`Optimizer::load_state`]), so a checkpoint can
//! be written with safetensors and resumed exactly.
//!
//! [`Optimizer::step`] takes the gradients (a candle [`GradStore`]) and the scheduler's multiplier
//! for this step: each group then steps with `group.lr * lr_scale`, as torch's `LambdaLR` sets
//! `lr = base_lr * lambda(step)`. A parameter without a gradient is skipped, as in torch.
//!
//! The math runs in f32 (parameters of any float dtype are read as f32 and written back in
//! their dtype); the scalar bookkeeping (step counts, Prodigy's d) is f64, as Python's floats
//! are. On the CPU it runs as host loops. On a GPU with the kernels on (the `cuda` build's
//! default) and f32 parameters, all five keep their state on the device and step every tensor
//! in one launch of worker/kernels/optim.cu (Prodigy two, with its d estimate read once between
//! them; Adafactor four, with Σp² read once for the lrs). Otherwise on a GPU, AdamW and Lion step
//! with tensor ops there (`ops::with_device_generic_ops` runs that path on the CPU for the
//! tests), and Prodigy, Adafactor and AdamW8bit step on the host (reading their tensors each step).
//!
//! Half-precision parameters (`full_fp16` / `full_bf16`): AdamW and Lion step them with their
//! tensor path in the parameter's dtype, states included, as torch does (each op rounds to the
//! half dtype; [`state_dtype`]); Adafactor and AdamW8bit compute in f32 and write the half
//! parameter back, as transformers and bitsandbytes do; Prodigy keeps its moments rounded to the
//! parameter's dtype ([`round_to`]).
//!
//! Also here: [`clip_grad_norm`] (torch's `clip_grad_norm_`), [`GradAccumulator`] (gradient
//! accumulation over micro-batches) and [`parse_optimizer_args`] (sd-scripts' `optimizer_args`).

// Element loops index several buffers in step; `!(x >= 0.0)` is meant to reject NaN too.
#![allow(clippy::needless_range_loop, clippy::neg_cmp_op_on_partial_ord)]

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{bail, DType, Device, Result, Tensor, Var};

pub mod adafactor;
pub mod adamw;
pub mod adamw8bit;
pub mod lion;
pub mod loss_scale;
pub mod prodigy;

pub use adafactor::{Adafactor, AdafactorConfig};
pub use adamw::{AdamW, AdamWConfig};
pub use adamw8bit::{AdamW8bit, AdamW8bitConfig};
pub use lion::{Lion, LionConfig};
pub use prodigy::{Prodigy, ProdigyConfig};

/// Parameters that share a learning rate.
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// `unet`, `text_encoder`, … (for logs and errors).
    pub name: String,
    /// Base learning rate; the step uses `lr * lr_scale`.
    pub lr: f64,
    /// `(unique name, variable)`.
    pub params: Vec<(String, Var)>,
}

impl ParamGroup {
    pub fn new(name: impl Into<String>, lr: f64, params: Vec<(String, Var)>) -> Self {
        Self {
            name: name.into(),
            lr,
            params,
        }
    }
}

/// What every optimizer offers the training loop.
pub trait Optimizer {
    /// The `optimizer_type` name (`AdamW`, `Lion`, `Prodigy`, `Adafactor`).
    fn kind(&self) -> &'static str;
    fn groups(&self) -> &[ParamGroup];
    /// One update of every parameter that has a gradient in `grads`, with group learning rates
    /// `group.lr * lr_scale`.
    fn step(&mut self, grads: &GradStore, lr_scale: f64) -> Result<()>;
    /// The whole state as named f32/f64 CPU tensors (`param.<name>.<buffer>`, `optim.<scalar>`).
    fn state(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores what [`Optimizer::state`] returned (names and shapes are checked).
    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
    /// The learning rate each group actually uses at `lr_scale` (for telemetry): Prodigy's
    /// `d·lr`, Adafactor's relative step where it sets its own.
    fn effective_lrs(&self, lr_scale: f64) -> Vec<f64> {
        self.groups().iter().map(|g| g.lr * lr_scale).collect()
    }
}

/// Builds an optimizer from the registry's `optimizer_type` and the `optimizer_args` pairs.
pub fn build(
    optimizer_type: &str,
    groups: Vec<ParamGroup>,
    args: &BTreeMap<String, String>,
) -> Result<Box<dyn Optimizer>> {
    Ok(match optimizer_type {
        "AdamW" => Box::new(AdamW::new(groups, AdamWConfig::from_args(args)?)?),
        "Lion" => Box::new(Lion::new(groups, LionConfig::from_args(args)?)?),
        "Prodigy" => Box::new(Prodigy::new(groups, ProdigyConfig::from_args(args)?)?),
        "Adafactor" => Box::new(Adafactor::new(groups, AdafactorConfig::from_args(args)?)?),
        "AdamW8bit" => Box::new(AdamW8bit::new(groups, AdamW8bitConfig::from_args(args)?)?),
        other => bail!("unknown optimizer_type {other:?} (AdamW, AdamW8bit, Lion, Prodigy, Adafactor)"),
    })
}

// ------------------------------------------------------------------------------------ args

/// Parses sd-scripts' `--optimizer_args` text: space-separated `key=value` pairs, e.g.
/// `betas=0.9,0.99 eps=1e-8 weight_decay=0.01`. Values keep their text; each optimizer's
/// `from_args` reads the keys it knows and rejects the rest by name.
pub fn parse_optimizer_args(text: &str) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for pair in text.split_whitespace() {
        let Some((k, v)) = pair.split_once('=') else {
            bail!("optimizer_args: {pair:?} is not key=value");
        };
        let k = k.trim();
        if k.is_empty() {
            bail!("optimizer_args: {pair:?} has no key");
        }
        out.insert(k.to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Typed reads of `optimizer_args` values (Python spellings: `True`/`False`, `None`,
/// tuples as `0.9,0.99` or `(0.9, 0.99)`).
pub(crate) struct Args<'a> {
    map: &'a BTreeMap<String, String>,
    used: Vec<&'static str>,
    optimizer: &'static str,
}

impl<'a> Args<'a> {
    pub(crate) fn new(optimizer: &'static str, map: &'a BTreeMap<String, String>) -> Self {
        Self {
            map,
            used: Vec::new(),
            optimizer,
        }
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a str> {
        self.used.push(key);
        self.map.get(key).map(|s| s.as_str())
    }

    pub(crate) fn f64(&mut self, key: &'static str, default: f64) -> Result<f64> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => parse_f64(v).ok_or_else(|| self.bad(key, v, "a number")),
        }
    }

    /// A number or `None`.
    pub(crate) fn opt_f64(
        &mut self,
        key: &'static str,
        default: Option<f64>,
    ) -> Result<Option<f64>> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) if v == "None" || v == "none" => Ok(None),
            Some(v) => parse_f64(v)
                .map(Some)
                .ok_or_else(|| self.bad(key, v, "a number or None")),
        }
    }

    pub(crate) fn bool(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(self.bad(key, v, "True or False")),
            },
        }
    }

    pub(crate) fn pair(&mut self, key: &'static str, default: (f64, f64)) -> Result<(f64, f64)> {
        match self.raw(key) {
            None => Ok(default),
            Some(v) => {
                let parts: Vec<Option<f64>> = v
                    .trim_matches(|c| c == '(' || c == ')' || c == '[' || c == ']')
                    .split(',')
                    .map(|s| parse_f64(s.trim()))
                    .collect();
                match parts.as_slice() {
                    [Some(a), Some(b)] => Ok((*a, *b)),
                    _ => Err(self.bad(key, v, "two numbers, e.g. 0.9,0.999")),
                }
            }
        }
    }

    /// Rejects keys nobody read.
    pub(crate) fn finish(self) -> Result<()> {
        for k in self.map.keys() {
            if !self.used.contains(&k.as_str()) {
                bail!(
                    "optimizer_args: {} has no option {k:?} (it knows: {})",
                    self.optimizer,
                    self.used.join(", ")
                );
            }
        }
        Ok(())
    }

    fn bad(&self, key: &str, v: &str, want: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "optimizer_args: {} {key}={v:?} must be {want}",
            self.optimizer
        ))
    }
}

fn parse_f64(s: &str) -> Option<f64> {
    match s {
        "inf" | "float('inf')" | "float(\"inf\")" => Some(f64::INFINITY),
        _ => s.parse().ok(),
    }
}

// ------------------------------------------------------------------------------------ shared plumbing

/// The parameters of all groups, flattened, with their group index; checks names are unique.
pub(crate) fn check_groups(kind: &str, groups: &[ParamGroup]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for g in groups {
        if !(g.lr >= 0.0) || !g.lr.is_finite() {
            bail!(
                "{kind}: group {:?} has learning rate {} (must be finite, ≥ 0)",
                g.name,
                g.lr
            );
        }
        for (name, var) in &g.params {
            if !seen.insert(name.clone()) {
                bail!("{kind}: parameter name {name:?} appears twice");
            }
            if !var.dtype().is_float() {
                bail!(
                    "{kind}: parameter {name:?} has dtype {:?}, not a float",
                    var.dtype()
                );
            }
        }
    }
    Ok(())
}

/// Adam-style hyper-parameters: betas in [0, 1), eps and weight decay ≥ 0.
pub(crate) fn check_adam_hyper(kind: &str, betas: (f64, f64), eps: f64, weight_decay: f64) -> Result<()> {
    let (b1, b2) = betas;
    if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
        bail!("{kind}: betas must be in [0, 1), got {betas:?}");
    }
    if !(eps >= 0.0) || !(weight_decay >= 0.0) {
        bail!("{kind}: eps and weight_decay must be ≥ 0");
    }
    Ok(())
}

/// A tensor's values as f32 on the host.
pub(crate) fn read(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

/// The gradient of `var` as f32 values, if it has one (its shape is checked).
pub(crate) fn grad_of(grads: &GradStore, name: &str, var: &Var) -> Result<Option<Vec<f32>>> {
    match grads.get(var.as_tensor()) {
        None => Ok(None),
        Some(g) => {
            if g.dims() != var.dims() {
                bail!(
                    "gradient of {name:?} has shape {:?}, parameter {:?}",
                    g.dims(),
                    var.dims()
                );
            }
            Ok(Some(read(g)?))
        }
    }
}

/// The gradient of `var` as a detached f32 tensor on its device, if it has one (shape checked):
/// the input of the device-side steps, which never read it to the host.
pub(crate) fn grad_tensor(grads: &GradStore, name: &str, var: &Var) -> Result<Option<Tensor>> {
    match grads.get(var.as_tensor()) {
        None => Ok(None),
        Some(g) => {
            if g.dims() != var.dims() {
                bail!("gradient of {name:?} has shape {:?}, parameter {:?}", g.dims(), var.dims());
            }
            Ok(Some(g.detach().to_dtype(state_dtype(var))?))
        }
    }
}

/// Host state values as a tensor in [`state_dtype`], shaped and placed like `var` (resuming
/// onto a device).
pub(crate) fn to_device_like(data: &[f32], var: &Var) -> Result<Tensor> {
    Tensor::from_slice(data, var.shape().clone(), var.device())?.to_dtype(state_dtype(var))
}

/// The dtype an optimizer's tensor path keeps `var`'s state in and computes in: f32, or the
/// parameter's own half dtype when the trained tensors are half (`full_fp16` / `full_bf16`).
/// There torch makes each state `zeros_like(param)` and every in-place op of the step rounds
/// to it; candle's half ops round after each op the same way, so AdamW and Lion step half
/// parameters with their tensor path, on the CPU too.
pub(crate) fn state_dtype(var: &Var) -> DType {
    match var.dtype() {
        DType::F16 | DType::BF16 => var.dtype(),
        _ => DType::F32,
    }
}

/// Rounds host state values to `dtype`'s precision in place (f32 values that a half tensor
/// could hold): a host-loop optimizer stepping a bf16 parameter (`full_bf16`) keeps its state
/// as the reference keeps it, `zeros_like(param)` in bf16, while computing in f32.
pub(crate) fn round_to(dtype: DType, values: &mut [f32]) {
    match dtype {
        DType::BF16 => values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        DType::F16 => values.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
        _ => {}
    }
}

/// Whether AdamW/Lion step `var` with their f32 host loops (an f32/f64 CPU parameter outside
/// `ops::with_device_generic_ops`) rather than with tensor ops in [`state_dtype`].
pub(crate) fn steps_on_host(var: &Var) -> bool {
    crate::ops::host_loops(var.as_tensor()) && state_dtype(var) == DType::F32
}

/// `torch.lerp` on tensors, with the same two formulas as [`lerp`] (`weight` is one number).
pub(crate) fn lerp_tensor(start: &Tensor, end: &Tensor, weight: f32) -> Result<Tensor> {
    if weight.abs() < 0.5 {
        start + ((end - start)? * weight as f64)?
    } else {
        end - ((end - start)? * (1.0 - weight) as f64)?
    }
}

/// Writes f32 values into `var` (in its dtype and on its device).
pub(crate) fn write(var: &Var, data: Vec<f32>) -> Result<()> {
    let t = Tensor::from_vec(data, var.shape().clone(), &Device::Cpu)?
        .to_dtype(var.dtype())?
        .to_device(var.device())?;
    var.set(&t)
}

/// `torch.lerp(start, end, weight)` as torch computes it in f32.
#[inline]
pub(crate) fn lerp(start: f32, end: f32, weight: f32) -> f32 {
    if weight.abs() < 0.5 {
        start + weight * (end - start)
    } else {
        end - (end - start) * (1.0 - weight)
    }
}

/// Every parameter of `groups` in group order: the order optimizers write their state in.
pub(crate) fn all_params(groups: &[ParamGroup]) -> impl Iterator<Item = &(String, Var)> {
    groups.iter().flat_map(|g| g.params.iter())
}

/// Per-parameter state rebuilt from a saved one: `read(name, var)` for every parameter of
/// `groups` the saved state has (its `param.<name>.<marker>` entry); the others start fresh,
/// as they do in torch when a parameter had no gradient before the save.
pub(crate) fn load_params<S>(
    groups: &[ParamGroup],
    saved: &StateIn,
    marker: &str,
    mut read: impl FnMut(&str, &Var) -> Result<S>,
) -> Result<HashMap<String, S>> {
    let mut out = HashMap::new();
    for (name, var) in all_params(groups) {
        if saved.has_param(name, marker) {
            out.insert(name.clone(), read(name, var)?);
        }
    }
    Ok(out)
}

/// Builds state tensors.
#[derive(Default)]
pub(crate) struct StateOut(pub Vec<(String, Tensor)>);

impl StateOut {
    pub(crate) fn buf(&mut self, param: &str, buf: &str, data: &[f32]) -> Result<()> {
        self.0.push((
            format!("param.{param}.{buf}"),
            Tensor::from_slice(data, data.len(), &Device::Cpu)?,
        ));
        Ok(())
    }
    pub(crate) fn param_scalar(&mut self, param: &str, key: &str, v: f64) -> Result<()> {
        self.0.push((
            format!("param.{param}.{key}"),
            Tensor::from_slice(&[v], 1, &Device::Cpu)?,
        ));
        Ok(())
    }
    /// A buffer of bytes (AdamW8bit's quantised moments).
    pub(crate) fn bytes(&mut self, param: &str, buf: &str, data: &[u8]) -> Result<()> {
        self.0.push((format!("param.{param}.{buf}"), Tensor::from_slice(data, data.len(), &Device::Cpu)?));
        Ok(())
    }
    pub(crate) fn scalar(&mut self, key: &str, v: f64) -> Result<()> {
        self.0.push((
            format!("optim.{key}"),
            Tensor::from_slice(&[v], 1, &Device::Cpu)?,
        ));
        Ok(())
    }
}

/// Reads state tensors back, naming what is missing or misshapen.
pub(crate) struct StateIn<'a>(pub &'a HashMap<String, Tensor>);

impl StateIn<'_> {
    fn get(&self, key: &str) -> Result<&Tensor> {
        self.0
            .get(key)
            .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state has no {key:?}")))
    }
    pub(crate) fn has_param(&self, param: &str, key: &str) -> bool {
        self.0.contains_key(&format!("param.{param}.{key}"))
    }
    pub(crate) fn buf(&self, param: &str, buf: &str, len: usize) -> Result<Vec<f32>> {
        let key = format!("param.{param}.{buf}");
        let t = self.get(&key)?;
        if t.elem_count() != len {
            bail!(
                "optimizer state {key:?} has {} values, expected {len}",
                t.elem_count()
            );
        }
        read(t)
    }
    /// What [`StateOut::bytes`] wrote: `len` bytes.
    pub(crate) fn bytes(&self, param: &str, buf: &str, len: usize) -> Result<Vec<u8>> {
        let key = format!("param.{param}.{buf}");
        let t = self.get(&key)?;
        if t.dtype() != DType::U8 || t.elem_count() != len {
            bail!("optimizer state {key:?} should be {len} bytes, is {:?} × {}", t.dtype(), t.elem_count());
        }
        t.flatten_all()?.to_vec1::<u8>()
    }
    pub(crate) fn param_scalar(&self, param: &str, key: &str) -> Result<f64> {
        self.scalar_at(&format!("param.{param}.{key}"))
    }
    pub(crate) fn scalar(&self, key: &str) -> Result<f64> {
        self.scalar_at(&format!("optim.{key}"))
    }
    fn scalar_at(&self, key: &str) -> Result<f64> {
        let t = self.get(key)?;
        if t.elem_count() != 1 {
            bail!(
                "optimizer state {key:?} should be one number, has {}",
                t.elem_count()
            );
        }
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
    }
}

// ------------------------------------------------------------------------------------ clipping

/// `torch.nn.utils.clip_grad_norm_(params, max_norm)` (2-norm): the total norm of all the
/// gradients of `vars` is returned (before clipping) and every gradient is multiplied by
/// `min(1, max_norm / (total_norm + 1e-6))`. Vars without a gradient are ignored. A
/// non-finite total norm is returned as is and leaves the gradients unscaled (torch would
/// multiply them by NaN): the caller should skip that step.
pub fn clip_grad_norm(vars: &[Var], grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    // Each tensor's Σg² on its device (in f64, as the norm was always summed), all read back
    // in one transfer: no per-tensor round-trip to the host.
    let present: Vec<&Tensor> = vars.iter().filter_map(|v| grads.get(v.as_tensor())).collect();
    let sums: Vec<f64> = match grad_sums_by_kernel(&present)? {
        Some(sums) => sums,
        None => {
            let mut sums = vec![];
            for g in &present {
                sums.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
            }
            if sums.is_empty() { vec![] } else { Tensor::stack(&sums, 0)?.to_vec1()? }
        }
    };
    let mut sq = 0f64;
    for s in sums {
        // Per-tensor norm in f32 as torch stores it, then the norm of the norms.
        let n = s.sqrt() as f32 as f64;
        sq += n * n;
    }
    let total = sq.sqrt() as f32 as f64;
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g.to_dtype(DType::F32)? * coef)?.to_dtype(g.dtype())?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(total)
}

/// Whether every parameter of `groups` takes the multi-tensor kernels (worker/kernels/optim.cu):
/// f32, contiguous, on a CUDA device, with the kernels on.
#[cfg(feature = "cuda")]
pub(crate) fn all_on_kernels(groups: &[ParamGroup]) -> bool {
    groups.iter().flat_map(|g| g.params.iter()).all(|(_, v)| v.device().is_cuda() && v.dtype() == DType::F32 && v.as_tensor().is_contiguous() && crate::kernels::use_kernels(v.as_tensor()))
}

/// Σg² of every gradient in one launch of worker/kernels/optim.cu's statistics kernel (CUDA
/// gradients of one dtype, kernels on); `None` where that does not apply.
fn grad_sums_by_kernel(grads: &[&Tensor]) -> Result<Option<Vec<f64>>> {
    #[cfg(feature = "cuda")]
    if let Some(first) = grads.first() {
        if first.device().is_cuda() && crate::kernels::use_kernels(first) && grads.iter().all(|g| g.dtype() == first.dtype()) {
            let contiguous: Vec<Tensor> = grads.iter().map(|g| g.contiguous()).collect::<Result<_>>()?;
            return Ok(Some(crate::kernels::optim::grad_stats(&contiguous)?.0));
        }
    }
    let _ = grads;
    Ok(None)
}

// ------------------------------------------------------------------------------------ accumulation

/// Sums the gradients of a fixed set of vars over micro-batches (only those vars: a backward
/// pass's store also holds every intermediate's gradient, which would be wasted memory here).
pub struct GradAccumulator {
    vars: Vec<Var>,
    sums: Vec<Option<Tensor>>,
    count: usize,
}

impl GradAccumulator {
    pub fn new(vars: Vec<Var>) -> Self {
        let n = vars.len();
        Self {
            vars,
            sums: vec![None; n],
            count: 0,
        }
    }

    /// Adds one micro-batch's gradients.
    pub fn add(&mut self, grads: &GradStore) -> Result<()> {
        for (v, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.detach();
                *sum = Some(match sum.take() {
                    None => g,
                    Some(s) => (s + g)?,
                });
            }
        }
        self.count += 1;
        Ok(())
    }

    /// Micro-batches added since the last [`GradAccumulator::take`].
    pub fn count(&self) -> usize {
        self.count
    }

    /// The accumulated gradients, divided by the number of micro-batches when `mean` (the same
    /// as scaling each micro-batch loss by 1/N, as sd-scripts does through accelerate), and
    /// resets the accumulator.
    pub fn take(&mut self, mean: bool) -> Result<GradStore> {
        let mut out = GradStore::default();
        let n = self.count.max(1) as f64;
        for (v, sum) in self.vars.iter().zip(self.sums.iter_mut()) {
            if let Some(s) = sum.take() {
                let s = if mean && self.count > 1 { (s / n)? } else { s };
                out.insert(v.as_tensor(), s);
            }
        }
        self.count = 0;
        Ok(out)
    }
}
