//! `F.conv2d` (symmetric stride and padding, dilation 1, one group) whose backward computes
//! the input gradient as a forward convolution and the weight and bias gradients only when
//! they are trained.
//!
//! With x (B, Cin, H, W), W (Cout, Cin, kh, kw), stride s, padding p and the output gradient
//! g (B, Cout, H', W'):
//! - dx = conv2d(dilate_s(g), flip(Wᵀ), padding p̃) where dilate_s puts s−1 zeros between the
//!   elements of g, Wᵀ swaps W's first two dims, flip reverses both kernel dims, and the
//!   padding is k−1−p before and whatever makes the result H×W after (stride 1 "same" convs:
//!   k−1−p on both sides; 1×1 convs: a matmul). This replaces candle's `conv_transpose2d`,
//!   whose kernels are naive loops on both backends, by its im2col + GEMM forward.
//! - dW[:, :, i, j] = g (Cout, B·H'·W') · x_ij (B·H'·W', Cin)ᵀ, x_ij being the padded input read
//!   at offset (i, j) with stride s — only for a trained W (LoCon's down convs, `full`,
//!   rebuilt weights).
//! - db = Σ_{b,y,x} g — only for a trained bias.

use candle_core::{Result, Tensor};

use super::graph::{attach, Backward};
use super::im2col::{col2im, im2col, Geometry};
use crate::profile::{self, Kind};

/// `x (B, Cin, H, W)`, `w (Cout, Cin, kh, kw)`, `b (Cout)` → `(B, Cout, H', W')`.
/// A weight stored in another dtype than `x` is cast for the forward and again in the backward
/// (see [`super::linear::linear`]).
pub fn conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    if super::reference_ops() {
        return reference_conv2d(x, &super::cast(w, x.dtype())?, b, stride, padding);
    }
    let out = {
        let _span = profile::span(Kind::ConvForward);
        let wc = super::cast(&w.detach(), x.dtype())?;
        let out = match Geometry::applies(x, &wc, stride, padding)? {
            Some(g) => gemm_forward(&x.detach(), &wc, g)?,
            None => x.detach().conv2d(&wc.contiguous()?, padding, stride, 1, 1)?,
        };
        match b {
            Some(b) => out.broadcast_add(&b.detach().reshape((1, b.elem_count(), 1, 1))?)?,
            None => out,
        }
    };
    let backward = ConvBackward { stride, padding };
    match b {
        Some(b) => attach(&[x, w, b], out, backward),
        None => attach(&[x, w], out, backward),
    }
}

/// The reference: candle's conv2d and broadcast add, with candle's backward.
///
/// Works around a candle 0.11 backward bug: conv2d's input gradient derives its
/// `output_padding` from the height only, so with stride > 1 a height and width whose
/// `(size + 2·padding − k) mod stride` differ give a wrongly shaped gradient (an error in
/// backward). Zero columns/rows appended at the end of the dim with the smaller remainder
/// never change the output (they fall in what the conv reads as padding or skips), and make
/// both remainders equal; `pad_with_zeros` has a backward, so x's gradient stays exact.
pub fn reference_conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, stride: usize, padding: usize) -> Result<Tensor> {
    let mut x = x.clone();
    if stride > 1 {
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        if h + 2 * padding >= kh && wd + 2 * padding >= kw {
            let rh = (h + 2 * padding - kh) % stride;
            let rw = (wd + 2 * padding - kw) % stride;
            if rh < rw {
                x = x.pad_with_zeros(2, 0, rw - rh)?;
            } else if rw < rh {
                x = x.pad_with_zeros(3, 0, rh - rw)?;
            }
        }
    }
    let y = x.conv2d(&w.contiguous()?, padding, stride, 1, 1)?;
    match b {
        Some(b) => y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1))?),
        None => Ok(y),
    }
}

struct ConvBackward {
    stride: usize,
    padding: usize,
}

