//! Command-line interface: the clap definitions and the wiring from options to the library
//! (`analyze`, `summarize`, `plot`, `check`, `inspect`) and to stdout/stderr. No analysis
//! logic lives here. [`run`] returns a [`Status`]; errors (exit 2) are reported by `main`.

use crate::analyze::{AnalyzeOptions, Precision, analyze};
use crate::check::{CheckOptions, check};
use crate::inspect::{InspectOptions, inspect};
use crate::lca::{Integration, Method, Policy};
use crate::output::tensors::StoreDtype;
use crate::plot::{PlotKind, PlotOptions, plot};
use crate::summarize::{By, Format, Sort, view_top};
use clap::{Args, CommandFactory, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;

/// How a successful run ended: the process exit status apart from errors (which exit 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Exit 0.
    Success,
    /// Exit 1: `lca check` ran and at least one check failed.
    ChecksFailed,
}

impl Status {
    /// The process exit code.
    pub fn code(self) -> u8 {
        match self {
            Status::Success => 0,
            Status::ChecksFailed => 1,
        }
    }
}

/// Loss Change Allocation: which parameters, neurons and layers made the training loss go
/// down, which pushed it up, and when — from saved PyTorch checkpoints.
#[derive(Debug, Parser)]
#[command(name = "lca", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compute LCA between consecutive checkpoints and write tables to OUT/.
    Analyze(Box<AnalyzeArgs>),
    /// Show coarser views of an analysis: per layer, tensor, neuron, step or parameter.
    Summarize(SummarizeArgs),
    /// Draw a figure of an analysis as SVG or PNG.
    Plot(PlotArgs),
    /// Write one self-contained HTML page of an analysis: metadata, residuals, figures, tables.
    Report(ReportArgs),
    /// Gate CI on an analysis: residual bounds, layers that must not hurt, a baseline.
    ///
    /// Prints PASS or FAIL with the figures for each check. Exit status 0 when every check
    /// passes, 1 when one fails, 2 on unusable input.
    Check(CheckArgs),
    /// Dry run of `analyze`: list steps and tensors, validate them, estimate the work.
    Inspect(InspectArgs),
    /// Draft a model spec from a checkpoint (and the training set), with TODO lines to review.
    Init(InitArgs),
    /// Merge the parts of a sharded analysis (`analyze --shard K/N`) into the outputs of a
    /// single run.
    ///
    /// Checks that the parts come from the same inputs and options and cover every step
    /// exactly once (no gap, no part given twice); see docs/scale-out.md.
    Merge(MergeArgs),
    /// Print a shell completion script to stdout.
    Completions(CompletionsArgs),
    /// Print the manual page (roff) to stdout, or write one page per command to a directory.
    Man(ManArgs),
}

/// Which checkpoints to use (shared by `analyze` and `inspect`).
#[derive(Debug, Args)]
pub struct Selection {
    /// Only checkpoints with step ≥ FIRST.
    #[arg(long)]
    pub first: Option<u64>,
    /// Only checkpoints with step ≤ LAST.
    #[arg(long)]
    pub last: Option<u64>,
    /// Take every K-th of the selected checkpoints.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub every: usize,
}

/// The row order of the evaluation chunks (shared by `analyze` and `inspect`).
#[derive(Debug, Args)]
pub struct OrderArgs {
    /// Order of the training rows in the evaluation chunks when batch norm uses batch
    /// statistics (the only mode whose loss depends on it): `shuffled` (chunks drawn by a
    /// seeded permutation) or `file` (consecutive rows of the file). See docs/spec.md.
    #[arg(long, value_enum, default_value_t = OrderKind::Shuffled)]
    pub data_order: OrderKind,
    /// Seed of the permutation of `--data-order shuffled` [default: 0].
    #[arg(long, value_name = "N")]
    pub data_seed: Option<u64>,
}

/// `--data-order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OrderKind {
    /// Chunks drawn by a seeded permutation of the rows.
    Shuffled,
    /// Consecutive rows of the file.
    File,
}

