//! The primary's epoch loop (on the vCPU thread): run the guest for an epoch, pause,
//! capture dirty pages, vCPU and device state and the epoch's disk writes, resume, and
//! hand the checkpoint to the sender. While a secondary joins it also copies memory and
//! disk to it in chunks between epochs, re-sending what the guest changes meanwhile.

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ftvm_vmm::{RunLimits, RunStop, Vm, VmError};

use super::commit::Commit;
use crate::link::Links;
use crate::protocol::{DiskWrite, Message};

/// Pages sent per epoch boundary while copying memory to a joining secondary.
const SYNC_PAGES: usize = 512;
/// Disk bytes sent per epoch boundary while copying the disk.
const SYNC_DISK_BYTES: u64 = 1 << 20;
/// Remaining pages small enough to go into the final pause of a copy.
const FINAL_PAGES: usize = 4096;
/// Link backlog (frames) above which no more copy chunks are queued this epoch.
const SYNC_BACKLOG: usize = 16;
/// Unacknowledged epochs after which the guest waits for the secondary.
const MAX_UNACKED: u64 = 16;

/// Replication mode of a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// No secondary: outputs are released at once.
    Degraded,
    /// Copying memory and disk to a joining secondary.
    Syncing,
    /// The completing checkpoint of a copy was sent; waiting for its acknowledgement.
    AwaitingFullAck,
    /// The secondary holds a full copy: outputs wait for acknowledgements.
    Protected,
}

impl Mode {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Degraded => "degraded",
            Mode::Syncing => "syncing",
            Mode::AwaitingFullAck => "awaiting-full-ack",
            Mode::Protected => "protected",
        }
    }
}

/// State shared between the epoch loop and the node's event loop.
#[derive(Debug)]
pub struct PrimaryState {
    /// The mode.
    pub mode: Mode,
    /// A secondary asked for a (new) full copy.
    pub join_requested: bool,
    /// Highest epoch acknowledged.
    pub acked: u64,
    /// Last epoch sealed.
    pub epoch: u64,
    /// The completing epoch of the current copy.
    pub full_epoch: u64,
    /// The current copy's identifier (the epoch at which it began).
    pub copy: u64,
    /// Checkpoints sent and not yet acknowledged: (epoch, when sent), oldest first.
    pub unacked: VecDeque<(u64, Instant)>,
    /// Acknowledgements rejected (an epoch never sent, or another copy).
    pub rejected_acks: u64,
    /// Stop the guest (fenced or shutting down).
    pub stop: bool,
    /// Checkpoint pauses (µs), recent.
    pub pauses_us: Vec<u64>,
    /// Pages and disk bytes still to copy.
    pub sync_left: (usize, u64),
    /// Set when the loop ends: the guest's exit code or the error.
    pub finished: Option<Result<u32, String>>,
}

/// The shared state and its condition variable.
#[derive(Debug)]
pub struct Shared {
    state: Mutex<PrimaryState>,
    cv: Condvar,
}

impl Shared {
    /// A degraded primary's state.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(PrimaryState {
                mode: Mode::Degraded,
                join_requested: false,
                acked: 0,
                epoch: 0,
                full_epoch: 0,
                copy: 0,
                unacked: VecDeque::new(),
                rejected_acks: 0,
                stop: false,
                pauses_us: Vec::new(),
                sync_left: (0, 0),
                finished: None,
            }),
            cv: Condvar::new(),
        })
    }

    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, PrimaryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the epoch loop (after an acknowledgement or a mode change).
    pub fn notify(&self) {
        self.cv.notify_all();
    }
}

/// What an acknowledgement means to the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// It acknowledges sent checkpoints up to its epoch.
    Accepted {
        /// It completed the copy: the pair is protected now.
        protected: bool,
    },
    /// For an epoch never sent, of another copy, or while no checkpoint is awaited.
    Rejected,
}

impl PrimaryState {
    /// Takes `Ack{epoch, copy}`: accepted only for a checkpoint of the current copy that
    /// was sent.
    pub fn ack(&mut self, epoch: u64, copy: u64) -> AckOutcome {
        let waiting = matches!(self.mode, Mode::AwaitingFullAck | Mode::Protected);
        if !waiting || copy != self.copy || epoch < self.full_epoch || epoch > self.epoch {
            self.rejected_acks += 1;
            return AckOutcome::Rejected;
        }
        if !self.unacked.iter().any(|(e, _)| *e == epoch) && epoch > self.acked {
            self.rejected_acks += 1;
            return AckOutcome::Rejected;
        }
        self.acked = self.acked.max(epoch);
        while self.unacked.front().is_some_and(|(e, _)| *e <= epoch) {
            self.unacked.pop_front();
        }
        let protected = self.mode == Mode::AwaitingFullAck;
        if protected {
            self.mode = Mode::Protected;
        }
        AckOutcome::Accepted { protected }
    }

