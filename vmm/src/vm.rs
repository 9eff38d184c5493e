//! One KVM virtual machine with one vCPU: creation and boot, the exit loop with its
//! interrupt policy, idling, state capture and restore, and the dirty-page API.
//!
//! Exit and interrupt model: the vCPU runs on the caller's thread. Every KVM_RUN return
//! with an exit reason counts as one exit; the exit is recorded in the exit trace,
//! dispatched to the devices, and virtual time advances. Interrupts are injected only
//! here, between an exit and the next KVM_RUN, and no in-kernel timer exists (no PIT;
//! the VMM never starts the LAPIC timer), so a run is a deterministic function of the
//! guest image, command line, entropy seed and inputs.

use std::path::Path;

use ftvm_devices::manager::{DeviceManager, DevicesError};
use ftvm_devices::platform::PlatformAction;
use ftvm_devices::virtio::DeviceConfig;
use ftvm_devices::world::{World, WorldError};
use ftvm_devices::GuestMem;
use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use crate::boot::{self, cpu, BootError, BootImage};
use crate::cpu_template::{self, CpuTemplate, TemplateError};
use crate::exit_trace::{ExitKind, ExitTrace};
use crate::fallback::{self, FallbackCounts, FallbackError};
use crate::input_watch::InputWatcher;
use crate::layout;
use crate::memory::{self, MemoryError, PageSet};
use crate::output_digest::OutputDigestWorld;
use crate::snapshot::{self, SavedSizes, SnapshotError, SnapshotState};
use crate::vcpu_state::{self, StateCaps, StateError};

