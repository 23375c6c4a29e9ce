//! The resume journal of `lca analyze`: `OUT/.lca-resume/`.
//!
//! - `manifest.json`, written when a run starts: what the results depend on — the lca
//!   version, the spec's and data sets' sha256, the integration options, whether and how
//!   `lca.safetensors` is written, the selected checkpoints (file name and step) and the
//!   parameter tensors. `--resume` rebuilds it from the current inputs and refuses to continue
//!   when anything differs.
//! - `state.bin`, rewritten atomically (temporary file, fsync, rename) after finished steps:
//!   the exact f64 running totals (per-parameter LCA sums, helped/hurt step counts, held-out
//!   and L2 sums), every finished step's record, the sha256 of each checkpoint read so far,
//!   and the byte length of each streamed `.partial` table at that point. The streamed files
//!   are fsynced before the state that describes them is written, so after a crash or a power
//!   loss the state never describes data that is not on disk.
//! - `commit.json`, written just before the finished outputs are renamed into place, so that
//!   an interrupted rename is completed by the next run.
//!
//! `state.bin` is a magic line, a little-endian u64 length, a JSON header (the records and
//! scalars; `serde_json` is built with `float_roundtrip`, so every f64 reads back bit for
//! bit), the per-parameter arrays as little-endian binary, and a sha256 of all of it.

use crate::error::{LcaError, Result};
use crate::lca::Integration;
use crate::output::tensors::StoreDtype;
use crate::output::{ParamTotals, StepRecord};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::output::JOURNAL_MANIFEST as MANIFEST;
/// Name of the journal directory inside the output directory (lca's state directory, which
/// the writers also use for their commit marker).
pub use crate::output::STATE_DIR as DIR;
const STATE: &str = "state.bin";
/// Version of the journal layout.
const FORMAT: u32 = 1;
const MAGIC: &[u8; 16] = b"lca-resume-st-1\n";

/// A selected checkpoint, as the manifest records it (by file name, so that a moved
/// directory can still be resumed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestCheckpoint {
    pub file: String,
    pub step: u64,
}

/// Everything the results of a run depend on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub lca_version: String,
    pub spec_sha256: String,
    pub data_sha256: String,
    pub validation_sha256: Option<String>,
    pub integration: Integration,
    /// Arithmetic of the evaluator (`f32` or `f64`): it changes the results.
    #[serde(default)]
    pub precision: String,
    /// Whether Simpson steps share the first layer between their points (it changes the
    /// results within rounding).
    #[serde(default)]
    pub shared_first_layer: bool,
    /// Element type of `lca.safetensors`, `None` when it is not written.
    pub lca_tensors: Option<StoreDtype>,
    pub checkpoints: Vec<ManifestCheckpoint>,
    /// Parameter tensors (name, shape), model order.
    pub params: Vec<(String, Vec<usize>)>,
    /// The foreign engine that evaluated (`--engine torch`); `None`: the built-in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<crate::output::EngineInfo>,
    /// The row order of the evaluation chunks (batch-stats batch norm only; file order
    /// otherwise, and in journals written before the option existed).
    #[serde(default)]
    pub data_order: crate::data::DataOrder,
}

