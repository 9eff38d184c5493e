//! Ending a vCPU's `KVM_RUN` from another thread at once.
//!
//! A kick sends the vCPU thread a real-time signal. Its handler sets `immediate_exit`
//! in that thread's `kvm_run` area, so a kick that lands just before the thread enters
//! `KVM_RUN` is not lost: the ioctl returns `EINTR` at once instead of running the
//! guest until its next exit. The run loop clears the flag when it sees `EINTR` and
//! asks its World whether to stop (the World knows why it was kicked). The VM must be
//! run and dropped on the thread that armed the kick.

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, Once};

use kvm_bindings::kvm_run;

thread_local! {
    /// This thread's vCPU run area while a kick can reach it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: a const-initialised thread-local and one store.
    let run = KVM_RUN.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping: it is set by
        // `Vm::arm_kick` on this thread and cleared when the VM (and so the mapping)
        // is dropped on this thread.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

fn install_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction is plain old data; zeroed is a valid (empty) value.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_kick as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `sa` is initialised, its mask emptied; the handler is async-signal-safe.
        let r = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut())
        };
        if r != 0 {
            result = Err(std::io::Error::last_os_error());
        }
    });
    result
}

/// Who may be kicked: the vCPU thread, while its VM runs.
type Target = Arc<Mutex<Option<libc::pthread_t>>>;

fn lock(t: &Target) -> MutexGuard<'_, Option<libc::pthread_t>> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

/// Ends the vCPU's current (or next) `KVM_RUN`; usable from any thread.
#[derive(Clone)]
pub struct VcpuKick {
    target: Target,
}

impl std::fmt::Debug for VcpuKick {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuKick").finish_non_exhaustive()
    }
}

impl VcpuKick {
    /// Kicks the vCPU (nothing happens once its thread has disarmed the kick).
    pub fn kick(&self) {
        let target = lock(&self.target);
        if let Some(thread) = *target {
            // SAFETY: the thread is alive while `target` holds it: the VM clears it
            // (under this lock) when dropped, on that thread.
            unsafe { libc::pthread_kill(thread, kick_signal()) };
        }
    }
}

/// Arms kicks for the calling thread's vCPU run area `run`.
pub(crate) fn arm(run: *mut kvm_run) -> std::io::Result<(VcpuKick, Armed)> {
    install_handler()?;
    KVM_RUN.with(|p| p.set(run));
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let target: Target = Arc::new(Mutex::new(Some(me)));
    Ok((
        VcpuKick {
            target: target.clone(),
        },
        Armed { target, run },
    ))
}

/// The VM's side of an armed kick; disarmed when the VM is dropped (on the thread that
/// ran it, as the run area goes away with the VM).
pub(crate) struct Armed {
    target: Target,
    run: *mut kvm_run,
}

// SAFETY: `run` is only compared, never dereferenced, through `Armed`.
unsafe impl Send for Armed {}

impl Drop for Armed {
    fn drop(&mut self) {
        *lock(&self.target) = None;
        KVM_RUN.with(|p| {
            if p.get() == self.run {
                p.set(std::ptr::null_mut());
            }
        });
    }
}
