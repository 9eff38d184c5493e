//! Lockstep replication, the secondary's side: a follower thread runs the replica's
//! guest from the state the join's copy ended with, replaying the primary's input log
//! slice by slice as it streams in. The guest writes to this host's disk replica as it
//! executes; its console bytes and frames are kept per position until the primary says
//! it released them. At every slice's end the follower compares where its guest stands
//! (exit count, exit trace, output digest) with where the primary's stood; a mismatch,
//! or an event the log does not hold, is a divergence: the follower stops and the node
//! asks for a new copy. At a takeover the follower executes what it holds of the log,
//! switches its World from the replay to the live one and becomes the primary's epoch
//! loop on the same thread, with the same VM: nothing is restored.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ftvm_devices::backend::disk::DiskFile;
use ftvm_devices::world::record::InputEvent;
use ftvm_devices::world::replay::{Emitted, ReplayWorld};
use ftvm_devices::world::{IdleRequest, Wake, World, WorldError};
use ftvm_vmm::{RunLimits, RunStop, Standby, VcpuKick, Vm};

use super::mirror::MirrorWindow;
use super::primary::{EpochLoop, EpochParts};
use crate::protocol::{DiskRange, ExitPoint, LogSegment, Message, Output};

/// What the node hands the follower thread, in stream order.
enum FollowInput {
    /// A slice of the log at `position`.
    Slice { position: u64, slice: LogSegment },
    /// This node won the guest: execute the rest, go live, run as primary.
    TakeOver(Box<LockstepTakeover>),
}

/// What a lockstep takeover needs: the live World the guest continues with and the
/// primary's epoch loop it becomes.
pub struct LockstepTakeover {
    /// The live World (disk replica, tap, output commit, log recording).
    pub world: Box<dyn World>,
    /// The epoch loop's parts.
    pub parts: EpochParts,
    /// Releases the outputs the old primary may not have released, after the
    /// network identity is announced.
    pub release: Box<dyn FnOnce(Vec<Output>) + Send>,
    /// What this host's tap heard for the guest: the frames the old primary's guest
    /// never took are delivered first, once the log is executed.
    pub heard: Option<MirrorWindow>,
}

/// Why a follower's guest stopped retracing the primary's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// What differed.
    pub why: String,
    /// The slice it diverged in.
    pub position: u64,
    /// The disk ranges its guest wrote in that slice.
    pub written: Vec<DiskRange>,
}

/// Errors of starting a follower.
#[derive(Debug, thiserror::Error)]
pub enum FollowerError {
    /// The standby VM cannot be turned into a running one.
    #[error(transparent)]
    Vm(#[from] ftvm_vmm::VmError),
    /// The follower thread cannot be started.
    #[error("cannot start the follower thread: {0}")]
    Thread(std::io::Error),
}

/// What the follower reports.
#[derive(Debug, Default, Clone)]
pub struct FollowerStatus {
    /// The last position executed and the exit the guest stands at there.
    pub executed: Option<(u64, u64)>,
    /// Set when its guest diverged (the thread has ended).
    pub diverged: Option<Divergence>,
}

/// How a follower tells the primary where its guest is (`Message::Executed`).
pub type Report = Box<dyn Fn(Message) + Send>;

/// The node's handle on the follower thread. Dropping it stops the thread.
pub struct Follower {
    tx: Option<Sender<FollowInput>>,
    status: Arc<Mutex<FollowerStatus>>,
    world: Arc<Mutex<Phase>>,
    kick: Arc<Mutex<Option<VcpuKick>>>,
    /// The last position the primary said it released.
    released: Arc<AtomicU64>,
}

/// A second way in to a follower thread, for slices only (see [`Follower::inbox`]).
#[derive(Clone)]
pub struct SliceInbox {
    tx: Sender<FollowInput>,
    status: Arc<Mutex<FollowerStatus>>,
    released: Arc<AtomicU64>,
}

impl SliceInbox {
    /// Whether the follower's guest still retraces the primary's.
    pub fn running(&self) -> bool {
        lock(&self.status).diverged.is_none()
    }

    /// Hands a slice of the log to the guest. False if the follower has ended.
    pub fn slice(&self, position: u64, slice: LogSegment) -> bool {
        self.tx.send(FollowInput::Slice { position, slice }).is_ok()
    }

