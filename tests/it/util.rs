//! Helpers shared by the integration tests: run the real binary, read outputs and oracles.

use assert_cmd::Command;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Path of a file under `fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Path of a file in the repository (`docs/examples/…`, `fixtures/…`).
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The `lca` binary.
pub fn lca() -> Command {
    Command::cargo_bin("lca").expect("binary built")
}

/// `lca analyze CKPTS --spec SPEC -o OUT EXTRA…` as a command: the one way the tests run an
/// analysis (every helper below builds on it; `resume` and `shard` add environment variables
/// or run it in the background).
pub fn analyze_cmd(ckpts: &Path, spec: &Path, out: &Path, extra: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(assert_cmd::cargo::cargo_bin("lca"));
    c.arg("analyze")
        .arg(ckpts)
        .arg("--spec")
        .arg(spec)
        .arg("-o")
        .arg(out)
        .args(extra);
    c
}

/// Run [`analyze_cmd`] to completion; returns the output whatever the outcome.
pub fn analyze_run(ckpts: &Path, spec: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::from_std(analyze_cmd(ckpts, spec, out, extra))
        .output()
        .expect("runs")
}

/// As [`analyze_run`], and panics with stderr unless the analysis succeeded.
pub fn analyze_ok(ckpts: &Path, spec: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let o = analyze_run(ckpts, spec, out, extra);
    assert!(
        o.status.success(),
        "lca analyze {} --spec {} failed: {}",
        ckpts.display(),
        spec.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Run `lca analyze` on a fixture directory (`fixtures/<name>/ckpts` with `model.toml`) into
/// `out`, with extra arguments; panics with stderr on failure.
pub fn analyze(name: &str, out: &Path, extra: &[&str]) -> std::process::Output {
    analyze_ok(
        &fixture(&format!("{name}/ckpts")),
        &fixture(&format!("{name}/model.toml")),
        out,
        extra,
    )
}

/// Parse a JSON file.
pub fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Rows of a CSV file as maps from column to string.
pub fn csv_rows(path: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = csv::Reader::from_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    r.deserialize().map(|x| x.expect("csv row")).collect()
}

/// Rows of CSV text (e.g. `summarize --format csv` output).
pub fn csv_rows_str(text: &str) -> Vec<std::collections::HashMap<String, String>> {
    let mut r = csv::Reader::from_reader(text.as_bytes());
    r.deserialize().map(|x| x.expect("csv row")).collect()
}

/// Numbers of a JSON array.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

/// Read `tensors.csv` into (step, tensor) → lca.
pub fn tensor_steps(out: &Path) -> std::collections::HashMap<(u64, String), f64> {
    csv_rows(&out.join("tensors.csv"))
        .into_iter()
        .map(|r| {
            (
                (r["step"].parse().unwrap(), r["tensor"].clone()),
                r["lca"].parse().unwrap(),
            )
        })
        .collect()
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub struct T {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl T {
    pub fn f32(name: &str, shape: &[usize], v: &[f32]) -> T {
        T {
            name: name.into(),
            dtype: safetensors::Dtype::F32,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn i64(name: &str, shape: &[usize], v: &[i64]) -> T {
        T {
            name: name.into(),
            dtype: safetensors::Dtype::I64,
            shape: shape.to_vec(),
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// Write a safetensors file with optional `step` metadata.
pub fn write_st(path: &Path, tensors: &[T], step: Option<u64>) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
            )
        })
        .collect();
    let meta = step.map(|s| std::collections::HashMap::from([("step".to_string(), s.to_string())]));
    safetensors::tensor::serialize_to_file(views, meta, path).unwrap();
}

/// A tiny, valid problem in a temp dir: Linear(4→3) on 10 samples, 3 checkpoints.
/// Returns (tempdir, ckpt dir, spec path).
pub struct Tiny {
    pub dir: tempfile::TempDir,
    pub ckpts: PathBuf,
    pub spec: PathBuf,
}

pub const TINY_SPEC: &str = r#"[[layers]]
name = "fc"
type = "linear"
in_features = 4
out_features = 3

[loss]
type = "cross_entropy"

[data]
train = "train.safetensors"

[eval]
chunk_size = 4
"#;

/// Parameters of tiny checkpoint `k` (deterministic, different per k).
pub fn tiny_params(k: usize) -> (Vec<f32>, Vec<f32>) {
    let w: Vec<f32> = (0..12)
        .map(|i| ((i * 7 + k * 3) % 11) as f32 * 0.1 - 0.5)
        .collect();
    let b: Vec<f32> = (0..3).map(|i| (i + k) as f32 * 0.05).collect();
    (w, b)
}

pub fn tiny_x() -> Vec<f32> {
    (0..40).map(|i| ((i * 13) % 17) as f32 / 17.0).collect()
}

pub fn tiny() -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    let ckpts = dir.path().join("ckpts");
    std::fs::create_dir(&ckpts).unwrap();
    for k in 0..3 {
        let (w, b) = tiny_params(k);
        write_st(
            &ckpts.join(format!("ckpt_{k}.safetensors")),
            &[
                T::f32("fc.weight", &[3, 4], &w),
                T::f32("fc.bias", &[3], &b),
            ],
            Some(k as u64),
        );
    }
    let y: Vec<i64> = (0..10).map(|i| i % 3).collect();
    write_st(
        &dir.path().join("train.safetensors"),
        &[T::f32("x", &[10, 4], &tiny_x()), T::i64("y", &[10], &y)],
        None,
    );
    let spec = dir.path().join("model.toml");
    std::fs::write(&spec, TINY_SPEC).unwrap();
    Tiny { dir, ckpts, spec }
}

impl Tiny {
    /// Run analyze on this problem into `out/`; returns the output.
    pub fn run(&self, extra: &[&str]) -> std::process::Output {
        self.run_to(&self.dir.path().join("out"), extra)
    }

    /// Run analyze on this problem into `out`; returns the output.
    pub fn run_to(&self, out: &Path, extra: &[&str]) -> std::process::Output {
        let args: Vec<&str> = std::iter::once("--quiet")
            .chain(extra.iter().copied())
            .collect();
        analyze_run(&self.ckpts, &self.spec, out, &args)
    }
}

/// Assert a failed run whose stderr contains every needle; returns stderr.
pub fn fails_with(o: &std::process::Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert_eq!(o.status.code(), Some(2), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    for n in needles {
        assert!(err.contains(n), "stderr lacks {n:?}: {err}");
    }
    if std::env::var_os("LCA_SHOW_ERRORS").is_some() {
        let test = std::thread::current().name().unwrap_or("?").to_string();
        eprintln!("[{test}] {}", err.trim_end());
    }
    err
}

/// Write a safetensors file from a hand-made header (a JSON object) and data section, to
/// build files the library would refuse to write.
pub fn write_raw_st(path: &Path, header: &Value, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// Little-endian bytes of f32 values.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Assert that a directory holds no file under an output's final name (only hidden
/// temporary files and the journal, if anything).
pub fn no_visible_outputs(out: &Path) {
    let left: Vec<String> = std::fs::read_dir(out)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        left.iter().all(|n| n.starts_with('.')),
        "left behind: {left:?}"
    );
}

/// A `.npy` file: the version 1.0 header holding `header` (a Python dict literal, padded as
/// NumPy pads it), then `data`. Used to build files NumPy would not write.
pub fn npy(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(h.as_bytes());
    b.extend_from_slice(data);
    b
}

/// CRC-32 (IEEE), as zip archives record it.
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 == 1 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A zip archive (what `.npz` is) holding `members` uncompressed.
pub fn stored_zip(members: &[(&str, &[u8])]) -> Vec<u8> {
    let (mut out, mut central) = (Vec::new(), Vec::new());
    let le16 = |v: &mut Vec<u8>, x: u16| v.extend_from_slice(&x.to_le_bytes());
    let le32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
    for (name, data) in members {
        let (offset, crc, size) = (out.len() as u32, crc32(data), data.len() as u32);
        le32(&mut out, 0x0403_4b50);
        for x in [20, 0, 0, 0, 0] {
            le16(&mut out, x); // version, flags, method (stored), time, date
        }
        for x in [crc, size, size] {
            le32(&mut out, x);
        }
        le16(&mut out, name.len() as u16);
        le16(&mut out, 0);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        le32(&mut central, 0x0201_4b50);
        for x in [20, 20, 0, 0, 0, 0] {
            le16(&mut central, x); // made by, needed, flags, method, time, date
        }
        for x in [crc, size, size] {
            le32(&mut central, x);
        }
        for x in [name.len() as u16, 0, 0, 0, 0] {
            le16(&mut central, x); // name, extra, comment, disk, internal attributes
        }
        le32(&mut central, 0); // external attributes
        le32(&mut central, offset);
        central.extend_from_slice(name.as_bytes());
    }
    let (cd_offset, cd_size) = (out.len() as u32, central.len() as u32);
    out.extend_from_slice(&central);
    le32(&mut out, 0x0605_4b50);
    for x in [0, 0, members.len() as u16, members.len() as u16] {
        le16(&mut out, x);
    }
    le32(&mut out, cd_size);
    le32(&mut out, cd_offset);
    le16(&mut out, 0);
    out
}

/// Deterministic numbers in [0, 1) (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}
