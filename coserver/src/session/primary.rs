//! The primary's side of the session: its mode, the stream positions and the outputs
//! held per position until the secondary acknowledges them.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{Action, LockstepLimits, RunPermit};
use crate::protocol::{DiskRange, Message, Output};

/// Unacknowledged epochs after which the guest waits for the secondary.
pub const MAX_UNACKED: u64 = 16;
/// Unacknowledged slices of the log after which a lockstep primary's guest waits (a
/// slice ends at every output, so there are many more of them than epochs).
pub const MAX_UNACKED_SLICES: u64 = 1024;
/// Copy messages sent and not yet applied by the secondary, at most, before the copy
/// waits (about 16 MiB of memory or disk in flight).
pub const COPY_WINDOW: u64 = 8;

/// Replication mode of a primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No secondary: outputs are released at once.
    Degraded,
    /// Copying memory and disk to a joining secondary (copy `copy`).
    Syncing {
        /// The copy's identifier (the epoch at which it began).
        copy: u64,
    },
    /// The completing checkpoint of a copy was sent; waiting for its acknowledgement.
    AwaitingFullAck {
        /// The copy.
        copy: u64,
        /// Its completing epoch.
        full_epoch: u64,
    },
    /// The secondary holds a full copy: outputs wait for acknowledgements.
    Protected {
        /// The copy the secondary descends from.
        copy: u64,
        /// Its completing epoch.
        full_epoch: u64,
    },
}

impl Mode {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Degraded => "degraded",
            Mode::Syncing { .. } => "syncing",
            Mode::AwaitingFullAck { .. } => "awaiting-full-ack",
            Mode::Protected { .. } => "protected",
        }
    }

    /// Whether outputs wait for acknowledgements.
    pub fn holds(self) -> bool {
        matches!(self, Mode::AwaitingFullAck { .. } | Mode::Protected { .. })
    }
}

/// What the primary's World does with an output as the guest makes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputPolicy {
    /// Let it leave now (degraded, nothing held before it).
    Pass,
    /// Keep it with the running epoch.
    Hold,
    /// Drop it (this node is not, or no longer, the primary).
    Discard,
}

/// What of the disk a copy sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskCopy {
    /// All of it (a secondary that holds nothing).
    Whole,
    /// These ranges (a diverged lockstep replica: the rest of its disk is the
    /// primary's).
    Ranges(Vec<DiskRange>),
    /// The memory pages and disk ranges written since the guest resumed here from a
    /// switchover: the secondary is the old primary, whose memory and disk hold the
    /// guest as it was then.
    SinceResume,
}

/// What the epoch loop does at the end of an epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutPlan {
    /// Release these outputs; nothing is replicated.
    Release(Vec<Output>),
    /// Begin copy `copy` to a joining secondary (after releasing the outputs).
    StartCopy {
        /// The copy.
        copy: u64,
        /// Outputs to release.
        release: Vec<Output>,
        /// What of the disk it sends.
        disk: DiskCopy,
    },
    /// Go on with copy `copy` (after releasing the outputs).
    Copy {
        /// The copy.
        copy: u64,
        /// Outputs to release.
        release: Vec<Output>,
    },
    /// Send the epoch's checkpoint, carrying these (held) outputs.
    Checkpoint {
        /// The outputs, held until acknowledged.
        outputs: Vec<Output>,
    },
    /// Not primary any more: stop the guest.
    Stop,
}

/// A switchover the operator asked of a protected primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// The guest stops at its next cut.
    Requested,
    /// The guest stopped after `position`: handed over once that is acknowledged.
    Final {
        /// The last position the guest ran here.
        position: u64,
    },
}

/// The answer to an acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// It acknowledges sent checkpoints up to its epoch; these outputs may leave.
    Accepted {
        /// It completed the copy: the pair is protected now.
        protected: bool,
        /// Outputs released by it, in order.
        released: Vec<Output>,
    },
    /// For an epoch never sent, one of another copy, or while none is awaited.
    Rejected,
}

#[derive(Debug)]
struct Held {
    epoch: u64,
    at: Instant,
    outputs: Vec<Output>,
}

