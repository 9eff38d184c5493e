//! Command-line definitions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ftvm_vmm::cpu_template::CpuTemplate;
use ftvm_vmm::input_watch::InputDelivery;

/// ftvm — a fault-tolerant virtual machine runner on KVM.
#[derive(Debug, Parser)]
#[command(name = "ftvm", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a guest (the built-in test guest unless --kernel is given) and stream its
    /// console to stdout; exits with the guest's exit code.
    Run(RunArgs),
    /// Continue a VM from a snapshot directory written by `run --save`.
    Restore(RestoreArgs),
    /// Re-run a recorded run (`run --record`) from its input log, with no disk or tap,
    /// and report whether it retraced the recording.
    Replay(ReplayArgs),
    /// Run one CoServer of a fault-tolerant pair (docs/operations.md).
    Coserver(CoserverArgs),
    /// Query a running CoServer.
    Ctl(CtlArgs),
    /// Prepare a shared-storage arbiter directory.
    Arbiter(ArbiterArgs),
    /// Run a pair on this machine (two CoServers, two loopback links, the built-in guest
    /// with a disk), kill the primary partway and show the guest carrying on.
    Demo(DemoArgs),
}

/// Options of `ftvm arbiter`.
#[derive(Debug, Args)]
pub struct ArbiterArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ArbiterCommand,
}

/// `ftvm arbiter` subcommands.
#[derive(Debug, Subcommand)]
pub enum ArbiterCommand {
    /// Give an (existing, shared) arbiter directory its identity, once; prints it. Both
    /// CoServers then refuse to claim in any directory of another identity.
    Init {
        /// The directory on the shared storage.
        dir: PathBuf,
    },
}

/// Options of `ftvm demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Seconds the pair runs protected before the primary is killed.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub kill_after: f64,
    /// Blocks the guest's disk workload writes and verifies.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub blocks: u64,
    /// Keep configurations and disk replicas in DIR (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Give the guest a network with a TCP client: `auto` does when run as root.
    #[arg(long, value_enum, default_value_t = DemoNetwork::Auto)]
    pub network: DemoNetwork,
    /// How the pair replicates the guest.
    #[arg(long, value_enum, default_value_t = DemoMode::Checkpoint)]
    pub mode: DemoMode,
}

/// The demo pair's replication mode.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DemoMode {
    /// Epochs ended by checkpoints.
    Checkpoint,
    /// The secondary replays the primary's input log.
    Lockstep,
}

/// Whether the demo gives the guest a network.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum DemoNetwork {
    /// When run as root.
    Auto,
    /// Always (fails without root).
    On,
    /// Never.
    Off,
}

/// Options of `ftvm coserver`.
#[derive(Debug, Args)]
pub struct CoserverArgs {
    /// The CoServer's configuration (TOML).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// First deployment: this host's disk holds the guest's data. Records it as the
    /// pair's data (once; a replica already recorded whole is left as it is). Without
    /// it a host whose replica holds no pair data never boots the guest.
    #[arg(long, conflicts_with = "discard_replica")]
    pub initial_primary: bool,
    /// Discard what this host's replica holds: it boots nothing and is overwritten by a
    /// copy from the other host (when both hosts hold differing data, on the one whose
    /// data is not kept).
    #[arg(long)]
    pub discard_replica: bool,
}

/// Options of `ftvm ctl`.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The CoServer's control address (host:port).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7200")]
    pub connect: String,
    /// For actions sent from another host: the CoServer's token (the file
    /// `control-token` in its state directory, copied here).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// What to ask.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `ftvm ctl` subcommands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Role, peer, links, epochs, pauses, output-commit delay, replication rate, alerts.
    Status {
        /// Print the JSON document instead.
        #[arg(long)]
        json: bool,
        /// Redraw every second (a join's copy as a progress bar) until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// On the primary of a protected pair: hand the guest to the secondary (this node
    /// becomes its secondary); waits until it has.
    Switchover {
        /// Return once the primary accepted, without waiting for the handover.
        #[arg(long)]
        no_wait: bool,
    },
    /// On the secondary: leave the pair cleanly (the primary runs on degraded); the
    /// CoServer exits. Start it again to rejoin.
    Leave,
    /// Re-read the configuration file: a replacement peer's link addresses.
    Reload,
    /// On a starting CoServer that waits because the other host ran the guest later:
    /// run the guest from this host's replica anyway. Only once the other host is known
    /// to be gone for good: what the guest did there since is lost.
    ForcePrimary,
}

/// How an idle guest waits for its timer.
#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum Idle {
    /// Sleep until the host clock reaches the guest's deadline.
    #[default]
    Sleep,
    /// Skip ahead at once (same guest-visible behaviour, less wall time).
    Skip,
}

