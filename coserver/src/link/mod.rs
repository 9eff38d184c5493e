//! Links: the redundant connections between two CoServers, run on a tokio runtime of
//! their own.
//!
//! Each configured link is one TCP connection (the end whose local address sorts lower
//! dials, the other accepts), re-established whenever it breaks. A connection is used
//! only after the handshake (`handshake`): both ends prove they hold the pre-shared
//! key, and every frame after it is sealed under keys of that connection and direction
//! (`frame`). Every protocol message gets a sequence number, is sent on every connected
//! link in chunks and is de-duplicated on receipt, so losing a link costs nothing. Each
//! link carries its own heartbeat (ping and pong), which measures its round trip and,
//! by silence, its loss; heartbeats and other small messages go ahead of bulk data at
//! every chunk boundary.
//!
//! What a stranger can make a CoServer hold: on each link at most [`MAX_PENDING`]
//! connections that have not completed the handshake (the oldest is closed when
//! another arrives), each with a 48-byte opening and one confirm frame of 22 bytes,
//! for at most the handshake time limit.

pub mod blocking;
mod conn;
pub mod frame;
pub mod handshake;
mod write;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::mpsc;

use crate::config::LinkConfig;
use crate::protocol::{EncodeError, GuestShape, Message, Role, Standing};

/// Messages queued per connection before the link counts as stalled and is reset.
const QUEUE_MESSAGES: usize = 512;
/// Small messages (heartbeats, answers) queued per connection.
const QUEUE_CONTROL: usize = 64;
/// Events queued for the CoServer; a full queue pushes back on the links' readers.
const QUEUE_EVENTS: usize = 256;
/// Connections per link that have not completed the handshake.
pub const MAX_PENDING: usize = 4;
/// How long a dialer waits for a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The kernel's send buffer per connection: small, so a heartbeat queued behind bulk
/// data waits for at most this much of it (about 4 ms at 1 Gbit/s).
const SEND_BUFFER: usize = 512 << 10;

/// Errors of the links.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A listen address cannot be bound.
    #[error("link {index}: cannot listen on {addr}: {source}")]
    Listen {
        /// Link index.
        index: usize,
        /// Address.
        addr: std::net::SocketAddr,
        /// Cause.
        source: std::io::Error,
    },
    /// The links' runtime cannot start.
    #[error("cannot start the link runtime: {0}")]
    Runtime(std::io::Error),
    /// A message that cannot be sent.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// No link of that index.
    #[error("there is no link {0}")]
    NoSuchLink(usize),
}

/// What the links deliver to the CoServer.
#[derive(Debug)]
pub enum Event {
    /// A protocol message from the peer (de-duplicated).
    Message(Message),
    /// The peer introduced itself on a link (its guest matches this node's).
    Hello {
        /// Peer's node name.
        node: String,
        /// The identity of the arbiter directory the peer has used, if any.
        arbiter: Option<u64>,
        /// What it says of itself.
        peer: PeerInfo,
    },
    /// The peer's heartbeat.
    Heartbeat(PeerInfo),
    /// A peer that holds the key was refused, or refused this node: why.
    Refused {
        /// The reason, naming what differs.
        reason: String,
    },
}

/// What the peer says of itself in every hello and heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer process's session (random per process, from its hello on this
    /// connection): a new one means the peer restarted.
    pub session: u64,
    /// Its role.
    pub role: Role,
    /// The highest arbiter generation it knows.
    pub generation: u64,
    /// What its disk replica holds.
    pub standing: Standing,
}

/// Counters and health of one link.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    /// "link0", "link1", ...
    pub name: String,
    /// Local address.
    pub local: String,
    /// Peer address.
    pub peer: String,
    /// Connected and heard from within the heartbeat timeout.
    pub healthy: bool,
    /// Whether link traffic is encrypted (always authenticated).
    #[serde(default)]
    pub encrypted: bool,
    /// Last measured round trip (ms).
    pub rtt_ms: Option<f64>,
    /// Frames received and accepted.
    pub frames_in: u64,
    /// Bytes received in accepted frames.
    #[serde(default)]
    pub bytes_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Bytes queued for sending.
    pub bytes_out: u64,
    /// Connections dropped for not speaking the protocol (bad opening, oversize or
    /// malformed frames, a stalled handshake).
    pub bad_frames: u64,
    /// Connections or frames that failed authentication: a wrong key, a forged,
    /// replayed or reflected frame, or one recorded on another connection.
    pub auth_failures: u64,
    /// Connections closed before their handshake completed because more than
    /// [`MAX_PENDING`] were waiting.
    #[serde(default)]
    pub evicted: u64,
    /// Connections established (handshake completed).
    pub connects: u64,
}

