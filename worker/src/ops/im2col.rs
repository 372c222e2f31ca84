//! The CPU convolution as one GEMM on the weight as it is stored: im2col, and col2im for the
//! input gradient.
//!
//! candle's CPU conv2d re-lays the whole kernel out (to Cout × kh·kw·Cin) on every call, and its
//! input gradient needs the kernel flipped and transposed; at the UNet's low resolutions
//! (1280 channels over 8×8 or 4×4 pixels) those weight-sized copies cost more than the
//! arithmetic. Here, with K = Cin·kh·kw and P = B·H'·W':
//! - cols = im2col(x): (K, P), cols[(ci·kh + a)·kw + b, (n·H' + y)·W' + x] = x_pad[n, ci, y·s + a, x·s + b];
//! - y = W(Cout, K) · cols — W read in place;
//! - dx = col2im(Wᵀ · g), col2im adding each column entry back where im2col read it;
//! - dW = g · colsᵀ.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Geometry {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.padding - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.padding - self.kw) / self.stride + 1
    }
    /// K = Cin·kh·kw.
    pub fn rows(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    /// P = B·H'·W'.
    pub fn cols(&self) -> usize {
        self.batch * self.out_h() * self.out_w()
    }

    /// Whether the im2col path applies: a CPU tensor of f32 with a kernel that fits.
    pub fn applies(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Option<Self>> {
        if !super::cpu_fused(x) || w.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        let (batch, cin, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        if h + 2 * padding < kh || wd + 2 * padding < kw {
            return Ok(None);
        }
        Ok(Some(Self { batch, cin, h, w: wd, kh, kw, stride, padding }))
    }

    /// The input position tap (a, b) of output (y, x) reads, if inside the image.
    #[inline]
    fn source(&self, a: usize, b: usize, y: usize, x: usize) -> Option<(usize, usize)> {
        let iy = (y * self.stride + a).checked_sub(self.padding)?;
        let ix = (x * self.stride + b).checked_sub(self.padding)?;
        (iy < self.h && ix < self.w).then_some((iy, ix))
    }
}

/// im2col(x): `(K, P)` from a contiguous `(B, Cin, H, W)` f32 tensor.
pub(crate) fn im2col(x: &Tensor, g: Geometry) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Im2Col(g))
}

/// col2im(cols): `(B, Cin, H, W)` from `(K, P)`, each entry added where im2col read it.
pub(crate) fn col2im(cols: &Tensor, g: Geometry) -> Result<Tensor> {
    cols.contiguous()?.apply_op1_no_bwd(&Col2Im(g))
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { bail!("{what}: f32 only") };
    let Some((start, end)) = l.contiguous_offsets() else { bail!("{what}: the input must be contiguous") };
    Ok(&v[start..end])
}

struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(s, l, "im2col")?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let p = g.cols();
        let mut out = vec![0f32; g.rows() * p];
        out.par_chunks_mut(p).enumerate().for_each(|(row, dst)| {
            let (ci, a, b) = (row / (g.kh * g.kw), row / g.kw % g.kh, row % g.kw);
            for n in 0..g.batch {
                let plane = &x[(n * g.cin + ci) * g.h * g.w..][..g.h * g.w];
                for y in 0..oh {
                    let line = &mut dst[(n * oh + y) * ow..][..ow];
                    for (xo, v) in line.iter_mut().enumerate() {
                        if let Some((iy, ix)) = g.source(a, b, y, xo) {
                            *v = plane[iy * g.w + ix];
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.rows(), p))))
    }
}

struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = f32_slice(s, l, "col2im")?;
        let (oh, ow) = (g.out_h(), g.out_w());
        let p = g.cols();
        let mut out = vec![0f32; g.batch * g.cin * g.h * g.w];
        // One (n, ci) plane per task: every entry that lands in it comes from its own rows.
        out.par_chunks_mut(g.h * g.w).enumerate().for_each(|(plane_idx, plane)| {
            let (n, ci) = (plane_idx / g.cin, plane_idx % g.cin);
            for a in 0..g.kh {
                for b in 0..g.kw {
                    let row = &cols[((ci * g.kh + a) * g.kw + b) * p..][..p];
                    for y in 0..oh {
                        let line = &row[(n * oh + y) * ow..][..ow];
                        for (xo, v) in line.iter().enumerate() {
                            if let Some((iy, ix)) = g.source(a, b, y, xo) {
                                plane[iy * g.w + ix] += *v;
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((g.batch, g.cin, g.h, g.w))))
    }
}