impl Manifest {
    /// A manifest for the current version of lca.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spec_sha256: &str,
        data_sha256: &str,
        validation_sha256: Option<&str>,
        integration: Integration,
        precision: &str,
        shared_first_layer: bool,
        lca_tensors: Option<StoreDtype>,
        checkpoints: Vec<ManifestCheckpoint>,
        params: Vec<(String, Vec<usize>)>,
    ) -> Manifest {
        Manifest {
            format: FORMAT,
            lca_version: env!("CARGO_PKG_VERSION").into(),
            spec_sha256: spec_sha256.into(),
            data_sha256: data_sha256.into(),
            validation_sha256: validation_sha256.map(String::from),
            integration,
            precision: precision.into(),
            shared_first_layer,
            lca_tensors,
            checkpoints,
            params,
            engine: None,
            data_order: crate::data::DataOrder::File,
        }
    }

    /// What differs between the interrupted run (`self`) and now, in words.
    pub fn differences(&self, now: &Manifest) -> Vec<String> {
        let mut d = Vec::new();
        let short = |s: &str| s.chars().take(12).collect::<String>();
        if self.format != now.format || self.lca_version != now.lca_version {
            d.push(format!(
                "it was started by lca {} (journal format {}), this is lca {} (format {})",
                self.lca_version, self.format, now.lca_version, now.format
            ));
        }
        if self.spec_sha256 != now.spec_sha256 {
            d.push(format!(
                "the spec changed (sha256 {}… then, {}… now)",
                short(&self.spec_sha256),
                short(&now.spec_sha256)
            ));
        }
        if self.data_sha256 != now.data_sha256 {
            d.push(format!(
                "the training set changed (sha256 {}… then, {}… now)",
                short(&self.data_sha256),
                short(&now.data_sha256)
            ));
        }
        if self.validation_sha256 != now.validation_sha256 {
            d.push("the validation set changed".into());
        }
        if self.engine != now.engine {
            let e = |e: &Option<crate::output::EngineInfo>| match e {
                None => "the built-in engine".to_string(),
                Some(e) => format!(
                    "--engine {} on {} in {} (PyTorch {}, chunks of {}, model {})",
                    e.name, e.device, e.precision, e.torch, e.chunk_size, e.model
                ),
            };
            d.push(format!(
                "the engine changed ({} then, {} now)",
                e(&self.engine),
                e(&now.engine)
            ));
        }
        if self.data_order != now.data_order {
            d.push(format!(
                "the batch-stats evaluation order was {}, now {}",
                self.data_order.flags(),
                now.data_order.flags()
            ));
        }
        if self.precision != now.precision {
            d.push(format!(
                "--precision was {}, now {}",
                self.precision, now.precision
            ));
        }
        if self.shared_first_layer != now.shared_first_layer {
            let how = |s: bool| {
                if s {
                    "shared"
                } else {
                    "not shared (--no-share-first-layer)"
                }
            };
            d.push(format!(
                "the first layer was {}, now {}",
                how(self.shared_first_layer),
                how(now.shared_first_layer)
            ));
        }
        let (a, b) = (&self.integration, &now.integration);
        let mut opt = |name: &str, then: String, now: String| {
            if then != now {
                d.push(format!("{name} was {then}, now {now}"));
            }
        };
        let method = |m: crate::lca::Method| {
            use clap::ValueEnum;
            m.to_possible_value()
                .map_or_else(|| format!("{m:?}"), |v| v.get_name().to_string())
        };
        opt("--method", method(a.method), method(b.method));
        opt(
            "adaptive refinement (--no-adaptive)",
            a.adaptive.to_string(),
            b.adaptive.to_string(),
        );
        opt(
            "--tolerance",
            format!("{:e}", a.abs_tol),
            format!("{:e}", b.abs_tol),
        );
        opt(
            "--rel-tolerance",
            format!("{:?}", a.rel_tol),
            format!("{:?}", b.rel_tol),
        );
        opt(
            "--max-splits",
            a.max_splits.to_string(),
            b.max_splits.to_string(),
        );
        opt(
            "--policy",
            format!("{:?}", a.policy).to_lowercase(),
            format!("{:?}", b.policy).to_lowercase(),
        );
        opt(
            "--target",
            format!("{:e}", a.target),
            format!("{:e}", b.target),
        );
        opt(
            "--max-evals-factor",
            a.max_evals_factor.to_string(),
            b.max_evals_factor.to_string(),
        );
        let conv = |c: Option<f64>| c.map_or_else(|| "off".to_string(), |r| format!("{r:e}"));
        opt(
            "--converge-layers",
            conv(a.converge_layers),
            conv(b.converge_layers),
        );
        let store = |s: Option<StoreDtype>| match s {
            None => "--no-lca-tensors".to_string(),
            Some(StoreDtype::F32) => "--lca-dtype f32".to_string(),
            Some(StoreDtype::F64) => "--lca-dtype f64".to_string(),
        };
        opt(
            "lca.safetensors",
            store(self.lca_tensors),
            store(now.lca_tensors),
        );
        if self.checkpoints != now.checkpoints {
            let mut parts = Vec::new();
            let new: Vec<_> = now
                .checkpoints
                .iter()
                .filter(|c| !self.checkpoints.contains(c))
                .map(|c| format!("{} (step {})", c.file, c.step))
                .collect();
            let gone: Vec<_> = self
                .checkpoints
                .iter()
                .filter(|c| !now.checkpoints.contains(c))
                .map(|c| format!("{} (step {})", c.file, c.step))
                .collect();
            if !new.is_empty() {
                parts.push(format!("now also {}", list(&new)));
            }
            if !gone.is_empty() {
                parts.push(format!("no longer {}", list(&gone)));
            }
            d.push(format!(
                "the selected checkpoints differ: {} checkpoints then, {} now; {} (--first/--last/--every must select the same files as before)",
                self.checkpoints.len(),
                now.checkpoints.len(),
                parts.join("; ")
            ));
        }
        if self.params != now.params {
            d.push("the model's parameter tensors differ".into());
        }
        d
    }
}

