//! Virtio drivers over the virtio-mmio transport (virtio 1.x, split virtqueues), all run at
//! CPL3: the MMIO window is mapped user-accessible, and guest-physical addresses equal
//! virtual ones, so a buffer's address is its pointer.
//!
//! - [`mmio`]: the transport (probe, feature negotiation, queue set-up, notify, interrupt
//!   acknowledgement);
//! - [`queue`]: a split virtqueue in one static page;
//! - [`blk`]: a synchronous virtio-blk driver;
//! - [`net`]: a virtio-net driver that is a `smoltcp` device.
//!
//! Every register access is a VM exit (~30 µs on the development hosts), so the drivers
//! avoid them on hot paths: they never read InterruptStatus, acknowledge interrupts only
//! before going idle and only when one was taken, suppress used-buffer interrupts except
//! while idle, and batch notifications.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod queue;

use crate::cmdline::VirtioMmio;
use mmio::Transport;

/// Device ID of a network device.
pub const DEVICE_NET: u32 = 1;
/// Device ID of a block device.
pub const DEVICE_BLK: u32 = 2;

/// Returns the transport of the first of `devices` with device ID `id`, if any.
pub fn find(devices: &[VirtioMmio], id: u32) -> Option<Transport> {
    devices
        .iter()
        .filter_map(Transport::probe)
        .find(|t| t.device_id() == id)
}

/// Returns a `&'static mut $t`, zeroed, backed by a static in the `.noinit` section (not
/// cleared by the emulated CPL0 start-up code; zeroed here at CPL3 instead). Each
/// expansion is its own static and may be evaluated only once (a second evaluation
/// panics). `$t` must be a type for which all-zero bytes are a valid value.
macro_rules! noinit_zeroed {
    ($t:ty) => {{
        #[link_section = ".bss.ftvm_noinit"]
        static mut STORAGE: core::mem::MaybeUninit<$t> = core::mem::MaybeUninit::uninit();
        static TAKEN: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
        assert!(
            !TAKEN.swap(true, core::sync::atomic::Ordering::Relaxed),
            "a noinit static was taken twice"
        );
        // SAFETY: the storage is taken only once (checked above), so the returned
        // reference is unique; it is zeroed before the reference is formed, and all-zero
        // bytes are a valid `$t` (the macro's contract).
        unsafe {
            let ptr = core::ptr::addr_of_mut!(STORAGE).cast::<$t>();
            ptr.write_bytes(0, 1);
            &mut *ptr
        }
    }};
}
pub(crate) use noinit_zeroed;
