//! Progress bar over gradient evaluations (indicatif), drawn on stderr only when stderr is a
//! terminal and `--quiet` is not given; `NO_COLOR` turns colour off.
//!
//! The line fits the terminal: the step message is truncated (`wide_msg`) rather than
//! wrapped. A steady tick keeps the elapsed time and spinner moving while one slow evaluation
//! runs. Notes printed while the bar is shown go through [`Progress::suspend`] so they do not
//! tear the bar.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use std::io::IsTerminal;
use std::time::Duration;

/// A progress bar that may be hidden.
pub struct Progress {
    bar: ProgressBar,
}

/// Whether colour is allowed on stderr (the `NO_COLOR` convention: set and non-empty = off).
pub fn colour_allowed() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn rate(state: &ProgressState, w: &mut dyn std::fmt::Write) {
    let r = state.per_sec();
    let _ = if !r.is_finite() || r <= 0.0 {
        write!(w, "-/s")
    } else if r >= 10.0 {
        write!(w, "{r:.0}/s")
    } else if r >= 0.1 {
        write!(w, "{r:.2}/s")
    } else {
        write!(w, "{:.1}s/eval", 1.0 / r)
    };
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
        let template = if colour_allowed() {
            "{spinner:.green} {elapsed_precise} [{bar:20.cyan/blue}] {pos}/{len} evals {rate} ETA {eta}  {wide_msg}"
        } else {
            "{spinner} {elapsed_precise} [{bar:20}] {pos}/{len} evals {rate} ETA {eta}  {wide_msg}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.with_key("rate", rate).progress_chars("=> "));
        }
        if visible {
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Progress { bar }
    }

    /// One more evaluation done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// Set the expected total (adaptive refinement changes it as the run goes).
    pub fn set_length(&self, n: u64) {
        self.bar.set_length(n.max(self.bar.position()));
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

    /// Hide the bar while `f` runs (to print a note above it).
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        self.bar.suspend(f)
    }

    /// Remove the bar.
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl Drop for Progress {
    /// A bar abandoned by an error is cleared, so the error message starts on a clean line.
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}
