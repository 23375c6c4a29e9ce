//! `lca inspect`: a dry run of `analyze`. Loads and validates everything `analyze` would
//! (spec, data, every selected checkpoint's header, through [`crate::analyze::prepare`]),
//! lists the selected steps and the tensors with their shapes and dtypes, and estimates the
//! work: gradient evaluations, floating-point operations, output size, and (unless disabled)
//! the time, from one timed full-set gradient evaluation at the first checkpoint.

use crate::analyze::{Prepared, prepare};
use crate::checkpoint::{self, StepSource};
use crate::error::Result;
use crate::eval::Evaluator;
use crate::lca::Method;
use crate::net::LossKind;
use crate::output::step_list;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to inspect.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    pub ckpt_dir: PathBuf,
    pub spec: PathBuf,
    pub first: Option<u64>,
    pub last: Option<u64>,
    pub every: usize,
    /// Integration rule the estimate is for.
    pub method: Method,
    /// Largest number of Simpson sub-intervals (for the worst case with refinement).
    pub max_splits: usize,
    /// Time one full-set gradient evaluation.
    pub time: bool,
    /// The row order of the evaluation chunks (batch-stats batch norm only).
    pub data_order: crate::data::DataOrder,
}

/// One tensor of the first selected checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorLine {
    pub name: String,
    /// The layer that owns it, or `None` when the spec does not use it.
    pub layer: Option<String>,
    pub shape: Vec<usize>,
    /// Dtypes found across the selected checkpoints (usually one).
    pub dtypes: Vec<String>,
}

/// The work an analysis will do.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    pub steps: usize,
    /// Gradient evaluations without refinement.
    pub evaluations: usize,
    /// With every step refined to the largest number of sub-intervals.
    pub max_evaluations: usize,
    pub macs_per_sample: u64,
    /// FLOPs of one full-set loss-and-gradient evaluation (forward 2·MACs, backward ≈ 2×
    /// forward, per sample).
    pub flops_per_evaluation: f64,
    /// Bytes of `lca.safetensors` in f32.
    pub lca_tensor_bytes: u64,
}

/// One timed evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub step: u64,
    pub loss: f64,
    pub seconds: f64,
    pub threads: usize,
}

/// The result of an inspection.
#[derive(Debug, Clone)]
pub struct Inspection {
    pub spec: PathBuf,
    pub loss: String,
    pub data: PathBuf,
    pub samples: usize,
    pub sample_shape: Vec<usize>,
    pub chunk_size: usize,
    pub chunks: usize,
    pub input_shape: Vec<usize>,
    pub output_shape: Vec<usize>,
    pub num_params: usize,
    /// Buffer values (running statistics), which also get LCA rows.
    pub num_buffers: usize,
    /// Layers with parameters and their parameter counts.
    pub layers: Vec<(String, usize)>,
    pub ckpt_dir: PathBuf,
    pub files_found: usize,
    /// Selected checkpoint steps.
    pub steps: Vec<u64>,
    pub step_sources: Vec<StepSource>,
    pub spacing: (u64, u64),
    /// File the tensor list was read from.
    pub listed_from: PathBuf,
    pub tensors: Vec<TensorLine>,
    pub method: Method,
    pub max_splits: usize,
    pub estimate: Estimate,
    pub timing: Option<Timing>,
    /// lca's loss at the first selected checkpoint compared with PyTorch's, when the
    /// checkpoint carries it (the Python Recorder's `lca.torch_loss`).
    pub loss_check: Option<crate::output::LossCheck>,
    /// Whether the loss at the first checkpoint was evaluated only for that comparison.
    pub loss_check_evaluated: bool,
    /// The row order of the evaluation chunks, when the loss depends on it (batch norm with
    /// batch statistics).
    pub order: Option<crate::data::DataOrder>,
    /// Warnings `analyze` would give about the inputs (batch statistics on sorted labels).
    pub warnings: Vec<String>,
}

