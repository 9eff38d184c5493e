//! The deterministic input log: a recording World that wraps a live one and notes every
//! inbound event with the exit at which it entered the VM ([`super::replay`] feeds them
//! to a second VM at the same exits). Lockstep replication streams exactly this log from
//! the primary to the secondary.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{IdleRequest, Wake, World, WorldError};

/// The digest a log keeps of disk read data in place of the data (xxh3-64).
pub fn read_digest(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// One inbound event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InputEvent {
    /// A frame delivered to the guest at `exit`.
    Packet {
        /// Exit number.
        exit: u64,
        /// The frame.
        frame: Vec<u8>,
    },
    /// An idle guest resumed at virtual time `at_ns`, at `exit`.
    Wake {
        /// Exit number.
        exit: u64,
        /// Virtual time.
        at_ns: u64,
    },
    /// Console input delivered to the UART at `exit`.
    ConsoleInput {
        /// Exit number.
        exit: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// Data read from a disk (in request order).
    DiskRead {
        /// Disk index.
        disk: usize,
        /// Byte offset.
        offset: u64,
        /// The data, or `None` if the host read failed.
        data: Option<Vec<u8>>,
    },
    /// Data read from a disk (in request order), logged by its digest: the replaying VM
    /// reads its own replica of the disk, which holds the same data unless it diverged.
    DiskReadDigest {
        /// Disk index.
        disk: usize,
        /// Byte offset.
        offset: u64,
        /// Bytes read.
        len: u32,
        /// [`read_digest`] of the data, or `None` if the host read failed.
        digest: Option<u64>,
    },
    /// The outcome of a disk write or flush (in request order): whether it succeeded.
    DiskStatus {
        /// Disk index.
        disk: usize,
        /// Success.
        ok: bool,
    },
}

/// The input log of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputLog {
    /// Events in the order the VM consumed them.
    pub events: Vec<InputEvent>,
}

/// Takes the events logged into `log` (a [`RecordingWorld::log_handle`]) since the last
/// take: a lockstep primary ships them in slices.
pub fn take_logged(log: &Mutex<InputLog>) -> Vec<InputEvent> {
    log.lock()
        .map(|mut l| std::mem::take(&mut l.events))
        .unwrap_or_default()
}

/// A World that passes everything to an inner World and records the inbound events.
pub struct RecordingWorld<W: World> {
    inner: W,
    log: Arc<Mutex<InputLog>>,
    digest_reads: bool,
}

impl<W: World> RecordingWorld<W> {
    /// Records what `inner` delivers.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            log: Arc::default(),
            digest_reads: false,
        }
    }

    /// Logs disk reads by their digest rather than their data (for a replaying VM
    /// that holds its own replica of the disks).
    pub fn digest_disk_reads(mut self) -> Self {
        self.digest_reads = true;
        self
    }

    /// A handle on the log, readable while the World is owned by a VM.
    pub fn log_handle(&self) -> Arc<Mutex<InputLog>> {
        self.log.clone()
    }

    /// A copy of the log so far.
    pub fn log(&self) -> InputLog {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    fn push(&self, event: InputEvent) {
        if let Ok(mut l) = self.log.lock() {
            l.events.push(event);
        }
    }
}

impl<W: World> World for RecordingWorld<W> {
    fn console_output(&mut self, bytes: &[u8]) {
        self.inner.console_output(bytes);
    }

    fn transmit(&mut self, frame: &[u8]) {
        self.inner.transmit(frame);
    }

    fn receive(&mut self, exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        let frame = self.inner.receive(exit)?;
        if let Some(f) = &frame {
            self.push(InputEvent::Packet {
                exit,
                frame: f.clone(),
            });
        }
        Ok(frame)
    }

    fn has_network(&self) -> bool {
        self.inner.has_network()
    }

    fn input_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.inner.input_fds()
    }

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        let r = self.inner.disk_read(disk, offset, buf);
        let event = if self.digest_reads {
            InputEvent::DiskReadDigest {
                disk,
                offset,
                len: buf.len() as u32,
                digest: r.is_ok().then(|| read_digest(buf)),
            }
        } else {
            InputEvent::DiskRead {
                disk,
                offset,
                data: r.is_ok().then(|| buf.to_vec()),
            }
        };
        self.push(event);
        r
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        let r = self.inner.disk_write(disk, offset, data);
        self.push(InputEvent::DiskStatus {
            disk,
            ok: r.is_ok(),
        });
        r
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        let r = self.inner.disk_flush(disk);
        self.push(InputEvent::DiskStatus {
            disk,
            ok: r.is_ok(),
        });
        r
    }

    fn console_input(&mut self, exit: u64, max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        let bytes = self.inner.console_input(exit, max)?;
        if let Some(bytes) = &bytes {
            self.push(InputEvent::ConsoleInput {
                exit,
                bytes: bytes.clone(),
            });
        }
        Ok(bytes)
    }

    fn pause_requested(&mut self) -> bool {
        self.inner.pause_requested()
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        let wake = self.inner.idle(request)?;
        self.push(InputEvent::Wake {
            exit: request.exit,
            at_ns: wake.at_ns,
        });
        Ok(wake)
    }

    fn set_virtual_now(&mut self, now_ns: u64) {
        self.inner.set_virtual_now(now_ns);
    }

    fn flush(&mut self) {
        self.inner.flush();
    }
}
