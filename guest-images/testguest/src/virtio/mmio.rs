//! The virtio-mmio transport, modern layout (Version 2), as in the virtio 1.x spec §4.2.2.
//!
//! All control registers are accessed as aligned 32-bit volatile loads and stores; each
//! access is a VM exit. Device configuration fields are read with accesses of their own
//! width (bytes for the MAC, 32-bit halves for 64-bit fields), as the spec requires.

use core::sync::atomic::Ordering;

use super::queue::Virtq;
use crate::boot::IRQ_COUNTS;
use crate::cmdline::VirtioMmio;

/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
/// Register offsets.
const MAGIC_VALUE: usize = 0x000;
const VERSION: usize = 0x004;
const DEVICE_ID: usize = 0x008;
const DEVICE_FEATURES: usize = 0x010;
const DEVICE_FEATURES_SEL: usize = 0x014;
const DRIVER_FEATURES: usize = 0x020;
const DRIVER_FEATURES_SEL: usize = 0x024;
const QUEUE_SEL: usize = 0x030;
const QUEUE_NUM_MAX: usize = 0x034;
const QUEUE_NUM: usize = 0x038;
const QUEUE_READY: usize = 0x044;
const QUEUE_NOTIFY: usize = 0x050;
const INTERRUPT_ACK: usize = 0x064;
const STATUS: usize = 0x070;
const QUEUE_DESC_LOW: usize = 0x080;
const QUEUE_DESC_HIGH: usize = 0x084;
const QUEUE_DRIVER_LOW: usize = 0x090;
const QUEUE_DRIVER_HIGH: usize = 0x094;
const QUEUE_DEVICE_LOW: usize = 0x0a0;
const QUEUE_DEVICE_HIGH: usize = 0x0a4;
const CONFIG_GENERATION: usize = 0x0fc;
/// Start of the device-specific configuration space.
const CONFIG: usize = 0x100;

/// Device status bits.
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;
/// InterruptStatus/InterruptACK: used buffer notification and configuration change.
const INTERRUPT_ALL: u32 = 0b11;

/// VIRTIO_F_VERSION_1: the modern interface; required by the device.
pub const F_VERSION_1: u64 = 1 << 32;

/// A virtio-mmio device.
pub struct Transport {
    /// Base address of the registers.
    base: usize,
    /// Interrupt line (vector 0x30 + gsi).
    gsi: u32,
    /// The device ID read at probe time.
    device_id: u32,
    /// The value of `IRQ_COUNTS[gsi]` when interrupts were last acknowledged.
    acked_irqs: u64,
}

impl Transport {
    /// Probes the device `dev` announces: returns it if it has the virtio magic, Version 2
    /// and a non-zero device ID (three register reads).
    pub fn probe(dev: &VirtioMmio) -> Option<Transport> {
        let mut t = Transport {
            base: dev.base as usize,
            gsi: dev.gsi,
            device_id: 0,
            acked_irqs: 0,
        };
        if t.read(MAGIC_VALUE) != MAGIC || t.read(VERSION) != 2 {
            return None;
        }
        t.device_id = t.read(DEVICE_ID);
        (t.device_id != 0).then_some(t)
    }

    /// The device ID (1 net, 2 block).
    pub fn device_id(&self) -> u32 {
        self.device_id
    }

    /// Reads the 32-bit register at `offset`.
    fn read(&self, offset: usize) -> u32 {
        // SAFETY: `base` is a virtio-mmio register window the command line announced,
        // inside the user-accessible uncached MMIO page mapped by `boot` (checked by
        // `cmdline`); `offset` is an aligned register offset below 0x200.
        unsafe { ((self.base + offset) as *const u32).read_volatile() }
    }

    /// Writes the 32-bit register at `offset`.
    fn write(&self, offset: usize, value: u32) {
        // SAFETY: as in `read`; the device registers are not Rust memory.
        unsafe { ((self.base + offset) as *mut u32).write_volatile(value) }
    }