fn list(v: &[String]) -> String {
    if v.len() <= 4 {
        v.join(", ")
    } else {
        format!("{}, … ({} in all)", v[..3].join(", "), v.len())
    }
}

/// What a run has accumulated over its finished steps: enough to continue it.
#[derive(Debug, Clone)]
pub struct RunState {
    /// One record per finished step, in order.
    pub records: Vec<StepRecord>,
    /// sha256 of checkpoints `0..=records.len()` (those read so far).
    pub checkpoint_sha256: Vec<String>,
    pub loss_first: f64,
    pub val_first: Option<f64>,
    /// λ‖θ‖² at the first checkpoint, with an L2 term.
    pub l2_first: Option<f64>,
    /// Tensors of the first checkpoint the model does not use.
    pub ignored: Vec<String>,
    pub totals: ParamTotals,
}

impl RunState {
    /// Number of finished steps.
    pub fn finished(&self) -> usize {
        self.records.len()
    }
}

#[derive(Serialize, Deserialize)]
struct StateHeader {
    records: Vec<StepRecord>,
    checkpoint_sha256: Vec<String>,
    loss_first: f64,
    val_first: Option<f64>,
    l2_first: Option<f64>,
    ignored: Vec<String>,
    /// Streamed files (name inside OUT) and their byte length when the state was written.
    files: Vec<(String, u64)>,
    /// sha256 of each streamed file's first `length` bytes (same order as `files`), so that
    /// `--resume` refuses a table whose finished rows were edited since.
    #[serde(default)]
    files_sha256: Vec<String>,
    /// Elements per parameter tensor.
    numel: Vec<usize>,
    val: bool,
    l2: bool,
    /// Sums of squared error estimates (the budget policy); absent in older journals.
    #[serde(default)]
    err_sq: Option<crate::output::ErrSquares>,
}

fn jerr(path: &Path, msg: impl Into<String>) -> LcaError {
    LcaError::Output {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Write `bytes` to `path` atomically, replacing it ([`crate::files`]' rules).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::files::write_atomic(path, bytes, crate::files::Mode::Replace)
}

fn encode_state(
    state: &RunState,
    files: &[(String, u64)],
    files_sha256: Vec<String>,
) -> Result<Vec<u8>> {
    let t = &state.totals;
    let header = StateHeader {
        records: state.records.clone(),
        checkpoint_sha256: state.checkpoint_sha256.clone(),
        loss_first: state.loss_first,
        val_first: state.val_first,
        l2_first: state.l2_first,
        ignored: state.ignored.clone(),
        files: files.to_vec(),
        files_sha256,
        numel: t.lca.iter().map(Vec::len).collect(),
        val: t.val_lca.is_some(),
        l2: t.l2_lca.is_some(),
        err_sq: t.err_sq.clone(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| LcaError::Output {
        path: PathBuf::from(STATE),
        msg: format!("cannot encode the resume state: {e}"),
    })?;
    let numel: usize = header.numel.iter().sum();
    let mut b = Vec::with_capacity(64 + json.len() + numel * 32);
    b.extend_from_slice(MAGIC);
    b.extend_from_slice(&(json.len() as u64).to_le_bytes());
    b.extend_from_slice(&json);
    let f64s = |b: &mut Vec<u8>, v: &[Vec<f64>]| {
        for x in v.iter().flatten() {
            b.extend_from_slice(&x.to_le_bytes());
        }
    };
    f64s(&mut b, &t.lca);
    for v in [&t.helped_steps, &t.hurt_steps] {
        for x in v.iter().flatten() {
            b.extend_from_slice(&x.to_le_bytes());
        }
    }
    if let Some(v) = &t.val_lca {
        f64s(&mut b, v);
    }
    if let Some(v) = &t.l2_lca {
        f64s(&mut b, v);
    }
    let digest = crate::tensors::sha256(&b);
    b.extend_from_slice(&digest);
    Ok(b)
}

/// Reads little-endian values from a byte slice.
struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.b.len() < n {
            return None;
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Some(a)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn f64s(&mut self, numel: &[usize]) -> Option<Vec<Vec<f64>>> {
        numel
            .iter()
            .map(|&n| {
                let raw = self.take(n.checked_mul(8)?)?;
                Some(
                    raw.chunks_exact(8)
                        .map(|c| {
                            f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]])
                        })
                        .collect(),
                )
            })
            .collect()
    }
    fn u32s(&mut self, numel: &[usize]) -> Option<Vec<Vec<u32>>> {
        numel
            .iter()
            .map(|&n| {
                let raw = self.take(n.checked_mul(4)?)?;
                Some(
                    raw.chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                )
            })
            .collect()
    }
}

