use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = lca::cli::Cli::parse();
    match lca::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
