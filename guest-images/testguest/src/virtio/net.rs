//! A virtio-net driver that is a `smoltcp` Ethernet device.
//!
//! Receive queue 0 holds [`RX_BUFS`] posted buffers and transmit queue 1 [`TX_BUFS`]
//! buffers, each [`BUF_SIZE`] bytes: the 12-byte `virtio_net_hdr_v1` then the frame, in
//! one descriptor. Descriptor *i* of a queue always describes buffer *i*, so a used-ring
//! id is a buffer index. Received buffers are re-posted as soon as smoltcp has consumed
//! them; transmit buffers are reclaimed from the used ring when a new one is needed.
//!
//! VM exits: transmitted frames are only made available by smoltcp's token; the device
//! is notified once per batch by [`VirtioNet::flush`] (one exit per main-loop iteration
//! that sent anything). Re-posted receive buffers need no notification unless the device
//! had run out of them. Used-buffer interrupts are suppressed except while idle
//! ([`VirtioNet::prepare_idle`]), which also acknowledges a taken interrupt (one exit).

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;

use super::mmio::{Notifier, Transport};
use super::noinit_zeroed;
use super::queue::{QueueMem, Virtq, DESC_WRITE};

/// Receive buffers posted.
pub const RX_BUFS: usize = 32;
/// Transmit buffers.
pub const TX_BUFS: usize = 32;
/// Bytes of one buffer (header and frame).
pub const BUF_SIZE: usize = 2048;
/// Bytes of `virtio_net_hdr_v1` (with VERSION_1).
const HDR: usize = 12;
/// The largest Ethernet frame sent or received (1500-byte MTU, without FCS).
const MAX_FRAME: usize = 1514;
/// VIRTIO_NET_F_MAC: the MAC address is in the configuration space.
const F_MAC: u64 = 1 << 5;
/// Unnotified transmitted frames after which the device is notified at once.
const TX_BATCH: usize = 16;

/// A queue's buffers.
type Bufs<const N: usize> = [[u8; BUF_SIZE]; N];

/// The receive half.
struct Rx {
    queue: Virtq,
    notifier: Notifier,
    bufs: &'static mut Bufs<RX_BUFS>,
    /// The device ran out of buffers before one was re-posted: notify it.
    notify: bool,
}

/// The transmit half.
struct Tx {
    queue: Virtq,
    notifier: Notifier,
    bufs: &'static mut Bufs<TX_BUFS>,
    /// Indices of the buffers not in flight.
    free: [u16; TX_BUFS],
    /// Number of entries of `free` in use.
    nfree: usize,
    /// Frames made available since the last notification.
    unnotified: usize,
}

/// A virtio-net device.
pub struct VirtioNet {
    transport: Transport,
    rx: Rx,
    tx: Tx,
    mac: [u8; 6],
}

impl VirtioNet {
    /// Initialises the network device behind `transport` and posts all receive buffers.
    /// Only once per boot.
    pub fn new(mut transport: Transport) -> Result<VirtioNet, &'static str> {
        let features = transport.begin_init(F_MAC)?;
        let mut rxq = Virtq::new(noinit_zeroed!(QueueMem));
        let mut txq = Virtq::new(noinit_zeroed!(QueueMem));
        transport.setup_queue(0, &mut rxq)?;
        transport.setup_queue(1, &mut txq)?;
        let mut mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        if features & F_MAC != 0 {
            for (i, byte) in mac.iter_mut().enumerate() {
                *byte = transport.config_u8(i);
            }
        }
        let mut rx = Rx {
            notifier: transport.notifier(0),
            bufs: noinit_zeroed!(Bufs<RX_BUFS>),
            queue: rxq,
            notify: false,
        };
        let posted = RX_BUFS.min(usize::from(rx.queue.size()));
        for i in 0..posted as u16 {
            let addr = rx.bufs[usize::from(i)].as_ptr() as u64;
            rx.queue.set_desc(i, addr, BUF_SIZE as u32, DESC_WRITE, 0);
            rx.queue.push(i);
        }
        let mut tx = Tx {
            notifier: transport.notifier(1),
            bufs: noinit_zeroed!(Bufs<TX_BUFS>),
            queue: txq,
            free: [0; TX_BUFS],
            nfree: 0,
            unnotified: 0,
        };
        for i in 0..TX_BUFS.min(usize::from(tx.queue.size())) as u16 {
            let addr = tx.bufs[usize::from(i)].as_ptr() as u64;
            tx.queue.set_desc(i, addr, BUF_SIZE as u32, 0, 0);
            tx.free[tx.nfree] = i;
            tx.nfree += 1;
        }
        transport.driver_ok();
        rx.notifier.notify();
        Ok(VirtioNet {
            transport,
            rx,
            tx,
            mac,
        })
    }

    /// The MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Notifies the device of transmitted frames and (if it had run out) of re-posted
    /// receive buffers: at most one exit per queue. Call after each poll of the stack.
    pub fn flush(&mut self) {
        self.tx.flush();
        if self.rx.notify {
            self.rx.notify = false;
            self.rx.notifier.notify();
        }
    }

    /// Before idling: enables used-buffer interrupts and acknowledges a taken interrupt
    /// (so that the next used buffer raises a new edge). Returns whether the caller may
    /// WAIT now (then it must call [`VirtioNet::after_idle`] after the WAIT); if a frame
    /// has arrived, it must poll again instead. No exit unless an interrupt was taken.
    pub fn prepare_idle(&mut self) -> bool {
        self.rx.queue.set_interrupts(true);
        self.tx.queue.set_interrupts(true);
        if !self.rx.queue.has_used() {
            // Frames used up to and during the acknowledgement are seen by the re-check;
            // later ones raise a new interrupt, which ends the WAIT.
            self.transport.ack_interrupts();
            if !self.rx.queue.has_used() {
                return true;
            }
        }
        self.after_idle();
        false
    }

    /// Suppresses used-buffer interrupts again after an idle period.
    pub fn after_idle(&mut self) {
        self.rx.queue.set_interrupts(false);
        self.tx.queue.set_interrupts(false);
    }
}