/// A decoded state: the run state, the streamed files' lengths and their sha256.
type Decoded = (RunState, Vec<(String, u64)>, Vec<String>);

fn decode_state(path: &Path, bytes: &[u8]) -> Result<Decoded> {
    let corrupt = |what: &str| {
        jerr(
            path,
            format!(
                "the resume state is unreadable ({what}); delete the journal directory to start over"
            ),
        )
    };
    if bytes.len() < MAGIC.len() + 8 + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err(corrupt("not an lca resume state"));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if crate::tensors::sha256(body).as_slice() != digest {
        return Err(corrupt("checksum mismatch"));
    }
    let mut r = Reader {
        b: &body[MAGIC.len()..],
    };
    let n = r.u64().ok_or_else(|| corrupt("short"))?;
    let json = usize::try_from(n)
        .ok()
        .and_then(|n| r.take(n))
        .ok_or_else(|| corrupt("short"))?;
    let h: StateHeader =
        serde_json::from_slice(json).map_err(|e| corrupt(&format!("header: {e}")))?;
    let lca = r.f64s(&h.numel).ok_or_else(|| corrupt("short"))?;
    let helped_steps = r.u32s(&h.numel).ok_or_else(|| corrupt("short"))?;
    let hurt_steps = r.u32s(&h.numel).ok_or_else(|| corrupt("short"))?;
    let val_lca = if h.val {
        Some(r.f64s(&h.numel).ok_or_else(|| corrupt("short"))?)
    } else {
        None
    };
    let l2_lca = if h.l2 {
        Some(r.f64s(&h.numel).ok_or_else(|| corrupt("short"))?)
    } else {
        None
    };
    if !r.b.is_empty()
        || h.checkpoint_sha256.len() != h.records.len() + 1
        || !(h.files_sha256.is_empty() || h.files_sha256.len() == h.files.len())
    {
        return Err(corrupt("inconsistent lengths"));
    }
    Ok((
        RunState {
            records: h.records,
            checkpoint_sha256: h.checkpoint_sha256,
            loss_first: h.loss_first,
            val_first: h.val_first,
            l2_first: h.l2_first,
            ignored: h.ignored,
            totals: ParamTotals {
                lca,
                helped_steps,
                hurt_steps,
                val_lca,
                l2_lca,
                err_sq: h.err_sq,
            },
        },
        h.files,
        h.files_sha256,
    ))
}

