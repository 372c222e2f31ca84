//! GLoRA-Extended (Ktiseos-Nyx/LyCORIS fork, `lycoris/modules/glora_extended.py`,
//! `glora-ex`). Not in upstream LyCORIS. Rebuild mode only.
//!
//! ΔW = s·(W·(a2@a1) + b2@b1) and Δb = s·(W·(c2@c1)ᵀ + d ⊙ b + e), s = alpha/r (alpha/√r with
//! rs_lora) times the `use_scalar` scalar. The a/b roles are swapped relative to GLoRA.
//! Tensors (Linear / Conv2d): `a1.weight` (r, in[, 1, 1]) kaiming (orthonormal rows with
//! "Orthogonalize"), `a2.weight` (in, r[, 1, 1]) zeros, `b1.weight` (r, in[, kh, kw]) kaiming,
//! `b2.weight` (out, r[, 1, 1]) zeros, `c1.weight` (r, in[, 1, 1]) kaiming, `c2.weight`
//! (1, r[, 1, 1]) zeros, `d_param` (out) zeros when the layer has a bias, `e_param` (out)
//! zeros. With `use_scalar` all six matrices start kaiming and the scalar (starting at 0) is
//! folded into a2, b2, c2, d and e on save (the fork forgets to save it). For convolutions
//! the W·c bias term is averaged over the kernel positions, as the fork does.
//!
//! Dropouts: module dropout; rank dropout masks output rows of ΔW and Δb; network dropout is
//! not used (rebuild mode ignores it, as for every LyCORIS module; the fork's input dropout
//! would also perturb the frozen path).

use std::collections::HashMap;

use candle_core::{bail, Result, Tensor, Var};

use super::common::{alpha_from, alpha_tensor, new_scalar, required, times_scalar, Ctx, Init, RankScale};
use super::glora::weight_times_input_map;
use super::{Adapter, BaseLayer, LayerKind, NetworkOptions};

pub(crate) struct GloraEx {
    ctx: Ctx,
    a1: Var,
    a2: Var,
    b1: Var,
    b2: Var,
    c1: Var,
    c2: Var,
    d: Option<Var>,
    e: Var,
    scalar: Option<Var>,
    scale: f64,
    saved_alpha: f64,
}

const MATRICES: [&str; 6] = ["a1.weight", "a2.weight", "b1.weight", "b2.weight", "c1.weight", "c2.weight"];

fn shapes(ctx: &Ctx, rank: usize) -> [Vec<usize>; 6] {
    let (out, inp) = (ctx.out_dim(), ctx.in_dim());
    match &ctx.kind {
        LayerKind::Conv2d { kernel, .. } => [
            vec![rank, inp, 1, 1],
            vec![inp, rank, 1, 1],
            vec![rank, inp, kernel.0, kernel.1],
            vec![out, rank, 1, 1],
            vec![rank, inp, 1, 1],
            vec![1, rank, 1, 1],
        ],
        _ => [vec![rank, inp], vec![inp, rank], vec![rank, inp], vec![out, rank], vec![rank, inp], vec![1, rank]],
    }
}