/// One message as queued on every link.
struct Outgoing {
    seq: u64,
    lz4: bool,
    payload: Vec<u8>,
}

/// The installed connection of a link.
struct ConnHandle {
    id: u64,
    control: mpsc::Sender<Vec<u8>>,
    bulk: mpsc::Sender<Arc<Outgoing>>,
    /// Bulk messages queued and not yet written.
    queued: Arc<AtomicUsize>,
    /// The socket's sending side, for direct sends.
    side: Arc<write::WriteSide>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

struct LinkState {
    status: LinkStatus,
    conn: Option<ConnHandle>,
    next_conn: u64,
    last_rx: Option<Instant>,
    /// The link's reader waits for room in the event queue: this node is slow, which
    /// says nothing about the peer.
    blocked: usize,
}

impl LinkState {
    fn heard(&self) -> Option<Instant> {
        if self.blocked > 0 {
            Some(Instant::now())
        } else {
            self.last_rx
        }
    }
}

/// Recently seen (session, sequence) pairs.
#[derive(Debug, Default)]
struct Dedup {
    session: u64,
    max: u64,
    seen: HashSet<u64>,
}

/// Sequence numbers remembered below the highest seen.
const DEDUP_WINDOW: u64 = 1 << 16;

impl Dedup {
    /// Whether (session, seq) is new; remembers it. Only authenticated connections
    /// deliver, so a new session is the peer's new process.
    fn fresh(&mut self, session: u64, seq: u64) -> bool {
        if session != self.session {
            *self = Dedup {
                session,
                ..Dedup::default()
            };
        }
        if seq.saturating_add(DEDUP_WINDOW) <= self.max || !self.seen.insert(seq) {
            return false;
        }
        if seq > self.max {
            self.max = seq;
            if self.seen.len() as u64 > 2 * DEDUP_WINDOW {
                let floor = self.max.saturating_sub(DEDUP_WINDOW);
                self.seen.retain(|&s| s > floor);
            }
        }
        true
    }
}

/// This node's view that links advertise in hellos and heartbeats.
#[derive(Debug, Clone)]
pub struct LocalInfo {
    /// Node name.
    pub node: String,
    /// Role.
    pub role: Role,
    /// Highest arbiter generation known.
    pub generation: u64,
    /// What this node's disk replica holds.
    pub standing: Standing,
    /// The identity of the arbiter directory this node has used, if any.
    pub arbiter: Option<u64>,
    /// The guest as this node's configuration describes it.
    pub guest: GuestShape,
}

/// How the links authenticate and time their heartbeats.
#[derive(Clone)]
pub struct LinkOptions {
    /// The pair's pre-shared key.
    pub psk: Vec<u8>,
    /// Encrypt link traffic (authentication is always on).
    pub encrypt: bool,
    /// Heartbeat interval.
    pub interval: Duration,
    /// Silence after which a link (or the peer) is lost.
    pub timeout: Duration,
    /// Run the links' threads at real-time priority (`crate::priority`).
    pub realtime: bool,
}

impl std::fmt::Debug for LinkOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkOptions")
            .field("encrypt", &self.encrypt)
            .field("interval", &self.interval)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

struct Inner {
    opts: LinkOptions,
    session: u64,
    next_seq: AtomicU64,
    /// Held while a sequenced message is numbered and queued, so each link carries
    /// sequence numbers in increasing order.
    send_order: Mutex<()>,
    local: Mutex<LocalInfo>,
    links: Vec<Mutex<LinkState>>,
    /// Each link's local address (fixed for the process).
    configs: Vec<LinkConfig>,
    /// Each link's peer address now (`ftvm ctl reload` may change it).
    peers: Vec<Mutex<std::net::SocketAddr>>,
    /// Whether each link's local address has an accept loop.
    listening: Vec<AtomicBool>,
    /// Dial loops started per link: only the latest dials.
    dialers: Vec<AtomicU64>,
    events: mpsc::Sender<Event>,
    /// Held from the de-duplication of a message until it is queued for the CoServer,
    /// so the links' readers (on different worker threads) deliver in the order they
    /// de-duplicated: a message never overtakes an earlier one decoded on another link.
    dedup: tokio::sync::Mutex<Dedup>,
    clock: Instant,
    stopped: AtomicBool,
    handle: Handle,
    /// Events queued for the CoServer and not yet finished with (see [`Events`]).
    unfinished: Arc<AtomicUsize>,
    /// When a frame was last written to the peer or the heartbeat task last ran, and
    /// the longest gap since the CoServer last asked ([`Links::take_silence`]).
    sent: Mutex<SendClock>,
    /// The CoServer's quick path, once it has one.
    quick: std::sync::OnceLock<Arc<dyn QuickHandler>>,
}

#[derive(Default)]
struct SendClock {
    last: Option<Instant>,
    longest: Duration,
}

impl Inner {
    /// Link `index`'s peer address now.
    fn peer(&self, index: usize) -> std::net::SocketAddr {
        *lock(&self.peers[index])
    }