/// Inspect a checkpoint directory against a spec.
pub fn inspect(opts: &InspectOptions) -> Result<Inspection> {
    let found = checkpoint::scan(&opts.ckpt_dir)?.len();
    let mut p = prepare(
        &opts.ckpt_dir,
        &opts.spec,
        opts.first,
        opts.last,
        opts.every,
    )?;
    p.order_rows(opts.data_order);
    let order_warning = p.order_warning();
    let Prepared {
        spec,
        data,
        model,
        files,
        ..
    } = &p;
    let steps: Vec<u64> = files.iter().map(|f| f.step).collect();
    let gaps: Vec<u64> = steps.windows(2).map(|w| w[1] - w[0]).collect();
    let spacing = (
        gaps.iter().copied().min().unwrap_or(0),
        gaps.iter().copied().max().unwrap_or(0),
    );
    let mut sources: Vec<StepSource> = Vec::new();
    for f in files.iter() {
        if !sources.contains(&f.step_source) {
            sources.push(f.step_source);
        }
    }
    let first = &files[0];
    let tensors = first
        .tensors
        .iter()
        .map(|t| {
            let dtypes: BTreeSet<String> = files
                .iter()
                .filter_map(|f| f.tensors.iter().find(|u| u.name == t.name))
                .map(|u| u.dtype.clone())
                .collect();
            TensorLine {
                name: t.name.clone(),
                // A tied weight stored under its alias (as safetensors' save_model writes
                // `lm_head.weight` for `transformer.wte.weight`) is used, as an alias.
                layer: model
                    .params
                    .iter()
                    .find(|q| q.answers_to(&t.name))
                    .map(|q| {
                        if q.name == t.name {
                            q.layer.clone()
                        } else {
                            format!("{} (tied: alias of {})", q.layer, q.name)
                        }
                    }),
                shape: t.shape.clone(),
                dtypes: dtypes.into_iter().collect(),
            }
        })
        .collect::<Vec<_>>();
    // Model tensors first, in model order; ignored ones after, by name.
    let mut ordered: Vec<TensorLine> = model
        .params
        .iter()
        .flat_map(|q| tensors.iter().filter(|t| q.answers_to(&t.name)).cloned())
        .collect();
    ordered.extend(tensors.iter().filter(|t| t.layer.is_none()).cloned());

    let mut layers: Vec<(String, usize)> = Vec::new();
    for q in &model.params {
        match layers.iter_mut().find(|(l, _)| *l == q.layer) {
            Some(l) => l.1 += q.numel(),
            None => layers.push((q.layer.clone(), q.numel())),
        }
    }

    let nsteps = files.len() - 1;
    let per_step = match opts.method {
        Method::Simpson => 2,
        Method::Trapezoid | Method::FirstOrder => 1,
    };
    let max_per_step = if opts.method == Method::Simpson {
        opts.max_splits.max(2)
    } else {
        1
    };
    let macs = model.macs_per_sample();
    let estimate = Estimate {
        steps: nsteps,
        evaluations: 1 + per_step * nsteps,
        max_evaluations: 1 + max_per_step * nsteps,
        macs_per_sample: macs,
        flops_per_evaluation: 6.0 * macs as f64 * data.len() as f64,
        lca_tensor_bytes: 4 * ((model.num_params() + model.num_buffer_values()) * nsteps) as u64,
    };
    let eval = Evaluator {
        model,
        data,
        chunk_size: spec.eval.chunk_size,
    };
    let timing = if opts.time {
        let loaded = checkpoint::load(first, &model.params)?;
        let t = Instant::now();
        let r = eval.loss_and_grad(&loaded.theta)?;
        Some(Timing {
            step: first.step,
            loss: r.loss,
            seconds: t.elapsed().as_secs_f64(),
            threads: rayon::current_num_threads(),
        })
    } else {
        None
    };
    let mut warnings: Vec<String> = order_warning.into_iter().collect();
    let torch = crate::analyze::verify::recorded(first)?.filter(|t| {
        t.comparable(p.batch_norm, p.order)
            .map_err(|why| warnings.push(why))
            .is_ok()
    });
    let loss_check_evaluated = torch.is_some() && timing.is_none();
    let loss_check = match torch {
        None => None,
        Some(torch) => {
            let lca_loss = match &timing {
                Some(t) => t.loss,
                None => {
                    use crate::eval::Engine;
                    eval.loss(&checkpoint::load(first, &model.params)?.theta)?
                }
            };
            Some(crate::analyze::verify::compare(
                first, &torch, lca_loss, true,
            ))
        }
    };
    Ok(Inspection {
        spec: opts.spec.clone(),
        loss: match model.loss {
            LossKind::CrossEntropy => "cross_entropy".into(),
            LossKind::Mse => "mse".into(),
        },
        data: data.path.clone(),
        samples: data.len(),
        sample_shape: data.sample_shape().to_vec(),
        chunk_size: eval.chunk_size,
        chunks: eval.num_chunks(),
        input_shape: model.input_shape.clone(),
        output_shape: model.output_shape().to_vec(),
        num_params: model.num_params(),
        num_buffers: model.num_buffer_values(),
        layers,
        ckpt_dir: opts.ckpt_dir.clone(),
        files_found: found,
        steps,
        step_sources: sources,
        spacing,
        listed_from: first.path.clone(),
        tensors: ordered,
        method: opts.method,
        max_splits: opts.max_splits,
        estimate,
        timing,
        loss_check,
        loss_check_evaluated,
        order: p.order_matters().then_some(p.order),
        warnings,
    })
}