    /// The primary released every position up to `position` (see
    /// [`Follower::released`]).
    pub fn released(&self, position: u64) {
        self.released.fetch_max(position, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Follower {
    /// Starts the replica's guest from `standby` (a full copy applied), replaying onto
    /// `disks` (this host's replicas), reporting progress to the primary with `report`.
    /// Every frame the log gives the guest is noted taken in `heard` (this host's tap's
    /// window), if it has one.
    pub fn start(
        standby: Standby,
        disks: Vec<DiskFile>,
        has_network: bool,
        report: Report,
        heard: Option<MirrorWindow>,
    ) -> Result<Self, FollowerError> {
        let replay = ReplayWorld::following(has_network, disks);
        let world = Arc::new(Mutex::new(Phase {
            replay,
            live: None,
            stop: false,
            written: Vec::new(),
        }));
        let vm = standby.activate(Box::new(LockstepWorld(world.clone())))?;
        let status = Arc::new(Mutex::new(FollowerStatus::default()));
        let kick = Arc::new(Mutex::new(None));
        let released = Arc::new(AtomicU64::new(0));
        // Unbounded, but the primary keeps the slices in flight within its lag bound.
        let (tx, rx) = mpsc::channel();
        let thread = FollowerThread {
            vm,
            rx,
            report,
            world: world.clone(),
            status: status.clone(),
            unreleased: Vec::new(),
            released: released.clone(),
            powered_off: false,
            reported: None,
            reported_at: Instant::now(),
            heard,
        };
        let k = kick.clone();
        std::thread::Builder::new()
            .name("vcpu-follow".into())
            .spawn(move || thread.run(k))
            .map_err(FollowerError::Thread)?;
        Ok(Self {
            tx: Some(tx),
            status,
            world,
            kick,
            released,
        })
    }

    /// Where slices can be handed to the follower thread from another thread (a link
    /// reader's quick path); `None` once it has taken over. Drop it with the follower:
    /// a follower thread ends when its last inbox is gone.
    pub fn inbox(&self) -> Option<SliceInbox> {
        self.tx.as_ref().map(|tx| SliceInbox {
            tx: tx.clone(),
            status: self.status.clone(),
            released: self.released.clone(),
        })
    }

    /// Hands a slice of the log to the guest. False if the follower has ended.
    pub fn slice(&self, position: u64, slice: LogSegment) -> bool {
        self.send(FollowInput::Slice { position, slice })
    }

    /// The primary released every position up to `position`: the follower keeps no
    /// outputs of them for a takeover. Noted without waking the follower thread (it
    /// drops them as it executes, and before a takeover).
    pub fn released(&self, position: u64) {
        self.released.fetch_max(position, Ordering::AcqRel);
    }

    /// Takes over: the follower thread becomes the primary's vCPU thread.
    pub fn take_over(mut self, takeover: LockstepTakeover) -> bool {
        let status = self.status.clone();
        let status = lock(&status);
        let sent =
            status.diverged.is_none() && self.send(FollowInput::TakeOver(Box::new(takeover)));
        drop(status);
        // The thread lives on as the primary's; dropping this handle must not stop it.
        self.tx = None;
        sent
    }

    /// What the follower reports.
    pub fn status(&self) -> FollowerStatus {
        lock(&self.status).clone()
    }

    fn send(&self, input: FollowInput) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(input).is_ok())
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        if self.tx.take().is_some() {
            // Stopped: the guest leaves KVM_RUN at once and the thread ends.
            lock(&self.world).stop = true;
            if let Some(k) = lock(&self.kick).as_ref() {
                k.kick();
            }
        }
    }
}

struct FollowerThread {
    vm: Vm,
    rx: Receiver<FollowInput>,
    report: Report,
    world: Arc<Mutex<Phase>>,
    status: Arc<Mutex<FollowerStatus>>,
    /// Outputs of executed positions the primary has not said it released.
    unreleased: Vec<(u64, Vec<Output>)>,
    /// The last position the primary said it released.
    released: Arc<AtomicU64>,
    powered_off: bool,
    /// The last position reported to the primary, and when.
    reported: Option<u64>,
    reported_at: Instant,
    /// This host's tap's window, told of every frame the log gives the guest.
    heard: Option<MirrorWindow>,
}

/// A follower executing a steady stream reports its position at least this often.
const REPORT_EVERY: Duration = Duration::from_millis(5);

impl FollowerThread {
    fn run(mut self, kick: Arc<Mutex<Option<VcpuKick>>>) {
        match self.vm.arm_kick() {
            Ok(k) => *lock(&kick) = Some(k),
            Err(e) => tracing::warn!("{e}; a stopped follower waits for its guest's next exit"),
        }
        while let Some(input) = self.next_input() {
            match input {
                FollowInput::Slice { position, slice } => {
                    if let Err(why) = self.execute(position, slice) {
                        return self.diverged(position, why);
                    }
                    // Behind a steady stream the queue is seldom empty: report anyway,
                    // or the primary would take this guest for further behind than it is.
                    if self.reported_at.elapsed() >= REPORT_EVERY {
                        self.report();
                    }
                }
                FollowInput::TakeOver(t) => return self.take_over(*t),
            }
        }
    }

