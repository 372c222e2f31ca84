//! Builds Loft's hand-written kernels (worker/kernels/*.cu) twice:
//! - always, for the CPU emulation (cpu_emulation.h) with the host C++ compiler, into a static
//!   library whose `emu_*` entry points the tests launch (so every change to a kernel is tested
//!   here and in CI without a GPU);
//! - with the `cuda` feature, to PTX with nvcc (embedded in the binary, loaded at run time), so
//!   that a kernel compile error shows on the CPU machines rather than on a GPU.

use std::path::PathBuf;
use std::process::Command;

/// The kernel files the GPU build compiles to PTX (emulation.cpp includes each of them too).
const KERNELS: &[&str] = &["norm", "attention", "optim", "lowrank", "cayley"];

fn main() {
    let dir = PathBuf::from("kernels");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC_CCBIN");

    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .warnings(false)
        .include(&dir)
        .file(dir.join("emulation.cpp"))
        .compile("loft_kernels_emu");

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
        let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
        let cap = cap.trim_end_matches(|c: char| c.is_ascii_alphabetic());
        let nvcc = std::env::var("CUDA_HOME").map(|h| format!("{h}/bin/nvcc")).unwrap_or_else(|_| "nvcc".into());
        for name in KERNELS {
            let mut cmd = Command::new(&nvcc);
            cmd.args(["--ptx", "-O3", "-std=c++17"])
                .arg(format!("-arch=compute_{cap}"))
                .arg("-I")
                .arg(&dir)
                .arg("-o")
                .arg(out.join(format!("{name}.ptx")))
                .arg(dir.join(format!("{name}.cu")));
            if let Ok(ccbin) = std::env::var("NVCC_CCBIN") {
                cmd.args(["-allow-unsupported-compiler", "-ccbin", &ccbin]);
            }
            let status = cmd.status().unwrap_or_else(|e| panic!("running {nvcc} for kernels/{name}.cu: {e} (the cuda feature needs nvcc: scripts/build-cuda.sh)"));
            assert!(status.success(), "nvcc failed on kernels/{name}.cu");
            // ptxas as the driver's JIT will run it: registers, shared memory, spills.
            let ptxas = std::path::Path::new(&nvcc).with_file_name("ptxas");
            let status = Command::new(&ptxas)
                .arg(format!("-arch=sm_{cap}"))
                .arg(out.join(format!("{name}.ptx")))
                .args(["-o", "/dev/null"])
                .status()
                .unwrap_or_else(|e| panic!("running {}: {e}", ptxas.display()));
            assert!(status.success(), "ptxas failed on kernels/{name}.cu's PTX");
        }
    }
}
