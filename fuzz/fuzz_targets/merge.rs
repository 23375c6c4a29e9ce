//! `lca merge` on a part directory built from arbitrary bytes: the input is split into the
//! files of a part (`shard.json`, `summary.json`, `lca.safetensors`, in that order) at each
//! occurrence of the separator line `\n--lca-fuzz-file--\n`, written to a temporary part
//! directory, and merged into a fresh output directory with `lca::shard::merge`.
//!
//! Besides "never panics": a merge that succeeds leaves a `summary.json` that reads back.
#![no_main]

use libfuzzer_sys::fuzz_target;

const SEP: &[u8] = b"\n--lca-fuzz-file--\n";
const FILES: [&str; 3] = ["shard.json", "summary.json", "lca.safetensors"];

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

fuzz_target!(|data: &[u8]| {
    let root = std::env::temp_dir().join(format!("lca-fuzz-merge-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let part = root.join("part");
    let out = root.join("out");
    if std::fs::create_dir_all(&part).is_err() {
        return;
    }
    for (name, bytes) in FILES.iter().zip(split(data)) {
        if std::fs::write(part.join(name), bytes).is_err() {
            return;
        }
    }
    if lca::shard::merge(&[part], &out).is_ok() {
        lca::output::json::read_summary(&out).expect("a merged summary reads back");
    }
});
