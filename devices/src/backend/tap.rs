//! A tap interface opened by name. Frames are exchanged without a vnet header: the
//! virtio-net device negotiates no offloads, so there is nothing for one to carry, and
//! the device adds and strips the guest-side header itself.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Largest frame read from the tap (an Ethernet frame with a VLAN tag fits easily).
pub const MAX_FRAME: usize = 65_562;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error("invalid tap name {0:?} (1-15 bytes, no '/' or whitespace)")]
    BadName(String),
    /// No interface of that name exists in this network namespace.
    #[error("tap {0} does not exist (create it first, e.g. `ip tuntap add dev {0} mode tap`)")]
    Missing(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    Tun(std::io::Error),
    /// The interface exists but cannot be attached as a tap.
    #[error("cannot attach to tap {name}: {source} (is it a tap device, and not in use?)")]
    Attach {
        /// Interface name.
        name: String,
        /// Cause.
        source: std::io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An attached tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    buf: Vec<u8>,
}

impl Tap {
    /// Attaches to the existing tap `name` in the caller's network namespace.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\t', '\n', '\0']) {
            return Err(TapError::BadName(name.to_string()));
        }
        let cname =
            std::ffi::CString::new(name).map_err(|_| TapError::BadName(name.to_string()))?;
        // SAFETY: `cname` is a valid NUL-terminated string for the duration of the call.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::Tun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `IfReq` mirrors
        // (16-byte name, flags, padding to 40 bytes); `req` outlives the call.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
        if r < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
            buf: vec![0; MAX_FRAME],
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame if one is waiting.
    pub fn read_frame(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        match self.file.read(&mut self.buf) {
            Ok(n) => Ok(Some(self.buf[..n].to_vec())),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A second handle on the tap for sending frames from another thread (output
    /// commit releases held frames there).
    pub fn sender(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Sends one frame.
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.file.write(frame).map(|_| ())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_and_missing_names_are_clear_errors() {
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
        assert!(matches!(Tap::open("a/b"), Err(TapError::BadName(_))));
        assert!(matches!(
            Tap::open("sixteen-chars-xx"),
            Err(TapError::BadName(_))
        ));
        let e = Tap::open("ftvmnosuch0").unwrap_err();
        assert!(matches!(e, TapError::Missing(_)), "{e}");
        assert!(e.to_string().contains("does not exist"));
    }
}
