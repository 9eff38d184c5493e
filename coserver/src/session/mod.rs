//! The replication session: one CoServer's role state machine, free of I/O.
//!
//! The session alone owns the role and the primary's mode, the arbiter generation this
//! node knows, the stream positions (cut, sent, acknowledged, released), the copy's
//! progress on both sides and the outputs held per position. Its drivers — the node's
//! event loop (links, timers, arbiter, replica) and the primary's epoch loop on the vCPU
//! thread — feed it [`Input`]s and carry out the [`Action`]s it returns; they decide
//! nothing themselves. It is tested without KVM, root or sockets (`tests`,
//! `pair_tests`).
//!
//! ```text
//! starting --(peer is primary)--> secondary --(full copy applied)--> secondary, ready
//! starting --(no primary heard for the start wait; this disk is the pair's newest
//!            whole data; arbiter won)--> primary (degraded)
//! primary: degraded --(Join, next cut)--> syncing --(full cut)--> awaiting-full-ack
//!          --(Ack of the full cut)--> protected
//! primary, not degraded --(peer lost, ack timeout, or a stall)--> claim:
//!          won --> degraded (held output released); lost or unusable --> fenced
//! primary --(peer heard with a higher generation)--> fenced
//! secondary, ready --(peer lost, or its CoServer restarted)--> claim:
//!          won --> primary (take over); lost --> fenced
//! primary --(peer primary in the same generation, its name sorts first)--> fenced
//! secondary --(primary heard with a higher generation)--> replica reset, Join
//! secondary, not ready --(peer lost)--> starting (the replica stays incomplete)
//! fenced --(its guest has stopped; a primary heard)--> secondary (Join)
//! ```

mod arbitration;
mod epoch_api;
mod follow;
mod messages;
mod operator;
mod primary;
mod quick;
mod replica;
mod shared;
mod standing;

#[cfg(test)]
mod lockstep_tests;
#[cfg(test)]
mod operator_tests;
#[cfg(test)]
mod pair_tests;
#[cfg(test)]
mod standing_tests;
#[cfg(test)]
mod tests;

use std::time::{Duration, Instant};

pub use epoch_api::RunPermit;
pub use primary::{AckOutcome, CutPlan, DiskCopy, Handover, Mode, OutputPolicy, Primary};
pub use replica::{CopyCheck, ReplicaProgress, ResyncReason};
pub use shared::SharedSession;

use crate::arbiter::{Claim, Held};
use crate::protocol::{DiskRange, Incomplete, Message, Output, Role, Standing};

/// What the session needs to know of the configuration.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// This node's name (two primaries of one generation: the name sorting first keeps
    /// the guest).
    pub node: String,
    /// Whether the arbiter can grant a takeover (`shared-storage`) or not (`none`).
    pub arbiter: ArbiterKind,
    /// Silence after which the peer is lost (heartbeat interval × misses).
    pub peer_timeout: Duration,
    /// How long a checkpoint or a Join may wait for its answer.
    pub ack_timeout: Duration,
    /// How long a starting node listens for a primary before it claims the guest.
    pub start_wait: Duration,
    /// A gap between two ticks longer than this means the event loop did not run: an
    /// acknowledgement offered to the quick path then waits for the loop's next tick.
    pub stall_limit: Duration,
    /// This node's links sending nothing for longer than this means this process did
    /// not run (a paused or starved process): the peer may have taken over.
    pub silence_limit: Duration,
    /// Lockstep mode's bound on the secondary's lag; `None` in checkpoint mode.
    pub lockstep: Option<LockstepLimits>,
}

/// How far a lockstep secondary may fall behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockstepLimits {
    /// Exits the secondary's guest may be behind the primary's before the primary's
    /// guest waits.
    pub max_lag_exits: u64,
    /// How long ago the oldest slice the secondary's guest has not executed may have
    /// been cut before the primary's guest waits (a takeover executes that tail first).
    pub max_lag: Duration,
}

