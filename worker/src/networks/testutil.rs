//! Helpers for the adapter tests: seeded inputs and layers, a tiny f64 matrix type for
//! independent reference computations, gradient checks, and an inline Adam fit loop.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::{Adapter, BaseLayer};

pub fn dev() -> Device {
    Device::Cpu
}

fn gauss(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(&mut rng);
            z as f32
        })
        .collect()
}

/// N(0, 1) tensor with a fixed seed.
pub fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n = shape.iter().product();
    Tensor::from_vec(gauss(n, seed), shape, &dev())
}

pub fn linear_base(in_f: usize, out_f: usize, bias: bool, seed: u64) -> Result<BaseLayer> {
    let w = (randn(&[out_f, in_f], seed)? * 0.3)?;
    let b = if bias { Some((randn(&[out_f], seed + 1000)? * 0.1)?) } else { None };
    BaseLayer::linear(w, b)
}

pub fn conv_base(
    in_c: usize,
    out_c: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    seed: u64,
) -> Result<BaseLayer> {
    let w = (randn(&[out_c, in_c, k, k], seed)? * 0.3)?;
    let b = if bias { Some((randn(&[out_c], seed + 1000)? * 0.1)?) } else { None };
    BaseLayer::conv2d(w, b, stride, padding)
}

pub fn state_map(a: &dyn Adapter) -> Result<HashMap<String, Tensor>> {
    Ok(a.state_tensors()?.into_iter().collect())
}

pub fn scalar_of(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
}

pub fn max_abs(t: &Tensor) -> Result<f64> {
    scalar_of(&t.to_dtype(DType::F64)?.abs()?.flatten_all()?.max(0)?)
}

/// Overwrites every trainable tensor with seeded random values of a sensible size (rotation
/// blocks small, magnitudes and rescales positive around 1, the rest N(0, 0.3²)).
pub fn randomize(a: &dyn Adapter, seed: u64) -> Result<()> {
    for (i, (name, var)) in a.trainable().into_iter().enumerate() {
        let shape = var.dims().to_vec();
        let n: usize = shape.iter().product();
        let z = gauss(n, seed * 7919 + i as u64);
        let vals: Vec<f32> = if name.contains("dora_scale") || name.contains("rescale") {
            z.iter().map(|v| 1.0 + 0.2 * v.abs()).collect()
        } else if name.contains("oft_blocks") {
            z.iter().map(|v| 0.1 * v).collect()
        } else if name == "scalar" {
            vec![0.8; n]
        } else {
            z.iter().map(|v| 0.3 * v).collect()
        };
        let t = Tensor::from_vec(vals, shape, var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
    }
    Ok(())
}

pub fn assert_close(a: &Tensor, b: &Tensor, tol: f64, what: &str) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let diff = max_abs(&(a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap()).unwrap();
    let scale = max_abs(b).unwrap().max(1.0);
    assert!(diff <= tol * scale, "{what}: max |diff| = {diff:e} (scale {scale}, tol {tol:e})");
}

/// A small row-major f64 matrix for reference computations written independently of candle.
#[derive(Clone, Debug)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), rows * cols);
        Self { rows, cols, data }
    }

    /// The tensor viewed as `(dim0, rest)`.
    pub fn from_tensor_2d(t: &Tensor) -> Result<Self> {
        let t = t.to_dtype(DType::F64)?;
        let rows = t.dim(0)?;
        let data = t.flatten_all()?.to_vec1::<f64>()?;
        let cols = data.len() / rows.max(1);
        Ok(Self::new(rows, cols, data))
    }

    pub fn eye(n: usize) -> Self {
        let mut m = Self::new(n, n, vec![0.0; n * n]);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    pub fn matmul(&self, o: &Mat) -> Mat {
        assert_eq!(self.cols, o.rows, "matmul shapes");
        let mut out = vec![0.0; self.rows * o.cols];
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.at(i, k);
                for j in 0..o.cols {
                    out[i * o.cols + j] += a * o.at(k, j);
                }
            }
        }
        Mat::new(self.rows, o.cols, out)
    }

    pub fn t(&self) -> Mat {
        let mut out = vec![0.0; self.data.len()];
        for i in 0..self.rows {
            for j in 0..self.cols {
                out[j * self.rows + i] = self.at(i, j);
            }
        }
        Mat::new(self.cols, self.rows, out)
    }

    pub fn scale(&self, s: f64) -> Mat {
        Mat::new(self.rows, self.cols, self.data.iter().map(|v| v * s).collect())
    }

    pub fn add(&self, o: &Mat) -> Mat {
        assert_eq!((self.rows, self.cols), (o.rows, o.cols));
        Mat::new(self.rows, self.cols, self.data.iter().zip(&o.data).map(|(a, b)| a + b).collect())
    }

    pub fn sub(&self, o: &Mat) -> Mat {
        self.add(&o.scale(-1.0))
    }

    pub fn hadamard(&self, o: &Mat) -> Mat {
        assert_eq!((self.rows, self.cols), (o.rows, o.cols));
        Mat::new(self.rows, self.cols, self.data.iter().zip(&o.data).map(|(a, b)| a * b).collect())
    }

    /// Standard Kronecker product.
    pub fn kron(&self, o: &Mat) -> Mat {
        let rows = self.rows * o.rows;
        let cols = self.cols * o.cols;
        let mut out = vec![0.0; rows * cols];
        for i in 0..self.rows {
            for p in 0..self.cols {
                for j in 0..o.rows {
                    for q in 0..o.cols {
                        out[(i * o.rows + j) * cols + p * o.cols + q] = self.at(i, p) * o.at(j, q);
                    }
                }
            }
        }
        Mat::new(rows, cols, out)
    }

    /// Inverse by Gauss–Jordan with partial pivoting (reference only).
    pub fn inverse(&self) -> Mat {
        let n = self.rows;
        let mut a = self.data.clone();
        let mut inv = Mat::eye(n).data;
        for c in 0..n {
            let p = (c..n).max_by(|x, y| a[x * n + c].abs().total_cmp(&a[y * n + c].abs())).unwrap();
            for k in 0..n {
                a.swap(c * n + k, p * n + k);
                inv.swap(c * n + k, p * n + k);
            }
            let d = a[c * n + c];
            for k in 0..n {
                a[c * n + k] /= d;
                inv[c * n + k] /= d;
            }
            for r in 0..n {
                if r != c {
                    let f = a[r * n + c];
                    for k in 0..n {
                        a[r * n + k] -= f * a[c * n + k];
                        inv[r * n + k] -= f * inv[c * n + k];
                    }
                }
            }
        }
        Mat::new(n, n, inv)
    }

    pub fn max_abs(&self) -> f64 {
        self.data.iter().fold(0.0, |m, v| m.max(v.abs()))
    }
}

