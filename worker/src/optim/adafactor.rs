//! Adafactor with `transformers.optimization.Adafactor` semantics: a factored second moment
//! (row and column means over the last two dims) for parameters with ≥ 2 dims, a full one for
//! vectors; `β2ₜ = 1 − t^decay_rate`; the update clipped to RMS `clip_threshold`; optional first
//! moment `beta1`; weight decay `p ← p − wd·lr·p`; and the learning rate either the group's
//! (`relative_step = False`, the usual LoRA setting) or its own `min(1e-2, 1/√t)`
//! (`warmup_init`: `min(1e-6·t, 1/√t)`), times `max(eps2, RMS(p))` with `scale_parameter`.
//!
//! Defaults are transformers' (relative_step, scale_parameter on); Loft's form defaults both
//! off and passes them explicitly.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor};

use super::{all_params, load_params, check_groups, grad_of, read, write, Args, Optimizer, ParamGroup, StateIn, StateOut};

#[derive(Clone, Debug, PartialEq)]
pub struct AdafactorConfig {
    /// `(eps1, eps2)`: added to g², and the floor of the parameter scale.
    pub eps: (f64, f64),
    pub clip_threshold: f64,
    pub decay_rate: f64,
    pub beta1: Option<f64>,
    pub weight_decay: f64,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorConfig {
    fn default() -> Self {
        Self {
            eps: (1e-30, 1e-3),
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorConfig {
    pub fn from_args(map: &BTreeMap<String, String>) -> Result<Self> {
        let d = Self::default();
        let mut a = Args::new("Adafactor", map);
        let c = Self {
            eps: a.pair("eps", d.eps)?,
            clip_threshold: a.f64("clip_threshold", d.clip_threshold)?,
            decay_rate: a.f64("decay_rate", d.decay_rate)?,
            beta1: a.opt_f64("beta1", d.beta1)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            scale_parameter: a.bool("scale_parameter", d.scale_parameter)?,
            relative_step: a.bool("relative_step", d.relative_step)?,
            warmup_init: a.bool("warmup_init", d.warmup_init)?,
        };
        a.finish()?;
        Ok(c)
    }
}

#[derive(Clone, Debug)]
struct State {
    step: f64,
    exp_avg: Vec<f32>,
    /// Factored: `[lead…, rows]` and `[lead…, cols]`; else `exp_avg_sq` is full.
    row: Vec<f32>,
    col: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// [`State`] on the device (the multi-tensor kernels' path), flat f32 tensors; `row`/`col`
/// or `exp_avg_sq` hold one element where unused (the kernels never touch them then).
#[allow(dead_code)] // built by the cuda feature's path only
struct DeviceState {
    step: f64,
    /// Factored second moments: row and col in use, exp_avg_sq the placeholder.
    factored: bool,
    exp_avg: Option<Tensor>,
    row: Tensor,
    col: Tensor,
    exp_avg_sq: Tensor,
}



pub struct Adafactor {
    groups: Vec<ParamGroup>,
    cfg: AdafactorConfig,
    state: HashMap<String, State>,
    device_state: HashMap<String, DeviceState>,
    /// The lr each group used last (for telemetry).
    last_lrs: Vec<f64>,
}

/// `(lead, rows, cols)` of a factored parameter, or None for < 2 dims.
impl AdafactorConfig {
    /// The step's learning rate for a tensor: the group's, or the relative step
    /// (min(1e-2, 1/√step), with warmup_init 1e-6·step), times max(ε2, RMS(p)) with
    /// scale_parameter.
    pub fn step_lr(&self, group_lr: f64, step: f64, param_rms: f64) -> f64 {
        let mut rel = group_lr;
        if self.relative_step {
            let min_step = if self.warmup_init { 1e-6 * step } else { 1e-2 };
            rel = min_step.min(1.0 / step.sqrt());
        }
        let scale = if self.scale_parameter { self.eps.1.max(param_rms) } else { 1.0 };
        scale * rel
    }

    /// β2 at `step`: 1 − step^decay_rate.
    pub fn beta2t(&self, step: f64) -> f64 {
        1.0 - step.powf(self.decay_rate)
    }
}

fn factor_dims(dims: &[usize]) -> Option<(usize, usize, usize)> {
    if dims.len() < 2 {
        return None;
    }
    let (r, c) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    Some((dims[..dims.len() - 2].iter().product(), r, c))
}

fn rms(x: &[f32]) -> f64 {
    let ss: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
    // torch: norm(2) (an f32 tensor) / sqrt(numel)
    (ss.sqrt() as f32 / (x.len() as f64).sqrt() as f32) as f64
}

impl Adafactor {
    /// A device state read back in the host's form (for `state()`).
    fn host_state_of(st: &DeviceState) -> Result<State> {
        Ok(State {
            step: st.step,
            exp_avg: st.exp_avg.as_ref().map(read).transpose()?.unwrap_or_default(),
            row: if st.factored { read(&st.row)? } else { Vec::new() },
            col: if st.factored { read(&st.col)? } else { Vec::new() },
            exp_avg_sq: if st.factored { Vec::new() } else { read(&st.exp_avg_sq)? },
        })
    }

    /// Every tensor in four launches of the multi-tensor kernels (worker/kernels/optim.cu) when
    /// all of them are f32 CUDA tensors and the kernels are on; `Ok(false)` otherwise. The host
    /// reads each tensor's Σp² once a step (for its lr) between the first two launches.
    #[cfg(feature = "cuda")]
    fn step_multi_tensor(&mut self, grads: &GradStore, lr_scale: f64) -> Result<bool> {
        use crate::kernels::optim as multi;
        use candle_core::DType;
        if !super::all_on_kernels(&self.groups) {
            return Ok(false);
        }
        let beta1 = self.cfg.beta1;
        let mut work = vec![]; // (group index, name, var, gradient, (lead, r, c))
        for (gi, group) in self.groups.iter().enumerate() {
            for (name, var) in &group.params {
                let Some(g) = super::grad_tensor(grads, name, var)? else { continue };
                let n = var.elem_count();
                let fd = factor_dims(var.dims());
                if !self.device_state.contains_key(name) {
                    let dev = var.device();
                    let one = || Tensor::zeros(1, DType::F32, dev);
                    let st = match self.state.remove(name) {
                        Some(h) => DeviceState {
                            step: h.step,
                            factored: !h.row.is_empty(),
                            exp_avg: if h.exp_avg.is_empty() { None } else { Some(Tensor::from_vec(h.exp_avg, n, dev)?) },
                            row: if h.row.is_empty() { one()? } else { Tensor::from_vec(h.row.clone(), h.row.len(), dev)? },
                            col: if h.col.is_empty() { one()? } else { Tensor::from_vec(h.col.clone(), h.col.len(), dev)? },
                            exp_avg_sq: if h.exp_avg_sq.is_empty() { one()? } else { Tensor::from_vec(h.exp_avg_sq, n, dev)? },
                        },
                        None => match fd {
                            Some((lead, r, c)) => DeviceState {
                                step: 0.0,
                                factored: true,
                                exp_avg: if beta1.is_some() { Some(Tensor::zeros(n, DType::F32, dev)?) } else { None },
                                row: Tensor::zeros(lead * r, DType::F32, dev)?,
                                col: Tensor::zeros(lead * c, DType::F32, dev)?,
                                exp_avg_sq: one()?,
                            },
                            None => DeviceState {
                                step: 0.0,
                                factored: false,
                                exp_avg: if beta1.is_some() { Some(Tensor::zeros(n, DType::F32, dev)?) } else { None },
                                row: one()?,
                                col: one()?,
                                exp_avg_sq: Tensor::zeros(n, DType::F32, dev)?,
                            },
                        },
                    };
                    self.device_state.insert(name.clone(), st);
                }
                let st = self.device_state.get_mut(name).expect("inserted above");
                st.step += 1.0;
                work.push((gi, name.clone(), var.clone(), g.contiguous()?, fd.unwrap_or((1, 0, 0))));
            }
        }
        if work.is_empty() {
            return Ok(true);
        }
        let buffers: Vec<multi::DeviceAdafactor> = work
            .iter()
            .map(|(_, name, var, g, dims)| {
                let st = &self.device_state[name];
                multi::DeviceAdafactor { param: var.as_tensor(), grad: g, dims: *dims, row: &st.row, col: &st.col, exp_avg_sq: &st.exp_avg_sq, exp_avg: st.exp_avg.as_ref() }
            })
            .collect();
        let hyper = multi::AdafactorHyper { eps1: self.cfg.eps.0 as f32, clip_threshold: self.cfg.clip_threshold as f32, beta1, decay_on: self.cfg.weight_decay != 0.0 };
        let cfg = self.cfg.clone();
        let mut lrs = vec![None; self.groups.len()];
        let scalars_of = |i: usize, param_rms: f64| {
            let (gi, name, ..) = &work[i];
            let step = self.device_state[name].step;
            let lr = cfg.step_lr(self.groups[*gi].lr * lr_scale, step, param_rms);
            (cfg.beta2t(step), lr, (-cfg.weight_decay * lr) as f32)
        };
        let used = multi::adafactor_step(&buffers, hyper, scalars_of)?;
        for (i, lr) in used.into_iter().enumerate() {
            lrs[work[i].0] = Some(lr);
        }
        for (gi, lr) in lrs.into_iter().enumerate() {
            if let Some(lr) = lr {
                self.last_lrs[gi] = lr;
            }
        }
        Ok(true)
    }

    pub fn new(groups: Vec<ParamGroup>, cfg: AdafactorConfig) -> Result<Self> {
        check_groups("Adafactor", &groups)?;
        if cfg.warmup_init && !cfg.relative_step {
            bail!("Adafactor: warmup_init=True requires relative_step=True");
        }
        let n = groups.len();
        Ok(Self {
            groups,
            cfg,
            state: HashMap::new(),
            device_state: HashMap::new(),
            last_lrs: vec![0.0; n],
        })
    }
}

impl Optimizer for Adafactor {
    fn kind(&self) -> &'static str {
        "Adafactor"
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn effective_lrs(&self, lr_scale: f64) -> Vec<f64> {
        if self.cfg.relative_step || self.cfg.scale_parameter {
            self.last_lrs.clone()
        } else {
            self.groups.iter().map(|g| g.lr * lr_scale).collect()
        }
    }

    fn step(&mut self, grads: &GradStore, lr_scale: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.step_multi_tensor(grads, lr_scale)? {
            return Ok(());
        }
        for gi in 0..self.groups.len() {
            let group_lr = self.groups[gi].lr * lr_scale;
            for pi in 0..self.groups[gi].params.len() {
                let (name, var) = &self.groups[gi].params[pi];
                let Some(g) = grad_of(grads, name, var)? else {
                    continue;
                };
                let mut p = read(var.as_tensor())?;
                let n = p.len();
                let fd = factor_dims(var.dims());
                let beta1 = self.cfg.beta1;
                let st = self.state.entry(name.clone()).or_insert_with(|| match fd {
                    Some((lead, r, c)) => State {
                        step: 0.0,
                        exp_avg: if beta1.is_some() {
                            vec![0.0; n]
                        } else {
                            Vec::new()
                        },
                        row: vec![0.0; lead * r],
                        col: vec![0.0; lead * c],
                        exp_avg_sq: Vec::new(),
                    },
                    None => State {
                        step: 0.0,
                        exp_avg: if beta1.is_some() {
                            vec![0.0; n]
                        } else {
                            Vec::new()
                        },
                        row: Vec::new(),
                        col: Vec::new(),
                        exp_avg_sq: vec![0.0; n],
                    },
                });
                st.step += 1.0;
                let step = st.step;
                let param_rms = rms(&p);
                let lr = self.cfg.step_lr(group_lr, step, param_rms);
                self.last_lrs[gi] = lr;
                let beta2t = self.cfg.beta2t(step);
                let (b2, w2) = (beta2t as f32, (1.0 - beta2t) as f32);
                let eps1 = self.cfg.eps.0 as f32;
                let mut update: Vec<f32> = g.iter().map(|&x| x * x + eps1).collect();
                match fd {
                    Some((lead, r, c)) => {
                        for b in 0..lead {
                            let base = b * r * c;
                            for i in 0..r {
                                let s: f64 = (0..c).map(|j| update[base + i * c + j] as f64).sum();
                                let mean = (s / c as f64) as f32;
                                let x = &mut st.row[b * r + i];
                                *x = *x * b2 + w2 * mean;
                            }
                            for j in 0..c {
                                let s: f64 = (0..r).map(|i| update[base + i * c + j] as f64).sum();
                                let mean = (s / r as f64) as f32;
                                let x = &mut st.col[b * c + j];
                                *x = *x * b2 + w2 * mean;
                            }
                            let row = &st.row[b * r..(b + 1) * r];
                            let row_mean =
                                (row.iter().map(|&v| v as f64).sum::<f64>() / r as f64) as f32;
                            for i in 0..r {
                                let rf = 1.0 / (row[i] / row_mean).sqrt();
                                for j in 0..c {
                                    let cf = 1.0 / st.col[b * c + j].sqrt();
                                    let k = base + i * c + j;
                                    update[k] = rf * cf * g[k];
                                }
                            }
                        }
                    }
                    None => {
                        for i in 0..n {
                            let v = &mut st.exp_avg_sq[i];
                            *v = *v * b2 + w2 * update[i];
                            update[i] = (1.0 / v.sqrt()) * g[i];
                        }
                    }
                }
                let clip = ((rms(&update) as f32) / self.cfg.clip_threshold as f32).max(1.0);
                let lr32 = lr as f32;
                for u in update.iter_mut() {
                    *u = *u / clip * lr32;
                }
                if let Some(b1) = beta1 {
                    let (b1f, w1) = (b1 as f32, (1.0 - b1) as f32);
                    for i in 0..n {
                        st.exp_avg[i] = st.exp_avg[i] * b1f + w1 * update[i];
                    }
                    update.copy_from_slice(&st.exp_avg);
                }
                if self.cfg.weight_decay != 0.0 {
                    let a = (-self.cfg.weight_decay * lr) as f32;
                    for x in p.iter_mut() {
                        *x += a * *x;
                    }
                }
                for i in 0..n {
                    p[i] += -update[i];
                }
                write(var, p)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = StateOut::default();
        for (name, _) in all_params(&self.groups) {
            let from_device = self.device_state.get(name).map(Self::host_state_of).transpose()?;
            let Some(st) = from_device.as_ref().or_else(|| self.state.get(name)) else { continue };
            out.param_scalar(name, "step", st.step)?;
            if !st.exp_avg.is_empty() {
                out.buf(name, "exp_avg", &st.exp_avg)?;
            }
            if !st.row.is_empty() {
                out.buf(name, "exp_avg_sq_row", &st.row)?;
                out.buf(name, "exp_avg_sq_col", &st.col)?;
            } else {
                out.buf(name, "exp_avg_sq", &st.exp_avg_sq)?;
            }
        }
        for (i, lr) in self.last_lrs.iter().enumerate() {
            out.scalar(&format!("last_lr.{i}"), *lr)?;
        }
        Ok(out.0)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let s = StateIn(state);
        let has_first_moment = self.cfg.beta1.is_some();
        let new = load_params(&self.groups, &s, "step", |name, var| {
            let n = var.elem_count();
            let exp_avg = if has_first_moment { s.buf(name, "exp_avg", n)? } else { Vec::new() };
            let step = s.param_scalar(name, "step")?;
            Ok(match factor_dims(var.dims()) {
                Some((lead, r, c)) => State {
                    step,
                    exp_avg,
                    row: s.buf(name, "exp_avg_sq_row", lead * r)?,
                    col: s.buf(name, "exp_avg_sq_col", lead * c)?,
                    exp_avg_sq: Vec::new(),
                },
                None => State { step, exp_avg, row: Vec::new(), col: Vec::new(), exp_avg_sq: s.buf(name, "exp_avg_sq", n)? },
            })
        })?;
        for i in 0..self.last_lrs.len() {
            self.last_lrs[i] = s.scalar(&format!("last_lr.{i}")).unwrap_or(0.0);
        }
        self.state = new;
        self.device_state.clear();
        Ok(())
    }
}
