use clap::Parser;

fn main() -> std::process::ExitCode {
    match bench::run(bench::Opts::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
