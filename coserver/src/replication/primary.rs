//! The primary's epoch loop (on the vCPU thread): run the guest for an epoch, pause,
//! capture dirty pages, vCPU and device state and the epoch's disk writes, resume, and
//! hand the checkpoint to the sender. While a secondary joins it also copies memory and
//! disk to it in chunks between epochs, re-sending what the guest changes meanwhile.
//! What each cut becomes (released, copied, checkpointed, held) is the session's
//! decision; this loop carries it out.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_devices::world::record::{take_logged, InputLog};
use ftvm_vmm::{PageSet, RunLimits, RunStop, Vm, VmError};

use super::commit::Commit;
use crate::link::{Links, Outbox};
use crate::protocol::{
    CheckpointSegment, DiskRange, DiskWrite, ExitPoint, LogSegment, Message, Segment,
};
use crate::session::{Action, CutPlan, DiskCopy, RunPermit, SharedSession};

/// Pages sent per epoch boundary while copying memory to a joining secondary.
const SYNC_PAGES: usize = 512;
/// Disk bytes sent per epoch boundary while copying the disk.
const SYNC_DISK_BYTES: u64 = 1 << 20;
/// Lockstep slices of at most this many events are sent from the vCPU thread itself.
const SHORT_SLICE_EVENTS: usize = 64;
/// Remaining pages small enough to go into the final pause of a copy.
const FINAL_PAGES: usize = 4096;

/// What the epoch loop reports for status: pauses, the copy's progress, its end.
#[derive(Debug, Default)]
pub struct EpochStats {
    /// Checkpoint pauses (µs), recent.
    pub pauses_us: Vec<u64>,
    /// Every checkpoint pause.
    pub pause_hist: crate::control::Histogram,
    /// Pages and disk bytes still to copy.
    pub sync_left: Option<(usize, u64)>,
    /// Pages and disk bytes the last copy began with (a repair of a diverged lockstep
    /// replica sends only the disk ranges written since it last checked equal).
    pub last_copy: Option<(usize, u64)>,
    /// Set when the loop ends: the guest's exit code or the error.
    pub finished: Option<Result<u32, String>>,
    /// Ends the vCPU's KVM_RUN at once (a fence must not wait for the guest's next
    /// exit); set once the loop runs.
    pub kick: Option<ftvm_vmm::VcpuKick>,
    /// The guest's memory when it stopped for a switchover, for this node's rejoin.
    pub kept: Option<Kept>,
}

/// The memory of a guest that stopped for a switchover: every page it ever wrote, as
/// it was after `position` (the new primary resumed there).
#[derive(Debug)]
pub struct Kept {
    /// The last position the guest ran here.
    pub position: u64,
    /// Its pages.
    pub pages: ftvm_vmm::PageBatch,
}

/// What the guest wrote since it resumed here from a switchover: what the old primary,
/// whose memory and disk hold the guest as it was then, needs to become a replica.
#[derive(Debug, Default)]
struct SinceResume {
    pages: BTreeSet<u64>,
    ranges: Vec<DiskRange>,
}

/// What the epoch loop needs besides the VM.
pub struct EpochParts {
    /// Output commit.
    pub commit: Commit,
    /// The session, shared with the node.
    pub session: Arc<SharedSession>,
    /// Status figures, shared with the node.
    pub stats: Arc<Mutex<EpochStats>>,
    /// Messages for the peer (sent by the sender thread).
    pub out: Outbox,
    /// The links (for copy flow control).
    pub links: Links,
    /// This host's disk replica (read for the copy).
    pub disk: Option<PathBuf>,
    /// Longest epoch.
    pub epoch_length: Duration,
    /// The most a copy sends per second (bytes), if capped.
    pub copy_max_bytes_s: Option<u64>,
    /// Lockstep mode: the guest's input log, shipped in slices instead of checkpoints.
    pub lockstep: Option<LockstepLog>,
}

