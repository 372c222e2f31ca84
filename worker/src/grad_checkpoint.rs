//! Gradient checkpointing: keep only each block's inputs and output during the forward, and
//! recompute the block's inside when the backward reaches it.
//!
//! candle builds its backward graph from the tensors themselves: every op result holds its
//! inputs, so a UNet's forward keeps every activation alive until the backward is done. A
//! checkpointed block instead runs its forward on detached inputs, keeps only the output (the
//! block's graph is dropped at once) and puts one [`CheckpointOp`] on the graph in its place.
//! When the backward reaches that op it runs the block again with graph, backpropagates the
//! incoming gradient through it, returns the gradients of the block's inputs to the outer
//! backward, and sets aside the gradients of the trained variables inside the block;
//! [`GradientCheckpointing::backward`] adds those to the outer backward's store.
//!
//! Random draws inside a block (network dropout, rank and module dropout, DyLoRA's block) are
//! recorded on a tape during the forward and replayed during the recompute, so the recomputed
//! block is the same function the forward computed (PyTorch's `preserve_rng_state`).
//!
//! Blocks opt in with [`checkpointed`]; it only checkpoints inside
//! [`GradientCheckpointing::forward`], elsewhere (sampling, inference, tests) it runs the
//! block as is.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::backprop::GradStore;
use candle_core::{bail, CpuStorage, CudaStorage, CustomOp2, DType, Device, Layout, MetalStorage, Result, Shape, Storage, Tensor, TensorId, Var};

/// A block's forward as a function of its (one or two) input tensors. It must be the same
/// function every time it is called (recomputation relies on it).
pub(crate) type BlockFn = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// Turns checkpointing on for the forwards run through [`GradientCheckpointing::forward`] and
/// collects the gradients the recomputations find.
pub struct GradientCheckpointing {
    shared: Arc<Shared>,
}

struct Shared {
    /// The variables being trained: the only gradients a recompute keeps (candle's backward
    /// also returns gradients for frozen weights and constants, some activation-sized).
    trained: HashSet<TensorId>,
    /// Gradients of trained variables inside checkpointed blocks, found while recomputing.
    inner_grads: Mutex<HashMap<TensorId, Tensor>>,
    /// A scalar variable that stands in for block inputs which carry no gradient, so a block
    /// stays on the graph (its own adapters need their gradients) even when nothing flows in.
    anchor: Var,
}

thread_local! {
    /// The checkpointing in effect for forwards on this thread.
    static ACTIVE: RefCell<Option<Arc<Shared>>> = const { RefCell::new(None) };
    /// The random-draw tape of the block being run or recomputed on this thread.
    static TAPE: RefCell<Option<Tape>> = const { RefCell::new(None) };
}

impl GradientCheckpointing {
    /// Checkpointing for a training run whose trained variables are `trained`.
    pub fn new(device: &Device, trained: &[Var]) -> Result<Self> {
        let anchor = Var::from_tensor(&Tensor::zeros((), DType::F32, device)?)?;
        let trained = trained.iter().map(|v| v.id()).collect();
        Ok(Self { shared: Arc::new(Shared { trained, inner_grads: Mutex::new(HashMap::new()), anchor }) })
    }

