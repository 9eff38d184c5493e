//! The guest's tap on a host where the guest does not run: held open (so its bridge
//! port already forwards at a takeover) and read by a thread of its own, which keeps
//! the frames addressed to the guest in the inbound window (`replication::inbound`)
//! until the primary's guest is known to have taken them. Stopping the mirror reads
//! what is still queued on the tap and hands the tap back for the guest's live World.
//! The one frame written meanwhile is a takeover's announcement, sent through the
//! mirror as soon as the arbiter has answered, ahead of the guest's start.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ftvm_devices::backend::tap::Tap;

use super::inbound::{InboundWindow, MirrorCounts};

/// Errors of starting a mirror.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The wake-up descriptor.
    #[error("cannot create the tap reader's wake-up descriptor: {0}")]
    EventFd(std::io::Error),
    /// The thread.
    #[error("cannot start the tap reader thread: {0}")]
    Thread(std::io::Error),
    /// The second handle on the tap, for the takeover's announcement.
    #[error("cannot open a second handle on the tap {tap}: {source}")]
    Sender {
        /// The tap.
        tap: String,
        /// Why.
        source: std::io::Error,
    },
}

/// The inbound window, shared by the tap's reader and whoever learns what the
/// primary's guest took.
#[derive(Clone, Default)]
pub struct MirrorWindow(Arc<Mutex<InboundWindow>>);

impl MirrorWindow {
    fn lock(&self) -> MutexGuard<'_, InboundWindow> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The primary's guest took `frame`.
    pub fn taken(&self, frame: &[u8]) {
        self.lock().taken(frame, Instant::now());
    }

    /// What the window has seen.
    pub fn counts(&self) -> MirrorCounts {
        self.lock().counts()
    }

    /// The frames heard that the old primary's guest never took (see
    /// [`InboundWindow::take_untaken`]).
    pub fn take_untaken(&self) -> Vec<Vec<u8>> {
        let mut w = self.lock();
        let untaken = w.take_untaken();
        tracing::info!(
            untaken = untaken.len(),
            counts = ?w.counts(),
            "takeover: frames this host's tap heard that the old primary's guest never took"
        );
        untaken
    }

    /// A full copy was applied (see [`InboundWindow::align`]).
    pub fn align(&self, last_frame: Option<u64>) {
        self.lock().align(last_frame);
    }

    /// Forgets the frames held: a new guest starts.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// A tap being read into an inbound window.
pub struct Mirror {
    wake: OwnedFd,
    thread: Option<JoinHandle<Tap>>,
    window: MirrorWindow,
    /// Writes to the tap the reader thread holds.
    sender: File,
    /// A takeover's announcement left through it.
    announced: bool,
}

/// Whether `frame` is addressed to the guest at `mac` and not sent by it.
fn for_guest(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.len() >= 14
        && frame[6..12] != mac
        && (frame[..6] == mac || !super::inbound::is_unicast(frame))
}

impl Mirror {
    /// Starts reading `tap` for the guest at `mac`.
    pub fn start(mut tap: Tap, mac: [u8; 6]) -> Result<Self, MirrorError> {
        let sender = tap.sender().map_err(|source| MirrorError::Sender {
            tap: tap.name().to_string(),
            source,
        })?;
        // SAFETY: eventfd has no memory preconditions; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(MirrorError::EventFd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        let wake = unsafe { OwnedFd::from_raw_fd(fd) };
        let window = MirrorWindow::default();
        let (w, wake_fd) = (window.clone(), wake.as_raw_fd());
        let thread = std::thread::Builder::new()
            .name("tap-mirror".into())
            .spawn(move || {
                read_until_woken(&mut tap, wake_fd, mac, &w);
                tap
            })
            .map_err(MirrorError::Thread)?;
        Ok(Self {
            wake,
            thread: Some(thread),
            window,
            sender,
            announced: false,
        })
    }

    /// Sends a frame of the VMM's own on the tap now (a takeover's gratuitous ARP).
    pub fn announce(&mut self, frame: &[u8]) -> std::io::Result<()> {
        (&self.sender).write_all(frame)?;
        self.announced = true;
        Ok(())
    }

    /// Whether an announcement left through it.
    pub fn announced(&self) -> bool {
        self.announced
    }

    /// The window it fills.
    pub fn window(&self) -> MirrorWindow {
        self.window.clone()
    }

    /// Stops reading, once what is queued on the tap is in the window; the tap back.
    pub fn stop(mut self) -> Option<Tap> {
        self.wake_reader();
        self.thread.take().and_then(|t| t.join().ok())
    }

    fn wake_reader(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to the eventfd this value owns.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.wake_reader();
            let _ = t.join();
        }
    }
}

/// Reads frames for the guest into `window` until `wake` is written, then once more.
fn read_until_woken(tap: &mut Tap, wake: i32, mac: [u8; 6], window: &MirrorWindow) {
    let mut failing = false;
    loop {
        let mut fds = [
            libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structures for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
        let woken = n > 0 && fds[1].revents != 0;
        if n > 0 && fds[0].revents != 0 || woken {
            match drain(tap, mac, window) {
                Ok(()) => failing = false,
                Err(e) => {
                    if !failing {
                        tracing::warn!("reading the guest's tap {}: {e}", tap.name());
                    }
                    failing = true;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        if woken {
            return;
        }
    }
}

/// Reads every frame queued on the tap.
fn drain(tap: &mut Tap, mac: [u8; 6], window: &MirrorWindow) -> std::io::Result<()> {
    let mut frames = Vec::new();
    while let Some(f) = tap.read_frame()? {
        if for_guest(&f, mac) {
            frames.push(f);
        }
    }
    if !frames.is_empty() {
        let now = Instant::now();
        let mut w = window.lock();
        for f in frames {
            w.heard(f, now);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::for_guest;

    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f
    }

    #[test]
    fn the_mirror_keeps_frames_to_the_guest_and_broadcasts_not_the_guests_own() {
        let other = [0x02, 0, 0, 0, 0, 9];
        assert!(for_guest(&frame(MAC, other), MAC));
        assert!(for_guest(&frame([0xff; 6], other), MAC));
        assert!(for_guest(&frame([0x33, 0x33, 0, 0, 0, 1], other), MAC));
        assert!(!for_guest(&frame([0x02, 0, 0, 0, 0, 7], other), MAC));
        assert!(!for_guest(&frame([0xff; 6], MAC), MAC), "its own broadcast");
        assert!(!for_guest(&[0xff; 10], MAC), "a runt");
    }
}
