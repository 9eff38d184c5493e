//! Guest memory: allocation, registration with KVM (with dirty logging), the merged
//! dirty-page view, and the whole-memory hash.

use ftvm_devices::GuestMem;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use crate::layout::{self, PAGE_SIZE};

/// Errors of guest memory handling.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is out of the accepted range.
    #[error("guest memory of {0} MiB is out of range ({min}..={max} MiB)", min = layout::MIN_MEM_MIB, max = layout::MAX_MEM_MIB)]
    Size(u64),
    /// The host could not allocate the memory.
    #[error("cannot allocate {mib} MiB of guest memory: {source}")]
    Allocate {
        /// Requested size.
        mib: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("KVM refused memory slot {slot}: {source}")]
    Slot {
        /// Slot number.
        slot: u32,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// KVM could not report the dirty log.
    #[error("KVM_GET_DIRTY_LOG failed for slot {slot}: {source}")]
    DirtyLog {
        /// Slot number.
        slot: u32,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// A host address for a region could not be obtained.
    #[error("guest memory region at {0:#x} has no host mapping")]
    HostAddress(u64),
}

/// Allocates guest memory of `mem_mib` MiB with a VMM-write dirty bitmap.
pub fn allocate(mem_mib: u64) -> Result<GuestMem, MemoryError> {
    if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&mem_mib) {
        return Err(MemoryError::Size(mem_mib));
    }
    GuestMem::from_ranges(&layout::ram_regions(mem_mib << 20)).map_err(|source| {
        MemoryError::Allocate {
            mib: mem_mib,
            source,
        }
    })
}

/// Registers every region of `mem` with KVM as slots 0.., with dirty logging on.
pub fn register(vm: &VmFd, mem: &GuestMem) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryError::HostAddress(region.start_addr().0))?;
        let kvm_region = kvm_userspace_memory_region {
            slot,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live anonymous mapping of `memory_size` bytes owned by
        // `mem`, which the VM keeps alive for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(kvm_region) }
            .map_err(|source| MemoryError::Slot { slot, source })?;
    }
    Ok(())
}

/// A set of guest pages, as one bitmap per RAM region.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PageSet {
    regions: Vec<RegionPages>,
}

/// The pages of one region.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RegionPages {
    base: u64,
    pages: u64,
    bits: Vec<u64>,
}

impl PageSet {
    /// An empty set shaped like `mem`.
    pub fn empty_for(mem: &GuestMem) -> Self {
        Self {
            regions: mem
                .iter()
                .map(|r| {
                    let pages = r.len().div_ceil(PAGE_SIZE);
                    RegionPages {
                        base: r.start_addr().0,
                        pages,
                        bits: vec![0; pages.div_ceil(64) as usize],
                    }
                })
                .collect(),
        }
    }

    /// ORs a bitmap of region `index` into the set (extra bits are ignored).
    fn merge(&mut self, index: usize, bits: &[u64]) {
        if let Some(r) = self.regions.get_mut(index) {
            for (a, b) in r.bits.iter_mut().zip(bits) {
                *a |= *b;
            }
        }
    }

    /// ORs `other` (of the same shape) into the set.
    pub fn union_with(&mut self, other: &PageSet) {
        for (i, r) in other.regions.iter().enumerate() {
            self.merge(i, &r.bits);
        }
    }

