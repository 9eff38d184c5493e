//! One link connection on the links' runtime: dialling or accepting it, its handshake,
//! and its reader and writer tasks once installed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::frame::{self, FrameError, Opener, Plain, Reassembly, Sealer};
use super::handshake::{self, End, HandshakeError, Opening, OPENING_LEN};
use super::write::{write_loop, WriteSide};
use super::{
    lock, queue_control, ConnHandle, Event, Inner, PeerInfo, CONNECT_TIMEOUT, MAX_PENDING,
    QUEUE_CONTROL, QUEUE_MESSAGES, SEND_BUFFER,
};
use crate::protocol::{Message, PROTOCOL_VERSION};

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
enum ConnEnd {
    #[error("connection closed: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("handshake not completed within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("{0}")]
    Protocol(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// How long a connection may take to complete its handshake.
fn handshake_limit(inner: &Inner) -> Duration {
    inner.opts.timeout.max(Duration::from_secs(2))
}

pub(super) async fn dial_loop(inner: Arc<Inner>, index: usize) {
    // Ends when a reload started another dial loop for the link, or gave it a peer
    // address that says this end listens.
    let dialer = inner.dialers[index].fetch_add(1, Ordering::SeqCst) + 1;
    while !inner.stopped.load(Ordering::SeqCst) {
        let peer = inner.peer(index);
        if inner.dialers[index].load(Ordering::SeqCst) != dialer || !inner.dials(index) {
            return;
        }
        let mut pause = inner.opts.interval;
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(peer)).await {
            Ok(Ok(s)) => {
                if let Err(ConnEnd::Handshake(_) | ConnEnd::Refused(_)) =
                    connection(&inner, index, s, End::Dialer, None).await
                {
                    // The peer will not talk to this node as configured: do not hammer it.
                    pause = pause.max(Duration::from_secs(1));
                }
            }
            Ok(Err(e)) => tracing::trace!(link = index, "connect {peer}: {e}"),
            Err(_) => tracing::trace!(link = index, "connect {peer}: timed out"),
        }
        tokio::time::sleep(pause).await;
    }
}

pub(super) async fn accept_loop(inner: Arc<Inner>, index: usize, listener: TcpListener) {
    // Connections still in their handshake, oldest first.
    let mut pending: VecDeque<(Arc<AtomicBool>, tokio::task::AbortHandle)> = VecDeque::new();
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        if inner.stopped.load(Ordering::SeqCst) {
            return;
        }
        pending.retain(|(done, task)| !done.load(Ordering::Relaxed) && !task.is_finished());
        while pending.len() >= MAX_PENDING {
            if let Some((_, task)) = pending.pop_front() {
                task.abort();
                lock(&inner.links[index]).status.evicted += 1;
                tracing::debug!(
                    link = index,
                    "a connection still in its handshake was closed"
                );
            }
        }
        tracing::debug!(link = index, %from, "connection accepted");
        let done = Arc::new(AtomicBool::new(false));
        let task = inner.handle.spawn({
            let inner = inner.clone();
            let done = done.clone();
            async move {
                let _ = connection(&inner, index, stream, End::Listener, Some(done)).await;
            }
        });
        pending.push_back((done, task.abort_handle()));
    }
}

