//! Checkpoint headers and loading on arbitrary bytes: `checkpoint::describe_bytes` (what
//! `scan` does to every file) and `checkpoint::load_bytes` (what each step does), with the
//! parameters the header declares and with a fixed model's.
//!
//! Besides "never panics", one property: a file that passes `describe_bytes` is one the
//! safetensors library accepts, so a damaged file is always reported when the directory is
//! listed, before any computation, never half-way through a run.
#![no_main]

use lca::checkpoint::{describe_bytes, load_bytes};
use lca::net::ParamInfo;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fn param(name: &str, shape: &[usize]) -> ParamInfo {
    ParamInfo {
        name: name.into(),
        layer: "fc".into(),
        role: "weight".into(),
        shape: shape.to_vec(),
        buffer: false,
        aliases: Vec::new(),
    }
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("ckpt_7.safetensors");
    let Ok(file) = describe_bytes(path, data) else {
        return;
    };
    if let Err(e) = safetensors::SafeTensors::deserialize(data) {
        panic!("describe_bytes accepted a file safetensors rejects: {e}");
    }
    let declared: Vec<ParamInfo> = file
        .tensors
        .iter()
        .map(|t| param(&t.name, &t.shape))
        .collect();
    let _ = load_bytes(&file, data, &declared);
    let fixed = [param("fc.weight", &[3, 4]), param("fc.bias", &[3])];
    let _ = load_bytes(&file, data, &fixed);
});
