//! The replaying World: it feeds an input log (see [`super::record`]) to a VM at the
//! exits where the recorded VM took each event, collects what the VM sends out, and
//! reports a divergence when the VM asks for something the log does not hold there.
//!
//! `ftvm replay` gives it a whole recorded log. A lockstep secondary gives it the
//! primary's log as it streams in ([`ReplayWorld::push`]) and its own replica of the
//! disks ([`ReplayWorld::following`]): the replayed guest's writes go to that replica,
//! and reads logged by their digest are read from it and checked.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::record::{read_digest, InputEvent, InputLog};
use super::{IdleRequest, Wake, World, WorldError};
use crate::backend::disk::DiskFile;

/// What a replayed VM sent out, for comparison with the recorded run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayOutputs {
    /// Console bytes.
    pub console: Vec<u8>,
    /// Frames transmitted.
    pub packets: Vec<Vec<u8>>,
    /// Disk writes (disk, offset, data), when the replay has no disks of its own.
    pub disk_writes: Vec<(usize, u64, Vec<u8>)>,
}

/// One output of a replayed VM, in the order it made them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emitted {
    /// Console bytes.
    Console(Vec<u8>),
    /// A frame.
    Frame(Vec<u8>),
}

/// Where a replay's outputs go.
enum Sink {
    /// A whole recorded log: everything is collected for comparison with the run.
    Collect(Arc<Mutex<ReplayOutputs>>),
    /// A streamed log (a lockstep follower): console bytes and frames until taken
    /// ([`ReplayWorld::take_emitted`]); disk writes go to the replay's own disks.
    Follow {
        emitted: Vec<Emitted>,
        disks: Vec<DiskFile>,
    },
}

/// A World that feeds a recorded log to a VM and collects its outputs.
pub struct ReplayWorld {
    events: VecDeque<InputEvent>,
    has_network: bool,
    sink: Sink,
}

impl ReplayWorld {
    /// Replays `log`. `has_network` must match the recorded VM's.
    pub fn new(log: InputLog, has_network: bool) -> Self {
        Self {
            events: log.events.into(),
            has_network,
            sink: Sink::Collect(Default::default()),
        }
    }

    /// Replays a log that streams in ([`ReplayWorld::push`]) onto the replay's own
    /// replica of the recorded VM's disks, in World disk order: writes are made on
    /// them, and reads logged by digest are read from them and checked.
    pub fn following(has_network: bool, disks: Vec<DiskFile>) -> Self {
        Self {
            events: VecDeque::new(),
            has_network,
            sink: Sink::Follow {
                emitted: Vec::new(),
                disks,
            },
        }
    }

    /// Appends events that arrived after the replay began (a streamed log).
    pub fn push(&mut self, events: impl IntoIterator<Item = InputEvent>) {
        self.events.extend(events);
    }

    /// A handle on the collected outputs (empty for a follower).
    pub fn outputs(&self) -> Arc<Mutex<ReplayOutputs>> {
        match &self.sink {
            Sink::Collect(o) => o.clone(),
            Sink::Follow { .. } => Default::default(),
        }
    }

    /// Takes the console bytes and frames emitted since the last call, in order.
    pub fn take_emitted(&mut self) -> Vec<Emitted> {
        match &mut self.sink {
            Sink::Follow { emitted, .. } => std::mem::take(emitted),
            Sink::Collect(_) => Vec::new(),
        }
    }

    /// Events not consumed yet.
    pub fn remaining(&self) -> usize {
        self.events.len()
    }

    /// Collects an output: `collect` for a whole log, `follow` for a streamed one.
    fn output(&mut self, collect: impl FnOnce(&mut ReplayOutputs), follow: Emitted) {
        match &mut self.sink {
            Sink::Collect(o) => {
                if let Ok(mut o) = o.lock() {
                    collect(&mut o);
                }
            }
            Sink::Follow { emitted, .. } => emitted.push(follow),
        }
    }

    fn diverged(exit: u64, what: impl Into<String>) -> WorldError {
        WorldError::Diverged {
            exit,
            what: what.into(),
        }
    }

    /// The replay's own replica of disk `disk` (a follower's).
    fn disk(&self, disk: usize) -> Result<&DiskFile, WorldError> {
        match &self.sink {
            Sink::Follow { disks, .. } => disks.get(disk).ok_or(WorldError::NoDisk(disk)),
            Sink::Collect(_) => Err(WorldError::NoDisk(disk)),
        }
    }