/// The arbiter as far as roles are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArbiterKind {
    /// Claims can be won.
    Claims,
    /// No automatic takeover; `starts` says whether this node boots the guest at start.
    None {
        /// This node is the configured primary.
        starts: bool,
    },
}

/// Something that happened, as the drivers tell the session.
#[derive(Debug, Clone)]
pub enum Input {
    /// Time passes (`peer_alive`: heard on some link within the peer timeout).
    Tick {
        /// Now.
        now: Instant,
        /// Whether the peer is heard.
        peer_alive: bool,
        /// The longest this node's links went without sending a heartbeat since the
        /// last tick (a frozen process sends nothing; an event loop kept busy, or
        /// waiting for a lock, does not silence the links).
        silent: Duration,
    },
    /// The peer introduced itself or sent a heartbeat.
    PeerSays {
        /// Its name, when it says it (hello).
        node: Option<String>,
        /// Its process's session: a new one means the peer restarted.
        session: u64,
        /// Its role.
        role: Role,
        /// The highest generation it knows.
        generation: u64,
        /// What its disk replica holds.
        standing: Standing,
    },
    /// A message from the peer (the replication stream's control part; bulk payloads
    /// stay with the driver, which asks with [`Session::check_copy`] and
    /// [`Session::check_checkpoint`]).
    Message {
        /// When.
        now: Instant,
        /// The message.
        msg: Message,
    },
    /// The answer to [`Action::Claim`].
    Claimed(Result<Claim, String>),
    /// The answer to [`Action::CheckArbiter`].
    ArbiterChecked(Result<Held, String>),
    /// The driver could not apply what the session accepted (a copy part or a
    /// checkpoint), or the replica cannot be created.
    ApplyFailed(String),
    /// A copy message (`index` of copy `copy`) was applied.
    CopyPartApplied {
        /// The copy.
        copy: u64,
        /// Its index.
        index: u64,
    },
    /// A checkpoint accepted by [`Session::check_checkpoint`] is applied (and durable
    /// where the guest flushed, or where it completes a copy), or a lockstep slice of
    /// the log is held by the replica's guest: it may be acknowledged.
    CheckpointApplied {
        /// Its position.
        epoch: u64,
        /// Whether it completed copy `copy`.
        full: bool,
        /// The copy it completed (full only).
        copy: u64,
    },
    /// The guest that ran here has stopped (fenced or failed).
    GuestEnded(Result<u32, String>),
    /// The guest that stopped here when this node handed it over kept its memory (the
    /// disk is as it was there too): the rejoin asks only for what changed since.
    GuestKept,
    /// A lockstep secondary's guest no longer retraces the primary's (a digest or an
    /// event did not match): it needs a new copy; a repair (memory and the disk ranges
    /// written since) when it says where it diverged and what it wrote there.
    Diverged {
        /// What differed.
        why: String,
        /// The slice it diverged in and the disk ranges its guest wrote there.
        at: Option<(u64, Vec<DiskRange>)>,
    },
}

/// What the drivers must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send a message to the peer.
    Send(Message),
    /// Let outputs leave (console, tap), in order.
    Release(Vec<Output>),
    /// Claim the arbiter for the generation after [`Session::generation`]; answer with
    /// [`Input::Claimed`].
    Claim,
    /// Read whether another node won a generation after [`Session::generation`]
    /// (claims nothing); answer with [`Input::ArbiterChecked`] before anything else
    /// is handled.
    CheckArbiter,
    /// Persist a higher generation.
    Generation(u64),
    /// Record durably what this host's disk replica holds, before anything that
    /// follows (a `Whole` record: after making the disk durable).
    Record(Standing),
    /// Boot the guest fresh here (the first primary).
    BootGuest,
    /// Start the guest here from the standby replica (takeover).
    TakeOver,
    /// Announce the guest's network identity from this host at once (its prepared
    /// gratuitous ARP): a takeover follows. It touches no data, so it goes ahead of the
    /// takeover's durable record and the LAN learns the guest's new place meanwhile.
    Announce,
    /// Stop the guest, drop held output for good, close the tap.
    Fence,
    /// Create the replica (standby VM, disk) for a new copy (recorded incomplete
    /// before).
    NewReplica,
    /// The replica starts over: its outputs and frames forgotten.
    ResetReplica,
    /// Forget the replica (it was not complete).
    DropReplica,
    /// Tell the operator.
    Alert(String),
    /// The pair has ended: exit with this code.
    Exit(i32),
}