/// A lockstep primary's input log.
pub struct LockstepLog {
    /// The recording World's log.
    pub log: Arc<Mutex<InputLog>>,
    /// A slice ends at least every this many exits.
    pub verify_exits: u64,
    /// A slice carries a window of memory at least this often.
    pub verify_memory: Duration,
}

/// Pages in each lockstep memory sample (1 MiB).
pub const SAMPLE_PAGES: u64 = 256;

/// The primary's epoch loop.
pub struct EpochLoop {
    vm: Vm,
    parts: EpochParts,
    /// Lockstep: the next RAM page to sample, and when the last sample was taken.
    memory_sweep: (u64, Option<Instant>),
    /// Kept while the old primary of a switchover may rejoin.
    since_resume: Option<SinceResume>,
}

/// A copy in progress.
struct Copy {
    /// Its identifier (the epoch at which it began).
    id: u64,
    /// Copy messages sent so far.
    sent: u64,
    pages: BTreeSet<u64>,
    disk: Option<File>,
    /// Disk ranges still to send, in order.
    disk_left: VecDeque<DiskRange>,
    /// When it began, and the bytes of memory and disk it has sent since (its rate).
    began: Instant,
    bytes: u64,
    /// Indices of the chunks of memory and disk sent and perhaps not yet applied.
    chunks: VecDeque<u64>,
}

impl Copy {
    /// Whether the copy's rate leaves room for another chunk now (at most `cap` bytes
    /// per second on average since it began; one chunk at once).
    fn under(&self, cap: Option<u64>) -> bool {
        cap.is_none_or(|cap| {
            let allowed = cap as f64 * self.began.elapsed().as_secs_f64();
            self.bytes == 0 || (self.bytes as f64) < allowed
        })
    }
}

impl EpochLoop {
    /// The epoch loop of `vm`.
    pub fn new(vm: Vm, parts: EpochParts) -> Self {
        Self {
            vm,
            parts,
            memory_sweep: (0, None),
            since_resume: None,
        }
    }

    /// The loop stops: if this node handed the guest over, its memory is kept for the
    /// rejoin (an error only costs that: the rejoin asks for a full copy).
    fn keep_if_handed_over(&mut self) {
        let Some(position) = self.parts.session.lock().handed_over_at() else {
            return;
        };
        let kept = self
            .vm
            .touched_pages()
            .and_then(|pages| self.vm.read_pages(pages.iter()));
        match kept {
            Ok(pages) => {
                tracing::info!(
                    position,
                    pages = pages.len(),
                    "the guest's memory is kept for the rejoin"
                );
                self.stats_lock().kept = Some(Kept { position, pages });
            }
            Err(e) => tracing::warn!("the guest's memory is not kept for the rejoin: {e}"),
        }
    }

    /// Lockstep: the memory sample a slice cut now carries, when one is due.
    fn memory_sample(&mut self) -> Result<Option<ftvm_vmm::MemorySample>, VmError> {
        let Some(l) = &self.parts.lockstep else {
            return Ok(None);
        };
        let (next, last) = self.memory_sweep;
        // A guest that ran on past its last exit (a kick) is not where the secondary's
        // will stand at that exit count: no sample this time.
        if last.is_some_and(|t| t.elapsed() < l.verify_memory) || !self.vm.at_exit() {
            return Ok(None);
        }
        let (sample, after) = self.vm.memory_sample(next, SAMPLE_PAGES)?;
        self.memory_sweep = (after, Some(Instant::now()));
        Ok(Some(sample))
    }

    /// Runs until the guest powers off, the session stops it, or the VM fails.
    pub fn run(mut self) {
        match self.vm.arm_kick() {
            Ok(kick) => self.stats_lock().kick = Some(kick),
            Err(e) => tracing::warn!("{e}; a fence waits for the guest's next exit"),
        }
        let result = self.epochs();
        if let Err(e) = &result {
            tracing::error!("guest stopped: {e}");
        }
        self.stats_lock().finished = Some(result.map_err(|e| e.to_string()));
    }