    /// The next input (`None`: the node is gone). Caught up with what arrived, the
    /// follower tells the primary where its guest is, at most every REPORT_EVERY (a
    /// report each time it catches up would cost both hosts a message per output).
    fn next_input(&mut self) -> Option<FollowInput> {
        let wait = REPORT_EVERY.saturating_sub(self.reported_at.elapsed());
        match self.rx.recv_timeout(wait) {
            Ok(i) => return Some(i),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => {}
        }
        self.report();
        self.rx.recv().ok()
    }

    /// The guest no longer retraces the primary's (or the node stopped it): report
    /// it and end. A takeover already asked for cannot continue this guest: its epoch
    /// loop's status says so, and the node stops.
    fn diverged(self, position: u64, why: String) {
        let mut phase = lock(&self.world);
        if phase.stop {
            return;
        }
        tracing::warn!(position, "lockstep replica diverged: {why}");
        let written = DiskRange::merged(std::mem::take(&mut phase.written));
        drop(phase);
        // Under the status lock, which a takeover holds while it asks: one asked before
        // is found here, one after sees the end.
        let mut status = lock(&self.status);
        while let Ok(input) = self.rx.try_recv() {
            if let FollowInput::TakeOver(t) = input {
                let mut stats = t.parts.stats.lock().unwrap_or_else(|e| e.into_inner());
                stats.finished = Some(Err(format!(
                    "the replica's guest diverged from the old primary's at position {position} before the takeover ({why}): the guest cannot continue on this node"
                )));
            }
        }
        status.diverged = Some(Divergence {
            why,
            position,
            written,
        });
    }

    fn report(&mut self) {
        self.reported_at = Instant::now();
        let Some((position, exit)) = lock(&self.status).executed else {
            return;
        };
        if self.reported != Some(position) {
            self.reported = Some(position);
            (self.report)(Message::Executed { position, exit });
        }
    }

    /// Runs the guest through the slice and checks that it stands where the
    /// primary's stood.
    fn execute(&mut self, position: u64, slice: LogSegment) -> Result<(), String> {
        let end = slice.end;
        if let Some(w) = &self.heard {
            for e in &slice.events {
                if let InputEvent::Packet { frame, .. } = e {
                    w.taken(frame);
                }
            }
        }
        lock(&self.world).replay.push(slice.events);
        if !self.powered_off {
            let limits = RunLimits {
                max_exits: Some(end.exit),
                ..Default::default()
            };
            match self.vm.run(&limits).map_err(|e| e.to_string())? {
                // A reset stops the guest as on the primary (see `primary.rs`).
                RunStop::PowerOff(_) | RunStop::Reset => self.powered_off = true,
                RunStop::ExitLimit => {}
                RunStop::Paused | RunStop::Marker(_) => {
                    return Err("the follower was stopped".into());
                }
            }
        }
        let here = ExitPoint {
            exit: self.vm.exits(),
            exit_trace: self.vm.exit_trace(),
            output_digest: self.vm.output_digest(),
        };
        if let Some(what) = mismatch(&here, &end) {
            return Err(format!("at position {position}: {what}"));
        }
        let left = lock(&self.world).replay.remaining();
        if left > 0 && !self.powered_off {
            // Every event of a slice was taken by the primary's guest by its end.
            return Err(format!(
                "at position {position}, exit {}: {left} events of the slice were not taken by the guest",
                here.exit
            ));
        }
        if let Some(theirs) = slice.memory {
            tracing::debug!(start = theirs.start, "memory sample compared");
            let (mine, _) = self
                .vm
                .memory_sample(theirs.start, theirs.pages)
                .map_err(|e| e.to_string())?;
            if mine != theirs {
                return Err(format!(
                    "at position {position}, exit {}: guest memory differs in RAM pages {}..{} (the primary's guest wrote other data there)",
                    here.exit,
                    theirs.start,
                    theirs.start + theirs.pages
                ));
            }
        }
        let emitted = {
            let mut phase = lock(&self.world);
            // Checked equal: what the guest wrote in this slice is the primary's.
            phase.written.clear();
            phase.replay.take_emitted()
        };
        if !emitted.is_empty() {
            let outputs = emitted
                .into_iter()
                .map(|e| match e {
                    Emitted::Console(b) => Output::Console(b),
                    Emitted::Frame(f) => Output::Frame(f),
                })
                .collect();
            self.unreleased.push((position, outputs));
            self.drop_released();
        }
        lock(&self.status).executed = Some((position, here.exit));
        Ok(())
    }

