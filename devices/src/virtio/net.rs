//! virtio-net: frames from the guest's transmit queue go to the World; frames from the
//! World go into the guest's receive buffers, at exit boundaries only.

use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::world::World;
use crate::GuestMem;

/// VIRTIO_NET_F_MAC.
pub const F_MAC: u64 = 1 << 5;
/// Size of `virtio_net_hdr_v1`.
pub const HDR_LEN: usize = 12;
/// Largest frame accepted from the guest (64 KiB plus an Ethernet header and tag).
pub const MAX_TX_FRAME: usize = 65_562;
/// Smallest frame worth sending (an Ethernet header).
const MIN_FRAME: usize = 14;

/// A network device model.
#[derive(Debug)]
pub struct Net {
    mac: [u8; 6],
}

impl Net {
    /// Receive and transmit queues of 256 entries.
    pub const QUEUE_SIZES: &'static [u16] = &[256, 256];
    /// Index of the receive queue.
    pub const RX_QUEUE: usize = 0;
    /// Index of the transmit queue.
    pub const TX_QUEUE: usize = 1;

    /// A device with MAC `mac`.
    pub fn new(mac: [u8; 6]) -> Self {
        Self { mac }
    }

    /// Offered feature bits (besides VERSION_1): only the MAC; no offloads.
    pub fn features(&self) -> u64 {
        F_MAC
    }

    /// Reads the config space: the MAC.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| self.mac.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Sends every frame the guest queued; returns whether any buffer was used.
    pub fn transmit(&mut self, queue: &mut Queue, mem: &GuestMem, world: &mut dyn World) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            if let Some(frame) = read_frame(&descs, mem) {
                world.transmit(&frame);
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            used = true;
        }
        used
    }

    /// Whether the guest has posted a receive buffer.
    pub fn has_buffer(queue: &Queue, mem: &GuestMem) -> bool {
        queue
            .avail_idx(mem, Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    /// Writes `frame` behind a zeroed header into the next receive buffer; returns
    /// whether a buffer was used. A buffer too small for the frame is returned empty.
    pub fn receive(&mut self, queue: &mut Queue, frame: &[u8], mem: &GuestMem) -> bool {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return false;
        };
        let head = chain.head_index();
        let descs: Vec<Descriptor> = chain.collect();
        let len = write_frame(&descs, frame, mem).unwrap_or(0);
        queue.add_used(mem, head, len).is_ok()
    }
}

/// Gathers a transmit chain; `None` for a malformed one (device-writable parts,
/// outside memory, too short or too long).
fn read_frame(descs: &[Descriptor], mem: &GuestMem) -> Option<Vec<u8>> {
    if descs.iter().any(|d| d.is_write_only()) || descs.last().is_some_and(|d| d.has_next()) {
        return None;
    }
    let total: usize = descs.iter().map(|d| d.len() as usize).sum();
    if !(HDR_LEN + MIN_FRAME..=HDR_LEN + MAX_TX_FRAME).contains(&total) {
        return None;
    }
    let mut buf = vec![0u8; total];
    let mut at = 0;
    for d in descs {
        let n = d.len() as usize;
        mem.read_slice(&mut buf[at..at + n], d.addr()).ok()?;
        at += n;
    }
    buf.drain(..HDR_LEN);
    Some(buf)
}

/// Scatters header + frame over a receive chain; returns the bytes written, or `None`
/// if the chain is malformed or too small.
fn write_frame(descs: &[Descriptor], frame: &[u8], mem: &GuestMem) -> Option<u32> {
    if descs.iter().any(|d| !d.is_write_only()) || descs.last().is_some_and(|d| d.has_next()) {
        return None;
    }
    let capacity: usize = descs.iter().map(|d| d.len() as usize).sum();
    let total = HDR_LEN + frame.len();
    if capacity < total {
        tracing::debug!("virtio-net: receive buffer of {capacity} bytes too small for {total}");
        return None;
    }
    let mut data = vec![0u8; HDR_LEN];
    data[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
    data.extend_from_slice(frame);
    let mut at = 0;
    for d in descs {
        if at == data.len() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], GuestAddress(d.addr().0))
            .ok()?;
        at += n;
    }
    Some(total as u32)
}