    /// Whether this end dials link `index` (the end whose local address sorts first);
    /// the other listens.
    fn dials(&self, index: usize) -> bool {
        self.configs[index].local.to_string() < self.peer(index).to_string()
    }

    /// A frame left for the peer, or the heartbeat task ran.
    fn note_sent(&self) {
        let now = Instant::now();
        let mut c = lock(&self.sent);
        if let Some(last) = c.last {
            c.longest = c.longest.max(now.saturating_duration_since(last));
        }
        c.last = Some(now);
    }
}

/// Messages a link reader may hand to the CoServer directly, without its event queue:
/// an acknowledgement on the primary, a slice of the log on a lockstep secondary. The
/// reader offers a message only when every event queued before it is finished with, so
/// a message handled this way overtakes nothing.
pub trait QuickHandler: Send + Sync {
    /// Handles `msg` now if it can; gives it back (untouched) otherwise, and it is
    /// queued as usual.
    fn offer(&self, msg: Message) -> Option<Message>;
}

/// The set of links to the peer.
#[derive(Clone)]
pub struct Links {
    inner: Arc<Inner>,
    runtime: Arc<Mutex<Option<Runtime>>>,
}

/// The CoServer's end of the links' event queue.
///
/// An event counts as unfinished from when a reader queues it until the CoServer asks
/// for the next one (it has finished with this one by then).
pub struct Events {
    rx: mpsc::Receiver<Event>,
    handle: Handle,
    unfinished: Arc<AtomicUsize>,
    holds: bool,
}

/// Why no event was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvError {
    /// None arrived in time.
    Timeout,
    /// The links are shut down.
    Closed,
}

impl Events {
    /// The next event, waiting at most `limit`.
    pub fn recv_timeout(&mut self, limit: Duration) -> Result<Event, RecvError> {
        self.finished();
        let rx = &mut self.rx;
        let got = match self
            .handle
            .block_on(async { tokio::time::timeout(limit, rx.recv()).await })
        {
            Ok(Some(ev)) => Ok(ev),
            Ok(None) => Err(RecvError::Closed),
            Err(_) => Err(RecvError::Timeout),
        };
        self.holds = got.is_ok();
        got
    }

