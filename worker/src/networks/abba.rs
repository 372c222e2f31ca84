//! ABBA (forks 67372a/LyCORIS and Ktiseos-Nyx/LyCORIS, `lycoris/modules/abba.py`; read by
//! reForge's `weight_adapter/abba.py`): the Hadamard product of two LoRAs,
//! ΔW = s·(up1@down1) ⊙ (up2@down2), s = alpha²/√(r1·r2), r1 = ⌊r/2⌋, r2 = r − r1.
//!
//! Tensors: `lora_down{1,2}.weight` (r_j, in[, kh, kw]) and `lora_up{1,2}.weight`
//! (out, r_j[, 1, 1]). Init (the paper's hybrid): pair 1 from the top-r1 SVD of W —
//! up1 = U√S, down1 = √S·Vᵀ — computed by randomised subspace iteration like the fork's
//! `svd_lowrank(W, r1, niter=10)` (seeded here, so reproducible); down2 kaiming, up2 zeros.
//! `use_scalar` works as in LyCORIS (scalar from 0, up2 kaiming, folded into up2 on save; the
//! fork starts its scalar at 1 and saves √scalar into both ups, which fails for negative
//! scalars). DoRA as in LoCon. rs_lora does not apply (the scale is the paper's).

use std::collections::HashMap;

use candle_core::{bail, DType, Result, Tensor, Var};

use super::common::{
    alpha_from, alpha_tensor, folded, mm, new_scalar, required, times_scalar, AdapterRng, Ctx, Dora, Init,
    LowRankAdapter, LowRankDelta,
};
use super::{Adapter, BaseLayer, LayerKind, NetworkOptions};

pub(crate) struct AbbaDelta {
    down1: Var,
    up1: Var,
    down2: Var,
    up2: Var,
    scalar: Option<Var>,
    scale: f64,
    /// alpha as saved (0 resolved to r).
    alpha: f64,
}

/// s = alpha²/√(r1·r2).
pub fn abba_scale(alpha: f64, r1: usize, r2: usize) -> f64 {
    alpha * alpha / ((r1 * r2) as f64).sqrt()
}

