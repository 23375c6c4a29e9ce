use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = lca::cli::Cli::parse();
    match lca::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            match e.downcast_ref::<lca::LcaError>() {
                Some(lca::LcaError::Interrupted(_)) => {
                    std::process::ExitCode::from(lca::interrupt::EXIT_STATUS)
                }
                _ => std::process::ExitCode::from(2),
            }
        }
    }
}
