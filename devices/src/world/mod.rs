//! The World seam: the one interface through which everything crosses between the guest
//! and the outside world.
//!
//! Inbound: packets received, console input, disk read data, and the virtual time at
//! which an idle guest wakes. Outbound: console bytes, packets sent, disk writes and flushes. A
//! standalone VM uses the [`live::LiveWorld`]; [`record::RecordingWorld`] wraps a live
//! World and writes every inbound event to an input log; [`replay::ReplayWorld`] feeds
//! such a log to a second VM, which then retraces the first exactly. Virtual time at
//! exits and entropy are deterministic functions of the VM state and need no log.

pub mod live;
pub mod record;
pub mod replay;

pub use live::{LiveWorld, SharedBuffer};

/// Errors of World operations.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// A disk backend failed.
    #[error("disk {disk}: {source}")]
    Disk {
        /// Disk index.
        disk: usize,
        /// Cause.
        source: std::io::Error,
    },
    /// The disk does not exist in this World.
    #[error("no disk {0}")]
    NoDisk(usize),
    /// The tap failed.
    #[error("tap {name}: {source}")]
    Tap {
        /// Interface name.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Console input failed.
    #[error(transparent)]
    ConsoleInput(#[from] crate::backend::console_in::ConsoleInputError),
    /// A replayed run asked for something the log does not hold at this point.
    #[error("replay diverged at exit {exit}: {what}")]
    Diverged {
        /// Exit number.
        exit: u64,
        /// What was expected or found.
        what: String,
    },
    /// The guest idles and nothing can ever wake it.
    #[error("guest waits for an event but has no timer armed and no device can wake it")]
    IdleForever,
}

/// What the VM knows when its guest idles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleRequest {
    /// Exit number of the guest's wait.
    pub exit: u64,
    /// Virtual time now (ns).
    pub now_ns: u64,
    /// The guest's armed timer, if any (ns).
    pub deadline_ns: Option<u64>,
    /// Whether the UART can take console input (so input may wake the guest).
    pub console_room: bool,
    /// Host instant by which the World should resume the guest even if nothing is due
    /// (the end of a replication epoch); the guest sees a spurious wake-up and waits
    /// again. Live Worlds honour it; a replay follows its log.
    pub give_up_at: Option<std::time::Instant>,
}

/// Why an idle guest is resumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wake {
    /// Virtual time (ns) at which the guest resumes.
    pub at_ns: u64,
}

/// Where the guest's inputs come from and its outputs go.
pub trait World: Send {
    /// Console bytes the guest wrote to its UART.
    fn console_output(&mut self, bytes: &[u8]);

    /// A frame the guest transmitted (without the virtio-net header).
    fn transmit(&mut self, _frame: &[u8]) {}

    /// Takes the next received frame, if one is waiting, at exit `exit`. Called only
    /// when the guest has a receive buffer for it.
    fn receive(&mut self, _exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        Ok(None)
    }

    /// Takes up to `max` bytes of console input for the guest's UART, if some are
    /// waiting, at exit `exit`. Called only when the UART has room for them.
    fn console_input(&mut self, _exit: u64, _max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        Ok(None)
    }

    /// Descriptors that become readable when input (a frame, console bytes) is waiting,
    /// for asynchronous delivery to a guest that idles inside KVM (`ftvm_vmm`'s
    /// input watcher). Empty for Worlds whose inputs come only at exits.
    fn input_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }

    /// Whether this World can deliver packets (an idle guest may wait for one).
    fn has_network(&self) -> bool {
        false
    }

    /// Reads disk `disk` at `offset` into `buf`.
    fn disk_read(&mut self, disk: usize, _offset: u64, _buf: &mut [u8]) -> Result<(), WorldError> {
        Err(WorldError::NoDisk(disk))
    }

    /// Writes `data` to disk `disk` at `offset`.
    fn disk_write(&mut self, disk: usize, _offset: u64, _data: &[u8]) -> Result<(), WorldError> {
        Err(WorldError::NoDisk(disk))
    }

    /// Makes disk `disk`'s writes durable.
    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        Err(WorldError::NoDisk(disk))
    }

    /// The guest idles (see [`IdleRequest`]). Returns when it should resume: at its timer
    /// deadline, or earlier if a packet or console input arrived. Errors if nothing can
    /// ever wake it.
    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError>;

    /// Tells the World the VM's virtual time after a restore (a live World aligns its
    /// host clock with it so idle pacing continues where it was).
    fn set_virtual_now(&mut self, _now_ns: u64) {}

    /// Called when the VM stops or is snapshotted: flush buffered output.
    fn flush(&mut self) {}

    /// Asked after every exit: whether the VM should return to its owner now (the end
    /// of a replication epoch). The guest is between two exits then, ready to capture.
    fn pause_requested(&mut self) -> bool {
        false
    }
}