/// A quantity with an SI prefix: `3.7 G`.
pub fn si(x: f64) -> String {
    let units = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")];
    for (f, u) in units {
        if x >= f {
            return format!("{:.1} {u}", x / f);
        }
    }
    format!("{x:.0} ")
}

/// A duration for people: `850 ms`, `12.3 s`, `4 min 10 s`, `2 h 5 min`.
pub fn human_duration(s: f64) -> String {
    if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        let d = Duration::from_secs_f64(s).as_secs();
        format!("{} min {} s", d / 60, d % 60)
    } else {
        let d = Duration::from_secs_f64(s).as_secs();
        format!("{} h {} min", d / 3600, (d % 3600) / 60)
    }
}

fn shape(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

impl Inspection {
    /// The report as text.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        self.write_run(&mut o);
        self.write_loss_check(&mut o);
        self.write_tensors(&mut o);
        self.write_estimate(&mut o);
        for w in &self.warnings {
            o.push_str(&format!("warning: {w}\n"));
        }
        o
    }

    /// lca's loss against PyTorch's, when the first checkpoint carries it.
    fn write_loss_check(&self, o: &mut String) {
        let Some(c) = &self.loss_check else {
            return;
        };
        let how = if self.loss_check_evaluated {
            " (lca evaluated the loss at this checkpoint for this comparison)"
        } else {
            ""
        };
        let verdict = if c.agree {
            format!(
                "agree: difference {:.2e} ≤ {:.2e}, float rounding",
                c.difference, c.tolerance
            )
        } else {
            format!(
                "DISAGREE: difference {:.3e} > {:.2e}; `lca analyze` will refuse this spec (--no-verify-loss overrides). Likely causes: the spec (layer hyperparameters, head count), preprocessing ([data] scale/mean/std, input_shape), the batch-norm mode",
                c.difference, c.tolerance
            )
        };
        o.push_str(&format!(
            "{:<12}step {}: lca {:.10}, PyTorch {:.10} ({}{}): {verdict}{how}\n",
            "loss check",
            c.step,
            c.lca_loss,
            c.torch_loss,
            c.torch_dtype,
            c.torch_batch_norm
                .as_deref()
                .map(|b| format!(", {b}"))
                .unwrap_or_default(),
        ));
    }

    /// The checkpoints, their sources and spacing.
    fn write_run(&self, o: &mut String) {
        let mut line = |k: &str, v: String| o.push_str(&format!("{k:<12}{v}\n"));
        line(
            "spec",
            format!("{} ({} loss)", self.spec.display(), self.loss),
        );
        line(
            "data",
            format!(
                "{}: {} samples of shape {}, evaluated in {} chunk(s) of {}{}",
                self.data.display(),
                self.samples,
                shape(&self.sample_shape),
                self.chunks,
                self.chunk_size,
                match self.order {
                    Some(o) => format!(" (batch statistics; rows in {o})"),
                    None => String::new(),
                }
            ),
        );
        line(
            "model",
            format!(
                "input {} → output {}, {} parameters in {} layer(s): {}",
                shape(&self.input_shape),
                shape(&self.output_shape),
                self.num_params,
                self.layers.len(),
                self.layers
                    .iter()
                    .map(|(l, n)| format!("{l} ({n})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        let sources = self
            .step_sources
            .iter()
            .map(|s| match s {
                StepSource::Metadata => "`step` metadata",
                StepSource::FileName => "file names",
            })
            .collect::<Vec<_>>()
            .join(" and ");
        line(
            "checkpoints",
            format!(
                "{} of {} file(s) in {} selected: steps {} (step numbers from {sources})",
                self.steps.len(),
                self.files_found,
                self.ckpt_dir.display(),
                step_list(&self.steps)
            ),
        );
        let (lo, hi) = self.spacing;
        line(
            "steps",
            format!(
                "{} step(s), {} training step(s) apart{}",
                self.estimate.steps,
                if lo == hi {
                    lo.to_string()
                } else {
                    format!("{lo}–{hi}")
                },
                if hi > 1 {
                    " (sparse: each step's total is exact, its split over parameters follows the straight chord)"
                } else {
                    ""
                }
            ),
        );
    }

    /// The tensor table and which tensors are used.
    fn write_tensors(&self, o: &mut String) {
        o.push_str(&format!(
            "\ntensors in {}:\n",
            self.listed_from
                .file_name()
                .map_or(self.listed_from.display().to_string(), |n| n
                    .to_string_lossy()
                    .to_string())
        ));
        let rows: Vec<[String; 5]> = self
            .tensors
            .iter()
            .map(|t| {
                [
                    t.name.clone(),
                    t.layer.clone().unwrap_or_else(|| "(ignored)".into()),
                    shape(&t.shape),
                    t.dtypes.join("/"),
                    t.shape.iter().product::<usize>().to_string(),
                ]
            })
            .collect();
        let head = ["tensor", "layer", "shape", "dtype", "numel"];
        let mut w = head.map(|h| h.chars().count());
        for r in &rows {
            for (k, c) in r.iter().enumerate() {
                w[k] = w[k].max(c.chars().count());
            }
        }
        let fmt = |r: &[String]| {
            let mut s = String::from("  ");
            for (k, c) in r.iter().enumerate() {
                let pad = w[k] - c.chars().count();
                if k == 4 {
                    s.push_str(&" ".repeat(pad));
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(pad + 2));
                }
            }
            s.trim_end().to_string() + "\n"
        };
        o.push_str(&fmt(&head.map(String::from)));
        for r in &rows {
            o.push_str(&fmt(r));
        }
        let used = self.tensors.iter().filter(|t| t.layer.is_some()).count();
        let ignored = self.tensors.len() - used;
        let varying: Vec<&str> = self
            .tensors
            .iter()
            .filter(|t| t.layer.is_some() && t.dtypes.len() > 1)
            .map(|t| t.name.as_str())
            .collect();
        o.push_str(&format!(
            "ok: all {} selected checkpoints hold the {used} tensor(s) the spec needs, with the expected shapes and float dtypes; the data fits the model{}\n",
            self.steps.len(),
            if ignored > 0 {
                format!("; {ignored} tensor(s) will be ignored")
            } else {
                String::new()
            }
        ));
        if !varying.is_empty() {
            o.push_str(&format!(
                "note: the dtype differs between checkpoints for {} (all are read as f32)\n",
                varying.join(", ")
            ));
        }
    }

    /// The cost estimate and the measured time.
    fn write_estimate(&self, o: &mut String) {
        let e = &self.estimate;
        o.push_str(&format!(
            "\nwork ({}{}):\n",
            match self.method {
                Method::Simpson => "simpson",
                Method::Trapezoid => "trapezoid",
                Method::FirstOrder => "first-order",
            },
            if self.method == Method::Simpson {
                format!(", refined up to {} sub-intervals per step", self.max_splits)
            } else {
                String::new()
            }
        ));
        let mut line = |k: &str, v: String| o.push_str(&format!("  {k:<16}{v}\n"));
        line(
            "evaluations",
            format!(
                "{} full-set gradient evaluations (1 + {}·{} steps) before refinement{}",
                e.evaluations,
                (e.evaluations - 1) / e.steps.max(1),
                e.steps,
                if e.max_evaluations > e.evaluations {
                    format!(
                        "; at most {} if every step is refined to {} sub-intervals",
                        e.max_evaluations, self.max_splits
                    )
                } else {
                    String::new()
                }
            ),
        );
        line(
            "per evaluation",
            format!(
                "{} samples × 6 × {} MACs = {}FLOP (forward 2·MACs, backward ≈ 2× forward)",
                self.samples,
                e.macs_per_sample,
                si(e.flops_per_evaluation)
            ),
        );
        line(
            "total",
            format!(
                "{}FLOP{}",
                si(e.flops_per_evaluation * e.evaluations as f64),
                if e.max_evaluations > e.evaluations {
                    format!(
                        " (at most {}FLOP)",
                        si(e.flops_per_evaluation * e.max_evaluations as f64)
                    )
                } else {
                    String::new()
                }
            ),
        );
        line(
            "outputs",
            format!(
                "lca.safetensors {}B in f32 ({} steps × {} parameters; --no-lca-tensors skips it), params.csv {} rows",
                si(e.lca_tensor_bytes as f64),
                e.steps,
                self.num_params + self.num_buffers,
                self.num_params + self.num_buffers
            ),
        );
        match &self.timing {
            Some(t) => {
                line(
                    "time",
                    format!(
                        "measured: one full-set gradient evaluation at step {} took {} on {} thread(s) (loss {:.6})",
                        t.step,
                        human_duration(t.seconds),
                        t.threads,
                        t.loss
                    ),
                );
                line(
                    "",
                    format!(
                        "estimate: about {} for {} evaluations{}",
                        human_duration(t.seconds * e.evaluations as f64),
                        e.evaluations,
                        if e.max_evaluations > e.evaluations {
                            format!(
                                ", at most {} with full refinement",
                                human_duration(t.seconds * e.max_evaluations as f64)
                            )
                        } else {
                            String::new()
                        }
                    ),
                );
            }
            None => line("time", "not measured (--no-time)".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(si(3.7e9), "3.7 G");
        assert_eq!(si(512.0), "512 ");
        assert_eq!(human_duration(0.0123), "12 ms");
        assert_eq!(human_duration(12.34), "12.3 s");
        assert_eq!(human_duration(250.0), "4 min 10 s");
        assert_eq!(human_duration(7500.0), "2 h 5 min");
    }
}