/// Runs one connection: handshake, installation, then its reader until it ends.
async fn connection(
    inner: &Arc<Inner>,
    index: usize,
    stream: TcpStream,
    end: End,
    done: Option<Arc<AtomicBool>>,
) -> Result<(), ConnEnd> {
    let _ = stream.set_nodelay(true);
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
    let limit = handshake_limit(inner);
    let (mut rd, mut wr) = stream.into_split();
    let keys =
        match tokio::time::timeout(limit, handshake(inner, index, end, &mut rd, &mut wr)).await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => {
                count_failure(inner, index, &e);
                return Err(e);
            }
            Err(_) => {
                let e = ConnEnd::HandshakeTimeout(limit);
                count_failure(inner, index, &e);
                return Err(e);
            }
        };
    if let Some(d) = &done {
        d.store(true, Ordering::Relaxed);
    }
    let (opener, sealer) = keys;
    let (control_tx, control_rx) = mpsc::channel(QUEUE_CONTROL);
    let (bulk_tx, bulk_rx) = mpsc::channel(QUEUE_MESSAGES);
    let queued = Arc::new(AtomicUsize::new(0));
    let hello = {
        let l = lock(&inner.local);
        Message::Hello {
            version: PROTOCOL_VERSION,
            node: l.node.clone(),
            session: inner.session,
            role: l.role,
            generation: l.generation,
            standing: l.standing,
            arbiter: l.arbiter,
            guest: l.guest.clone(),
        }
    };
    // The connection's first frame is its hello, sealed before anything can be sent on
    // it (a direct send waits behind it, see `write`).
    let hello = hello
        .encode()
        .map_err(|e| ConnEnd::Protocol(format!("hello not encoded: {e}")))?;
    let side = WriteSide::new(wr, sealer, queued.clone(), &Plain::Control(hello));
    let writer = inner
        .handle
        .spawn(write_loop(inner.clone(), side.clone(), control_rx, bulk_rx));
    let id = {
        let mut l = lock(&inner.links[index]);
        l.next_conn += 1;
        let id = l.next_conn;
        l.conn = Some(ConnHandle {
            id,
            control: control_tx,
            bulk: bulk_tx,
            queued,
            side,
            tasks: vec![writer.abort_handle()],
        });
        l.status.connects += 1;
        l.last_rx = Some(Instant::now());
        id
    };
    tracing::info!(link = index, peer = %inner.peer(index), "link connected");
    let result = read_loop(inner, index, rd, opener).await;
    match &result {
        Err(ConnEnd::Frame(FrameError::Auth)) => {
            lock(&inner.links[index]).status.auth_failures += 1;
            tracing::warn!(
                link = index,
                "frame failed authentication; connection closed"
            );
        }
        Err(ConnEnd::Frame(e)) => {
            lock(&inner.links[index]).status.bad_frames += 1;
            tracing::warn!(link = index, "{e}; connection closed");
        }
        Err(ConnEnd::Protocol(e)) => {
            lock(&inner.links[index]).status.bad_frames += 1;
            tracing::warn!(link = index, "{e}; connection closed");
        }
        _ => {}
    }
    let mut l = lock(&inner.links[index]);
    if l.conn.as_ref().is_some_and(|c| c.id == id) {
        l.conn = None;
        tracing::info!(link = index, "link disconnected");
    }
    result
}

fn count_failure(inner: &Inner, index: usize, e: &ConnEnd) {
    let mut l = lock(&inner.links[index]);
    match e {
        ConnEnd::Handshake(HandshakeError::Unauthenticated) | ConnEnd::Frame(FrameError::Auth) => {
            l.status.auth_failures += 1;
            drop(l);
            tracing::warn!(link = index, "peer failed authentication; disconnected");
        }
        ConnEnd::Handshake(
            h @ (HandshakeError::Version { .. }
            | HandshakeError::Encryption { .. }
            | HandshakeError::WrongLink { .. }),
        ) => {
            l.status.bad_frames += 1;
            drop(l);
            tracing::error!(link = index, "{h}");
        }
        ConnEnd::Io(_) => {}
        other => {
            l.status.bad_frames += 1;
            drop(l);
            tracing::debug!(link = index, "connection dropped in its handshake: {other}");
        }
    }
}

/// Reads a frame's body after checking its length against `max`.
async fn read_frame(rd: &mut OwnedReadHalf, max: usize) -> Result<(u32, Vec<u8>), ConnEnd> {
    let mut len = [0u8; 4];
    rd.read_exact(&mut len).await?;
    let len = u32::from_le_bytes(len);
    let n = Opener::check_len(len, max)?;
    let mut body = vec![0u8; n];
    rd.read_exact(&mut body).await?;
    Ok((len, body))
}

