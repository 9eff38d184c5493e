//! The line protocol of workload `net`'s TCP key-value service, one [`Conn`] per TCP
//! socket:
//!
//! - `SET <key> <value>` → `OK` once the value is written to the disk and flushed;
//! - `GET <key>` → `VALUE <value>` or `NOTFOUND`, read from the disk;
//! - `SHUTDOWN` → `BYE` (the caller then powers off);
//! - `UPTIME` → `UPTIME <ns>`, the guest's time since it booted (a client tells a
//!   rebooted guest by its uptime going back);
//! - `TSC` → `TSC <n>`, the host's time stamp counter read with `rdtsc`: a reply that
//!   differs between two runs of the same guest (lockstep's divergence tests);
//! - `NOTE` → `NOTED`, after keeping the host's time stamp counter in memory only: two
//!   runs differ in memory and nowhere else (lockstep's memory checks).
//!
//! Keys are 1 to 64 bytes, values 1 to 256, printable ASCII without spaces. Lines end in
//! `\n` (a preceding `\r` is ignored); replies end in `\n`. Anything else is answered
//! with `ERR <reason>`, and SET/GET with `ERR no disk` when there is no disk.

use core::fmt::Write;
use core::cell::UnsafeCell;

/// Where `NOTE` keeps the host's time stamp counter (never read back, so written with a
/// volatile store the compiler keeps).
struct Noted(UnsafeCell<u64>);

// SAFETY: the guest runs one thread; the cell is only ever written, with a volatile
// store, and never read.
unsafe impl Sync for Noted {}

static NOTED_TSC: Noted = Noted(UnsafeCell::new(0));

use smoltcp::socket::tcp;

use super::kv::{Kv, KvError, MAX_KEY, MAX_VALUE};
use crate::virtio::blk::BlkError;

/// Longest accepted line (without its newline).
const MAX_LINE: usize = 4 + MAX_KEY + 1 + MAX_VALUE;
/// Longest reply (`VALUE <value>\n`); a line is processed only when the socket can take
/// it.
pub const MAX_REPLY: usize = 6 + MAX_VALUE + 1;

/// The state of one connection: its partial line.
pub struct Conn {
    line: [u8; MAX_LINE],
    len: usize,
    /// The current line is too long: it is being discarded.
    overflow: bool,
}

impl Conn {
    /// A connection with no partial line.
    pub const fn new() -> Conn {
        Conn {
            line: [0; MAX_LINE],
            len: 0,
            overflow: false,
        }
    }

    /// Forgets the partial line (the socket was closed).
    pub fn reset(&mut self) {
        self.len = 0;
        self.overflow = false;
    }

    /// Appends received bytes to the partial line.
    fn push(&mut self, bytes: &[u8]) {
        if self.len + bytes.len() > MAX_LINE {
            self.overflow = true;
        } else {
            self.line[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    /// Serves complete lines of `socket` while it has room for a reply. Returns whether
    /// anything was consumed or sent, and whether a `SHUTDOWN` was answered.
    pub fn serve(&mut self, socket: &mut tcp::Socket<'_>, kv: &mut Option<Kv>) -> (bool, bool) {
        let mut active = false;
        while socket.can_recv() && socket.send_capacity() - socket.send_queue() >= MAX_REPLY {
            let complete = socket.recv(|data| match data.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    self.push(&data[..end]);
                    (end + 1, true)
                }
                None => {
                    self.push(data);
                    (data.len(), false)
                }
            });
            active = true;
            match complete {
                Ok(true) => {}
                Ok(false) => continue,
                Err(_) => break,
            }
            let mut reply = Reply::new();
            let shutdown = self.handle(kv, &mut reply);
            self.reset();
            // The room was checked above.
            let _ = socket.send_slice(reply.as_bytes());
            if shutdown {
                return (true, true);
            }
        }
        (active, false)
    }

    /// Handles the complete line; returns whether it was `SHUTDOWN`.
    fn handle(&mut self, kv: &mut Option<Kv>, reply: &mut Reply) -> bool {
        if self.overflow {
            reply.push(b"ERR line too long\n");
            return false;
        }
        let mut line = &self.line[..self.len];
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        let mut words = line.split(|&b| b == b' ').filter(|w| !w.is_empty());
        let (command, key, value) = (words.next(), words.next(), words.next());
        let extra = words.next().is_some();
        match (command, key, value, extra) {
            (Some(b"SHUTDOWN"), None, ..) => {
                reply.push(b"BYE\n");
                return true;
            }
            (Some(b"UPTIME"), None, ..) => {
                let _ = writeln!(reply, "UPTIME {}", crate::io::time_ns());
            }
            (Some(b"TSC"), None, ..) => {
                let _ = writeln!(reply, "TSC {}", crate::io::host_tsc());
            }
            (Some(b"NOTE"), None, ..) => {
                // SAFETY: a valid, aligned static only this thread writes (see `Noted`).
                unsafe { core::ptr::write_volatile(NOTED_TSC.0.get(), crate::io::host_tsc()) };
                reply.push(b"NOTED\n");
            }
            (Some(b"GET"), Some(key), None, _) => get(kv, key, reply),
            (Some(b"SET"), Some(key), Some(value), false) => set(kv, key, value, reply),
            (Some(b"GET" | b"SET" | b"SHUTDOWN"), ..) => reply.push(b"ERR wrong arguments\n"),
            _ => reply.push(b"ERR unknown command\n"),
        }
        false
    }
}

/// Whether `word` is a valid key or value of at most `max` bytes.
fn valid(word: &[u8], max: usize) -> bool {
    (1..=max).contains(&word.len()) && word.iter().all(|&b| (0x21..=0x7e).contains(&b))
}

/// Answers `GET key`.
fn get(kv: &mut Option<Kv>, key: &[u8], reply: &mut Reply) {
    let Some(kv) = kv else {
        return reply.push(b"ERR no disk\n");
    };
    if !valid(key, MAX_KEY) {
        return reply.push(b"ERR bad key\n");
    }
    let mut value = [0; MAX_VALUE];
    match kv.get(key, &mut value) {
        Ok(Some(len)) => {
            reply.push(b"VALUE ");
            reply.push(&value[..len]);
            reply.push(b"\n");
        }
        Ok(None) => reply.push(b"NOTFOUND\n"),
        Err(e) => error(e, reply),
    }
}

/// Answers `SET key value`.
fn set(kv: &mut Option<Kv>, key: &[u8], value: &[u8], reply: &mut Reply) {
    let Some(kv) = kv else {
        return reply.push(b"ERR no disk\n");
    };
    if !valid(key, MAX_KEY) {
        return reply.push(b"ERR bad key\n");
    }
    if !valid(value, MAX_VALUE) {
        return reply.push(b"ERR bad value\n");
    }
    match kv.set(key, value) {
        Ok(()) => reply.push(b"OK\n"),
        Err(e) => error(e, reply),
    }
}

/// Answers a store error.
fn error(e: KvError, reply: &mut Reply) {
    match e {
        KvError::Full => reply.push(b"ERR disk full\n"),
        KvError::Io(BlkError::Status(status)) => {
            let _ = writeln!(reply, "ERR disk error (status {status})");
        }
        KvError::Io(BlkError::Range) => reply.push(b"ERR disk error\n"),
    }
}

/// A reply being built.
struct Reply {
    buf: [u8; MAX_REPLY],
    len: usize,
}

impl Reply {
    fn new() -> Reply {
        Reply {
            buf: [0; MAX_REPLY],
            len: 0,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Write for Reply {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}