/// A primary's stream.
#[derive(Debug)]
pub struct Primary {
    mode: Mode,
    /// Last epoch cut.
    epoch: u64,
    /// Highest epoch acknowledged.
    acked: u64,
    /// Checkpoints sent and not acknowledged: (epoch, when), oldest first.
    unacked: VecDeque<(u64, Instant)>,
    /// Outputs of sent checkpoints, until acknowledged.
    held: VecDeque<Held>,
    /// A secondary asked for a (new) copy; it begins at the next cut.
    join_requested: bool,
    /// Copy messages of the current copy the secondary has applied.
    copy_applied: u64,
    /// The guest powered off at (epoch, code); the pair ends once that is acknowledged.
    powered_off: Option<(u64, u32)>,
    finished: bool,
    rejected_acks: u64,
    /// Output-commit delays of released epochs (µs), recent.
    delays_us: Vec<u64>,
    /// Every output-commit delay.
    delay_hist: crate::control::Histogram,
    /// Lockstep: how far the secondary's guest has come.
    lockstep: Option<Box<SecondaryGuest>>,
    /// The next copy repairs a diverged replica: the disk ranges it sends.
    repair: Option<Vec<DiskRange>>,
    /// A switchover under way.
    handover: Option<Handover>,
    /// The guest resumed here at this position from a switchover, and no copy has
    /// begun since: the epoch loop keeps what it writes, for the old primary's rejoin.
    resumed: Option<u64>,
    /// The next copy sends only what changed since `resumed`.
    delta: bool,
}

/// A lockstep primary's view of its secondary's guest.
#[derive(Debug, Clone)]
struct SecondaryGuest {
    limits: LockstepLimits,
    /// This guest's exit at the last cut.
    cut_exit: u64,
    /// The secondary's guest's exit at the last position it executed.
    executed_exit: u64,
    /// When it last advanced (or the copy it started from completed).
    advanced_at: Option<Instant>,
    /// Disk ranges this guest wrote in each slice the secondary has not reported
    /// executed: what a repair of its disk must send.
    written: VecDeque<(u64, Vec<DiskRange>)>,
    /// When each slice the secondary has not reported executed was cut.
    pending: VecDeque<(u64, Instant)>,
    /// How long ago the oldest of them was cut, as of the last cut, report or tick.
    behind: Duration,
}

impl SecondaryGuest {
    fn measure(&mut self, now: Instant) {
        self.behind = self
            .pending
            .front()
            .map_or(Duration::ZERO, |(_, at)| now.saturating_duration_since(*at));
    }
}

impl Primary {
    /// A degraded primary whose next epoch is `epoch + 1`; a lockstep one with `lockstep`.
    pub fn new(epoch: u64, lockstep: Option<LockstepLimits>) -> Self {
        Self {
            mode: Mode::Degraded,
            epoch,
            acked: 0,
            unacked: VecDeque::new(),
            held: VecDeque::new(),
            join_requested: false,
            copy_applied: 0,
            powered_off: None,
            finished: false,
            rejected_acks: 0,
            delays_us: Vec::new(),
            delay_hist: Default::default(),
            lockstep: lockstep.map(|limits| {
                Box::new(SecondaryGuest {
                    limits,
                    cut_exit: 0,
                    executed_exit: 0,
                    advanced_at: None,
                    written: VecDeque::new(),
                    pending: VecDeque::new(),
                    behind: Duration::ZERO,
                })
            }),
            repair: None,
            handover: None,
            resumed: None,
            delta: false,
        }
    }

    /// This guest resumed at `position` from a switchover: the old primary's memory
    /// and disk hold it as it was there.
    pub(super) fn resumed_from_handover(&mut self, position: u64) {
        self.resumed = Some(position);
    }

    /// Whether the epoch loop keeps the pages and disk ranges the guest writes (for
    /// the old primary's rejoin after a switchover).
    pub fn tracks_since_resume(&self) -> bool {
        self.resumed.is_some()
    }

    /// The old primary asks to rejoin from `position`: a copy of what changed since if
    /// this guest resumed there and no copy has begun since, a full one otherwise.
    /// Returns the released outputs and whether the copy is the smaller one.
    pub(super) fn rejoin(&mut self, position: u64) -> (Vec<Output>, bool) {
        let delta = self.resumed == Some(position) && self.mode == Mode::Degraded;
        let released = self.restart_copy();
        self.delta = delta;
        if delta {
            self.resumed = Some(position);
        }
        (released, delta)
    }

    /// The switchover under way, if any.
    pub fn handover(&self) -> Option<Handover> {
        self.handover
    }

