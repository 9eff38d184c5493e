//! The messages two CoServers exchange (docs/protocol.md), encoded with bincode inside
//! link frames.

use bincode::Options;
use ftvm_vmm::cpu_template::CpuTemplate;
use ftvm_vmm::PageBatch;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; a peer with another is refused.
pub const PROTOCOL_VERSION: u32 = crate::link::handshake::LINK_VERSION as u32;

/// Largest message encoded or decoded (sent in chunks).
const MAX_MESSAGE: u64 = crate::link::frame::MAX_MESSAGE as u64;

/// How the pair replicates the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReplicationMode {
    /// Epochs of execution, each ended by a checkpoint the secondary acknowledges.
    #[default]
    Checkpoint,
    /// Both CoServers execute the guest: the secondary replays the primary's input log.
    Lockstep,
}

impl ReplicationMode {
    /// Its name in configurations and status.
    pub fn name(self) -> &'static str {
        match self {
            ReplicationMode::Checkpoint => "checkpoint",
            ReplicationMode::Lockstep => "lockstep",
        }
    }
}

/// What both CoServers of a pair must agree on about the guest; a peer whose shape
/// differs is refused (a copy between them could never complete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestShape {
    /// Guest memory (MiB).
    pub mem_mib: u64,
    /// Size of each disk replica (bytes).
    pub disk_bytes: Vec<u64>,
    /// The replication mode.
    pub mode: ReplicationMode,
    /// The CPU template the guest boots with.
    pub cpu_template: CpuTemplate,
}

impl GuestShape {
    /// What differs between this node's shape and the peer's, in words; `None` if they
    /// match.
    pub fn mismatch(&self, peer: &GuestShape) -> Option<String> {
        if self.mem_mib != peer.mem_mib {
            return Some(format!(
                "guest memory differs: peer guest.mem_mib = {}, this node {}",
                peer.mem_mib, self.mem_mib
            ));
        }
        if self.disk_bytes != peer.disk_bytes {
            return Some(format!(
                "disk replicas differ: peer has {:?} bytes, this node {:?} (host.disk must be the same size on both hosts)",
                peer.disk_bytes, self.disk_bytes
            ));
        }
        if self.mode != peer.mode {
            return Some(format!(
                "replication modes differ: peer replication.mode = {}, this node {}",
                peer.mode.name(),
                self.mode.name()
            ));
        }
        if self.cpu_template != peer.cpu_template {
            return Some(format!(
                "CPU templates differ: peer guest.cpu_template = {}, this node {}",
                peer.cpu_template, self.cpu_template
            ));
        }
        None
    }
}

/// A CoServer's role as its peer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Starting: looking for a peer.
    Starting,
    /// Running the guest.
    Primary,
    /// Holding a replica (or receiving the first copy).
    Secondary,
    /// Stopped after losing the arbiter.
    Fenced,
}

impl Role {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Primary => "primary",
            Role::Secondary => "secondary",
            Role::Fenced => "fenced",
        }
    }
}

/// Why a disk replica does not hold the pair's data whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Incomplete {
    /// A full copy from the primary was under way.
    Copying,
    /// The replica was following the primary's stream: after a crash its disk is some
    /// checkpoint behind the primary's, and its memory is gone.
    Applying,
    /// The peer won a later generation: the guest ran on after this replica.
    Superseded,
    /// The operator took this host out of the pair (`ftvm ctl leave`); the guest runs on
    /// elsewhere.
    Left,
}

impl Incomplete {
    /// In words, for status and alerts.
    pub fn describe(self) -> &'static str {
        match self {
            Incomplete::Copying => "copying: a copy was under way",
            Incomplete::Applying => {
                "applying: it follows (or followed) the primary's stream; after a crash of this host it is copied again"
            }
            Incomplete::Superseded => "superseded: the guest ran on elsewhere after it",
            Incomplete::Left => "left: the operator took this host out of the pair (ftvm ctl leave)",
        }
    }
}

/// What a disk replica holds of the pair's data: recorded durably in the state
/// directory, advertised in hellos and heartbeats, and compared before any node boots
/// the guest from its own disk. `data` is the identity of the pair's data, created once
/// when an operator designates the first replica (`--initial-primary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Standing {
    /// No pair data: never designated and never copied.
    Blank,
    /// Part of the pair's data, not usable alone (never a copy source, never booted).
    Incomplete {
        /// The data.
        data: u64,
        /// Why.
        reason: Incomplete,
    },
    /// The whole data, consistent with the end of `epoch` of `generation`: a pair that
    /// ended cleanly, or (advertised only) a secondary's ready replica.
    Whole {
        /// The data.
        data: u64,
        /// The arbiter generation.
        generation: u64,
        /// The stream position.
        epoch: u64,
    },
    /// The guest runs (or ran, until this host stopped) on this disk in `generation`.
    Live {
        /// The data.
        data: u64,
        /// The arbiter generation.
        generation: u64,
    },
}

