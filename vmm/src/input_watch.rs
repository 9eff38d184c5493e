//! Asynchronous input delivery, for guests that idle inside KVM.
//!
//! The deterministic policy ([`crate::vm`]) delivers frames and console input only at
//! VM exits. A guest such as Linux halts inside KVM (HLT with an in-kernel irqchip) and
//! runs its own LAPIC timer, so it may make no exit for as long as nothing happens: a
//! frame would wait forever. With asynchronous delivery an [`InputWatcher`] thread
//! polls the World's input descriptors (the tap, console input) and kicks the vCPU out
//! of `KVM_RUN` when one is readable; the run loop then moves the input into the devices
//! and injects their interrupts, which wake the halted vCPU.
//!
//! After a kick the watcher waits until the run loop has serviced the inputs. If that
//! moved nothing (the guest has no receive buffer free), it does not kick again before
//! the loop services inputs at a later exit or [`RETRY_AFTER`] has passed, so a full
//! receive ring does not become a storm of kicks.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::kick::VcpuKick;

/// When frames and console input reach a guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputDelivery {
    /// Only at VM exits: runs are deterministic (recordable, replayable, lockstep).
    #[default]
    AtExits,
    /// As they arrive, kicking the vCPU out of KVM: for guests that idle inside KVM,
    /// such as Linux.
    Async,
}

impl InputDelivery {
    /// Its name in configurations.
    pub fn name(self) -> &'static str {
        match self {
            Self::AtExits => "at-exits",
            Self::Async => "async",
        }
    }

    /// The default for a guest: asynchronous for a kernel of the user's, at exits for
    /// the built-in test guest.
    pub fn default_for(own_kernel: bool) -> Self {
        if own_kernel {
            Self::Async
        } else {
            Self::AtExits
        }
    }
}

/// How long the watcher waits before kicking again when the last service moved nothing.
pub const RETRY_AFTER: Duration = Duration::from_millis(20);

#[derive(Debug, Default)]
struct Serviced {
    /// Services since the watcher started.
    count: u64,
    /// Whether the last one moved any input into a device.
    progress: bool,
    /// The watcher must end.
    stop: bool,
}

type Shared = Arc<(Mutex<Serviced>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, Serviced> {
    shared.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// A thread that kicks the vCPU when the World has input. Stopped and joined on drop.
#[derive(Debug)]
pub struct InputWatcher {
    shared: Shared,
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<()>>,
}

impl InputWatcher {
    /// Starts watching `fds`, kicking `kick` when one is readable.
    pub fn start(fds: Vec<RawFd>, kick: VcpuKick) -> std::io::Result<Self> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let shared: Shared = Arc::default();
        let thread = {
            let (stop, shared) = (stop.clone(), shared.clone());
            std::thread::Builder::new()
                .name("ftvm-inputs".into())
                .spawn(move || watch(&fds, &stop, &shared, &kick))?
        };
        Ok(Self {
            shared,
            stop,
            thread: Some(thread),
        })
    }

    /// The run loop serviced the inputs (at an exit or after a kick); `progress`: it
    /// moved some input into a device.
    pub fn serviced(&self, progress: bool) {
        let mut s = lock(&self.shared);
        s.count += 1;
        s.progress = progress;
        self.shared.1.notify_all();
    }
}

impl Drop for InputWatcher {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.1.notify_all();
        if let Err(e) = self.stop.write(1) {
            tracing::warn!("cannot stop the input watcher: {e}");
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("the input watcher panicked");
            }
        }
    }
}

/// Waits until one of `fds` or `stop` is readable; false when `stop` is (or polling
/// failed, which is logged).
fn wait_readable(fds: &[RawFd], stop: &EventFd) -> bool {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .chain(std::iter::once(&stop.as_raw_fd()))
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!("the input watcher cannot poll: {e}");
            return false;
        }
        let stop_ready = pfds.last().is_some_and(|p| p.revents != 0);
        return !stop_ready;
    }
}

fn watch(fds: &[RawFd], stop: &EventFd, shared: &Shared, kick: &VcpuKick) {
    loop {
        if !wait_readable(fds, stop) {
            return;
        }
        let before = lock(shared).count;
        kick.kick();
        // Wait for the loop to service the inputs the kick was for.
        let mut s = lock(shared);
        while s.count == before && !s.stop {
            s = shared
                .1
                .wait_timeout(s, RETRY_AFTER)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            if s.count == before {
                // The kick may have landed while the vCPU was outside KVM_RUN and been
                // consumed by a run that serviced nothing new; kick again.
                kick.kick();
            }
        }
        if s.stop {
            return;
        }
        if !s.progress {
            // Nothing moved: the guest has no room. Wait for a later service (an exit,
            // e.g. the guest refilling its receive queue) or a while.
            let seen = s.count;
            let (g, _) = shared
                .1
                .wait_timeout_while(s, RETRY_AFTER, |s| s.count == seen && !s.stop)
                .unwrap_or_else(|e| e.into_inner());
            if g.stop {
                return;
            }
        }
    }
}
