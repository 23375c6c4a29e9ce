//! The training-set loader on arbitrary bytes, as a `.safetensors` file and as a NumPy
//! `.npz` archive, with both losses and with a reshaping `input_shape`.
#![no_main]

use lca::data::Dataset;
use lca::net::LossKind;
use lca::spec::DataSpec;
use libfuzzer_sys::fuzz_target;
use std::path::PathBuf;

fn spec() -> DataSpec {
    DataSpec {
        train: PathBuf::from("train"),
        x: "x".into(),
        y: "y".into(),
        tokens: None,
        scale: Some(0.5),
        mean: Some(vec![0.25]),
        std: None,
        validation: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("lca-fuzz-data-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    for ext in ["safetensors", "npz"] {
        let path = dir.join(format!("train.{ext}"));
        if std::fs::write(&path, data).is_err() {
            return;
        }
        for loss in [LossKind::CrossEntropy, LossKind::Mse] {
            for shape in [None, Some(&[2usize, 2][..])] {
                if let Ok(d) = Dataset::load(&path, &spec(), shape, loss) {
                    let _ = d.check_targets(&[3], loss);
                    let _ = d.check_targets(&[2, 2], loss);
                    let n = d.len();
                    let _ = d.chunk(0, n.min(2));
                }
            }
        }
    }
});