impl Standing {
    /// The data's identity, unless blank.
    pub fn data(&self) -> Option<u64> {
        match *self {
            Standing::Blank => None,
            Standing::Incomplete { data, .. }
            | Standing::Whole { data, .. }
            | Standing::Live { data, .. } => Some(data),
        }
    }

    /// Where a whole replica stands, to compare two of the same data (later is newer):
    /// (generation, live, epoch). `None` unless whole or live.
    pub fn position(&self) -> Option<(u64, bool, u64)> {
        match *self {
            Standing::Whole {
                generation, epoch, ..
            } => Some((generation, false, epoch)),
            Standing::Live { generation, .. } => Some((generation, true, 0)),
            _ => None,
        }
    }

    /// In words, for status and alerts.
    pub fn describe(&self) -> String {
        match *self {
            Standing::Blank => "no pair data".into(),
            Standing::Incomplete { data, reason } => {
                format!("incomplete data {data:016x} ({})", reason.describe())
            }
            Standing::Whole {
                data,
                generation,
                epoch,
            } => format!("whole data {data:016x} at generation {generation}, epoch {epoch}"),
            Standing::Live { data, generation } => {
                format!("data {data:016x} the guest ran on in generation {generation}")
            }
        }
    }
}

/// One output of the guest, held until its epoch is acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    /// Console bytes.
    Console(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A transmitted frame.
    Frame(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// One disk write of an epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskWrite {
    /// Byte offset.
    pub offset: u64,
    /// The data.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A range of the disk (bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DiskRange {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DiskRange {
    /// `ranges` sorted, with overlapping and adjacent ranges merged.
    pub fn merged(mut ranges: Vec<DiskRange>) -> Vec<DiskRange> {
        ranges.retain(|r| r.len > 0);
        ranges.sort_unstable();
        let mut out: Vec<DiskRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match out.last_mut() {
                Some(last) if r.offset <= last.offset.saturating_add(last.len) => {
                    let end = last
                        .offset
                        .saturating_add(last.len)
                        .max(r.offset.saturating_add(r.len));
                    last.len = end - last.offset;
                }
                _ => out.push(r),
            }
        }
        out
    }

    /// Total bytes of `ranges`.
    pub fn total(ranges: &[DiskRange]) -> u64 {
        ranges.iter().map(|r| r.len).sum()
    }
}

/// The end of an epoch in checkpoint mode: everything the secondary needs to be where
/// the primary was at that position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSegment {
    /// Whether this completes a full copy (the secondary may take over after it).
    pub full: bool,
    /// vCPU, VM-level and device state.
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    /// Pages written during the epoch (or still unsent from the copy).
    pub pages: PageBatch,
    /// Disk writes of the epoch, in order.
    pub disk_writes: Vec<DiskWrite>,
    /// Where the guest flushed its disk in the epoch: after the first `n` of
    /// `disk_writes`, for each `n` (in order). Writes before a flush are made durable on
    /// the replica before any write after it.
    pub flushes: Vec<u32>,
    /// For a `full` checkpoint: the copy it completes (0 otherwise).
    pub copy: u64,
    /// For a `full` checkpoint: how many copy messages preceded it.
    pub copy_messages: u64,
    /// The epoch's outputs: a new primary releases those the old one may not have.
    pub outputs: Vec<Output>,
    /// For a `full` checkpoint: the digest (xxh3) of the last frame the guest took
    /// before it, if any: the secondary's window of what its tap heard starts after it.
    pub last_frame: Option<u64>,
}

/// Where a guest stands after an exit: how a lockstep secondary checks that it retraces
/// the primary's guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitPoint {
    /// Exits since boot.
    pub exit: u64,
    /// The exit-trace digest there.
    pub exit_trace: u64,
    /// The output digest there.
    pub output_digest: u64,
}

/// A slice of the primary's input log in lockstep mode: the events its guest took since
/// the previous position, through exit `end.exit`, in the format `ftvm run --record`
/// writes (disk reads by digest: the secondary reads its own replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogSegment {
    /// Where the primary's guest stood at the end of the slice.
    pub end: ExitPoint,
    /// A window of the primary's guest memory at the end of the slice (every
    /// `replication.verify_memory_ms`), for the secondary to compare with its own.
    pub memory: Option<ftvm_vmm::MemorySample>,
    /// The events, in the order the guest took them.
    pub events: Vec<ftvm_devices::world::record::InputEvent>,
}

