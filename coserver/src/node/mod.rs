//! One CoServer (`ftvm coserver --config FILE`): its role state machine and event loop.
//!
//! ```text
//! starting --(peer is primary)--> secondary --(full copy applied)--> secondary, ready
//! starting --(no primary heard; arbiter won)--> primary (degraded)
//! primary: degraded --(join)--> syncing --(full checkpoint sent)--> awaiting-full-ack
//!          --(ack)--> protected --(peer lost; arbiter won)--> degraded
//! primary  --(peer lost; arbiter lost or unusable)--> fenced
//! primary  --(peer heard with a higher generation)--> fenced
//! secondary, ready --(peer lost; arbiter won)--> primary (degraded), from the last
//!          applied checkpoint; --(arbiter lost)--> fenced
//! secondary --(primary heard with a higher generation)--> secondary, new copy
//! secondary, copying --(peer lost)--> starting (never boots: replica marked incomplete)
//! fenced --(guest stopped; a primary heard)--> secondary
//! ```

use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ftvm_devices::backend::tap::Tap;

mod guest_start;
mod status;

use crate::arbiter::{Arbiter, Claim, KnownGeneration};
use crate::config::{ArbiterConfig, Config};
use crate::control::{self, Status};
use crate::link::{Event, Events, LinkOptions, Links, LocalInfo, RecvError};
use crate::protocol::{GuestShape, Message, Role};
use crate::replication::commit::Commit;
use crate::replication::primary::{AckOutcome, Mode, Shared};
use crate::replication::secondary::{IncompleteMarker, Replica, Staged};

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
}

struct Running {
    shared: Arc<Shared>,
    commit: Commit,
}

struct Node {
    cfg: Config,
    links: Links,
    events: Events,
    out: Sender<Message>,
    arbiter: Arbiter,
    known: KnownGeneration,
    marker: IncompleteMarker,
    /// The guest this node stopped when it fenced, until its vCPU thread is done.
    fenced_guest: Option<Arc<Shared>>,
    role: Role,
    started: Instant,
    peer_name: Option<String>,
    peer_role: Option<Role>,
    running: Option<Running>,
    /// The guest's tap, held open (never written) while the guest runs elsewhere: the
    /// tap is checked at startup, and its bridge port already forwards when this node
    /// takes over (a port that has just gained carrier can drop the first frames).
    held_tap: Option<Tap>,
    replica: Option<Replica>,
    alerts: Vec<String>,
    link_was_healthy: Vec<bool>,
    status: Arc<Mutex<Status>>,
    bytes_sample: (Instant, u64, u64),
    exit_code: Option<i32>,
    /// When this secondary last asked for a copy and has not seen it begin.
    join_sent: Option<Instant>,
}

/// Runs a CoServer until its guest powers off; returns the process exit code.
pub fn run(config_path: &Path) -> Result<i32, NodeError> {
    let cfg = Config::load(config_path)?;
    let key = cfg.psk()?;
    let known = KnownGeneration::load(&cfg.host.state_dir)?;
    let arbiter = match &cfg.arbiter {
        ArbiterConfig::SharedStorage { path } => Arbiter::SharedStorage { dir: path.clone() },
        ArbiterConfig::None { .. } => Arbiter::None,
    };
    arbiter.check()?;
    let held_tap = match &cfg.host.tap {
        Some(name) => Some(Tap::open(name).map_err(|e| NodeError::Guest(e.to_string()))?),
        None => None,
    };
    let disk_bytes = match &cfg.host.disk {
        Some(p) => vec![std::fs::metadata(p)
            .map_err(|e| NodeError::Guest(format!("disk replica {}: {e}", p.display())))?
            .len()],
        None => Vec::new(),
    };
    let status = Arc::new(Mutex::new(Status::default()));
    control::serve(cfg.control.listen, status.clone())?;
    let (links, events) = Links::start(
        &cfg.links,
        LinkOptions {
            psk: key,
            encrypt: cfg.security.encrypt,
            interval: cfg.heartbeat.interval(),
            timeout: cfg.heartbeat.timeout(),
        },
        LocalInfo {
            node: cfg.node.clone(),
            role: Role::Starting,
            generation: known.get(),
            guest: GuestShape {
                mem_mib: cfg.guest.mem_mib,
                disk_bytes,
                mode: cfg.replication.mode,
            },
        },
    )?;
    let (out, out_rx) = mpsc::channel::<Message>();
    let sender = links.clone();
    std::thread::spawn(move || {
        for msg in out_rx {
            if let Err(e) = sender.send(&msg) {
                tracing::error!("not sent: {e}");
            }
        }
    });
    tracing::info!(node = %cfg.node, "CoServer starting; looking for a peer");
    let marker = IncompleteMarker::new(&cfg.host.state_dir);
    let mut node = Node {
        held_tap,
        link_was_healthy: vec![false; cfg.links.len()],
        cfg,
        links,
        events,
        out,
        arbiter,
        known,
        marker,
        fenced_guest: None,
        role: Role::Starting,
        started: Instant::now(),
        peer_name: None,
        peer_role: None,
        running: None,
        replica: None,
        alerts: Vec::new(),
        status,
        bytes_sample: (Instant::now(), 0, 0),
        exit_code: None,
        join_sent: None,
    };
    node.event_loop()
}

