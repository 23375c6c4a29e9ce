//! Verification against PyTorch: the loss lca computes at the run's first checkpoint is
//! compared with the loss the Python Recorder stored in that checkpoint's header metadata
//! (`lca.torch_loss`, docs/recorder.md), before any step is integrated and before any output
//! is committed.
//!
//! Both losses are the same number (the mean per-term loss over the whole training set, the
//! model in evaluation mode), computed from the same float32 model output with float64
//! accumulation, so they differ only by float rounding: measured ≤ 1.3·10⁻⁸ on resnet18 and
//! ~10⁻⁹ on small models. The tolerance is [`tolerance`]: 16 units of the model dtype's
//! machine epsilon (2⁻²³ for float32, as lca itself evaluates in float32) relative to
//! max(1, |loss|), i.e. 1.9·10⁻⁶ for a float32 model with a loss near 1. A wrong spec
//! (a head count, an activation, a stride, the input scaling, the batch-norm mode) moves the
//! loss far more; a few wrong specs move it less and pass (GELU's tanh form instead of the
//! exact one changed a small CNN's loss by 10⁻⁷).

use crate::checkpoint::CheckpointFile;
use crate::data::DataOrder;
use crate::error::{LcaError, Result};
use crate::output::LossCheck;
use crate::spec::BnMode;

/// The loss the Recorder stored in a checkpoint's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct TorchLoss {
    pub loss: f64,
    /// The dtype of the model output the loss was computed from (`float32`, ...).
    pub dtype: String,
    /// The batch-norm mode it was computed in (`running-stats` / `batch-stats`), when given.
    pub batch_norm: Option<String>,
    /// The row order of its evaluation chunks (`lca.data_order`, `lca.data_seed`); `None`
    /// when not recorded (Recorders before the option evaluated in file order).
    pub order: Option<DataOrder>,
}

impl TorchLoss {
    /// Whether this loss can be compared with lca's, computed with batch norm `spec_bn` and
    /// the rows in `order`: in batch-stats mode the row order must be the same (the chunks'
    /// statistics depend on it). `Err` says why not.
    pub fn comparable(
        &self,
        spec_bn: Option<BnMode>,
        order: DataOrder,
    ) -> std::result::Result<(), String> {
        let theirs = self.order.unwrap_or(DataOrder::File);
        if spec_bn == Some(BnMode::BatchStats)
            && self.batch_norm.as_deref() == Some("batch-stats")
            && theirs != order
        {
            return Err(format!(
                "PyTorch's loss was computed with batch statistics on the rows in {theirs}, lca evaluates them in {order}: the losses are not comparable and were not compared (pass {} to compare them)",
                theirs.flags()
            ));
        }
        Ok(())
    }
}

/// The metadata key holding PyTorch's loss.
pub const TORCH_LOSS_KEY: &str = "lca.torch_loss";

/// PyTorch's loss stored in `file`'s metadata, if any (only safetensors files carry it).
pub fn recorded(file: &CheckpointFile) -> Result<Option<TorchLoss>> {
    let path = &file.path;
    if !path.is_file() || path.extension().is_none_or(|e| e != "safetensors") {
        return Ok(None);
    }
    let (_, header) = crate::checkpoint::read_header(path)?;
    let Some(meta) = header.get("__metadata__").and_then(|m| m.as_object()) else {
        return Ok(None);
    };
    let text = |k: &str| meta.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let Some(raw) = text(TORCH_LOSS_KEY) else {
        return Ok(None);
    };
    let loss: f64 = raw
        .trim()
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .ok_or_else(|| LcaError::Checkpoint {
            path: path.clone(),
            msg: format!("metadata `{TORCH_LOSS_KEY}` is {raw:?}, not a finite number"),
        })?;
    let order_name = text("lca.data_order");
    let seed = match text("lca.data_seed") {
        None => None,
        Some(s) => Some(s.trim().parse::<u64>().map_err(|_| LcaError::Checkpoint {
            path: path.clone(),
            msg: format!("metadata `lca.data_seed` is {s:?}, not an unsigned integer"),
        })?),
    };
    let order = match order_name.as_deref() {
        None => None,
        Some(name) => Some(DataOrder::from_parts(Some(name), seed).ok_or_else(|| {
            LcaError::Checkpoint {
                path: path.clone(),
                msg: format!(
                    "metadata `lca.data_order` is {name:?} (expected \"shuffled\" with `lca.data_seed`, or \"file\")"
                ),
            }
        })?),
    };
    Ok(Some(TorchLoss {
        loss,
        dtype: text("lca.torch_loss_dtype").unwrap_or_else(|| "float32".into()),
        batch_norm: text("lca.batch_norm"),
        order,
    }))
}

