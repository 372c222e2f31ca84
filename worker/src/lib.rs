pub mod linalg;
pub mod lora_file;
pub mod networks;

pub fn version() -> &'static str { env!("CARGO_PKG_VERSION") }