    /// The operator asks for a switchover: the guest stops at its next cut. `Err`:
    /// why not now.
    pub(super) fn request_handover(&mut self) -> Result<(), String> {
        if !matches!(self.mode, Mode::Protected { .. }) {
            return Err(format!(
                "the pair is not protected (this primary is {}): a switchover needs a secondary holding a full copy",
                self.mode.name()
            ));
        }
        if self.powered_off.is_some() || self.finished {
            return Err("the guest has powered off".into());
        }
        if self.handover.is_some() {
            return Err("a switchover is already under way".into());
        }
        self.handover = Some(Handover::Requested);
        Ok(())
    }

    /// The last position the guest ran, once it stopped for a switchover and the
    /// secondary acknowledged it: time to hand over.
    pub(super) fn handover_due(&self) -> Option<u64> {
        match self.handover {
            Some(Handover::Final { position })
                if self.acked >= position && !self.finished && self.powered_off.is_none() =>
            {
                Some(position)
            }
            _ => None,
        }
    }

    /// Lockstep: how many exits the secondary's guest is behind this one's (while
    /// outputs wait for the secondary).
    pub fn lag_exits(&self) -> Option<u64> {
        let f = self.lockstep.as_ref()?;
        self.mode
            .holds()
            .then(|| f.cut_exit.saturating_sub(f.executed_exit))
    }

    /// Lockstep: how long ago the oldest slice the secondary's guest has not executed
    /// was cut (while outputs wait for the secondary).
    pub fn lag_time(&self) -> Option<Duration> {
        let f = self.lockstep.as_ref()?;
        self.mode.holds().then_some(f.behind)
    }

    /// Whether the secondary's guest is further behind than the limits allow.
    fn lag_exceeded(&self) -> bool {
        self.lockstep.as_ref().is_some_and(|f| {
            self.lag_exits()
                .is_some_and(|lag| lag > f.limits.max_lag_exits)
                || self.lag_time().is_some_and(|t| t > f.limits.max_lag)
        })
    }

    /// The slice about to be cut at `position`, at `now`: this guest stands at `exit`
    /// and wrote `written` in it.
    pub(super) fn note_slice(
        &mut self,
        position: u64,
        exit: u64,
        written: Vec<DiskRange>,
        now: Instant,
    ) {
        let holds = self.mode.holds();
        if let Some(f) = &mut self.lockstep {
            f.cut_exit = exit;
            if holds {
                if !written.is_empty() {
                    f.written.push_back((position, written));
                }
                f.pending.push_back((position, now));
                f.measure(now);
            }
        }
    }

    /// Time passes: the lag in time grows while the secondary reports nothing.
    pub(super) fn lag_tick(&mut self, now: Instant) {
        if let Some(f) = &mut self.lockstep {
            f.measure(now);
        }
    }

    /// The secondary's guest executed the log through `position`, standing at `exit`.
    pub(super) fn executed(&mut self, position: u64, exit: u64, now: Instant) {
        let Some(f) = &mut self.lockstep else {
            return;
        };
        if self.mode.holds() && position <= self.epoch && exit > f.executed_exit {
            f.executed_exit = exit;
            f.advanced_at = Some(now);
            while f.written.front().is_some_and(|(p, _)| *p <= position) {
                f.written.pop_front();
            }
            while f.pending.front().is_some_and(|(p, _)| *p <= position) {
                f.pending.pop_front();
            }
            f.measure(now);
        }
    }

    /// Lockstep: the lag in exits, and how long the secondary's guest has not advanced,
    /// while the lag is beyond its bounds (this guest waits then).
    pub(super) fn lag_stalled(&self, now: Instant) -> Option<(u64, Duration)> {
        let f = self.lockstep.as_ref()?;
        let lag = self.lag_exits()?;
        let at = f.advanced_at?;
        self.lag_exceeded()
            .then(|| (lag, now.saturating_duration_since(at)))
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Last epoch cut.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Highest epoch acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Acknowledgements rejected so far.
    pub fn rejected_acks(&self) -> u64 {
        self.rejected_acks
    }

    /// Recent output-commit delays (µs).
    pub fn delays_us(&self) -> &[u64] {
        &self.delays_us
    }

    /// Every output-commit delay since this node became primary.
    pub fn delay_histogram(&self) -> &crate::control::Histogram {
        &self.delay_hist
    }

    /// Outputs held now (for the invariants' checks).
    pub fn held_epochs(&self) -> impl Iterator<Item = u64> + '_ {
        self.held.iter().map(|h| h.epoch)
    }

