//! Real-time scheduling for the threads that decide liveness: the node's event loop and
//! the links' runtime (readers, writers, heartbeats). On a busy host a thread of normal
//! priority can wait tens of milliseconds for a core; these threads must not, or a
//! short heartbeat timeout fires without a failure (docs/PERFORMANCE.md, "False
//! failovers"). They sleep when there is nothing to do, so they take a core only for
//! work the pair needs; the guest's vCPU and the bulk encoder stay at normal priority.
//! A raised thread passes nothing on: the threads it starts (the event loop starts the
//! vCPU and follower threads) begin at normal priority (`SCHED_RESET_ON_FORK`).

/// The SCHED_RR priority used (1 to 99; low, so the kernel's own real-time threads keep
/// theirs).
pub const PRIORITY: i32 = 10;

/// Errors of raising a thread's priority.
#[derive(Debug, thiserror::Error)]
pub enum PriorityError {
    /// The kernel refused (no CAP_SYS_NICE, or a container's limit).
    #[error("cannot run at real-time priority (SCHED_RR {PRIORITY}): {0}")]
    Refused(std::io::Error),
}

/// Makes the calling thread SCHED_RR at [`PRIORITY`]; the threads it starts afterwards
/// run at normal priority.
pub fn raise_current_thread() -> Result<(), PriorityError> {
    let param = libc::sched_param {
        sched_priority: PRIORITY,
    };
    // SAFETY: pid 0 names the calling thread; `param` lives for the call.
    let r =
        unsafe { libc::sched_setscheduler(0, libc::SCHED_RR | libc::SCHED_RESET_ON_FORK, &param) };
    if r != 0 {
        return Err(PriorityError::Refused(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The calling thread's scheduling policy (`libc::SCHED_*`, without the
/// `SCHED_RESET_ON_FORK` flag); -1 if it cannot be read.
pub fn current_policy() -> i32 {
    // SAFETY: pid 0 names the calling thread; no memory is passed.
    let policy = unsafe { libc::sched_getscheduler(0) };
    if policy < 0 {
        return -1;
    }
    policy & !libc::SCHED_RESET_ON_FORK
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_thread_runs_round_robin_or_the_refusal_says_why() {
        std::thread::spawn(|| {
            assert_eq!(current_policy(), libc::SCHED_OTHER);
            match raise_current_thread() {
                Ok(()) => {
                    assert_eq!(current_policy(), libc::SCHED_RR);
                    // What it starts does not inherit the priority: a vCPU thread that
                    // did would keep the host's other threads from its cores.
                    let child = std::thread::spawn(current_policy).join().expect("child");
                    assert_eq!(child, libc::SCHED_OTHER);
                }
                Err(PriorityError::Refused(e)) => {
                    // Only a process without the privilege is refused.
                    // SAFETY: geteuid has no preconditions.
                    assert_ne!(unsafe { libc::geteuid() }, 0, "refused as root: {e}");
                    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
                    assert_eq!(current_policy(), libc::SCHED_OTHER);
                }
            }
        })
        .join()
        .expect("thread");
    }
}