impl Backward for ConvBackward {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn profile_kind(&self) -> Kind {
        Kind::ConvBackward
    }

    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let (x, stored) = (args[0], args[1]);
        let w = &super::cast(stored, x.dtype())?;
        let mut grads = match Geometry::applies(x, w, self.stride, self.padding)? {
            Some(g) => gemm_backward(x, w, grad, needs, g)?,
            None => {
                let dx = if needs[0] { Some(self.input_grad(x, w, grad)?) } else { None };
                let dw = if needs[1] { Some(self.weight_grad(x, w, grad)?) } else { None };
                let db = if needs.get(2) == Some(&true) { Some(grad.sum((0, 2, 3))?) } else { None };
                vec![dx, dw, db]
            }
        };
        if let Some(Some(dw)) = grads.get_mut(1) {
            *dw = dw.to_dtype(stored.dtype())?;
        }
        Ok(grads)
    }
}

impl ConvBackward {
    fn input_grad(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (_, _, h, wd) = x.dims4()?;
        let (_, _, kh, kw) = w.dims4()?;
        let (s, p) = (self.stride, self.padding as isize);
        let (_, _, gh, gw) = g.dims4()?;
        // dilate_s(g), keeping the s−1 trailing zeros: length s·H'.
        let g = if s > 1 {
            let (b, c, _, _) = g.dims4()?;
            g.reshape((b, c, gh, 1, gw, 1))?
                .pad_with_zeros(3, 0, s - 1)?
                .pad_with_zeros(5, 0, s - 1)?
                .reshape((b, c, gh * s, gw * s))?
        } else {
            g.clone()
        };
        // Padding so that a valid k×k conv gives back H×W: k−1−p before, the rest after.
        let before_h = kh as isize - 1 - p;
        let before_w = kw as isize - 1 - p;
        let after_h = (h + kh - 1) as isize - before_h - (gh * s) as isize;
        let after_w = (wd + kw - 1) as isize - before_w - (gw * s) as isize;
        let kernel = flipped_transposed(w)?;
        let symmetric = before_h == after_h && before_w == after_w && before_h == before_w && before_h >= 0;
        if symmetric {
            return g.conv2d(&kernel, before_h as usize, 1, 1, 1);
        }
        let g = pad_or_trim(&g, 2, before_h, after_h)?;
        let g = pad_or_trim(&g, 3, before_w, after_w)?;
        g.conv2d(&kernel, 0, 1, 1, 1)
    }

    fn weight_grad(&self, x: &Tensor, w: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (cout, cin, kh, kw) = w.dims4()?;
        let (b, _, gh, gw) = g.dims4()?;
        let (s, p) = (self.stride, self.padding);
        let rows = b * gh * gw;
        // g as (Cout, B·H'·W').
        let g2 = g.transpose(0, 1)?.contiguous()?.reshape((cout, rows))?;
        if kh == 1 && kw == 1 && s == 1 && p == 0 {
            let x2 = x.transpose(0, 1)?.contiguous()?.reshape((cin, rows))?;
            return g2.matmul(&x2.t()?)?.reshape((cout, cin, 1, 1));
        }
        let xp = x.pad_with_zeros(2, p, p + s)?.pad_with_zeros(3, p, p + s)?;
        let mut taps = Vec::with_capacity(kh * kw);
        for i in 0..kh {
            for j in 0..kw {
                // The inputs tap (i, j) of the kernel reads: rows i, i+s, …, i+(H'−1)s.
                let xs = xp.narrow(2, i, gh * s)?.narrow(3, j, gw * s)?;
                let xs = if s > 1 {
                    xs.reshape((b, cin, gh, s, gw, s))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((b, cin, gh, gw))?
                } else {
                    xs
                };
                let x2 = xs.transpose(0, 1)?.contiguous()?.reshape((cin, rows))?;
                taps.push(g2.matmul(&x2.t()?)?); // (Cout, Cin)
            }
        }
        Tensor::stack(&taps, 2)?.reshape((cout, cin, kh, kw))
    }
}

/// The CPU forward: `W (Cout, K) · im2col(x)`, back to `(B, Cout, H', W')`.
fn gemm_forward(x: &Tensor, w: &Tensor, g: Geometry) -> Result<Tensor> {
    let cout = w.dim(0)?;
    let y = w.contiguous()?.reshape((cout, g.rows()))?.matmul(&im2col(x, g)?)?;
    from_rows(&y, g)
}

