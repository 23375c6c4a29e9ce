//! Progress bar over gradient evaluations (indicatif), drawn on stderr only when stderr is a
//! terminal and `--quiet` is not given; `NO_COLOR` turns colour off.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

/// A progress bar that may be hidden.
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar over `total` evaluations.
    pub fn new(total: u64, quiet: bool) -> Progress {
        let visible = !quiet && std::io::stderr().is_terminal();
        let target = if visible {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        let bar = ProgressBar::with_draw_target(Some(total), target);
        let color = std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let template = if color {
            "{spinner:.green} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} evals ({per_sec}, ETA {eta}) {msg}"
        } else {
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} evals ({per_sec}, ETA {eta}) {msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress { bar }
    }

    /// One more evaluation done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// `n` evaluations done (a resumed run starts part way).
    pub fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Grow the expected total (adaptive refinement added evaluations).
    pub fn add_length(&self, n: u64) {
        if n > 0 {
            self.bar.inc_length(n);
        }
    }

    /// Show a message beside the bar.
    pub fn message(&self, m: &str) {
        self.bar.set_message(m.to_string());
    }

    /// Remove the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