/// sha256 of the first `len` bytes of `path` (hex).
fn prefix_sha256(path: &Path, len: u64) -> Result<String> {
    use sha2::Digest;
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| LcaError::io(path, e))?;
    let mut h = sha2::Sha256::new();
    let mut r = std::io::BufReader::with_capacity(1 << 20, f.take(len));
    let mut buf = vec![0u8; 1 << 20];
    let mut n_read = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(|e| LcaError::io(path, e))?;
        if n == 0 {
            break;
        }
        n_read += n as u64;
        h.update(&buf[..n]);
    }
    if n_read != len {
        return Err(jerr(
            path,
            format!("holds {n_read} bytes, fewer than the {len} the resume journal recorded"),
        ));
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What an output directory's journal holds.
pub struct Found {
    pub manifest: Manifest,
    /// The last saved state and the streamed files' lengths, if any step was saved.
    pub state: Option<(RunState, Vec<(String, u64)>)>,
    /// sha256 of the streamed files' first `length` bytes when the state was saved.
    pub files_sha256: Vec<String>,
}

impl Found {
    /// Check that the rows the interrupted run wrote to its streamed tables in `out` are
    /// those it journaled (sha256 recorded when the state was saved): an edited finished row
    /// is refused, never carried into the final tables.
    pub fn verify_tables(&self, out: &Path) -> Result<()> {
        let Some((_, files)) = &self.state else {
            return Ok(());
        };
        for ((name, len), then) in files.iter().zip(&self.files_sha256) {
            let p = out.join(name);
            let now = prefix_sha256(&p, *len)?;
            if now != *then {
                return Err(jerr(
                    &p,
                    format!(
                        "its first {len} bytes (the rows of the finished steps) changed since the interrupted run wrote them (sha256 {}… then, {}… now): cannot resume; delete {} to start over",
                        &then[..then.len().min(12)],
                        &now[..12],
                        Journal::dir_of(out).display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The journal of the run in progress.
pub struct Journal {
    dir: PathBuf,
    /// Finished steps in the saved state (0: none saved).
    saved: usize,
    last_save: Instant,
    last_cost: Duration,
}

impl Journal {
    /// The journal directory of an output directory.
    pub fn dir_of(out: &Path) -> PathBuf {
        out.join(DIR)
    }

    /// Read the journal of `out`, if there is one with a manifest.
    pub fn read(out: &Path) -> Result<Option<Found>> {
        let dir = Journal::dir_of(out);
        let mpath = dir.join(MANIFEST);
        if !mpath.is_file() {
            return Ok(None);
        }
        let text = std::fs::read(&mpath).map_err(|e| LcaError::io(&mpath, e))?;
        let manifest: Manifest = serde_json::from_slice(&text).map_err(|e| {
            jerr(
                &mpath,
                format!(
                    "unreadable resume manifest ({e}); delete the journal directory to start over"
                ),
            )
        })?;
        let spath = dir.join(STATE);
        let (state, files_sha256) = if spath.is_file() {
            let bytes = std::fs::read(&spath).map_err(|e| LcaError::io(&spath, e))?;
            let (s, files, sums) = decode_state(&spath, &bytes)?;
            (Some((s, files)), sums)
        } else {
            (None, Vec::new())
        };
        Ok(Some(Found {
            manifest,
            state,
            files_sha256,
        }))
    }

    /// Start a fresh journal (any previous one is removed).
    pub fn create(out: &Path, manifest: &Manifest) -> Result<Journal> {
        let dir = Journal::dir_of(out);
        crate::output::remove_state_dir(out)?;
        crate::files::create_dir_all(&dir)?;
        let json = serde_json::to_vec_pretty(manifest).map_err(|e| LcaError::Output {
            path: dir.join(MANIFEST),
            msg: e.to_string(),
        })?;
        let t0 = Instant::now();
        write_atomic(&dir.join(MANIFEST), &json)?;
        Ok(Journal {
            dir,
            saved: 0,
            last_save: Instant::now(),
            // Until the first save, the manifest's atomic write (a file and a directory
            // fsync, as the state's) stands for a save's cost.
            last_cost: t0.elapsed(),
        })
    }

    /// Continue the journal of a resumed run whose saved state has `saved` finished steps.
    pub fn resume(out: &Path, saved: usize) -> Journal {
        Journal {
            dir: Journal::dir_of(out),
            saved,
            last_save: Instant::now(),
            last_cost: Duration::ZERO,
        }
    }

    /// Finished steps in the saved state.
    pub fn saved(&self) -> usize {
        self.saved
    }

    /// The journal directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether saving now keeps the journal's cost bounded: at most about a tenth of the
    /// run's time goes into saving (every step for small models; for large ones, whose state
    /// takes longer to write, every few steps).
    pub fn due(&self) -> bool {
        if crate::files::crash_at().is_some() {
            return true;
        }
        self.last_save.elapsed() >= self.last_cost * 10
    }

    /// Save `state`; `files` are the streamed files' lengths, already flushed to disk. The
    /// save's cost, which [`Journal::due`] bounds, counts from `started`: the caller passes the
    /// moment it began flushing those files, so that their fsyncs count too.
    pub fn save(
        &mut self,
        state: &RunState,
        files: &[(String, u64)],
        started: Instant,
    ) -> Result<()> {
        let out = self.dir.parent().unwrap_or(Path::new("."));
        let sums = files
            .iter()
            .map(|(name, len)| prefix_sha256(&out.join(name), *len))
            .collect::<Result<Vec<_>>>()?;
        let bytes = encode_state(state, files, sums)?;
        write_atomic(&self.dir.join(STATE), &bytes)?;
        self.saved = state.finished();
        self.last_cost = started.elapsed();
        self.last_save = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seed: u64) -> StepRecord {
        // Awkward doubles: full 53-bit mantissas, subnormals, large exponents.
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = f64::from_bits(x);
            if v.is_finite() {
                v
            } else {
                f64::from_bits(x >> 12)
            }
        };
        StepRecord {
            step: seed,
            next_step: seed + 1,
            loss_before: next(),
            loss_after: next(),
            delta_loss: next(),
            lca_sum: next(),
            residual: next(),
            reconstructed_loss: next(),
            splits: 2,
            capped: false,
            evaluations: 2,
            helped: 1,
            zero: 2,
            hurt: 3,
            helped_fraction: next(),
            val_loss_before: Some(next()),
            val_loss_after: None,
            val_lca_sum: Some(5e-324),
            val_residual: Some(-0.0),
            l2_lca: Some(next()),
        }
    }

    #[test]
    fn state_round_trips_bit_for_bit() {
        let state = RunState {
            records: (0..500).map(record).collect(),
            checkpoint_sha256: (0..501).map(|i| format!("{i:064x}")).collect(),
            loss_first: 0.1 + 0.2,
            val_first: Some(std::f64::consts::PI),
            l2_first: None,
            ignored: vec!["bn.running_mean".into()],
            totals: ParamTotals {
                lca: vec![vec![1.0 / 3.0, -2e-308, 1e300], vec![]],
                helped_steps: vec![vec![1, 2, 3], vec![]],
                hurt_steps: vec![vec![4, 5, u32::MAX], vec![]],
                val_lca: Some(vec![vec![0.1, 0.2, 0.3], vec![]]),
                l2_lca: None,
                err_sq: Some(crate::output::ErrSquares {
                    tensors: vec![1.0 / 3.0, 0.0],
                    layers: vec![1e-300],
                }),
            },
        };
        let files = vec![(".steps.csv.partial".to_string(), 1234u64)];
        let sums = vec!["ab".repeat(32)];
        let bytes = encode_state(&state, &files, sums.clone()).unwrap();
        let (back, f, s) = decode_state(Path::new("s"), &bytes).unwrap();
        assert_eq!(f, files);
        assert_eq!(s, sums);
        assert_eq!(back.records, state.records);
        for (a, b) in back.records.iter().zip(&state.records) {
            assert_eq!(a.loss_before.to_bits(), b.loss_before.to_bits());
            assert_eq!(a.residual.to_bits(), b.residual.to_bits());
            assert_eq!(
                a.val_residual.map(f64::to_bits),
                b.val_residual.map(f64::to_bits)
            );
        }
        assert_eq!(back.loss_first.to_bits(), state.loss_first.to_bits());
        assert_eq!(back.totals.lca, state.totals.lca);
        assert_eq!(back.totals.hurt_steps, state.totals.hurt_steps);
        assert_eq!(back.totals.val_lca, state.totals.val_lca);
        // Any damage is detected.
        let mut bad = bytes.clone();
        let k = bad.len() / 2;
        bad[k] ^= 1;
        assert!(decode_state(Path::new("s"), &bad).is_err());
        assert!(decode_state(Path::new("s"), &bytes[..bytes.len() - 1]).is_err());
    }
}