    /// A read logged by digest: read from this replay's own replica and checked.
    fn read_own(
        &mut self,
        disk: usize,
        offset: u64,
        buf: &mut [u8],
        len: u32,
        digest: Option<u64>,
    ) -> Result<(), WorldError> {
        if len as usize != buf.len() {
            return Err(Self::diverged(0, "a disk read of another length"));
        }
        let Some(digest) = digest else {
            return Err(WorldError::Disk {
                disk,
                source: std::io::Error::other("recorded read failure"),
            });
        };
        self.disk(disk)?.read_at(offset, buf).map_err(|e| {
            Self::diverged(
                0,
                format!("the replica of disk {disk} cannot be read at {offset}: {e}"),
            )
        })?;
        if read_digest(buf) != digest {
            return Err(Self::diverged(
                0,
                format!(
                    "disk {disk} at {offset} (+{len}) reads other data than the recorded VM read"
                ),
            ));
        }
        Ok(())
    }

    /// The logged outcome of a write or flush; with own disks, `own` (this replay's
    /// outcome) must match it.
    fn disk_status(
        &mut self,
        disk: usize,
        own: Option<std::io::Result<()>>,
    ) -> Result<(), WorldError> {
        let ok = match self.events.pop_front() {
            Some(InputEvent::DiskStatus { disk: d, ok }) if d == disk => ok,
            other => {
                return Err(Self::diverged(
                    0,
                    format!("expected a write to disk {disk}, log has {other:?}"),
                ))
            }
        };
        match (ok, own) {
            (true, None | Some(Ok(()))) => Ok(()),
            (false, None) => Err(WorldError::Disk {
                disk,
                source: std::io::Error::other("recorded write failure"),
            }),
            (true, Some(Err(e))) => Err(Self::diverged(
                0,
                format!("the replica of disk {disk} failed a write the recorded VM made: {e}"),
            )),
            (false, Some(_)) => Err(Self::diverged(
                0,
                format!("the recorded VM's write to disk {disk} failed; its replica may differ"),
            )),
        }
    }
}

impl World for ReplayWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        self.output(
            |o| o.console.extend_from_slice(bytes),
            Emitted::Console(bytes.to_vec()),
        );
    }

    fn transmit(&mut self, frame: &[u8]) {
        self.output(
            |o| o.packets.push(frame.to_vec()),
            Emitted::Frame(frame.to_vec()),
        );
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
            Some(InputEvent::DiskReadDigest {
                disk: d,
                offset: o,
                len,
                digest,
            }) if d == disk && o == offset => self.read_own(disk, offset, buf, len, digest),
            other => Err(Self::diverged(
                0,
                format!("expected a read of disk {disk} at {offset}, log has {other:?}"),
            )),
        }
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        if let Sink::Collect(o) = &self.sink {
            if let Ok(mut o) = o.lock() {
                o.disk_writes.push((disk, offset, data.to_vec()));
            }
            return self.disk_status(disk, None);
        }
        let own = self.disk(disk)?.write_at(offset, data);
        self.disk_status(disk, Some(own))
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        if let Sink::Collect(_) = self.sink {
            return self.disk_status(disk, None);
        }
        let own = self.disk(disk)?.flush();
        self.disk_status(disk, Some(own))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::live::{LiveWorld, SharedBuffer};
    use crate::world::record::RecordingWorld;

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

    #[test]
    fn a_follower_reads_its_own_replica_checks_the_digest_and_writes_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.img");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let disk = || DiskFile::open(&path, false).unwrap();
        let mut replay = ReplayWorld::following(false, vec![disk()]);
        replay.push([
            InputEvent::DiskReadDigest {
                disk: 0,
                offset: 512,
                len: 512,
                digest: Some(read_digest(&[7u8; 512])),
            },
            InputEvent::DiskStatus { disk: 0, ok: true },
            InputEvent::DiskReadDigest {
                disk: 0,
                offset: 0,
                len: 512,
                digest: Some(read_digest(&[7u8; 512])),
            },
        ]);
        let mut buf = [0u8; 512];
        replay.disk_read(0, 512, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 512]);
        replay.disk_write(0, 0, &[9u8; 512]).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[..512], &[9u8; 512][..]);
        assert!(
            matches!(
                replay.disk_read(0, 0, &mut buf),
                Err(WorldError::Diverged { .. })
            ),
            "the replica now holds other data than the log's digest"
        );
        assert!(
            matches!(
                replay.disk_write(0, 0, &[1u8; 512]),
                Err(WorldError::Diverged { .. })
            ),
            "a write the log does not hold diverges"
        );
        assert!(replay.take_emitted().is_empty());
        replay.console_output(b"x");
        assert_eq!(replay.take_emitted(), vec![Emitted::Console(b"x".to_vec())]);
    }
}
