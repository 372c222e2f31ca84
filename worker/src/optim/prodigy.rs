//! Prodigy with `prodigyopt.Prodigy` (1.1.2) semantics: Adam whose step size `d·lr` is
//! estimated on the fly (the D-adaptation numerator `Σ (d/d0)·dlr·⟨g, p0 − p⟩` over the
//! denominator `Σ|s|`), with `d_coef`, `growth_rate`, `use_bias_correction`,
//! `safeguard_warmup`, decoupled or coupled weight decay, `beta3` (default √β2), `d0` and
//! `slice_p`.
//!
//! One deliberate difference: prodigyopt still updates the parameters of a group whose
//! learning rate is 0 (with a denominator of `d·eps`, which blows them up); Loft leaves them
//! untouched. As in prodigyopt, groups must share one learning rate, or have 0.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor};

use super::{all_params, check_groups, grad_of, load_params, read, round_to, write, Args, Optimizer, ParamGroup, StateIn, StateOut};

#[derive(Clone, Debug, PartialEq)]
pub struct ProdigyConfig {
    pub betas: (f64, f64),
    /// `None` = √β2.
    pub beta3: Option<f64>,
    pub eps: f64,
    pub weight_decay: f64,
    pub decouple: bool,
    pub use_bias_correction: bool,
    pub safeguard_warmup: bool,
    pub d0: f64,
    pub d_coef: f64,
    pub growth_rate: f64,
    pub slice_p: usize,
}

impl Default for ProdigyConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            decouple: true,
            use_bias_correction: false,
            safeguard_warmup: false,
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f64::INFINITY,
            slice_p: 1,
        }
    }
}

impl ProdigyConfig {
    pub fn from_args(map: &BTreeMap<String, String>) -> Result<Self> {
        let d = Self::default();
        let mut a = Args::new("Prodigy", map);
        let slice_p = a.f64("slice_p", 1.0)?;
        let c = Self {
            betas: a.pair("betas", d.betas)?,
            beta3: a.opt_f64("beta3", d.beta3)?,
            eps: a.f64("eps", d.eps)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            decouple: a.bool("decouple", d.decouple)?,
            use_bias_correction: a.bool("use_bias_correction", d.use_bias_correction)?,
            safeguard_warmup: a.bool("safeguard_warmup", d.safeguard_warmup)?,
            d0: a.f64("d0", d.d0)?,
            d_coef: a.f64("d_coef", d.d_coef)?,
            growth_rate: a.f64("growth_rate", d.growth_rate)?,
            slice_p: if slice_p >= 1.0 && slice_p.fract() == 0.0 {
                slice_p as usize
            } else {
                bail!("optimizer_args: Prodigy slice_p={slice_p} must be a whole number ≥ 1")
            },
        };
        a.finish()?;
        Ok(c)
    }
}

#[derive(Clone, Debug)]
struct State {
    step: f64,
    s: Vec<f32>,
    p0: Vec<f32>,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
}

/// [`State`] on the device (the multi-tensor kernels' path), flat f32 tensors.
#[allow(dead_code)] // built by the cuda feature's path only
struct DeviceState {
    step: f64,
    s: Tensor,
    p0: Tensor,
    exp_avg: Option<Tensor>,
    exp_avg_sq: Tensor,
}

pub struct Prodigy {
    groups: Vec<ParamGroup>,
    cfg: ProdigyConfig,
    d: f64,
    d_max: f64,
    d_numerator: f64,
    d_hat: f64,
    k: f64,
    state: HashMap<String, State>,
    device_state: HashMap<String, DeviceState>,
}

impl Prodigy {
    pub fn new(groups: Vec<ParamGroup>, cfg: ProdigyConfig) -> Result<Self> {
        check_groups("Prodigy", &groups)?;
        if !(cfg.d0 > 0.0) || !(cfg.eps > 0.0) {
            bail!("Prodigy: d0 and eps must be > 0");
        }
        if !(0.0..1.0).contains(&cfg.betas.0) || !(0.0..1.0).contains(&cfg.betas.1) {
            bail!("Prodigy: betas must be in [0, 1), got {:?}", cfg.betas);
        }
        let d0 = cfg.d0;
        Ok(Self {
            groups,
            cfg,
            d: d0,
            d_max: d0,
            d_numerator: 0.0,
            d_hat: d0,
            k: 0.0,
            state: HashMap::new(),
            device_state: HashMap::new(),
        })
    }

    /// The current step-size estimate d.
    pub fn d(&self) -> f64 {
        self.d
    }
}

