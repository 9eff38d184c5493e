//! The sending side of one link connection: its writer task, and the direct send by
//! which another thread writes a small message to the socket itself.
//!
//! Both seal frames and append them to one buffer under one lock, so the frames' nonce
//! order is the order of their bytes on the stream, and both write what the buffer
//! holds without waiting (`try_write`). What the socket does not take at once stays in
//! the buffer for the writer task, which writes it first when the socket is writable
//! again. A direct send saves the thread hop to the writer task: on the way of every
//! lockstep slice and its acknowledgement (docs/architecture.md, "The quick path").

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::io::Interest;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, Notify};

use super::frame::{self, Plain, Sealer};
use super::{Inner, Outgoing};

/// Sealed bytes not yet written, and the sealer that made them.
struct Buffered {
    sealer: Sealer,
    bytes: Vec<u8>,
    /// How much of `bytes` is written.
    written: usize,
    /// A direct send left bytes here and counted itself in the link's queue.
    counted: bool,
}

impl Buffered {
    fn is_empty(&self) -> bool {
        self.written == self.bytes.len()
    }

    fn seal(&mut self, plain: &Plain) {
        let sealed = self.sealer.seal(plain);
        if self.is_empty() {
            // The usual case: the sealed frame becomes the buffer, uncopied.
            self.bytes = sealed;
            self.written = 0;
        } else {
            self.bytes.extend_from_slice(&sealed);
        }
    }

    /// Writes what the socket takes now. `Ok(true)`: all written.
    ///
    /// A short write means the socket's buffer is full: it counts as "not writable"
    /// until the kernel says otherwise (as tokio's own writes do), so the next write
    /// waits for a third of the buffer to drain instead of trickling in what the
    /// peer's last acknowledgement freed (many small writes halved a bulk copy).
    fn write_some(&mut self, wr: &OwnedWriteHalf) -> std::io::Result<bool> {
        let stream: &tokio::net::TcpStream = wr.as_ref();
        while !self.is_empty() {
            let rest = &self.bytes[self.written..];
            let mut short = 0;
            let wrote = stream.try_io(Interest::WRITABLE, || {
                let n = socket2::SockRef::from(stream).send(rest)?;
                if n > 0 && n < rest.len() {
                    short = n;
                    return Err(std::io::ErrorKind::WouldBlock.into());
                }
                Ok(n)
            });
            match wrote {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.written += short;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// The socket's write half and its buffer, shared by the writer task and direct
/// senders.
pub(super) struct WriteSide {
    wr: OwnedWriteHalf,
    buffered: Mutex<Buffered>,
    /// Wakes the writer task when a direct send left bytes in the buffer.
    kick: Notify,
    /// Bulk messages queued and not yet written (shared with the link's handle).
    queued: Arc<AtomicUsize>,
}

fn lock(m: &Mutex<Buffered>) -> MutexGuard<'_, Buffered> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl WriteSide {
    /// The sending side of a connection whose first frame is `first` (its hello):
    /// sealed into the buffer now, so nothing, direct or queued, goes before it.
    pub fn new(
        wr: OwnedWriteHalf,
        sealer: Sealer,
        queued: Arc<AtomicUsize>,
        first: &Plain,
    ) -> Arc<Self> {
        let mut buffered = Buffered {
            sealer,
            bytes: Vec::new(),
            written: 0,
            counted: false,
        };
        buffered.seal(first);
        Arc::new(Self {
            wr,
            buffered: Mutex::new(buffered),
            kick: Notify::new(),
            queued,
        })
    }

    /// Writes `out` from the calling thread if nothing is before it on this connection
    /// (no bulk message queued or half written, no bytes buffered). Returns whether it
    /// was taken: written, or buffered for the writer task. Never waits for the socket.
    pub fn try_direct(&self, inner: &Inner, out: &Outgoing) -> bool {
        let mut b = lock(&self.buffered);
        if !b.is_empty() || self.queued.load(Ordering::Acquire) > 0 {
            return false;
        }
        for chunk in frame::chunks(out.seq, out.lz4, &out.payload) {
            b.seal(&chunk);
        }
        match b.write_some(&self.wr) {
            Ok(true) => {
                drop(b);
                inner.note_sent();
            }
            Ok(false) | Err(_) => {
                // The rest (or the error) is the writer task's: it writes the buffer
                // first and ends the connection on an error.
                b.counted = true;
                self.queued.fetch_add(1, Ordering::AcqRel);
                drop(b);
                self.kick.notify_one();
            }
        }
        true
    }

    /// Seals `plain` after what is buffered and writes the buffer out, waiting for the
    /// socket as needed.
    async fn write(&self, inner: &Inner, plain: &Plain) -> std::io::Result<()> {
        lock(&self.buffered).seal(plain);
        self.flush(inner).await?;
        // `try_write` spends none of the task's budget: without this, a writer whose
        // socket keeps taking data would hold its worker thread and starve the
        // readers on it (a bulk copy ran at half speed).
        tokio::task::coop::consume_budget().await;
        Ok(())
    }

    /// Writes the buffer out, waiting for the socket as needed.
    async fn flush(&self, inner: &Inner) -> std::io::Result<()> {
        loop {
            {
                let mut b = lock(&self.buffered);
                let was = b.written;
                let done = b.write_some(&self.wr)?;
                if b.written > was {
                    inner.note_sent();
                }
                if done {
                    if std::mem::take(&mut b.counted) {
                        self.queued.fetch_sub(1, Ordering::AcqRel);
                    }
                    return Ok(());
                }
            }
            self.wr.writable().await?;
        }
    }
}

/// The writer task: buffered bytes first, then control messages ahead of bulk ones,
/// and control messages between the chunks of a large bulk message.
pub(super) async fn write_loop(
    inner: Arc<Inner>,
    side: Arc<WriteSide>,
    mut control: mpsc::Receiver<Vec<u8>>,
    mut bulk: mpsc::Receiver<Arc<Outgoing>>,
) -> std::io::Result<()> {
    loop {
        side.flush(&inner).await?;
        let out = tokio::select! {
            biased;
            () = side.kick.notified() => continue,
            c = control.recv() => match c {
                Some(m) => {
                    side.write(&inner, &Plain::Control(m)).await?;
                    continue;
                }
                None => return Ok(()),
            },
            b = bulk.recv() => match b {
                Some(out) => out,
                None => return Ok(()),
            },
        };
        for chunk in frame::chunks(out.seq, out.lz4, &out.payload) {
            // Heartbeats and answers go ahead of the rest of a large message.
            while let Ok(m) = control.try_recv() {
                side.write(&inner, &Plain::Control(m)).await?;
            }
            side.write(&inner, &chunk).await?;
        }
        side.queued.fetch_sub(1, Ordering::Relaxed);
    }
}
