//! AdamW with `torch.optim.AdamW` semantics (the single-tensor path): decoupled weight decay
//! `p ← p·(1 − lr·wd)`, first moment by `lerp`, bias-corrected step size, `eps` added outside
//! the square root, optional AMSGrad.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};

use super::{all_params, load_params, 
    check_adam_hyper, check_groups, grad_of, grad_tensor, lerp, lerp_tensor, read, state_dtype, steps_on_host, to_device_like,
    write, Args, Optimizer, ParamGroup, StateIn, StateOut,
};

#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    /// Loft's (and sd-scripts') default is 0.01, as torch's.
    pub weight_decay: f64,
    pub amsgrad: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.01,
            amsgrad: false,
        }
    }
}

impl AdamWConfig {
    pub fn from_args(map: &BTreeMap<String, String>) -> Result<Self> {
        let d = Self::default();
        let mut a = Args::new("AdamW", map);
        let c = Self {
            betas: a.pair("betas", d.betas)?,
            eps: a.f64("eps", d.eps)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            amsgrad: a.bool("amsgrad", d.amsgrad)?,
        };
        a.finish()?;
        Ok(c)
    }
}

#[derive(Clone, Debug)]
struct State {
    step: f64,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    max_exp_avg_sq: Vec<f32>,
}

/// [`State`] kept on the parameter's device (tensors shaped like it, in `state_dtype`: f32, or
/// the parameter's half dtype under full_fp16/full_bf16).
#[derive(Clone, Debug)]
struct DeviceState {
    step: f64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Option<Tensor>,
}

pub struct AdamW {
    groups: Vec<ParamGroup>,
    cfg: AdamWConfig,
    /// State of the parameters stepped by host loops (and all of it right after a load).
    state: HashMap<String, State>,
    /// State of the parameters stepped on their device.
    device_state: HashMap<String, DeviceState>,
}

impl AdamW {
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamWConfig) -> Result<Self> {
        check_groups("AdamW", &groups)?;
        check_adam_hyper("AdamW", cfg.betas, cfg.eps, cfg.weight_decay)?;
        Ok(Self {
            groups,
            cfg,
            state: HashMap::new(),
            device_state: HashMap::new(),
        })
    }

    /// One step of `var` with tensor ops on its device; the same arithmetic as the host loop.
    fn step_on_device(
        cfg: &AdamWConfig,
        host_state: &mut HashMap<String, State>,
        device_state: &mut HashMap<String, DeviceState>,
        (name, var): (&str, &candle_core::Var),
        g: Tensor,
        lr: f64,
    ) -> Result<()> {
        let (beta1, beta2) = cfg.betas;
        let wd = cfg.weight_decay;
        let st = Self::device_state_of(cfg, host_state, device_state, name, var, &g)?;
        st.step += 1.0;
        let mut p = var.as_tensor().detach().to_dtype(state_dtype(var))?;
        if wd != 0.0 {
            p = (p * (1.0 - lr * wd) as f32 as f64)?;
        }
        st.exp_avg = lerp_tensor(&st.exp_avg, &g, (1.0 - beta1) as f32)?;
        st.exp_avg_sq = ((&st.exp_avg_sq * beta2 as f32 as f64)? + (g.sqr()? * (1.0 - beta2) as f32 as f64)?)?;
        let v = match &mut st.max_exp_avg_sq {
            Some(mx) => {
                *mx = mx.maximum(&st.exp_avg_sq)?;
                mx.clone()
            }
            None => st.exp_avg_sq.clone(),
        };
        let bc1 = 1.0 - beta1.powf(st.step);
        let bc2_sqrt = (1.0 - beta2.powf(st.step)).sqrt() as f32;
        let step_size = (lr / bc1) as f32;
        let denom = ((v.sqrt()? / bc2_sqrt as f64)? + cfg.eps as f32 as f64)?;
        let p = (p - ((&st.exp_avg / denom)? * step_size as f64)?)?;
        var.set(&p.to_dtype(var.dtype())?)
    }

    /// A tensor's device state, made on its first step (or its first after a resume, whose
    /// state was loaded to the host).
    fn device_state_of<'a>(cfg: &AdamWConfig, host_state: &mut HashMap<String, State>, device_state: &'a mut HashMap<String, DeviceState>, name: &str, var: &candle_core::Var, g: &Tensor) -> Result<&'a mut DeviceState> {
        let amsgrad = cfg.amsgrad;
        if !device_state.contains_key(name) {
            // First step, or the first after a resume (whose state was loaded to the host).
            let st = match host_state.remove(name) {
                Some(h) => DeviceState {
                    step: h.step,
                    exp_avg: to_device_like(&h.exp_avg, var)?,
                    exp_avg_sq: to_device_like(&h.exp_avg_sq, var)?,
                    max_exp_avg_sq: if amsgrad { Some(to_device_like(&h.max_exp_avg_sq, var)?) } else { None },
                },
                None => {
                    // Separate buffers: the multi-tensor kernel updates them in place.
                    DeviceState {
                        step: 0.0,
                        exp_avg: g.zeros_like()?,
                        exp_avg_sq: g.zeros_like()?,
                        max_exp_avg_sq: if amsgrad { Some(g.zeros_like()?) } else { None },
                    }
                }
            };
            device_state.insert(name.to_string(), st);
        }
        Ok(device_state.get_mut(name).expect("inserted above"))
    }

    /// Every tensor in one launch of the multi-tensor kernel (worker/kernels/optim.cu) when all
    /// of them are f32 CUDA tensors and the kernels are on; `Ok(false)` otherwise.
    #[cfg(feature = "cuda")]
    fn step_multi_tensor(&mut self, grads: &GradStore, lr_scale: f64) -> Result<bool> {
        use crate::kernels::optim as multi;
        if !super::all_on_kernels(&self.groups) {
            return Ok(false);
        }
        let mut work = vec![]; // (name, var, gradient, scalars)
        for group in &self.groups {
            let lr = group.lr * lr_scale;
            for (name, var) in &group.params {
                let Some(g) = grad_tensor(grads, name, var)? else { continue };
                let st = Self::device_state_of(&self.cfg, &mut self.state, &mut self.device_state, name, var, &g)?;
                st.step += 1.0;
                let scalars = multi::adamw_scalars(lr, self.cfg.weight_decay, self.cfg.betas, st.step);
                work.push((name, var, g.contiguous()?, scalars));
            }
        }
        let tensors: Vec<multi::DeviceAdamW> = work
            .iter()
            .map(|(name, var, g, scalars)| {
                let st = &self.device_state[name.as_str()];
                multi::DeviceAdamW { param: var.as_tensor(), grad: g, exp_avg: &st.exp_avg, exp_avg_sq: &st.exp_avg_sq, max_exp_avg_sq: st.max_exp_avg_sq.as_ref(), scalars: *scalars }
            })
            .collect();
        multi::adamw_step(&tensors, multi::AdamWHyper::new(self.cfg.betas, self.cfg.eps, self.cfg.weight_decay), None, None)?;
        Ok(true)
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }
}

