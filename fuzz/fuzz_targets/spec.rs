//! Spec parsing on arbitrary text: `Spec::parse`, then building the model from the parsed
//! spec for a few input shapes (where shapes that do not chain are reported).
#![no_main]

use lca::net::Model;
use lca::spec::Spec;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = Spec::parse(text, Path::new("runs/model.toml")) else {
        return;
    };
    let _ = spec.train_path();
    let _ = spec.validation_path();
    for shape in [&[4usize][..], &[64], &[1, 8, 8], &[3, 2, 2], &[]] {
        if let Ok(model) = Model::<f32>::build(&spec, shape) {
            let _ = model.num_params();
            let _ = model.output_shape();
        }
    }
});