    /// Adds the page containing `gpa` (no-op outside RAM).
    pub fn insert(&mut self, gpa: u64) {
        for r in &mut self.regions {
            if gpa >= r.base && (gpa - r.base) / PAGE_SIZE < r.pages {
                let p = (gpa - r.base) / PAGE_SIZE;
                r.bits[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
    }

    /// Whether the page containing `gpa` is in the set.
    pub fn contains(&self, gpa: u64) -> bool {
        self.regions.iter().any(|r| {
            gpa >= r.base && {
                let p = (gpa - r.base) / PAGE_SIZE;
                p < r.pages && r.bits[(p / 64) as usize] & (1 << (p % 64)) != 0
            }
        })
    }

    /// Number of pages in the set.
    pub fn len(&self) -> usize {
        self.regions
            .iter()
            .map(|r| {
                r.bits
                    .iter()
                    .map(|w| w.count_ones() as usize)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Guest-physical addresses of the pages in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.regions.iter().flat_map(|r| {
            r.bits.iter().enumerate().flat_map(move |(w, &word)| {
                (0..64u64)
                    .filter(move |b| word & (1 << b) != 0)
                    .map(move |b| r.base + (w as u64 * 64 + b) * PAGE_SIZE)
            })
        })
    }

    /// Runs of consecutive pages as (first gpa, page count), ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for gpa in self.iter() {
            match runs.last_mut() {
                Some((start, n)) if *start + *n * PAGE_SIZE == gpa => *n += 1,
                _ => runs.push((gpa, 1)),
            }
        }
        runs
    }
}

/// Collects the pages dirtied since the previous call: KVM's log (guest writes) merged
/// with the VMM's own bitmap (loader and device writes). Both sources are reset.
pub fn collect_dirty(vm: &VmFd, mem: &GuestMem) -> Result<PageSet, MemoryError> {
    let mut set = PageSet::empty_for(mem);
    for (i, region) in mem.iter().enumerate() {
        let slot = i as u32;
        let kvm_bits = vm
            .get_dirty_log(slot, region.len() as usize)
            .map_err(|source| MemoryError::DirtyLog { slot, source })?;
        set.merge(i, &kvm_bits);
        let vmm_bits = region.get_mmap().bitmap().get_and_reset();
        set.merge(i, &vmm_bits);
    }
    Ok(set)
}

/// A region's bytes as a slice.
///
/// Callers must hold the VM stopped (no vCPU in KVM_RUN) while they use the slice.
pub(crate) fn region_bytes(
    region: &vm_memory::GuestRegionMmap<vm_memory::bitmap::AtomicBitmap>,
) -> Result<&[u8], MemoryError> {
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|_| MemoryError::HostAddress(region.start_addr().0))?;
    // SAFETY: `host` is the start of a live mapping of `region.len()` bytes owned by the
    // region, which outlives the returned borrow. The vCPU is stopped (caller contract),
    // so no one writes the memory while the slice is read.
    Ok(unsafe { std::slice::from_raw_parts(host, region.len() as usize) })
}

/// A 64-bit xxh3 hash of all guest memory, region by region.
pub fn hash(mem: &GuestMem) -> Result<u64, MemoryError> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for region in mem.iter() {
        h.update(&region.start_addr().0.to_le_bytes());
        h.update(region_bytes(region)?);
    }
    Ok(h.digest())
}

/// A digest of a window of guest RAM, for comparing two VMs that should hold the same
/// memory (a lockstep pair): `pages` pages from RAM page `start` (pages of all regions
/// counted in order), wrapping at the end of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemorySample {
    /// The first RAM page.
    pub start: u64,
    /// Pages in the window.
    pub pages: u64,
    /// xxh3 of the window with the accessed and dirty bits masked (see [`sample`]).
    pub digest: u64,
}