    pub(super) fn output_policy(&self) -> OutputPolicy {
        if self.finished {
            OutputPolicy::Discard
        } else if self.mode.holds() || !self.held.is_empty() {
            OutputPolicy::Hold
        } else {
            OutputPolicy::Pass
        }
    }

    pub(super) fn oldest_unacked(&self, now: Instant) -> Option<(u64, Duration)> {
        self.unacked
            .front()
            .map(|(e, t)| (*e, now.saturating_duration_since(*t)))
    }

    /// No secondary any more: everything held is released, nothing is awaited.
    pub(super) fn degrade(&mut self) -> Vec<Output> {
        self.mode = Mode::Degraded;
        // A switchover without a secondary is off: the guest runs on here.
        self.handover = None;
        self.unacked.clear();
        if let Some(f) = &mut self.lockstep {
            f.written.clear();
            f.pending.clear();
            f.behind = Duration::ZERO;
        }
        self.held.drain(..).flat_map(|h| h.outputs).collect()
    }

    /// A secondary holds nothing and asks for a copy: degraded until it has one.
    pub(super) fn restart_copy(&mut self) -> Vec<Output> {
        self.join_requested = true;
        self.repair = None;
        self.delta = false;
        self.resumed = None;
        self.degrade()
    }

    /// A lockstep secondary's guest diverged in a slice after the last it reported
    /// executed, having written `written` there: the next copy sends memory and the
    /// disk ranges either guest wrote since (degraded until it completes); the whole
    /// disk unless every write since was noted. Returns the released outputs and the
    /// ranges (`None`: the whole disk).
    pub(super) fn repair_copy(
        &mut self,
        written: Vec<DiskRange>,
    ) -> (Vec<Output>, Option<Vec<DiskRange>>) {
        if !self.mode.holds() || self.lockstep.is_none() {
            // The writes since the replica last checked equal were not all noted (this
            // node ran degraded or copied meanwhile): the whole disk.
            return (self.restart_copy(), None);
        }
        let mut ranges = written;
        if let Some(f) = &self.lockstep {
            // Every slice the secondary had not reported executed: a superset of those
            // from `position` on (it diverged after the last one it reported).
            ranges.extend(f.written.iter().flat_map(|(_, w)| w.iter().copied()));
        }
        let ranges = DiskRange::merged(ranges);
        let released = self.restart_copy();
        self.repair = Some(ranges.clone());
        (released, Some(ranges))
    }

    pub(super) fn cut(&mut self, epoch: u64, outputs: Vec<Output>, now: Instant) -> CutPlan {
        if self.finished {
            return CutPlan::Stop;
        }
        self.epoch = epoch;
        match self.mode {
            Mode::Degraded if self.join_requested => {
                self.join_requested = false;
                self.copy_applied = 0;
                self.mode = Mode::Syncing { copy: epoch };
                // Whatever the copy, the loop stops keeping what changed since a resume.
                self.resumed = None;
                let disk = if std::mem::take(&mut self.delta) {
                    DiskCopy::SinceResume
                } else {
                    self.repair.take().map_or(DiskCopy::Whole, DiskCopy::Ranges)
                };
                CutPlan::StartCopy {
                    copy: epoch,
                    release: outputs,
                    disk,
                }
            }
            Mode::Degraded => CutPlan::Release(outputs),
            // Outputs of the copy's epochs leave at once: the copy is not a replica yet.
            Mode::Syncing { copy } => CutPlan::Copy {
                copy,
                release: outputs,
            },
            Mode::AwaitingFullAck { .. } | Mode::Protected { .. } => {
                if self.handover == Some(Handover::Requested) {
                    // The guest runs no further here.
                    self.handover = Some(Handover::Final { position: epoch });
                }
                self.unacked.push_back((epoch, now));
                if !outputs.is_empty() {
                    self.held.push_back(Held {
                        epoch,
                        at: now,
                        outputs: outputs.clone(),
                    });
                }
                CutPlan::Checkpoint { outputs }
            }
        }
    }

    /// The secondary applied `applied` messages of copy `copy`.
    pub(super) fn copy_applied(&mut self, copy: u64, applied: u64) {
        if self.mode == (Mode::Syncing { copy }) {
            self.copy_applied = self.copy_applied.max(applied);
        }
    }

