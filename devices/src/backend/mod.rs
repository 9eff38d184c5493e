//! Host backends of the redirected devices: disk image files, tap interfaces and console
//! input. Only the live World touches them.

pub mod console_in;
pub mod disk;
pub mod tap;

use std::os::fd::RawFd;
use std::time::Duration;

/// Waits up to `timeout` for any of `fds` to be readable (or at end of file, or in
/// error, which a read then reports). An interrupted wait counts as "not yet".
pub fn poll_readable(fds: &[RawFd], timeout: Duration) -> std::io::Result<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds for the duration of the call.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r >= 0 {
        return Ok(r > 0);
    }
    let e = std::io::Error::last_os_error();
    if e.kind() == std::io::ErrorKind::Interrupted {
        Ok(false)
    } else {
        Err(e)
    }
}