/// When frames and console input reach the guest.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Inputs {
    /// Only at VM exits: runs are deterministic (recordable, replayable, lockstep);
    /// the built-in test guest's default.
    AtExits,
    /// As they arrive, kicking the vCPU out of KVM: for guests that idle inside KVM,
    /// such as Linux (the default with --kernel).
    Async,
}

/// Where the guest's console input comes from.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum ConsoleIn {
    /// This process's stdin (end of file ends input; the guest keeps running).
    #[default]
    Stdin,
    /// No console input.
    None,
}

/// Host attachments shared by `run` and `restore`.
#[derive(Debug, Args, Clone, Default)]
pub struct AttachArgs {
    /// Source of the guest's console (COM1) input.
    #[arg(long, value_enum, value_name = "FROM", default_value_t = ConsoleIn::Stdin)]
    pub console_input: ConsoleIn,
    /// Disk image for a virtio-blk device; append ",ro" for a read-only disk.
    #[arg(long, value_name = "FILE[,ro]")]
    pub disk: Option<String>,
    /// Existing tap interface for a virtio-net device.
    #[arg(long, value_name = "IFNAME")]
    pub tap: Option<String>,
}

/// Options of `ftvm run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF (vmlinux or similar) or a bzImage. Default: the built-in
    /// test guest.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Kernel command line. For the built-in guest it selects the workload and its
    /// parameters, e.g. "workload=counter pages=1024 steps=8 tick_ms=10".
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 128)]
    pub mem: u64,
    /// Seed of the guest's entropy stream (runs with the same seed are identical).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub entropy_seed: u64,
    /// The CPUID the guest sees: host (what this host's KVM supports), baseline
    /// (x86-64-v2) or emulated-kernel (for hosts whose KVM emulates guest kernel mode).
    #[arg(long, value_name = "NAME", default_value_t = CpuTemplate::Host)]
    pub cpu_template: CpuTemplate,
    /// Disk and tap.
    #[command(flatten)]
    pub attach: AttachArgs,
    /// The guest's MAC address (with --tap).
    #[arg(
        long,
        value_name = "MAC",
        requires = "tap",
        default_value = "52:54:00:f7:00:01"
    )]
    pub mac: String,
    /// Stop after N VM exits and write a snapshot (requires --save).
    #[arg(long, value_name = "N", requires = "save")]
    pub save_at_exit: Option<u64>,
    /// Snapshot directory for --save-at-exit.
    #[arg(long, value_name = "DIR", requires = "save_at_exit")]
    pub save: Option<PathBuf>,
    /// Record the run's inputs (packets, disk reads, wake-ups) to LOG for `ftvm replay`.
    #[arg(long, value_name = "LOG")]
    pub record: Option<PathBuf>,
    /// Print exits, exit-trace, memory-hash, output-digest and exit-code at the end
    /// (on stderr).
    #[arg(long)]
    pub report: bool,
    /// How an idle guest waits for its timer.
    #[arg(long, value_enum, default_value_t = Idle::Sleep)]
    pub idle: Idle,
    /// When inputs reach the guest (default: async with --kernel, at-exits for the
    /// built-in test guest).
    #[arg(long, value_enum)]
    pub inputs: Option<Inputs>,
}

impl RunArgs {
    /// When inputs reach the guest, defaults applied (as for a pair's `guest.inputs`).
    pub fn inputs(&self) -> InputDelivery {
        self.inputs
            .map(InputDelivery::from)
            .unwrap_or(InputDelivery::default_for(self.kernel.is_some()))
    }
}

impl From<Inputs> for InputDelivery {
    fn from(i: Inputs) -> Self {
        match i {
            Inputs::AtExits => InputDelivery::AtExits,
            Inputs::Async => InputDelivery::Async,
        }
    }
}

/// Options of `ftvm restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Snapshot directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
    /// Reattach to another disk or tap than the snapshot names.
    #[command(flatten)]
    pub attach: AttachArgs,
    /// When inputs reach the guest (async for a guest that idles inside KVM, such as
    /// Linux; the snapshot does not say which it was run with).
    #[arg(long, value_enum, default_value_t = Inputs::AtExits)]
    pub inputs: Inputs,
    /// Print exits, exit-trace, memory-hash, output-digest and exit-code at the end
    /// (on stderr).
    #[arg(long)]
    pub report: bool,
    /// How an idle guest waits for its timer.
    #[arg(long, value_enum, default_value_t = Idle::Sleep)]
    pub idle: Idle,
}

/// Options of `ftvm replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Recording written by `run --record`.
    #[arg(value_name = "LOG")]
    pub log: PathBuf,
    /// Print the report of the replayed run (on stderr).
    #[arg(long)]
    pub report: bool,
}
