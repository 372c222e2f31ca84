//! AdamW with 8-bit optimizer states: bitsandbytes' `bnb.optim.AdamW8bit` (what sd-scripts
//! runs for `optimizer_type = "AdamW8bit"`), following its CPU kernels (bitsandbytes 0.50).
//!
//! For a parameter of at least `min_8bit_size` (4096) elements both moments are kept as one
//! byte per element: each block of 256 values is scaled by its absolute maximum and rounded to
//! the nearest entry of a 256-value "dynamic" code (signed for the first moment, unsigned for
//! the second; Dettmers 2016). Each step dequantizes, does the AdamW update in f32 and
//! quantizes again. Smaller parameters keep f32 moments (bitsandbytes' 32-bit path). State
//! memory: ~2 bytes per parameter instead of AdamW's 8.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use candle_core::backprop::GradStore;
use candle_core::{bail, Result, Tensor};

use super::{all_params, load_params, check_adam_hyper, check_groups, grad_of, read, write, Args, Optimizer, ParamGroup, StateIn, StateOut};

/// Values per quantization block (bitsandbytes' optimizer block size).
pub const BLOCK: usize = 256;

#[derive(Clone, Debug, PartialEq)]
pub struct AdamW8bitConfig {
    pub betas: (f64, f64),
    pub eps: f64,
    /// bitsandbytes' default is 0.01.
    pub weight_decay: f64,
    /// Parameters with fewer elements keep f32 moments.
    pub min_8bit_size: usize,
}

impl Default for AdamW8bitConfig {
    fn default() -> Self {
        Self { betas: (0.9, 0.999), eps: 1e-8, weight_decay: 0.01, min_8bit_size: 4096 }
    }
}

impl AdamW8bitConfig {
    pub fn from_args(map: &BTreeMap<String, String>) -> Result<Self> {
        let d = Self::default();
        let mut a = Args::new("AdamW8bit", map);
        let min = a.f64("min_8bit_size", d.min_8bit_size as f64)?;
        let c = Self {
            betas: a.pair("betas", d.betas)?,
            eps: a.f64("eps", d.eps)?,
            weight_decay: a.f64("weight_decay", d.weight_decay)?,
            min_8bit_size: min as usize,
        };
        a.finish()?;
        if !(min >= 0.0) || min.fract() != 0.0 {
            bail!("AdamW8bit: min_8bit_size must be a whole number ≥ 0, got {min}");
        }
        Ok(c)
    }
}

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: for each
/// exponent 10^-6 … 10^0, the midpoints of a linear split of [0.1, 1] (more points for larger
/// exponents), mirrored when signed, plus 0 and 1; sorted.
pub fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f64> = Vec::with_capacity(256);
    let (max_exp, non_sign) = (7i32, 7i32);
    for i in 0..max_exp {
        let items = if signed { (1usize << (i + non_sign - max_exp)) + 1 } else { (1usize << (i + non_sign - max_exp + 1)) + 1 };
        let bounds = linspace_f32(0.1, 1.0, items);
        // A Python float times a float32 tensor: the product is taken in f32.
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push((scale * mean) as f64);
            if signed {
                data.push((-scale * mean) as f64);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    debug_assert_eq!(data.len(), 256);
    let mut code: Vec<f32> = data.into_iter().map(|v| v as f32).collect();
    code.sort_by(|a, b| a.total_cmp(b));
    code.try_into().expect("256 values")
}

/// `torch.linspace(start, end, steps, dtype=float32)` (CPU): the first half counts up from
/// `start`, the second half down from `end`, the step computed in f32 and each value with one
/// fused multiply-add (torch's vectorised kernel; a separate multiply and add differ by an ulp).
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - i - 1) as f32, end) })
        .collect()
}

/// A quantization map and bitsandbytes' CPU lookup table for it: [-1, 1] cut into 65536
/// steps, each mapped to the code entry nearest to it (by the midpoints between entries).
/// Rounding goes through this grid, so a value just past a midpoint may take the farther
/// entry; it is what bitsandbytes' CPU kernel does, and following it keeps the states equal.
struct Codebook {
    code: [f32; 256],
    lut: Vec<u8>,
}

const LUT_SIZE: usize = 65536;

impl Codebook {
    fn new(code: [f32; 256]) -> Self {
        let mid: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut lut = Vec::with_capacity(LUT_SIZE);
        let mut idx = 0usize;
        for i in 0..LUT_SIZE {
            let val = -1.0f32 + (2.0f32 * i as f32) / (LUT_SIZE - 1) as f32;
            while idx < 255 && mid[idx] < val {
                idx += 1;
            }
            lut.push(idx as u8);
        }
        Self { code, lut }
    }

