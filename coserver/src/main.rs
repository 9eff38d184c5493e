//! `ftvm`: runs a guest on KVM, snapshots and restores it.

mod arbiter;
mod attach;
mod cli;
mod config;
mod link;
mod protocol;
mod recording;
mod run;

use clap::Parser;

/// Process exit code for errors of ftvm itself (as opposed to the guest's exit code).
const EXIT_VMM_ERROR: i32 = 125;

fn main() {
    let args = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match args.command {
        cli::Command::Run(a) => run::run(&a),
        cli::Command::Restore(a) => run::restore(&a),
        cli::Command::Replay(a) => run::replay(&a),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ftvm: error: {e}");
            std::process::exit(EXIT_VMM_ERROR);
        }
    }
}