    fn stats_lock(&self) -> std::sync::MutexGuard<'_, EpochStats> {
        self.parts.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn epochs(&mut self) -> Result<u32, VmError> {
        let mut copy: Option<Copy> = None;
        let (mut epoch, tracking) = self
            .parts
            .session
            .lock()
            .primary()
            .map_or((0, false), |p| (p.epoch(), p.tracks_since_resume()));
        if tracking {
            self.since_resume = Some(SinceResume::default());
            self.parts.commit.note_ranges();
        }
        loop {
            if self.parts.session.wait_permit(epoch + 1) == RunPermit::Stop {
                self.keep_if_handed_over();
                return Ok(0);
            }
            epoch += 1;
            self.parts
                .commit
                .start_epoch(epoch, self.parts.epoch_length);
            let limits = RunLimits {
                max_exits: self
                    .parts
                    .lockstep
                    .as_ref()
                    .map(|l| self.vm.exits() + l.verify_exits),
                ..Default::default()
            };
            let stop = self.vm.run(&limits)?;
            let started = Instant::now();
            let sealed = self.parts.commit.seal();
            let mut writes = sealed.writes;
            let ranges = DiskRange::merged(sealed.ranges);
            if let Some(s) = &mut self.since_resume {
                s.ranges.extend(ranges.iter().copied());
                if s.ranges.len() > 4096 {
                    s.ranges = DiskRange::merged(std::mem::take(&mut s.ranges));
                }
            }
            let plan = {
                let mut session = self.parts.session.lock();
                session.note_slice(epoch, self.vm.exits(), ranges, started);
                session.cut(epoch, sealed.outputs, started)
            };
            self.parts.session.notify();
            let events = self.parts.lockstep.as_ref().map(|l| take_logged(&l.log));
            // Lockstep ships no pages but while copying.
            let dirty = if events.is_none()
                || self.since_resume.is_some()
                || matches!(plan, CutPlan::StartCopy { .. } | CutPlan::Copy { .. })
            {
                self.vm.take_dirty_pages()?
            } else {
                PageSet::default()
            };
            if let Some(since) = &mut self.since_resume {
                since.pages.extend(dirty.iter());
            }
            let (release, copying) = match plan {
                CutPlan::Stop => {
                    self.keep_if_handed_over();
                    return Ok(0);
                }
                CutPlan::Release(outputs) => (outputs, None),
                CutPlan::StartCopy {
                    copy: id,
                    release,
                    disk,
                } => {
                    copy = Some(self.start_copy(id, disk)?);
                    (release, Some(id))
                }
                CutPlan::Copy { copy: id, release } => (release, Some(id)),
                // Its outputs are held by the session until the slice is acknowledged.
                CutPlan::Checkpoint { .. } if events.is_some() => {
                    copy = None;
                    let events = events.unwrap_or_default();
                    let memory = self.memory_sample()?;
                    // A short slice leaves from this thread at once (the usual case:
                    // it ends at an output); a long one through the sender thread.
                    let short = events.len() <= SHORT_SLICE_EVENTS;
                    let msg = Message::Segment {
                        position: epoch,
                        segment: Segment::Log(LogSegment {
                            end: ExitPoint {
                                exit: self.vm.exits(),
                                exit_trace: self.vm.exit_trace(),
                                output_digest: self.vm.output_digest(),
                            },
                            memory,
                            events,
                        }),
                    };
                    if short {
                        self.parts.out.send_small(msg);
                    } else {
                        self.send(msg);
                    }
                    (Vec::new(), None)
                }
                CutPlan::Checkpoint { outputs } => {
                    copy = None;
                    let state = self.vm.capture_state()?;
                    let pages = self.vm.read_pages(dirty.iter())?;
                    self.send(Message::Segment {
                        position: epoch,
                        segment: Segment::Checkpoint(CheckpointSegment {
                            full: false,
                            state,
                            pages,
                            disk_writes: std::mem::take(&mut writes),
                            flushes: sealed.flushes,
                            copy: 0,
                            copy_messages: 0,
                            outputs,
                            last_frame: None,
                        }),
                    });
                    (Vec::new(), None)
                }
            };
            self.parts.commit.release(release);
            match (copying, copy.as_mut()) {
                (Some(id), Some(c)) if c.id == id => {
                    c.pages.extend(dirty.iter());
                    for write in writes {
                        self.send(Message::SyncDisk {
                            copy: c.id,
                            index: c.sent,
                            write,
                        });
                        c.sent += 1;
                    }
                    if self.copy_step(c, epoch)? {
                        copy = None;
                    }
                }
                (Some(_), _) => {
                    // A copy this loop did not begin (it cannot happen: copies begin
                    // here); the session will ask again.
                    copy = None;
                }
                (None, _) => {}
            }
            // Disk writes are recorded while a secondary is (being) fed.
            self.parts
                .commit
                .set_recording(self.parts.session.lock().records_disk_writes());
            self.record_pause(started.elapsed());
            let powered_off = match stop {
                RunStop::PowerOff(code) => Some(code),
                RunStop::Reset => {
                    tracing::warn!("the guest asked to reboot; the pair does not restart a guest, so it stops as at a power-off (exit code 0)");
                    Some(0)
                }
                _ => None,
            };
            if let Some(code) = powered_off {
                let actions = self.parts.session.lock().powered_off(epoch, code);
                self.parts.session.notify();
                for a in actions {
                    if let Action::Send(m) = a {
                        self.send(m);
                    }
                }
                return Ok(code);
            }
        }
    }

