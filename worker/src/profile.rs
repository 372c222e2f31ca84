//! Where a training step's time goes: wall time per phase (forward, backward, optimizer) and
//! per op kind (conv, linear, attention, norms, the graph's output copies), summed while
//! [`enable`]d. `loft bench train --profile` prints it. Costs one relaxed atomic load per op
//! when off.
//!
//! On the CPU candle computes synchronously, so an op's span is its compute time. On CUDA
//! kernels run asynchronously and a span measures only the launch: profile on the CPU.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// What a span is counted as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Forward,
    Backward,
    Optimizer,
    ConvForward,
    ConvBackward,
    LinearForward,
    LinearBackward,
    AttentionForward,
    AttentionBackward,
    NormForward,
    NormBackward,
    ActivationBackward,
    OutputCopy,
}

impl Kind {
    pub const ALL: [Kind; 13] = [
        Kind::Forward,
        Kind::Backward,
        Kind::Optimizer,
        Kind::ConvForward,
        Kind::ConvBackward,
        Kind::LinearForward,
        Kind::LinearBackward,
        Kind::AttentionForward,
        Kind::AttentionBackward,
        Kind::NormForward,
        Kind::NormBackward,
        Kind::ActivationBackward,
        Kind::OutputCopy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Forward => "forward (whole)",
            Kind::Backward => "backward (whole)",
            Kind::Optimizer => "optimizer + clipping",
            Kind::ConvForward => "conv2d forward",
            Kind::ConvBackward => "conv2d backward",
            Kind::LinearForward => "linear (matmul) forward",
            Kind::LinearBackward => "linear (matmul) backward",
            Kind::AttentionForward => "attention forward",
            Kind::AttentionBackward => "attention backward",
            Kind::NormForward => "group/layer norm forward",
            Kind::NormBackward => "group/layer norm backward",
            Kind::ActivationBackward => "SiLU/GELU backward",
            Kind::OutputCopy => "op output copies",
        }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 13] = [const { AtomicU64::new(0) }; 13];

/// Starts counting (and clears earlier counts).
pub fn enable() {
    for n in &NANOS {
        n.store(0, Ordering::Relaxed);
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Seconds counted per kind since [`enable`].
pub fn totals() -> Vec<(Kind, f64)> {
    Kind::ALL.iter().map(|&k| (k, NANOS[k as usize].load(Ordering::Relaxed) as f64 / 1e9)).collect()
}

/// Counts the time until the guard is dropped as `kind`.
pub fn span(kind: Kind) -> Span {
    Span { kind, start: if ENABLED.load(Ordering::Relaxed) { Some(Instant::now()) } else { None } }
}

pub struct Span {
    kind: Kind,
    start: Option<Instant>,
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(s) = self.start {
            NANOS[self.kind as usize].fetch_add(s.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }
}