    /// Forgets the outputs of positions the primary released.
    fn drop_released(&mut self) {
        let released = self.released.load(Ordering::Acquire);
        self.unreleased.retain(|(q, _)| *q > released);
    }

    fn take_over(mut self, t: LockstepTakeover) {
        // Every slice received before the takeover was executed (the channel keeps
        // the stream's order); a divergence in them ended the thread before.
        let mut world = t.world;
        world.set_virtual_now(self.vm.virtual_time_ns());
        // What the old primary's guest never took goes to the guest first.
        if let Some(heard) = &t.heard {
            t.parts.commit.redeliver(heard.take_untaken());
        }
        // Every slice executed took all its events (checked at its end).
        lock(&self.world).live = Some(world);
        self.drop_released();
        let outputs: Vec<Output> = self.unreleased.drain(..).flat_map(|(_, o)| o).collect();
        if !outputs.is_empty() {
            tracing::info!(
                outputs = outputs.len(),
                "releasing outputs of positions the old primary may not have released"
            );
        }
        (t.release)(outputs);
        tracing::info!(
            exit = self.vm.exits(),
            "takeover: the replica's guest runs on live from the end of the log"
        );
        EpochLoop::new(self.vm, t.parts).run();
    }
}

/// What differs between where the follower's guest stands and where the primary's
/// stood, in words.
fn mismatch(here: &ExitPoint, primary: &ExitPoint) -> Option<String> {
    if here.exit != primary.exit {
        Some(format!(
            "the guest stands at exit {}, the primary's stood at exit {}",
            here.exit, primary.exit
        ))
    } else if here.exit_trace != primary.exit_trace {
        Some(format!(
            "exit traces differ at exit {}: {:016x} here, {:016x} on the primary",
            here.exit, here.exit_trace, primary.exit_trace
        ))
    } else if here.output_digest != primary.output_digest {
        Some(format!(
            "output digests differ at exit {}: the guest's outputs are not the primary's",
            here.exit
        ))
    } else {
        None
    }
}

/// The follower's World: the replay until a takeover, the live World after.
struct Phase {
    replay: ReplayWorld,
    live: Option<Box<dyn World>>,
    /// The node stopped the follower: the guest returns at its next exit.
    stop: bool,
    /// Disk ranges the replayed guest wrote in the slice being executed (disk 0, the
    /// pair's one disk).
    written: Vec<DiskRange>,
}

struct LockstepWorld(Arc<Mutex<Phase>>);

impl LockstepWorld {
    fn with<R>(&self, f: impl FnOnce(&mut dyn World) -> R) -> R {
        let mut phase = lock(&self.0);
        let phase = &mut *phase;
        match phase.live.as_mut() {
            Some(live) => f(live.as_mut()),
            None => f(&mut phase.replay),
        }
    }
}

impl World for LockstepWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        self.with(|w| w.console_output(bytes))
    }

    fn transmit(&mut self, frame: &[u8]) {
        self.with(|w| w.transmit(frame))
    }

    fn receive(&mut self, exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        self.with(|w| w.receive(exit))
    }

    fn console_input(&mut self, exit: u64, max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        self.with(|w| w.console_input(exit, max))
    }

    fn has_network(&self) -> bool {
        self.with(|w| w.has_network())
    }

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        self.with(|w| w.disk_read(disk, offset, buf))
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        let mut phase = lock(&self.0);
        let phase = &mut *phase;
        match phase.live.as_mut() {
            Some(live) => live.disk_write(disk, offset, data),
            None => {
                // Noted before the write: a write that fails half done is covered too.
                phase.written.push(DiskRange {
                    offset,
                    len: data.len() as u64,
                });
                phase.replay.disk_write(disk, offset, data)
            }
        }
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        self.with(|w| w.disk_flush(disk))
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        self.with(|w| w.idle(request))
    }

    fn set_virtual_now(&mut self, now_ns: u64) {
        self.with(|w| w.set_virtual_now(now_ns))
    }

    fn flush(&mut self) {
        self.with(|w| w.flush())
    }

    fn pause_requested(&mut self) -> bool {
        let mut phase = lock(&self.0);
        if phase.stop {
            return true;
        }
        match phase.live.as_mut() {
            Some(live) => live.pause_requested(),
            None => false,
        }
    }
}
