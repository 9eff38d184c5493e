//! The session behind one lock, shared by the node's driver and the primary's epoch
//! loop (on the vCPU thread).

use super::{Action, Input, RunPermit, Session};

/// The session shared by the node's event loop and the primary's epoch loop: every
/// input goes through its lock, and the epoch loop waits on it for acknowledgements.
pub struct SharedSession {
    session: std::sync::Mutex<Session>,
    changed: std::sync::Condvar,
}

impl SharedSession {
    /// Shares `session`.
    pub fn new(session: Session) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            session: std::sync::Mutex::new(session),
            changed: std::sync::Condvar::new(),
        })
    }

    /// Locks the session (a panicking holder cannot leave it half changed: every
    /// transition completes before it returns).
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Session> {
        self.session.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The session if no other thread holds it (a thread of real-time priority must
    /// not wait for the vCPU thread, which may be descheduled holding it).
    pub fn try_lock(&self) -> Option<std::sync::MutexGuard<'_, Session>> {
        match self.session.try_lock() {
            Ok(s) => Some(s),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// Feeds one input and wakes the epoch loop.
    pub fn on(&self, input: Input) -> Vec<Action> {
        let actions = self.lock().on(input);
        self.changed.notify_all();
        actions
    }

    /// Wakes the epoch loop after a change made through [`SharedSession::lock`].
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Waits until the epoch loop may run epoch `next` (or must stop).
    pub fn wait_permit(&self, next: u64) -> RunPermit {
        let mut s = self.lock();
        loop {
            match s.may_run(next) {
                RunPermit::Wait => {
                    s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
                }
                permit => return permit,
            }
        }
    }
}