impl OrderArgs {
    /// The requested order.
    pub fn order(&self) -> anyhow::Result<crate::data::DataOrder> {
        use crate::data::{DataOrder, order::DEFAULT_SEED};
        match (self.data_order, self.data_seed) {
            (OrderKind::File, Some(_)) => {
                anyhow::bail!("--data-seed applies to --data-order shuffled, not file")
            }
            (OrderKind::File, None) => Ok(DataOrder::File),
            (OrderKind::Shuffled, seed) => Ok(DataOrder::Shuffled {
                seed: seed.unwrap_or(DEFAULT_SEED),
            }),
        }
    }
}

/// Which engine evaluates the loss and gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// This program's evaluator (a spec is required).
    Builtin,
    /// A PyTorch worker process (`python -m lca.engine.worker`).
    Torch,
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Directory of checkpoints (one per training step: *.safetensors, torch.save files,
    /// Hugging Face checkpoint-N/ folders; see docs/checkpoints.md), or a run directory of
    /// the Python Recorder (holding lca-run.json: its checkpoints and model.toml are used).
    pub ckpts: PathBuf,
    /// Model spec (architecture, loss, training set): see docs/spec.md. Optional for a
    /// Recorder run directory.
    #[arg(long, short = 's')]
    pub spec: Option<PathBuf>,
    /// Evaluation engine: `builtin` (this program, from the spec) or `torch` (a PyTorch worker
    /// process evaluating the model's own code; see docs/engines.md).
    #[arg(long, value_enum, default_value_t = EngineKind::Builtin)]
    pub engine: EngineKind,
    /// The model for `--engine torch`: FILE.py:FACTORY, package.module:factory, an exported
    /// .pt2, or a Recorder run directory / lca-run.json (default: the run of the checkpoints).
    #[arg(long, value_name = "MODEL")]
    pub torch_model: Option<String>,
    /// Device of `--engine torch`: cpu, cuda, cuda:N or mps.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Samples per evaluation chunk of `--engine torch` (default: the spec's or run's, or
    /// fitted to the GPU's memory).
    #[arg(long, value_name = "N")]
    pub chunk_size: Option<usize>,
    /// Python interpreter of `--engine torch` (default: $LCA_PYTHON, else python3).
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
    /// Output directory (created; an existing one must be empty or a previous lca output).
    #[arg(long, short = 'o', default_value = "lca-out")]
    pub out: PathBuf,
    #[command(flatten)]
    pub select: Selection,
    /// Integration rule.
    #[arg(long, value_enum, default_value_t = Method::Simpson)]
    pub method: Method,
    /// Do not refine Simpson steps adaptively (plain 1-4-1 Simpson).
    #[arg(long)]
    pub no_adaptive: bool,
    /// How refinement is decided: `budget` (default: a run-level error budget, Σ|r|/|ΔL| ≤
    /// --target) or `tolerance` (a bound per step; implied by --tolerance/--rel-tolerance).
    #[arg(long, value_enum)]
    pub policy: Option<Policy>,
    /// Budget policy: the target Σ|r|/|ΔL| (fraction; 1e-4 = 0.01 %).
    #[arg(long, default_value_t = 1e-4, value_name = "FRACTION")]
    pub target: f64,
    /// Budget policy: at most this many times plain Simpson's evaluations.
    #[arg(long, default_value_t = 4.0, value_name = "FACTOR")]
    pub max_evals_factor: f64,
    /// Budget policy: after the budget, refine until every layer's error bar (run total) is at
    /// most REL × max(|layer LCA|, 1 % of |ΔL|); bounded by --max-splits, not by
    /// --max-evals-factor (docs/integration.md).
    #[arg(long, value_name = "REL")]
    pub converge_layers: Option<f64>,
    /// Tolerance policy: refine a step while |residual| exceeds this (loss units) [default: 1e-3].
    #[arg(long, value_name = "LOSS")]
    pub tolerance: Option<f64>,
    /// Also accept a step when |residual| ≤ this fraction of |ΔL| of the step.
    #[arg(long, value_name = "FRACTION")]
    pub rel_tolerance: Option<f64>,
    /// Largest number of Simpson sub-intervals per step (power of two).
    #[arg(long, default_value_t = 32)]
    pub max_splits: usize,
    /// Do not write per-step, per-parameter LCA (lca.safetensors).
    #[arg(long)]
    pub no_lca_tensors: bool,
    /// Also write params.csv, one row per parameter (about 60 bytes per parameter; the same
    /// totals are always in totals.safetensors, 12 bytes per parameter).
    #[arg(long)]
    pub params_csv: bool,
    /// Element type of lca.safetensors.
    #[arg(long, value_enum, default_value_t = StoreDtype::F32)]
    pub lca_dtype: StoreDtype,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, short = 'j')]
    pub threads: Option<usize>,
    /// Evaluator arithmetic: f32 (as training; default) or f64 (slower, removes f32 rounding).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Evaluate every Simpson point in full instead of sharing the first layer's work between
    /// the points of a step (sharing is exact up to rounding; by default it is used when the
    /// first layer is linear or conv2d on the data and a cost model estimates that it pays;
    /// see docs/performance.md).
    #[arg(long, conflicts_with = "share_first_layer")]
    pub no_share_first_layer: bool,
    /// Share the first layer between Simpson's points whenever the model allows it, even where
    /// the cost model estimates that it does not pay.
    #[arg(long)]
    pub share_first_layer: bool,
    /// No progress bar or notes on stderr (the final residual report is still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Continue the interrupted run in OUT where it stopped (refused if an input or option
    /// changed; starts afresh when there is nothing to resume).
    #[arg(long)]
    pub resume: bool,
    /// Analyse only shard K of N contiguous ranges of steps (K from 0 to N-1) and write a part
    /// for `lca merge`: see docs/scale-out.md.
    #[arg(long, value_name = "K/N", conflicts_with = "shards")]
    pub shard: Option<crate::shard::Shard>,
    /// Split the steps into N shards and analyse the one given by JOB_COMPLETION_INDEX
    /// (Kubernetes) or SLURM_ARRAY_TASK_ID − SLURM_ARRAY_TASK_MIN (Slurm).
    #[arg(long, value_name = "N")]
    pub shards: Option<usize>,
    /// Analyse even when lca's loss at the first checkpoint disagrees with the one PyTorch
    /// recorded in it (the Python Recorder's `lca.torch_loss`): warn instead of refusing.
    #[arg(long)]
    pub no_verify_loss: bool,
    #[command(flatten)]
    pub order: OrderArgs,
}