/// `(Cout, B·H'·W')` → `(B, Cout, H', W')`.
fn from_rows(y: &Tensor, g: Geometry) -> Result<Tensor> {
    let cout = y.dim(0)?;
    let (oh, ow) = (g.out_h(), g.out_w());
    if g.batch == 1 {
        return y.reshape((1, cout, oh, ow));
    }
    y.reshape((cout, g.batch, oh, ow))?.transpose(0, 1)?.contiguous()
}

/// The CPU backward: `dx = col2im(Wᵀ·g)`, `dW = g·im2col(x)ᵀ`, `db = Σ g`.
fn gemm_backward(x: &Tensor, w: &Tensor, grad: &Tensor, needs: &[bool], g: Geometry) -> Result<Vec<Option<Tensor>>> {
    let cout = w.dim(0)?;
    // g as (Cout, B·H'·W').
    let g2 = if g.batch == 1 { grad.reshape((cout, g.cols()))? } else { grad.transpose(0, 1)?.contiguous()?.reshape((cout, g.cols()))? };
    let w2 = w.contiguous()?.reshape((cout, g.rows()))?;
    let dx = if needs[0] { Some(col2im(&w2.t()?.matmul(&g2)?, g)?) } else { None };
    let dw = if needs[1] { Some(g2.matmul(&im2col(x, g)?.t()?)?.reshape(w.dims())?) } else { None };
    let db = if needs.get(2) == Some(&true) { Some(grad.sum((0, 2, 3))?) } else { None };
    Ok(vec![dx, dw, db])
}

/// `K[i, o, a, b] = W[o, i, kh−1−a, kw−1−b]`: the kernel whose forward conv is W's input
/// gradient. On the CPU one pass over the weight (candle's `flip` is two index-selects, ~7× the
/// time of the dX conv itself for SD1.5's 1280-channel kernels); elsewhere candle's ops.
fn flipped_transposed(w: &Tensor) -> Result<Tensor> {
    if !w.device().is_cpu() {
        return w.transpose(0, 1)?.contiguous()?.flip(&[2, 3])?.contiguous();
    }
    w.contiguous()?.apply_op1_no_bwd(&FlipTranspose)
}

struct FlipTranspose;

impl candle_core::CustomOp1 for FlipTranspose {
    fn name(&self) -> &'static str {
        "conv-kernel-flip-transpose"
    }

    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let (cout, cin, kh, kw) = l.shape().dims4()?;
        let Some((start, _)) = l.contiguous_offsets() else { candle_core::bail!("conv kernel flip: the kernel must be contiguous") };
        let kk = kh * kw;
        fn go<T: Copy>(src: &[T], cout: usize, cin: usize, kk: usize) -> Vec<T> {
            let mut dst = Vec::with_capacity(src.len());
            for i in 0..cin {
                for o in 0..cout {
                    let taps = &src[(o * cin + i) * kk..(o * cin + i + 1) * kk];
                    dst.extend(taps.iter().rev());
                }
            }
            dst
        }
        let out = match s {
            S::F32(v) => S::F32(go(&v[start..], cout, cin, kk)),
            S::F64(v) => S::F64(go(&v[start..], cout, cin, kk)),
            S::F16(v) => S::F16(go(&v[start..], cout, cin, kk)),
            S::BF16(v) => S::BF16(go(&v[start..], cout, cin, kk)),
            _ => candle_core::bail!("conv kernel flip: unsupported dtype {:?}", candle_core::backend::BackendStorage::dtype(s)),
        };
        Ok((out, candle_core::Shape::from((cin, cout, kh, kw))))
    }
}

/// Pads dim `dim` with `before`/`after` zeros, or trims it where a count is negative.
fn pad_or_trim(t: &Tensor, dim: usize, before: isize, after: isize) -> Result<Tensor> {
    let mut t = t.clone();
    if before < 0 {
        let n = t.dim(dim)?;
        t = t.narrow(dim, (-before) as usize, n - (-before) as usize)?;
    }
    if after < 0 {
        let n = t.dim(dim)?;
        t = t.narrow(dim, 0, n - (-after) as usize)?;
    }
    t.pad_with_zeros(dim, before.max(0) as usize, after.max(0) as usize)
}
