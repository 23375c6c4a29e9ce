//! Command-line interface (clap derive): options → run → outputs. Library errors are turned
//! into messages on stderr and a non-zero exit status here.

use crate::analyze::{AnalyzeOptions, Precision, analyze};
use crate::lca::{Integration, Method};
use crate::report::tensors::StoreDtype;
use crate::summarize::{By, Format, Sort, view};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

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
    Analyze(AnalyzeArgs),
    /// Show coarser views of an analysis: per layer, tensor, neuron, step or parameter.
    Summarize(SummarizeArgs),
}

#[derive(Debug, Args)]
pub struct AnalyzeArgs {
    /// Directory of *.safetensors checkpoints (one per training step).
    pub ckpts: PathBuf,
    /// Model spec (architecture, loss, training set): see docs/spec.md.
    #[arg(long, short = 's')]
    pub spec: PathBuf,
    /// Output directory (created; an existing one must be empty or a previous lca output).
    #[arg(long, short = 'o', default_value = "lca-out")]
    pub out: PathBuf,
    /// Only checkpoints with step ≥ FIRST.
    #[arg(long)]
    pub first: Option<u64>,
    /// Only checkpoints with step ≤ LAST.
    #[arg(long)]
    pub last: Option<u64>,
    /// Take every K-th of the selected checkpoints.
    #[arg(long, default_value_t = 1, value_name = "K")]
    pub every: usize,
    /// Integration rule.
    #[arg(long, value_enum, default_value_t = Method::Simpson)]
    pub method: Method,
    /// Do not refine Simpson steps adaptively (plain 1-4-1 Simpson).
    #[arg(long)]
    pub no_adaptive: bool,
    /// Refine a step while |residual| exceeds this (loss units).
    #[arg(long, default_value_t = 1e-3, value_name = "LOSS")]
    pub tolerance: f64,
    /// Also accept a step when |residual| ≤ this fraction of |ΔL| of the step.
    #[arg(long, value_name = "FRACTION")]
    pub rel_tolerance: Option<f64>,
    /// Largest number of Simpson sub-intervals per step (power of two).
    #[arg(long, default_value_t = 32)]
    pub max_splits: usize,
    /// Do not write per-step, per-parameter LCA (lca.safetensors).
    #[arg(long)]
    pub no_lca_tensors: bool,
    /// Element type of lca.safetensors.
    #[arg(long, value_enum, default_value_t = StoreDtype::F32)]
    pub lca_dtype: StoreDtype,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long, short = 'j')]
    pub threads: Option<usize>,
    /// Evaluator arithmetic: f32 (as training; default) or f64 (slower, removes f32 rounding).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// No progress bar or notes on stderr (the final residual report is still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,
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

fn validate(a: &AnalyzeArgs) -> anyhow::Result<Integration> {
    if !(a.tolerance >= 0.0 && a.tolerance.is_finite()) {
        anyhow::bail!(
            "--tolerance must be a finite number ≥ 0, got {}",
            a.tolerance
        );
    }
    if let Some(r) = a.rel_tolerance
        && !(r >= 0.0 && r.is_finite())
    {
        anyhow::bail!("--rel-tolerance must be a finite number ≥ 0, got {r}");
    }
    if a.max_splits < 2 || !a.max_splits.is_power_of_two() {
        anyhow::bail!(
            "--max-splits must be a power of two ≥ 2, got {}",
            a.max_splits
        );
    }
    Ok(Integration {
        method: a.method,
        adaptive: !a.no_adaptive && a.method == Method::Simpson,
        abs_tol: a.tolerance,
        rel_tol: a.rel_tolerance,
        max_splits: a.max_splits,
    })
}

fn run_analyze(a: AnalyzeArgs) -> anyhow::Result<()> {
    let integration = validate(&a)?;
    if let Some(n) = a.threads {
        if n == 0 {
            anyhow::bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {n} threads: {e}"))?;
    }
    let opts = AnalyzeOptions {
        ckpt_dir: a.ckpts,
        spec: a.spec,
        out: a.out.clone(),
        first: a.first,
        last: a.last,
        every: a.every,
        integration,
        store: (!a.no_lca_tensors).then_some(a.lca_dtype),
        quiet: a.quiet,
        precision: a.precision,
    };
    let quiet = a.quiet;
    let s = analyze(&opts, &mut |m| {
        if !quiet {
            eprintln!("{m}");
        }
    })?;
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
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn run_summarize(a: SummarizeArgs) -> anyhow::Result<()> {
    let (_, mut table) = view(&a.out, a.by)?;
    let sort = a.sort.unwrap_or(match a.by {
        By::Layer | By::Block | By::Tensor | By::Step | By::Head => Sort::Order,
        By::Neuron | By::Param => Sort::Helped,
    });
    table.sort_and_limit(sort, a.top);
    let text = match a.format {
        Format::Table => table.to_text(),
        Format::Csv => table.to_csv()?,
        Format::Json => table.to_json(),
    };
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    Ok(())
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Analyze(a) => run_analyze(a),
        Command::Summarize(a) => run_summarize(a),
    }
}
