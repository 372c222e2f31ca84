//! `loft bench kernels`: the hand-written kernels' device check (`loft_worker::kernels::check`).

use anyhow::Result;

pub fn run(spec: &str, fixtures: &std::path::Path) -> Result<()> {
    loft_worker::kernels::check::run(spec, fixtures)
}
