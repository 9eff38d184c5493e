//! `ftvm run` and `ftvm restore`: a standalone VM with a live World on stdout.

use std::path::{Path, PathBuf};

use ftvm_devices::world::LiveWorld;
use ftvm_vmm::{IdlePolicy, RunLimits, RunStop, Vm, VmConfig, VmError};

use crate::cli::{Idle, RestoreArgs, RunArgs};

/// Default command line for a kernel given with --kernel.
const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Errors of the run commands.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An input file could not be read.
    #[error("cannot read {what} {path}: {source}")]
    Read {
        /// Which input.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The VM failed.
    #[error("{0}")]
    Vm(#[from] VmError),
    /// The guest stopped before the requested snapshot point.
    #[error("the guest powered off with exit code {code} after {exits} exits, before exit {wanted}; no snapshot written")]
    EndedBeforeSave {
        /// Guest exit code.
        code: u32,
        /// Exits it made.
        exits: u64,
        /// The requested exit.
        wanted: u64,
    },
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn idle_policy(idle: Idle) -> IdlePolicy {
    match idle {
        Idle::Sleep => IdlePolicy::Sleep,
        Idle::Skip => IdlePolicy::Skip,
    }
}

fn stdout_world() -> Box<LiveWorld<std::io::Stdout>> {
    Box::new(LiveWorld::new(std::io::stdout()))
}

/// Boots a VM as `args` say; returns the process exit code.
pub fn run(args: &RunArgs) -> Result<i32, RunError> {
    let (kernel, default_cmdline) = match &args.kernel {
        Some(path) => (read("kernel", path)?, DEFAULT_LINUX_CMDLINE),
        None => (
            ftvm_guest_images::TEST_GUEST_ELF.to_vec(),
            ftvm_guest_images::DEFAULT_CMDLINE,
        ),
    };
    let initrd = args
        .initrd
        .as_deref()
        .map(|p| read("initrd", p))
        .transpose()?;
    let config = VmConfig {
        mem_mib: args.mem,
        kernel,
        cmdline: args
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline.to_string()),
        initrd,
        entropy_seed: args.entropy_seed,
        idle: idle_policy(args.idle),
    };
    let mut vm = Vm::boot(&config, stdout_world())?;
    let limits = RunLimits {
        max_exits: args.save_at_exit,
        stop_at_marker: None,
    };
    match (vm.run(&limits)?, &args.save, args.save_at_exit) {
        (RunStop::ExitLimit, Some(dir), _) => {
            vm.save(dir)?;
            if args.report {
                print_report(&vm, None)?;
            }
            Ok(0)
        }
        (RunStop::PowerOff(code), Some(_), Some(wanted)) => Err(RunError::EndedBeforeSave {
            code,
            exits: vm.exits(),
            wanted,
        }),
        (stop, _, _) => finish(&vm, stop, args.report),
    }
}

/// Continues a VM from a snapshot; returns the process exit code.
pub fn restore(args: &RestoreArgs) -> Result<i32, RunError> {
    let mut vm = Vm::restore(&args.dir, stdout_world(), idle_policy(args.idle))?;
    let stop = vm.run(&RunLimits::default())?;
    finish(&vm, stop, args.report)
}

fn finish(vm: &Vm, stop: RunStop, report: bool) -> Result<i32, RunError> {
    let code = match stop {
        RunStop::PowerOff(code) => code,
        // Without limits the loop only returns on power-off.
        RunStop::ExitLimit | RunStop::Marker(_) => 0,
    };
    if report {
        print_report(vm, Some(code))?;
    }
    Ok(code as i32)
}

/// Prints the report on stderr, so that stdout stays exactly the guest's console bytes
/// (a run stopped for a snapshot may end in the middle of a console line).
fn print_report(vm: &Vm, exit_code: Option<u32>) -> Result<(), RunError> {
    let mut lines = format!(
        "exits: {}\nexit-trace: {:016x}\nmemory-hash: {:016x}\n",
        vm.exits(),
        vm.exit_trace(),
        vm.memory_hash()?
    );
    if let Some(code) = exit_code {
        lines.push_str(&format!("exit-code: {code}\n"));
    }
    eprint!("{lines}");
    Ok(())
}