/// What a position of the replication stream carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Segment {
    /// A checkpoint (checkpoint mode, and the end of every copy).
    Checkpoint(CheckpointSegment),
    /// A slice of the input log (lockstep mode).
    Log(LogSegment),
}

/// A message between CoServers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on every connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u32,
        /// Sender's node name.
        node: String,
        /// The sender process's session (random per process): sequenced messages are
        /// de-duplicated per session, and a new one means the peer restarted.
        session: u64,
        /// Sender's role.
        role: Role,
        /// Highest arbiter generation the sender knows.
        generation: u64,
        /// What the sender's disk replica holds.
        standing: Standing,
        /// The identity of the arbiter directory the sender has used, if any.
        arbiter: Option<u64>,
        /// The guest as the sender's configuration describes it.
        guest: GuestShape,
    },
    /// The sender refuses this peer (and closes the connection).
    Refuse {
        /// Why.
        reason: String,
    },
    /// Heartbeat on one link; answered by [`Message::Pong`] on the same link.
    Ping {
        /// Sender's clock (µs) for the round trip.
        sent_us: u64,
        /// Sender's role.
        role: Role,
        /// Highest arbiter generation the sender knows.
        generation: u64,
        /// What the sender's disk replica holds.
        standing: Standing,
    },
    /// Answer to a ping.
    Pong {
        /// The ping's `sent_us`.
        sent_us: u64,
    },
    /// A secondary asks the primary for a full copy.
    Join,
    /// A full copy begins: everything the secondary held is superseded. `copy`
    /// identifies it (the primary's epoch when it began), so a late message of an
    /// earlier copy is never taken for part of this one.
    CopyStart {
        /// The copy's identifier.
        copy: u64,
    },
    /// Part of the full copy: guest pages (sent while the guest runs). `index` counts
    /// the copy's messages from 0, so the secondary detects a gap or reordering.
    SyncPages {
        /// The copy this belongs to.
        copy: u64,
        /// Position in the copy.
        index: u64,
        /// The pages.
        pages: PageBatch,
    },
    /// The secondary has applied the first `applied` messages of copy `copy`: the
    /// primary paces the copy by it.
    CopyApplied {
        /// The copy.
        copy: u64,
        /// Copy messages applied.
        applied: u64,
    },
    /// Part of the full copy: a range of the disk, or a write the guest made meanwhile.
    SyncDisk {
        /// The copy this belongs to.
        copy: u64,
        /// Position in the copy.
        index: u64,
        /// The data.
        write: DiskWrite,
    },
    /// What the stream carries at `position` (in checkpoint mode: the end of epoch
    /// `position`). Both replication modes use this one message; they differ in the
    /// kind of segment.
    Segment {
        /// The stream position.
        position: u64,
        /// The segment.
        segment: Segment,
    },
    /// The primary released the outputs of every position up to `position`.
    Released {
        /// Stream position.
        position: u64,
    },
    /// The secondary holds the segment at `position` whole, on top of copy `copy`.
    Ack {
        /// Stream position.
        position: u64,
        /// The full copy the secondary's replica descends from.
        copy: u64,
    },
    /// A lockstep secondary's guest has executed the log through `position`, where it
    /// stands at `exit` (the primary bounds the lag by it).
    Executed {
        /// Stream position.
        position: u64,
        /// Exits since boot there.
        exit: u64,
    },
    /// A lockstep secondary's guest diverged in the slice at `position`: it needs a
    /// copy of memory and of the disk ranges written since that slice, by its guest
    /// (`written`, in that slice) or by the primary's.
    Diverged {
        /// The slice in which it diverged (every earlier one was checked equal).
        position: u64,
        /// What differed.
        reason: String,
        /// Disk ranges the diverged guest wrote in that slice.
        written: Vec<DiskRange>,
    },
    /// The secondary cannot follow (a gap in epochs); it needs a new full copy.
    Resync {
        /// Why.
        reason: String,
    },
    /// A frame the primary's guest received before `position` (forwarded at once while
    /// protected). A new primary re-delivers those after the position it resumes from,
    /// so requests that reached only the dead primary are not lost.
    Inbound {
        /// The position (epoch) in which the guest received it.
        position: u64,
        /// The frame.
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// The guest powered off (after the checkpoint of its last epoch): the pair ends.
    Stopped {
        /// The guest's exit code.
        exit_code: u32,
    },
    /// The secondary leaves the pair on the operator's word (`ftvm ctl leave`): its
    /// replica is recorded incomplete, so it takes nothing over; the primary runs on
    /// degraded without asking the arbiter.
    Leave,
    /// A node that handed the guest over (`Handover`) joins the new primary: its memory
    /// and disk hold the guest as it was at `position`, where the new primary resumed
    /// it, so it asks only for what changed since (a full copy if the primary cannot
    /// tell).
    Rejoin {
        /// The position its guest stopped at.
        position: u64,
    },
    /// Switchover (`ftvm ctl switchover`): the primary's guest stopped at the end of
    /// `position`, which the secondary acknowledged, and every output up to it was
    /// released. The secondary takes the guest over from there.
    Handover {
        /// The last stream position the old primary's guest ran.
        position: u64,
    },
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_MESSAGE)
}

