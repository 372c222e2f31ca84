//! (not yet implemented)
use std::collections::HashMap;
use candle_core::{bail, Result, Tensor};
use super::{Adapter, BaseLayer, NetworkOptions};

pub(crate) fn build(opts: &NetworkOptions, base: &BaseLayer, layer: &str, _rank: usize) -> Result<Box<dyn Adapter>> {
    let _ = (opts, base);
    bail!("layer {layer}: diag_oft is not implemented yet")
}

pub(crate) fn from_tensors(opts: &NetworkOptions, base: &BaseLayer, tensors: &HashMap<String, Tensor>, layer: &str) -> Result<Box<dyn Adapter>> {
    let _ = (opts, base, tensors);
    bail!("layer {layer}: diag_oft is not implemented yet")
}