impl Prodigy {
    /// The D-adaptation between the passes: d̂ = d_coef·Σnumerator/Σ|s|, d grows to it (capped
    /// by growth_rate). False when Σ|s| is 0: prodigyopt then returns before any update.
    fn adapt_d(&mut self, d_numerator: f64, delta_numerator: f64, d_denom: f64, lr: f64) -> bool {
        if d_denom == 0.0 {
            return false;
        }
        let c = &self.cfg;
        let (d, d0) = (self.d, c.d0);
        let mut d_new = d;
        let mut d_max = self.d_max;
        let global_numerator = d_numerator + delta_numerator;
        let mut d_hat = d;
        if lr > 0.0 {
            d_hat = c.d_coef * global_numerator / d_denom;
            if d_new == d0 {
                d_new = d_new.max(d_hat);
            }
            d_max = d_max.max(d_hat);
            d_new = d_max.min(d_new * c.growth_rate);
        }
        self.d_numerator = global_numerator;
        self.d = d_new;
        self.d_max = d_max;
        self.d_hat = d_hat;
        true
    }

    /// Every tensor in two launches of the multi-tensor kernels (worker/kernels/optim.cu,
    /// pass 1 → the d update here → pass 2) when all of them are f32 CUDA tensors and the kernels
    /// are on; `Ok(false)` otherwise. The same arithmetic as the host loop in [`Optimizer::step`].
    #[cfg(feature = "cuda")]
    fn step_multi_tensor(&mut self, grads: &GradStore, lr_scale: f64) -> Result<bool> {
        use crate::kernels::optim as multi;
        use candle_core::DType;
        if !super::all_on_kernels(&self.groups) {
            return Ok(false);
        }
        let c = self.cfg.clone();
        let (beta1, beta2) = c.betas;
        let beta3 = c.beta3.unwrap_or_else(|| beta2.sqrt());
        let (k, d, d0) = (self.k, self.d, c.d0);
        let lr = self.groups.iter().map(|g| g.lr * lr_scale).fold(0.0, f64::max);
        let bias_correction = if c.use_bias_correction { (1.0 - beta2.powf(k + 1.0)).sqrt() / (1.0 - beta1.powf(k + 1.0)) } else { 1.0 };
        let dlr = d * lr * bias_correction;
        let d_numerator = self.d_numerator * beta3;
        let mut work = vec![]; // (name, var, gradient)
        for group in &self.groups {
            let group_lr = group.lr * lr_scale;
            if group_lr != lr && group_lr != 0.0 {
                bail!("Prodigy: all parameter groups must share one learning rate (or have 0); group {:?} has {} and another {}", group.name, group_lr, lr);
            }
            if group_lr == 0.0 {
                continue;
            }
            for (name, var) in &group.params {
                let Some(g) = super::grad_tensor(grads, name, var)? else { continue };
                if !self.device_state.contains_key(name) {
                    let st = match self.state.remove(name) {
                        Some(h) => {
                            let (ns, n) = (h.s.len(), h.exp_avg_sq.len());
                            DeviceState {
                                step: h.step,
                                s: Tensor::from_vec(h.s, ns, var.device())?,
                                p0: Tensor::from_vec(h.p0, ns, var.device())?,
                                exp_avg: if h.exp_avg.is_empty() { None } else { Some(Tensor::from_vec(h.exp_avg, n, var.device())?) },
                                exp_avg_sq: Tensor::from_vec(h.exp_avg_sq, n, var.device())?,
                            }
                        }
                        None => {
                            let flat = var.as_tensor().detach().flatten_all()?;
                            let n = flat.elem_count();
                            let p0 = if c.slice_p == 1 {
                                flat.copy()?
                            } else {
                                let idx: Vec<u32> = (0..n as u32).step_by(c.slice_p).collect();
                                let idx = Tensor::new(idx.as_slice(), var.device())?;
                                flat.index_select(&idx, 0)?
                            };
                            DeviceState {
                                step: 0.0,
                                s: Tensor::zeros(p0.elem_count(), DType::F32, var.device())?,
                                p0,
                                exp_avg: if beta1 > 0.0 { Some(Tensor::zeros(n, DType::F32, var.device())?) } else { None },
                                exp_avg_sq: Tensor::zeros(n, DType::F32, var.device())?,
                            }
                        }
                    };
                    self.device_state.insert(name.clone(), st);
                }
                work.push((name.clone(), var.clone(), g.contiguous()?));
            }
        }
        let wd = c.weight_decay;
        let coupled_wd = if wd != 0.0 && !c.decouple { wd as f32 } else { 0.0 };
        // The kernels' view of every tensor's buffers (rebuilt for each pass: `adapt_d` needs
        // `self` in between).
        macro_rules! device_tensors {
            () => {
                work.iter()
                    .map(|(name, var, g)| {
                        let st = &self.device_state[name];
                        multi::DeviceProdigy { param: var.as_tensor(), grad: g, p0: &st.p0, s: &st.s, exp_avg: st.exp_avg.as_ref(), exp_avg_sq: &st.exp_avg_sq }
                    })
                    .collect::<Vec<_>>()
            };
        }
        let pass1 = multi::ProdigyPass1 {
            coupled_wd,
            b1: beta1 as f32,
            a1: (d * (1.0 - beta1)) as f32,
            b2: beta2 as f32,
            a2: (d * d * (1.0 - beta2)) as f32,
            alpha: if c.safeguard_warmup { (d / d0) * d } else { (d / d0) * dlr } as f32,
            b3: beta3 as f32,
        };
        let (dots, abs_sums) = multi::prodigy_pass1(&device_tensors!(), c.slice_p, pass1)?;
        let delta_numerator: f64 = dots.iter().map(|&dot| (d / d0) * dlr * (dot as f32 as f64)).sum();
        let d_denom: f64 = abs_sums.iter().map(|&a| a as f32 as f64).sum();
        if !self.adapt_d(d_numerator, delta_numerator, d_denom, lr) {
            return Ok(true);
        }
        let d_new = self.d;
        for (name, _, _) in &work {
            if let Some(st) = self.device_state.get_mut(name) {
                st.step += 1.0;
            }
        }
        let pass2 = multi::ProdigyPass2 {
            coupled_wd,
            decoupled_decay: if wd != 0.0 && c.decouple { (-wd * dlr) as f32 } else { 0.0 },
            eps_d: (d_new * c.eps) as f32,
            neg_dlr: -dlr as f32,
            neg_dlr_d: (-dlr * d_new) as f32,
        };
        multi::prodigy_pass2(&device_tensors!(), pass2)?;
        self.k = k + 1.0;
        Ok(true)
    }
}

