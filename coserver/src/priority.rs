//! Real-time scheduling for the threads that decide liveness: the node's event loop and
//! the links' runtime (readers, writers, heartbeats). On a busy host a thread of normal
//! priority can wait tens of milliseconds for a core; these threads must not, or a
//! short heartbeat timeout fires without a failure (docs/PERFORMANCE.md, "False
//! failovers"). They sleep when there is nothing to do, so they take a core only for
//! work the pair needs; the guest's vCPU and the bulk encoder stay at normal priority.

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

/// Makes the calling thread SCHED_RR at [`PRIORITY`].
pub fn raise_current_thread() -> Result<(), PriorityError> {
    let param = libc::sched_param {
        sched_priority: PRIORITY,
    };
    // SAFETY: pthread_self names the calling thread; `param` lives for the call.
    let r = unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_RR, &param) };
    if r != 0 {
        return Err(PriorityError::Refused(std::io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

/// The calling thread's scheduling policy (`libc::SCHED_*`).
pub fn current_policy() -> i32 {
    let mut policy = 0;
    // SAFETY: all zeroes is a valid sched_param.
    let mut param: libc::sched_param = unsafe { std::mem::zeroed() };
    // SAFETY: pthread_self names the calling thread; both outputs live for the call.
    let r = unsafe { libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut param) };
    if r != 0 {
        return -1;
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raised_thread_runs_round_robin_or_the_refusal_says_why() {
        std::thread::spawn(|| {
            assert_eq!(current_policy(), libc::SCHED_OTHER);
            match raise_current_thread() {
                Ok(()) => assert_eq!(current_policy(), libc::SCHED_RR),
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
