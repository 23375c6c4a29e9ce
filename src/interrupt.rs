//! Ctrl-C (SIGINT), SIGTERM and SIGHUP during `lca analyze`: the first signal asks the run to
//! stop at the next gradient evaluation or step boundary, so that the resume journal is left
//! at the last finished step and the process exits with status 130 and a message saying how to
//! continue; a second signal exits at once (the journal is consistent at every moment, so
//! that is safe too, only less tidy).

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Exit status of an interrupted run (128 + SIGINT, as shells report it).
pub const EXIT_STATUS: u8 = 130;

/// Install the handler (once per process; later calls do nothing).
pub fn install() {
    let _ = ctrlc::set_handler(|| {
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