    /// How long the oldest unacknowledged checkpoint has waited, and its epoch.
    pub fn oldest_unacked(&self) -> Option<(u64, Duration)> {
        self.unacked.front().map(|(e, t)| (*e, t.elapsed()))
    }

    /// No secondary any more: nothing is awaited.
    pub fn degrade(&mut self) {
        self.mode = Mode::Degraded;
        self.unacked.clear();
    }
}

/// What the epoch loop needs.
pub struct EpochLoop {
    /// The VM.
    pub vm: Vm,
    /// Output commit.
    pub commit: Commit,
    /// Shared with the node.
    pub shared: Arc<Shared>,
    /// Messages for the peer (sent by the sender thread).
    pub out: Sender<Message>,
    /// The links (for copy flow control).
    pub links: Links,
    /// This host's disk replica (read for the copy).
    pub disk: Option<PathBuf>,
    /// Longest epoch.
    pub epoch_length: Duration,
    /// After how long a power-off still waiting for its last acknowledgement is logged.
    pub final_wait: Duration,
}

/// A copy in progress.
struct Copy {
    /// Its identifier (the epoch at which it began).
    id: u64,
    /// Copy messages sent so far.
    sent: u64,
    pages: BTreeSet<u64>,
    disk: Option<(File, u64)>,
    disk_cursor: u64,
}

impl EpochLoop {
    /// Runs until the guest powers off, the node stops it, or the VM fails.
    pub fn run(mut self) {
        let result = self.epochs();
        if let Err(e) = &result {
            tracing::error!("guest stopped: {e}");
        }
        let mut s = self.shared.lock();
        s.finished = Some(result.map_err(|e| e.to_string()));
        drop(s);
        self.shared.notify();
    }

    fn epochs(&mut self) -> Result<u32, VmError> {
        let mut copy: Option<Copy> = None;
        let mut epoch = self.shared.lock().epoch;
        loop {
            if self.shared.lock().stop {
                return Ok(0);
            }
            epoch += 1;
            self.commit.start_epoch(epoch, self.epoch_length);
            let stop = self.vm.run(&RunLimits::default())?;
            let started = Instant::now();
            let dirty = self.vm.take_dirty_pages()?;
            let sealed = self.commit.seal(epoch);
            let (mode, join) = {
                let mut s = self.shared.lock();
                s.epoch = epoch;
                let join = std::mem::take(&mut s.join_requested);
                (s.mode, join)
            };
            if join {
                copy = Some(self.start_copy(epoch)?);
                self.commit.set_recording(true);
                self.set_mode(Mode::Syncing);
            }
            let syncing = join || mode == Mode::Syncing;
            if let (true, Some(c)) = (syncing, copy.as_mut()) {
                c.pages.extend(dirty.iter());
                for write in sealed.writes {
                    self.send(Message::SyncDisk {
                        copy: c.id,
                        index: c.sent,
                        write,
                    });
                    c.sent += 1;
                }
                if self.copy_step(c, epoch, sealed.flushed)? {
                    copy = None;
                }
            } else if matches!(mode, Mode::AwaitingFullAck | Mode::Protected) {
                let state = self.vm.capture_state()?;
                let pages = self.vm.read_pages(dirty.iter())?;
                self.shared
                    .lock()
                    .unacked
                    .push_back((epoch, Instant::now()));
                self.send(Message::Checkpoint {
                    epoch,
                    full: false,
                    state,
                    pages,
                    disk_writes: sealed.writes,
                    flush: sealed.flushed,
                    copy: 0,
                    copy_messages: 0,
                    outputs: sealed.outputs,
                });
            } else {
                copy = None;
            }
            self.record_pause(started.elapsed());
            if let RunStop::PowerOff(code) = stop {
                self.finish(epoch, code);
                return Ok(code);
            }
            self.wait_for_acks(epoch);
        }
    }

    fn start_copy(&mut self, id: u64) -> Result<Copy, VmError> {
        let pages: BTreeSet<u64> = self.vm.touched_pages()?.iter().collect();
        let disk = match &self.disk {
            Some(p) => {
                let f = File::open(p).map_err(|e| {
                    VmError::BadCheckpoint(format!("cannot read disk {}: {e}", p.display()))
                })?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                Some((f, len))
            }
            None => None,
        };
        tracing::info!(
            pages = pages.len(),
            "copying the guest to a joining secondary"
        );
        self.shared.lock().copy = id;
        self.send(Message::CopyStart { copy: id });
        Ok(Copy {
            id,
            sent: 0,
            pages,
            disk,
            disk_cursor: 0,
        })
    }