    fn start_copy(&mut self, id: u64, what: DiskCopy) -> Result<Copy, VmError> {
        let since = self.since_resume.take();
        let (pages, what) = match (what, since) {
            // The old primary holds the guest as it was at the resume: what changed.
            (DiskCopy::SinceResume, Some(s)) => {
                (s.pages, DiskCopy::Ranges(DiskRange::merged(s.ranges)))
            }
            // Not kept (it cannot happen: the session asks only while the loop keeps).
            (DiskCopy::SinceResume, None) => {
                (self.vm.touched_pages()?.iter().collect(), DiskCopy::Whole)
            }
            (what, _) => (self.vm.touched_pages()?.iter().collect(), what),
        };
        let (disk, mut disk_left) = match &self.parts.disk {
            Some(p) => {
                let f = File::open(p).map_err(|e| {
                    VmError::BadCheckpoint(format!("cannot read disk {}: {e}", p.display()))
                })?;
                let left = match what {
                    DiskCopy::Whole => vec![DiskRange {
                        offset: 0,
                        len: f.metadata().map(|m| m.len()).unwrap_or(0),
                    }],
                    DiskCopy::Ranges(ranges) => ranges,
                    DiskCopy::SinceResume => Vec::new(),
                };
                (Some(f), left.into())
            }
            None => (None, VecDeque::new()),
        };
        let disk_bytes = DiskRange::total(disk_left.make_contiguous());
        tracing::info!(
            pages = pages.len(),
            disk_bytes,
            "copying the guest to a joining secondary"
        );
        self.stats_lock().last_copy = Some((pages.len(), disk_bytes));
        self.send(Message::CopyStart { copy: id });
        Ok(Copy {
            id,
            sent: 0,
            pages,
            disk,
            disk_left,
            began: Instant::now(),
            bytes: 0,
            chunks: VecDeque::new(),
        })
    }

