//! A split virtqueue (virtio 1.x §2.7) of up to [`QUEUE_MAX`] entries, whose descriptor
//! table, available (driver) ring and used (device) ring share one static page.
//!
//! The device reads and writes the rings only while the vCPU is stopped at a VM exit, but
//! the accesses are still volatile (the compiler must neither elide nor reorder them
//! across the exit-causing instruction) and separated by fences, as on real hardware.

use core::ptr::addr_of_mut;
use core::sync::atomic::{fence, Ordering};

/// Most entries of a queue (the device may allow fewer: `QueueNumMax`).
pub const QUEUE_MAX: usize = 64;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: the device writes the buffer (otherwise it reads it).
pub const DESC_WRITE: u16 = 2;
/// Available ring flag: the driver does not want used-buffer interrupts.
const AVAIL_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not need notifications.
const USED_NO_NOTIFY: u16 = 1;

/// A descriptor.
#[repr(C)]
struct Desc {
    /// Guest-physical address of the buffer.
    addr: u64,
    /// Length of the buffer.
    len: u32,
    /// `DESC_*` flags.
    flags: u16,
    /// Next descriptor of the chain if `flags & DESC_NEXT`.
    next: u16,
}

/// An element of the used ring.
#[repr(C)]
struct UsedElem {
    /// Head descriptor of the chain the device used.
    id: u32,
    /// Bytes the device wrote into the chain.
    len: u32,
}

/// The used (device) ring; 4-byte aligned.
#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; QUEUE_MAX],
    avail_event: u16,
}

/// The memory of a queue: descriptor table (16-byte aligned), available ring (2-byte
/// aligned) and used ring (4-byte aligned), in one page. All-zero is its initial state.
#[repr(C, align(4096))]
pub struct QueueMem {
    desc: [Desc; QUEUE_MAX],
    avail_flags: u16,
    avail_idx: u16,
    avail_ring: [u16; QUEUE_MAX],
    used_event: u16,
    used: Used,
}
const _: () = assert!(core::mem::size_of::<QueueMem>() == 4096);

/// A split virtqueue: the driver's view.
pub struct Virtq {
    /// The queue's memory (exclusively owned; shared only with the device).
    mem: *mut QueueMem,
    /// Number of entries (a power of two <= QUEUE_MAX).
    size: u16,
    /// The driver's next available-ring index (free-running).
    avail_idx: u16,
    /// The next used-ring index to consume (free-running).
    last_used: u16,
}

impl Virtq {
    /// A queue of [`QUEUE_MAX`] entries in `mem` (which must be all zero), with
    /// used-buffer interrupts suppressed (see [`Virtq::set_interrupts`]).
    pub fn new(mem: &'static mut QueueMem) -> Virtq {
        let mut q = Virtq {
            mem,
            size: QUEUE_MAX as u16,
            avail_idx: 0,
            last_used: 0,
        };
        q.set_interrupts(false);
        q
    }

    /// Shrinks the queue to the largest power of two <= `max` (the device's QueueNumMax).
    /// Only before the queue is set up.
    pub fn shrink(&mut self, max: u32) {
        while u32::from(self.size) > max {
            self.size /= 2;
        }
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        // SAFETY: only addresses are computed; `mem` points to a live QueueMem.
        unsafe {
            (
                addr_of_mut!((*self.mem).desc) as u64,
                addr_of_mut!((*self.mem).avail_flags) as u64,
                addr_of_mut!((*self.mem).used) as u64,
            )
        }
    }

    /// Writes descriptor `index` (< size).
    pub fn set_desc(&mut self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.size && next < self.size);
        let desc = Desc {
            addr,
            len,
            flags,
            next,
        };
        // SAFETY: `index` is in bounds; the device reads descriptors only after they are
        // made available (and only at exits), so the driver may write them.
        unsafe { addr_of_mut!((*self.mem).desc[usize::from(index)]).write_volatile(desc) }
    }

    /// Sets the length of descriptor `index` (< size).
    pub fn set_len(&mut self, index: u16, len: u32) {
        assert!(index < self.size);
        // SAFETY: as in `set_desc`.
        unsafe { addr_of_mut!((*self.mem).desc[usize::from(index)].len).write_volatile(len) }
    }

    /// Makes the chain headed by descriptor `head` available to the device (without
    /// notifying it).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx % self.size);
        // SAFETY: `slot` < size <= QUEUE_MAX; the ring entry is not yet visible to the
        // device (the index is published after the fence).
        unsafe {
            addr_of_mut!((*self.mem).avail_ring[slot]).write_volatile(head);
            fence(Ordering::SeqCst);
            self.avail_idx = self.avail_idx.wrapping_add(1);
            addr_of_mut!((*self.mem).avail_idx).write_volatile(self.avail_idx);
        }
    }

    /// The device's used-ring index.
    fn used_idx(&self) -> u16 {
        // SAFETY: an aligned u16 of the queue memory, written by the device.
        let idx = unsafe { addr_of_mut!((*self.mem).used.idx).read_volatile() };
        fence(Ordering::SeqCst);
        idx
    }

    /// Whether the device has used a chain not yet taken by [`Virtq::pop_used`].
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next used chain: its head descriptor and the bytes the device wrote.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        let slot = usize::from(self.last_used % self.size);
        // SAFETY: `slot` < QUEUE_MAX; the device published this element before the index
        // read (with a fence) in `has_used`.
        let (id, len) = unsafe {
            let elem = addr_of_mut!((*self.mem).used.ring[slot]);
            (
                addr_of_mut!((*elem).id).read_volatile(),
                addr_of_mut!((*elem).len).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        assert!(id < u32::from(self.size), "the device used descriptor {id}");
        Some((id as u16, len))
    }

    /// Chains made available and not yet used by the device.
    pub fn in_flight(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_idx())
    }

    /// Asks the device for used-buffer interrupts (`on`) or to suppress them (a hint the
    /// device may ignore). The drivers suppress them except while idle.
    pub fn set_interrupts(&mut self, on: bool) {
        let flags = if on { 0 } else { AVAIL_NO_INTERRUPT };
        // SAFETY: an aligned u16 of the queue memory, read by the device.
        unsafe { addr_of_mut!((*self.mem).avail_flags).write_volatile(flags) };
        fence(Ordering::SeqCst);
    }

    /// Whether the device asks not to be notified of new available buffers.
    pub fn notify_suppressed(&self) -> bool {
        // SAFETY: an aligned u16 of the queue memory, written by the device.
        let flags = unsafe { addr_of_mut!((*self.mem).used.flags).read_volatile() };
        flags & USED_NO_NOTIFY != 0
    }
}
