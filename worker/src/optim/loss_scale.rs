//! Dynamic loss scaling for fp16 mixed precision (PyTorch's `torch.amp.GradScaler`, which
//! accelerate — and so sd-scripts — uses with `mixed_precision = "fp16"`).
//!
//! fp16 has 5 exponent bits: gradients below ~6e-8 flush to zero in a half-precision backward.
//! The loss is multiplied by a large scale before the backward, the gradients of the (f32)
//! trained variables are divided by it before clipping and the optimizer step. When a
//! gradient overflows (inf/NaN) the step is skipped and the scale halved; after
//! `GROWTH_INTERVAL` finite steps in a row it doubles. GradScaler's defaults: 2¹⁶, ×2, ×½, 2000.

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// The factor the loss is multiplied by before the backward.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self { scale: Self::INIT, good_steps: 0 }
    }
}

impl LossScale {
    pub const INIT: f64 = 65536.0;
    pub const GROWTH_INTERVAL: u64 = 2000;

    /// Divides the gradients of `vars` by the scale, in place. Returns false when any of them
    /// holds an inf or NaN (the step must then be skipped, see [`LossScale::update`]).
    pub fn unscale(&self, vars: &[Var], grads: &mut GradStore) -> Result<bool> {
        let mut unscaled_all = vec![];
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let unscaled = (g.to_dtype(DType::F32)? / self.scale)?;
                grads.insert(v.as_tensor(), unscaled.to_dtype(g.dtype())?);
                unscaled_all.push(unscaled);
            }
        }
        if unscaled_all.is_empty() {
            return Ok(true);
        }
        // On a GPU with the kernels: every element checked in one launch (worker/kernels/optim.cu),
        // as GradScaler checks each element.
        #[cfg(feature = "cuda")]
        if unscaled_all[0].device().is_cuda() && crate::kernels::use_kernels(&unscaled_all[0]) {
            return Ok(!crate::kernels::optim::grad_stats(&unscaled_all)?.1);
        }
        // Σ|g| is inf/NaN iff some element is (an f32 sum of finite gradients this small cannot
        // overflow); summed on the device, read once for all tensors.
        let sums = unscaled_all.iter().map(|u| u.abs()?.sum_all()).collect::<Result<Vec<_>>>()?;
        let total: f32 = Tensor::stack(&sums, 0)?.sum_all()?.to_scalar()?;
        Ok(total.is_finite())
    }

    /// After a step whose gradients were `finite` (or not): back off or grow the scale.
    pub fn update(&mut self, finite: bool) {
        if finite {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn grads_of(vars: &[Var], values: &[f32]) -> GradStore {
        let mut g = GradStore::default();
        for (v, &x) in vars.iter().zip(values) {
            g.insert(v.as_tensor(), Tensor::full(x, v.dims(), &Device::Cpu).unwrap());
        }
        g
    }

    #[test]
    fn unscales_and_detects_overflow() {
        let vars: Vec<Var> = (0..2).map(|_| Var::zeros((3,), DType::F32, &Device::Cpu).unwrap()).collect();
        let s = LossScale::default();
        let mut g = grads_of(&vars, &[65536.0, -131072.0]);
        assert!(s.unscale(&vars, &mut g).unwrap());
        assert_eq!(g.get(&vars[0]).unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 3]);
        assert_eq!(g.get(&vars[1]).unwrap().to_vec1::<f32>().unwrap(), vec![-2.0; 3]);
        for bad in [f32::INFINITY, f32::NAN] {
            let mut g = grads_of(&vars, &[1.0, bad]);
            assert!(!s.unscale(&vars, &mut g).unwrap(), "{bad} is not finite");
        }
    }

    /// GradScaler's schedule: halve on overflow (restarting the count), double after 2000
    /// finite steps in a row.
    #[test]
    fn backs_off_and_grows_like_grad_scaler() {
        let mut s = LossScale::default();
        s.update(false);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (16384.0, 0));
        for _ in 0..2000 {
            s.update(true);
        }
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }
}