/// The handshake (see `handshake`): openings both ways, then the dialer's confirm,
/// checked by the listener before it sends its own.
async fn handshake(
    inner: &Inner,
    index: usize,
    end: End,
    rd: &mut OwnedReadHalf,
    wr: &mut OwnedWriteHalf,
) -> Result<(Opener, Sealer), ConnEnd> {
    let mine = Opening::new(inner.opts.encrypt, index as u16);
    let mine_bytes = mine.encode();
    wr.write_all(&mine_bytes).await?;
    let mut theirs_bytes = [0u8; OPENING_LEN];
    rd.read_exact(&mut theirs_bytes).await?;
    let theirs = Opening::decode(&theirs_bytes)?;
    handshake::check_peer(&mine, &theirs)?;
    let (dialer, listener) = match end {
        End::Dialer => (&mine_bytes, &theirs_bytes),
        End::Listener => (&theirs_bytes, &mine_bytes),
    };
    let keys = handshake::derive_keys(&inner.opts.psk, end, dialer, listener, mine.encrypt);
    let mut sealer = Sealer::new(keys.send, keys.encrypt);
    let mut opener = Opener::new(keys.receive, keys.encrypt);
    let peer_end = match end {
        End::Dialer => End::Listener,
        End::Listener => End::Dialer,
    };
    if end == End::Listener {
        check_confirm(rd, &mut opener, peer_end).await?;
    }
    wr.write_all(&sealer.seal(&Plain::Confirm(end))).await?;
    if end == End::Dialer {
        check_confirm(rd, &mut opener, peer_end).await?;
    }
    Ok((opener, sealer))
}

/// Reads the peer's confirm: the first sealed frame, which only a holder of the key
/// can produce for this connection.
async fn check_confirm(
    rd: &mut OwnedReadHalf,
    opener: &mut Opener,
    peer_end: End,
) -> Result<(), ConnEnd> {
    let (len, body) = read_frame(rd, frame::CONFIRM_BODY).await?;
    match opener.open(len, body) {
        Ok(Plain::Confirm(e)) if e == peer_end => Ok(()),
        _ => Err(HandshakeError::Unauthenticated.into()),
    }
}

async fn read_loop(
    inner: &Inner,
    index: usize,
    mut rd: OwnedReadHalf,
    mut opener: Opener,
) -> Result<(), ConnEnd> {
    let mut reassembly = Reassembly::default();
    let mut peer_session: Option<u64> = None;
    loop {
        let (len, body) = read_frame(&mut rd, frame::MAX_BODY).await?;
        let size = body.len() as u64;
        let plain = opener.open(len, body)?;
        {
            let mut l = lock(&inner.links[index]);
            l.last_rx = Some(Instant::now());
            l.status.frames_in += 1;
            l.status.bytes_in += size;
        }
        match plain {
            Plain::Confirm(_) => {
                return Err(ConnEnd::Protocol("confirm after the handshake".into()))
            }
            Plain::Control(bytes) => {
                let msg = Message::decode(&bytes).map_err(|e| ConnEnd::Protocol(e.to_string()))?;
                control_message(inner, index, msg, &mut peer_session).await?;
            }
            Plain::Chunk {
                seq,
                first,
                last,
                lz4,
                data,
            } => {
                let Some(session) = peer_session else {
                    return Err(ConnEnd::Protocol("message before the hello".into()));
                };
                if let Some((seq, payload)) = reassembly.push(seq, first, last, lz4, data)? {
                    lock(&inner.links[index]).blocked += 1;
                    let delivered = async {
                        let mut dedup = inner.dedup.lock().await;
                        if !dedup.fresh(session, seq) {
                            return Ok(());
                        }
                        let mut msg = Message::decode(&payload)
                            .map_err(|e| ConnEnd::Protocol(e.to_string()))?;
                        // Nothing queued before it is unfinished (and no other reader
                        // queues while the order is held): the quick path overtakes
                        // nothing.
                        if let Some(quick) = inner.quick.get() {
                            if inner.unfinished.load(Ordering::Acquire) == 0 {
                                match quick.offer(msg) {
                                    None => return Ok(()),
                                    Some(m) => msg = m,
                                }
                            }
                        }
                        // Queued while the order is held (push-back included).
                        queue_event(inner, Event::Message(msg)).await
                    }
                    .await;
                    let mut l = lock(&inner.links[index]);
                    l.blocked -= 1;
                    l.last_rx = Some(Instant::now());
                    drop(l);
                    delivered?;
                }
            }
        }
    }
}