    /// Runs `f` (a model's forward) with its [`checkpointed`] blocks checkpointed.
    pub fn forward<T, E>(&self, f: impl FnOnce() -> std::result::Result<T, E>) -> std::result::Result<T, E> {
        struct Restore(Option<Arc<Shared>>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let previous = self.0.take();
                ACTIVE.with(|a| *a.borrow_mut() = previous);
            }
        }
        let previous = ACTIVE.with(|a| a.borrow_mut().replace(self.shared.clone()));
        let _restore = Restore(previous);
        f()
    }

    /// `loss.backward()`, with the gradients of the variables inside checkpointed blocks
    /// added in.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.lock_inner().clear();
        let mut grads = loss.backward()?;
        let inner: Vec<(TensorId, Tensor)> = self.lock_inner().drain().collect();
        for (id, g) in inner {
            let total = match grads.get_id(id) {
                Some(outer) => (outer + g)?,
                None => g,
            };
            grads.insert_id(id, total);
        }
        Ok(grads)
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>> {
        self.shared.inner_grads.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A block's output for `inputs` (one or two tensors, e.g. hidden states and the time
/// embedding). Inside [`GradientCheckpointing::forward`] the block's activations are dropped
/// and recomputed in the backward; elsewhere this is `f(inputs)`.
pub(crate) fn checkpointed(inputs: &[&Tensor], f: BlockFn) -> Result<Tensor> {
    let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
    let Some(shared) = ACTIVE.with(|a| a.borrow().clone()) else {
        return f(&owned);
    };
    if owned.is_empty() || owned.len() > 2 {
        bail!("gradient checkpointing: a block takes one or two inputs, not {}", owned.len());
    }
    let needs_grad: Vec<bool> = owned.iter().map(|t| t.track_op()).collect();
    let detached: Vec<Tensor> = owned.iter().map(|t| t.detach()).collect();
    // Blocks inside this one run plainly (this block's recompute covers them).
    let outer = ACTIVE.with(|a| a.borrow_mut().take());
    let ran = with_tape(Tape::Recording(vec![]), || f(&detached));
    ACTIVE.with(|a| *a.borrow_mut() = outer);
    let (out, tape) = ran?;
    let Tape::Recording(draws) = tape else { unreachable!("a recording tape comes back recording") };
    // Dropping the graph of `out` here frees the block's activations.
    let out_slot = Arc::new(Mutex::new(Some(out.detach())));
    drop(out);
    let op = CheckpointOp {
        inputs: detached,
        needs_grad: needs_grad.clone(),
        f,
        draws: Mutex::new(Some(draws)),
        out: out_slot.clone(),
        shared: shared.clone(),
    };
    let anchor = shared.anchor.as_tensor();
    let arg1 = if needs_grad[0] { &owned[0] } else { anchor };
    let arg2 = if needs_grad.get(1) == Some(&true) { &owned[1] } else { anchor };
    let result = arg1.apply_op2(arg2, op)?;
    // The op copied the output into `result`; it no longer needs its own handle.
    out_slot.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(result)
}

/// The graph node standing for one checkpointed block.
struct CheckpointOp {
    /// The block's inputs, detached: what the recompute starts from.
    inputs: Vec<Tensor>,
    /// Which inputs carry gradient (their gradients go back to the outer backward).
    needs_grad: Vec<bool>,
    f: BlockFn,
    /// The random draws of the forward, replayed by the recompute.
    draws: Mutex<Option<Vec<Draw>>>,
    /// The block's output between the forward and the op's creation.
    out: Arc<Mutex<Option<Tensor>>>,
    shared: Arc<Shared>,
}

impl CheckpointOp {
    /// The op's forward: a copy of the block output (on the backend `pick` selects), which
    /// becomes the op's own result.
    fn copy_output<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let out = {
            let guard = self.out.lock().unwrap_or_else(|e| e.into_inner());
            let Some(out) = guard.as_ref() else { bail!("gradient checkpointing: the block output was already taken") };
            out.clone()
        };
        let (storage, layout) = out.storage_and_layout();
        let Some(s) = pick(&storage) else { bail!("gradient checkpointing: the block output is on another device than its inputs") };
        Ok((crate::ops::copy_of(s, layout)?, layout.shape().clone()))
    }
}