/// Machine epsilon of the dtype PyTorch's loss was computed from; lca evaluates in float32,
/// so float64 models are held to float32's.
fn epsilon(dtype: &str) -> f64 {
    match dtype {
        "float16" | "half" => f64::from(half::f16::EPSILON),
        "bfloat16" => f64::from(half::bf16::EPSILON),
        _ => f64::from(f32::EPSILON),
    }
}

/// The largest difference float rounding explains: 16 ε(dtype) · max(1, |loss|).
pub fn tolerance(torch: &TorchLoss) -> f64 {
    16.0 * epsilon(&torch.dtype) * torch.loss.abs().max(1.0)
}

/// The comparison of lca's loss at `file` with PyTorch's.
pub fn compare(
    file: &CheckpointFile,
    torch: &TorchLoss,
    lca_loss: f64,
    enforced: bool,
) -> LossCheck {
    let difference = lca_loss - torch.loss;
    let tolerance = tolerance(torch);
    LossCheck {
        checkpoint: file.path.display().to_string(),
        step: file.step,
        torch_loss: torch.loss,
        torch_dtype: torch.dtype.clone(),
        torch_batch_norm: torch.batch_norm.clone(),
        lca_loss,
        difference,
        tolerance,
        agree: difference.abs() <= tolerance,
        enforced,
    }
}

fn bn_name(m: BnMode) -> &'static str {
    match m {
        BnMode::BatchStats => "batch-stats",
        BnMode::RunningStats => "running-stats",
    }
}

/// The message for losses that disagree: both numbers, their difference and the likely
/// causes. `spec_bn` is the spec's batch-norm mode when the model has batch norm.
pub fn mismatch_message(c: &LossCheck, spec_bn: Option<BnMode>) -> String {
    let mut causes = vec![
        "the spec: a layer hyperparameter (stride, padding, kernel, pooling, activation, eps, \
         attention head count `n_head`/`num_heads`, `causal`, tied weights) differs from the \
         trained module's"
            .to_string(),
        "preprocessing: `[data]` scale/mean/std or `[model] input_shape` do not give the inputs \
         the module saw (the Recorder's data are stored unscaled)"
            .to_string(),
    ];
    let bn = match (spec_bn, c.torch_batch_norm.as_deref()) {
        (Some(m), Some(t)) if bn_name(m) != t => format!(
            "batch-norm mode: the spec says `batch_norm = \"{}\"` but PyTorch's loss was computed with \"{t}\"",
            bn_name(m)
        ),
        _ => "batch-norm mode (`[model] batch_norm`: running-stats is PyTorch's model.eval(); \
              batch-stats also depends on `[eval] chunk_size`)"
            .to_string(),
    };
    causes.push(bn);
    format!(
        "lca's loss at step {} ({}) is {:.10} but PyTorch's (recorded in its metadata `{TORCH_LOSS_KEY}`, {}) is {:.10}: \
         they differ by {:.3e}, more than float rounding explains ({:.3e}). The spec or data do not describe the trained model. \
         Likely causes:\n{}\n(--no-verify-loss analyses anyway)",
        c.step,
        c.checkpoint,
        c.lca_loss,
        c.torch_dtype,
        c.torch_loss,
        c.difference,
        c.tolerance,
        causes
            .iter()
            .map(|s| format!("  - {s}"))
            .collect::<Vec<_>>()
            .join("\n")
    )
}

