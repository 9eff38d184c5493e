//! Links: the redundant connections between two CoServers.
//!
//! Each configured link is one TCP connection (the end whose local address sorts lower
//! dials, the other accepts), re-established whenever it breaks. Every protocol message
//! gets a sequence number, is sent on every connected link and is de-duplicated on
//! receipt, so losing a link costs nothing. Each link carries its own heartbeat (ping and
//! pong), which measures its round trip and, by silence, its loss. Frames that fail the
//! CRC, the MAC or decoding are dropped and counted; a stream that loses its framing, or a
//! peer that fails authentication, is disconnected and counted.

pub mod frame;

use std::collections::HashSet;
use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand_core::RngCore;

use crate::config::LinkConfig;
use crate::protocol::{Message, Role, PROTOCOL_VERSION};
use frame::{Codec, FrameError};

/// Frames queued per link before the link counts as stalled and is reset.
const QUEUE_FRAMES: usize = 512;
/// How long a dialer waits for a connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Errors of setting links up.
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
}

/// What the links deliver to the CoServer.
#[derive(Debug)]
pub enum Event {
    /// A protocol message from the peer (de-duplicated).
    Message(Message),
    /// The peer introduced itself on a link.
    Hello {
        /// Peer's node name.
        node: String,
        /// Peer's role.
        role: Role,
        /// Peer's arbiter generation.
        generation: u64,
        /// Peer's guest memory.
        mem_mib: u64,
        /// Peer's disk size.
        disk_bytes: Option<u64>,
    },
    /// The peer's heartbeat (role and generation as it sees them).
    Heartbeat {
        /// Peer's role.
        role: Role,
        /// Peer's generation.
        generation: u64,
    },
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
    /// Last measured round trip (ms).
    pub rtt_ms: Option<f64>,
    /// Frames received and accepted.
    pub frames_in: u64,
    /// Frames queued for sending.
    pub frames_out: u64,
    /// Bytes queued for sending.
    pub bytes_out: u64,
    /// Frames dropped: corrupt, undecodable or unexpected.
    pub bad_frames: u64,
    /// Frames or peers that failed authentication.
    pub auth_failures: u64,
    /// Authentic frames seen before on this link (a replay): dropped.
    #[serde(default)]
    pub replayed: u64,
    /// Connections established.
    pub connects: u64,
}

struct LinkState {
    status: LinkStatus,
    /// The writer queue of the current connection.
    writer: Option<SyncSender<Arc<Vec<u8>>>>,
    /// The current connection (to shut it down).
    stream: Option<TcpStream>,
    /// Connection generation, so that a stale connection's end does not tear down a
    /// newer one.
    conn_id: u64,
    last_rx: Option<Instant>,
    /// Order of the peer's frames on this link, to drop replays.
    order: RxOrder,
    /// Frames queued on the current connection and not yet written.
    queued: Arc<AtomicUsize>,
}

/// The last sequence number and heartbeat clock the peer's session used on one link.
/// The peer sends both in increasing order on each link, so an authentic frame that
/// does not advance them is a replay (a copy of the same message on another link is
/// not: that is what [`Dedup`] handles).
#[derive(Debug, Default)]
struct RxOrder {
    session: u64,
    seq: u64,
    ping_us: u64,
}