fn down_up_shapes(ctx: &Ctx, r: usize) -> (Vec<usize>, Vec<usize>) {
    match &ctx.kind {
        LayerKind::Conv2d { in_channels, out_channels, kernel, .. } => {
            (vec![r, *in_channels, kernel.0, kernel.1], vec![*out_channels, r, 1, 1])
        }
        _ => (vec![r, ctx.in_dim()], vec![ctx.out_dim(), r]),
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
    if rank < 2 {
        bail!("layer {layer}: ABBA splits the rank into two halves and needs rank ≥ 2, got {rank}");
    }
    let (r1, r2) = (rank / 2, rank - rank / 2);
    let (d1_s, u1_s) = down_up_shapes(&ctx, r1);
    let (d2_s, u2_s) = down_up_shapes(&ctx, r2);
    // Pair 1 from the top-r1 singular triplets of W (flattened to (out, in·kh·kw)).
    let w2d = ctx.weight.to_dtype(DType::F64)?.flatten_from(1)?;
    let (u, s, v) = truncated_svd(&w2d, r1, 10, &ctx.rng)?;
    let sqrt_s = s.sqrt()?;
    let up1 = u.broadcast_mul(&sqrt_s.unsqueeze(0)?)?.reshape(u1_s)?.to_dtype(ctx.dtype)?;
    let down1 = v.t()?.broadcast_mul(&sqrt_s.unsqueeze(1)?)?.reshape(d1_s)?.to_dtype(ctx.dtype)?;
    let alpha = if alpha == 0.0 { rank as f64 } else { alpha };
    let src = AbbaDelta {
        down1: Var::from_tensor(&down1.contiguous()?)?,
        up1: Var::from_tensor(&up1.contiguous()?)?,
        down2: ctx.var(&d2_s, Init::Kaiming)?,
        up2: ctx.var(&u2_s, if opts.use_scalar { Init::Kaiming } else { Init::Zeros })?,
        scalar: new_scalar(opts.use_scalar, ctx.dtype, &ctx.device)?,
        scale: abba_scale(alpha, r1, r2),
        alpha,
    };
    let dora = if opts.dora_wd { Some(Dora::new(&ctx, opts.wd_on_output)?) } else { None };
    Ok(Box::new(LowRankAdapter { ctx, dora, src }))
}

pub(crate) fn from_tensors(
    opts: &NetworkOptions,
    base: &BaseLayer,
    tensors: &HashMap<String, Tensor>,
    layer: &str,
) -> Result<Box<dyn Adapter>> {
    let ctx = Ctx::new(opts, base, layer)?;
    let get = |k: &str| required(tensors, k, layer, "ABBA");
    let (d1, u1, d2, u2) =
        (get("lora_down1.weight")?, get("lora_up1.weight")?, get("lora_down2.weight")?, get("lora_up2.weight")?);
    let (r1, r2) = (d1.dim(0)?, d2.dim(0)?);
    let mut vars = Vec::new();
    for (t, r, is_down, name) in [
        (d1, r1, true, "lora_down1.weight"),
        (u1, r1, false, "lora_up1.weight"),
        (d2, r2, true, "lora_down2.weight"),
        (u2, r2, false, "lora_up2.weight"),
    ] {
        let (ds, us) = down_up_shapes(&ctx, r);
        let shape = if is_down { ds } else { us };
        if t.elem_count() != shape.iter().product::<usize>() {
            bail!("layer {layer}: ABBA `{name}` has shape {:?} but this layer needs {:?}", t.dims(), shape);
        }
        vars.push(ctx.var_copy(&t.reshape(shape)?)?);
    }
    let alpha = match alpha_from(tensors)? {
        Some(a) if a != 0.0 => a,
        _ => (r1 + r2) as f64,
    };
    let dora = tensors.get("dora_scale").map(|d| Dora::from_tensor(&ctx, d)).transpose()?;
    let mut it = vars.into_iter();
    let src = AbbaDelta {
        down1: it.next().unwrap(),
        up1: it.next().unwrap(),
        down2: it.next().unwrap(),
        up2: it.next().unwrap(),
        scalar: None,
        scale: abba_scale(alpha, r1, r2),
        alpha,
    };
    Ok(Box::new(LowRankAdapter { ctx, dora, src }))
}

impl LowRankDelta for AbbaDelta {
    fn algo_name(&self) -> &'static str {
        "abba"
    }

    fn delta(&self, ctx: &Ctx, train: bool) -> Result<Tensor> {
        let p1 = mm(self.up1.as_tensor(), self.down1.as_tensor())?;
        let p2 = mm(self.up2.as_tensor(), self.down2.as_tensor())?;
        let w = (p1 * p2)?.reshape(ctx.weight_shape())?.affine(self.scale, 0.0)?;
        times_scalar(&ctx.drop_rows(&w, train)?, &self.scalar)
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("lora_down1.weight".to_string(), self.down1.clone()),
            ("lora_up1.weight".into(), self.up1.clone()),
            ("lora_down2.weight".into(), self.down2.clone()),
            ("lora_up2.weight".into(), self.up2.clone()),
        ];
        if let Some(s) = &self.scalar {
            v.push(("scalar".into(), s.clone()));
        }
        v
    }

    fn state(&self, ctx: &Ctx) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            ("lora_down1.weight".to_string(), self.down1.as_tensor().clone()),
            ("lora_up1.weight".into(), self.up1.as_tensor().clone()),
            ("lora_down2.weight".into(), self.down2.as_tensor().clone()),
            ("lora_up2.weight".into(), folded(&self.up2, &self.scalar)?),
            ("alpha".into(), alpha_tensor(self.alpha, &ctx.device)?),
        ])
    }
}

// ---------------------------------------------------------------------------------------------
// Truncated SVD
// ---------------------------------------------------------------------------------------------

