//! Guest-visible device models of ftvm.
//!
//! This crate owns what the guest can see of its devices — register models and their
//! saveable state — and nothing of KVM or replication. Everything that crosses between
//! the guest and the outside world passes the [`world::World`] seam.

pub mod backend;
pub mod bus;
pub mod clock;
pub mod manager;
pub mod platform;
pub mod serial;
pub mod virtio;
pub mod world;

/// Guest memory as every device and the VMM see it: anonymous mmap regions with a
/// dirty bitmap that records the pages written through this API (device DMA, loaders).
pub type GuestMem = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