/// Compares a tensor (viewed as `(dim0, rest)`) with a reference matrix.
pub fn assert_mat_close(t: &Tensor, want: &Mat, tol: f64, what: &str) {
    let got = Mat::from_tensor_2d(t).unwrap();
    assert_eq!((got.rows, got.cols), (want.rows, want.cols), "{what}: shapes differ");
    let diff = got.sub(want).max_abs();
    let scale = want.max_abs().max(1.0);
    assert!(diff <= tol * scale, "{what}: max |diff| = {diff:e} (scale {scale}, tol {tol:e})");
}

/// Runs forward in training mode (no dropouts configured), backpropagates a fixed random
/// projection of the output, and asserts every trainable tensor got a non-zero gradient.
pub fn assert_all_grads_nonzero(a: &dyn Adapter, base: &BaseLayer, x: &Tensor) -> Result<()> {
    let y = a.forward(base, x, true)?;
    let probe = randn(y.dims(), 4242)?.to_dtype(y.dtype())?;
    let loss = (y * probe)?.sum_all()?;
    let grads = loss.backward()?;
    let vars = a.trainable();
    assert!(!vars.is_empty(), "{} has no trainable tensors", a.algo_name());
    for (name, var) in vars {
        let g = grads.get(var.as_tensor());
        let size = match g {
            Some(g) => max_abs(g)?,
            None => 0.0,
        };
        assert!(size > 0.0, "{}: `{name}` received no gradient", a.algo_name());
        assert!(size.is_finite(), "{}: `{name}` gradient is not finite", a.algo_name());
    }
    Ok(())
}

/// Mean squared error between the student's and the teacher's outputs.
pub fn mse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.mean_all()
}

/// Trains `student` toward `teacher`'s output on `x` with plain Adam (β = 0.9, 0.999) for
/// `steps` steps, the learning rate decaying linearly from `lr` to `lr/10`; returns
/// (loss before, loss after), both measured in eval mode.
pub fn fit(
    student: &dyn Adapter,
    teacher: &dyn Adapter,
    base: &BaseLayer,
    x: &Tensor,
    steps: usize,
    lr: f64,
) -> Result<(f64, f64)> {
    let target = teacher.forward(base, x, false)?.detach();
    fit_target(student, base, x, &target, steps, lr)
}