enum State {
    Starting {
        since: Instant,
    },
    Primary(Primary),
    Secondary(Secondary),
    Fenced {
        guest_stopped: bool,
        /// It handed the guest over after this position (switchover).
        handed_over: Option<u64>,
        /// The node kept the stopped guest's memory (and its disk is as it was there).
        kept: bool,
    },
}

struct Secondary {
    progress: ReplicaProgress,
    /// When a Join (or Resync) was sent that no CopyStart has answered yet.
    join_sent: Option<Instant>,
    /// The primary's process is gone (its CoServer restarted, or it handed the guest
    /// over) although the peer is heard: take over as if it were lost.
    primary_gone: bool,
    /// The primary handed the guest over (switchover).
    handed_over: bool,
    /// Applies that failed since the last full copy was applied.
    failures: u32,
    /// A new copy to ask for once the back-off after repeated failures has passed.
    resync_at: Option<(Instant, String)>,
}

/// The peer as last heard.
#[derive(Debug, Clone, Default)]
pub struct PeerView {
    /// Its name.
    pub name: Option<String>,
    /// Its process's session.
    pub session: Option<u64>,
    /// Its role.
    pub role: Option<Role>,
    /// What its disk replica holds.
    pub standing: Option<Standing>,
    /// Heard within the peer timeout.
    pub alive: bool,
    /// It left the pair on the operator's word (until its process restarts): its
    /// silence is expected.
    pub left: bool,
}

/// One CoServer's replication session.
pub struct Session {
    cfg: SessionConfig,
    state: State,
    generation: u64,
    peer: PeerView,
    /// What this host's disk replica holds, as last recorded.
    standing: Standing,
    /// Why this node does not boot the guest, while it waits.
    waiting: Option<String>,
    /// A starting node lost its claim to this holder of a later generation: it waits
    /// for the peer to be heard rather than claim again.
    claim_lost: Option<String>,
    /// A starting node's last claim found the arbiter unusable (it claims again).
    arbiter_error: Option<String>,
    /// The operator forced this starting node to run the guest (`ftvm ctl
    /// force-primary`): its next claim goes above the arbiter's highest generation.
    forced: bool,
    last_tick: Option<Instant>,
    /// Until then a peer not heard is not taken for lost: this node itself did not run
    /// for about the peer timeout (a whole host frozen stops both ends), so the peer
    /// gets one timeout to be heard again (see `tick`).
    grace_until: Option<Instant>,
    /// When this primary last asked the arbiter after its links fell silent.
    silence_checked: Option<Instant>,
    exit: Option<i32>,
    last_alert: Option<String>,
    /// New copies asked for because a lockstep replica diverged (secondary), or asked
    /// of this node (primary).
    resyncs: u64,
}

impl Session {
    /// A starting session that knows `generation`, on a host whose replica record
    /// says `standing`.
    pub fn new(cfg: SessionConfig, generation: u64, standing: Standing, now: Instant) -> Self {
        Self {
            cfg,
            state: State::Starting { since: now },
            generation,
            peer: PeerView::default(),
            standing,
            waiting: None,
            claim_lost: None,
            arbiter_error: None,
            forced: false,
            last_tick: None,
            grace_until: None,
            silence_checked: None,
            exit: None,
            last_alert: None,
            resyncs: 0,
        }
    }

    /// New copies asked for since this process started: by a secondary whose lockstep
    /// replica diverged, or of a primary by its secondary.
    pub fn resyncs(&self) -> u64 {
        self.resyncs
    }

