//! `lca analyze --engine torch`: the inputs prepared for the PyTorch worker engine
//! ([`crate::engine::torch`]), with a spec or, for a Recorder run, without one; then the same
//! pipeline ([`super::run`]) as the built-in engine.

use super::prepare::{Prepared, check_header};
use super::{AnalyzeOptions, Precision};
use crate::checkpoint;
use crate::data::Dataset;
use crate::engine::{TorchEngine, WorkerConfig};
use crate::error::{LcaError, Result};
use crate::net::batch_norm::BnMode;
use crate::net::{LossKind, Model, Real};
use crate::output::{EngineInfo, Summary};
use crate::spec::{DataSpec, EvalSection, LossSpec, ModelSection, Spec};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The options of `--engine torch`.
#[derive(Debug, Clone, Default)]
pub struct TorchOptions {
    /// `--torch-model`: `file.py:factory`, `package.module:factory`, a `.pt2`, or a run
    /// directory / `lca-run.json`; `None`: the Recorder run the checkpoints belong to.
    pub model: Option<String>,
    /// `--spec` when given (its `[data]`, `[loss]`, batch-norm mode and chunk size apply and
    /// its layer names group the tables); `None`: everything from the Recorder run.
    pub spec: Option<PathBuf>,
    /// `--device`.
    pub device: String,
    /// `--chunk-size`.
    pub chunk_size: Option<usize>,
    /// `--python`.
    pub python: Option<PathBuf>,
}

/// A Recorder run: its directory and manifest.
struct RunDir {
    dir: PathBuf,
    json_path: PathBuf,
    json: Value,
}

/// The Recorder run that `path` is (a run directory or its `lca-run.json`) or whose
/// checkpoint directory it is.
fn find_run(path: &Path) -> Result<Option<RunDir>> {
    let candidates = [
        path.to_path_buf(),
        path.join("lca-run.json"),
        path.parent()
            .map(|p| p.join("lca-run.json"))
            .unwrap_or_default(),
    ];
    for c in candidates {
        if c.is_file() && c.file_name().is_some_and(|n| n == "lca-run.json") {
            let text = std::fs::read_to_string(&c).map_err(|e| LcaError::io(&c, e))?;
            let json: Value = serde_json::from_str(&text).map_err(|e| LcaError::Data {
                path: c.clone(),
                msg: format!("not a Recorder manifest (invalid JSON: {e})"),
            })?;
            let dir = c.parent().map(Path::to_path_buf).unwrap_or_default();
            return Ok(Some(RunDir {
                dir,
                json_path: c,
                json,
            }));
        }
    }
    Ok(None)
}

fn run_str<'a>(run: &'a RunDir, key: &str) -> Option<&'a str> {
    run.json.get(key).and_then(Value::as_str)
}

/// The training set of a Recorder run as a `[data]` table.
fn run_data(run: &RunDir) -> Result<DataSpec> {
    let d = &run.json["data"];
    let (file, x, y, tokens) = match d {
        Value::String(f) => (f.clone(), None, None, None),
        Value::Object(m) => (
            m.get("file")
                .or_else(|| m.get("train"))
                .and_then(Value::as_str)
                .unwrap_or("data/train.safetensors")
                .to_string(),
            m.get("x").and_then(Value::as_str),
            m.get("y").and_then(Value::as_str),
            m.get("tokens").and_then(Value::as_str),
        ),
        _ => {
            return Err(LcaError::Data {
                path: run.json_path.clone(),
                msg: "no `data` entry (the training set)".into(),
            });
        }
    };
    let mut t = json!({"train": run.dir.join(file)});
    if let Some(x) = x {
        t["x"] = json!(x);
    }
    if let Some(y) = y {
        t["y"] = json!(y);
    }
    if let Some(k) = tokens {
        t["tokens"] = json!(k);
    }
    serde_json::from_value(t).map_err(|e| LcaError::Data {
        path: run.json_path.clone(),
        msg: format!("bad `data` entry: {e}"),
    })
}

fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::F64 => "f64",
    }
}