/// Top-`k` singular triplets of a 2-D f64 tensor `w (m, n)`: `(U (m, k), S (k), V (n, k))`,
/// singular values descending. Randomised subspace iteration (Halko et al.; what
/// `torch.svd_lowrank` does) with a few extra columns and `niter` power iterations; the big
/// products run as candle matmuls on `w`'s device, the small orthonormalisations and the
/// final (k+p)×(k+p) eigenproblem (cyclic Jacobi) on the host in f64.
pub(crate) fn truncated_svd(w: &Tensor, k: usize, niter: usize, rng: &AdapterRng) -> Result<(Tensor, Tensor, Tensor)> {
    let (m, n) = w.dims2()?;
    let k = k.min(m).min(n);
    let q = (k + 8).min(m).min(n);
    let device = w.device().clone();
    let w = w.to_dtype(DType::F64)?;
    let omega: Vec<f64> = rng.normal(&[n, q], 1.0).into_iter().map(|v| v as f64).collect();
    let omega = Tensor::from_vec(omega, (n, q), &device)?;
    let mut basis = orthonormal_columns(&w.matmul(&omega)?)?;
    for _ in 0..niter {
        let z = orthonormal_columns(&w.t()?.matmul(&basis)?)?;
        basis = orthonormal_columns(&w.matmul(&z)?)?;
    }
    let b = basis.t()?.matmul(&w)?; // (q, n)
    let gram = b.matmul(&b.t()?)?; // (q, q)
    let (evals, evecs) = jacobi_eigen(&gram.flatten_all()?.to_vec1::<f64>()?, q);
    let mut order: Vec<usize> = (0..q).collect();
    order.sort_by(|a, b| evals[*b].total_cmp(&evals[*a]));
    let top = &order[..k];
    let s: Vec<f64> = top.iter().map(|i| evals[*i].max(0.0).sqrt()).collect();
    let mut ub = vec![0f64; q * k];
    for (col, &i) in top.iter().enumerate() {
        for row in 0..q {
            ub[row * k + col] = evecs[row * q + i];
        }
    }
    let ub = Tensor::from_vec(ub, (q, k), &device)?;
    let u = basis.matmul(&ub)?;
    let s_t = Tensor::from_vec(s.clone(), k, &device)?;
    // V = Bᵀ·Ub / S (columns with S = 0 stay zero).
    let inv_s: Vec<f64> = s.iter().map(|v| if *v > 0.0 { 1.0 / v } else { 0.0 }).collect();
    let v = b.t()?.matmul(&ub)?.broadcast_mul(&Tensor::from_vec(inv_s, (1, k), &device)?)?;
    Ok((u, s_t, v))
}

/// Orthonormal basis of the columns of `a (rows, cols)` (modified Gram–Schmidt, twice).
fn orthonormal_columns(a: &Tensor) -> Result<Tensor> {
    let (rows, cols) = a.dims2()?;
    let device = a.device().clone();
    // Work on the transpose so that each column is a contiguous row.
    let mut t = a.t()?.contiguous()?.flatten_all()?.to_vec1::<f64>()?;
    for _ in 0..2 {
        for i in 0..cols {
            for j in 0..i {
                let dot: f64 = (0..rows).map(|r| t[i * rows + r] * t[j * rows + r]).sum();
                for r in 0..rows {
                    t[i * rows + r] -= dot * t[j * rows + r];
                }
            }
            let norm = (0..rows).map(|r| t[i * rows + r].powi(2)).sum::<f64>().sqrt();
            let norm = if norm > 1e-300 { norm } else { 1.0 };
            for r in 0..rows {
                t[i * rows + r] /= norm;
            }
        }
    }
    Tensor::from_vec(t, (cols, rows), &device)?.t()?.contiguous()
}