impl Optimizer for AdamW {
    fn kind(&self) -> &'static str {
        "AdamW"
    }

    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }

    fn step(&mut self, grads: &GradStore, lr_scale: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if self.step_multi_tensor(grads, lr_scale)? {
            return Ok(());
        }
        let (beta1, beta2) = self.cfg.betas;
        let wd = self.cfg.weight_decay;
        for group in &self.groups {
            let lr = group.lr * lr_scale;
            for (name, var) in &group.params {
                if !steps_on_host(var) {
                    if let Some(g) = grad_tensor(grads, name, var)? {
                        Self::step_on_device(&self.cfg, &mut self.state, &mut self.device_state, (name, var), g, lr)?;
                    }
                    continue;
                }
                let Some(g) = grad_of(grads, name, var)? else {
                    continue;
                };
                let mut p = read(var.as_tensor())?;
                let n = p.len();
                let st = self.state.entry(name.clone()).or_insert_with(|| State {
                    step: 0.0,
                    exp_avg: vec![0.0; n],
                    exp_avg_sq: vec![0.0; n],
                    max_exp_avg_sq: if self.cfg.amsgrad {
                        vec![0.0; n]
                    } else {
                        Vec::new()
                    },
                });
                st.step += 1.0;
                let decay = (1.0 - lr * wd) as f32;
                let w1 = (1.0 - beta1) as f32;
                let b2 = beta2 as f32;
                let w2 = (1.0 - beta2) as f32;
                let bc1 = 1.0 - beta1.powf(st.step);
                let bc2 = 1.0 - beta2.powf(st.step);
                let step_size = (lr / bc1) as f32;
                let bc2_sqrt = bc2.sqrt() as f32;
                let eps = self.cfg.eps as f32;
                for i in 0..n {
                    if wd != 0.0 {
                        p[i] *= decay;
                    }
                    st.exp_avg[i] = lerp(st.exp_avg[i], g[i], w1);
                    let v = &mut st.exp_avg_sq[i];
                    *v = *v * b2 + w2 * g[i] * g[i];
                    let vv = if self.cfg.amsgrad {
                        let mx = &mut st.max_exp_avg_sq[i];
                        *mx = mx.max(*v);
                        *mx
                    } else {
                        *v
                    };
                    let denom = vv.sqrt() / bc2_sqrt + eps;
                    p[i] += -step_size * (st.exp_avg[i] / denom);
                }
                write(var, p)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = StateOut::default();
        for (name, _) in all_params(&self.groups) {
            if let Some(st) = self.device_state.get(name) {
                out.param_scalar(name, "step", st.step)?;
                out.buf(name, "exp_avg", &read(&st.exp_avg)?)?;
                out.buf(name, "exp_avg_sq", &read(&st.exp_avg_sq)?)?;
                if let Some(mx) = &st.max_exp_avg_sq {
                    out.buf(name, "max_exp_avg_sq", &read(mx)?)?;
                }
            } else if let Some(st) = self.state.get(name) {
                out.param_scalar(name, "step", st.step)?;
                out.buf(name, "exp_avg", &st.exp_avg)?;
                out.buf(name, "exp_avg_sq", &st.exp_avg_sq)?;
                if self.cfg.amsgrad {
                    out.buf(name, "max_exp_avg_sq", &st.max_exp_avg_sq)?;
                }
            }
        }
        Ok(out.0)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let s = StateIn(state);
        let amsgrad = self.cfg.amsgrad;
        self.state = load_params(&self.groups, &s, "step", |name, var| {
            let n = var.elem_count();
            Ok(State {
                step: s.param_scalar(name, "step")?,
                exp_avg: s.buf(name, "exp_avg", n)?,
                exp_avg_sq: s.buf(name, "exp_avg_sq", n)?,
                max_exp_avg_sq: if amsgrad { s.buf(name, "max_exp_avg_sq", n)? } else { Vec::new() },
            })
        })?;
        self.device_state.clear();
        Ok(())
    }
}