/// Run the analysis with the PyTorch worker engine.
pub(super) fn analyze_torch<T: Real>(
    opts: &AnalyzeOptions,
    t: &TorchOptions,
    note: &mut dyn FnMut(&str),
) -> Result<Summary> {
    let run = match find_run(&opts.ckpt_dir)? {
        Some(r) => Some(r),
        None => match &t.model {
            Some(m) if !m.contains(':') || Path::new(m).exists() => find_run(Path::new(m))?,
            _ => None,
        },
    };
    // The checkpoints: the given directory, or the run's checkpoint directory.
    let mut o = opts.clone();
    if let Some(r) = &run
        && (opts.ckpt_dir == r.dir || opts.ckpt_dir == r.json_path)
    {
        o.ckpt_dir = r
            .dir
            .join(run_str(r, "checkpoints").unwrap_or("checkpoints"));
    }
    let model = match (&t.model, &run) {
        (Some(m), _) => m.clone(),
        (None, Some(r)) => r.json_path.display().to_string(),
        (None, None) => {
            return Err(LcaError::Usage(
                "--engine torch needs the model: --torch-model FILE.py:FACTORY (or package.module:factory, or a Recorder run), or a Recorder run directory (with lca-run.json) as the checkpoints".into(),
            ));
        }
    };
    let mut cfg = WorkerConfig {
        python: t.python.clone(),
        model: model.clone(),
        spec: t.spec.clone(),
        device: t.device.clone(),
        precision: precision_name(o.precision).into(),
        chunk_size: t.chunk_size,
        data_order: opts.data_order,
        extra: Vec::new(),
    };
    // A factory with a Recorder run (and no spec): the run gives the data, loss and modes.
    if let (None, Some(r)) = (&t.spec, &run)
        && t.model.is_some()
        && Path::new(&model) != r.json_path
        && Path::new(&model) != r.dir
    {
        let d = run_data(r)?;
        cfg.extra.extend([
            "--data".into(),
            d.train.display().to_string(),
            "--x".into(),
            d.x.clone(),
            "--y".into(),
            d.y.clone(),
        ]);
        if let Some(l) = run_str(r, "loss") {
            cfg.extra.extend(["--loss".into(), l.into()]);
        }
        if r.json["model_has_batch_norm"].as_bool() == Some(true)
            && let Some(b) = run_str(r, "batch_norm")
        {
            cfg.extra.extend(["--bn-mode".into(), b.into()]);
        }
        if cfg.chunk_size.is_none() {
            cfg.chunk_size = r.json["chunk_size"].as_u64().map(|c| c as usize);
        }
    }
    let mut p = match &t.spec {
        Some(spec) => {
            o.spec = spec.clone();
            super::prepare_as::<T>(&o.ckpt_dir, spec, o.first, o.last, o.every)?
        }
        None => {
            let Some(r) = &run else {
                return Err(LcaError::Usage(
                    "--engine torch without --spec needs a Recorder run (lca-run.json) for the training set: give the run directory as the checkpoints or as --torch-model, or pass --spec".into(),
                ));
            };
            o.spec = r.json_path.clone();
            prepare_without_spec::<T>(&o, r)?
        }
    };
    note(&format!(
        "note: starting the PyTorch worker ({} -m lca.engine.worker --model {model} --device {})",
        cfg.python().display(),
        cfg.device
    ));
    let mut engine = TorchEngine::<T>::start(&cfg)?;
    let h = engine.hello.clone();
    if p.model.params.is_empty() {
        p.model.params = h.params();
        finish_without_spec(&mut p, &h, &model)?;
    }
    engine.bind(&p.model.params)?;
    if h.n_samples != p.data.len() {
        return Err(LcaError::Engine(format!(
            "the PyTorch worker loaded {} samples, lca's training set ({}) has {}",
            h.n_samples,
            p.data.path.display(),
            p.data.len()
        )));
    }
    if p.validation.take().is_some() {
        note(
            "warning: the validation set is not evaluated with --engine torch (only the training set)",
        );
    }
    // The row order: what was asked where batch statistics make the loss depend on it, file
    // order elsewhere; the worker must have applied exactly that.
    // (lca's own copy of the rows is not evaluated: it stays in file order, for the
    // sorted-labels warning.)
    p.order = if p.order_matters() {
        opts.data_order
    } else {
        crate::data::DataOrder::File
    };
    if h.order != p.order {
        return Err(LcaError::Engine(format!(
            "the PyTorch worker evaluates the rows in {}, lca asked for {} (batch norm: {}): the worker and lca disagree on the row order",
            h.order,
            p.order,
            h.batch_norm.as_deref().unwrap_or("none")
        )));
    }
    p.spec.eval.chunk_size = h.chunk_size;
    p.engine = Some(EngineInfo {
        name: "torch".into(),
        device: h.device.clone(),
        precision: h.precision.clone(),
        torch: h.torch.clone(),
        chunk_size: h.chunk_size,
        model,
    });
    note(&format!(
        "note: PyTorch {} on {} in {}, {} tensors ({} values), chunks of {}",
        h.torch,
        h.device,
        h.precision,
        h.tensors.len(),
        h.numel,
        h.chunk_size
    ));
    super::run(&o, &p, &engine, None, note)
}