pub(crate) fn build(
    opts: &NetworkOptions,
    base: &BaseLayer,
    layer: &str,
    rank: usize,
    alpha: f64,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    if rank == 0 {
        bail!("layer {layer}: GLoRA-Ex rank must be at least 1");
    }
    let s = shapes(&ctx, rank);
    let kaiming_a1 = Init::down(opts.orthogonalize);
    let second = if opts.use_scalar { Init::Kaiming } else { Init::Zeros };
    let out = ctx.out_dim();
    let rs = RankScale::lycoris(rank, alpha, opts.rs_lora);
    Ok(Box::new(GloraEx {
        a1: ctx.var(&s[0], kaiming_a1)?,
        a2: ctx.var(&s[1], second)?,
        b1: ctx.var(&s[2], Init::Kaiming)?,
        b2: ctx.var(&s[3], second)?,
        c1: ctx.var(&s[4], Init::Kaiming)?,
        c2: ctx.var(&s[5], second)?,
        d: if base.bias.is_some() { Some(ctx.var(&[out], Init::Zeros)?) } else { None },
        e: ctx.var(&[out], Init::Zeros)?,
        scalar: new_scalar(opts.use_scalar, ctx.dtype, &ctx.device)?,
        scale: rs.scale,
        saved_alpha: rs.saved_alpha,
        ctx,
    }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    if opts.bypass_mode {
        bail!("layer {layer}: glora_ex supports rebuild mode only; turn bypass_mode off");
    }
    let rank = required(tensors, "a1.weight", layer, "GLoRA-Ex")?.dim(0)?;
    let shapes = shapes(&ctx, rank);
    let mut vars = Vec::new();
    for (key, shape) in MATRICES.iter().zip(shapes.iter()) {
        let t = required(tensors, key, layer, "GLoRA-Ex")?;
        if t.elem_count() != shape.iter().product::<usize>() {
            bail!("layer {layer}: GLoRA-Ex `{key}` has shape {:?} but this layer needs {:?}", t.dims(), shape);
        }
        vars.push(ctx.var_copy(&t.reshape(shape.clone())?)?);
    }
    let out = ctx.out_dim();
    let vec_param = |key: &str| -> Result<Option<Var>> {
        match tensors.get(key) {
            Some(t) if t.elem_count() == out => Ok(Some(ctx.var_copy(&t.reshape(out)?)?)),
            Some(t) => bail!("layer {layer}: GLoRA-Ex `{key}` has shape {:?}, needs [{out}]", t.dims()),
            None => Ok(None),
        }
    };
    let d = if base.bias.is_some() { vec_param("d_param")? } else { None };
    let e = match vec_param("e_param")? {
        Some(e) => e,
        None => ctx.var(&[out], Init::Zeros)?,
    };
    let rs = RankScale::from_saved(rank, alpha_from(tensors)?);
    let mut it = vars.into_iter();
    Ok(Box::new(GloraEx {
        a1: it.next().unwrap(),
        a2: it.next().unwrap(),
        b1: it.next().unwrap(),
        b2: it.next().unwrap(),
        c1: it.next().unwrap(),
        c2: it.next().unwrap(),
        d,
        e,
        scalar: None,
        scale: rs.scale,
        saved_alpha: rs.saved_alpha,
        ctx,
    }))
}

impl GloraEx {
    /// (ΔW, Δb) with scale and scalar, without the multiplier; rank dropout on rows while
    /// training.
    fn deltas(&self, train: bool) -> Result<(Tensor, Tensor)> {
        let ctx = &self.ctx;
        let w = ctx.weight_p()?;
        let flat = |v: &Var| v.as_tensor().flatten_from(1);
        let a = flat(&self.a2)?.matmul(&flat(&self.a1)?)?; // (in, in)
        let b = flat(&self.b2)?.matmul(&flat(&self.b1)?)?.reshape(ctx.weight_shape())?;
        let dw = (weight_times_input_map(&w, &a)? + b)?;
        // W·(c2@c1)ᵀ: (in, 1) through W, averaged over kernel positions for convs.
        let c = flat(&self.c2)?.matmul(&flat(&self.c1)?)?.t()?; // (in, 1)
        let out = ctx.out_dim();
        let wc = weight_times_input_map(&w, &c)?.reshape((out, ()))?.mean(1)?;
        let mut db = (wc + self.e.as_tensor())?;
        if let (Some(d), Some(bias)) = (&self.d, ctx.bias_p()?) {
            db = (db + d.as_tensor().mul(&bias)?)?;
        }
        let (mut dw, mut db) = (dw.affine(self.scale, 0.0)?, db.affine(self.scale, 0.0)?);
        if let Some(mask) = ctx.rank_mask(out, train)? {
            let mut shape = vec![1usize; dw.rank()];
            shape[0] = out;
            dw = dw.broadcast_mul(&mask.reshape(shape)?)?;
            db = db.mul(&mask)?;
        }
        Ok((times_scalar(&dw, &self.scalar)?, times_scalar(&db, &self.scalar)?))
    }

    fn merged(&self, train: bool) -> Result<(Tensor, Tensor)> {
        let m = self.ctx.multiplier;
        let (dw, db) = self.deltas(train)?;
        let w = (self.ctx.weight_p()? + dw.affine(m, 0.0)?)?;
        let b = match self.ctx.bias_p()? {
            Some(b) => (b + db.affine(m, 0.0)?)?,
            None => db.affine(m, 0.0)?,
        };
        Ok((w, b))
    }
}

impl Adapter for GloraEx {
    fn algo_name(&self) -> &'static str {
        "glora_ex"
    }

    fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.deltas(false)?.0)
    }

    fn delta_bias(&self) -> Result<Option<Tensor>> {
        Ok(Some(self.deltas(false)?.1))
    }

    fn forward(&self, base: &BaseLayer, x: &Tensor, train: bool) -> Result<Tensor> {
        if self.ctx.module_dropped(train)? {
            return base.forward(x);
        }
        let (w, b) = self.merged(train)?;
        base.forward_with(x, &w, Some(&b))
    }

    fn merged_weight(&self, _base: &BaseLayer) -> Result<Tensor> {
        Ok(self.merged(false)?.0)
    }

    fn merged_bias(&self, _base: &BaseLayer) -> Result<Option<Tensor>> {
        Ok(Some(self.merged(false)?.1))
    }

    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = MATRICES
            .iter()
            .zip([&self.a1, &self.a2, &self.b1, &self.b2, &self.c1, &self.c2])
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect();
        if let Some(d) = &self.d {
            v.push(("d_param".into(), d.clone()));
        }
        v.push(("e_param".into(), self.e.clone()));
        if let Some(s) = &self.scalar {
            v.push(("scalar".into(), s.clone()));
        }
        v
    }

    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        // The scalar multiplies all of ΔW and Δb: fold it into the second factor of each
        // product and into d and e.
        let folded = ["a2.weight", "b2.weight", "c2.weight", "d_param", "e_param"];
        let mut v = Vec::new();
        for (name, var) in self.trainable() {
            if name == "scalar" {
                continue;
            }
            let t = if folded.contains(&name.as_str()) {
                times_scalar(var.as_tensor(), &self.scalar)?
            } else {
                var.as_tensor().clone()
            };
            v.push((name, t));
        }
        v.push(("alpha".into(), alpha_tensor(self.saved_alpha, &self.ctx.device)?));
        Ok(v)
    }

    fn multiplier(&self) -> f64 {
        self.ctx.multiplier
    }

    fn set_multiplier(&mut self, multiplier: f64) {
        self.ctx.multiplier = multiplier;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::testutil::*;
    use crate::networks::{build_adapter, NetworkAlgo};
    use candle_core::DType;

    const ALGO: NetworkAlgo = NetworkAlgo::GloraEx;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 4, alpha: 2.0, ..Default::default() }
    }

    #[test]
    fn shapes_and_naive_deltas() -> Result<()> {
        for (base, _) in standard_cases()? {
            let a = build_adapter(ALGO, &opts(), &base, "t")?;
            assert_eq!(max_abs(&a.delta_weight()?)?, 0.0);
            assert_eq!(max_abs(&a.delta_bias()?.unwrap())?, 0.0);
            let s = state_map(a.as_ref())?;
            let w = base.weight.dims().to_vec();
            assert_eq!(s["c2.weight"].dims()[..2], [1, 4]);
            assert_eq!(s["d_param"].dims(), [w[0]]);
            assert_eq!(s["e_param"].dims(), [w[0]]);
            randomize(a.as_ref(), 1)?;
            let s = state_map(a.as_ref())?;
            let m = |k: &str| Mat::from_tensor_2d(&s[k]).unwrap();
            let vecf = |k: &str| s[k].to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            let wm = Mat::from_tensor_2d(&base.weight)?;
            let (out, inn, kk) = (w[0], w[1], wm.cols / w[1]);
            let amat = m("a2.weight").matmul(&m("a1.weight"));
            let cvec = m("c2.weight").matmul(&m("c1.weight")); // (1, in)
            let mut dw = m("b2.weight").matmul(&m("b1.weight"));
            let bias = base.bias.as_ref().unwrap().to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let (d, e) = (vecf("d_param"), vecf("e_param"));
            let mut db = vec![0.0; out];
            for o in 0..out {
                for j in 0..inn {
                    for k in 0..kk {
                        dw.data[o * wm.cols + j * kk + k] +=
                            (0..inn).map(|i| wm.at(o, i * kk + k) * amat.at(i, j)).sum::<f64>();
                    }
                }
                let wc: f64 =
                    (0..inn).map(|i| (0..kk).map(|k| wm.at(o, i * kk + k)).sum::<f64>() * cvec.at(0, i)).sum();
                db[o] = (wc / kk as f64 + d[o] * bias[o] + e[o]) * 0.5;
            }
            assert_mat_close(&a.delta_weight()?, &dw.scale(0.5), 1e-5, "GLoRA-Ex ΔW");
            assert_mat_close(&a.delta_bias()?.unwrap().reshape((out, 1))?, &Mat::new(out, 1, db), 1e-5, "GLoRA-Ex Δb");
        }
        Ok(())
    }

    #[test]
    fn rebuild_reload_and_scalar_fold() -> Result<()> {
        for (base, x) in standard_cases()? {
            check_modes(ALGO, &NetworkOptions { multiplier: 0.6, ..opts() }, &base, &x, true, false)?;
            check_modes(ALGO, &NetworkOptions { use_scalar: true, rs_lora: true, ..opts() }, &base, &x, true, false)?;
            let nb = BaseLayer { bias: None, ..base.clone() };
            let a = check_modes(ALGO, &opts(), &nb, &x, true, false)?;
            assert!(!state_map(a.as_ref())?.contains_key("d_param"), "no d without a bias");
        }
        Ok(())
    }

    #[test]
    fn bypass_is_rejected() {
        let (base, _) = standard_cases().unwrap().remove(0);
        let o = NetworkOptions { bypass_mode: true, ..opts() };
        let msg = build_adapter(ALGO, &o, &base, "mid.proj").err().unwrap().to_string();
        assert!(msg.contains("mid.proj") && msg.contains("rebuild mode only"), "{msg}");
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions { use_scalar: true, ..opts() })?;
        check_grads(ALGO, &opts())
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &NetworkOptions { dim: 4, alpha: 4.0, ..Default::default() }, 200, 0.02, 10.0)
    }
}
