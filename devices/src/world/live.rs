//! The live World: console to a host writer and from a host descriptor, packets to and
//! from a tap, disks on image files, and idling against the host clock.

use std::io::Write;
use std::time::{Duration, Instant};

use super::{IdleRequest, Wake, World, WorldError};
use std::os::fd::AsRawFd;

use crate::backend::console_in::{ConsoleInput, ConsoleInputError};
use crate::backend::disk::DiskFile;
use crate::backend::poll_readable;
use crate::backend::tap::Tap;

/// Longest single host wait while a guest idles (keeps the loop responsive).
const MAX_IDLE_SLICE: Duration = Duration::from_millis(100);

/// Shortest host time between two polls of console input while the guest runs (a poll
/// is a system call; typing needs no faster service).
const CONSOLE_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// How the live World lets an idle guest wait for its timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IdlePacing {
    /// Wait until host time since boot reaches the virtual deadline.
    #[default]
    Sleep,
    /// Resume at the deadline at once (a waiting packet still wins).
    Skip,
}

/// The World of a standalone VM.
pub struct LiveWorld<W: Write + Send> {
    console: W,
    console_failed: bool,
    disks: Vec<DiskFile>,
    tap: Option<Tap>,
    console_in: Option<ConsoleInput>,
    /// When console input was last polled; it is polled at most every
    /// [`CONSOLE_POLL_INTERVAL`] while the guest runs, and at once after it woke for it.
    console_polled: Option<Instant>,
    pacing: IdlePacing,
    /// Host instant corresponding to virtual time zero.
    epoch: Instant,
}

impl<W: Write + Send> LiveWorld<W> {
    /// A World writing console output to `console`, with no disk and no network.
    pub fn new(console: W) -> Self {
        Self {
            console,
            console_failed: false,
            disks: Vec::new(),
            tap: None,
            console_in: None,
            console_polled: None,
            pacing: IdlePacing::Sleep,
            epoch: Instant::now(),
        }
    }

    /// Adds a disk; its index is the order of addition.
    pub fn with_disk(mut self, disk: DiskFile) -> Self {
        self.disks.push(disk);
        self
    }

    /// Attaches a tap.
    pub fn with_tap(mut self, tap: Tap) -> Self {
        self.tap = Some(tap);
        self
    }

    /// Takes console input for the guest's UART from `input`.
    pub fn with_console_input(mut self, input: ConsoleInput) -> Self {
        self.console_in = Some(input);
        self
    }

    /// Sets the idle pacing.
    pub fn with_pacing(mut self, pacing: IdlePacing) -> Self {
        self.pacing = pacing;
        self
    }

    fn disk(&mut self, disk: usize) -> Result<&mut DiskFile, WorldError> {
        self.disks.get_mut(disk).ok_or(WorldError::NoDisk(disk))
    }

    fn host_now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos().min(u64::MAX as u128) as u64
    }
}

impl<W: Write + Send> World for LiveWorld<W> {
    fn console_output(&mut self, bytes: &[u8]) {
        if self.console_failed {
            return;
        }
        if let Err(e) = self.console.write_all(bytes) {
            // A closed stdout must not stop the guest; report once and drop output.
            tracing::warn!("console output dropped: {e}");
            self.console_failed = true;
        }
    }

    fn transmit(&mut self, frame: &[u8]) {
        if let Some(tap) = &mut self.tap {
            if let Err(e) = tap.write_frame(frame) {
                // A full or downed tap drops the frame, as a wire would.
                tracing::debug!("tap transmit dropped a frame: {e}");
            }
        }
    }

    fn receive(&mut self, _exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        match &mut self.tap {
            Some(tap) => tap.read_frame().map_err(|source| WorldError::Tap {
                name: tap.name().to_string(),
                source,
            }),
            None => Ok(None),
        }
    }

    fn has_network(&self) -> bool {
        self.tap.is_some()
    }

