//! Ctrl-C (SIGINT), SIGTERM and SIGHUP during `lca analyze`: the first signal asks the run to
//! stop at the next gradient evaluation or step boundary, so that the resume journal is left
//! at the last finished step and the process exits with status 130 and a message saying how to
//! continue; a second signal exits at once (the journal is consistent at every moment, so
//! that is safe too, only less tidy).
//!
//! Only the step loop stops gracefully (it checks [`requested`] at every gradient
//! evaluation): before it starts ([`set_graceful`]), while the inputs are read, hashed and
//! checked, the first signal exits at once with status 130, so that a run reading a slow or
//! huge input always ends promptly (nothing has been computed yet; the journal, if one is
//! being opened, is consistent at every moment).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);
static GRACEFUL: AtomicBool = AtomicBool::new(false);

/// Exit status of an interrupted run (128 + SIGINT, as shells report it).
pub const EXIT_STATUS: u8 = 130;

/// Install the handler (once per process; later calls do nothing).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
        if !GRACEFUL.load(Ordering::SeqCst) {
            eprintln!(
                "\nlca: interrupted while reading the inputs; exiting (nothing was computed)"
            );
            std::process::exit(EXIT_STATUS as i32);
        }
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\nlca: interrupted again, exiting now (the resume journal is consistent)");
            std::process::exit(EXIT_STATUS as i32);
        }
        eprintln!(
            "\nlca: interrupt received; stopping after the current gradient evaluation (interrupt again to exit at once)"
        );
    });
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// From now on the first signal asks the run to stop at its next check instead of exiting at
/// once (called when the step loop starts, which checks [`requested`]).
pub fn set_graceful(on: bool) {
    GRACEFUL.store(on, Ordering::SeqCst);
}
