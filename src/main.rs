use clap::Parser;

/// Exit status: 0 success, 1 a failed `lca check`, 2 an error (bad input or usage; clap's own
/// usage errors also exit 2).
fn main() -> std::process::ExitCode {
    lca::alloc::tune();
    let cli = lca::cli::Cli::parse();
    match lca::cli::run(cli) {
        Ok(status) => std::process::ExitCode::from(status.code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            let err = e.downcast_ref::<lca::LcaError>();
            if err.is_some_and(lca::LcaError::resumable) {
                eprintln!("to continue: {}", resume_command());
            }
            match err {
                Some(lca::LcaError::Interrupted(_)) => {
                    std::process::ExitCode::from(lca::interrupt::EXIT_STATUS)
                }
                _ => std::process::ExitCode::from(2),
            }
        }
    }
}

/// This command line with `--resume` (once), quoted for a POSIX shell.
fn resume_command() -> String {
    let quote = |a: &str| {
        if !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
        {
            a.to_string()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    let mut args: Vec<String> = std::env::args_os()
        .map(|a| quote(&a.to_string_lossy()))
        .collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    args.join(" ")
}