impl CustomOp2 for CheckpointOp {
    fn name(&self) -> &'static str {
        "gradient-checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.copy_output(|s| if let Storage::Cpu(s) = s { Some(s) } else { None })
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.copy_output(|s| if let Storage::Cuda(s) = s { Some(s) } else { None })
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.copy_output(|s| if let Storage::Metal(s) = s { Some(s) } else { None })
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor, grad_out: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Inputs that carry gradient become variables of the recompute's own small graph.
        let inputs: Vec<Tensor> = self
            .inputs
            .iter()
            .zip(&self.needs_grad)
            .map(|(t, &need)| if need { Ok(Var::from_tensor(t)?.as_tensor().clone()) } else { Ok(t.clone()) })
            .collect::<Result<_>>()?;
        let draws = self.draws.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(draws) = draws else { bail!("gradient checkpointing: a block was recomputed twice") };
        let (out, _) = with_tape(Tape::Replaying(draws.into_iter()), || (self.f)(&inputs))?;
        // d(Σ out·g)/dθ = gᵀ ∂out/∂θ: the vector-Jacobian product the outer backward needs.
        let surrogate = out.mul(&grad_out.detach().to_dtype(out.dtype())?)?.sum_all()?;
        let mut grads = surrogate.backward()?;
        let mut input_grads = [None, None];
        for (i, t) in inputs.iter().enumerate() {
            if self.needs_grad[i] {
                input_grads[i] = Some(match grads.remove(t) {
                    Some(g) => g,
                    None => t.zeros_like()?,
                });
            }
        }
        let ids: Vec<TensorId> = grads.get_ids().copied().filter(|id| self.shared.trained.contains(id)).collect();
        let mut inner = self.shared.inner_grads.lock().unwrap_or_else(|e| e.into_inner());
        for id in ids {
            let Some(g) = grads.get_id(id) else { continue };
            let total = match inner.remove(&id) {
                Some(previous) => (previous + g)?,
                None => g.clone(),
            };
            inner.insert(id, total);
        }
        let [g1, g2] = input_grads;
        Ok((g1, g2))
    }
}

// ---------------------------------------------------------------------------------------------
// The random-draw tape
// ---------------------------------------------------------------------------------------------

/// One random draw made inside a checkpointed block.
pub(crate) enum Draw {
    Number(f64),
    Index(usize),
    Mask(Vec<f32>),
    Tensor(Tensor),
}

enum Tape {
    Recording(Vec<Draw>),
    Replaying(std::vec::IntoIter<Draw>),
}

/// Runs `f` with `tape` as this thread's tape and returns the tape as `f` left it.
fn with_tape<T>(tape: Tape, f: impl FnOnce() -> Result<T>) -> Result<(T, Tape)> {
    let previous = TAPE.with(|t| t.borrow_mut().replace(tape));
    let result = f();
    let tape = TAPE.with(|t| std::mem::replace(&mut *t.borrow_mut(), previous));
    let tape = tape.expect("the tape set above is still there");
    Ok((result?, tape))
}

/// A value that can be recorded on the tape.
pub(crate) trait Replayable: Sized {
    fn to_draw(&self) -> Draw;
    fn from_draw(d: Draw) -> Option<Self>;
}

impl Replayable for f64 {
    fn to_draw(&self) -> Draw {
        Draw::Number(*self)
    }
    fn from_draw(d: Draw) -> Option<Self> {
        if let Draw::Number(v) = d { Some(v) } else { None }
    }
}

impl Replayable for usize {
    fn to_draw(&self) -> Draw {
        Draw::Index(*self)
    }
    fn from_draw(d: Draw) -> Option<Self> {
        if let Draw::Index(v) = d { Some(v) } else { None }
    }
}

impl Replayable for Vec<f32> {
    fn to_draw(&self) -> Draw {
        Draw::Mask(self.clone())
    }
    fn from_draw(d: Draw) -> Option<Self> {
        if let Draw::Mask(v) = d { Some(v) } else { None }
    }
}

impl Replayable for Tensor {
    fn to_draw(&self) -> Draw {
        Draw::Tensor(self.clone())
    }
    fn from_draw(d: Draw) -> Option<Self> {
        if let Draw::Tensor(v) = d { Some(v) } else { None }
    }
}

