//! `ftvm`: runs a guest on KVM, snapshots and restores it.

use clap::Parser;
use ftvm_coserver::{cli, ctl, demo, node, run};

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
        cli::Command::Run(a) => run::run(&a).map_err(|e| e.to_string()),
        cli::Command::Restore(a) => run::restore(&a).map_err(|e| e.to_string()),
        cli::Command::Replay(a) => run::replay(&a).map_err(|e| e.to_string()),
        cli::Command::Coserver(a) => node::run(
            &a.config,
            node::StartOptions {
                initial_primary: a.initial_primary,
                discard_replica: a.discard_replica,
            },
        )
        .map_err(|e| e.to_string()),
        cli::Command::Ctl(a) => ctl::run(&a).map_err(|e| e.to_string()),
        cli::Command::Arbiter(cli::ArbiterArgs {
            command: cli::ArbiterCommand::Init { dir },
        }) => ftvm_coserver::arbiter::Arbiter::init(&dir)
            .map(|id| {
                println!("arbiter directory {} has identity {id:016x}", dir.display());
                0
            })
            .map_err(|e| e.to_string()),
        cli::Command::Demo(a) => demo::run(&demo::DemoOptions {
            kill_after: std::time::Duration::from_secs_f64(a.kill_after.clamp(0.0, 3600.0)),
            blocks: a.blocks.clamp(16, 1 << 20),
            dir: a.dir,
            mode: match a.mode {
                cli::DemoMode::Checkpoint => ftvm_coserver::protocol::ReplicationMode::Checkpoint,
                cli::DemoMode::Lockstep => ftvm_coserver::protocol::ReplicationMode::Lockstep,
            },
            network: match a.network {
                cli::DemoNetwork::On => true,
                cli::DemoNetwork::Off => false,
                // SAFETY: geteuid has no preconditions and cannot fail.
                cli::DemoNetwork::Auto => (unsafe { libc::geteuid() }) == 0,
            },
        })
        .map_err(|e| e.to_string()),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ftvm: error: {e}");
            std::process::exit(EXIT_VMM_ERROR);
        }
    }
}
