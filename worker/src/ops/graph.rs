//! One graph node for an op whose output is already computed.
//!
//! candle's custom ops must produce their output from backend storages, so an op that is
//! composed of candle ops computes its output first (on detached inputs: no graph is built)
//! and [`attach`] then puts a single node on the graph whose forward hands that output over
//! (one copy) and whose backward is the op's own. When no argument carries a gradient the
//! output is returned as it is, with no node and no copy (inference, sampling, frozen
//! encoders).

use std::sync::Mutex;

use crate::profile::{self, Kind};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape, Storage, Tensor,
};

/// An op's backward: the gradient of each argument from the gradient of the output.
pub(crate) trait Backward: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// What the backward's time counts as in [`crate::profile`].
    fn profile_kind(&self) -> Kind;

    /// `args` are the op's arguments in the order given to [`attach`] and `needs[i]` says
    /// whether argument `i` carries a gradient; return `None` where it does not.
    fn backward(&self, args: &[&Tensor], needs: &[bool], grad: &Tensor) -> Result<Vec<Option<Tensor>>>;
}

/// `out` as the result of an op on `args` (one to three tensors) with `backward` as its
/// backward.
pub(crate) fn attach(args: &[&Tensor], out: Tensor, backward: impl Backward) -> Result<Tensor> {
    let needs: Vec<bool> = args.iter().map(|a| a.track_op()).collect();
    if !needs.iter().any(|&n| n) {
        return Ok(out);
    }
    let node = Node { out: Mutex::new(Some(out)), needs, backward };
    match args {
        [a] => a.apply_op1(node),
        [a, b] => a.apply_op2(b, node),
        [a, b, c] => a.apply_op3(b, c, node),
        _ => bail!("attach takes one to three arguments, got {}", args.len()),
    }
}

struct Node<B> {
    /// The output, until the forward hands it over.
    out: Mutex<Option<Tensor>>,
    needs: Vec<bool>,
    backward: B,
}

impl<B: Backward> Node<B> {
    /// The forward: a contiguous copy of the precomputed output on the backend `pick` selects.
    fn hand_over<S>(&self, pick: impl Fn(&Storage) -> Option<&S>) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let _span = profile::span(Kind::OutputCopy);
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(out) = out else { bail!("{}: the output was already handed over", self.backward.name()) };
        let (storage, layout) = out.storage_and_layout();
        let Some(s) = pick(&storage) else { bail!("{}: the output is on another device than the inputs", self.backward.name()) };
        Ok((copy_of(s, layout)?, layout.shape().clone()))
    }

    fn grads<const N: usize>(&self, args: [&Tensor; N], grad: &Tensor) -> Result<[Option<Tensor>; N]> {
        // Detached, so the gradients computed from them build no graph of their own.
        let detached: Vec<Tensor> = args.iter().map(|a| a.detach()).collect();
        let detached: Vec<&Tensor> = detached.iter().collect();
        let _span = profile::span(self.backward.profile_kind());
        let grads = self.backward.backward(&detached, &self.needs, &grad.detach())?;
        let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
        for (i, g) in grads.into_iter().enumerate().take(N) {
            out[i] = if self.needs[i] { g } else { None };
        }
        Ok(out)
    }
}

/// A contiguous copy of `src` as laid out by `layout`.
pub(crate) fn copy_of<S>(src: &S, layout: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of the new storage is written by `copy_strided_src` below.
    let mut dst = unsafe { src.device().alloc_uninit(layout.shape(), src.dtype())? };
    src.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

fn cpu(s: &Storage) -> Option<&CpuStorage> {
    if let Storage::Cpu(s) = s {
        Some(s)
    } else {
        None
    }
}

fn cuda(s: &Storage) -> Option<&CudaStorage> {
    if let Storage::Cuda(s) = s {
        Some(s)
    } else {
        None
    }
}

fn metal(s: &Storage) -> Option<&MetalStorage> {
    if let Storage::Metal(s) = s {
        Some(s)
    } else {
        None
    }
}

impl<B: Backward> CustomOp1 for Node<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.hand_over(cpu)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }
    fn bwd(&self, a: &Tensor, _: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [ga] = self.grads([a], grad)?;
        Ok(ga)
    }
}

impl<B: Backward> CustomOp2 for Node<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.hand_over(cpu)
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [ga, gb] = self.grads([a, b], grad)?;
        Ok((ga, gb))
    }
}

impl<B: Backward> CustomOp3 for Node<B> {
    fn name(&self) -> &'static str {
        self.backward.name()
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.hand_over(cpu)
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.hand_over(cuda)
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.hand_over(metal)
    }
    #[allow(clippy::type_complexity)]
    fn bwd(&self, a: &Tensor, b: &Tensor, c: &Tensor, _: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [ga, gb, gc] = self.grads([a, b, c], grad)?;
        Ok((ga, gb, gc))
    }
}
