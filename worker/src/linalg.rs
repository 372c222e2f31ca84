//! Small dense linear algebra in f64 that candle lacks: a thin SVD (one-sided Jacobi), a
//! Householder QR, and the SVD of a low-rank product `up @ down` without forming it.
//!
//! Used by LoRA resizing (`loft lora resize`), which needs exact singular values of ΔW.
//! Matrices are small row-major [`Mat`]s; nothing here is on a training hot path.

/// A dense row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f64>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "Mat::new: {rows}×{cols} needs {} values",
            rows * cols
        );
        Self { rows, cols, data }
    }

    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn eye(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    #[inline]
    pub fn at(&self, r: usize, c: usize) -> f64 {
        self.data[r * self.cols + c]
    }

    #[inline]
    pub fn set(&mut self, r: usize, c: usize, v: f64) {
        self.data[r * self.cols + c] = v;
    }

    pub fn t(&self) -> Mat {
        let mut out = Mat::zeros(self.cols, self.rows);
        for r in 0..self.rows {
            for c in 0..self.cols {
                out.data[c * self.rows + r] = self.data[r * self.cols + c];
            }
        }
        out
    }

    pub fn matmul(&self, o: &Mat) -> Mat {
        assert_eq!(
            self.cols, o.rows,
            "matmul: {}×{} @ {}×{}",
            self.rows, self.cols, o.rows, o.cols
        );
        let mut out = Mat::zeros(self.rows, o.cols);
        for i in 0..self.rows {
            let orow = &mut out.data[i * o.cols..(i + 1) * o.cols];
            for k in 0..self.cols {
                let a = self.data[i * self.cols + k];
                if a == 0.0 {
                    continue;
                }
                let brow = &o.data[k * o.cols..(k + 1) * o.cols];
                for (x, b) in orow.iter_mut().zip(brow) {
                    *x += a * b;
                }
            }
        }
        out
    }

    /// Frobenius norm.
    pub fn fro(&self) -> f64 {
        self.data.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    pub fn max_abs_diff(&self, o: &Mat) -> f64 {
        assert_eq!((self.rows, self.cols), (o.rows, o.cols));
        self.data
            .iter()
            .zip(&o.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    }

    /// The first `k` columns.
    pub fn first_cols(&self, k: usize) -> Mat {
        let k = k.min(self.cols);
        let mut out = Mat::zeros(self.rows, k);
        for r in 0..self.rows {
            out.data[r * k..(r + 1) * k]
                .copy_from_slice(&self.data[r * self.cols..r * self.cols + k]);
        }
        out
    }

    /// The first `k` rows.
    pub fn first_rows(&self, k: usize) -> Mat {
        let k = k.min(self.rows);
        Mat::new(k, self.cols, self.data[..k * self.cols].to_vec())
    }
}

/// A thin SVD `A = U · diag(S) · Vt` with `k = min(m, n)`: U is m×k, S has k values in
/// descending order, Vt is k×n. Columns of U (rows of Vt) belonging to zero singular values
/// are zero rather than completed to an orthonormal basis.
#[derive(Clone, Debug)]
pub struct Svd {
    pub u: Mat,
    pub s: Vec<f64>,
    pub vt: Mat,
}

impl Svd {
    /// `U_k · diag(S_k) · Vt_k`, the best rank-k approximation (Eckart–Young).
    pub fn reconstruct(&self, k: usize) -> Mat {
        let k = k.min(self.s.len());
        let mut us = self.u.first_cols(k);
        for r in 0..us.rows {
            for c in 0..k {
                us.data[r * k + c] *= self.s[c];
            }
        }
        us.matmul(&self.vt.first_rows(k))
    }
}

/// Thin SVD by one-sided Jacobi rotations (Hestenes), accurate to f64 round-off.
/// Cost O(sweeps · m · n²) with n = min dimension: meant for matrices up to a few hundred wide.
pub fn svd(a: &Mat) -> Svd {
    if a.rows < a.cols {
        let Svd { u, s, vt } = svd(&a.t());
        return Svd {
            u: vt.t(),
            s,
            vt: u.t(),
        };
    }
    let (m, n) = (a.rows, a.cols);
    // Work on columns: store Aᵀ row-major so each column is contiguous.
    let mut w = a.t(); // n×m: row j = column j of A
    let mut v = Mat::eye(n); // row j = column j of V
    let eps = 1e-15;
    for _sweep in 0..80 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let (mut alpha, mut beta, mut gamma) = (0.0, 0.0, 0.0);
                {
                    let wp = &w.data[p * m..(p + 1) * m];
                    let wq = &w.data[q * m..(q + 1) * m];
                    for i in 0..m {
                        alpha += wp[i] * wp[i];
                        beta += wq[i] * wq[i];
                        gamma += wp[i] * wq[i];
                    }
                }
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let t = if zeta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate_rows(&mut w.data, m, p, q, c, s);
                rotate_rows(&mut v.data, n, p, q, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    let mut order: Vec<(usize, f64)> = (0..n)
        .map(|j| {
            (
                j,
                w.data[j * m..(j + 1) * m]
                    .iter()
                    .map(|x| x * x)
                    .sum::<f64>()
                    .sqrt(),
            )
        })
        .collect();
    order.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap_or(std::cmp::Ordering::Equal));
    let mut u = Mat::zeros(m, n);
    let mut vt = Mat::zeros(n, n);
    let mut s = Vec::with_capacity(n);
    let smax = order.first().map(|o| o.1).unwrap_or(0.0);
    for (k, &(j, sigma)) in order.iter().enumerate() {
        s.push(sigma);
        vt.data[k * n..(k + 1) * n].copy_from_slice(&v.data[j * n..(j + 1) * n]);
        if sigma > smax * 1e-300 && sigma > 0.0 {
            for i in 0..m {
                u.data[i * n + k] = w.data[j * m + i] / sigma;
            }
        }
    }
    Svd { u, s, vt }
}

fn rotate_rows(d: &mut [f64], len: usize, p: usize, q: usize, c: f64, s: f64) {
    let (head, tail) = d.split_at_mut(q * len);
    let rp = &mut head[p * len..(p + 1) * len];
    let rq = &mut tail[..len];
    for (x, y) in rp.iter_mut().zip(rq.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
}

/// Thin Householder QR of an m×n matrix with m ≥ n: `A = Q · R`, Q m×n with orthonormal
/// columns, R n×n upper triangular.
pub fn qr(a: &Mat) -> (Mat, Mat) {
    let (m, n) = (a.rows, a.cols);
    assert!(m >= n, "qr needs rows ≥ cols, got {m}×{n}");
    let mut r = a.clone();
    let mut vs: Vec<Vec<f64>> = Vec::with_capacity(n);
    for k in 0..n {
        let mut v: Vec<f64> = (k..m).map(|i| r.at(i, k)).collect();
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm == 0.0 {
            vs.push(vec![0.0; m - k]);
            continue;
        }
        let sign = if v[0] >= 0.0 { 1.0 } else { -1.0 };
        v[0] += sign * norm;
        let vn = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter_mut().for_each(|x| *x /= vn);
        for j in k..n {
            let dot: f64 = (k..m).map(|i| v[i - k] * r.at(i, j)).sum();
            for i in k..m {
                let val = r.at(i, j) - 2.0 * v[i - k] * dot;
                r.set(i, j, val);
            }
        }
        vs.push(v);
    }
    // Q = H_0 … H_{n-1} applied to the first n columns of I.
    let mut q = Mat::zeros(m, n);
    for j in 0..n {
        q.set(j, j, 1.0);
    }
    for k in (0..n).rev() {
        let v = &vs[k];
        for j in 0..n {
            let dot: f64 = (k..m).map(|i| v[i - k] * q.at(i, j)).sum();
            if dot != 0.0 {
                for i in k..m {
                    let val = q.at(i, j) - 2.0 * v[i - k] * dot;
                    q.set(i, j, val);
                }
            }
        }
    }
    let mut rr = Mat::zeros(n, n);
    for i in 0..n {
        for j in i..n {
            rr.set(i, j, r.at(i, j));
        }
    }
    (q, rr)
}

/// SVD of `up @ down` (up m×r, down r×n) without forming the m×n product when r is small:
/// `up = Qu·Ru`, `downᵀ = Qd·Rd`, so `up@down = Qu·(Ru·Rdᵀ)·Qdᵀ` and only the r×r core is
/// decomposed. Returns a thin SVD with k = min(m, n, r) values.
pub fn svd_of_product(up: &Mat, down: &Mat) -> Svd {
    assert_eq!(
        up.cols, down.rows,
        "svd_of_product: inner dims {} and {}",
        up.cols, down.rows
    );
    let (m, r, n) = (up.rows, up.cols, down.cols);
    if r >= m || r >= n {
        return svd(&up.matmul(down));
    }
    let (qu, ru) = qr(up);
    let (qd, rd) = qr(&down.t());
    let core = ru.matmul(&rd.t());
    let Svd { u, s, vt } = svd(&core);
    Svd {
        u: qu.matmul(&u),
        s,
        vt: vt.matmul(&qd.t()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: u64, n: usize) -> Vec<f64> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    fn check_orthonormal_cols(m: &Mat, tol: f64) {
        let g = m.t().matmul(m);
        assert!(
            g.max_abs_diff(&Mat::eye(m.cols)) < tol,
            "columns not orthonormal"
        );
    }

    #[test]
    fn svd_of_a_known_matrix() {
        // A = U diag(5, 3) Vᵀ with U = [[.6,.8],[.8,-.6]], V = I rotated by 90°.
        let u = Mat::new(2, 2, vec![0.6, 0.8, 0.8, -0.6]);
        let vt = Mat::new(2, 2, vec![0.0, 1.0, 1.0, 0.0]);
        let s = Mat::new(2, 2, vec![5.0, 0.0, 0.0, 3.0]);
        let a = u.matmul(&s).matmul(&vt);
        let d = svd(&a);
        assert!(
            (d.s[0] - 5.0).abs() < 1e-12 && (d.s[1] - 3.0).abs() < 1e-12,
            "{:?}",
            d.s
        );
        assert!(d.reconstruct(2).max_abs_diff(&a) < 1e-12);
        // Singular vectors up to sign.
        assert!(
            (d.u.at(0, 0).abs() - 0.6).abs() < 1e-12 && (d.vt.at(0, 1).abs() - 1.0).abs() < 1e-12
        );
        // diag(3, 4, 0) padded: singular values 4, 3, 0 and a 3×2 wide case.
        let b = Mat::new(3, 3, vec![3.0, 0.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]);
        let d = svd(&b);
        assert_eq!(d.s.len(), 3);
        assert!((d.s[0] - 4.0).abs() < 1e-14 && (d.s[1] - 3.0).abs() < 1e-14 && d.s[2] == 0.0);
        let w = Mat::new(2, 3, vec![1.0, 0.0, 0.0, 0.0, 0.0, 2.0]);
        let d = svd(&w);
        assert_eq!((d.u.rows, d.u.cols, d.vt.rows, d.vt.cols), (2, 2, 2, 3));
        assert!((d.s[0] - 2.0).abs() < 1e-14 && (d.s[1] - 1.0).abs() < 1e-14);
        assert!(d.reconstruct(2).max_abs_diff(&w) < 1e-14);
    }

    #[test]
    fn svd_random_matrices_reconstruct_and_are_orthonormal() {
        for (m, n, seed) in [(7, 5, 1), (5, 9, 2), (24, 16, 3), (1, 4, 4), (12, 72, 5)] {
            let a = Mat::new(m, n, lcg(seed, m * n));
            let d = svd(&a);
            assert!(d.reconstruct(m.min(n)).max_abs_diff(&a) < 1e-12, "{m}×{n}");
            check_orthonormal_cols(&d.u, 1e-12);
            check_orthonormal_cols(&d.vt.t(), 1e-12);
            assert!(d.s.windows(2).all(|w| w[0] >= w[1]), "descending");
            // Σσ² = ‖A‖²_F.
            let e: f64 = d.s.iter().map(|s| s * s).sum();
            assert!((e - a.fro().powi(2)).abs() < 1e-10);
        }
    }

    #[test]
    fn truncation_is_eckart_young_optimal() {
        // Truncating to k leaves exactly the tail energy √(Σ_{i>k} σᵢ²).
        let a = Mat::new(10, 8, lcg(9, 80));
        let d = svd(&a);
        for k in 1..8 {
            let mut r = d.reconstruct(k);
            r.data.iter_mut().zip(&a.data).for_each(|(x, y)| *x -= y);
            let tail: f64 = d.s[k..].iter().map(|s| s * s).sum::<f64>().sqrt();
            assert!((r.fro() - tail).abs() < 1e-12);
        }
    }

    #[test]
    fn qr_and_product_svd() {
        let a = Mat::new(9, 4, lcg(11, 36));
        let (q, r) = qr(&a);
        check_orthonormal_cols(&q, 1e-13);
        assert!(q.matmul(&r).max_abs_diff(&a) < 1e-13);
        for i in 0..4 {
            for j in 0..i {
                assert_eq!(r.at(i, j), 0.0);
            }
        }
        // Rank-deficient factor: a zero column.
        let mut z = a.clone();
        for i in 0..9 {
            z.set(i, 2, 0.0);
        }
        let (q, r) = qr(&z);
        assert!(q.matmul(&r).max_abs_diff(&z) < 1e-13);

        let up = Mat::new(30, 4, lcg(12, 120));
        let down = Mat::new(4, 50, lcg(13, 200));
        let full = svd(&up.matmul(&down));
        let fast = svd_of_product(&up, &down);
        assert_eq!(fast.s.len(), 4);
        for k in 0..4 {
            assert!((full.s[k] - fast.s[k]).abs() < 1e-12);
        }
        assert!(fast.reconstruct(4).max_abs_diff(&up.matmul(&down)) < 1e-12);
        assert!(fast.reconstruct(2).max_abs_diff(&full.reconstruct(2)) < 1e-10);
        check_orthonormal_cols(&fast.u, 1e-12);
    }
}