    /// One boundary's share of a copy. Returns true when the copy's completing
    /// checkpoint was sent.
    fn copy_step(&mut self, c: &mut Copy, epoch: u64) -> Result<bool, VmError> {
        let window_open = self
            .parts
            .session
            .lock()
            .primary()
            .is_some_and(|p| p.copy_window_open(c.id, &mut c.chunks));
        let cap = self.parts.copy_max_bytes_s;
        if window_open && self.parts.links.backlog().is_some() && c.under(cap) {
            let chunk: Vec<u64> = c.pages.iter().take(SYNC_PAGES).copied().collect();
            if !chunk.is_empty() && c.pages.len() > FINAL_PAGES {
                for g in &chunk {
                    c.pages.remove(g);
                }
                c.bytes += chunk.len() as u64 * 4096;
                c.chunks.push_back(c.sent);
                self.send(Message::SyncPages {
                    copy: c.id,
                    index: c.sent,
                    pages: self.vm.read_pages(chunk)?,
                });
                c.sent += 1;
            }
            if c.under(cap) {
                self.copy_disk_chunk(c)?;
            }
        }
        let disk_left = DiskRange::total(c.disk_left.make_contiguous());
        self.stats_lock().sync_left = Some((c.pages.len(), disk_left));
        if c.pages.len() > FINAL_PAGES || disk_left > 0 {
            return Ok(false);
        }
        let state = self.vm.capture_state()?;
        let pages = self.vm.read_pages(std::mem::take(&mut c.pages))?;
        // Awaited before it is sent: its acknowledgement may come back at once. The
        // session may have abandoned the copy meanwhile (the node degraded).
        if !self
            .parts
            .session
            .lock()
            .full_cut(epoch, c.id, Instant::now())
        {
            return Ok(true);
        }
        self.parts.session.notify();
        self.stats_lock().sync_left = None;
        self.send(Message::Segment {
            position: epoch,
            segment: Segment::Checkpoint(CheckpointSegment {
                full: true,
                state,
                pages,
                disk_writes: Vec::new(),
                // The copy's writes went as copy messages; a full checkpoint is made
                // durable whole.
                flushes: Vec::new(),
                copy: c.id,
                copy_messages: c.sent,
                // Outputs of the copy's epochs were released at once (degraded).
                outputs: Vec::new(),
                last_frame: self.parts.commit.last_frame(),
            }),
        });
        tracing::info!(
            epoch,
            "copy complete; waiting for the secondary's acknowledgement"
        );
        Ok(true)
    }

    /// Sends up to [`SYNC_DISK_BYTES`] of the disk ranges the copy has left, one
    /// message per range (a copy of what changed since a resume has many small ones),
    /// counted as one chunk of the copy's window.
    fn copy_disk_chunk(&mut self, c: &mut Copy) -> Result<(), VmError> {
        let Some(f) = &c.disk else {
            return Ok(());
        };
        let mut budget = SYNC_DISK_BYTES;
        let mut last = None;
        while let (Some(range), true) = (c.disk_left.front_mut(), budget > 0) {
            let n = budget.min(range.len);
            let offset = range.offset;
            let mut data = vec![0u8; n as usize];
            f.read_exact_at(&mut data, offset)
                .map_err(|e| VmError::BadCheckpoint(format!("disk read for the copy: {e}")))?;
            range.offset += n;
            range.len -= n;
            if range.len == 0 {
                c.disk_left.pop_front();
            }
            budget -= n;
            c.bytes += n;
            last = Some(c.sent);
            self.parts.out.send(Message::SyncDisk {
                copy: c.id,
                index: c.sent,
                write: DiskWrite { offset, data },
            });
            c.sent += 1;
        }
        c.chunks.extend(last);
        Ok(())
    }

    fn send(&self, msg: Message) {
        self.parts.out.send(msg);
    }

    fn record_pause(&self, pause: Duration) {
        let mut s = self.stats_lock();
        s.pauses_us.push(pause.as_micros() as u64);
        s.pause_hist.observe(pause.as_micros() as u64);
        if s.pauses_us.len() > 4096 {
            s.pauses_us.drain(..2048);
        }
    }
}