    /// The code index of a value already divided by its block's absmax.
    fn index(&self, normed: f32) -> u8 {
        let x = normed.clamp(-1.0, 1.0);
        self.lut[((x + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as usize]
    }
}

/// A codebook's 256 code values and its 65536-entry nearest-code table (the kernels upload
/// these; `signed` for the first moment, unsigned for the second).
pub fn codebook_tables(signed: bool) -> (&'static [f32; 256], &'static [u8]) {
    let book = if signed { signed_codebook() } else { unsigned_codebook() };
    (&book.code, &book.lut)
}

fn signed_codebook() -> &'static Codebook {
    static BOOK: OnceLock<Codebook> = OnceLock::new();
    BOOK.get_or_init(|| Codebook::new(dynamic_map(true)))
}

fn unsigned_codebook() -> &'static Codebook {
    static BOOK: OnceLock<Codebook> = OnceLock::new();
    BOOK.get_or_init(|| Codebook::new(dynamic_map(false)))
}

/// One block-quantized buffer: a code index per value and an absolute maximum per block.
#[derive(Clone, Debug)]
struct Quantized {
    codes: Vec<u8>,
    absmax: Vec<f32>,
}

impl Quantized {
    fn zeros(n: usize) -> Self {
        Self { codes: vec![0; n], absmax: vec![0.0; n.div_ceil(BLOCK)] }
    }

    fn dequantize(&self, book: &Codebook) -> Vec<f32> {
        self.codes.iter().enumerate().map(|(i, &q)| book.code[q as usize] * self.absmax[i / BLOCK]).collect()
    }

    /// Each block scaled by the reciprocal of its absolute maximum and rounded through the
    /// codebook's table (an all-zero block stores zeros).
    fn quantize(values: &[f32], book: &Codebook) -> Self {
        let mut codes = Vec::with_capacity(values.len());
        let mut absmax = Vec::with_capacity(values.len().div_ceil(BLOCK));
        for block in values.chunks(BLOCK) {
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(amax);
            if amax == 0.0 {
                codes.extend(std::iter::repeat_n(0u8, block.len()));
                continue;
            }
            let inv = 1.0 / amax;
            codes.extend(block.iter().map(|&v| book.index(v * inv)));
        }
        Self { codes, absmax }
    }
}

#[derive(Clone, Debug)]
enum Moments {
    /// Parameters of at least `min_8bit_size` elements.
    Bits8 { m: Quantized, v: Quantized },
    /// Smaller ones.
    Full { m: Vec<f32>, v: Vec<f32> },
}

#[derive(Clone, Debug)]
struct State {
    step: f64,
    moments: Moments,
}

/// [`Moments`] on the device (the multi-tensor kernels' path).
#[allow(dead_code)] // built by the cuda feature's path only
enum DeviceMoments {
    Bits8 { m_codes: Tensor, m_absmax: Tensor, v_codes: Tensor, v_absmax: Tensor },
    Full { m: Tensor, v: Tensor },
}

#[allow(dead_code)]
struct DeviceState {
    step: f64,
    moments: DeviceMoments,
}

pub struct AdamW8bit {
    groups: Vec<ParamGroup>,
    cfg: AdamW8bitConfig,
    state: HashMap<String, State>,
    device_state: HashMap<String, DeviceState>,
}

impl AdamW8bit {
    pub fn new(groups: Vec<ParamGroup>, cfg: AdamW8bitConfig) -> Result<Self> {
        check_groups("AdamW8bit", &groups)?;
        check_adam_hyper("AdamW8bit", cfg.betas, cfg.eps, cfg.weight_decay)?;
        Ok(Self { groups, cfg, state: HashMap::new(), device_state: HashMap::new() })
    }

    fn new_moments(&self, n: usize) -> Moments {
        if n >= self.cfg.min_8bit_size {
            Moments::Bits8 { m: Quantized::zeros(n), v: Quantized::zeros(n) }
        } else {
            Moments::Full { m: vec![0.0; n], v: vec![0.0; n] }
        }
    }
}

