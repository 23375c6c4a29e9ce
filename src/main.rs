use clap::Parser;

/// Exit status: 0 success, 1 a failed `lca check`, 2 an error (bad input or usage; clap's own
/// usage errors also exit 2).
fn main() -> std::process::ExitCode {
    let cli = lca::cli::Cli::parse();
    match lca::cli::run(cli) {
        Ok(status) => std::process::ExitCode::from(status.code()),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