/// Address of a local-APIC MSI.
const MSI_ADDRESS: u32 = layout::LAPIC_BASE as u32;
/// Address KVM needs for the TSS on Intel hosts (three pages below the BIOS).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Errors of running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The kick signal cannot be installed.
    #[error("cannot install the vCPU kick signal: {0}")]
    Kick(std::io::Error),
    /// /dev/kvm is missing or cannot be opened.
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    KvmUnavailable(kvm_ioctls::Error),
    /// KVM lacks something ftvm needs.
    #[error("this host's KVM lacks {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The ioctl.
        what: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU set-up.
    #[error(transparent)]
    Cpu(#[from] cpu::CpuError),
    /// State capture or restore.
    #[error(transparent)]
    State(#[from] StateError),
    /// Snapshot files.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// Device set-up.
    #[error("device set-up failed: {0}")]
    Devices(#[from] DevicesError),
    /// The World failed (a host backend, or a replay that diverged).
    #[error(transparent)]
    World(#[from] WorldError),
    /// The guest crashed.
    #[error("guest crashed: {0}")]
    GuestCrash(String),
    /// The guest triple-faulted or otherwise shut the vCPU down.
    #[error("guest shut down the vCPU (triple fault) at rip {rip:#x}")]
    GuestShutdown {
        /// RIP at the shutdown.
        rip: u64,
    },
    /// KVM could not enter the guest.
    #[error("KVM could not enter the guest: {0}")]
    EntryFailed(String),
    /// The CPU template cannot be offered here.
    #[error(transparent)]
    CpuTemplate(#[from] TemplateError),
    /// KVM failed to emulate an instruction, and so did the fallback.
    #[error(transparent)]
    Fallback(#[from] FallbackError),
    /// An exit ftvm does not handle.
    #[error("unhandled VM exit: {0}")]
    UnhandledExit(String),
    /// A snapshot cannot be taken now.
    #[error("cannot capture state: {0}")]
    NotQuiescent(&'static str),
    /// A checkpoint from a peer does not fit this VM.
    #[error("bad checkpoint: {0}")]
    BadCheckpoint(String),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The kernel image (ELF or bzImage).
    pub kernel: Vec<u8>,
    /// Kernel command line.
    pub cmdline: String,
    /// Optional initrd.
    pub initrd: Option<Vec<u8>>,
    /// Seed of the platform entropy stream.
    pub entropy_seed: u64,
    /// The CPUID the guest sees.
    pub cpu_template: CpuTemplate,
    /// Virtio devices, in MMIO slot order; their backends live in the World.
    pub devices: Vec<DeviceConfig>,
    /// The host resources the World attaches them to (kept in snapshots so a restore
    /// can reattach them).
    pub attachments: Attachments,
}

/// Host resources behind the virtio devices: recorded, not opened, by the VMM.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Attachments {
    /// Disk images (path, read-only), in World disk order.
    pub disks: Vec<(std::path::PathBuf, bool)>,
    /// The tap interface.
    pub tap: Option<String>,
}

/// When [`Vm::run`] should return before the guest powers off.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunLimits {
    /// Return once this many exits (since boot) have been handled.
    pub max_exits: Option<u64>,
    /// Return when the guest writes this value to the MARKER port.
    pub stop_at_marker: Option<u32>,
}

/// Why [`Vm::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStop {
    /// The guest powered off with this exit code.
    PowerOff(u32),
    /// The exit limit was reached.
    ExitLimit,
    /// The guest passed the requested marker.
    Marker(u32),
    /// The World asked for the VM back (the end of a replication epoch).
    Paused,
    /// The guest asked to be reset (a reboot, through the ACPI reset register).
    Reset,
}

/// One VM exit, copied out of the kvm_run area.
struct ExitRecord {
    kind: ExitKind,
    addr: u64,
    data: [u8; 8],
    len: usize,
    action: PlatformAction,
}

/// A running KVM VM with one vCPU and its devices.
pub struct Vm {
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMem,
    mem_mib: u64,
    devices: DeviceManager,
    world: OutputDigestWorld,
    caps: StateCaps,
    cpuid: CpuId,
    sync_regs: bool,
    exits: u64,
    trace: ExitTrace,
    /// Pages written since boot (or restore): what a snapshot must hold.
    touched: PageSet,
    /// Pages written since the last [`Vm::take_dirty_pages`].
    dirty: PageSet,
    attachments: Attachments,
    /// Kicks armed on the thread that runs the VM.
    kick: Option<crate::kick::Armed>,
    /// The handle of the armed kick.
    kick_handle: Option<crate::kick::VcpuKick>,
    /// Inputs are delivered as they arrive, not only at exits (see
    /// [`crate::input_watch`]).
    async_inputs: bool,
    /// The thread kicking the vCPU when input arrives, while `async_inputs` and running.
    watcher: Option<InputWatcher>,
    /// The last KVM_RUN returned without an exit (a kick or a signal): the guest has run
    /// on past the last exit.
    interrupted: bool,
    /// Instructions executed by the fallback since this VM was created.
    fallbacks: FallbackCounts,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // Stop the input watcher, then disarm kicks before the vCPU's run area is
        // unmapped with the vCPU: a kick arriving after that would write into memory
        // that is gone.
        self.watcher.take();
        self.kick.take();
    }
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("mem_mib", &self.mem_mib)
            .field("exits", &self.exits)
            .finish_non_exhaustive()
    }
}

mod checkpoint;
mod inputs;
pub use checkpoint::{PageBatch, Standby};

/// The KVM objects of a VM before a guest is put into it.
struct KvmParts {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    sync_regs: bool,
}

fn create_kvm(mem: &GuestMem) -> Result<KvmParts, VmError> {
    let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCapability(name));
        }
    }
    let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    // The irqchip must exist before the vCPU. No PIT is created: nothing ticks by itself.
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    memory::register(&vm, mem)?;
    let mut vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
    let sync_regs = kvm.check_extension(Cap::SyncRegs);
    if sync_regs {
        vcpu.set_sync_valid_reg(SyncReg::Register);
    }
    Ok(KvmParts {
        kvm,
        vm,
        vcpu,
        sync_regs,
    })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    kvm(what)
}

/// The CPUID this host's KVM can give a guest.
fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VmError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))
}

/// Refuses saved state whose CPUID this host's KVM cannot offer.
fn check_cpuid_offered(kvm: &Kvm, state: &SnapshotState) -> Result<(), VmError> {
    Ok(cpu_template::check_offered(
        &state.vcpu.cpuid,
        &supported_cpuid(kvm)?,
    )?)
}

