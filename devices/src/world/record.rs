//! The deterministic input log: a recording World that wraps a live one and notes every
//! inbound event with the exit at which it entered the VM, and a replaying World that
//! feeds those events to a second VM at the same exits. Lockstep replication streams
//! exactly this log from the primary to the secondary.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{IdleRequest, Wake, World, WorldError};

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

/// A World that passes everything to an inner World and records the inbound events.
pub struct RecordingWorld<W: World> {
    inner: W,
    log: Arc<Mutex<InputLog>>,
}

impl<W: World> RecordingWorld<W> {
    /// Records what `inner` delivers.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            log: Arc::default(),
        }
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

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        let r = self.inner.disk_read(disk, offset, buf);
        self.push(InputEvent::DiskRead {
            disk,
            offset,
            data: r.is_ok().then(|| buf.to_vec()),
        });
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

/// What a replayed VM sent out, for comparison with the recorded run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutputs {
    /// Console bytes.
    pub console: Vec<u8>,
    /// Frames transmitted.
    pub packets: Vec<Vec<u8>>,
    /// Disk writes (disk, offset, data).
    pub disk_writes: Vec<(usize, u64, Vec<u8>)>,
}

/// A World that feeds a recorded log to a VM and collects its outputs.
pub struct ReplayWorld {
    events: VecDeque<InputEvent>,
    has_network: bool,
    outputs: Arc<Mutex<ReplayOutputs>>,
}

impl ReplayWorld {
    /// Replays `log`. `has_network` must match the recorded VM's.
    pub fn new(log: InputLog, has_network: bool) -> Self {
        Self {
            events: log.events.into(),
            has_network,
            outputs: Default::default(),
        }
    }

    /// A handle on the collected outputs.
    pub fn outputs(&self) -> Arc<Mutex<ReplayOutputs>> {
        self.outputs.clone()
    }

    /// Events not consumed yet.
    pub fn remaining(&self) -> usize {
        self.events.len()
    }

    fn record_output(&self, f: impl FnOnce(&mut ReplayOutputs)) {
        if let Ok(mut o) = self.outputs.lock() {
            f(&mut o);
        }
    }

    fn diverged(exit: u64, what: impl Into<String>) -> WorldError {
        WorldError::Diverged {
            exit,
            what: what.into(),
        }
    }
}

impl World for ReplayWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        self.record_output(|o| o.console.extend_from_slice(bytes));
    }

    fn transmit(&mut self, frame: &[u8]) {
        self.record_output(|o| o.packets.push(frame.to_vec()));
    }

    fn receive(&mut self, exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        match self.events.front() {
            Some(InputEvent::Packet { exit: e, .. }) if *e == exit => match self.events.pop_front()
            {
                Some(InputEvent::Packet { frame, .. }) => Ok(Some(frame)),
                _ => Ok(None),
            },
            Some(InputEvent::Packet { exit: e, .. }) if *e < exit => Err(Self::diverged(
                exit,
                format!("a packet due at exit {e} was not taken"),
            )),
            _ => Ok(None),
        }
    }

    fn has_network(&self) -> bool {
        self.has_network
    }

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        match self.events.pop_front() {
            Some(InputEvent::DiskRead {
                disk: d,
                offset: o,
                data,
            }) if d == disk && o == offset => match data {
                Some(data) if data.len() == buf.len() => {
                    buf.copy_from_slice(&data);
                    Ok(())
                }
                Some(_) => Err(Self::diverged(0, "a disk read of another length")),
                None => Err(WorldError::Disk {
                    disk,
                    source: std::io::Error::other("recorded read failure"),
                }),
            },
            other => Err(Self::diverged(
                0,
                format!("expected a read of disk {disk} at {offset}, log has {other:?}"),
            )),
        }
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        self.record_output(|o| o.disk_writes.push((disk, offset, data.to_vec())));
        self.disk_status(disk)
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        self.disk_status(disk)
    }

    fn console_input(&mut self, exit: u64, max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        match self.events.front() {
            Some(InputEvent::ConsoleInput { exit: e, bytes }) if *e == exit => {
                if bytes.len() > max {
                    return Err(Self::diverged(
                        exit,
                        format!(
                            "{} console bytes logged, the UART has room for {max}",
                            bytes.len()
                        ),
                    ));
                }
                match self.events.pop_front() {
                    Some(InputEvent::ConsoleInput { bytes, .. }) => Ok(Some(bytes)),
                    _ => Ok(None),
                }
            }
            Some(InputEvent::ConsoleInput { exit: e, .. }) if *e < exit => Err(Self::diverged(
                exit,
                format!("console input logged for exit {e} was not taken"),
            )),
            _ => Ok(None),
        }
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        let exit = request.exit;
        match self.events.pop_front() {
            Some(InputEvent::Wake { exit: e, at_ns }) if e == exit => Ok(Wake { at_ns }),
            other => Err(Self::diverged(
                exit,
                format!("expected a wake-up, log has {other:?}"),
            )),
        }
    }
}

