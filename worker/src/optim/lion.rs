//! Lion with `lion_pytorch.Lion` (0.2.5) semantics: `p ← p·(1 − lr·wd)`, then
//! `p ← p − lr·sign(β1·m + (1−β1)·g)`, then `m ← β2·m + (1−β2)·g`.
//! (`sign(0) = 0`, as torch's `sgn`.)

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor};

use super::{all_params, load_params, 
    check_groups, grad_of, grad_tensor, read, state_dtype, steps_on_host, to_device_like, write, Args, Optimizer, ParamGroup,
    StateIn, StateOut,
};

#[derive(Clone, Debug, PartialEq)]
pub struct LionConfig {
    pub betas: (f64, f64),
    /// lion-pytorch's default is 0; Loft's field default (0.01) is applied by the form.
    pub weight_decay: f64,
}

impl Default for LionConfig {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.99),
            weight_decay: 0.0,
        }
    }
}

impl LionConfig {
    pub fn from_args(map: &BTreeMap<String, String>) -> Result<Self> {
        let d = Self::default();
        let mut a = Args::new("Lion", map);
        let c = Self {
            betas: a.pair("betas", d.betas)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
        };
        a.finish()?;
        Ok(c)
    }
}

pub struct Lion {
    groups: Vec<ParamGroup>,
    cfg: LionConfig,
    /// Momentum of the parameters stepped by host loops (and all of it right after a load).
    exp_avg: HashMap<String, Vec<f32>>,
    /// Momentum of the parameters stepped on their device (f32, shaped like the parameter).
    device_exp_avg: HashMap<String, Tensor>,
}

impl Lion {
    pub fn new(groups: Vec<ParamGroup>, cfg: LionConfig) -> Result<Self> {
        check_groups("Lion", &groups)?;
        let (b1, b2) = cfg.betas;
        if !(0.0..=1.0).contains(&b1) || !(0.0..=1.0).contains(&b2) {
            bail!("Lion: betas must be in [0, 1], got {:?}", cfg.betas);
        }
        Ok(Self {
            groups,
            cfg,
            exp_avg: HashMap::new(),
            device_exp_avg: HashMap::new(),
        })
    }
}

impl Lion {
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
            let scalars = multi::lion_scalars(group.lr * lr_scale, self.cfg.weight_decay);
            for (name, var) in &group.params {
                let Some(g) = grad_tensor(grads, name, var)? else { continue };
                if !self.device_exp_avg.contains_key(name) {
                    let m = match self.exp_avg.remove(name) {
                        Some(host) => to_device_like(&host, var)?,
                        None => g.zeros_like()?,
                    };
                    self.device_exp_avg.insert(name.clone(), m);
                }
                work.push((name, var, g.contiguous()?, scalars));
            }
        }
        let tensors: Vec<multi::DeviceLion> = work
            .iter()
            .map(|(name, var, g, scalars)| multi::DeviceLion { param: var.as_tensor(), grad: g, exp_avg: &self.device_exp_avg[name.as_str()], scalars: *scalars })
            .collect();
        multi::lion_step(&tensors, multi::LionHyper::new(self.cfg.betas), None, None)?;
        Ok(true)
    }
}

#[inline]
fn sgn(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

impl Optimizer for Lion {
    fn kind(&self) -> &'static str {
        "Lion"
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
        for group in &self.groups {
            let lr = group.lr * lr_scale;
            let decay = (1.0 - lr * self.cfg.weight_decay) as f32;
            let neg_lr = -lr as f32;
            let (b1, w1) = (beta1 as f32, (1.0 - beta1) as f32);
            let (b2, w2) = (beta2 as f32, (1.0 - beta2) as f32);
            for (name, var) in &group.params {
                if !steps_on_host(var) {
                    // The same three lines as the loop below, as tensor ops on the device.
                    let Some(g) = grad_tensor(grads, name, var)? else { continue };
                    let m = match (self.device_exp_avg.remove(name), self.exp_avg.remove(name)) {
                        (Some(m), _) => m,
                        (None, Some(host)) => to_device_like(&host, var)?,
                        (None, None) => g.zeros_like()?,
                    };
                    let p = (var.as_tensor().detach().to_dtype(state_dtype(var))? * decay as f64)?;
                    let update = ((&m * b1 as f64)? + (&g * w1 as f64)?)?.sign()?;
                    let p = (p + (update * neg_lr as f64)?)?;
                    let m = ((m * b2 as f64)? + (g * w2 as f64)?)?;
                    var.set(&p.to_dtype(var.dtype())?)?;
                    self.device_exp_avg.insert(name.clone(), m);
                    continue;
                }
                let Some(g) = grad_of(grads, name, var)? else {
                    continue;
                };
                let mut p = read(var.as_tensor())?;
                let m = self
                    .exp_avg
                    .entry(name.clone())
                    .or_insert_with(|| vec![0.0; p.len()]);
                for i in 0..p.len() {
                    p[i] *= decay;
                    let update = sgn(m[i] * b1 + w1 * g[i]);
                    p[i] += neg_lr * update;
                    m[i] = m[i] * b2 + w2 * g[i];
                }
                write(var, p)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = StateOut::default();
        for (name, _) in all_params(&self.groups) {
            if let Some(m) = self.device_exp_avg.get(name) {
                out.buf(name, "exp_avg", &read(m)?)?;
            } else if let Some(m) = self.exp_avg.get(name) {
                out.buf(name, "exp_avg", m)?;
            }
        }
        Ok(out.0)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let s = StateIn(state);
        self.exp_avg = load_params(&self.groups, &s, "exp_avg", |name, var| s.buf(name, "exp_avg", var.elem_count()))?;
        self.device_exp_avg.clear();
        Ok(())
    }
}