impl Vm {
    /// Creates a VM, loads the kernel and prepares the vCPU to enter it.
    pub fn boot(config: &VmConfig, world: Box<dyn World>) -> Result<Self, VmError> {
        let mem = memory::allocate(config.mem_mib)?;
        let devices = DeviceManager::new(config.entropy_seed, &config.devices)?;
        let mut cmdline = config.cmdline.clone();
        for token in devices.cmdline_tokens() {
            if !cmdline.is_empty() {
                cmdline.push(' ');
            }
            cmdline.push_str(&token);
        }
        let entry = boot::load(
            &mem,
            config.mem_mib,
            &BootImage {
                kernel: &config.kernel,
                cmdline: &cmdline,
                initrd: config.initrd.as_deref(),
                acpi: Some(boot::acpi::Machine {
                    virtio_devices: config.devices.len(),
                }),
            },
        )?;
        let parts = create_kvm(&mem)?;
        let supported = supported_cpuid(&parts.kvm)?;
        let cpuid = cpu_template::build(config.cpu_template, &supported)?;
        parts
            .vcpu
            .set_cpuid2(&cpuid)
            .map_err(kvm("KVM_SET_CPUID2"))?;
        cpu::configure(&parts.vcpu, entry.entry)?;
        let caps = StateCaps::probe(&parts.kvm, &parts.vcpu)?;
        let touched = PageSet::empty_for(&mem);
        tracing::debug!(entry = format_args!("{:#x}", entry.entry), kind = ?entry.kind, "kernel loaded");
        Ok(Self {
            vm: parts.vm,
            vcpu: parts.vcpu,
            dirty: touched.clone(),
            touched,
            mem,
            mem_mib: config.mem_mib,
            devices,
            world: OutputDigestWorld::new(world, 0),
            attachments: config.attachments.clone(),
            kick: None,
            kick_handle: None,
            async_inputs: false,
            watcher: None,
            interrupted: false,
            fallbacks: FallbackCounts::default(),
            caps,
            cpuid,
            sync_regs: parts.sync_regs,
            exits: 0,
            trace: ExitTrace::default(),
        })
    }

    /// Creates a VM from the snapshot in `dir`; it continues exactly where the saved VM
    /// stopped.
    pub fn restore(dir: &Path, world: Box<dyn World>) -> Result<Self, VmError> {
        let state = snapshot::read_state(dir)?;
        let mem = memory::allocate(state.mem_mib)?;
        snapshot::read_memory(dir, &state.memory, &mem)?;
        let parts = create_kvm(&mem)?;
        let mut touched = PageSet::empty_for(&mem);
        for &(gpa, n) in &state.memory.runs {
            for p in 0..n {
                touched.insert(gpa + p * layout::PAGE_SIZE);
            }
        }
        Self::assemble(state, mem, parts, touched, world)
    }

    /// Puts saved state into a created VM whose memory already holds the guest's pages
    /// (`touched`: the pages that are not zero). KVM's ordering: VM-level state (irqchip,
    /// clock) before the vCPU, and within the vCPU the order `restore_vcpu` documents.
    fn assemble(
        state: SnapshotState,
        mem: GuestMem,
        parts: KvmParts,
        touched: PageSet,
        mut world: Box<dyn World>,
    ) -> Result<Self, VmError> {
        check_cpuid_offered(&parts.kvm, &state)?;
        vcpu_state::restore_vm(&parts.vm, &state.vm)?;
        vcpu_state::restore_vcpu(&parts.vcpu, &state.vcpu)?;
        let caps = StateCaps::probe(&parts.kvm, &parts.vcpu)?;
        if state.vcpu.xsave.is_some() && !caps.xsave {
            return Err(StateError::MissingCapability("XSAVE").into());
        }
        let devices = DeviceManager::from_state(&state.devices)?;
        world.set_virtual_now(state.devices.platform.clock.now_ns());
        Ok(Self {
            vm: parts.vm,
            vcpu: parts.vcpu,
            dirty: PageSet::empty_for(&mem),
            touched,
            mem,
            mem_mib: state.mem_mib,
            devices,
            world: OutputDigestWorld::new(world, state.output_digest),
            attachments: state.attachments.clone(),
            kick: None,
            kick_handle: None,
            async_inputs: false,
            watcher: None,
            interrupted: false,
            fallbacks: FallbackCounts::default(),
            caps,
            cpuid: state.vcpu.cpuid.clone(),
            sync_regs: parts.sync_regs,
            exits: state.exits,
            trace: ExitTrace::from_digest(state.exit_trace),
        })
    }