impl ReplayWorld {
    fn disk_status(&mut self, disk: usize) -> Result<(), WorldError> {
        match self.events.pop_front() {
            Some(InputEvent::DiskStatus { disk: d, ok }) if d == disk => {
                if ok {
                    Ok(())
                } else {
                    Err(WorldError::Disk {
                        disk,
                        source: std::io::Error::other("recorded write failure"),
                    })
                }
            }
            other => Err(Self::diverged(
                0,
                format!("expected a write to disk {disk}, log has {other:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::live::{LiveWorld, SharedBuffer};

    fn request(exit: u64, deadline_ns: Option<u64>) -> IdleRequest {
        IdleRequest {
            exit,
            now_ns: 0,
            deadline_ns,
            console_room: true,
            give_up_at: None,
        }
    }

    #[test]
    fn replay_feeds_back_what_was_recorded() {
        let mut rec = RecordingWorld::new(LiveWorld::new(SharedBuffer::default()));
        let wake = rec.idle(&request(10, Some(5_000))).unwrap();
        let log = rec.log();
        assert_eq!(
            log.events,
            vec![InputEvent::Wake {
                exit: 10,
                at_ns: wake.at_ns
            }]
        );

        let mut replay = ReplayWorld::new(log, false);
        assert!(
            replay.idle(&request(9, Some(5_000))).is_err(),
            "wrong exit diverges"
        );
        let mut replay = ReplayWorld::new(rec.log(), false);
        assert_eq!(replay.idle(&request(10, Some(5_000))).unwrap(), wake);
        assert_eq!(replay.remaining(), 0);
    }

    #[test]
    fn replayed_packets_arrive_at_their_exit_only() {
        let log = InputLog {
            events: vec![InputEvent::Packet {
                exit: 7,
                frame: vec![1, 2, 3],
            }],
        };
        let mut replay = ReplayWorld::new(log.clone(), true);
        assert_eq!(replay.receive(6).unwrap(), None);
        assert_eq!(replay.receive(7).unwrap(), Some(vec![1, 2, 3]));
        assert_eq!(replay.receive(8).unwrap(), None);
        let mut late = ReplayWorld::new(log, true);
        assert!(
            late.receive(9).is_err(),
            "a packet the VM did not take at its exit diverges"
        );
    }

    #[test]
    fn replayed_console_input_arrives_at_its_exit_and_within_the_room() {
        let log = InputLog {
            events: vec![InputEvent::ConsoleInput {
                exit: 4,
                bytes: b"hello".to_vec(),
            }],
        };
        let mut replay = ReplayWorld::new(log.clone(), false);
        assert_eq!(replay.console_input(3, 64).unwrap(), None);
        assert!(
            replay.console_input(4, 2).is_err(),
            "more bytes than the UART has room for diverges"
        );
        let mut replay = ReplayWorld::new(log.clone(), false);
        assert_eq!(
            replay.console_input(4, 64).unwrap(),
            Some(b"hello".to_vec())
        );
        assert_eq!(replay.remaining(), 0);
        let mut late = ReplayWorld::new(log, false);
        assert!(
            late.console_input(5, 64).is_err(),
            "input not taken diverges"
        );
    }
}
