//! Console input: bytes for the guest's UART read from a host file descriptor (stdin of
//! `ftvm run`), without ever blocking the vCPU loop.
//!
//! The descriptor is polled before each read rather than switched to non-blocking mode:
//! stdin's open file is usually shared with the shell, which must not be left
//! non-blocking.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use super::poll_readable;

/// Errors of the console input.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleInputError {
    /// The descriptor could not be duplicated.
    #[error("cannot use the console input: {0}")]
    Dup(std::io::Error),
    /// Polling or reading failed.
    #[error("console input: {0}")]
    Io(#[from] std::io::Error),
}

/// A source of console input. After end of file it reports nothing more.
#[derive(Debug)]
pub struct ConsoleInput {
    file: File,
    closed: bool,
}

impl ConsoleInput {
    /// Console input from the process's stdin (a duplicate of descriptor 0).
    pub fn stdin() -> Result<Self, ConsoleInputError> {
        use std::os::fd::AsFd;
        let fd = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(ConsoleInputError::Dup)?;
        Ok(Self::from_fd(fd))
    }

    /// Console input from an open descriptor (a pipe, a terminal, a file).
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            file: File::from(fd),
            closed: false,
        }
    }

    /// Whether input may still arrive (end of file not yet seen).
    pub fn is_open(&self) -> bool {
        !self.closed
    }

    /// The descriptor to poll while the guest idles, if input may still arrive.
    pub fn poll_fd(&self) -> Option<RawFd> {
        (!self.closed).then(|| self.file.as_raw_fd())
    }

    /// Up to `max` bytes that are available now, without blocking. End of file closes the
    /// input and returns `None`, as does no data.
    pub fn read_available(&mut self, max: usize) -> Result<Option<Vec<u8>>, ConsoleInputError> {
        if self.closed || max == 0 || !poll_readable(&[self.file.as_raw_fd()], Duration::ZERO)? {
            return Ok(None);
        }
        let mut buf = vec![0u8; max];
        match self.file.read(&mut buf) {
            Ok(0) => {
                self.closed = true;
                Ok(None)
            }
            Ok(n) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pipe() -> (OwnedFd, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe() writes.
        let r = unsafe { libc::pipe(fds.as_mut_ptr()) };
        assert_eq!(r, 0);
        // SAFETY: pipe() returned two new descriptors that nothing else owns.
        unsafe {
            use std::os::fd::FromRawFd;
            (OwnedFd::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        }
    }

    #[test]
    fn reads_what_is_there_in_pieces_and_closes_at_eof() {
        let (r, mut w) = pipe();
        let mut input = ConsoleInput::from_fd(r);
        assert_eq!(input.read_available(16).unwrap(), None, "nothing yet");
        w.write_all(b"hello world\n").unwrap();
        assert_eq!(input.read_available(5).unwrap().unwrap(), b"hello");
        assert_eq!(input.read_available(64).unwrap().unwrap(), b" world\n");
        assert_eq!(input.read_available(0).unwrap(), None, "no room");
        drop(w);
        assert!(input.is_open());
        assert_eq!(input.read_available(8).unwrap(), None);
        assert!(!input.is_open());
        assert_eq!(input.poll_fd(), None);
    }
}
