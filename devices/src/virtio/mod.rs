//! Virtio devices on the virtio-mmio transport (virtio 1.x, modern register layout):
//! the transport's register file and queues, and the block and network device models.

pub mod blk;
pub mod net;
mod transport;

pub use transport::{VirtioMmio, VirtioState};

/// Errors of the transport.
pub mod transport_error {
    pub use super::transport::QueueStateError;
}

/// Guest-physical address of the first virtio-mmio device.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of each device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// GSI of the first device; device *i* uses `GSI_BASE + i`.
pub const GSI_BASE: u32 = 5;

/// VIRTIO_F_VERSION_1.
pub const F_VERSION_1: u64 = 1 << 32;

/// The kernel command-line token that announces device `index` the way Linux expects.
pub fn cmdline_token(index: usize) -> String {
    format!(
        "virtio_mmio.device=4K@{:#x}:{}",
        MMIO_BASE + index as u64 * MMIO_SIZE,
        GSI_BASE + index as u32
    )
}

/// Which device model sits behind a transport, and how it is configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DeviceConfig {
    /// A block device on World disk `disk`.
    Block {
        /// World disk index.
        disk: usize,
        /// Capacity in 512-byte sectors.
        capacity_sectors: u64,
        /// Whether the guest may not write.
        read_only: bool,
    },
    /// A network device.
    Net {
        /// The guest's MAC address.
        mac: [u8; 6],
    },
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod token_tests {
    #[test]
    fn cmdline_tokens_follow_the_linux_format() {
        assert_eq!(
            super::cmdline_token(0),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
        assert_eq!(
            super::cmdline_token(1),
            "virtio_mmio.device=4K@0xd0001000:6"
        );
    }
}