    fn input_fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        let tap = self.tap.as_ref().map(|t| t.as_raw_fd());
        let console = self.console_in.as_ref().and_then(|c| c.poll_fd());
        tap.into_iter().chain(console).collect()
    }

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        self.disk(disk)?
            .read_at(offset, buf)
            .map_err(|source| WorldError::Disk { disk, source })
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        self.disk(disk)?
            .write_at(offset, data)
            .map_err(|source| WorldError::Disk { disk, source })
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        self.disk(disk)?
            .flush()
            .map_err(|source| WorldError::Disk { disk, source })
    }

    fn console_input(&mut self, _exit: u64, max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        let Some(input) = &mut self.console_in else {
            return Ok(None);
        };
        if !input.is_open()
            || self
                .console_polled
                .is_some_and(|t| t.elapsed() < CONSOLE_POLL_INTERVAL)
        {
            return Ok(None);
        }
        self.console_polled = Some(Instant::now());
        Ok(input.read_available(max)?)
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        let (now_ns, deadline_ns) = (request.now_ns, request.deadline_ns);
        // What can wake the guest besides its timer: the tap, and console input while the
        // UART has room for it.
        let mut wakers = Vec::with_capacity(2);
        if let Some(tap) = &self.tap {
            wakers.push(tap.as_raw_fd());
        }
        if request.console_room {
            if let Some(fd) = self.console_in.as_ref().and_then(ConsoleInput::poll_fd) {
                wakers.push(fd);
            }
        }
        if deadline_ns.is_none() && wakers.is_empty() && request.give_up_at.is_none() {
            return Err(WorldError::IdleForever);
        }
        loop {
            let host = self.host_now_ns();
            let wait = match (deadline_ns, self.pacing) {
                (Some(d), IdlePacing::Sleep) => Some(Duration::from_nanos(d.saturating_sub(host))),
                (Some(_), IdlePacing::Skip) => Some(Duration::ZERO),
                (None, _) => None,
            };
            if wait == Some(Duration::ZERO) {
                if let Some(d) = deadline_ns {
                    // Deadline reached (or skipped to); waiting input is seen at the next
                    // exit anyway.
                    return Ok(Wake {
                        at_ns: now_ns.max(d),
                    });
                }
            }
            let mut slice = wait.unwrap_or(MAX_IDLE_SLICE).min(MAX_IDLE_SLICE);
            if let Some(limit) = request.give_up_at {
                let left = limit.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    // The owner wants the VM back: a spurious wake-up, at no later a
                    // virtual time than the guest's deadline.
                    let at = match deadline_ns {
                        Some(d) => self.host_now_ns().clamp(now_ns, d.max(now_ns)),
                        None => self.host_now_ns().max(now_ns),
                    };
                    return Ok(Wake { at_ns: at });
                }
                slice = slice.min(left);
            }
            if wakers.is_empty() {
                std::thread::sleep(slice);
                continue;
            }
            let ready = poll_readable(&wakers, slice).map_err(|source| match &self.tap {
                Some(tap) => WorldError::Tap {
                    name: tap.name().to_string(),
                    source,
                },
                None => WorldError::ConsoleInput(ConsoleInputError::Io(source)),
            })?;
            if ready {
                // Whatever woke the guest is taken at its next exit.
                self.console_polled = None;
                let host = self.host_now_ns();
                let at = match deadline_ns {
                    Some(d) => host.clamp(now_ns, d.max(now_ns)),
                    None => host.max(now_ns),
                };
                return Ok(Wake { at_ns: at });
            }
        }
    }

    fn set_virtual_now(&mut self, now_ns: u64) {
        self.epoch = Instant::now()
            .checked_sub(Duration::from_nanos(now_ns))
            .unwrap_or_else(Instant::now);
    }

    fn flush(&mut self) {
        if !self.console_failed {
            let _ = self.console.flush();
        }
    }
}

/// A cloneable in-memory writer: give one clone to a [`LiveWorld`], read the other
/// (tests and benchmarks collect console output this way).
#[derive(Debug, Default, Clone)]
pub struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut b) => {
                b.extend_from_slice(buf);
                Ok(buf.len())
            }
            Err(_) => Err(std::io::Error::other("console buffer poisoned")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(now_ns: u64, deadline_ns: Option<u64>) -> IdleRequest {
        IdleRequest {
            exit: 1,
            now_ns,
            deadline_ns,
            console_room: true,
            give_up_at: None,
        }
    }

    #[test]
    fn live_world_forwards_console_bytes() {
        let buf = SharedBuffer::default();
        let mut world = LiveWorld::new(buf.clone());
        world.console_output(b"hello ");
        world.console_output(b"world");
        world.flush();
        assert_eq!(buf.contents(), b"hello world");
    }

    #[test]
    fn idle_without_timer_or_network_is_an_error() {
        let mut world = LiveWorld::new(SharedBuffer::default());
        assert!(matches!(
            world.idle(&request(0, None)),
            Err(WorldError::IdleForever)
        ));
        let wake = world.idle(&request(5, Some(1_000))).unwrap();
        assert_eq!(wake.at_ns, 1_000);
    }

    #[test]
    fn skip_pacing_resumes_at_the_deadline_at_once() {
        let mut world = LiveWorld::new(SharedBuffer::default()).with_pacing(IdlePacing::Skip);
        let t = Instant::now();
        let wake = world.idle(&request(0, Some(10_000_000_000))).unwrap();
        assert_eq!(wake.at_ns, 10_000_000_000);
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn disks_go_through_the_world() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let disk = DiskFile::open(&path, false).unwrap();
        let mut world = LiveWorld::new(SharedBuffer::default()).with_disk(disk);
        world.disk_write(0, 512, b"abc").unwrap();
        world.disk_flush(0).unwrap();
        let mut buf = [0u8; 3];
        world.disk_read(0, 512, &mut buf).unwrap();
        assert_eq!(&buf, b"abc");
        assert!(matches!(
            world.disk_read(1, 0, &mut buf),
            Err(WorldError::NoDisk(1))
        ));
    }
}