impl RxOrder {
    /// Whether a frame of `session` with sequence `seq` (0: unsequenced) and, for a
    /// heartbeat, clock `ping_us` moves this link forward; remembers it.
    fn advance(&mut self, session: u64, seq: u64, ping_us: Option<u64>) -> bool {
        if session != self.session {
            *self = RxOrder {
                session,
                ..RxOrder::default()
            };
        }
        if seq > 0 {
            if seq <= self.seq {
                return false;
            }
            self.seq = seq;
        }
        if let Some(us) = ping_us {
            if us <= self.ping_us && self.ping_us > 0 {
                return false;
            }
            self.ping_us = us;
        }
        true
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
    /// Whether (session, seq) is new; remembers it.
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
    /// Guest memory.
    pub mem_mib: u64,
    /// Disk size.
    pub disk_bytes: Option<u64>,
}

struct Inner {
    codec: Codec,
    session: u64,
    next_seq: AtomicU64,
    /// Held while a sequenced frame is numbered and queued, so each link carries
    /// sequence numbers in increasing order.
    send_order: Mutex<()>,
    local: Mutex<LocalInfo>,
    links: Vec<Mutex<LinkState>>,
    configs: Vec<LinkConfig>,
    events: Mutex<Sender<Event>>,
    dedup: Mutex<Dedup>,
    interval: Duration,
    timeout: Duration,
    clock: Instant,
    stopped: AtomicBool,
}

/// The set of links to the peer.
#[derive(Clone)]
pub struct Links {
    inner: Arc<Inner>,
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
        key: &[u8],
        local: LocalInfo,
        interval: Duration,
        timeout: Duration,
    ) -> Result<(Self, Receiver<Event>), LinkError> {
        let (tx, rx) = mpsc::channel();
        let mut session = [0u8; 8];
        // A failed entropy read only weakens session uniqueness; fall back to the clock.
        if rand_core::OsRng.try_fill_bytes(&mut session).is_err() {
            session = (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1))
            .to_le_bytes();
        }
        let inner = Arc::new(Inner {
            codec: Codec::new(key),
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
                            ..LinkStatus::default()
                        },
                        writer: None,
                        stream: None,
                        conn_id: 0,
                        last_rx: None,
                        order: RxOrder::default(),
                        queued: Arc::new(AtomicUsize::new(0)),
                    })
                })
                .collect(),
            configs: configs.to_vec(),
            events: Mutex::new(tx),
            dedup: Mutex::new(Dedup::default()),
            interval,
            timeout,
            clock: Instant::now(),
            stopped: AtomicBool::new(false),
        });
        for (index, c) in configs.iter().enumerate() {
            let dials = c.local.to_string() < c.peer.to_string();
            let inner = inner.clone();
            if dials {
                std::thread::spawn(move || dial_loop(inner, index));
            } else {
                let listener = TcpListener::bind(c.local).map_err(|source| LinkError::Listen {
                    index,
                    addr: c.local,
                    source,
                })?;
                std::thread::spawn(move || accept_loop(inner, index, listener));
            }
        }
        let hb = inner.clone();
        std::thread::spawn(move || heartbeat_loop(hb));
        Ok((Self { inner }, rx))
    }

    /// Updates what hellos and heartbeats advertise.
    pub fn set_local(&self, role: Role, generation: u64) {
        let mut l = lock(&self.inner.local);
        l.role = role;
        l.generation = generation;
    }

    /// Sends `msg` on every connected link. Returns on how many links it was queued.
    pub fn send(&self, msg: &Message) -> usize {
        let payload = msg.encode();
        let _order = lock(&self.inner.send_order);
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let frame = Arc::new(self.inner.codec.encode(self.inner.session, seq, &payload));
        (0..self.inner.links.len())
            .filter(|&i| queue(&self.inner, i, frame.clone()))
            .count()
    }

    /// When the peer was last heard on any link.
    pub fn last_heard(&self) -> Option<Instant> {
        self.inner
            .links
            .iter()
            .filter_map(|l| lock(l).last_rx)
            .max()
    }

    /// Frames waiting in the least loaded connected link's queue (flow control for
    /// bulk copy: one link that keeps up is enough). `None` with no link connected.
    pub fn backlog(&self) -> Option<usize> {
        self.inner
            .links
            .iter()
            .filter_map(|l| {
                let l = lock(l);
                l.writer.as_ref().map(|_| l.queued.load(Ordering::Relaxed))
            })
            .min()
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
                s.healthy =
                    l.writer.is_some() && l.last_rx.is_some_and(|t| now - t < self.inner.timeout);
                s
            })
            .collect()
    }

    /// Closes every connection and stops reconnecting.
    pub fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        for l in &self.inner.links {
            let mut l = lock(l);
            if let Some(s) = l.stream.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            l.writer = None;
        }
    }
}

