//! `lca merge` on a part directory built from arbitrary bytes: the input is split into the
//! files of a part (`shard.json`, `summary.json`, `lca.safetensors`, `tensors.csv` — whose
//! `lca_err` column carries the part's error estimates —, in that order) at each
//! occurrence of the separator line `\n--lca-fuzz-file--\n`, written to a temporary part
//! directory, and merged into a fresh output directory with `lca::shard::merge`.
//!
//! A part records the sha256 of its files in `shard.json` (`files_sha256`), which `merge`
//! checks first; so that fuzzed contents get past that check, the target inserts the sha256
//! of the other fuzzed files into a `shard.json` that ends with `}`
//! and has no `files_sha256` of its own.
//!
//! Besides "never panics": a merge that succeeds leaves a `summary.json` that reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;

const SEP: &[u8] = b"\n--lca-fuzz-file--\n";
const FILES: [&str; 4] = ["shard.json", "summary.json", "lca.safetensors", "tensors.csv"];

fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < FILES.len() {
        match rest.windows(SEP.len()).position(|w| w == SEP) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + SEP.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

/// `shard.json` with the sha256 of the other fuzzed files inserted before its last `}`.
fn with_checksums(files: &[&[u8]]) -> Option<Vec<u8>> {
    let shard = files.first()?;
    let end = shard.iter().rposition(|b| !b.is_ascii_whitespace())?;
    if shard[end] != b'}' || shard.windows(12).any(|w| w == b"files_sha256") {
        return None;
    }
    let sums: Vec<String> = FILES[1..]
        .iter()
        .zip(&files[1..])
        .map(|(name, bytes)| format!("\"{name}\": \"{}\"", lca::tensors::sha256_hex(bytes)))
        .collect();
    let mut out = shard[..end].to_vec();
    out.extend_from_slice(format!(", \"files_sha256\": {{{}}}}}", sums.join(", ")).as_bytes());
    Some(out)
}

fuzz_target!(|data: &[u8]| {
    let root = std::env::temp_dir().join(format!("lca-fuzz-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let part = root.join("part");
    let out = root.join("out");
    if std::fs::create_dir_all(&part).is_err() {
        return;
    }
    let files = split(data);
    for (name, bytes) in FILES.iter().zip(&files) {
        if std::fs::write(part.join(name), bytes).is_err() {
            return;
        }
    }
    if let Some(shard) = with_checksums(&files)
        && std::fs::write(part.join(FILES[0]), shard).is_err()
    {
        return;
    }
    if lca::shard::merge(&[part], &out).is_ok() {
        lca::output::json::read_summary(&out).expect("a merged summary reads back");
    }
});
