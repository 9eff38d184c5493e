//! One CoServer (`ftvm coserver --config FILE`): the driver of its replication session.
//!
//! The node's event loop turns what the links, the clock and the guest report into
//! session inputs and carries out the session's actions: messages, releases of output,
//! arbiter claims, booting or taking over the guest, fencing, the replica's I/O. The
//! role state machine itself is `crate::session` (see the diagram there).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_devices::backend::tap::Tap;

mod follower;
mod guest_start;
mod operator;
mod quick;
mod status;

use guest_start::GuestFrom;
use quick::QuickPath;

use crate::arbiter::{Arbiter, KnownGeneration, UsedIdentity};
use crate::config::{ArbiterConfig, Config};
use crate::control::{self, Status};
use crate::link::{Event, Events, LinkOptions, Links, LocalInfo, Outbox, PeerInfo, RecvError};
use crate::protocol::{GuestShape, Message, ReplicationMode, Role, Segment, Standing};
use crate::replication::commit::Commit;
use crate::replication::lockstep::Follower;
use crate::replication::mirror::Mirror;
use crate::replication::primary::EpochStats;
use crate::replication::record::ReplicaRecord;
use crate::replication::secondary::Replica;
use crate::session::{
    Action, ArbiterKind, CopyCheck, Input, LockstepLimits, Session, SessionConfig, SharedSession,
};