/// Eigen-decomposition of a symmetric `n×n` row-major matrix by cyclic Jacobi rotations:
/// (eigenvalues, eigenvectors as columns, row-major).
fn jacobi_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut a = a.to_vec();
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |j| *j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        let total: f64 = a.iter().map(|x| x * x).sum();
        if off <= 1e-30 * total.max(1e-300) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..n).map(|i| a[i * n + i]).collect(), v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::testutil::*;
    use crate::networks::{build_adapter, NetworkAlgo};

    const ALGO: NetworkAlgo = NetworkAlgo::Abba;

    fn opts() -> NetworkOptions {
        NetworkOptions { dim: 4, alpha: 2.0, ..Default::default() }
    }

    #[test]
    fn truncated_svd_recovers_known_singular_values() -> Result<()> {
        // W = U·diag(s)·Vᵀ with orthonormal U (20×6), V (30×6).
        let rng = AdapterRng::new(5);
        let u = Mat::new(20, 6, rng.orthogonal(&[20, 6]).into_iter().map(|v| v as f64).collect());
        let v = Mat::new(30, 6, rng.orthogonal(&[30, 6]).into_iter().map(|v| v as f64).collect());
        let s = [9.0, 5.0, 3.0, 2.0, 0.5, 0.1];
        let mut us = u.clone();
        for r in 0..20 {
            for c in 0..6 {
                us.data[r * 6 + c] *= s[c];
            }
        }
        let w = us.matmul(&v.t());
        let wt = Tensor::from_vec(w.data.clone(), (20, 30), &dev())?;
        let (uu, ss, vv) = truncated_svd(&wt, 3, 10, &AdapterRng::new(9))?;
        let got = ss.to_vec1::<f64>()?;
        for (g, want) in got.iter().zip(&s[..3]) {
            // U and V come from f32 values, so they are orthonormal to ~1e-7 only.
            assert!((g - want).abs() < 1e-6, "{got:?}");
        }
        // U S Vᵀ equals the best rank-3 approximation.
        let approx = Mat::from_tensor_2d(&uu.broadcast_mul(&ss.unsqueeze(0)?)?.matmul(&vv.t()?)?)?;
        let mut best = u.clone();
        for r in 0..20 {
            for c in 0..6 {
                best.data[r * 6 + c] *= if c < 3 { s[c] } else { 0.0 };
            }
        }
        assert!(approx.sub(&best.matmul(&v.t())).max_abs() < 1e-6);
        Ok(())
    }

    #[test]
    fn svd_init_shapes_and_scale() -> Result<()> {
        for (base, _) in standard_cases()? {
            let a = build_adapter(ALGO, &NetworkOptions { dim: 5, ..opts() }, &base, "t")?;
            assert_eq!(max_abs(&a.delta_weight()?)?, 0.0, "up2 = 0");
            let s = state_map(a.as_ref())?;
            assert_eq!(s["lora_down1.weight"].dim(0)?, 2);
            assert_eq!(s["lora_down2.weight"].dim(0)?, 3);
            assert_eq!(s["lora_up1.weight"].dim(1)?, 2);
            // up1@down1 is the best rank-2 approximation of W: its residual is orthogonal.
            let p1 = Mat::from_tensor_2d(&s["lora_up1.weight"])?.matmul(&Mat::from_tensor_2d(&s["lora_down1.weight"])?);
            let w = Mat::from_tensor_2d(&base.weight)?;
            let resid = w.sub(&p1);
            let cross = resid.t().matmul(&p1).max_abs();
            assert!(cross < 1e-4, "residual not orthogonal to the rank-2 part: {cross}");
            assert!(p1.max_abs() > 0.1);
            // naive ΔW with s = alpha²/√(r1 r2)
            randomize(a.as_ref(), 1)?;
            let s = state_map(a.as_ref())?;
            let m = |k: &str| Mat::from_tensor_2d(&s[k]).unwrap();
            let want = m("lora_up1.weight")
                .matmul(&m("lora_down1.weight"))
                .hadamard(&m("lora_up2.weight").matmul(&m("lora_down2.weight")))
                .scale(4.0 / 6f64.sqrt());
            assert_mat_close(&a.delta_weight()?, &want, 1e-5, "ABBA ΔW");
        }
        Ok(())
    }

    #[test]
    fn rank_below_two_is_rejected() {
        let (base, _) = standard_cases().unwrap().remove(0);
        let msg = build_adapter(ALGO, &NetworkOptions { dim: 1, ..opts() }, &base, "up.1").err().unwrap().to_string();
        assert!(msg.contains("up.1") && msg.contains("≥ 2"), "{msg}");
    }

    #[test]
    fn rebuild_bypass_reload_agree() -> Result<()> {
        for (base, x) in standard_cases()? {
            check_modes(ALGO, &NetworkOptions { multiplier: 0.7, ..opts() }, &base, &x, true, true)?;
            check_modes(ALGO, &NetworkOptions { use_scalar: true, ..opts() }, &base, &x, true, true)?;
            check_modes(ALGO, &NetworkOptions { dora_wd: true, ..opts() }, &base, &x, false, false)?;
        }
        Ok(())
    }

    #[test]
    fn every_trainable_gets_a_gradient() -> Result<()> {
        check_grads(ALGO, &NetworkOptions { use_scalar: true, dora_wd: true, ..opts() })?;
        check_grads(ALGO, &NetworkOptions { bypass_mode: true, ..opts() })
    }

    #[test]
    fn fit_reduces_loss_10x() -> Result<()> {
        check_fit(ALGO, &NetworkOptions { dim: 4, alpha: 1.0, ..Default::default() }, 300, 0.02, 10.0)
    }
}