    /// Resets the device, routes its interrupt line, and negotiates features: accepts
    /// those of `wanted` the device offers, plus VERSION_1, and requires the device to
    /// accept them (FEATURES_OK). Returns the negotiated features.
    pub fn begin_init(&mut self, wanted: u64) -> Result<u64, &'static str> {
        self.write(STATUS, 0);
        if self.read(STATUS) != 0 {
            return Err("the device did not reset");
        }
        crate::ioapic::route(self.gsi);
        self.acked_irqs = IRQ_COUNTS[self.gsi as usize].load(Ordering::SeqCst);
        self.write(STATUS, STATUS_ACKNOWLEDGE);
        self.write(STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        let offered = (u64::from(high) << 32) | u64::from(low);
        if offered & F_VERSION_1 == 0 {
            return Err(self.fail("the device does not offer VERSION_1"));
        }
        let accepted = offered & (wanted | F_VERSION_1);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, accepted as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (accepted >> 32) as u32);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(STATUS, status);
        if self.read(STATUS) & STATUS_FEATURES_OK == 0 {
            return Err(self.fail("the device refused the features (FEATURES_OK)"));
        }
        Ok(accepted)
    }

    /// Sets the FAILED status bit and returns `why`.
    fn fail(&self, why: &'static str) -> &'static str {
        self.write(STATUS, STATUS_FAILED);
        why
    }

    /// Sets up queue `index` with the memory of `q`, shrinking `q` to the device's
    /// maximum size if that is smaller, and enables it.
    pub fn setup_queue(&mut self, index: u32, q: &mut Virtq) -> Result<(), &'static str> {
        self.write(QUEUE_SEL, index);
        if self.read(QUEUE_READY) != 0 {
            return Err(self.fail("a queue is already enabled after reset"));
        }
        let max = self.read(QUEUE_NUM_MAX);
        if max == 0 {
            return Err(self.fail("a queue is not available"));
        }
        q.shrink(max);
        self.write(QUEUE_NUM, u32::from(q.size()));
        let (desc, driver, device) = q.addresses();
        for (low, value) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, driver),
            (QUEUE_DEVICE_LOW, device),
        ] {
            self.write(low, value as u32);
            self.write(low + 4, (value >> 32) as u32);
        }
        const _: () = assert!(QUEUE_DESC_HIGH == QUEUE_DESC_LOW + 4);
        const _: () = assert!(QUEUE_DRIVER_HIGH == QUEUE_DRIVER_LOW + 4);
        const _: () = assert!(QUEUE_DEVICE_HIGH == QUEUE_DEVICE_LOW + 4);
        self.write(QUEUE_READY, 1);
        Ok(())
    }

    /// Completes initialisation (DRIVER_OK); the device is live from here on.
    pub fn driver_ok(&mut self) {
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        self.write(STATUS, status);
    }

    /// A handle to notify queue `index` (for a driver half that does not own the
    /// transport).
    pub fn notifier(&self, index: u32) -> Notifier {
        Notifier {
            register: self.base + QUEUE_NOTIFY,
            index,
        }
    }

    /// Before the driver goes idle: acknowledges all interrupt causes if an interrupt was
    /// taken since the last acknowledgement (one register write), so that the next
    /// used-buffer notification raises a new edge. Returns whether it did; the caller must
    /// then re-check its queues before idling (the device may have used buffers between
    /// that interrupt and the acknowledgement).
    ///
    /// InterruptStatus is never read: an interrupt not yet acknowledged is always counted
    /// (interrupts are delivered at the exit that raises them, and IF=1 at CPL3), so
    /// "taken since the last ACK" is known without an exit.
    pub fn ack_interrupts(&mut self) -> bool {
        let taken = IRQ_COUNTS[self.gsi as usize].load(Ordering::SeqCst);
        if taken == self.acked_irqs {
            return false;
        }
        self.acked_irqs = taken;
        self.write(INTERRUPT_ACK, INTERRUPT_ALL);
        true
    }

    /// Reads the configuration byte at `offset`.
    pub fn config_u8(&self, offset: usize) -> u8 {
        // SAFETY: as in `read`; a byte access to the configuration space, below the
        // 0x200 bytes of the window `cmdline` checked.
        unsafe { ((self.base + CONFIG + offset) as *const u8).read_volatile() }
    }

    /// Reads the 64-bit configuration field at `offset` as two 32-bit halves, retrying
    /// if the configuration generation changed in between.
    pub fn config_u64(&self, offset: usize) -> u64 {
        loop {
            let generation = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset);
            let high = self.read(CONFIG + offset + 4);
            if self.read(CONFIG_GENERATION) == generation {
                return (u64::from(high) << 32) | u64::from(low);
            }
        }
    }
}

/// Notifies one queue of a device (one register write, a VM exit).
#[derive(Clone, Copy)]
pub struct Notifier {
    /// Address of the QueueNotify register.
    register: usize,
    /// The queue index written to it.
    index: u32,
}

impl Notifier {
    /// Tells the device that queue `index` has new available buffers.
    pub fn notify(&self) {
        // Make the ring updates visible before the device looks at them.
        core::sync::atomic::fence(Ordering::SeqCst);
        // SAFETY: `register` is the QueueNotify register of a device window checked by
        // `cmdline`, in the user-accessible MMIO page; not Rust memory.
        unsafe { (self.register as *mut u32).write_volatile(self.index) }
    }
}
