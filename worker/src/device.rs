//! Which device a run computes on: `auto`, `cpu`, `cuda` or `cuda:N`, and the precision that
//! device prefers.
//!
//! The CUDA backend exists only in binaries built with the `cuda` cargo feature (candle links
//! the CUDA libraries, so such a binary does not start without them); a CPU-only binary asked
//! for `cuda` says how to get one. `auto` takes the GPU when the binary has CUDA and a device
//! answers, otherwise the CPU.

use anyhow::{bail, Result};
use candle_core::Device;

/// How to get a binary that can use a GPU.
pub const CUDA_BUILD_HINT: &str =
    "this Loft binary was built without CUDA: build the CUDA one with `cargo build --release --features cuda` (README, \"GPU\") and run it on the GPU machine";

/// The device `spec` names, and one line that says which was taken and why.
pub fn select(spec: &str) -> Result<(Device, String)> {
    let spec = spec.trim();
    match spec {
        "" | "auto" => Ok(match cuda(0) {
            Ok(d) => {
                let line = format!("device: {} (auto: a CUDA device answered)", describe(&d));
                (d, line)
            }
            Err(why) => (Device::Cpu, format!("device: cpu (auto: {why})")),
        }),
        "cpu" => Ok((Device::Cpu, "device: cpu".to_string())),
        _ => {
            let ordinal = match spec.strip_prefix("cuda") {
                Some("") => 0,
                Some(rest) => match rest.strip_prefix(':').and_then(|n| n.parse::<usize>().ok()) {
                    Some(n) => n,
                    None => bail!("device {spec:?}: expected auto, cpu, cuda or cuda:N"),
                },
                None => bail!("device {spec:?}: expected auto, cpu, cuda or cuda:N"),
            };
            match cuda(ordinal) {
                Ok(d) => {
                    let line = format!("device: {}", describe(&d));
                    Ok((d, line))
                }
                Err(why) => bail!("device {spec}: {why}"),
            }
        }
    }
}

/// `cuda:N` and its name where the backend knows it.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cuda".to_string(),
        },
        Device::Metal(_) => "metal".to_string(),
    }
}

#[cfg(feature = "cuda")]
fn cuda(ordinal: usize) -> Result<Device, String> {
    // candle's CUDA backend needs the driver library; a missing one must be a message, not a
    // panic inside cudarc.
    let driver = ["libcuda.so.1", "libcuda.so"].iter().any(|name| unsafe { !libc_dlopen(name).is_null() });
    if !driver {
        return Err("no CUDA driver (libcuda.so.1) on this machine".to_string());
    }
    Device::new_cuda(ordinal).map_err(|e| format!("no CUDA device {ordinal} answered ({e})"))
}

#[cfg(not(feature = "cuda"))]
fn cuda(_ordinal: usize) -> Result<Device, String> {
    Err(CUDA_BUILD_HINT.to_string())
}

#[cfg(feature = "cuda")]
unsafe fn libc_dlopen(name: &str) -> *mut std::ffi::c_void {
    extern "C" {
        fn dlopen(filename: *const std::ffi::c_char, flag: i32) -> *mut std::ffi::c_void;
    }
    const RTLD_LAZY: i32 = 1;
    let c = std::ffi::CString::new(name).expect("no NUL");
    dlopen(c.as_ptr(), RTLD_LAZY)
}

/// The mixed precision `auto` means on `device`: bf16 on a GPU that has it (compute
/// capability 8.0 and newer), fp16 on an older GPU, none (f32) on the CPU, whose backend has
/// no bf16 matrix multiply and no fast fp16.
pub fn preferred_mixed_precision(device: &Device) -> &'static str {
    match device {
        Device::Cpu => "no",
        Device::Cuda(_) => {
            if cuda_compute_major(device).is_some_and(|major| major >= 8) {
                "bf16"
            } else {
                "fp16"
            }
        }
        Device::Metal(_) => "fp16",
    }
}

#[cfg(feature = "cuda")]
fn cuda_compute_major(device: &Device) -> Option<i32> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
    let Device::Cuda(d) = device else { return None };
    d.cuda_stream().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_compute_major(_device: &Device) -> Option<i32> {
    None
}

/// The device tests run on: CUDA when this binary has it and a device answers (set
/// `LOFT_TEST_DEVICE=cpu` to force the CPU), else the CPU. Prints which, and why, once per
/// call.
pub fn test_device() -> Device {
    let spec = std::env::var("LOFT_TEST_DEVICE").unwrap_or_else(|_| "auto".into());
    match select(&spec) {
        Ok((d, line)) => {
            eprintln!("test {line}");
            d
        }
        Err(e) => {
            eprintln!("test device: cpu ({e:#})");
            Device::Cpu
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_are_parsed_and_cpu_binaries_explain_cuda() {
        assert!(select("cpu").unwrap().0.is_cpu());
        let (d, line) = select("auto").unwrap();
        if cfg!(not(feature = "cuda")) {
            assert!(d.is_cpu());
            assert!(line.contains("--features cuda"), "{line}");
            let e = select("cuda:1").unwrap_err().to_string();
            assert!(e.contains("--features cuda"), "{e}");
        }
        for bad in ["gpu", "cuda:x", "cuda1"] {
            assert!(select(bad).unwrap_err().to_string().contains("expected auto, cpu, cuda or cuda:N"), "{bad}");
        }
        assert_eq!(preferred_mixed_precision(&Device::Cpu), "no");
    }
}