/// Hands an event to the CoServer, waiting for room (push-back); while it waits, the
/// link counts as heard (the wait is this node's slowness, not the peer's silence).
async fn deliver(inner: &Inner, index: usize, ev: Event) -> Result<(), ConnEnd> {
    lock(&inner.links[index]).blocked += 1;
    let r = queue_event(inner, ev).await;
    let mut l = lock(&inner.links[index]);
    l.blocked -= 1;
    l.last_rx = Some(Instant::now());
    drop(l);
    r
}

/// Queues an event for the CoServer if there is room (dropped otherwise).
fn try_queue_event(inner: &Inner, ev: Event) {
    inner.unfinished.fetch_add(1, Ordering::AcqRel);
    if inner.events.try_send(ev).is_err() {
        inner.unfinished.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Queues an event for the CoServer, counted unfinished until it takes the next one.
async fn queue_event(inner: &Inner, ev: Event) -> Result<(), ConnEnd> {
    inner.unfinished.fetch_add(1, Ordering::AcqRel);
    inner.events.send(ev).await.map_err(|_| {
        inner.unfinished.fetch_sub(1, Ordering::AcqRel);
        ConnEnd::Protocol("the CoServer stopped taking events".into())
    })
}

async fn control_message(
    inner: &Inner,
    index: usize,
    msg: Message,
    peer_session: &mut Option<u64>,
) -> Result<(), ConnEnd> {
    match msg {
        Message::Hello {
            version,
            node,
            session,
            role,
            generation,
            standing,
            arbiter,
            guest,
        } => {
            let mismatch = if version != PROTOCOL_VERSION {
                Some(format!(
                    "peer {node} speaks protocol version {version}; this ftvm speaks version {PROTOCOL_VERSION}"
                ))
            } else {
                let l = lock(&inner.local);
                if node == l.node {
                    Some(format!(
                        "peer {node} has this node's name: the two nodes of a pair need names of their own"
                    ))
                } else {
                    l.guest
                        .mismatch(&guest)
                        .map(|m| format!("peer {node} refused: {m}"))
                }
            };
            if let Some(reason) = mismatch {
                tracing::error!(link = index, "{reason}");
                queue_control(
                    inner,
                    index,
                    &Message::Refuse {
                        reason: reason.clone(),
                    },
                );
                try_queue_event(
                    inner,
                    Event::Refused {
                        reason: reason.clone(),
                    },
                );
                // Let the refusal leave before the connection closes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Err(ConnEnd::Refused(reason));
            }
            *peer_session = Some(session);
            deliver(
                inner,
                index,
                Event::Hello {
                    node,
                    arbiter,
                    peer: PeerInfo {
                        session,
                        role,
                        generation,
                        standing,
                    },
                },
            )
            .await
        }
        Message::Refuse { reason } => {
            tracing::error!(link = index, "peer refused this node: {reason}");
            try_queue_event(
                inner,
                Event::Refused {
                    reason: format!("the peer refused this node: {reason}"),
                },
            );
            Err(ConnEnd::Refused(reason))
        }
        Message::Ping {
            sent_us,
            role,
            generation,
            standing,
        } => {
            queue_control(inner, index, &Message::Pong { sent_us });
            // Heartbeats count only on a connection whose hello named the session.
            let Some(session) = *peer_session else {
                return Ok(());
            };
            let info = PeerInfo {
                session,
                role,
                generation,
                standing,
            };
            deliver(inner, index, Event::Heartbeat(info)).await
        }
        Message::Pong { sent_us } => {
            let now = inner.clock.elapsed().as_micros() as u64;
            let rtt = now.saturating_sub(sent_us) as f64 / 1000.0;
            lock(&inner.links[index]).status.rtt_ms = Some(rtt);
            Ok(())
        }
        other => Err(ConnEnd::Protocol(format!(
            "{} message sent unsequenced",
            other.kind()
        ))),
    }
}