/// Errors of decoding a message.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message: {0}")]
pub struct DecodeError(#[from] bincode::Error);

/// A message too large to send (beyond [`crate::link::frame::MAX_MESSAGE`]).
#[derive(Debug, thiserror::Error)]
#[error("{kind} message cannot be encoded: {source}")]
pub struct EncodeError {
    /// The message's kind.
    pub kind: &'static str,
    /// Cause (the size limit).
    pub source: bincode::Error,
}

impl Message {
    /// Encodes the message; one beyond the size limit is an error, never emptied.
    pub fn encode(&self) -> Result<Vec<u8>, EncodeError> {
        codec().serialize(self).map_err(|source| EncodeError {
            kind: self.kind(),
            source,
        })
    }

    /// Decodes a message; garbage is an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        Ok(codec().deserialize(bytes)?)
    }

    /// A short name for logs and counters.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Refuse { .. } => "refuse",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Join => "join",
            Message::CopyStart { .. } => "copy-start",
            Message::SyncPages { .. } => "sync-pages",
            Message::SyncDisk { .. } => "sync-disk",
            Message::CopyApplied { .. } => "copy-applied",
            Message::Segment { .. } => "segment",
            Message::Ack { .. } => "ack",
            Message::Resync { .. } => "resync",
            Message::Stopped { .. } => "stopped",
            Message::Inbound { .. } => "inbound",
            Message::Released { .. } => "released",
            Message::Executed { .. } => "executed",
            Message::Diverged { .. } => "diverged",
            Message::Leave => "leave",
            Message::Handover { .. } => "handover",
            Message::Rejoin { .. } => "rejoin",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_shapes_that_differ_say_in_what() {
        let a = GuestShape {
            mem_mib: 64,
            disk_bytes: vec![1 << 20],
            mode: ReplicationMode::Checkpoint,
            cpu_template: CpuTemplate::Host,
        };
        assert_eq!(a.mismatch(&a.clone()), None);
        let cases = [
            (
                GuestShape {
                    mem_mib: 128,
                    ..a.clone()
                },
                "guest.mem_mib = 128",
            ),
            (
                GuestShape {
                    disk_bytes: vec![],
                    ..a.clone()
                },
                "host.disk",
            ),
            (
                GuestShape {
                    mode: ReplicationMode::Lockstep,
                    ..a.clone()
                },
                "replication.mode = lockstep",
            ),
            (
                GuestShape {
                    cpu_template: CpuTemplate::EmulatedKernel,
                    ..a.clone()
                },
                "guest.cpu_template = emulated-kernel, this node host",
            ),
        ];
        for (peer, needle) in cases {
            let what = a.mismatch(&peer).expect("differs");
            assert!(what.contains(needle), "{what}");
        }
    }

    #[test]
    fn disk_ranges_merge_where_they_overlap_or_touch() {
        let r = |offset, len| DiskRange { offset, len };
        assert_eq!(
            DiskRange::merged(vec![
                r(4096, 512),
                r(0, 512),
                r(512, 512),
                r(4000, 200),
                r(9000, 0)
            ]),
            vec![r(0, 1024), r(4000, 608)]
        );
        assert_eq!(DiskRange::total(&[r(0, 1024), r(4000, 608)]), 1632);
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let m = Message::Segment {
            position: 9,
            segment: Segment::Checkpoint(CheckpointSegment {
                full: true,
                state: vec![1, 2, 3],
                pages: PageBatch {
                    gpas: vec![0x1000],
                    data: vec![5; 4096],
                },
                disk_writes: vec![DiskWrite {
                    offset: 512,
                    data: vec![7; 512],
                }],
                flushes: vec![0, 1],
                copy: 7,
                copy_messages: 3,
                outputs: vec![Output::Console(b"hi".to_vec())],
                last_frame: Some(0x1234_5678_9abc_def0),
            }),
        };
        assert_eq!(Message::decode(&m.encode().unwrap()).unwrap(), m);
        assert!(Message::decode(&[0xff; 3]).is_err());
        assert!(Message::decode(&[]).is_err());
        // A huge length prefix is refused, not allocated.
        let mut huge = vec![1, 0, 0, 0];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Message::decode(&huge).is_err());
    }
}