#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Output directories of `lca analyze --shard K/N`, one per shard, in any order.
    #[arg(required = true, value_name = "PART_DIR")]
    pub parts: Vec<PathBuf>,
    /// Output directory for the merged analysis.
    #[arg(long, short = 'o', default_value = "lca-out")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SummarizeArgs {
    /// Output directory of `lca analyze`.
    pub out: PathBuf,
    /// View.
    #[arg(long, value_enum, default_value_t = By::Layer)]
    pub by: By,
    /// Show only the first N rows (after sorting).
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,
    /// Row order (default: model order for layer/tensor/step, most helpful first otherwise).
    #[arg(long, value_enum)]
    pub sort: Option<Sort>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Output directory of `lca analyze`.
    pub out: PathBuf,
    /// Which figure (see docs/plots.md).
    #[arg(long, short = 'k', value_enum)]
    pub kind: PlotKind,
    /// Image file to write; the format follows the extension: .svg or .png.
    #[arg(long = "output", short = 'o', value_name = "FILE")]
    pub file: PathBuf,
    /// Layer of the heat map (as in `summarize --by layer`).
    #[arg(long, value_name = "NAME")]
    pub layer: Option<String>,
    /// Width in pixels (default 1200).
    #[arg(long)]
    pub width: Option<u32>,
    /// Height in pixels (default 800; taller for many layers or neurons).
    #[arg(long)]
    pub height: Option<u32>,
    /// Lines (layers figure) and panels (peaks figure) per layer or per block; either way the
    /// largest ones are drawn and the others summed into one "the rest".
    #[arg(long, value_enum, default_value_t = crate::plot::series::GroupBy::Layer)]
    pub by: crate::plot::series::GroupBy,
    /// Vocabulary file, one token per line (line i = token id i), to label the rows of an
    /// embedding's heat map.
    #[arg(long, value_name = "FILE")]
    pub vocab: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Output directory of `lca analyze`.
    pub out: PathBuf,
    /// HTML file to write (replaced atomically).
    #[arg(long = "output", short = 'o', value_name = "FILE")]
    pub file: PathBuf,
    /// Layer of the heat map [default: the layer with the largest |LCA|].
    #[arg(long, value_name = "NAME")]
    pub heatmap_layer: Option<String>,
    /// Rows of most helpful and of most hurtful parameters in the top-parameter table.
    #[arg(long, value_name = "N", default_value_t = 15)]
    pub top: usize,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Output directory of `lca analyze`.
    pub out: PathBuf,
    /// Fail when Σ|r_t|/|ΔL| (the whole-run residual, a fraction: 1e-3 = 0.1 %) exceeds this.
    #[arg(long, value_name = "FRACTION")]
    pub max_residual: Option<f64>,
    /// Fail when a step's |r_t| (loss units) exceeds this.
    #[arg(long, value_name = "LOSS")]
    pub max_step_residual: Option<f64>,
    /// Fail when this layer's total LCA is positive (it raised the loss). Repeatable.
    #[arg(long, value_name = "NAME")]
    pub fail_if_layer_hurts: Vec<String>,
    /// Fail when a layer's error bar (`lca_err`, run total) exceeds this fraction of |ΔL|.
    #[arg(long, value_name = "FRACTION")]
    pub max_layer_error: Option<f64>,
    /// Compare every layer's total LCA with this baseline output directory.
    #[arg(long, value_name = "OTHER_OUT")]
    pub baseline: Option<PathBuf>,
    /// Relative tolerance against the baseline: |x − b| ≤ atol + rtol·|b| [default: 1e-4].
    #[arg(long, value_name = "R")]
    pub rtol: Option<f64>,
    /// Absolute tolerance against the baseline (loss units) [default: 0].
    #[arg(long, value_name = "A")]
    pub atol: Option<f64>,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Directory of checkpoints, or a Recorder run directory (holding lca-run.json).
    pub ckpts: PathBuf,
    /// Model spec: see docs/spec.md. Optional for a Recorder run directory.
    #[arg(long, short = 's')]
    pub spec: Option<PathBuf>,
    #[command(flatten)]
    pub select: Selection,
    /// Integration rule to estimate the work for.
    #[arg(long, value_enum, default_value_t = Method::Simpson)]
    pub method: Method,
    /// Largest number of Simpson sub-intervals per step (for the worst case).
    #[arg(long, default_value_t = 32)]
    pub max_splits: usize,
    /// Do not time a gradient evaluation (no estimate of the run time).
    #[arg(long)]
    pub no_time: bool,
    /// Worker threads for the timed evaluation (default: all cores).
    #[arg(long, short = 'j')]
    pub threads: Option<usize>,
    #[command(flatten)]
    pub order: OrderArgs,
}