impl AdamW8bit {
    /// Every tensor in the multi-tensor kernels (worker/kernels/optim.cu: one launch over the
    /// 8-bit blocks, one over the 32-bit tensors) when all of them are f32 CUDA tensors and the
    /// kernels are on; `Ok(false)` otherwise. The same arithmetic as the host loop.
    #[cfg(feature = "cuda")]
    fn step_multi_tensor(&mut self, grads: &GradStore, lr_scale: f64) -> Result<bool> {
        use crate::kernels::optim as multi;
        if !super::all_on_kernels(&self.groups) {
            return Ok(false);
        }
        let (betas, eps, wd) = (self.cfg.betas, self.cfg.eps, self.cfg.weight_decay);
        let mut work = vec![]; // (name, var, gradient, scalars)
        for group in &self.groups {
            let lr = group.lr * lr_scale;
            for (name, var) in &group.params {
                let Some(g) = super::grad_tensor(grads, name, var)? else { continue };
                if !self.device_state.contains_key(name) {
                    let n = var.elem_count();
                    let dev = var.device();
                    let host = match self.state.remove(name) {
                        Some(h) => h,
                        None => State { step: 0.0, moments: self.new_moments(n) },
                    };
                    let moments = match host.moments {
                        Moments::Bits8 { m, v } => {
                            let blocks = m.absmax.len();
                            DeviceMoments::Bits8 {
                                m_codes: Tensor::from_vec(m.codes, n, dev)?,
                                m_absmax: Tensor::from_vec(m.absmax, blocks, dev)?,
                                v_codes: Tensor::from_vec(v.codes, n, dev)?,
                                v_absmax: Tensor::from_vec(v.absmax, blocks, dev)?,
                            }
                        }
                        Moments::Full { m, v } => DeviceMoments::Full { m: Tensor::from_vec(m, n, dev)?, v: Tensor::from_vec(v, n, dev)? },
                    };
                    self.device_state.insert(name.clone(), DeviceState { step: host.step, moments });
                }
                let st = self.device_state.get_mut(name).expect("inserted above");
                st.step += 1.0;
                let bits8 = matches!(st.moments, DeviceMoments::Bits8 { .. });
                work.push((name, var, g.contiguous()?, multi::adamw8bit_scalars(lr, wd, betas, eps, st.step, bits8)));
            }
        }
        let tensors: Vec<multi::DeviceAdamW8bit> = work
            .iter()
            .map(|(name, var, g, scalars)| match &self.device_state[name.as_str()].moments {
                DeviceMoments::Bits8 { m_codes, m_absmax, v_codes, v_absmax } => multi::DeviceAdamW8bit::Bits8 { param: var.as_tensor(), grad: g, m_codes, m_absmax, v_codes, v_absmax, scalars: *scalars },
                DeviceMoments::Full { m, v } => multi::DeviceAdamW8bit::Full { param: var.as_tensor(), grad: g, m, v, scalars: *scalars },
            })
            .collect();
        multi::adamw8bit_step(&tensors, betas, eps, wd > 0.0)?;
        Ok(true)
    }

    /// A device state read back in the host's form (for `state()`).
    fn host_state_of(st: &DeviceState) -> Result<State> {
        let moments = match &st.moments {
            DeviceMoments::Bits8 { m_codes, m_absmax, v_codes, v_absmax } => Moments::Bits8 {
                m: Quantized { codes: m_codes.to_vec1()?, absmax: read(m_absmax)? },
                v: Quantized { codes: v_codes.to_vec1()?, absmax: read(v_absmax)? },
            },
            DeviceMoments::Full { m, v } => Moments::Full { m: read(m)?, v: read(v)? },
        };
        Ok(State { step: st.step, moments })
    }
}

