//! The `.npz` training-set reader: a NumPy archive whose members `x.npy` and `y.npy` are
//! arbitrary bytes (the archive itself is well formed, so that every input reaches the `.npy`
//! header and data parsing; the `data` target feeds whole arbitrary files). Input layout: a
//! little-endian u16 `n`, then `x.npy` (the next `n` bytes, or what is left), then `y.npy`.
//!
//! Besides "never panics" (nor aborts: a header that declares an enormous shape must be
//! refused before anything of that size is allocated), a loaded set is checked and chunked.
#![no_main]

use lca::data::Dataset;
use lca::net::LossKind;
use lca::spec::DataSpec;
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::path::PathBuf;
use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

fn spec() -> DataSpec {
    DataSpec {
        train: PathBuf::from("train.npz"),
        x: "x".into(),
        y: "y".into(),
        tokens: None,
        scale: None,
        mean: None,
        std: None,
        validation: None,
    }
}

/// A stored (uncompressed) zip archive holding `x.npy` and `y.npy`.
fn archive(x: &[u8], y: &[u8]) -> Vec<u8> {
    let mut z = ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    for (name, bytes) in [("x.npy", x), ("y.npy", y)] {
        z.start_file(name, opts).expect("zip member");
        z.write_all(bytes).expect("zip write");
    }
    z.finish().expect("zip finish").into_inner()
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = u16::from_le_bytes([data[0], data[1]]) as usize;
    let rest = &data[2..];
    let (x, y) = rest.split_at(n.min(rest.len()));
    let dir = std::env::temp_dir().join(format!("lca-fuzz-npz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("train.npz");
    if std::fs::write(&path, archive(x, y)).is_err() {
        return;
    }
    for loss in [LossKind::CrossEntropy, LossKind::Mse] {
        if let Ok(d) = Dataset::load(&path, &spec(), None, loss) {
            let _ = d.check_targets(&[3], loss);
            let n = d.len();
            let _ = d.chunk(0, n.min(2));
        }
    }
});
