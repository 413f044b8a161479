use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`imgpool image list | head`), as command-line tools do.
    // SAFETY: resetting a signal disposition before any thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = imgpool::cli::Cli::parse();
    imgpool::cli::logs::init(&cli);
    match imgpool::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgpool: {e}");
            ExitCode::FAILURE
        }
    }
}