impl Optimizer for Prodigy {
    fn kind(&self) -> &'static str {
        "Prodigy"
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn effective_lrs(&self, lr_scale: f64) -> Vec<f64> {
        self.groups
            .iter()
            .map(|g| self.d * g.lr * lr_scale)
            .collect()
    }

    fn step(&mut self, grads: &GradStore, lr_scale: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.step_multi_tensor(grads, lr_scale)? {
            return Ok(());
        }
        let c = self.cfg.clone();
        let (beta1, beta2) = c.betas;
        let beta3 = c.beta3.unwrap_or_else(|| beta2.sqrt());
        let k = self.k;
        let d = self.d;
        let d0 = c.d0;
        let lr = self
            .groups
            .iter()
            .map(|g| g.lr * lr_scale)
            .fold(0.0, f64::max);
        let bias_correction = if c.use_bias_correction {
            (1.0 - beta2.powf(k + 1.0)).sqrt() / (1.0 - beta1.powf(k + 1.0))
        } else {
            1.0
        };
        let dlr = d * lr * bias_correction;
        let d_numerator = self.d_numerator * beta3;
        let mut delta_numerator = 0f64;
        let mut d_denom = 0f64;

        // Pass 1: moments, s, and the D-adaptation sums. Keeps the (possibly decayed) gradients.
        let mut work: Vec<(usize, usize, Vec<f32>)> = Vec::new();
        for (gi, group) in self.groups.iter().enumerate() {
            let group_lr = group.lr * lr_scale;
            if group_lr != lr && group_lr != 0.0 {
                bail!(
                    "Prodigy: all parameter groups must share one learning rate (or have 0); group {:?} has {} and another {}",
                    group.name, group_lr, lr
                );
            }
            if group_lr == 0.0 {
                continue; // frozen (see the module doc)
            }
            for (pi, (name, var)) in group.params.iter().enumerate() {
                let Some(mut g) = grad_of(grads, name, var)? else {
                    continue;
                };
                let p = read(var.as_tensor())?;
                let n = p.len();
                if c.weight_decay != 0.0 && !c.decouple {
                    let wd = c.weight_decay as f32;
                    for i in 0..n {
                        g[i] += wd * p[i];
                    }
                }
                let st = self.state.entry(name.clone()).or_insert_with(|| {
                    let p0: Vec<f32> = p.iter().step_by(c.slice_p).copied().collect();
                    State {
                        step: 0.0,
                        s: vec![0.0; p0.len()],
                        p0,
                        exp_avg: if beta1 > 0.0 {
                            vec![0.0; n]
                        } else {
                            Vec::new()
                        },
                        exp_avg_sq: vec![0.0; n],
                    }
                });
                let mut dot = 0f64;
                for (j, i) in (0..n).step_by(c.slice_p).enumerate() {
                    dot += g[i] as f64 * (st.p0[j] - p[i]) as f64;
                }
                delta_numerator += (d / d0) * dlr * (dot as f32 as f64);
                if beta1 > 0.0 {
                    let (b1, a1) = (beta1 as f32, (d * (1.0 - beta1)) as f32);
                    for i in 0..n {
                        st.exp_avg[i] = st.exp_avg[i] * b1 + a1 * g[i];
                    }
                }
                let (b2, a2) = (beta2 as f32, (d * d * (1.0 - beta2)) as f32);
                for i in 0..n {
                    st.exp_avg_sq[i] = st.exp_avg_sq[i] * b2 + a2 * g[i] * g[i];
                }
                let alpha = if c.safeguard_warmup {
                    (d / d0) * d
                } else {
                    (d / d0) * dlr
                } as f32;
                let b3 = beta3 as f32;
                let mut abs_sum = 0f64;
                for (j, i) in (0..n).step_by(c.slice_p).enumerate() {
                    st.s[j] = st.s[j] * b3 + alpha * g[i];
                    abs_sum += st.s[j].abs() as f64;
                }
                d_denom += abs_sum as f32 as f64;
                // full_bf16: prodigyopt's states are zeros_like(p), bf16 too (full_fp16 is
                // refused with Prodigy: its d²-scaled moments underflow fp16, see the config).
                for buf in [&mut st.s, &mut st.exp_avg, &mut st.exp_avg_sq] {
                    round_to(var.dtype(), buf);
                }
                work.push((gi, pi, g));
            }
        }

        if !self.adapt_d(d_numerator, delta_numerator, d_denom, lr) {
            return Ok(()); // prodigyopt returns before any update (and before k += 1)
        }
        let d_new = self.d;

        // Pass 2: the update, with the new d in the denominator and the old d in dlr.
        let eps_d = (d_new * c.eps) as f32;
        for (gi, pi, g) in work {
            let (name, var) = &self.groups[gi].params[pi];
            let st = self.state.get_mut(name).expect("state made in pass 1");
            st.step += 1.0;
            let mut p = read(var.as_tensor())?;
            let decay = (-c.weight_decay * dlr) as f32;
            let neg_dlr = -dlr as f32;
            let neg_dlr_d = (-dlr * d_new) as f32;
            for i in 0..p.len() {
                let denom = st.exp_avg_sq[i].sqrt() + eps_d;
                if c.weight_decay != 0.0 && c.decouple {
                    p[i] += decay * p[i];
                }
                if beta1 > 0.0 {
                    p[i] += neg_dlr * (st.exp_avg[i] / denom);
                } else {
                    p[i] += neg_dlr_d * (g[i] / denom);
                }
            }
            write(var, p)?;
        }
        self.k = k + 1.0;
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = StateOut::default();
        out.scalar("d", self.d)?;
        out.scalar("d_max", self.d_max)?;
        out.scalar("d_numerator", self.d_numerator)?;
        out.scalar("d_hat", self.d_hat)?;
        out.scalar("k", self.k)?;
        for (name, _) in all_params(&self.groups) {
            if let Some(st) = self.device_state.get(name) {
                out.param_scalar(name, "step", st.step)?;
                out.buf(name, "s", &read(&st.s)?)?;
                out.buf(name, "p0", &read(&st.p0)?)?;
                if let Some(m) = &st.exp_avg {
                    out.buf(name, "exp_avg", &read(m)?)?;
                }
                out.buf(name, "exp_avg_sq", &read(&st.exp_avg_sq)?)?;
                continue;
            }
            let Some(st) = self.state.get(name) else { continue };
            out.param_scalar(name, "step", st.step)?;
            out.buf(name, "s", &st.s)?;
            out.buf(name, "p0", &st.p0)?;
            if !st.exp_avg.is_empty() {
                out.buf(name, "exp_avg", &st.exp_avg)?;
            }
            out.buf(name, "exp_avg_sq", &st.exp_avg_sq)?;
        }
        Ok(out.0)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let s = StateIn(state);
        let d = s.scalar("d")?;
        let d_max = s.scalar("d_max")?;
        let d_numerator = s.scalar("d_numerator")?;
        let d_hat = s.scalar("d_hat")?;
        let k = s.scalar("k")?;
        let (slice_p, has_first_moment) = (self.cfg.slice_p, self.cfg.betas.0 > 0.0);
        let new = load_params(&self.groups, &s, "step", |name, var| {
            let n = var.elem_count();
            let ns = n.div_ceil(slice_p);
            Ok(State {
                step: s.param_scalar(name, "step")?,
                s: s.buf(name, "s", ns)?,
                p0: s.buf(name, "p0", ns)?,
                exp_avg: if has_first_moment { s.buf(name, "exp_avg", n)? } else { Vec::new() },
                exp_avg_sq: s.buf(name, "exp_avg_sq", n)?,
            })
        })?;
        (self.d, self.d_max, self.d_numerator, self.d_hat, self.k) =
            (d, d_max, d_numerator, d_hat, k);
        self.state = new;
        self.device_state.clear();
        Ok(())
    }
}