pub fn fit_target(
    student: &dyn Adapter,
    base: &BaseLayer,
    x: &Tensor,
    target: &Tensor,
    steps: usize,
    lr: f64,
) -> Result<(f64, f64)> {
    let vars: Vec<Var> = student.trainable().into_iter().map(|(_, v)| v).collect();
    let mut m: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_>>()?;
    let mut s: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().zeros_like()).collect::<Result<_>>()?;
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
    let first = scalar_of(&mse(&student.forward(base, x, false)?, target)?)?;
    for step in 1..=steps {
        let loss = mse(&student.forward(base, x, true)?, target)?;
        let grads = loss.backward()?;
        for (i, var) in vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = g.detach();
            m[i] = ((&m[i] * b1)? + (&g * (1.0 - b1))?)?;
            s[i] = ((&s[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&m[i] / (1.0 - b1.powi(step as i32)))?;
            let shat = (&s[i] / (1.0 - b2.powi(step as i32)))?;
            let update = (mhat / (shat.sqrt()? + eps)?)?;
            let lr_t = lr * (1.0 - 0.9 * (step - 1) as f64 / steps as f64);
            var.set(&(var.as_tensor().detach() - (update * lr_t)?)?)?;
        }
    }
    let last = scalar_of(&mse(&student.forward(base, x, false)?, target)?)?;
    Ok((first, last))
}

/// Layers used by most algorithm tests: Linear (with a 3-D input), 1×1 conv, and a 3×3 conv
/// with stride 2 and padding 1. Widths are even and factor nicely for LoKr/OFT/BOFT.
pub fn standard_cases() -> Result<Vec<(BaseLayer, Tensor)>> {
    Ok(vec![
        (linear_base(12, 16, true, 101)?, randn(&[2, 3, 12], 102)?),
        (conv_base(8, 16, 1, 1, 0, true, 103)?, randn(&[2, 8, 5, 5], 104)?),
        (conv_base(8, 16, 3, 2, 1, true, 105)?, randn(&[2, 8, 7, 7], 106)?),
    ])
}

use super::{adapter_from_tensors, build_adapter, NetworkAlgo, NetworkOptions};

/// Builds an adapter, randomises it, and checks: rebuild forward == base op with
/// `merged_weight` (and, for additive algorithms, W + m·ΔW); a reload from `state_tensors`
/// gives the same output; with `bypass_equal`, bypass mode (from the same tensors) gives the
/// same output too. Returns the randomised adapter.
pub fn check_modes(
    algo: NetworkAlgo,
    opts: &NetworkOptions,
    base: &BaseLayer,
    x: &Tensor,
    additive: bool,
    bypass_equal: bool,
) -> Result<Box<dyn Adapter>> {
    let a = build_adapter(algo, opts, base, "check")?;
    randomize(a.as_ref(), 17)?;
    let m = opts.multiplier;
    let merged = a.merged_weight(base)?;
    let merged_b = a.merged_bias(base)?;
    let want = base.forward_with(x, &merged, merged_b.as_ref())?;
    let y = a.forward(base, x, false)?;
    assert_close(&y, &want, 1e-5, &format!("{}: forward vs op(x, W′)", algo.name()));
    if additive {
        let w = (&base.weight + (a.delta_weight()? * m)?)?;
        assert_close(&merged, &w, 1e-5, &format!("{}: W′ vs W + mΔW", algo.name()));
    }
    let state = state_map(a.as_ref())?;
    let reload = adapter_from_tensors(algo, opts, base, &state)?;
    assert_close(&reload.forward(base, x, false)?, &y, 1e-5, &format!("{}: reload", algo.name()));
    if bypass_equal {
        let bypass_opts = NetworkOptions { bypass_mode: true, ..opts.clone() };
        let b = adapter_from_tensors(algo, &bypass_opts, base, &state)?;
        assert_close(&b.forward(base, x, false)?, &y, 1e-5, &format!("{}: bypass vs rebuild", algo.name()));
    }
    Ok(a)
}

/// Every trainable tensor gets a non-zero gradient (after randomising the adapter so that
/// zero-initialised factors do not block the others).
pub fn check_grads(algo: NetworkAlgo, opts: &NetworkOptions) -> Result<()> {
    for (base, x) in standard_cases()? {
        let a = build_adapter(algo, opts, &base, "grads")?;
        randomize(a.as_ref(), 23)?;
        assert_all_grads_nonzero(a.as_ref(), &base, &x)?;
    }
    Ok(())
}

/// Trains a fresh adapter toward a randomised teacher of the same algorithm and options for
/// `steps` Adam steps at `lr`; asserts the output MSE falls by at least `factor`.
pub fn check_fit(algo: NetworkAlgo, opts: &NetworkOptions, steps: usize, lr: f64, factor: f64) -> Result<()> {
    for (base, x) in standard_cases()? {
        let teacher = build_adapter(algo, opts, &base, "teacher")?;
        randomize(teacher.as_ref(), 29)?;
        let student = build_adapter(algo, opts, &base, "student")?;
        let (first, last) = fit(student.as_ref(), teacher.as_ref(), &base, &x, steps, lr)?;
        assert!(
            last * factor <= first,
            "{} on {:?}: loss {first:e} → {last:e}, wanted a {factor}× drop",
            algo.name(),
            base.kind
        );
    }
    Ok(())
}