/// Errors that stop a CoServer.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The links.
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    /// The arbiter.
    #[error(transparent)]
    Arbiter(#[from] crate::arbiter::ArbiterError),
    /// The control API.
    #[error(transparent)]
    Control(#[from] control::ControlError),
    /// Starting the guest.
    #[error("cannot start the guest: {0}")]
    Guest(String),
    /// The replica.
    #[error(transparent)]
    Replica(#[from] crate::replication::secondary::ReplicaError),
    /// The replica's record.
    #[error(transparent)]
    Record(#[from] crate::replication::record::RecordError),
    /// A lockstep replica's guest cannot start.
    #[error("the replica's guest cannot start: {0}")]
    Follower(#[from] crate::replication::lockstep::FollowerError),
    /// The guest's tap cannot be read while the guest runs elsewhere.
    #[error(transparent)]
    Mirror(#[from] crate::replication::mirror::MirrorError),
}

/// Opens the guest's tap `name` and reads it for the guest at `mac`.
fn mirror_tap(name: &str, mac: &str) -> Result<Mirror, NodeError> {
    let tap = Tap::open(name).map_err(|e| NodeError::Guest(e.to_string()))?;
    let mac = crate::attach::parse_mac(mac).map_err(|e| NodeError::Guest(e.to_string()))?;
    Ok(Mirror::start(tap, mac)?)
}

/// What the operator asks of a starting CoServer.
#[derive(Debug, Clone, Copy, Default)]
pub struct StartOptions {
    /// First deployment: this host's disk holds the pair's data.
    pub initial_primary: bool,
    /// Discard what this host's replica holds (it is copied over).
    pub discard_replica: bool,
}

/// The guest running here.
struct Running {
    commit: Commit,
    stats: Arc<Mutex<EpochStats>>,
}

struct Node {
    cfg: Config,
    /// Where the configuration was read from (`ftvm ctl reload` reads it again).
    config_path: std::path::PathBuf,
    /// The operator's actions, from the control API.
    requests: control::Requests,
    /// When the last operator action was answered.
    answered: Option<Instant>,
    links: Links,
    events: Events,
    out: Outbox,
    arbiter: Arbiter,
    known: KnownGeneration,
    record: ReplicaRecord,
    /// The arbiter directory's identity this node used, and the peer's.
    arbiter_id: UsedIdentity,
    peer_arbiter_id: Option<u64>,
    session: Arc<SharedSession>,
    /// The link readers' way in, between this node's turns.
    quick: Arc<QuickPath>,
    /// The guest this node stopped when it fenced, until its vCPU thread is done.
    fenced_guest: Option<Arc<Mutex<EpochStats>>>,
    started: Instant,
    /// When the arbiter last answered a claim (a takeover's announcement is timed from
    /// it).
    claim_answered: Option<Instant>,
    running: Option<Running>,
    /// The guest's tap while the guest runs elsewhere: held open and read, written only
    /// to announce a takeover (`replication::mirror`). The tap is checked at startup,
    /// its bridge port already forwards when this node takes over (a port that has just
    /// gained carrier can drop the first frames), and what it hears for the guest is
    /// delivered after a takeover where the old primary's guest did not take it.
    mirror: Option<Mirror>,
    replica: Option<Replica>,
    /// Lockstep: the replica's guest, running from the copy on.
    follower: Option<Follower>,
    /// The memory of the guest this node stopped for a switchover, until its rejoin
    /// makes it the replica's.
    kept: Option<crate::replication::primary::Kept>,
    /// The gratuitous ARP that moves the guest's address to this host, prepared at
    /// startup (a guest with a tap and an address).
    announcement: Option<Vec<u8>>,
    alerts: Vec<String>,
    link_was_healthy: Vec<bool>,
    status: Arc<Mutex<Status>>,
    /// What the published status computes over time: rates and percentiles.
    samples: status::Samples,
}

/// How long a CoServer that is about to exit lets the control API write the answer it
/// just gave (it runs on the links' runtime, shut down at exit).
const ANSWER_GRACE: Duration = Duration::from_millis(200);

/// The last stretch before the peer-lost deadline that the event loop sleeps precisely.
const FINE_WAIT: Duration = Duration::from_millis(2);

/// How often the event loop looks at the clock when nothing arrives.
fn tick(cfg: &Config) -> Duration {
    cfg.heartbeat.interval().min(Duration::from_millis(20))
}

/// Runs a CoServer until its guest powers off; returns the process exit code.
pub fn run(config_path: &Path, opts: StartOptions) -> Result<i32, NodeError> {
    let cfg = Config::load(config_path)?;
    let key = cfg.psk()?;
    let known = KnownGeneration::load(&cfg.host.state_dir)?;
    let mut record = ReplicaRecord::load(&cfg.host.state_dir)?;
    if opts.discard_replica {
        tracing::warn!(was = %record.standing().describe(), "discarding this host's replica: it will be copied over");
        record.discard()?;
    }
    if opts.initial_primary && record.designate(known.get())? {
        tracing::warn!(standing = %record.standing().describe(), "this host's replica is designated as the pair's data");
    }
    if cfg.host.disk.is_some()
        && record.standing().data() == Some(crate::replication::record::DISKLESS)
    {
        // Recorded while the guest had no disk: says nothing of the disk it has now.
        tracing::warn!("this host's replica was recorded without a disk; it now has one and holds no recorded pair data");
        record.discard()?;
    }
    if cfg.host.disk.is_none() && record.standing() == Standing::Blank {
        // A guest without a disk has no data to lose: any node may boot it fresh, and
        // both nodes hold the same (empty) data.
        record.designate_diskless()?;
    }
    let arbiter = match &cfg.arbiter {
        ArbiterConfig::SharedStorage { path } => Arbiter::SharedStorage { dir: path.clone() },
        ArbiterConfig::None { .. } => Arbiter::None,
    };
    arbiter.check()?;
    let arbiter_id = UsedIdentity::load(&cfg.host.state_dir)?;
    if let Some(id) = arbiter_id.get() {
        // The directory this node used before must still be the one it sees.
        arbiter.identify(&[id])?;
    }
    let mirror = match &cfg.host.tap {
        Some(name) => Some(mirror_tap(name, &cfg.guest.mac)?),
        None => None,
    };
    let disk_bytes = match &cfg.host.disk {
        Some(p) => vec![std::fs::metadata(p)
            .map_err(|e| NodeError::Guest(format!("disk replica {}: {e}", p.display())))?
            .len()],
        None => Vec::new(),
    };
    let (links, events) = Links::start(
        &cfg.links,
        LinkOptions {
            psk: key,
            encrypt: cfg.security.encrypt,
            interval: cfg.heartbeat.interval(),
            timeout: cfg.heartbeat.timeout(),
            realtime: cfg.heartbeat.realtime,
        },
        LocalInfo {
            node: cfg.node.clone(),
            role: Role::Starting,
            generation: known.get(),
            standing: record.standing(),
            arbiter: arbiter_id.get(),
            guest: GuestShape {
                mem_mib: cfg.guest.mem_mib,
                disk_bytes,
                mode: cfg.replication.mode,
                cpu_template: cfg.guest.cpu_template,
            },
        },
    )?;
    let out = Outbox::start(&links);
    let status = Arc::new(Mutex::new(Status::default()));
    let token = control::load_or_create_token(&cfg.host.state_dir)?;
    let requests = control::serve(cfg.control.listen, status.clone(), token, &links.runtime())?;
    tracing::info!(node = %cfg.node, "CoServer starting; looking for a peer");
    let timeout = cfg.heartbeat.timeout();
    let session = SharedSession::new(Session::new(
        SessionConfig {
            node: cfg.node.clone(),
            arbiter: match &cfg.arbiter {
                ArbiterConfig::SharedStorage { .. } => ArbiterKind::Claims,
                ArbiterConfig::None { primary } => ArbiterKind::None {
                    starts: *primary == cfg.node,
                },
            },
            peer_timeout: timeout,
            ack_timeout: cfg.ack_timeout(),
            // Give a running primary time to be heard before claiming the guest.
            start_wait: timeout * 2 + Duration::from_millis(200),
            stall_limit: tick(&cfg) + timeout,
            // The peer loses this node after `timeout` without a frame from it; half
            // an interval less, so a freeze is noticed as the peer may act on it.
            silence_limit: timeout.saturating_sub(cfg.heartbeat.interval() / 2),
            lockstep: (cfg.replication.mode == ReplicationMode::Lockstep).then_some(
                LockstepLimits {
                    max_lag_exits: cfg.replication.max_lag_exits,
                    max_lag: Duration::from_millis(cfg.replication.max_lag_ms),
                },
            ),
        },
        known.get(),
        record.standing(),
        Instant::now(),
    ));
    let quick = QuickPath::new(session.clone(), out.clone());
    links.set_quick(quick.clone());
    let announcement = match (cfg.guest.ip, &cfg.host.tap) {
        (Some(ip), Some(_)) => {
            let mac = crate::attach::parse_mac(&cfg.guest.mac)
                .map_err(|e| NodeError::Guest(e.to_string()))?;
            Some(crate::replication::garp::frame(mac, ip))
        }
        _ => None,
    };
    let mut node = Node {
        quick,
        config_path: config_path.to_path_buf(),
        requests,
        answered: None,
        mirror,
        link_was_healthy: vec![false; cfg.links.len()],
        cfg,
        links,
        events,
        out,
        arbiter,
        known,
        record,
        arbiter_id,
        peer_arbiter_id: None,
        session,
        fenced_guest: None,
        started: Instant::now(),
        claim_answered: None,
        running: None,
        replica: None,
        follower: None,
        kept: None,
        announcement,
        alerts: Vec::new(),
        status,
        samples: status::Samples::default(),
    };
    node.event_loop()
}

impl Node {
    /// Runs the event loop; an error while this node may run the guest fences first
    /// (guest stopped, held output dropped), so no process ends holding the guest.
    fn event_loop(&mut self) -> Result<i32, NodeError> {
        let result = self.event_loop_inner();
        if let Err(e) = &result {
            if self.running.is_some() {
                tracing::error!("{e}: fencing before this CoServer stops");
                self.fence();
                self.wait_fenced_guest(self.cfg.heartbeat.timeout() * 2);
            }
        }
        result
    }

    /// Waits (at most `limit`) for the vCPU thread of a fenced guest to finish.
    fn wait_fenced_guest(&mut self, limit: Duration) {
        let start = Instant::now();
        while let Some(stats) = &self.fenced_guest {
            if stats.lock().map(|s| s.finished.is_some()).unwrap_or(true) || start.elapsed() > limit
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn event_loop_inner(&mut self) -> Result<i32, NodeError> {
        if self.cfg.heartbeat.realtime {
            if let Err(e) = crate::priority::raise_current_thread() {
                self.alert(format!(
                    "event loop: {e}; a busy host may delay failure detection (heartbeat.realtime)"
                ));
            }
        }
        let tick = tick(&self.cfg);
        let timeout = self.cfg.heartbeat.timeout();
        loop {
            // Wake at the tick, or exactly when the peer would be lost if nothing more
            // is heard, whichever comes first: loss is noticed at the timeout, not at
            // the next tick after it.
            let until_lost = self
                .links
                .last_heard()
                .and_then(|t| (t + timeout).checked_duration_since(Instant::now()));
            let ev = match until_lost.filter(|d| *d < tick) {
                // The event queue's timer counts whole milliseconds: the last stretch
                // before the deadline is slept precisely (events wait in the queue).
                Some(d) if d <= FINE_WAIT => {
                    std::thread::sleep(d);
                    Err(RecvError::Timeout)
                }
                Some(d) => self.events.recv_timeout(d - FINE_WAIT),
                None => self.events.recv_timeout(tick),
            };
            // This node's turn: the links' quick path waits for its end.
            let quick = self.quick.clone();
            let mut turn = quick.turn();
            let deferred = std::mem::take(&mut turn.deferred);
            self.execute(deferred)?;
            // The clock first: a stall is noticed before anything that queued up
            // meanwhile is believed.
            let now = Instant::now();
            self.input(Input::Tick {
                now,
                peer_alive: self.peer_alive(),
                silent: self.links.take_silence(now),
            })?;
            match ev {
                Ok(ev) => self.link_event(ev)?,
                Err(RecvError::Timeout) => {}
                Err(RecvError::Closed) => return Ok(125),
            }
            self.watch_guest()?;
            self.operator_requests()?;
            let alive = self.peer_alive();
            self.watch_links(alive);
            self.publish_status(alive);
            // What the quick path acts on until the next turn.
            turn.commit = self.running.as_ref().map(|r| r.commit.clone());
            turn.slices = self.follower.as_ref().and_then(Follower::inbox);
            let exit = self.session.lock().exit_code();
            // A guest that powered off here: its epoch loop sends the pair's end, so the
            // node waits for the loop to finish before letting the last messages leave.
            let loop_done = self
                .running
                .as_ref()
                .is_none_or(|r| r.stats.lock().map(|s| s.finished.is_some()).unwrap_or(true));
            if let (Some(code), true) = (exit, loop_done) {
                // The epoch loop ends a powered-off guest's pair: what the session
                // recorded then (the disk whole) is made durable here.
                let standing = self.session.lock().standing();
                if standing != self.record.standing() {
                    self.record(standing)?;
                }
                // Let the last messages (the pair's end) leave, then close the links.
                self.out.flush(self.cfg.heartbeat.timeout());
                self.links.drain(self.cfg.heartbeat.timeout());
                // An operator's answer just given (leave) reaches its client first.
                if let Some(left) = self
                    .answered
                    .and_then(|t| (t + ANSWER_GRACE).checked_duration_since(Instant::now()))
                {
                    std::thread::sleep(left);
                }
                self.links.shutdown();
                return Ok(code);
            }
        }
    }

    fn alert(&mut self, text: String) {
        tracing::warn!("{text}");
        let secs = self.started.elapsed().as_secs_f64();
        self.alerts.push(format!("[{secs:.3}s] {text}"));
        if self.alerts.len() > 100 {
            self.alerts.remove(0);
        }
    }

    /// Alerts, unless the last alert already says the same.
    fn alert_once(&mut self, text: String) {
        if !self.alerts.last().is_some_and(|a| a.ends_with(&text)) {
            self.alert(text);
        }
    }

    fn peer_alive(&self) -> bool {
        self.links
            .last_heard()
            .is_some_and(|t| t.elapsed() < self.cfg.heartbeat.timeout())
    }

    /// Feeds the session and carries out what it says.
    fn input(&mut self, input: Input) -> Result<(), NodeError> {
        let actions = self.session.on(input);
        self.execute(actions)
    }

    /// Hellos and heartbeats advertise the session's role, generation and replica.
    fn advertise(&self) {
        let s = self.session.lock();
        self.links
            .set_local(s.role(), s.generation(), s.advertised());
    }

    /// Claims the arbiter in a directory whose identity is the one this node and the
    /// peer used (learning it at the first claim).
    fn claim(&mut self) -> Result<crate::arbiter::Claim, String> {
        let generation = self.session.lock().generation();
        let ids = self.arbiter_ids()?;
        self.arbiter
            .claim(&self.cfg.node, generation, &ids)
            .map_err(|e| e.to_string())
    }

    /// Whether another node won a later generation (claims nothing).
    fn check_arbiter(&mut self) -> Result<crate::arbiter::Held, String> {
        let generation = self.session.lock().generation();
        let ids = self.arbiter_ids()?;
        self.arbiter
            .check_held(&self.cfg.node, generation, &ids)
            .map_err(|e| e.to_string())
    }

    /// The arbiter directory identities the pair's nodes used, the directory's own
    /// recorded here the first time it is seen.
    fn arbiter_ids(&mut self) -> Result<Vec<u64>, String> {
        let ids: Vec<u64> = self
            .arbiter_id
            .get()
            .into_iter()
            .chain(self.peer_arbiter_id)
            .collect();
        let id = self.arbiter.identify(&ids).map_err(|e| e.to_string())?;
        if let (None, Some(id)) = (self.arbiter_id.get(), id) {
            self.arbiter_id.set(id).map_err(|e| e.to_string())?;
            self.links.set_arbiter(Some(id));
        }
        Ok(ids)
    }

    /// Records what the replica holds; a whole one only after its disk is durable.
    fn record(&mut self, standing: Standing) -> Result<(), NodeError> {
        if let Standing::Whole { .. } = standing {
            if let Some(r) = &self.replica {
                r.sync()?;
            } else if let Some(disk) = &self.cfg.host.disk {
                // The guest's own disk (a primary whose guest powered off).
                std::fs::File::open(disk)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| NodeError::Guest(format!("disk {}: {e}", disk.display())))?;
            }
        }
        self.record.set(standing)?;
        Ok(())
    }

    fn execute(&mut self, actions: Vec<Action>) -> Result<(), NodeError> {
        for action in actions {
            match action {
                // The session's messages are all small (bulk data comes from the epoch
                // loop).
                Action::Send(m) => self.out.send_small(m),
                Action::Release(outputs) => {
                    if let Some(r) = &self.running {
                        r.commit.release(outputs);
                    }
                }
                Action::Claim => {
                    let generation = self.session.lock().generation();
                    let started = Instant::now();
                    let result = self.claim();
                    self.claim_answered = Some(Instant::now());
                    tracing::info!(
                        "arbiter claim for generation {} answered in {:.3} ms",
                        generation + 1,
                        started.elapsed().as_secs_f64() * 1000.0
                    );
                    self.input(Input::Claimed(result))?;
                }
                Action::CheckArbiter => {
                    let result = self.check_arbiter();
                    self.input(Input::ArbiterChecked(result))?;
                }
                Action::Generation(g) => self.known.raise(g)?,
                Action::Record(standing) => self.record(standing)?,
                Action::BootGuest => self.become_primary(GuestFrom::Boot)?,
                Action::Announce => self.announce(),
                Action::TakeOver => {
                    let from = match (self.follower.take(), self.replica.take()) {
                        (Some(f), _) => GuestFrom::Follower(f),
                        (None, Some(r)) => GuestFrom::Standby(Box::new(r.into_standby()?)),
                        (None, None) => {
                            return Err(NodeError::Guest("taking over without a replica".into()))
                        }
                    };
                    self.become_primary(from)?;
                }
                Action::Fence => self.fence(),
                Action::NewReplica => self.new_replica()?,
                Action::ResetReplica => {
                    let followed = self.follower.take().is_some();
                    match self.replica.as_mut() {
                        Some(r) if !followed => r.reset(),
                        // A lockstep guest ran on from its copy (or failed to start from
                        // it, its standby spent): a new standby.
                        _ => {
                            self.replica = Some(Replica::new(
                                self.cfg.guest.mem_mib,
                                self.cfg.host.disk.as_deref(),
                            )?)
                        }
                    }
                }
                Action::DropReplica => {
                    self.replica = None;
                    self.follower = None;
                }
                Action::Alert(text) => self.alert(text),
                Action::Exit(_) => {}
            }
        }
        self.advertise();
        Ok(())
    }

    fn link_event(&mut self, ev: Event) -> Result<(), NodeError> {
        match ev {
            Event::Hello {
                node,
                arbiter,
                peer,
            } => {
                if let (Some(mine), Some(theirs)) = (self.arbiter_id.get(), arbiter) {
                    if mine != theirs {
                        self.alert_once(format!(
                            "the peer {node} used arbiter directory {theirs:016x}, this node {mine:016x}: they are not one directory (check arbiter.path and the shared mount on both hosts); neither node claims until this is fixed"
                        ));
                    }
                }
                self.peer_arbiter_id = arbiter.or(self.peer_arbiter_id);
                self.peer_says(Some(node), peer)
            }
            Event::Heartbeat(peer) => self.peer_says(None, peer),
            Event::Refused { reason } => {
                self.alert_once(reason);
                Ok(())
            }
            Event::Message(msg) => self.message(msg),
        }
    }

    fn peer_says(&mut self, node: Option<String>, p: PeerInfo) -> Result<(), NodeError> {
        self.input(Input::PeerSays {
            node,
            session: p.session,
            role: p.role,
            generation: p.generation,
            standing: p.standing,
        })
    }

    /// A message from the peer: the replica's bulk data is checked by the session and
    /// applied here; the rest goes to the session.
    fn message(&mut self, msg: Message) -> Result<(), NodeError> {
        let secondary = self.session.lock().role() == Role::Secondary;
        match msg {
            Message::SyncPages { copy, index, pages } if secondary => {
                let check = self.session.lock().check_copy(copy, index);
                if self.copy_part(check, |r| r.copy_pages(&pages))? {
                    self.input(Input::CopyPartApplied { copy, index })?;
                }
                Ok(())
            }
            Message::SyncDisk { copy, index, write } if secondary => {
                let check = self.session.lock().check_copy(copy, index);
                if self.copy_part(check, |r| r.copy_disk(&write))? {
                    self.input(Input::CopyPartApplied { copy, index })?;
                }
                Ok(())
            }
            Message::Segment {
                position: epoch,
                segment: Segment::Checkpoint(cp),
            } if secondary => {
                let (full, copy, last_frame) = (cp.full, cp.copy, cp.last_frame);
                let check =
                    self.session
                        .lock()
                        .check_checkpoint(epoch, full, copy, cp.copy_messages);
                // Checked, then applied (durable where the guest flushed), and only
                // then acknowledged.
                if self.copy_part(check, |r| r.apply(epoch, cp))? {
                    if full {
                        tracing::info!(epoch, "full copy applied; ready to take over");
                        // What the tap heard up to the copy's last frame is in the
                        // copied state.
                        if let Some(m) = &self.mirror {
                            m.window().align(last_frame);
                        }
                        if self.cfg.replication.mode == ReplicationMode::Lockstep {
                            if let Err(e) = self.start_follower() {
                                return self.input(Input::ApplyFailed(e.to_string()));
                            }
                        }
                    }
                    self.input(Input::CheckpointApplied { epoch, full, copy })?;
                }
                Ok(())
            }
            Message::Segment {
                position,
                segment: Segment::Log(slice),
            } if secondary => {
                let check = self.session.lock().check_checkpoint(position, false, 0, 0);
                match check {
                    CopyCheck::Ignore => Ok(()),
                    CopyCheck::Resync(reason) => self.input(Input::ApplyFailed(reason.to_string())),
                    CopyCheck::Apply => {
                        let running = self
                            .follower
                            .as_ref()
                            .is_some_and(|f| f.status().diverged.is_none());
                        if !running {
                            // A guest that diverged is repaired (its divergence reported
                            // now, ahead of the event loop's own look at it).
                            if self.report_divergence()? {
                                return Ok(());
                            }
                            return self.input(Input::ApplyFailed(
                                "a slice of the log arrived but the replica's guest is not running"
                                    .into(),
                            ));
                        }
                        // Acknowledged on receipt, and before the follower thread is
                        // woken: on a busy host it would run first and delay the ack.
                        self.input(Input::CheckpointApplied {
                            epoch: position,
                            full: false,
                            copy: 0,
                        })?;
                        if self
                            .follower
                            .as_ref()
                            .is_some_and(|f| f.slice(position, slice))
                        {
                            Ok(())
                        } else {
                            self.input(Input::ApplyFailed(
                                "the replica's guest stopped before it took a slice".into(),
                            ))
                        }
                    }
                }
            }
            Message::Inbound {
                position: epoch,
                frame,
            } if secondary => {
                if let Some(m) = &self.mirror {
                    m.window().taken(&frame);
                }
                if let Some(r) = self.replica.as_mut() {
                    r.note_inbound(epoch, frame);
                }
                Ok(())
            }
            Message::Released { position: epoch } if secondary => {
                self.released(epoch);
                Ok(())
            }
            Message::Handover { position } if secondary => {
                // Everything up to the handover left the old primary (said again here
                // in case its `Released` was lost): the new primary emits none of it.
                self.released(position);
                self.input(Input::Message {
                    now: Instant::now(),
                    msg: Message::Handover { position },
                })
            }
            Message::Stopped { exit_code } => {
                tracing::info!(exit_code, "the guest powered off on the primary");
                // A lockstep replica is whole only once its guest has executed all the
                // log it acknowledged (through the power-off).
                self.settle_follower()?;
                self.input(Input::Message {
                    now: Instant::now(),
                    msg: Message::Stopped { exit_code },
                })
            }
            other => self.input(Input::Message {
                now: Instant::now(),
                msg: other,
            }),
        }
    }

    /// The primary released every output up to `position`.
    fn released(&mut self, position: u64) {
        if let Some(r) = self.replica.as_mut() {
            r.released(position);
        }
        if let Some(f) = &self.follower {
            f.released(position);
        }
    }

    /// Applies what the session accepted; a failure, or what it cannot follow, makes
    /// the replica start over. Returns whether it was applied.
    fn copy_part(
        &mut self,
        check: CopyCheck,
        apply: impl FnOnce(&mut Replica) -> Result<(), crate::replication::secondary::ReplicaError>,
    ) -> Result<bool, NodeError> {
        let failure = match check {
            CopyCheck::Ignore => return Ok(false),
            CopyCheck::Resync(reason) => reason.to_string(),
            CopyCheck::Apply => match self.replica.as_mut().map(apply) {
                Some(Ok(())) => return Ok(true),
                None => return Ok(false),
                Some(Err(e)) => e.to_string(),
            },
        };
        self.input(Input::ApplyFailed(failure))?;
        Ok(false)
    }

    /// Becomes a secondary: the replica (standby VM, disk, marker) and the held tap.
    fn new_replica(&mut self) -> Result<(), NodeError> {
        if let (None, Some(name)) = (&self.mirror, &self.cfg.host.tap) {
            // Released when this node fenced; taken again for the next takeover.
            match mirror_tap(name, &self.cfg.guest.mac) {
                Ok(m) => self.mirror = Some(m),
                Err(e) => self.alert(format!("{e}; trying again at takeover")),
            }
        }
        tracing::info!("peer is primary: joining as secondary");
        let mut replica = Replica::new(self.cfg.guest.mem_mib, self.cfg.host.disk.as_deref())?;
        if let Some(kept) = self.kept.take() {
            // The guest as it stopped here: the new primary sends what changed since.
            replica.copy_pages(&kept.pages)?;
        }
        self.replica = Some(replica);
        Ok(())
    }

    fn fence(&mut self) {
        if let Some(r) = self.running.take() {
            r.commit.discard();
            if let Some(kick) = r.stats.lock().ok().and_then(|s| s.kick.clone()) {
                kick.kick();
            }
            self.fenced_guest = Some(r.stats);
        }
        self.session.notify();
        self.replica = None;
        self.follower = None;
        self.mirror = None;
        self.kept = None;
    }

    /// Reports the end of a guest that ran here (fenced, failed, or powered off).
    fn watch_guest(&mut self) -> Result<(), NodeError> {
        self.report_divergence()?;
        if let Some(stats) = &self.fenced_guest {
            let done = stats.lock().map(|s| s.finished.is_some()).unwrap_or(true);
            if done {
                // A guest stopped for a switchover left its memory for the rejoin.
                self.kept = stats.lock().ok().and_then(|mut s| s.kept.take());
                self.fenced_guest = None;
                if self.kept.is_some() {
                    self.input(Input::GuestKept)?;
                }
                self.input(Input::GuestEnded(Ok(0)))?;
            }
        }
        let failed = self.running.as_ref().and_then(|r| {
            let s = r.stats.lock().ok()?;
            match &s.finished {
                Some(Err(e)) => Some(e.clone()),
                _ => None,
            }
        });
        if let Some(e) = failed {
            eprintln!("ftvm: error: {e}");
            self.running = None;
            self.input(Input::GuestEnded(Err(e)))?;
        }
        Ok(())
    }
}