/// The inputs of a run with no spec: the Recorder run's training set and checkpoints; the
/// parameter list comes from the worker's hello ([`finish_without_spec`]).
fn prepare_without_spec<T: Real>(o: &AnalyzeOptions, r: &RunDir) -> Result<Prepared<T>> {
    let loss = match run_str(r, "loss") {
        Some("mse") => LossSpec::Mse {},
        _ => LossSpec::CrossEntropy {},
    };
    let kind = match loss {
        LossSpec::Mse {} => LossKind::Mse,
        LossSpec::CrossEntropy {} => LossKind::CrossEntropy,
    };
    let data_spec = run_data(r)?;
    let data = Dataset::load(&data_spec.train, &data_spec, None, kind)?;
    let scanned = checkpoint::scan(&o.ckpt_dir)?;
    let listed = scanned.iter().map(|f| (f.path.clone(), f.len)).collect();
    let files = checkpoint::select(scanned, o.first, o.last, o.every)?;
    if files.len() < 2 {
        return Err(LcaError::Checkpoint {
            path: o.ckpt_dir.clone(),
            msg: format!(
                "{} checkpoint(s) selected; LCA needs at least two (one step)",
                files.len()
            ),
        });
    }
    let spec = Spec {
        path: r.json_path.clone(),
        source: String::new(),
        model: ModelSection::default(),
        layers: Vec::new(),
        loss,
        data: data_spec,
        eval: EvalSection::default(),
        regularization: None,
    };
    let model = Model {
        nodes: Vec::new(),
        params: Vec::new(),
        loss: kind,
        input_shape: data.sample_shape().to_vec(),
        external_tied: Vec::new(),
    };
    Ok(Prepared {
        spec,
        spec_sha256: String::new(),
        data,
        validation: None,
        model,
        files,
        listed,
        l2_mask: Vec::new(),
        batch_norm: None,
        engine: None,
        order: crate::data::DataOrder::File,
    })
}

/// Complete a spec-less run from the hello: the batch-norm mode, the checkpoints checked
/// against the worker's tensors, and the "spec" hash (the model reference and θ's layout,
/// what the results depend on besides data, checkpoints and engine).
fn finish_without_spec<T: Real>(
    p: &mut Prepared<T>,
    h: &crate::engine::Hello,
    model: &str,
) -> Result<()> {
    p.batch_norm = match h.batch_norm.as_deref() {
        Some("running-stats") => Some(BnMode::RunningStats),
        Some("batch-stats") => Some(BnMode::BatchStats),
        _ => None,
    };
    p.spec.model.batch_norm = p.batch_norm;
    for f in &p.files {
        check_header(f, &p.model)?;
    }
    let layout: Vec<Value> = p
        .model
        .params
        .iter()
        .map(|q| json!([q.name, q.shape, q.buffer, q.aliases]))
        .collect();
    let source = serde_json::to_string_pretty(&json!({
        "engine": "torch",
        "model": model,
        "loss": h.loss,
        "batch_norm": h.batch_norm,
        "tensors": layout,
    }))
    .unwrap_or_default();
    p.spec_sha256 = crate::tensors::sha256_hex(source.as_bytes());
    p.spec.source = source;
    Ok(())
}