/// Samples `pages` pages of RAM from RAM page `start` (wrapping); returns the sample and
/// the page after it. Bits 5 and 6 of every 64-bit word are left out: they are the
/// accessed and dirty bits of a page-table entry, which the processor's page walker
/// sets — the accessed bit possibly speculatively — so two executions of the same guest
/// may differ there alone. Everything else in the window counts.
pub fn sample(mem: &GuestMem, start: u64, pages: u64) -> Result<(MemorySample, u64), MemoryError> {
    const AD_BITS: u64 = (1 << 5) | (1 << 6);
    let regions: Vec<&[u8]> = mem.iter().map(region_bytes).collect::<Result<_, _>>()?;
    let total: u64 = regions.iter().map(|r| r.len() as u64 / PAGE_SIZE).sum();
    if total == 0 {
        return Ok((
            MemorySample {
                start: 0,
                pages: 0,
                digest: 0,
            },
            0,
        ));
    }
    let pages = pages.min(total);
    let start = start % total;
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    let mut masked = vec![0u8; PAGE_SIZE as usize];
    for i in 0..pages {
        let mut page = (start + i) % total;
        let bytes = regions
            .iter()
            .find_map(|r| {
                let n = r.len() as u64 / PAGE_SIZE;
                if page < n {
                    let at = (page * PAGE_SIZE) as usize;
                    Some(&r[at..at + PAGE_SIZE as usize])
                } else {
                    page -= n;
                    None
                }
            })
            .unwrap_or(&[]);
        for (out, word) in masked.chunks_exact_mut(8).zip(bytes.chunks_exact(8)) {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            out.copy_from_slice(&(u64::from_le_bytes(w) & !AD_BITS).to_le_bytes());
        }
        h.update(&masked);
    }
    let next = (start + pages) % total;
    Ok((
        MemorySample {
            start,
            pages,
            digest: h.digest(),
        },
        next,
    ))
}

/// The guest-physical address range of RAM that contains `gpa`, if any.
pub fn in_ram(mem: &GuestMem, gpa: u64, len: u64) -> bool {
    mem.check_range(GuestAddress(gpa), len as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_insert_iter_and_runs() {
        let mem = allocate(16).unwrap();
        let mut s = PageSet::empty_for(&mem);
        for gpa in [0x3000, 0x4000, 0x5fff, 0x10_0000, 0xff_f000] {
            s.insert(gpa);
        }
        s.insert(16 << 20); // outside RAM: ignored
        assert_eq!(s.len(), 5);
        assert!(s.contains(0x5000));
        assert!(!s.contains(0x6000));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            vec![0x3000, 0x4000, 0x5000, 0x10_0000, 0xff_f000]
        );
        assert_eq!(s.runs(), vec![(0x3000, 3), (0x10_0000, 1), (0xff_f000, 1)]);
    }

    #[test]
    fn sizes_out_of_range_are_rejected() {
        assert!(matches!(allocate(1), Err(MemoryError::Size(1))));
        assert!(matches!(
            allocate(layout::MAX_MEM_MIB + 1),
            Err(MemoryError::Size(_))
        ));
    }

    #[test]
    fn a_memory_sample_sees_data_but_not_page_table_access_bits_and_wraps() {
        use vm_memory::Bytes;
        let mem = allocate(8).unwrap();
        let (s0, next) = sample(&mem, 3, 2).unwrap();
        assert_eq!((s0.start, s0.pages, next), (3, 2, 5));
        mem.write_obj(1u64 << 5 | 1 << 6, GuestAddress(3 * PAGE_SIZE + 64))
            .unwrap();
        assert_eq!(
            sample(&mem, 3, 2).unwrap().0,
            s0,
            "accessed and dirty bits left out"
        );
        mem.write_obj(1u64 << 7, GuestAddress(4 * PAGE_SIZE + 8))
            .unwrap();
        assert_ne!(sample(&mem, 3, 2).unwrap().0.digest, s0.digest);
        assert_eq!(
            sample(&mem, 5, 2).unwrap().0.digest,
            {
                let m = allocate(8).unwrap();
                sample(&m, 5, 2).unwrap().0.digest
            },
            "outside the changed pages"
        );
        let total = 8 << 20 >> 12;
        let (wrapped, next) = sample(&mem, total - 1, 2).unwrap();
        assert_eq!(
            (wrapped.start, next),
            (total - 1, 1),
            "wraps at the end of RAM"
        );
    }

    #[test]
    fn hash_changes_with_content() {
        use vm_memory::Bytes;
        let mem = allocate(8).unwrap();
        let h0 = hash(&mem).unwrap();
        mem.write_obj(1u8, GuestAddress(0x1234)).unwrap();
        assert_ne!(hash(&mem).unwrap(), h0);
    }
}
