//! The exit trace: a running digest over every VM exit since boot (its kind, the RIP at
//! the exit and the data that crossed), so two runs can be compared exit by exit with
//! one number. A snapshot carries the digest reached so far.

use serde::{Deserialize, Serialize};

/// The kind of a VM exit, as recorded in the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitKind {
    /// Port input.
    IoIn = 1,
    /// Port output.
    IoOut = 2,
    /// MMIO read.
    MmioRead = 3,
    /// MMIO write.
    MmioWrite = 4,
    /// An instruction KVM could not emulate, executed by the VMM's fallback
    /// ([`crate::fallback`]); the data are its first bytes.
    Fallback = 5,
}

/// A running xxh3 digest of the exit sequence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitTrace {
    digest: u64,
}

impl ExitTrace {
    /// Continues a trace from a saved digest.
    pub fn from_digest(digest: u64) -> Self {
        Self { digest }
    }

    /// The digest so far.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// Folds one exit into the digest.
    pub fn record(&mut self, kind: ExitKind, rip: u64, addr: u64, data: &[u8]) {
        let mut buf = [0u8; 8 + 1 + 8 + 8 + 1 + 8];
        buf[0..8].copy_from_slice(&self.digest.to_le_bytes());
        buf[8] = kind as u8;
        buf[9..17].copy_from_slice(&rip.to_le_bytes());
        buf[17..25].copy_from_slice(&addr.to_le_bytes());
        let n = data.len().min(8);
        buf[25] = n as u8;
        buf[26..26 + n].copy_from_slice(&data[..n]);
        self.digest = xxhash_rust::xxh3::xxh3_64(&buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_depends_on_every_field_and_on_order() {
        let mut a = ExitTrace::default();
        a.record(ExitKind::IoOut, 0x1000, 0x3f8, b"h");
        a.record(ExitKind::IoIn, 0x1002, 0x604, &[1, 0, 0, 0]);
        let mut b = ExitTrace::default();
        b.record(ExitKind::IoIn, 0x1002, 0x604, &[1, 0, 0, 0]);
        b.record(ExitKind::IoOut, 0x1000, 0x3f8, b"h");
        assert_ne!(a, b);
        for (kind, rip, addr, data) in [
            (ExitKind::IoIn, 0x1000, 0x3f8, &b"h"[..]),
            (ExitKind::IoOut, 0x1001, 0x3f8, b"h"),
            (ExitKind::IoOut, 0x1000, 0x3f9, b"h"),
            (ExitKind::IoOut, 0x1000, 0x3f8, b"i"),
        ] {
            let mut c = ExitTrace::default();
            c.record(kind, rip, addr, data);
            let mut d = ExitTrace::default();
            d.record(ExitKind::IoOut, 0x1000, 0x3f8, b"h");
            assert_ne!(c, d);
        }
        let resumed = ExitTrace::from_digest(a.digest());
        assert_eq!(resumed, a);
    }
}
