//! What the CLI tests share: running the `loft` binary and the tiny fixture model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn loft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_loft")).args(args).output().expect("run loft")
}

/// stdout and stderr together.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn tiny_model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny-sd15")
}