    /// The next event if one is queued.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.finished();
        let got = self.rx.try_recv().ok();
        self.holds = got.is_some();
        got
    }

    /// The event taken last is finished with.
    fn finished(&mut self) {
        if std::mem::take(&mut self.holds) {
            self.unfinished.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Starts what link `index` needs to reach its peer: a dial loop (which ends when the
/// peer's address says this end should listen) or an accept loop on its local address
/// (kept for the process).
fn connect_link(inner: &Arc<Inner>, index: usize) -> Result<(), LinkError> {
    if inner.dials(index) {
        inner.handle.spawn(conn::dial_loop(inner.clone(), index));
        return Ok(());
    }
    if inner.listening[index].swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let local = inner.configs[index].local;
    let err = |source| LinkError::Listen {
        index,
        addr: local,
        source,
    };
    let bound = std::net::TcpListener::bind(local).and_then(|l| {
        l.set_nonblocking(true)?;
        let _guard = inner.handle.enter();
        tokio::net::TcpListener::from_std(l)
    });
    match bound {
        Ok(listener) => {
            inner
                .handle
                .spawn(conn::accept_loop(inner.clone(), index, listener));
            Ok(())
        }
        Err(e) => {
            inner.listening[index].store(false, Ordering::SeqCst);
            Err(err(e))
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking holder cannot leave these plain counters inconsistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Links {
    /// Binds the listening ends, starts connecting, and returns the links and the
    /// receiver of their events.
    pub fn start(
        configs: &[LinkConfig],
        opts: LinkOptions,
        local: LocalInfo,
    ) -> Result<(Self, Events), LinkError> {
        let realtime = opts.realtime;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ftvm-link")
            .on_thread_start(move || {
                if realtime {
                    if let Err(e) = crate::priority::raise_current_thread() {
                        tracing::warn!("link thread: {e}; a busy host may delay heartbeats");
                    }
                }
            })
            .enable_all()
            .build()
            .map_err(LinkError::Runtime)?;
        let handle = runtime.handle().clone();
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
        let unfinished = Arc::new(AtomicUsize::new(0));
        let mut session = [0u8; 8];
        handshake::fill_random(&mut session);
        let encrypt = opts.encrypt;
        let inner = Arc::new(Inner {
            opts,
            session: u64::from_le_bytes(session),
            next_seq: AtomicU64::new(1),
            send_order: Mutex::new(()),
            local: Mutex::new(local),
            links: configs
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    Mutex::new(LinkState {
                        status: LinkStatus {
                            name: format!("link{i}"),
                            local: c.local.to_string(),
                            peer: c.peer.to_string(),
                            encrypted: encrypt,
                            ..LinkStatus::default()
                        },
                        conn: None,
                        next_conn: 0,
                        last_rx: None,
                        blocked: 0,
                    })
                })
                .collect(),
            configs: configs.to_vec(),
            peers: configs.iter().map(|c| Mutex::new(c.peer)).collect(),
            listening: configs.iter().map(|_| AtomicBool::new(false)).collect(),
            dialers: configs.iter().map(|_| AtomicU64::new(0)).collect(),
            events: tx,
            dedup: tokio::sync::Mutex::new(Dedup::default()),
            clock: Instant::now(),
            stopped: AtomicBool::new(false),
            handle: handle.clone(),
            unfinished: unfinished.clone(),
            quick: std::sync::OnceLock::new(),
            sent: Mutex::new(SendClock::default()),
        });
        for index in 0..configs.len() {
            connect_link(&inner, index)?;
        }
        handle.spawn(heartbeat_loop(inner.clone()));
        Ok((
            Self {
                inner,
                runtime: Arc::new(Mutex::new(Some(runtime))),
            },
            Events {
                rx,
                handle,
                unfinished,
                holds: false,
            },
        ))
    }

    /// Link `index` reaches the peer at `peer` from now on (a replacement host): a
    /// connection to the old address that is still up stays until it fails. Whether
    /// this end dials or listens follows the new address.
    pub fn set_peer(&self, index: usize, peer: std::net::SocketAddr) -> Result<(), LinkError> {
        let inner = &self.inner;
        if index >= inner.peers.len() {
            return Err(LinkError::NoSuchLink(index));
        }
        *lock(&inner.peers[index]) = peer;
        lock(&inner.links[index]).status.peer = peer.to_string();
        tracing::info!(link = index, %peer, "link peer address changed");
        connect_link(inner, index)
    }

    /// The runtime the links run on, for the CoServer's other I/O (the control API).
    pub fn runtime(&self) -> Handle {
        self.inner.handle.clone()
    }

    /// Updates what hellos and heartbeats advertise.
    pub fn set_local(&self, role: Role, generation: u64, standing: Standing) {
        let mut l = lock(&self.inner.local);
        l.role = role;
        l.generation = generation;
        l.standing = standing;
    }

    /// The longest this node's links went without writing a frame to the peer and
    /// without their heartbeat task running, since the last call, up to `now`: a
    /// frozen or starved process is silent (the peer may lose it); one whose event loop
    /// was merely busy is not, nor one writing a long chunk the peer is reading.
    pub fn take_silence(&self, now: Instant) -> Duration {
        let mut p = lock(&self.inner.sent);
        let since_last = p
            .last
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        std::mem::take(&mut p.longest).max(since_last)
    }

    /// Gives the links' readers the CoServer's quick path (once; a second is ignored).
    pub fn set_quick(&self, quick: Arc<dyn QuickHandler>) {
        let _ = self.inner.quick.set(quick);
    }

    /// Updates the arbiter identity hellos advertise.
    pub fn set_arbiter(&self, arbiter: Option<u64>) {
        lock(&self.inner.local).arbiter = arbiter;
    }

    /// Sends `msg` on every connected link. Returns on how many links it was queued;
    /// a message beyond the size limit is an error (nothing is sent).
    pub fn send(&self, msg: &Message) -> Result<usize, LinkError> {
        self.send_as(msg, false)
    }

    /// [`Links::send`], writing the message to each link's socket from the calling
    /// thread where nothing is queued before it on that link (see `write`): a small
    /// message saves the thread hop to the link's writer. Never waits for a socket.
    pub fn send_direct(&self, msg: &Message) -> Result<usize, LinkError> {
        self.send_as(msg, true)
    }

    fn send_as(&self, msg: &Message, direct: bool) -> Result<usize, LinkError> {
        let (lz4, payload) = frame::compress(msg.encode()?);
        let _order = lock(&self.inner.send_order);
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let out = Arc::new(Outgoing { seq, lz4, payload });
        Ok((0..self.inner.links.len())
            .filter(|&i| {
                (direct && send_direct(&self.inner, i, &out)) || queue_bulk(&self.inner, i, &out)
            })
            .count())
    }

    /// When the peer was last heard on any link.
    pub fn last_heard(&self) -> Option<Instant> {
        self.inner
            .links
            .iter()
            .filter_map(|l| lock(l).heard())
            .max()
    }

    /// Messages waiting in the least loaded connected link's queue (flow control for
    /// bulk copy: one link that keeps up is enough). `None` with no link connected.
    pub fn backlog(&self) -> Option<usize> {
        self.inner
            .links
            .iter()
            .filter_map(|l| {
                lock(l)
                    .conn
                    .as_ref()
                    .map(|c| c.queued.load(Ordering::Relaxed))
            })
            .min()
    }

    /// Waits until every connected link has written what was queued, at most `limit`.
    pub fn drain(&self, limit: Duration) {
        let end = Instant::now() + limit;
        let busy = || {
            self.inner.links.iter().any(|l| {
                lock(l)
                    .conn
                    .as_ref()
                    .is_some_and(|c| c.queued.load(Ordering::Relaxed) > 0)
            })
        };
        while busy() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Status of every link.
    pub fn status(&self) -> Vec<LinkStatus> {
        let now = Instant::now();
        self.inner
            .links
            .iter()
            .map(|l| {
                let l = lock(l);
                let mut s = l.status.clone();
                s.healthy = l.conn.is_some()
                    && l.heard().is_some_and(|t| now - t < self.inner.opts.timeout);
                s
            })
            .collect()
    }

    /// Closes every connection, stops reconnecting and ends the links' runtime.
    pub fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for l in &self.inner.links {
            lock(l).conn = None;
        }
        if let Some(rt) = lock(&self.runtime).take() {
            rt.shutdown_timeout(Duration::from_millis(200));
        }
    }
}

/// Messages on their way to the links from threads that must not spend time encoding
/// (the vCPU thread), through one sender thread; it knows how many are still on their
/// way, so a node that ends can let them all leave first.
#[derive(Clone)]
pub struct Outbox {
    tx: std::sync::mpsc::SyncSender<Message>,
    in_flight: Arc<AtomicUsize>,
    links: Links,
}

impl Outbox {
    /// Starts the sender thread for `links`.
    pub fn start(links: &Links) -> Self {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Message>(OUTBOX_MESSAGES);
        let in_flight = Arc::new(AtomicUsize::new(0));
        let (sender_links, count) = (links.clone(), in_flight.clone());
        std::thread::spawn(move || {
            let links = sender_links;
            for msg in rx {
                if let Err(e) = links.send(&msg) {
                    tracing::error!("not sent: {e}");
                }
                count.fetch_sub(1, Ordering::Release);
            }
        });
        Self {
            tx,
            in_flight,
            links: links.clone(),
        }
    }

    /// Sends a small message from this thread at once when nothing queued before it is
    /// still on its way (so it overtakes nothing), else queues it: an acknowledgement
    /// or a lockstep slice saves the hop through the sender thread.
    pub fn send_small(&self, msg: Message) {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return self.send(msg);
        }
        if let Err(e) = self.links.send_direct(&msg) {
            tracing::error!("not sent: {e}");
        }
    }

    /// [`Outbox::send_small`] when nothing is on its way before it; otherwise gives
    /// `msg` back rather than wait for room in the outbox (a thread of real-time
    /// priority must not wait for the sender thread).
    pub fn try_send_small(&self, msg: Message) -> Result<(), Box<Message>> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Err(Box::new(msg));
        }
        if let Err(e) = self.links.send_direct(&msg) {
            tracing::error!("not sent: {e}");
        }
        Ok(())
    }

    /// Queues `msg` for the links (waiting while the outbox is full).
    pub fn send(&self, msg: Message) {
        self.in_flight.fetch_add(1, Ordering::Acquire);
        if self.tx.send(msg).is_err() {
            self.in_flight.fetch_sub(1, Ordering::Release);
        }
    }

    /// Waits until every message queued so far has reached the links, at most `limit`.
    pub fn flush(&self, limit: Duration) {
        let end = Instant::now() + limit;
        while self.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Messages on their way to the sender thread at most; a full outbox makes the sender
/// (the vCPU thread at an epoch's end) wait: push-back, never an unbounded queue. The
/// sender thread itself never blocks (`Links::send` does not).
const OUTBOX_MESSAGES: usize = 256;

/// Writes a message to link `i` from this thread if nothing is queued before it there.
/// Returns whether it was taken.
fn send_direct(inner: &Inner, i: usize, out: &Outgoing) -> bool {
    let side = {
        let l = lock(&inner.links[i]);
        let Some(c) = &l.conn else { return false };
        c.side.clone()
    };
    if !side.try_direct(inner, out) {
        return false;
    }
    let mut l = lock(&inner.links[i]);
    l.status.frames_out += 1;
    l.status.bytes_out += out.payload.len() as u64;
    true
}

/// Queues a message on link `i`; a stalled link is reset. Returns whether it was queued.
fn queue_bulk(inner: &Inner, i: usize, out: &Arc<Outgoing>) -> bool {
    let mut l = lock(&inner.links[i]);
    let Some(c) = &l.conn else { return false };
    match c.bulk.try_send(out.clone()) {
        Ok(()) => {
            c.queued.fetch_add(1, Ordering::Relaxed);
            l.status.frames_out += 1;
            l.status.bytes_out += out.payload.len() as u64;
            true
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(link = i, "link stalled (send queue full); resetting it");
            l.conn = None;
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            l.conn = None;
            false
        }
    }
}

/// Queues a small unsequenced message on link `i` (dropped if its queue is full: a
/// heartbeat that cannot be queued would be late anyway).
fn queue_control(inner: &Inner, i: usize, msg: &Message) -> bool {
    let Ok(bytes) = msg.encode() else {
        return false;
    };
    let mut l = lock(&inner.links[i]);
    let Some(c) = &l.conn else { return false };
    let queued = c.control.try_send(bytes).is_ok();
    if queued {
        l.status.frames_out += 1;
    }
    queued
}

async fn heartbeat_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(inner.opts.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !inner.stopped.load(Ordering::SeqCst) {
        tick.tick().await;
        let (role, generation, standing) = {
            let l = lock(&inner.local);
            (l.role, l.generation, l.standing)
        };
        let ping = Message::Ping {
            sent_us: inner.clock.elapsed().as_micros() as u64,
            role,
            generation,
            standing,
        };
        for i in 0..inner.links.len() {
            queue_control(&inner, i, &ping);
        }
        // The process runs: its heartbeat goes out after the chunk being written, if
        // any (and with no link up, the peer is lost by the links, not by this node).
        inner.note_sent();
    }
}

/// Links between two pairs of ends on loopback, for the links' tests and benchmark.
#[doc(hidden)]
pub mod test_support;

#[cfg(test)]
mod tests;