    /// One boundary's share of a copy. Returns true when the copy's completing
    /// checkpoint was sent.
    fn copy_step(&mut self, c: &mut Copy, epoch: u64, flushed: bool) -> Result<bool, VmError> {
        let disk_len = c.disk.as_ref().map_or(0, |(_, l)| *l);
        if self.links.backlog().is_some_and(|b| b < SYNC_BACKLOG) {
            let chunk: Vec<u64> = c.pages.iter().take(SYNC_PAGES).copied().collect();
            if !chunk.is_empty() && c.pages.len() > FINAL_PAGES {
                for g in &chunk {
                    c.pages.remove(g);
                }
                self.send(Message::SyncPages {
                    copy: c.id,
                    index: c.sent,
                    pages: self.vm.read_pages(chunk)?,
                });
                c.sent += 1;
            }
            if let Some((f, len)) = &c.disk {
                if c.disk_cursor < *len {
                    let n = SYNC_DISK_BYTES.min(len - c.disk_cursor);
                    let mut data = vec![0u8; n as usize];
                    f.read_exact_at(&mut data, c.disk_cursor).map_err(|e| {
                        VmError::BadCheckpoint(format!("disk read for the copy: {e}"))
                    })?;
                    self.send(Message::SyncDisk {
                        copy: c.id,
                        index: c.sent,
                        write: DiskWrite {
                            offset: c.disk_cursor,
                            data,
                        },
                    });
                    c.sent += 1;
                    c.disk_cursor += n;
                }
            }
        }
        self.shared.lock().sync_left = (c.pages.len(), disk_len - c.disk_cursor.min(disk_len));
        if c.pages.len() > FINAL_PAGES || c.disk_cursor < disk_len {
            return Ok(false);
        }
        let state = self.vm.capture_state()?;
        let pages = self.vm.read_pages(std::mem::take(&mut c.pages))?;
        // Awaited before it is sent: its acknowledgement may come back at once. Mode
        // and output holding change under the state's lock (the node degrades under
        // it too), so they never disagree.
        {
            let mut s = self.shared.lock();
            if s.mode != Mode::Syncing {
                // The node degraded meanwhile: the copy is abandoned.
                return Ok(true);
            }
            s.full_epoch = epoch;
            s.mode = Mode::AwaitingFullAck;
            s.unacked.push_back((epoch, Instant::now()));
            self.commit.set_holding(true);
        }
        self.send(Message::Checkpoint {
            epoch,
            full: true,
            state,
            pages,
            disk_writes: Vec::new(),
            flush: flushed,
            copy: c.id,
            copy_messages: c.sent,
            // Outputs of the copy's epochs were released at once (degraded).
            outputs: Vec::new(),
        });
        tracing::info!(
            epoch,
            "copy complete; waiting for the secondary's acknowledgement"
        );
        Ok(true)
    }

    fn set_mode(&self, mode: Mode) {
        self.shared.lock().mode = mode;
    }

    fn send(&self, msg: Message) {
        // The sender thread lives as long as the node; if it is gone the node is
        // shutting down and nothing needs sending.
        let _ = self.out.send(msg);
    }

    fn record_pause(&self, pause: Duration) {
        let mut s = self.shared.lock();
        s.pauses_us.push(pause.as_micros() as u64);
        if s.pauses_us.len() > 4096 {
            s.pauses_us.drain(..2048);
        }
    }

    /// Backpressure: a protected primary runs at most [`MAX_UNACKED`] epochs ahead of
    /// its secondary.
    fn wait_for_acks(&self, epoch: u64) {
        let mut s = self.shared.lock();
        while matches!(s.mode, Mode::Protected | Mode::AwaitingFullAck)
            && epoch.saturating_sub(s.acked) >= MAX_UNACKED
            && !s.stop
        {
            let (g, _) = self
                .shared
                .cv
                .wait_timeout(s, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner());
            s = g;
        }
    }

    /// The guest powered off at the end of `epoch`. Its held outputs leave only once
    /// the secondary acknowledged the last checkpoint, or the node degraded (secondary
    /// lost, arbiter won); a fenced node discards them and tells nobody.
    fn finish(&self, epoch: u64, code: u32) {
        let started = Instant::now();
        let mut warned = false;
        let mut s = self.shared.lock();
        while matches!(s.mode, Mode::Protected | Mode::AwaitingFullAck)
            && s.acked < epoch
            && !s.stop
        {
            if !warned && started.elapsed() > self.final_wait {
                warned = true;
                tracing::warn!(
                    epoch,
                    "the guest powered off; its last output waits for the secondary's acknowledgement"
                );
            }
            let (g, _) = self
                .shared
                .cv
                .wait_timeout(s, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner());
            s = g;
        }
        let fenced = s.stop;
        drop(s);
        if fenced {
            self.commit.discard();
            return;
        }
        // Everything held is acknowledged (or the node is degraded): nothing waits.
        self.commit.set_holding(false);
        self.send(Message::Stopped { exit_code: code });
    }
}
