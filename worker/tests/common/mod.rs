//! Helpers shared by the worker's test binaries (each uses some of them).
#![allow(dead_code)]

pub mod parity;
pub mod tiny_run;

/// A `/proc/self/status` memory figure (`VmRSS:`, `VmHWM:`) in KiB.
pub fn vm_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field).map(|r| r.trim().trim_end_matches("kB").trim().parse().unwrap()))
        .unwrap()
}
