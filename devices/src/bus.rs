//! Address-range dispatch: maps port or MMIO ranges to the device that owns them.

use std::collections::BTreeMap;

/// Errors of bus set-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps a device already on the bus")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A range of zero length or one that wraps around the address space.
    #[error("invalid range {base:#x}+{len:#x}")]
    InvalidRange {
        /// Start of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// A set of non-overlapping address ranges, each owned by a device identified by `D`.
#[derive(Debug, Clone)]
pub struct Bus<D: Copy> {
    ranges: BTreeMap<u64, (u64, D)>,
}

impl<D: Copy> Default for Bus<D> {
    fn default() -> Self {
        Self {
            ranges: BTreeMap::new(),
        }
    }
}

impl<D: Copy> Bus<D> {
    /// Adds `[base, base + len)` for `device`.
    pub fn insert(&mut self, base: u64, len: u64, device: D) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_prev = self
            .ranges
            .range(..end)
            .next_back()
            .is_some_and(|(b, (l, _))| b + l > base);
        if overlaps_prev {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// Finds the device owning `addr` and the offset of `addr` inside its range.
    pub fn lookup(&self, addr: u64) -> Option<(D, u64)> {
        let (base, (len, device)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < *len).then_some((*device, offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_owner_and_offset() {
        let mut bus = Bus::default();
        bus.insert(0x3f8, 8, 's').unwrap();
        bus.insert(0x600, 0x40, 'p').unwrap();
        assert_eq!(bus.lookup(0x3f8), Some(('s', 0)));
        assert_eq!(bus.lookup(0x3ff), Some(('s', 7)));
        assert_eq!(bus.lookup(0x400), None);
        assert_eq!(bus.lookup(0x63f), Some(('p', 0x3f)));
        assert_eq!(bus.lookup(0x640), None);
        assert_eq!(bus.lookup(0), None);
    }

    #[test]
    fn overlapping_and_empty_ranges_are_rejected() {
        let mut bus = Bus::default();
        bus.insert(0x100, 0x10, 1).unwrap();
        assert!(bus.insert(0x10f, 1, 2).is_err());
        assert!(bus.insert(0xf8, 0x9, 2).is_err());
        assert!(bus.insert(0xf8, 0x8, 2).is_ok());
        assert!(bus.insert(0x200, 0, 2).is_err());
        assert!(bus.insert(u64::MAX, 2, 2).is_err());
    }
}