/// Queues a frame on link `i`; a stalled link is reset. Returns whether it was queued.
fn queue(inner: &Inner, i: usize, frame: Arc<Vec<u8>>) -> bool {
    let mut l = lock(&inner.links[i]);
    let Some(w) = &l.writer else { return false };
    let len = frame.len() as u64;
    match w.try_send(frame) {
        Ok(()) => {
            l.queued.fetch_add(1, Ordering::Relaxed);
            l.status.frames_out += 1;
            l.status.bytes_out += len;
            true
        }
        Err(TrySendError::Full(_)) => {
            tracing::warn!(link = i, "link stalled (send queue full); resetting it");
            if let Some(s) = l.stream.take() {
                let _ = s.shutdown(Shutdown::Both);
            }
            l.writer = None;
            false
        }
        Err(TrySendError::Disconnected(_)) => {
            l.writer = None;
            false
        }
    }
}

fn dial_loop(inner: Arc<Inner>, index: usize) {
    let peer = inner.configs[index].peer;
    while !inner.stopped.load(Ordering::SeqCst) {
        match TcpStream::connect_timeout(&peer, CONNECT_TIMEOUT) {
            Ok(s) => serve(&inner, index, s),
            Err(e) => tracing::trace!(link = index, "connect {peer}: {e}"),
        }
        std::thread::sleep(inner.interval);
    }
}

fn accept_loop(inner: Arc<Inner>, index: usize, listener: TcpListener) {
    for stream in listener.incoming() {
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let inner = inner.clone();
        std::thread::spawn(move || serve(&inner, index, stream));
    }
}