impl Optimizer for AdamW8bit {
    fn kind(&self) -> &'static str {
        "AdamW8bit"
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
        let (b1, b2) = (beta1 as f32, beta2 as f32);
        let (w1, w2) = ((1.0 - beta1) as f32, (1.0 - beta2) as f32);
        let wd = self.cfg.weight_decay;
        let eps = self.cfg.eps as f32;
        for gi in 0..self.groups.len() {
            let lr = self.groups[gi].lr * lr_scale;
            for pi in 0..self.groups[gi].params.len() {
                let (name, var) = &self.groups[gi].params[pi];
                let Some(g) = grad_of(grads, name, var)? else { continue };
                let mut p = read(var.as_tensor())?;
                let n = p.len();
                if !self.state.contains_key(name) {
                    let fresh = State { step: 0.0, moments: self.new_moments(n) };
                    self.state.insert(name.clone(), fresh);
                }
                let st = self.state.get_mut(name).expect("inserted above");
                st.step += 1.0;
                let correction1 = 1.0 - beta1.powf(st.step);
                let correction2 = (1.0 - beta2.powf(st.step)).sqrt();
                let decay = (1.0 - lr * wd) as f32;
                match &mut st.moments {
                    Moments::Bits8 { m, v } => {
                        let mut mf = m.dequantize(signed_codebook());
                        let mut vf = v.dequantize(unsigned_codebook());
                        let c2 = correction2 as f32;
                        let step_size = (-lr / correction1) as f32;
                        for i in 0..n {
                            mf[i] = mf[i] * b1 + w1 * g[i];
                            vf[i] = vf[i] * b2 + w2 * g[i] * g[i];
                            let denom = vf[i].sqrt() / c2 + eps;
                            if wd > 0.0 {
                                p[i] *= decay;
                            }
                            // torch's addcdiv: self + (value · t1) / t2.
                            p[i] += (step_size * mf[i]) / denom;
                        }
                        *m = Quantized::quantize(&mf, signed_codebook());
                        *v = Quantized::quantize(&vf, unsigned_codebook());
                    }
                    Moments::Full { m, v } => {
                        // bitsandbytes' 32-bit kernel: the bias corrections folded into the step.
                        let step_size = (-lr * correction2 / correction1) as f32;
                        let eps_c2 = (self.cfg.eps * correction2) as f32;
                        for i in 0..n {
                            m[i] = m[i] * b1 + w1 * g[i];
                            v[i] = v[i] * b2 + w2 * g[i] * g[i];
                            if wd > 0.0 {
                                p[i] *= decay;
                            }
                            p[i] += step_size * (m[i] / (v[i].sqrt() + eps_c2));
                        }
                    }
                }
                write(var, p)?;
            }
        }
        Ok(())
    }

    fn state(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = StateOut::default();
        for (name, _) in all_params(&self.groups) {
            let from_device = self.device_state.get(name).map(Self::host_state_of).transpose()?;
            let Some(st) = from_device.as_ref().or_else(|| self.state.get(name)) else { continue };
            out.param_scalar(name, "step", st.step)?;
            match &st.moments {
                Moments::Bits8 { m, v } => {
                    out.bytes(name, "state1", &m.codes)?;
                    out.bytes(name, "state2", &v.codes)?;
                    out.buf(name, "absmax1", &m.absmax)?;
                    out.buf(name, "absmax2", &v.absmax)?;
                }
                Moments::Full { m, v } => {
                    out.buf(name, "exp_avg", m)?;
                    out.buf(name, "exp_avg_sq", v)?;
                }
            }
        }
        Ok(out.0)
    }

    fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let s = StateIn(state);
        let new = load_params(&self.groups, &s, "step", |name, var| {
            let n = var.elem_count();
            let blocks = n.div_ceil(BLOCK);
            let moments = match self.new_moments(n) {
                Moments::Bits8 { .. } => Moments::Bits8 {
                    m: Quantized { codes: s.bytes(name, "state1", n)?, absmax: s.buf(name, "absmax1", blocks)? },
                    v: Quantized { codes: s.bytes(name, "state2", n)?, absmax: s.buf(name, "absmax2", blocks)? },
                },
                Moments::Full { .. } => Moments::Full { m: s.buf(name, "exp_avg", n)?, v: s.buf(name, "exp_avg_sq", n)? },
            };
            Ok(State { step: s.param_scalar(name, "step")?, moments })
        })?;
        self.state = new;
        self.device_state.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_are_sorted_and_span_the_range() {
        for (signed, lo) in [(true, -1.0f32), (false, 0.0)] {
            let m = dynamic_map(signed);
            assert!(m.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
            assert_eq!(m[255], 1.0);
            assert!(m.contains(&0.0));
            assert!(m[0] >= lo && m[0] < lo + 0.01, "{}", m[0]);
        }
    }

    #[test]
    fn quantize_rounds_to_a_neighbouring_code() {
        let book = signed_codebook();
        let values: Vec<f32> = (0..600).map(|i| ((i as f32) * 0.37).sin() * (1.0 + (i / 256) as f32)).collect();
        let q = Quantized::quantize(&values, book);
        assert_eq!(q.absmax.len(), 3);
        let back = q.dequantize(book);
        for (i, (&a, &b)) in values.iter().zip(&back).enumerate() {
            let x = a / q.absmax[i / BLOCK];
            // The code nearest to x, up to the table's grid (2/65535 wide): near a midpoint
            // or among the tiny codes around 0 the grid may pick a neighbour.
            let nearest = book.code.iter().map(|c| (c - x).abs()).fold(f32::INFINITY, f32::min);
            let chosen = (book.code[q.codes[i] as usize] - x).abs();
            assert!(chosen <= nearest + 2.0 / 65535.0, "{i}: {a} → {b}");
        }
        // An all-zero block stays zero.
        let z = Quantized::quantize(&[0.0; 10], book);
        assert!(z.dequantize(book).iter().all(|&v| v == 0.0));
    }
}