impl Node {
    fn event_loop(&mut self) -> Result<i32, NodeError> {
        let tick = self.cfg.heartbeat.interval().min(Duration::from_millis(20));
        let mut last_turn = Instant::now();
        loop {
            let ev = self.events.recv_timeout(tick);
            let gap = last_turn.elapsed();
            last_turn = Instant::now();
            if gap > tick + self.cfg.heartbeat.timeout() {
                // Before anything that queued up meanwhile (an acknowledgement sent
                // before the peer took over must not release output now).
                self.after_stall(gap)?;
            }
            match ev {
                Ok(ev) => self.handle(ev)?,
                Err(RecvError::Timeout) => {}
                Err(RecvError::Closed) => return Ok(125),
            }
            self.tick()?;
            if let Some(code) = self.exit_code {
                // Let the last messages (the pair's end) leave, then close the links.
                self.links.drain(self.cfg.heartbeat.timeout());
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

    fn peer_alive(&self) -> bool {
        self.links
            .last_heard()
            .is_some_and(|t| t.elapsed() < self.cfg.heartbeat.timeout())
    }

    /// The peer knows generation `g`. A higher one than this node's means the peer won
    /// the arbiter while this node was not heard (paused, partitioned): a primary's
    /// guest is no longer the guest and it fences; a secondary's replica has missed
    /// the epochs the primary ran degraded, and it asks for a new copy.
    fn learn_generation(&mut self, g: u64) -> Result<(), NodeError> {
        if g <= self.known.get() {
            return Ok(());
        }
        self.known.raise(g)?;
        self.links.set_local(self.role, g);
        match self.role {
            Role::Primary => self.fence(format!(
                "the peer won the arbiter (generation {g}) while this node was not heard: fencing"
            )),
            Role::Secondary => {
                if let Some(replica) = self.replica.as_mut() {
                    replica.reset()?;
                }
                self.alert(format!(
                    "the primary won the arbiter (generation {g}) while this node was not heard: asking for a new copy"
                ));
                self.send_join();
            }
            Role::Starting | Role::Fenced => {}
        }
        Ok(())
    }

    /// Claims the arbiter; an arbiter that cannot be used is reported, never won.
    fn claim(&mut self) -> Result<Claim, String> {
        self.arbiter
            .claim(&self.cfg.node, self.known.get())
            .map_err(|e| e.to_string())
    }

    /// Alerts, unless the last alert already says the same.
    fn alert_once(&mut self, text: String) {
        if !self.alerts.last().is_some_and(|a| a.ends_with(&text)) {
            self.alert(text);
        }
    }

    /// Becomes a secondary of the primary heard on the links.
    fn join_primary(&mut self) -> Result<(), NodeError> {
        if let (None, Some(name)) = (&self.held_tap, &self.cfg.host.tap) {
            // Released when this node fenced; taken again for the next takeover.
            match Tap::open(name) {
                Ok(t) => self.held_tap = Some(t),
                Err(e) => self.alert(format!("{e}; trying again at takeover")),
            }
        }
        self.replica = Some(Replica::new(
            self.cfg.guest.mem_mib,
            self.cfg.host.disk.as_deref(),
            self.marker.clone(),
        )?);
        self.set_role(Role::Secondary);
        self.send_join();
        Ok(())
    }

    /// Asks the primary for a full copy (again after the acknowledgement timeout if the
    /// copy does not begin: the Join may have been lost with a connection).
    fn send_join(&mut self) {
        let _ = self.out.send(Message::Join);
        self.join_sent = Some(Instant::now());
    }

    /// A secondary needs a (new) full copy: outputs are no longer held for it. Mode and
    /// output holding change together under the state's lock.
    fn restart_copy(&mut self) {
        if let Some(r) = &self.running {
            let mut s = r.shared.lock();
            s.degrade();
            s.join_requested = true;
            r.commit.set_holding(false);
        }
    }

    fn set_role(&mut self, role: Role) {
        self.role = role;
        self.links.set_local(role, self.known.get());
    }

    fn handle(&mut self, ev: Event) -> Result<(), NodeError> {
        match ev {
            Event::Hello {
                node,
                role,
                generation,
            } => {
                self.peer_name = Some(node);
                self.peer_role = Some(role);
                self.learn_generation(generation)?;
            }
            Event::Refused { reason } => self.alert_once(reason),
            Event::Heartbeat { role, generation } => {
                self.peer_role = Some(role);
                self.learn_generation(generation)?;
            }
            Event::Message(msg) => self.message(msg)?,
        }
        Ok(())
    }

    fn message(&mut self, msg: Message) -> Result<(), NodeError> {
        match (self.role, msg) {
            // A joining secondary holds nothing: (re)start the copy whatever the mode.
            (Role::Primary, Message::Join) => self.restart_copy(),
            (Role::Primary, Message::Resync { reason }) => {
                self.alert(format!("secondary asks for a new copy: {reason}"));
                self.restart_copy();
            }
            (Role::Primary, Message::Ack { epoch, copy }) => {
                if let Some(r) = &self.running {
                    let outcome = r.shared.lock().ack(epoch, copy);
                    match outcome {
                        AckOutcome::Accepted { protected } => {
                            r.commit.acked(epoch);
                            r.shared.notify();
                            let _ = self.out.send(Message::Released { epoch });
                            if protected {
                                self.alert(
                                    "secondary holds a full copy: the pair is protected".into(),
                                );
                            }
                        }
                        AckOutcome::Rejected => {
                            tracing::warn!(
                                epoch,
                                copy,
                                "acknowledgement of no checkpoint sent rejected"
                            );
                        }
                    }
                }
            }
            (Role::Secondary, msg) => self.secondary_message(msg)?,
            (_, other) => {
                tracing::debug!(
                    kind = other.kind(),
                    role = self.role.name(),
                    "message ignored"
                );
            }
        }
        Ok(())
    }

    fn secondary_message(&mut self, msg: Message) -> Result<(), NodeError> {
        let Some(replica) = self.replica.as_mut() else {
            return Ok(());
        };
        let result = match msg {
            Message::CopyStart { copy } => {
                self.join_sent = None;
                replica.start_copy(copy)
            }
            Message::SyncPages { copy, index, pages } => replica.copy_pages(copy, index, &pages),
            Message::SyncDisk { copy, index, write } => replica.copy_disk(copy, index, &write),
            Message::Checkpoint {
                epoch,
                full,
                copy,
                state,
                pages,
                disk_writes,
                flush,
                copy_messages,
                outputs,
            } => {
                let staged = Staged {
                    epoch,
                    full,
                    copy,
                    state,
                    pages,
                    disk_writes,
                    flush,
                    copy_messages,
                    outputs,
                };
                // Staged whole and checked: acknowledge, then apply.
                match replica.check(&staged) {
                    Ok(false) => {
                        tracing::debug!(epoch, full, "stale checkpoint ignored");
                        Ok(())
                    }
                    Ok(true) => {
                        let copy = if full { copy } else { replica.copy_id() };
                        let _ = self.out.send(Message::Ack { epoch, copy });
                        let was_ready = replica.ready();
                        let r = replica.apply(staged);
                        if r.is_ok() && full && !was_ready {
                            tracing::info!(epoch, "full copy applied; ready to take over");
                        }
                        r
                    }
                    Err(e) => Err(e),
                }
            }
            Message::Inbound { epoch, frame } => {
                replica.note_inbound(epoch, frame);
                return Ok(());
            }
            Message::Released { epoch } => {
                replica.released(epoch);
                return Ok(());
            }
            Message::Stopped { exit_code } => {
                tracing::info!(exit_code, "the guest powered off on the primary");
                self.exit_code = Some(exit_code as i32);
                return Ok(());
            }
            other => {
                tracing::debug!(kind = other.kind(), "message ignored by the secondary");
                return Ok(());
            }
        };
        if let Err(e) = result {
            replica.reset()?;
            self.alert(format!(
                "replica cannot follow ({e}); asking for a new copy"
            ));
            let _ = self.out.send(Message::Resync {
                reason: e.to_string(),
            });
            self.join_sent = Some(Instant::now());
        }
        Ok(())
    }

    fn tick(&mut self) -> Result<(), NodeError> {
        let alive = self.peer_alive();
        match self.role {
            Role::Starting => self.tick_starting(alive)?,
            Role::Primary => self.tick_primary(alive)?,
            Role::Secondary => self.tick_secondary(alive)?,
            Role::Fenced => self.tick_fenced(alive)?,
        }
        self.watch_links(alive);
        self.publish_status(alive);
        Ok(())
    }

    fn tick_starting(&mut self, alive: bool) -> Result<(), NodeError> {
        if alive && self.peer_role == Some(Role::Primary) {
            tracing::info!("peer is primary: joining as secondary");
            return self.join_primary();
        }
        // Give a running primary time to be heard before claiming the guest.
        let wait = self.cfg.heartbeat.timeout() * 2 + Duration::from_millis(200);
        if self.started.elapsed() < wait {
            return Ok(());
        }
        if self.marker.is_set() {
            // A half-copied disk is never booted: only a primary can make it whole.
            let text = format!(
                "this host holds an incomplete copy of the guest ({}); waiting for a primary to copy from",
                self.marker.path().display()
            );
            self.alert_once(text);
            return Ok(());
        }
        if let ArbiterConfig::None { primary } = &self.cfg.arbiter {
            if *primary == self.cfg.node && !(alive && self.peer_role == Some(Role::Primary)) {
                return self.become_primary(None);
            }
            return Ok(());
        }
        let claim = match self.claim() {
            Ok(c) => c,
            Err(e) => {
                self.alert_once(format!(
                    "no primary heard, and the arbiter cannot be used: {e}"
                ));
                self.started = Instant::now();
                return Ok(());
            }
        };
        match claim {
            Claim::Won { generation } => {
                self.known.raise(generation)?;
                self.alert(format!(
                    "no primary heard: won the arbiter (generation {generation}); starting the guest"
                ));
                self.become_primary(None)
            }
            Claim::Lost { generation, holder } => {
                // Not learned from the arbiter itself: only a peer that is heard can
                // vouch for a generation, or a stale node could win the next one.
                tracing::info!(
                    holder,
                    generation,
                    "the arbiter is held elsewhere; waiting for the primary"
                );
                self.started = Instant::now();
                Ok(())
            }
            Claim::Refused => Ok(()),
        }
    }

    /// This process did not run for `gap`, longer than the peer timeout (it was paused,
    /// or starved): the peer may have taken over meanwhile. A primary whose outputs wait
    /// for a secondary treats it as losing the peer and asks the arbiter, so it either
    /// fences or stays primary with the secondary re-copied, never both running.
    fn after_stall(&mut self, gap: Duration) -> Result<(), NodeError> {
        let mode = self.running.as_ref().map(|r| r.shared.lock().mode);
        if self.role != Role::Primary || matches!(mode, None | Some(Mode::Degraded)) {
            return Ok(());
        }
        self.alert(format!(
            "this node did not run for {} ms, longer than the peer timeout: asking the arbiter",
            gap.as_millis()
        ));
        self.primary_lost_peer()
    }

    fn tick_primary(&mut self, alive: bool) -> Result<(), NodeError> {
        let Some(r) = &self.running else {
            return Ok(());
        };
        let (mode, finished) = {
            let s = r.shared.lock();
            (s.mode, s.finished.clone())
        };
        if let Some(result) = finished {
            self.exit_code = Some(match result {
                Ok(code) => code as i32,
                Err(e) => {
                    eprintln!("ftvm: error: {e}");
                    125
                }
            });
            return Ok(());
        }
        if mode == Mode::Degraded {
            return Ok(());
        }
        let late = r.shared.lock().oldest_unacked();
        if let Some((epoch, waited)) = late.filter(|(_, w)| *w > self.cfg.ack_timeout()) {
            // Heard, but not acknowledging (its apply path is stuck, or the checkpoint
            // was lost with every connection): handled like a lost secondary, so the
            // guest never waits for good.
            self.alert(format!(
                "secondary has not acknowledged checkpoint {epoch} for {} ms: asking the arbiter",
                waited.as_millis()
            ));
            return self.primary_lost_peer();
        }
        if alive {
            return Ok(());
        }
        // The secondary is silent on every link (also during a copy: it may be alive
        // behind a partition, and must not be the one to run the guest).
        self.primary_lost_peer()
    }

    /// The primary lost its secondary: the arbiter decides between degraded and fenced.
    fn primary_lost_peer(&mut self) -> Result<(), NodeError> {
        let claim = match self.claim() {
            Ok(c) => c,
            Err(e) => {
                self.fence(format!(
                    "secondary lost and the arbiter cannot be used ({e}): fencing"
                ));
                return Ok(());
            }
        };
        match claim {
            Claim::Won { generation } => {
                self.known.raise(generation)?;
                self.links.set_local(self.role, generation);
                self.degrade(format!(
                    "secondary lost; won the arbiter (generation {generation}); running degraded"
                ));
            }
            Claim::Refused => {
                self.degrade("secondary lost; running degraded (arbiter none)".into());
            }
            Claim::Lost { generation, holder } => {
                self.fence(format!(
                    "secondary lost and {holder} won the arbiter (generation {generation}): fencing"
                ));
            }
        }
        Ok(())
    }

    fn degrade(&mut self, why: String) {
        if let Some(r) = &self.running {
            let mut s = r.shared.lock();
            s.degrade();
            r.commit.set_recording(false);
            r.commit.set_holding(false);
            drop(s);
            r.shared.notify();
        }
        self.alert(why);
    }

    fn fence(&mut self, why: String) {
        if let Some(r) = self.running.take() {
            r.commit.discard();
            r.shared.lock().stop = true;
            r.shared.notify();
            self.fenced_guest = Some(r.shared);
        }
        self.replica = None;
        self.held_tap = None;
        self.set_role(Role::Fenced);
        self.alert(why);
    }

    fn tick_secondary(&mut self, alive: bool) -> Result<(), NodeError> {
        if alive {
            if self
                .join_sent
                .is_some_and(|t| t.elapsed() > self.cfg.ack_timeout())
            {
                tracing::info!("the copy has not begun: asking the primary again");
                self.send_join();
            }
            return Ok(());
        }
        let ready = self.replica.as_ref().is_some_and(Replica::ready);
        if !ready {
            self.alert(
                "primary lost before the copy completed; this host's replica stays marked incomplete; waiting for a primary"
                    .into(),
            );
            self.replica = None;
            self.set_role(Role::Starting);
            self.started = Instant::now();
            return Ok(());
        }
        let claim = match self.claim() {
            Ok(c) => c,
            Err(e) => {
                // Nothing runs here: try again at the next tick.
                self.alert_once(format!("primary lost; the arbiter cannot be used: {e}"));
                return Ok(());
            }
        };
        match claim {
            Claim::Won { generation } => {
                self.known.raise(generation)?;
                let epoch = self.replica.as_ref().and_then(Replica::last_epoch);
                self.alert(format!(
                    "primary lost; won the arbiter (generation {generation}); taking over from checkpoint {}",
                    epoch.unwrap_or(0)
                ));
                let takeover = self.replica.take().map(Replica::into_standby).transpose()?;
                self.become_primary(takeover)
            }
            Claim::Lost { generation, holder } => {
                self.fence(format!(
                    "primary lost and {holder} holds the arbiter (generation {generation}): fencing"
                ));
                Ok(())
            }
            Claim::Refused => {
                self.alert_once("primary lost; not taking over (arbiter none)".into());
                Ok(())
            }
        }
    }

    /// A fenced node whose guest has stopped joins a primary it hears (after a partition
    /// heals, or after it was paused): the pair protects itself again.
    fn tick_fenced(&mut self, alive: bool) -> Result<(), NodeError> {
        let stopped = self
            .fenced_guest
            .as_ref()
            .is_none_or(|g| g.lock().finished.is_some());
        if alive && stopped && self.peer_role == Some(Role::Primary) {
            self.fenced_guest = None;
            self.alert("a primary is heard again: rejoining it as secondary".into());
            return self.join_primary();
        }
        Ok(())
    }
}