impl Tx {
    /// Reclaims the buffers the device has sent.
    fn reclaim(&mut self) {
        while let Some((id, _)) = self.queue.pop_used() {
            assert!(
                self.nfree < TX_BUFS,
                "virtio-net: transmit buffer {id} used twice"
            );
            self.free[self.nfree] = id;
            self.nfree += 1;
        }
    }

    /// Whether a buffer is free, reclaiming (and notifying, if frames wait) first.
    fn ready(&mut self) -> bool {
        if self.nfree == 0 {
            self.reclaim();
        }
        if self.nfree == 0 && self.unnotified > 0 {
            self.flush();
            self.reclaim();
        }
        self.nfree > 0
    }

    /// Notifies the device of the frames made available since the last notification.
    fn flush(&mut self) {
        if self.unnotified > 0 {
            self.unnotified = 0;
            if !self.queue.notify_suppressed() {
                self.notifier.notify();
            }
        }
    }
}

impl phy::Device for VirtioNet {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        if !self.tx.ready() {
            return None;
        }
        let (id, len) = self.rx.queue.pop_used()?;
        let rx = RxToken {
            rx: &mut self.rx,
            id,
            len: len as usize,
        };
        Some((rx, TxToken { tx: &mut self.tx }))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        self.tx.ready().then_some(TxToken { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps.max_burst_size = Some(RX_BUFS);
        caps
    }
}

/// A received frame (receive buffer `id`, `len` bytes with the header).
pub struct RxToken<'a> {
    rx: &'a mut Rx,
    id: u16,
    len: usize,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let buf = &self.rx.bufs[usize::from(self.id)];
        let end = self.len.clamp(HDR, BUF_SIZE);
        f(&buf[HDR..end])
        // The buffer is re-posted when `self` is dropped.
    }
}

impl Drop for RxToken<'_> {
    /// Re-posts the buffer (consumed or not); if the device had none left, it must be
    /// told.
    fn drop(&mut self) {
        if self.rx.queue.in_flight() == 0 {
            self.rx.notify = true;
        }
        self.rx.queue.push(self.id);
    }
}

/// The right to transmit one frame (a free transmit buffer exists).
pub struct TxToken<'a> {
    tx: &'a mut Tx,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        assert!(len <= BUF_SIZE - HDR, "virtio-net: frame of {len} bytes");
        let tx = self.tx;
        tx.nfree -= 1;
        let id = tx.free[tx.nfree];
        let buf = &mut tx.bufs[usize::from(id)];
        buf[..HDR].fill(0);
        let result = f(&mut buf[HDR..HDR + len]);
        tx.queue.set_len(id, (HDR + len) as u32);
        tx.queue.push(id);
        tx.unnotified += 1;
        if tx.unnotified >= TX_BATCH {
            tx.flush();
        }
        result
    }
}