/// Runs one connection of link `index` until it breaks.
fn serve(inner: &Arc<Inner>, index: usize, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(inner.timeout.max(Duration::from_millis(50))));
    let _ = stream.set_write_timeout(Some(inner.timeout.max(Duration::from_millis(500))));
    let (Ok(mut reader), Ok(mut writer), Ok(closer)) =
        (stream.try_clone(), stream.try_clone(), stream.try_clone())
    else {
        return;
    };
    let (tx, rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(QUEUE_FRAMES);
    let queued = Arc::new(AtomicUsize::new(0));
    let pending = queued.clone();
    std::thread::spawn(move || {
        for frame in rx {
            pending.fetch_sub(1, Ordering::Relaxed);
            if writer.write_all(&frame).is_err() {
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
        }
    });
    let hello = {
        let l = lock(&inner.local);
        Message::Hello {
            version: PROTOCOL_VERSION,
            node: l.node.clone(),
            role: l.role,
            generation: l.generation,
            mem_mib: l.mem_mib,
            disk_bytes: l.disk_bytes,
        }
    };
    queued.fetch_add(1, Ordering::Relaxed);
    if tx
        .try_send(Arc::new(inner.codec.encode(
            inner.session,
            0,
            &hello.encode(),
        )))
        .is_err()
    {
        return;
    }
    // The connection becomes the link's only once the other end has proved it holds
    // the key: a stranger connecting to the port cannot displace the peer.
    let mut installed: Option<u64> = None;
    let install = |tx: SyncSender<Arc<Vec<u8>>>, closer: TcpStream| {
        let mut l = lock(&inner.links[index]);
        l.queued = queued.clone();
        if let Some(old) = l.stream.replace(closer) {
            let _ = old.shutdown(Shutdown::Both);
        }
        l.writer = Some(tx);
        l.conn_id += 1;
        l.status.connects += 1;
        tracing::info!(link = index, peer = %inner.configs[index].peer, "link connected");
        l.conn_id
    };
    let mut unused = Some((tx, closer));
    loop {
        match inner.codec.read(&mut reader) {
            Ok(frame) => {
                if let Some((tx, closer)) = unused.take() {
                    installed = Some(install(tx, closer));
                }
                if !deliver(inner, index, frame) {
                    break;
                }
            }
            Err(FrameError::Auth) => {
                lock(&inner.links[index]).status.auth_failures += 1;
                tracing::warn!(link = index, "frame failed authentication");
                if installed.is_none() {
                    tracing::warn!(link = index, "peer failed authentication; disconnecting");
                    break;
                }
            }
            Err(FrameError::Compression(e)) => {
                lock(&inner.links[index]).status.bad_frames += 1;
                tracing::warn!(link = index, "undecompressable frame dropped: {e}");
            }
            Err(FrameError::Crc) => {
                lock(&inner.links[index]).status.bad_frames += 1;
                tracing::warn!(link = index, "corrupt frame dropped");
            }
            Err(e) => {
                if !matches!(e, FrameError::Io(_)) {
                    lock(&inner.links[index]).status.bad_frames += 1;
                    tracing::warn!(link = index, "link stream broken: {e}");
                }
                break;
            }
        }
    }
    if let Some((_, closer)) = unused {
        let _ = closer.shutdown(Shutdown::Both);
        return;
    }
    let mut l = lock(&inner.links[index]);
    if installed == Some(l.conn_id) {
        if let Some(s) = l.stream.take() {
            let _ = s.shutdown(Shutdown::Both);
        }
        l.writer = None;
        tracing::info!(link = index, "link disconnected");
    }
}

/// Handles one verified frame. Returns false to drop the connection.
fn deliver(inner: &Inner, index: usize, frame: frame::Frame) -> bool {
    let msg = match Message::decode(&frame.payload) {
        Ok(m) => m,
        Err(e) => {
            lock(&inner.links[index]).status.bad_frames += 1;
            tracing::warn!(link = index, "{e}; frame dropped");
            return true;
        }
    };
    {
        let ping_us = match &msg {
            Message::Ping { sent_us, .. } => Some(*sent_us),
            _ => None,
        };
        let mut l = lock(&inner.links[index]);
        if !l.order.advance(frame.session, frame.seq, ping_us) {
            l.status.replayed += 1;
            tracing::warn!(link = index, seq = frame.seq, "replayed frame dropped");
            return true;
        }
        // Authentic and new: the peer is alive.
        l.last_rx = Some(Instant::now());
        l.status.frames_in += 1;
    }
    let events = lock(&inner.events).clone();
    let send_here = |m: &Message| {
        let f = Arc::new(inner.codec.encode(inner.session, 0, &m.encode()));
        queue(inner, index, f);
    };
    match (frame.seq, msg) {
        (
            0,
            Message::Hello {
                version,
                node,
                role,
                generation,
                mem_mib,
                disk_bytes,
            },
        ) => {
            if version != PROTOCOL_VERSION {
                let reason = format!(
                    "peer {node} speaks protocol version {version}; this ftvm speaks version {PROTOCOL_VERSION}"
                );
                tracing::error!(link = index, "{reason}");
                send_here(&Message::Refuse { reason });
                // Let the refusal leave before the connection is closed.
                let queued = lock(&inner.links[index]).queued.clone();
                let start = Instant::now();
                while queued.load(Ordering::Relaxed) > 0
                    && start.elapsed() < Duration::from_millis(500)
                {
                    std::thread::sleep(Duration::from_millis(2));
                }
                std::thread::sleep(Duration::from_millis(20));
                return false;
            }
            let _ = events.send(Event::Hello {
                node,
                role,
                generation,
                mem_mib,
                disk_bytes,
            });
        }
        (0, Message::Refuse { reason }) => {
            tracing::error!(link = index, "peer refused this node: {reason}");
            return false;
        }
        (
            0,
            Message::Ping {
                sent_us,
                role,
                generation,
            },
        ) => {
            send_here(&Message::Pong { sent_us });
            let _ = events.send(Event::Heartbeat { role, generation });
        }
        (0, Message::Pong { sent_us }) => {
            let now = inner.clock.elapsed().as_micros() as u64;
            let rtt = now.saturating_sub(sent_us) as f64 / 1000.0;
            lock(&inner.links[index]).status.rtt_ms = Some(rtt);
        }
        (0, other) => {
            lock(&inner.links[index]).status.bad_frames += 1;
            tracing::warn!(
                link = index,
                kind = other.kind(),
                "unexpected unsequenced message dropped"
            );
        }
        (seq, msg) => {
            if lock(&inner.dedup).fresh(frame.session, seq) {
                let _ = events.send(Event::Message(msg));
            }
        }
    }
    true
}

fn heartbeat_loop(inner: Arc<Inner>) {
    while !inner.stopped.load(Ordering::SeqCst) {
        let (role, generation) = {
            let l = lock(&inner.local);
            (l.role, l.generation)
        };
        let ping = Message::Ping {
            sent_us: inner.clock.elapsed().as_micros() as u64,
            role,
            generation,
        };
        let frame = Arc::new(inner.codec.encode(inner.session, 0, &ping.encode()));
        for i in 0..inner.links.len() {
            queue(&inner, i, frame.clone());
        }
        std::thread::sleep(inner.interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_accepts_only_frames_that_advance_its_order() {
        let mut o = RxOrder::default();
        assert!(o.advance(1, 0, Some(10)), "first heartbeat");
        assert!(o.advance(1, 5, None));
        assert!(!o.advance(1, 5, None), "same sequence again");
        assert!(!o.advance(1, 3, None), "older sequence");
        assert!(!o.advance(1, 0, Some(10)), "same heartbeat again");
        assert!(o.advance(1, 0, Some(11)));
        assert!(o.advance(1, 0, None), "hello and pong carry no order");
        assert!(o.advance(2, 1, Some(1)), "a restarted peer starts again");
    }

    #[test]
    fn dedup_accepts_each_sequence_once_and_resets_per_session() {
        let mut d = Dedup::default();
        assert!(d.fresh(1, 1));
        assert!(d.fresh(1, 3));
        assert!(!d.fresh(1, 1));
        assert!(d.fresh(1, 2), "late but unseen");
        assert!(!d.fresh(1, 3));
        assert!(d.fresh(2, 1), "a restarted peer starts again");
        assert!(!d.fresh(2, 1));
    }

    fn free_addr() -> std::net::SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn local(node: &str) -> LocalInfo {
        LocalInfo {
            node: node.into(),
            role: Role::Starting,
            generation: 0,
            mem_mib: 64,
            disk_bytes: None,
        }
    }

    /// Two link configurations, the first end listening on both.
    fn pair_configs() -> (Vec<LinkConfig>, Vec<LinkConfig>) {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            let (mut p, mut q) = (free_addr(), free_addr());
            if p.to_string() < q.to_string() {
                std::mem::swap(&mut p, &mut q);
            }
            // p sorts higher: its end listens.
            xs.push(LinkConfig { local: p, peer: q });
            ys.push(LinkConfig { local: q, peer: p });
        }
        (xs, ys)
    }

    const KEY: &[u8] = b"link-test-key-0123456789";

    fn next_message(rx: &Receiver<Event>, limit: Duration) -> Option<Message> {
        let end = Instant::now() + limit;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Event::Message(m)) => return Some(m),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    #[test]
    fn a_message_sent_on_two_links_arrives_once_and_links_measure_round_trips() {
        let (xc, yc) = pair_configs();
        let ms = Duration::from_millis;
        let (x, _xrx) = Links::start(&xc, KEY, local("x"), ms(10), ms(200)).unwrap();
        let (y, yrx) = Links::start(&yc, KEY, local("y"), ms(10), ms(200)).unwrap();
        let healthy = |l: &Links| l.status().iter().filter(|s| s.healthy).count();
        let start = Instant::now();
        while (healthy(&x) < 2 || healthy(&y) < 2) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(ms(10));
        }
        assert_eq!(healthy(&x), 2, "{:?}", x.status());
        assert_eq!(x.send(&Message::Join), 2, "queued on both links");
        assert_eq!(
            next_message(&yrx, Duration::from_secs(5)),
            Some(Message::Join)
        );
        assert_eq!(
            next_message(&yrx, ms(300)),
            None,
            "the second copy is dropped"
        );
        assert!(x.status().iter().all(|s| s.rtt_ms.is_some()));
        x.shutdown();
        y.shutdown();
    }

    #[test]
    fn garbage_and_a_peer_with_the_wrong_key_are_counted_and_refused_not_fatal() {
        let (xc, _) = pair_configs();
        let ms = Duration::from_millis;
        let (x, xrx) = Links::start(&xc, KEY, local("x"), ms(10), ms(500)).unwrap();
        let target = xc[0].local;
        let wait_for = |what: &dyn Fn(&LinkStatus) -> bool| {
            let start = Instant::now();
            while !what(&x.status()[0]) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(ms(10));
            }
            what(&x.status()[0])
        };
        // Garbage: not frames at all.
        let mut s = TcpStream::connect(target).unwrap();
        s.write_all(&[0x5a; 100]).unwrap();
        assert!(wait_for(&|l| l.bad_frames >= 1), "{:?}", x.status());
        // A well-formed frame under another key.
        let mut s = TcpStream::connect(target).unwrap();
        let forged = Codec::new(b"not-the-pair-key-at-all").encode(1, 1, &Message::Join.encode());
        s.write_all(&forged).unwrap();
        assert!(wait_for(&|l| l.auth_failures >= 1), "{:?}", x.status());
        assert!(xrx.try_recv().is_err(), "nothing reached the CoServer");
        // A frame with a flipped bit under the right key: dropped, counted.
        let mut s = TcpStream::connect(target).unwrap();
        let mut bad = Codec::new(KEY).encode(1, 1, &Message::Join.encode());
        bad[30] ^= 4;
        s.write_all(&bad).unwrap();
        assert!(wait_for(&|l| l.bad_frames >= 2), "{:?}", x.status());
        // A frame cut short by the end of its stream: dropped, counted.
        let bad_before = x.status()[0].bad_frames;
        let mut s = TcpStream::connect(target).unwrap();
        let whole = Codec::new(KEY).encode(1, 1, &Message::Join.encode());
        s.write_all(&whole[..whole.len() / 2]).unwrap();
        drop(s);
        assert!(wait_for(&|l| l.bad_frames > bad_before), "{:?}", x.status());
        // The listener still serves a proper peer.
        let mut s = TcpStream::connect(target).unwrap();
        let join = Codec::new(KEY).encode(9, 1, &Message::Join.encode());
        s.write_all(&join).unwrap();
        assert_eq!(
            next_message(&xrx, Duration::from_secs(5)),
            Some(Message::Join)
        );
        // The same authentic frame again on the link: a replay, dropped and counted.
        s.write_all(&join).unwrap();
        assert!(wait_for(&|l| l.replayed >= 1), "{:?}", x.status());
        assert_eq!(
            next_message(&xrx, ms(200)),
            None,
            "the replay was delivered"
        );
        x.shutdown();
    }

    #[test]
    fn a_peer_with_another_protocol_version_is_refused_with_a_clear_reason() {
        let (xc, _) = pair_configs();
        let ms = Duration::from_millis;
        let (x, xrx) = Links::start(&xc, KEY, local("x"), ms(10), ms(500)).unwrap();
        let mut s = TcpStream::connect(xc[0].local).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let codec = Codec::new(KEY);
        let hello = Message::Hello {
            version: PROTOCOL_VERSION + 98,
            node: "future".into(),
            role: Role::Starting,
            generation: 0,
            mem_mib: 64,
            disk_bytes: None,
        };
        s.write_all(&codec.encode(5, 0, &hello.encode())).unwrap();
        let mut reason = None;
        while let Ok(f) = codec.read(&mut s) {
            if let Ok(Message::Refuse { reason: r }) = Message::decode(&f.payload) {
                reason = Some(r);
                break;
            }
        }
        let reason = reason.expect("a Refuse message");
        assert!(
            reason.contains(&format!("protocol version {}", PROTOCOL_VERSION + 98)),
            "{reason}"
        );
        assert!(
            !matches!(xrx.try_recv(), Ok(Event::Hello { .. })),
            "the CoServer never sees the incompatible peer"
        );
        x.shutdown();
    }
}