    /// VM exits handled since boot.
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// The exit-trace digest since boot.
    pub fn exit_trace(&self) -> u64 {
        self.trace.digest()
    }

    /// The digest of every output since boot (console, frames, disk writes, flushes).
    pub fn output_digest(&self) -> u64 {
        self.world.digest()
    }

    /// The virtio device configurations, in slot order.
    pub fn device_configs(&self) -> Vec<DeviceConfig> {
        self.devices.virtio_configs()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMem {
        &self.mem
    }

    /// Guest memory size in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    /// xxh3 hash of all guest memory.
    pub fn memory_hash(&self) -> Result<u64, VmError> {
        Ok(memory::hash(&self.mem)?)
    }

    /// A digest of `pages` pages of RAM from RAM page `start` (see
    /// [`memory::sample`]), and the page after them (the vCPU must be stopped, as
    /// between two runs).
    pub fn memory_sample(
        &self,
        start: u64,
        pages: u64,
    ) -> Result<(memory::MemorySample, u64), VmError> {
        Ok(memory::sample(&self.mem, start, pages)?)
    }

    /// Whether the guest stands exactly at its last exit (it has not run on since, as it
    /// does when a kick or a signal ended KVM_RUN without an exit): the state another VM
    /// replaying the same inputs reaches at the same exit count.
    pub fn at_exit(&self) -> bool {
        !self.interrupted
    }

    /// Current virtual time in ns.
    pub fn virtual_time_ns(&mut self) -> u64 {
        self.devices.platform().now_ns()
    }

    /// Runs the guest until it powers off or a limit is reached.
    pub fn run(&mut self, limits: &RunLimits) -> Result<RunStop, VmError> {
        let stop = self.run_loop(limits);
        self.world.flush();
        stop
    }

    fn run_loop(&mut self, limits: &RunLimits) -> Result<RunStop, VmError> {
        self.start_watcher()?;
        loop {
            if limits.max_exits.is_some_and(|n| self.exits >= n) {
                return Ok(RunStop::ExitLimit);
            }
            if self.world.pause_requested() {
                return Ok(RunStop::Paused);
            }
            self.inject_pending_irqs()?;
            let Some(exit) = self.run_vcpu_once()? else {
                if self.watcher.is_some() {
                    // Kicked for input, or interrupted otherwise: either way the
                    // input waiting now goes in before the guest runs again.
                    self.service_inputs()?;
                }
                continue;
            };
            self.exits += 1;
            let rip = self.rip()?;
            self.trace
                .record(exit.kind, rip, exit.addr, &exit.data[..exit.len]);
            self.devices.platform().on_exit();
            let out = self.devices.take_console_output();
            if !out.is_empty() {
                self.world.console_output(&out);
            }
            self.service_inputs()?;
            match exit.action {
                PlatformAction::None => {}
                PlatformAction::PowerOff(code) => return Ok(RunStop::PowerOff(code)),
                PlatformAction::Reset => return Ok(RunStop::Reset),
                PlatformAction::Wait => self.idle()?,
                PlatformAction::GuestPanic(code) => return Err(self.guest_crash(code)),
                PlatformAction::Marker(m) => {
                    tracing::debug!(marker = m, exits = self.exits, "guest marker");
                    if limits.stop_at_marker == Some(m) {
                        return Ok(RunStop::Marker(m));
                    }
                }
            }
        }
    }

    /// One KVM_RUN. Returns the exit it produced, or `None` when KVM returned without
    /// an exit (interrupted by a signal), which is not counted.
    fn run_vcpu_once(&mut self) -> Result<Option<ExitRecord>, VmError> {
        let exit = match self.vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear its flag, so the next KVM_RUN enters the guest again
                // (the run loop first asks the World whether to stop).
                self.vcpu.set_kvm_immediate_exit(0);
                self.interrupted = true;
                return Ok(None);
            }
            Err(source) => {
                return Err(VmError::Kvm {
                    what: "KVM_RUN",
                    source,
                })
            }
        };
        self.interrupted = false;
        let mut rec = ExitRecord {
            kind: ExitKind::IoOut,
            addr: 0,
            data: [0; 8],
            len: 0,
            action: PlatformAction::None,
        };
        let copy = |rec: &mut ExitRecord, d: &[u8]| {
            rec.len = d.len().min(8);
            rec.data[..rec.len].copy_from_slice(&d[..rec.len]);
        };
        match exit {
            VcpuExit::IoOut(port, data) => {
                rec.kind = ExitKind::IoOut;
                rec.addr = port.into();
                copy(&mut rec, data);
                rec.action = self.devices.pio_write(port, data, &self.mem);
            }
            VcpuExit::IoIn(port, data) => {
                rec.kind = ExitKind::IoIn;
                rec.addr = port.into();
                self.devices.pio_read(port, data);
                copy(&mut rec, data);
            }
            VcpuExit::MmioRead(addr, data) => {
                rec.kind = ExitKind::MmioRead;
                rec.addr = addr;
                self.devices.mmio_read(addr, data);
                copy(&mut rec, data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                rec.kind = ExitKind::MmioWrite;
                rec.addr = addr;
                copy(&mut rec, data);
                self.devices
                    .mmio_write(addr, data, &self.mem, &mut self.world);
            }
            VcpuExit::Shutdown => {
                let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                return Err(VmError::GuestShutdown { rip });
            }
            VcpuExit::FailEntry(reason, _) => {
                return Err(VmError::EntryFailed(format!(
                    "hardware entry failure reason {reason:#x}"
                )))
            }
            VcpuExit::InternalError => {
                let done = self.run_fallback()?;
                rec.kind = ExitKind::Fallback;
                rec.addr = done.rip;
                copy(&mut rec, &done.head);
            }
            VcpuExit::Intr => {
                self.interrupted = true;
                return Ok(None);
            }
            other => return Err(VmError::UnhandledExit(format!("{other:?}"))),
        }
        Ok(Some(rec))
    }

