//! `ftvm run`, `ftvm restore` and `ftvm replay`: a standalone VM with a live, recording
//! or replaying World.

use std::path::{Path, PathBuf};

use ftvm_devices::world::record::RecordingWorld;
use ftvm_devices::world::replay::ReplayWorld;
use ftvm_devices::world::World;
use ftvm_vmm::input_watch::InputDelivery;
use ftvm_vmm::{snapshot, Attachments, RunLimits, RunStop, Vm, VmConfig, VmError};

use crate::attach::{self, AttachError};
use crate::cli::{ReplayArgs, RestoreArgs, RunArgs};
use crate::recording::{self, KernelSource, Recording, RecordingError, Summary};

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
    /// Disk or tap.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// A recording file.
    #[error(transparent)]
    Recording(#[from] RecordingError),
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
    /// A replay did not retrace its recording.
    #[error("the replay differs from the recording: {0}")]
    ReplayDiffers(String),
    /// --record together with --save.
    #[error("--record records a whole run; it cannot be combined with --save-at-exit")]
    RecordWithSave,
    /// Recording needs deterministic input delivery.
    #[error("--record needs inputs delivered at exits (--inputs at-exits): asynchronous inputs are not replayable")]
    RecordAsync,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, RunError> {
    std::fs::read(path).map_err(|source| RunError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn attachments(args: &crate::cli::AttachArgs) -> Result<Attachments, RunError> {
    Ok(Attachments {
        disks: args
            .disk
            .as_deref()
            .map(attach::parse_disk)
            .transpose()?
            .into_iter()
            .collect(),
        tap: args.tap.clone(),
    })
}

/// Boots a VM as `args` say; returns the process exit code.
pub fn run(args: &RunArgs) -> Result<i32, RunError> {
    if args.record.is_some() && args.save.is_some() {
        return Err(RunError::RecordWithSave);
    }
    if args.record.is_some() && args.inputs() == InputDelivery::Async {
        return Err(RunError::RecordAsync);
    }
    let (kernel, source, default_cmdline) = match &args.kernel {
        Some(path) => {
            let bytes = read("kernel", path)?;
            let hash = xxhash_rust::xxh3::xxh3_64(&bytes);
            (
                bytes,
                KernelSource::File {
                    path: path.clone(),
                    hash,
                },
                DEFAULT_LINUX_CMDLINE,
            )
        }
        None => (
            ftvm_guest_images::TEST_GUEST_ELF.to_vec(),
            KernelSource::Builtin,
            ftvm_guest_images::DEFAULT_CMDLINE,
        ),
    };
    let initrd = args
        .initrd
        .as_deref()
        .map(|p| read("initrd", p))
        .transpose()?;
    let attachments = attachments(&args.attach)?;
    let mac = attach::parse_mac(&args.mac)?;
    let (live, devices) =
        attach::live_world(&attachments, mac, args.idle, args.attach.console_input)?;
    let cmdline = args
        .cmdline
        .clone()
        .unwrap_or_else(|| default_cmdline.to_string());
    let config = VmConfig {
        mem_mib: args.mem,
        kernel,
        cmdline: cmdline.clone(),
        initrd,
        entropy_seed: args.entropy_seed,
        cpu_template: args.cpu_template,
        devices: devices.clone(),
        attachments: attachments.clone(),
    };
    let has_network = attachments.tap.is_some();
    let (world, log): (Box<dyn World>, _) = match &args.record {
        Some(_) => {
            let rec = RecordingWorld::new(live);
            let log = rec.log_handle();
            (Box::new(rec), Some(log))
        }
        None => (Box::new(live), None),
    };
    let mut vm = Vm::boot(&config, world)?;
    if args.inputs() == InputDelivery::Async {
        vm.deliver_inputs_asynchronously();
    }
    let limits = RunLimits {
        max_exits: args.save_at_exit,
        stop_at_marker: None,
    };
    let stop = run_reporting(&mut vm, &limits, args.report)?;
    if let (RunStop::ExitLimit, Some(dir)) = (stop, &args.save) {
        vm.save(dir)?;
        if args.report {
            print_report(&vm, None)?;
        }
        return Ok(0);
    }
    if let (RunStop::PowerOff(code), Some(wanted)) = (stop, args.save_at_exit) {
        return Err(RunError::EndedBeforeSave {
            code,
            exits: vm.exits(),
            wanted,
        });
    }
    let code = exit_code(stop);
    if let (Some(path), Some(log)) = (&args.record, log) {
        let log = log.lock().map(|l| l.clone()).unwrap_or_default();
        recording::write(
            path,
            &Recording {
                kernel: source,
                cmdline,
                mem_mib: args.mem,
                entropy_seed: args.entropy_seed,
                cpu_template: args.cpu_template,
                devices,
                has_network,
                log,
                summary: summary(&vm, code)?,
            },
        )?;
    }
    if args.report {
        print_report(&vm, Some(code))?;
    }
    Ok(code as i32)
}

/// Continues a VM from a snapshot; returns the process exit code.
pub fn restore(args: &RestoreArgs) -> Result<i32, RunError> {
    let state = snapshot::read_state(&args.dir).map_err(VmError::from)?;
    let mut attachments = state.attachments.clone();
    if let Some(disk) = &args.attach.disk {
        attachments.disks = vec![attach::parse_disk(disk)?];
    }
    if args.attach.tap.is_some() {
        attachments.tap = args.attach.tap.clone();
    }
    let saved_devices: Vec<_> = state
        .devices
        .virtio
        .iter()
        .map(|v| v.config().clone())
        .collect();
    drop(state);
    let mac = saved_devices
        .iter()
        .find_map(|d| match *d {
            ftvm_devices::virtio::DeviceConfig::Net { mac } => Some(mac),
            _ => None,
        })
        .unwrap_or([0x52, 0x54, 0, 0xf7, 0, 1]);
    let (live, devices) =
        attach::live_world(&attachments, mac, args.idle, args.attach.console_input)?;
    attach::check_matches(&saved_devices, &devices)?;
    let mut vm = Vm::restore(&args.dir, Box::new(live))?;
    if InputDelivery::from(args.inputs) == InputDelivery::Async {
        vm.deliver_inputs_asynchronously();
    }
    let stop = run_reporting(&mut vm, &RunLimits::default(), args.report)?;
    let code = exit_code(stop);
    if args.report {
        print_report(&vm, Some(code))?;
    }
    Ok(code as i32)
}

/// Replays a recording and checks it retraces the recorded run.
pub fn replay(args: &ReplayArgs) -> Result<i32, RunError> {
    let rec = recording::read(&args.log)?;
    let kernel = match &rec.kernel {
        KernelSource::Builtin => ftvm_guest_images::TEST_GUEST_ELF.to_vec(),
        KernelSource::File { path, hash } => {
            let bytes = read("kernel", path)?;
            if xxhash_rust::xxh3::xxh3_64(&bytes) != *hash {
                return Err(RunError::ReplayDiffers(format!(
                    "kernel {} changed since the recording",
                    path.display()
                )));
            }
            bytes
        }
    };
    let config = VmConfig {
        mem_mib: rec.mem_mib,
        kernel,
        cmdline: rec.cmdline.clone(),
        initrd: None,
        entropy_seed: rec.entropy_seed,
        cpu_template: rec.cpu_template,
        devices: rec.devices.clone(),
        attachments: Attachments::default(),
    };
    let world = ReplayWorld::new(rec.log.clone(), rec.has_network);
    let outputs = world.outputs();
    let mut vm = Vm::boot(&config, Box::new(world))?;
    let stop = vm.run(&RunLimits::default())?;
    let code = exit_code(stop);
    if let Ok(o) = outputs.lock() {
        // The replayed console goes to stdout like a live run's.
        use std::io::Write;
        let _ = std::io::stdout().write_all(&o.console);
    }
    if args.report {
        print_report(&vm, Some(code))?;
    }
    let got = summary(&vm, code)?;
    if got != rec.summary {
        return Err(RunError::ReplayDiffers(format!(
            "recorded {:?}, replayed {:?}",
            rec.summary, got
        )));
    }
    Ok(code as i32)
}

fn exit_code(stop: RunStop) -> u32 {
    match stop {
        RunStop::PowerOff(code) => code,
        RunStop::Reset => {
            eprintln!(
                "ftvm: the guest asked to reboot; ftvm run ends here (as QEMU's -no-reboot does)"
            );
            0
        }
        // Without limits (and no replication World) the loop only returns on power-off.
        RunStop::ExitLimit | RunStop::Marker(_) | RunStop::Paused => 0,
    }
}

fn summary(vm: &Vm, exit_code: u32) -> Result<Summary, RunError> {
    Ok(Summary {
        exits: vm.exits(),
        exit_trace: vm.exit_trace(),
        memory_hash: vm.memory_hash()?,
        output_digest: vm.output_digest(),
        exit_code,
    })
}

/// Runs `vm`; if the run fails and a report was asked for, prints what the report can
/// say (without an exit code) before the error.
fn run_reporting(vm: &mut Vm, limits: &RunLimits, report: bool) -> Result<RunStop, RunError> {
    match vm.run(limits) {
        Ok(stop) => Ok(stop),
        Err(e) => {
            if report {
                print_report(vm, None)?;
            }
            Err(e.into())
        }
    }
}

/// Prints the report on stderr, so that stdout stays exactly the guest's console bytes
/// (a run stopped for a snapshot may end in the middle of a console line).
fn print_report(vm: &Vm, exit_code: Option<u32>) -> Result<(), RunError> {
    let mut lines = format!(
        "exits: {}\nexit-trace: {:016x}\nmemory-hash: {:016x}\noutput-digest: {:016x}\n",
        vm.exits(),
        vm.exit_trace(),
        vm.memory_hash()?,
        vm.output_digest()
    );
    lines.push_str(&format!("fallbacks: {}\n", vm.fallback_counts()));
    if let Some(code) = exit_code {
        lines.push_str(&format!("exit-code: {code}\n"));
    }
    eprint!("{lines}");
    Ok(())
}
