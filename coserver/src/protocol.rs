//! The messages two CoServers exchange (docs/protocol.md), encoded with bincode inside
//! link frames.

use bincode::Options;
use ftvm_vmm::PageBatch;
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks; a peer with another is refused.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest message decoded (matches the frame limit).
const MAX_MESSAGE: u64 = crate::link::frame::MAX_PAYLOAD as u64;

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

/// A message between CoServers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message on every connection.
    Hello {
        /// [`PROTOCOL_VERSION`] of the sender.
        version: u32,
        /// Sender's node name.
        node: String,
        /// Sender's role.
        role: Role,
        /// Highest arbiter generation the sender knows.
        generation: u64,
        /// Guest memory of the sender's configuration.
        mem_mib: u64,
        /// Size of the sender's disk replica, if any.
        disk_bytes: Option<u64>,
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
    /// Part of the full copy: a range of the disk, or a write the guest made meanwhile.
    SyncDisk {
        /// The copy this belongs to.
        copy: u64,
        /// Position in the copy.
        index: u64,
        /// The data.
        write: DiskWrite,
    },
    /// The end of an epoch. `full` marks the checkpoint that completes a full copy.
    Checkpoint {
        /// Epoch number.
        epoch: u64,
        /// Whether this completes a full copy (the secondary may take over after it).
        full: bool,
        /// vCPU, VM-level and device state.
        #[serde(with = "serde_bytes")]
        state: Vec<u8>,
        /// Pages written during the epoch (or still unsent from the copy).
        pages: PageBatch,
        /// Disk writes of the epoch, in order.
        disk_writes: Vec<DiskWrite>,
        /// Whether the guest flushed its disk during the epoch.
        flush: bool,
        /// For a `full` checkpoint: the copy it completes (0 otherwise).
        copy: u64,
        /// For a `full` checkpoint: how many copy messages preceded it.
        copy_messages: u64,
        /// The epoch's outputs: a new primary releases those the old one may not have.
        outputs: Vec<Output>,
    },
    /// The primary released the outputs of every epoch up to `epoch`.
    Released {
        /// Epoch number.
        epoch: u64,
    },
    /// The secondary holds checkpoint `epoch` completely.
    Ack {
        /// Epoch number.
        epoch: u64,
    },
    /// The secondary cannot follow (a gap in epochs); it needs a new full copy.
    Resync {
        /// Why.
        reason: String,
    },
    /// A frame the primary's guest received during `epoch` (forwarded at once while
    /// protected). A new primary re-delivers those of epochs after the checkpoint it
    /// resumes from, so requests that reached only the dead primary are not lost.
    Inbound {
        /// The epoch in which the guest received it.
        epoch: u64,
        /// The frame.
        #[serde(with = "serde_bytes")]
        frame: Vec<u8>,
    },
    /// The guest powered off (after the checkpoint of its last epoch): the pair ends.
    Stopped {
        /// The guest's exit code.
        exit_code: u32,
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

impl Message {
    /// Encodes the message.
    pub fn encode(&self) -> Vec<u8> {
        // Encoding plain data with a limit above any message we build cannot fail.
        codec().serialize(self).unwrap_or_default()
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
            Message::Checkpoint { .. } => "checkpoint",
            Message::Ack { .. } => "ack",
            Message::Resync { .. } => "resync",
            Message::Stopped { .. } => "stopped",
            Message::Inbound { .. } => "inbound",
            Message::Released { .. } => "released",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let m = Message::Checkpoint {
            epoch: 9,
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
            flush: true,
            copy: 7,
            copy_messages: 3,
            outputs: vec![Output::Console(b"hi".to_vec())],
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        assert!(Message::decode(&[0xff; 3]).is_err());
        assert!(Message::decode(&[]).is_err());
        // A huge length prefix is refused, not allocated.
        let mut huge = vec![1, 0, 0, 0];
        huge.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(Message::decode(&huge).is_err());
    }
}
