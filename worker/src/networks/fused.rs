//! Rebuild-mode LoHa and LoKr weights and the Cayley transform of DIAG-OFT/BOFT as single graph
//! nodes over Loft's kernels (worker/kernels/lowrank.cu, cayley.cu; their CPU references on a
//! CPU tensor inside `kernels::with_kernels(true, …)`). The adapters take these where they
//! apply: see `LowRankDelta::fused_merge` and `common::cayley`.

use candle_core::{Result, Tensor};

use crate::kernels;
use crate::ops::{attach, Backward};
use crate::profile::Kind;

/// `W + α·P1⊙P2` (W frozen; P1, P2 with W's element count and dtype).
pub(crate) fn loha_merge(w: &Tensor, p1: &Tensor, p2: &Tensor, alpha: f64) -> Result<Tensor> {
    let out = kernels::lowrank::loha_merge(&w.detach(), &p1.detach(), &p2.detach(), alpha)?;
    attach(&[p1, p2], out, LohaBackward { alpha })
}

struct LohaBackward {
    alpha: f64,
}

impl Backward for LohaBackward {
    fn name(&self) -> &'static str {
        "loha-merge"
    }

    fn profile_kind(&self) -> Kind {
        Kind::LinearBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (d1, d2) = kernels::lowrank::loha_grad(&grad.contiguous()?, args[0], args[1], self.alpha)?;
        Ok(vec![needs[0].then_some(d1), needs[1].then_some(d2)])
    }
}

/// `W + α·kron(w1, w2)` (W frozen; w2 read as its first dimension × the rest).
pub(crate) fn lokr_merge(w: &Tensor, w1: &Tensor, w2: &Tensor, alpha: f64) -> Result<Tensor> {
    let out = kernels::lowrank::lokr_merge(&w.detach(), &w1.detach(), &w2.detach(), alpha)?;
    attach(&[w1, w2], out, LokrBackward { alpha })
}

struct LokrBackward {
    alpha: f64,
}

impl Backward for LokrBackward {
    fn name(&self) -> &'static str {
        "lokr-merge"
    }

    fn profile_kind(&self) -> Kind {
        Kind::LinearBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (d1, d2) = kernels::lowrank::lokr_grad(&grad.contiguous()?, args[0], args[1], self.alpha)?;
        Ok(vec![needs[0].then_some(d1), needs[1].then_some(d2)])
    }
}

/// `R = (I + Q)(I − Q)⁻¹` per block of `q (n, b, b)`, in q's dtype.
pub(crate) fn cayley(q: &Tensor) -> Result<Tensor> {
    let (r, inv) = kernels::cayley::forward(&q.detach())?;
    attach(&[q], r.to_dtype(q.dtype())?, CayleyBackward { inv })
}

struct CayleyBackward {
    /// (I − Q)⁻¹, f64.
    inv: Tensor,
}

impl Backward for CayleyBackward {
    fn name(&self) -> &'static str {
        "cayley"
    }

    fn profile_kind(&self) -> Kind {
        Kind::LinearBackward
    }

    fn backward(&self, args: &[&Tensor], _needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let q = args[0];
        Ok(vec![Some(kernels::cayley::backward(q, &self.inv, grad)?.to_dtype(q.dtype())?)])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Result, Tensor, Var};

    use crate::kernels::with_kernels;
    use crate::networks::options::NetworkOptions;
    use crate::networks::testutil::*;
    use crate::networks::{build_adapter, NetworkAlgo};

    /// The adapter's output and every parameter's gradient, kernels on (the fused ops) and off.
    fn compare(algo: NetworkAlgo, o: &NetworkOptions) -> Result<()> {
        for (base, x) in standard_cases()? {
            let a = build_adapter(algo, o, &base, "t")?;
            randomize(a.as_ref(), 7)?;
            let run = |on: bool| -> Result<(Tensor, Vec<Tensor>)> {
                with_kernels(on, || {
                    let y = a.forward(&base, &x, true)?;
                    let r = randn(y.dims(), 8)?.to_dtype(y.dtype())?;
                    let grads = (&y * &r)?.sum_all()?.backward()?;
                    let gs = a.trainable().iter().map(|(name, v): &(String, Var)| grads.get(v.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg(format!("no gradient for {name}")))).collect::<Result<Vec<_>>>()?;
                    Ok((y, gs))
                })
            };
            let ((y0, g0), (y1, g1)) = (run(false)?, run(true)?);
            assert_close(&y1, &y0, 1e-5, &format!("{algo:?} output"));
            for (i, (a1, a0)) in g1.iter().zip(&g0).enumerate() {
                assert_close(a1, a0, 1e-4, &format!("{algo:?} gradient {i}"));
            }
        }
        Ok(())
    }

    #[test]
    fn fused_loha_and_lokr_rebuilds_equal_the_candle_ones() -> Result<()> {
        compare(NetworkAlgo::Loha, &NetworkOptions { dim: 4, alpha: 2.0, ..Default::default() })?;
        compare(NetworkAlgo::Lokr, &NetworkOptions { dim: 4, alpha: 2.0, ..Default::default() })?;
        compare(NetworkAlgo::Lokr, &NetworkOptions { dim: 2, alpha: 1.0, decompose_both: true, ..Default::default() })
    }

    #[test]
    fn the_cayley_op_equals_the_exact_candle_inverse_and_its_gradient() -> Result<()> {
        let (n, b) = (3usize, 6usize);
        let blocks = Var::from_tensor(&(randn(&[n, b, b], 41)?.to_dtype(DType::F64)? * 0.3)?)?;
        let weights = randn(&[n, b, b], 42)?.to_dtype(DType::F64)?;
        let run = |on: bool| -> Result<(Tensor, Tensor)> {
            with_kernels(on, || {
                let q = (blocks.as_tensor() - blocks.as_tensor().transpose(1, 2)?)?;
                let r = super::super::common::cayley(&q)?;
                let g = (&r * &weights)?.sum_all()?.backward()?;
                Ok((r, g.get(blocks.as_tensor()).unwrap().clone()))
            })
        };
        let ((r0, g0), (r1, g1)) = (run(false)?, run(true)?);
        assert_close(&r1, &r0, 1e-12, "R");
        assert_close(&g1, &g0, 1e-10, "dQ");
        Ok(())
    }
}