/// A random draw made by `draw`, recorded when a checkpointed block runs its forward and
/// replayed (without calling `draw`) when the block is recomputed.
pub(crate) fn replayable<T: Replayable>(draw: impl FnOnce() -> Result<T>) -> Result<T> {
    let replayed = TAPE.with(|t| match t.borrow_mut().as_mut() {
        Some(Tape::Replaying(draws)) => Some(draws.next()),
        _ => None,
    });
    match replayed {
        Some(Some(d)) => match T::from_draw(d) {
            Some(v) => Ok(v),
            None => bail!("gradient checkpointing: the recomputed block drew another kind of random value than its forward"),
        },
        Some(None) => bail!("gradient checkpointing: the recomputed block drew more random values than its forward"),
        None => {
            let v = draw()?;
            TAPE.with(|t| {
                if let Some(Tape::Recording(draws)) = t.borrow_mut().as_mut() {
                    draws.push(v.to_draw());
                }
            });
            Ok(v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::networks::common::element_dropout;

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// f(x, c) = (x·w + c)² with trained w: the gradients of x, c and w through a
    /// checkpointed block equal the plain ones.
    #[test]
    fn checkpointed_block_has_the_plain_gradients() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[0.5f32, -1.5, 2.0], &dev).unwrap()).unwrap();
        let x0 = Tensor::new(&[[1.0f32, 2.0, 3.0], [-1.0, 0.5, 0.25]], &dev).unwrap();
        let c0 = Tensor::new(&[[0.1f32, 0.2, 0.3], [0.4, 0.5, 0.6]], &dev).unwrap();
        let block = {
            let w = w.clone();
            move |xs: &[Tensor]| -> Result<Tensor> { xs[0].broadcast_mul(w.as_tensor())?.add(&xs[1])?.sqr() }
        };
        let grads_of = |checkpointing: bool| -> (Tensor, Tensor, Tensor) {
            let x = Var::from_tensor(&x0).unwrap();
            let c = Var::from_tensor(&c0).unwrap();
            // Something before and after the block, as in a model.
            let (xin, cin) = ((x.as_tensor() * 2.0).unwrap(), c.as_tensor().exp().unwrap());
            let gc = GradientCheckpointing::new(&dev, &[w.clone()]).unwrap();
            let f: BlockFn = Arc::new(block.clone());
            let out = if checkpointing { gc.forward(|| checkpointed(&[&xin, &cin], f)).unwrap() } else { f(&[xin.clone(), cin.clone()]).unwrap() };
            let loss = (out * 3.0).unwrap().sum_all().unwrap();
            let grads = gc.backward(&loss).unwrap();
            (grads.get(&x).unwrap().clone(), grads.get(&c).unwrap().clone(), grads.get(&w).unwrap().clone())
        };
        let plain = grads_of(false);
        let ckpt = grads_of(true);
        for (a, b) in [(&plain.0, &ckpt.0), (&plain.1, &ckpt.1), (&plain.2, &ckpt.2)] {
            assert!(max_abs(&(a - b).unwrap()) <= 1e-5 * max_abs(a), "{a} vs {b}");
        }
    }

    /// Network dropout draws its mask once: the recompute replays it. With
    /// out = dropout(x·w), d Σout / dw = Σout / w only if both passes used the same mask.
    #[test]
    fn recompute_replays_the_dropout_mask() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.7f32], &dev).unwrap()).unwrap();
        let x = Var::from_tensor(&Tensor::arange(1f32, 257., &dev).unwrap()).unwrap();
        let gc = GradientCheckpointing::new(&dev, &[w.clone()]).unwrap();
        let block: BlockFn = {
            let w = w.clone();
            Arc::new(move |xs: &[Tensor]| element_dropout(&xs[0].broadcast_mul(w.as_tensor())?, 0.5))
        };
        let out = gc.forward(|| checkpointed(&[x.as_tensor()], block)).unwrap();
        let grads = gc.backward(&out.sum_all().unwrap()).unwrap();
        let sum_out: f32 = out.sum_all().unwrap().to_scalar().unwrap();
        let gw: f32 = grads.get(&w).unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!((gw - sum_out / 1.7).abs() <= 1e-3 * gw.abs(), "grad w {gw} vs Σout/w {}", sum_out / 1.7);
        // d Σout / dx_i = out_i / x_i: the same mask again.
        let gx = grads.get(&x).unwrap();
        let expected = out.div(x.as_tensor()).unwrap();
        assert!(max_abs(&(gx - expected).unwrap()) <= 1e-5);
    }
}