    /// Instructions executed by the fallback since this VM was created or restored.
    pub fn fallback_counts(&self) -> &FallbackCounts {
        &self.fallbacks
    }

    /// Executes the instruction KVM reported it could not emulate (see
    /// [`crate::fallback`]).
    fn run_fallback(&mut self) -> Result<fallback::Executed, VmError> {
        const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
        // SAFETY: after a KVM_EXIT_INTERNAL_ERROR exit the `internal` member of the
        // run area's exit union is the one KVM filled in.
        let suberror = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return Err(VmError::EntryFailed(format!(
                "KVM internal error, suberror {suberror}"
            )));
        }
        let smap = self
            .cpuid
            .as_slice()
            .iter()
            .any(|e| e.function == 7 && e.index == 0 && e.ebx & (1 << 20) != 0);
        let (done, regs) = fallback::execute_at_rip(&self.vcpu, &self.mem, smap, self.caps.xsave)?;
        if self.sync_regs {
            // The register copy in the run area is what `rip` reads; KVM does not take
            // it back unless marked dirty.
            self.vcpu.sync_regs_mut().regs = regs;
        }
        self.fallbacks.note(done.mnemonic);
        Ok(done)
    }

    fn rip(&self) -> Result<u64, VmError> {
        if self.sync_regs {
            Ok(self.vcpu.sync_regs().regs.rip)
        } else {
            Ok(self.vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?.rip)
        }
    }

    fn guest_crash(&mut self, code: u32) -> VmError {
        const NAMES: [&str; 32] = [
            "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "?9", "#TS", "#NP",
            "#SS", "#GP", "#PF", "?15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "?22", "?23",
            "?24", "?25", "?26", "?27", "#HV", "#VC", "#SX", "?31",
        ];
        if code >= 32 {
            return VmError::GuestCrash(format!(
                "the guest reported a software panic (code {code:#x}); see its console output"
            ));
        }
        // The guest's exception stub leaves vector, error code and the CPU frame at RSP.
        let frame = self.vcpu.get_regs().ok().and_then(|r| {
            let mut f = [0u64; 4];
            for (i, w) in f.iter_mut().enumerate() {
                *w = self.mem.read_obj(GuestAddress(r.rsp + 8 * i as u64)).ok()?;
            }
            Some(f)
        });
        let name = NAMES[code as usize];
        match frame {
            Some([_, error, rip, cs]) => VmError::GuestCrash(format!(
                "exception {name} (vector {code}), error code {error:#x}, at rip {rip:#x} (cs {cs:#x})"
            )),
            None => VmError::GuestCrash(format!("exception {name} (vector {code})")),
        }
    }

    /// Completes an I/O instruction KVM left half-done at the last exit (an IN's
    /// destination register, the RIP advance) with an immediate-exit KVM_RUN, which
    /// finishes the pending work and returns without entering the guest.
    fn complete_pending_io(&mut self) -> Result<(), VmError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let r = self.vcpu.run().map(|e| format!("{e:?}"));
        self.vcpu.set_kvm_immediate_exit(0);
        match r {
            Err(e) if e.errno() == libc::EINTR => Ok(()),
            Err(source) => Err(VmError::Kvm {
                what: "KVM_RUN (immediate exit)",
                source,
            }),
            Ok(_) => Err(VmError::NotQuiescent(
                "the vCPU is in the middle of a string I/O instruction",
            )),
        }
    }

    /// The pages written since the previous call (or since boot): KVM's dirty log of
    /// guest writes merged with the pages the VMM and its devices wrote.
    pub fn take_dirty_pages(&mut self) -> Result<PageSet, VmError> {
        self.collect_dirty()?;
        let empty = PageSet::empty_for(&self.mem);
        Ok(std::mem::replace(&mut self.dirty, empty))
    }

    fn collect_dirty(&mut self) -> Result<(), VmError> {
        let fresh = memory::collect_dirty(&self.vm, &self.mem)?;
        self.dirty.union_with(&fresh);
        self.touched.union_with(&fresh);
        Ok(())
    }

    /// Captures the whole VM into a snapshot directory. The VM can keep running
    /// afterwards.
    pub fn save(&mut self, dir: &Path) -> Result<SavedSizes, VmError> {
        let state = self.capture_snapshot_state()?;
        self.collect_dirty()?;
        Ok(snapshot::write(dir, &self.mem, &self.touched, state)?)
    }

    /// Everything but the page contents, with the last exit's I/O completed first.
    fn capture_snapshot_state(&mut self) -> Result<SnapshotState, VmError> {
        self.complete_pending_io()?;
        let vcpu = vcpu_state::capture_vcpu(&self.vcpu, &self.caps, &self.cpuid)?;
        let vm = vcpu_state::capture_vm(&self.vm)?;
        Ok(SnapshotState {
            writer: env!("CARGO_PKG_VERSION").to_string(),
            mem_mib: self.mem_mib,
            memory: snapshot::MemoryIndex {
                runs: Vec::new(),
                checksum: 0,
            },
            vcpu,
            vm,
            devices: self.devices.state(),
            exits: self.exits,
            exit_trace: self.trace.digest(),
            output_digest: self.world.digest(),
            attachments: self.attachments.clone(),
        })
    }

    /// Captures vCPU, VM-level and device state without writing anything (what a
    /// checkpoint pause costs). Returns the serialized size.
    pub fn capture_state_size(&mut self) -> Result<usize, VmError> {
        self.complete_pending_io()?;
        let vcpu = vcpu_state::capture_vcpu(&self.vcpu, &self.caps, &self.cpuid)?;
        let vm = vcpu_state::capture_vm(&self.vm)?;
        let devices = self.devices.state();
        let size = bincode::serialized_size(&(vcpu, vm, devices)).unwrap_or(0);
        Ok(size as usize)
    }
}