#[derive(Debug, Args)]
pub struct InitArgs {
    /// A checkpoint (*.safetensors), or a directory of them (its first checkpoint is used).
    pub ckpt: PathBuf,
    /// The training set (.safetensors or .npz): input shape, preprocessing, loss, classes.
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Spec file to write (never replaced unless --force).
    #[arg(
        long = "output",
        short = 'o',
        value_name = "FILE",
        default_value = "model.toml"
    )]
    pub file: PathBuf,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Write lca.1 and one page per subcommand (lca-analyze.1, ...) into this directory
    /// instead of printing lca.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// The most worker threads `--threads` accepts: more than the cores gain nothing, and a
/// thread costs memory (its stack) and start-up time.
pub const MAX_THREADS: usize = 1024;
/// The largest `--max-splits`: each doubling doubles the gradient evaluations a step may take.
pub const MAX_SPLITS: usize = 1 << 16;

fn max_splits(n: usize) -> anyhow::Result<()> {
    if n < 2 || !n.is_power_of_two() {
        anyhow::bail!("--max-splits must be a power of two ≥ 2, got {n}");
    }
    if n > MAX_SPLITS {
        anyhow::bail!("--max-splits must be at most {MAX_SPLITS}, got {n}");
    }
    Ok(())
}

fn threads(n: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = n {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        if n > MAX_THREADS {
            let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
            anyhow::bail!(
                "--threads must be at most {MAX_THREADS}, got {n} (this machine has {cores} cores)"
            );
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {n} threads: {e}"))?;
    }
    Ok(())
}

/// Write to stdout; a closed pipe (`| head`) is not an error worth reporting.
fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn validate(a: &AnalyzeArgs) -> anyhow::Result<Integration> {
    let tolerance = a.tolerance.unwrap_or(1e-3);
    if !(tolerance >= 0.0 && tolerance.is_finite()) {
        anyhow::bail!("--tolerance must be a finite number ≥ 0, got {tolerance}");
    }
    let explicit = a.tolerance.is_some() || a.rel_tolerance.is_some();
    let policy = match (a.policy, explicit) {
        (Some(Policy::Budget), true) => anyhow::bail!(
            "--tolerance/--rel-tolerance belong to --policy tolerance; drop them or the --policy budget"
        ),
        (Some(p), _) => p,
        (None, true) => Policy::Tolerance,
        (None, false) => Policy::Budget,
    };
    if !(a.target > 0.0 && a.target.is_finite()) {
        anyhow::bail!("--target must be a finite number > 0, got {}", a.target);
    }
    if !(a.max_evals_factor >= 1.0 && a.max_evals_factor.is_finite()) {
        anyhow::bail!(
            "--max-evals-factor must be a finite number ≥ 1, got {}",
            a.max_evals_factor
        );
    }
    if let Some(r) = a.rel_tolerance
        && !(r >= 0.0 && r.is_finite())
    {
        anyhow::bail!("--rel-tolerance must be a finite number ≥ 0, got {r}");
    }
    max_splits(a.max_splits)?;
    if let Some(r) = a.converge_layers {
        if !(r > 0.0 && r.is_finite()) {
            anyhow::bail!("--converge-layers must be a finite number > 0, got {r}");
        }
        if policy != Policy::Budget || a.no_adaptive || a.method != Method::Simpson {
            anyhow::bail!(
                "--converge-layers refines with the budget policy: it needs --method simpson, adaptive refinement and --policy budget (the default)"
            );
        }
    }
    Ok(Integration {
        method: a.method,
        adaptive: !a.no_adaptive && a.method == Method::Simpson,
        abs_tol: tolerance,
        rel_tol: a.rel_tolerance,
        max_splits: a.max_splits,
        policy,
        target: a.target,
        max_evals_factor: a.max_evals_factor,
        converge_layers: a.converge_layers,
        ..Integration::default()
    })
}

fn run_analyze(a: AnalyzeArgs) -> anyhow::Result<()> {
    let integration = validate(&a)?;
    let shard = match (a.shard, a.shards) {
        (Some(s), _) => Some(s),
        (None, Some(n)) => Some(
            crate::shard::Shard::from_env(n, &|k| std::env::var(k).ok())
                .map_err(crate::LcaError::Usage)?,
        ),
        (None, None) => None,
    };
    threads(a.threads)?;
    let torch = match a.engine {
        EngineKind::Torch => Some(crate::analyze::TorchOptions {
            model: a.torch_model.clone(),
            spec: a.spec.clone(),
            device: a.device.clone(),
            chunk_size: a.chunk_size,
            python: a.python.clone(),
        }),
        EngineKind::Builtin => {
            if a.torch_model.is_some()
                || a.chunk_size.is_some()
                || a.python.is_some()
                || a.device != "cpu"
            {
                anyhow::bail!(
                    "--torch-model, --device, --chunk-size and --python apply to --engine torch"
                );
            }
            None
        }
    };
    let (ckpt_dir, spec) = match a.engine {
        // The worker reads a Recorder run itself; a spec is optional (its data and loss keys).
        EngineKind::Torch => (a.ckpts.clone(), a.spec.clone().unwrap_or_default()),
        EngineKind::Builtin => crate::checkpoint::run_dir::resolve(&a.ckpts, a.spec.as_deref())?,
    };
    let opts = AnalyzeOptions {
        ckpt_dir,
        spec,
        torch,
        out: a.out.clone(),
        first: a.select.first,
        last: a.select.last,
        every: a.select.every,
        integration,
        store: (!a.no_lca_tensors).then_some(a.lca_dtype),
        params_csv: a.params_csv,
        quiet: a.quiet,
        precision: a.precision,
        resume: a.resume,
        shard,
        share_first_layer: if a.no_share_first_layer {
            crate::eval::FirstLayerSharing::Never
        } else if a.share_first_layer {
            crate::eval::FirstLayerSharing::Always
        } else {
            crate::eval::FirstLayerSharing::Auto
        },
        verify_loss: !a.no_verify_loss,
        data_order: a.order.order()?,
    };
    crate::interrupt::install();
    let quiet = a.quiet;
    let s = analyze(&opts, &mut |m| {
        if !quiet {
            eprintln!("{m}");
        }
    })?;
    if let Some(k) = shard {
        eprintln!(
            "shard {k}: this is a part; combine all {} with `lca merge`",
            k.count
        );
    }
    print_report(&s, &a.out);
    Ok(())
}

fn run_merge(a: MergeArgs) -> anyhow::Result<()> {
    let s = crate::shard::merge(&a.parts, &a.out)?;
    eprintln!("merged {} parts", a.parts.len());
    print_report(&s, &a.out);
    Ok(())
}

/// The residual report of a finished analysis, on stderr.
fn print_report(s: &crate::output::Summary, out: &std::path::Path) {
    let r = &s.run;
    eprintln!(
        "analysed {} steps ({} → {}) with {} gradient evaluations over {} samples",
        r.steps,
        s.steps.first().map_or(0, |x| x.step),
        s.steps.last().map_or(0, |x| x.next_step),
        r.evaluations,
        s.data.samples
    );
    eprintln!(
        "loss {:.6} → {:.6} (ΔL {:+.6}); ΣLCA {:+.6}",
        r.loss_first, r.loss_last, r.delta_loss, r.lca_sum
    );
    eprintln!(
        "residual: Σ|r|/|ΔL| = {:.4}%, |Σr|/|ΔL| = {:.4}%, max |r_t| = {:.2e}{}",
        100.0 * r.rel_abs_residual,
        100.0 * r.rel_residual,
        r.max_abs_residual,
        if r.capped_steps.is_empty() {
            String::new()
        } else {
            format!(" ({} step(s) at the split cap)", r.capped_steps.len())
        }
    );
    if let Some(v) = &r.validation {
        eprintln!(
            "held-out: loss {:.6} → {:.6} (ΔL {:+.6}); ΣLCA {:+.6}; Σ|r|/|ΔL| = {:.4}%",
            v.loss_first,
            v.loss_last,
            v.delta_loss,
            v.lca_sum,
            100.0 * v.rel_abs_residual
        );
    }
    if let Some(l2) = &r.l2 {
        eprintln!(
            "L2 term λ‖θ‖² (λ = {}): {:.6} → {:.6}, its LCA column sums to {:+.6}; objective ΔL {:+.6}",
            l2.lambda, l2.penalty_first, l2.penalty_last, l2.lca_sum, l2.objective_delta
        );
    }
    eprintln!("wrote {}", out.display());
}

fn run_summarize(a: SummarizeArgs) -> anyhow::Result<()> {
    let sort = a.sort.unwrap_or(match a.by {
        By::Layer | By::Block | By::Tensor | By::Step | By::Head => Sort::Order,
        By::Neuron | By::Param => Sort::Helped,
    });
    let (_, mut table) = view_top(&a.out, a.by, sort, a.top)?;
    table.sort_and_limit(sort, a.top);
    let text = match a.format {
        Format::Table => table.to_text(),
        Format::Csv => table.to_csv()?,
        Format::Json => table.to_json(),
    };
    print(&text);
    Ok(())
}

fn run_plot(a: PlotArgs) -> anyhow::Result<()> {
    let opts = PlotOptions {
        kind: a.kind,
        file: a.file,
        layer: a.layer,
        width: a.width,
        height: a.height,
        by: a.by,
        vocab: a.vocab,
    };
    plot(&a.out, &opts)?;
    eprintln!("wrote {}", opts.file.display());
    Ok(())
}

fn run_report(a: ReportArgs) -> anyhow::Result<()> {
    let opts = crate::html::ReportOptions {
        file: a.file,
        heatmap_layer: a.heatmap_layer,
        top: a.top,
        max_svg_cells: crate::html::MAX_SVG_CELLS,
    };
    let w = crate::html::report(&a.out, &opts)?;
    for m in &w.missing {
        eprintln!("note: figure not included: {m}");
    }
    eprintln!(
        "wrote {} ({} kB, figures: {})",
        w.file.display(),
        w.bytes.div_ceil(1024),
        w.figures.join(", ")
    );
    Ok(())
}

fn run_check(a: CheckArgs) -> anyhow::Result<Status> {
    let opts = CheckOptions {
        max_residual: a.max_residual,
        max_step_residual: a.max_step_residual,
        fail_if_layer_hurts: a.fail_if_layer_hurts,
        max_layer_error: a.max_layer_error,
        baseline: a.baseline,
        rtol: a.rtol,
        atol: a.atol,
    };
    let report = check(&a.out, &opts)?;
    print(&report.to_text());
    Ok(if report.passed() {
        Status::Success
    } else {
        Status::ChecksFailed
    })
}

fn run_inspect(a: InspectArgs) -> anyhow::Result<()> {
    max_splits(a.max_splits)?;
    threads(a.threads)?;
    let (ckpt_dir, spec) = crate::checkpoint::run_dir::resolve(&a.ckpts, a.spec.as_deref())?;
    let opts = InspectOptions {
        ckpt_dir,
        spec,
        first: a.select.first,
        last: a.select.last,
        every: a.select.every,
        method: a.method,
        max_splits: a.max_splits,
        time: !a.no_time,
        data_order: a.order.order()?,
    };
    print(&inspect(&opts)?.to_text());
    Ok(())
}

fn run_init(a: InitArgs) -> anyhow::Result<()> {
    let opts = crate::init::InitOptions {
        ckpt: a.ckpt,
        data: a.data,
        out: a.file,
        force: a.force,
    };
    let d = crate::init::init(&opts)?;
    eprint!("{}", crate::init::draft_notice(&d, &opts.out));
    Ok(())
}

fn run_completions(a: CompletionsArgs) {
    let mut cmd = Cli::command();
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut cmd, "lca", &mut buf);
    print(&String::from_utf8_lossy(&buf));
}

fn run_man(a: ManArgs) -> anyhow::Result<()> {
    let cmd = Cli::command();
    match a.dir {
        None => {
            let mut buf = Vec::new();
            clap_mangen::Man::new(cmd).render(&mut buf)?;
            print(&String::from_utf8_lossy(&buf));
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
            eprintln!("wrote the manual pages to {}", dir.display());
        }
    }
    Ok(())
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<Status> {
    match cli.command {
        Command::Analyze(a) => run_analyze(*a)?,
        Command::Summarize(a) => run_summarize(a)?,
        Command::Plot(a) => run_plot(a)?,
        Command::Report(a) => run_report(a)?,
        Command::Check(a) => return run_check(a),
        Command::Inspect(a) => run_inspect(a)?,
        Command::Init(a) => run_init(a)?,
        Command::Merge(a) => run_merge(a)?,
        Command::Completions(a) => run_completions(a),
        Command::Man(a) => run_man(a)?,
    }
    Ok(Status::Success)
}