    /// Whether copy `copy` may send another chunk of memory or disk now, `chunks`
    /// holding the indices of the chunks it sent (those the secondary has applied are
    /// dropped from it): paced by what the secondary has applied, not by what this host
    /// has queued. The guest's own writes, also copy messages, do not count: a guest
    /// writing faster than the window turns round must not starve the copy.
    pub fn copy_window_open(&self, copy: u64, chunks: &mut VecDeque<u64>) -> bool {
        while chunks.front().is_some_and(|i| *i < self.copy_applied) {
            chunks.pop_front();
        }
        self.mode == (Mode::Syncing { copy }) && (chunks.len() as u64) < COPY_WINDOW
    }

    pub(super) fn full_cut(&mut self, epoch: u64, copy: u64, now: Instant) -> bool {
        if self.mode != (Mode::Syncing { copy }) {
            return false;
        }
        self.epoch = self.epoch.max(epoch);
        self.mode = Mode::AwaitingFullAck {
            copy,
            full_epoch: epoch,
        };
        self.unacked.push_back((epoch, now));
        if let Some(f) = &mut self.lockstep {
            // The secondary's guest starts where the copy ends.
            f.executed_exit = f.cut_exit;
            f.advanced_at = Some(now);
            f.pending.clear();
            f.measure(now);
        }
        true
    }

    pub(super) fn ack(&mut self, epoch: u64, copy: u64, now: Instant) -> AckOutcome {
        let (mode_copy, full_epoch) = match self.mode {
            Mode::AwaitingFullAck { copy, full_epoch } | Mode::Protected { copy, full_epoch } => {
                (copy, full_epoch)
            }
            Mode::Degraded | Mode::Syncing { .. } => {
                self.rejected_acks += 1;
                return AckOutcome::Rejected;
            }
        };
        let sent = self.unacked.iter().any(|(e, _)| *e == epoch);
        if copy != mode_copy
            || epoch < full_epoch
            || epoch > self.epoch
            || !(sent || epoch <= self.acked)
        {
            self.rejected_acks += 1;
            return AckOutcome::Rejected;
        }
        self.acked = self.acked.max(epoch);
        while self.unacked.front().is_some_and(|(e, _)| *e <= epoch) {
            self.unacked.pop_front();
        }
        let mut released = Vec::new();
        while self.held.front().is_some_and(|h| h.epoch <= epoch) {
            if let Some(h) = self.held.pop_front() {
                let us = now.saturating_duration_since(h.at).as_micros() as u64;
                self.delays_us.push(us);
                self.delay_hist.observe(us);
                released.extend(h.outputs);
            }
        }
        if self.delays_us.len() > 4096 {
            self.delays_us.drain(..2048);
        }
        let protected = matches!(self.mode, Mode::AwaitingFullAck { .. });
        if protected {
            self.mode = Mode::Protected {
                copy: mode_copy,
                full_epoch,
            };
        }
        AckOutcome::Accepted {
            protected,
            released,
        }
    }

    /// The epoch at whose end the guest powered off, until the pair ends.
    pub(super) fn powered_off_at(&self) -> Option<u64> {
        self.powered_off.map(|(e, _)| e)
    }

    pub(super) fn powered_off(&mut self, epoch: u64, code: u32) {
        self.powered_off = Some((epoch, code));
    }

    /// If the guest powered off and nothing of it waits any more: the pair's end.
    pub(super) fn take_finish(&mut self) -> Vec<Action> {
        let Some((epoch, code)) = self.powered_off else {
            return Vec::new();
        };
        if self.mode.holds() && self.acked < epoch {
            return Vec::new();
        }
        self.powered_off = None;
        self.finished = true;
        vec![
            Action::Send(Message::Stopped { exit_code: code }),
            Action::Exit(code as i32),
        ]
    }

    fn max_unacked(&self) -> u64 {
        if self.lockstep.is_some() {
            MAX_UNACKED_SLICES
        } else {
            MAX_UNACKED
        }
    }

    pub(super) fn may_run(&self, next: u64) -> RunPermit {
        if self.finished {
            RunPermit::Stop
        } else if matches!(self.handover, Some(Handover::Final { .. })) {
            // Stopped for a switchover: it runs on only if the switchover is called
            // off (the secondary lost before it acknowledged).
            RunPermit::Wait
        } else if (self.mode.holds() && next.saturating_sub(self.acked) > self.max_unacked())
            || self.lag_exceeded()
        {
            RunPermit::Wait
        } else {
            RunPermit::Run
        }
    }
}