    /// The role.
    pub fn role(&self) -> Role {
        match self.state {
            State::Starting { .. } => Role::Starting,
            State::Primary(_) => Role::Primary,
            State::Secondary(_) => Role::Secondary,
            State::Fenced { .. } => Role::Fenced,
        }
    }

    /// The primary's stream, while primary.
    pub fn primary(&self) -> Option<&Primary> {
        match &self.state {
            State::Primary(p) => Some(p),
            _ => None,
        }
    }

    /// The secondary's replica progress, while secondary.
    pub fn replica(&self) -> Option<&ReplicaProgress> {
        match &self.state {
            State::Secondary(s) => Some(&s.progress),
            _ => None,
        }
    }

    /// The highest arbiter generation this node knows.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The peer as last heard.
    pub fn peer(&self) -> &PeerView {
        &self.peer
    }

    /// What this host's replica holds, as recorded.
    pub fn standing(&self) -> Standing {
        self.standing
    }

    /// The position after which this fenced node handed the guest over (switchover):
    /// the stopped guest's memory there is worth keeping.
    pub fn handed_over_at(&self) -> Option<u64> {
        match self.state {
            State::Fenced { handed_over, .. } => handed_over,
            _ => None,
        }
    }

    /// Why a starting node does not boot the guest, while it waits.
    pub fn waiting(&self) -> Option<&str> {
        match self.state {
            State::Starting { .. } => self.waiting.as_deref(),
            _ => None,
        }
    }

    /// What this node advertises of its replica: a primary's disk is live, a ready
    /// secondary's replica is whole at its last checkpoint, otherwise the record.
    pub fn advertised(&self) -> Standing {
        let data = self.data_id();
        match &self.state {
            State::Primary(_) => Standing::Live {
                data,
                generation: self.generation,
            },
            State::Secondary(s) => match s.progress.ready_epoch() {
                Some(epoch) => Standing::Whole {
                    data,
                    generation: self.generation,
                    epoch,
                },
                None => self.standing,
            },
            _ => self.standing,
        }
    }

    /// The identity of the pair's data this node works with: its replica's, or (before
    /// a copy) its primary's.
    fn data_id(&self) -> u64 {
        self.standing
            .data()
            .or(self.peer.standing.and_then(|s| s.data()))
            .unwrap_or(0)
    }

    fn record(&mut self, out: &mut Vec<Action>, standing: Standing) {
        if standing != self.standing {
            self.standing = standing;
            out.push(Action::Record(standing));
        }
    }

    /// Records the replica incomplete; it is (or becomes) a copy of the primary's
    /// data, so it takes the primary's identity.
    fn record_incomplete(&mut self, out: &mut Vec<Action>, reason: Incomplete) {
        let data = self
            .peer
            .standing
            .and_then(|s| s.data())
            .unwrap_or_else(|| self.data_id());
        self.record(out, Standing::Incomplete { data, reason });
    }

    /// The pair ended cleanly at `epoch`: this replica holds the whole data there.
    fn record_whole(&mut self, out: &mut Vec<Action>, epoch: u64) {
        let (data, generation) = (self.data_id(), self.generation);
        self.record(
            out,
            Standing::Whole {
                data,
                generation,
                epoch,
            },
        );
    }

    fn record_live(&mut self, out: &mut Vec<Action>, generation: u64) {
        let data = self.data_id();
        self.record(out, Standing::Live { data, generation });
    }

    /// The exit code, once the pair has ended.
    pub fn exit_code(&self) -> Option<i32> {
        self.exit
    }

    /// Whether the primary's World records disk writes for a secondary (one is being
    /// copied to, or protects the guest).
    /// In lockstep only a copy carries disk data: the secondary's guest makes its own
    /// writes.
    pub fn records_disk_writes(&self) -> bool {
        self.primary().is_some_and(|p| match p.mode() {
            Mode::Degraded => false,
            Mode::Syncing { .. } => true,
            Mode::AwaitingFullAck { .. } | Mode::Protected { .. } => self.cfg.lockstep.is_none(),
        })
    }