/// Compare lca's loss at `file` with PyTorch's when the file carries it: `Ok(None)` when it
/// does not; an error when they disagree and `enforced`; otherwise the comparison (a note is
/// given either way).
pub fn check(
    file: &CheckpointFile,
    lca_loss: f64,
    enforced: bool,
    spec_bn: Option<BnMode>,
    order: DataOrder,
    note: &mut dyn FnMut(&str),
) -> Result<Option<LossCheck>> {
    let Some(torch) = recorded(file)? else {
        return Ok(None);
    };
    if let Err(why) = torch.comparable(spec_bn, order) {
        note(&format!("note: {}: {why}", file.path.display()));
        return Ok(None);
    }
    let c = compare(file, &torch, lca_loss, enforced);
    if c.agree {
        note(&format!(
            "note: lca's loss at step {} agrees with PyTorch's ({:.10} vs {:.10}, difference {:.2e} ≤ {:.2e})",
            c.step, c.lca_loss, c.torch_loss, c.difference, c.tolerance
        ));
    } else if enforced {
        return Err(LcaError::LossMismatch(mismatch_message(&c, spec_bn)));
    } else {
        note(&format!(
            "warning: --no-verify-loss: {}",
            mismatch_message(&c, spec_bn)
        ));
    }
    Ok(Some(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::StepSource;

    fn file() -> CheckpointFile {
        CheckpointFile {
            path: "step_000000.safetensors".into(),
            step: 0,
            step_source: StepSource::Metadata,
            len: 0,
            identity: None,
            tensors: Vec::new(),
        }
    }

    fn torch(loss: f64, dtype: &str) -> TorchLoss {
        TorchLoss {
            loss,
            dtype: dtype.into(),
            batch_norm: Some("running-stats".into()),
            order: None,
        }
    }

    #[test]
    fn rounding_passes_and_a_wrong_head_count_does_not() {
        let t = torch(3.692366425646469, "float32");
        // The measured rounding differences pass.
        assert!(compare(&file(), &t, t.loss + 1.3e-8, true).agree);
        assert!(compare(&file(), &t, t.loss - 1e-9, true).agree);
        // The n_head = 1 instead of 4 on nanoGPT: 2.3e-5.
        assert!(!compare(&file(), &t, t.loss + 2.3e-5, true).agree);
        assert!(!compare(&file(), &t, t.loss - 6.8e-4, true).agree);
        // GELU tanh vs exact (1e-7) is below rounding: a documented limitation.
        assert!(compare(&file(), &t, t.loss + 1e-7, true).agree);
        let tol = tolerance(&t);
        assert!(tol > 5e-6 && tol < 8e-6, "{tol}");
        // Small losses: an absolute floor of 16 ε.
        assert!((tolerance(&torch(1e-3, "float32")) - 16.0 * 1.1920929e-7).abs() < 1e-12);
        // Half precision is looser.
        assert!(tolerance(&torch(1.0, "bfloat16")) > 0.1);
    }

    #[test]
    fn batch_stats_losses_in_another_row_order_are_not_compared() {
        let mut t = torch(2.0, "float32");
        let shuffled = DataOrder::Shuffled { seed: 0 };
        // Running statistics: the order does not matter.
        assert!(t.comparable(Some(BnMode::RunningStats), shuffled).is_ok());
        t.batch_norm = Some("batch-stats".into());
        // Not recorded: file order.
        let e = t
            .comparable(Some(BnMode::BatchStats), shuffled)
            .unwrap_err();
        assert!(e.contains("--data-order file"), "{e}");
        assert!(
            t.comparable(Some(BnMode::BatchStats), DataOrder::File)
                .is_ok()
        );
        t.order = Some(DataOrder::Shuffled { seed: 3 });
        let e = t
            .comparable(Some(BnMode::BatchStats), shuffled)
            .unwrap_err();
        assert!(e.contains("--data-seed 3"), "{e}");
        assert!(
            t.comparable(Some(BnMode::BatchStats), DataOrder::Shuffled { seed: 3 })
                .is_ok()
        );
    }

    #[test]
    fn the_message_has_both_losses_the_difference_and_the_causes() {
        let t = torch(2.0, "float32");
        let c = compare(&file(), &t, 2.001, true);
        let m = mismatch_message(&c, Some(BnMode::BatchStats));
        for s in [
            "2.0010000000",
            "2.0000000000",
            "1.000e-3",
            "n_head",
            "scale/mean/std",
            "input_shape",
            "batch_norm = \"batch-stats\"",
            "\"running-stats\"",
            "--no-verify-loss",
        ] {
            assert!(m.contains(s), "{s} missing from {m}");
        }
        let mut notes = Vec::new();
        // No file on disk: nothing recorded, nothing checked.
        assert!(
            check(&file(), 1.0, true, None, DataOrder::File, &mut |m| notes
                .push(m.to_string()))
            .unwrap()
            .is_none()
        );
    }
}