    /// What the primary's World does with an output now.
    pub fn output_policy(&self) -> OutputPolicy {
        match &self.state {
            State::Primary(p) => p.output_policy(),
            _ => OutputPolicy::Discard,
        }
    }

    fn alert(&mut self, out: &mut Vec<Action>, text: String) {
        self.last_alert = Some(text.clone());
        out.push(Action::Alert(text));
    }

    fn alert_once(&mut self, out: &mut Vec<Action>, text: String) {
        if self.last_alert.as_deref() != Some(text.as_str()) {
            self.alert(out, text);
        }
    }

    /// Takes one input; returns what to do, in order.
    pub fn on(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Tick {
                now,
                peer_alive,
                silent,
            } => self.tick(&mut out, now, peer_alive, silent),
            Input::PeerSays {
                node,
                session,
                role,
                generation,
                standing,
            } => {
                if node.is_some() {
                    self.peer.name = node;
                }
                let restarted = self.peer.session.is_some_and(|s| s != session);
                let was = self.peer.role;
                self.peer.session = Some(session);
                self.peer.role = Some(role);
                self.peer.standing = Some(standing);
                if restarted {
                    self.peer.left = false;
                    self.peer_restarted(&mut out, was, role);
                }
                self.learn_generation(&mut out, generation);
                self.two_primaries(&mut out, role, generation);
            }
            Input::Message { now, msg } => self.message(&mut out, now, msg),
            Input::Claimed(result) => self.claimed(&mut out, result),
            Input::ArbiterChecked(result) => self.arbiter_checked(&mut out, result),
            Input::ApplyFailed(why) => self.apply_failed(&mut out, why),
            Input::CopyPartApplied { copy, index } => {
                if matches!(self.state, State::Secondary(_)) {
                    out.push(Action::Send(Message::CopyApplied {
                        copy,
                        applied: index + 1,
                    }));
                }
            }
            Input::CheckpointApplied { epoch, full, copy } => {
                self.checkpoint_applied(&mut out, epoch, full, copy)
            }
            Input::GuestEnded(result) => self.guest_ended(&mut out, result),
            Input::GuestKept => {
                if let State::Fenced { kept, .. } = &mut self.state {
                    *kept = true;
                }
            }
            Input::Diverged { why, at } => self.diverged(&mut out, why, at),
        }
        self.note_exit(&out);
        out
    }

    fn tick(&mut self, out: &mut Vec<Action>, now: Instant, alive: bool, silent: Duration) {
        let gap = self.last_tick.map(|t| now.saturating_duration_since(t));
        self.last_tick = Some(now);
        self.peer.alive = alive;
        if self.exit.is_some() {
            // The pair has ended here: nothing more to start or claim.
            return;
        }
        if gap.is_some_and(|g| g > self.cfg.silence_limit) && silent > self.cfg.silence_limit {
            // This process did not run for about the peer timeout (neither its event
            // loop nor its links: a busy event loop or a link cut alone is not that):
            // the peer may not have either (a host frozen whole, both ends on it), and
            // was not heard because this node was not listening. It gets one timeout
            // to be heard again before it counts as lost.
            self.grace_until = Some(now + self.cfg.peer_timeout);
        }
        let grace = self.grace_until.is_some_and(|g| now < g);
        if let State::Primary(p) = &self.state {
            let checked_lately = self
                .silence_checked
                .is_some_and(|t| now.saturating_duration_since(t) < self.cfg.peer_timeout);
            if silent > self.cfg.silence_limit && p.mode() != Mode::Degraded && !checked_lately {
                // This process did not run: the peer may have lost it and taken over
                // meanwhile, and an acknowledgement queued before that must not
                // release output now. The arbiter says whether it did (the answer
                // comes before anything queued is handled); a claim would drop a
                // secondary that only stood still with this node.
                self.silence_checked = Some(now);
                self.alert(
                    out,
                    format!(
                        "this node did not run (its links sent nothing) for {} ms, about the peer timeout: asking the arbiter whether the peer took over",
                        silent.as_millis()
                    ),
                );
                out.push(Action::CheckArbiter);
            }
        }
        match &mut self.state {
            State::Starting { since } => {
                let since = *since;
                self.tick_starting(out, now, since, alive);
            }
            State::Primary(p) => {
                if p.mode() == Mode::Degraded {
                    return;
                }
                p.lag_tick(now);
                if grace {
                    // Outputs wait meanwhile: nothing is released without the
                    // secondary's acknowledgement.
                    return;
                }
                if let Some((lag, stalled)) = p.lag_stalled(now) {
                    if stalled > self.cfg.ack_timeout {
                        self.alert(
                            out,
                            format!(
                                "the secondary's guest is {lag} exits behind and has not advanced for {} ms: asking the arbiter",
                                stalled.as_millis()
                            ),
                        );
                        out.push(Action::Claim);
                        return;
                    }
                }
                if let Some((epoch, waited)) = p.oldest_unacked(now) {
                    if waited > self.cfg.ack_timeout {
                        self.alert(
                            out,
                            format!(
                                "secondary has not acknowledged checkpoint {epoch} for {} ms: asking the arbiter",
                                waited.as_millis()
                            ),
                        );
                        out.push(Action::Claim);
                        return;
                    }
                }
                if !alive {
                    out.push(Action::Claim);
                }
            }
            State::Secondary(s) => {
                if let Some((at, _)) = &s.resync_at {
                    if now >= *at {
                        let reason = s.resync_at.take().map(|(_, r)| r).unwrap_or_default();
                        s.join_sent = Some(now);
                        out.push(Action::Send(Message::Resync { reason }));
                    }
                }
                if alive && !s.primary_gone {
                    if s.join_sent.is_some_and(|t| now - t > self.cfg.ack_timeout) {
                        s.join_sent = Some(now);
                        out.push(Action::Send(Message::Join));
                    }
                    return;
                }
                if grace && !s.primary_gone {
                    return;
                }
                if !s.progress.is_ready() {
                    self.primary_gone_before_ready(out, now);
                    return;
                }
                out.push(Action::Claim);
            }
            State::Fenced {
                guest_stopped,
                handed_over,
                kept,
            } => {
                if alive && *guest_stopped && self.peer.role == Some(Role::Primary) {
                    let holds = handed_over.filter(|_| *kept);
                    self.alert(
                        out,
                        match holds {
                            Some(p) => format!("the new primary is heard: rejoining it as secondary from position {p}, which this node's memory and disk hold"),
                            None => "a primary is heard again: rejoining it as secondary".into(),
                        },
                    );
                    self.join(out, now, holds);
                }
            }
        }
    }

    fn tick_starting(&mut self, out: &mut Vec<Action>, now: Instant, since: Instant, alive: bool) {
        if alive && self.peer.role == Some(Role::Primary) {
            self.join(out, now, None);
            return;
        }
        if let Some(why) = self.boot_blocker(alive) {
            if self.waiting.as_deref() != Some(why.as_str()) {
                self.alert(out, format!("waiting, the guest is not booted here: {why}"));
                self.waiting = Some(why);
            }
            return;
        }
        self.waiting = self.arbiter_error.clone();
        if let ArbiterKind::None { starts: false } = self.cfg.arbiter {
            self.waiting = Some(
                "arbiter none names the other node as the one that starts the guest; waiting for it"
                    .into(),
            );
        }
        if now.saturating_duration_since(since) < self.cfg.start_wait {
            return;
        }
        match self.cfg.arbiter {
            ArbiterKind::None { starts: true } => {
                self.alert(
                    out,
                    "starting the guest (arbiter none names this node)".into(),
                );
                self.record_live(out, self.generation);
                self.become_primary(out, 0, Action::BootGuest);
            }
            ArbiterKind::None { starts: false } => {}
            ArbiterKind::Claims => out.push(Action::Claim),
        }
    }

    /// Where a takeover continues the guest from, in words.
    fn takeover_from(&self, epoch: u64) -> String {
        match self.cfg.lockstep {
            None => format!("taking over from checkpoint {epoch}"),
            Some(_) => format!(
                "taking over the replica's running guest at the end of the log (position {epoch})"
            ),
        }
    }

    fn become_primary(&mut self, out: &mut Vec<Action>, epoch: u64, start: Action) {
        out.push(start);
        self.state = State::Primary(Primary::new(epoch, self.cfg.lockstep));
    }

    /// Takes the guest over from the replica ready at `epoch`, in `generation`: the
    /// guest's network identity is announced first, then the replica recorded live (the
    /// guest is about to run on this disk), then the guest started.
    fn take_over(&mut self, out: &mut Vec<Action>, epoch: u64, generation: u64) {
        out.push(Action::Announce);
        self.record_live(out, generation);
        self.become_primary(out, epoch, Action::TakeOver);
    }

    /// Becomes a secondary of the primary heard: asks for a full copy, or (`holds`)
    /// for what changed since the position this node's memory and disk hold.
    fn join(&mut self, out: &mut Vec<Action>, now: Instant, holds: Option<u64>) {
        self.record_incomplete(out, Incomplete::Copying);
        out.push(Action::NewReplica);
        self.state = State::Secondary(Secondary {
            progress: ReplicaProgress::default(),
            join_sent: Some(now),
            primary_gone: false,
            handed_over: false,
            failures: 0,
            resync_at: None,
        });
        out.push(Action::Send(match holds {
            Some(position) => Message::Rejoin { position },
            None => Message::Join,
        }));
    }

    fn raise_generation(&mut self, out: &mut Vec<Action>, g: u64) {
        if g > self.generation {
            self.generation = g;
            out.push(Action::Generation(g));
        }
    }

    /// The peer knows generation `g`. A higher one than this node's means the peer won
    /// the arbiter while this node was not heard: a primary's guest is no longer the
    /// guest and it fences; a secondary's replica missed what the primary ran alone.
    fn learn_generation(&mut self, out: &mut Vec<Action>, g: u64) {
        if g <= self.generation {
            return;
        }
        self.raise_generation(out, g);
        match &mut self.state {
            State::Primary(_) => self.fence(
                out,
                format!("the peer won the arbiter (generation {g}) while this node was not heard: fencing"),
                true,
            ),
            State::Secondary(_) => self.copy_again(
                out,
                format!("the primary won the arbiter (generation {g}) while this node was not heard: asking for a new copy"),
            ),
            State::Starting { .. } | State::Fenced { .. } => {}
        }
    }

    /// The secondary's replica is of a guest the primary no longer runs: it starts
    /// over (recorded incomplete, its outputs and frames forgotten) and asks for a new
    /// copy.
    fn copy_again(&mut self, out: &mut Vec<Action>, why: String) {
        let State::Secondary(s) = &mut self.state else {
            return;
        };
        s.progress = ReplicaProgress::default();
        s.join_sent = self.last_tick;
        s.primary_gone = false;
        s.handed_over = false;
        self.record_incomplete(out, Incomplete::Copying);
        out.push(Action::ResetReplica);
        self.alert(out, why);
        out.push(Action::Send(Message::Join));
    }

    fn guest_ended(&mut self, out: &mut Vec<Action>, result: Result<u32, String>) {
        match (&mut self.state, result) {
            (State::Fenced { guest_stopped, .. }, _) => *guest_stopped = true,
            (State::Primary(_), Err(e)) => {
                self.alert(out, format!("the guest stopped: {e}"));
                out.push(Action::Exit(125));
            }
            (State::Primary(_), Ok(_)) | (_, _) => {}
        }
    }

    /// Remembers the pair's end when `actions` carry it: the one place the exit code is
    /// set, whichever input ended the pair.
    fn note_exit(&mut self, actions: &[Action]) {
        if let Some(code) = actions.iter().find_map(|a| match a {
            Action::Exit(c) => Some(*c),
            _ => None,
        }) {
            self.exit = Some(code);
        }
    }
}
