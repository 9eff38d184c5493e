//! The virtio-mmio transport: register file, feature negotiation, queue set-up,
//! notifications and the interrupt status, with saveable state.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::blk::Block;
use super::net::Net;
use super::{DeviceConfig, F_VERSION_1};
use crate::world::World;
use crate::GuestMem;

const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4d56_5446; // "FTVM"

const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 64;
/// InterruptStatus bit: the device used a buffer.
const INT_USED_RING: u32 = 1;

/// Register offsets.
mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// The device model behind a transport.
#[derive(Debug)]
enum Model {
    Block(Block),
    Net(Net),
}

/// A queue's saveable state (virtio-queue's `QueueState`, which has no serde form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedQueue {
    max_size: u16,
    next_avail: u16,
    next_used: u16,
    event_idx_enabled: bool,
    size: u16,
    ready: bool,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&SavedQueue> for QueueState {
    fn from(q: &SavedQueue) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The saveable state of one virtio-mmio device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    config: DeviceConfig,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    irq_pending: bool,
    queues: Vec<SavedQueue>,
}

impl VirtioState {
    /// How the saved device is configured.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }
}

/// Errors rebuilding a device from state.
#[derive(Debug, thiserror::Error)]
#[error("virtio queue state rejected: {0:?}")]
pub struct QueueStateError(virtio_queue::Error);

/// One virtio-mmio device.
#[derive(Debug)]
pub struct VirtioMmio {
    config: DeviceConfig,
    model: Model,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    interrupt_status: u32,
    config_generation: u32,
    irq_pending: bool,
    queues: Vec<Queue>,
}

fn new_queues(sizes: &[u16]) -> Vec<Queue> {
    sizes.iter().filter_map(|&s| Queue::new(s).ok()).collect()
}

impl VirtioMmio {
    /// A freshly reset device.
    pub fn new(config: DeviceConfig) -> Self {
        let (model, sizes) = match &config {
            DeviceConfig::Block {
                disk,
                capacity_sectors,
                read_only,
            } => (
                Model::Block(Block::new(*disk, *capacity_sectors, *read_only)),
                Block::QUEUE_SIZES,
            ),
            DeviceConfig::Net { mac } => (Model::Net(Net::new(*mac)), Net::QUEUE_SIZES),
        };
        Self {
            config,
            model,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            interrupt_status: 0,
            config_generation: 0,
            irq_pending: false,
            queues: new_queues(sizes),
        }
    }

    /// Rebuilds a device from saved state.
    pub fn from_state(state: &VirtioState) -> Result<Self, QueueStateError> {
        let mut dev = Self::new(state.config.clone());
        dev.device_features_sel = state.device_features_sel;
        dev.driver_features_sel = state.driver_features_sel;
        dev.driver_features = state.driver_features;
        dev.queue_sel = state.queue_sel;
        dev.status = state.status;
        dev.interrupt_status = state.interrupt_status;
        dev.config_generation = state.config_generation;
        dev.irq_pending = state.irq_pending;
        dev.queues = state
            .queues
            .iter()
            .map(|q| Queue::try_from(QueueState::from(q)).map_err(QueueStateError))
            .collect::<Result<_, _>>()?;
        Ok(dev)
    }

    /// The saveable state.
    pub fn state(&self) -> VirtioState {
        VirtioState {
            config: self.config.clone(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt_status,
            config_generation: self.config_generation,
            irq_pending: self.irq_pending,
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// How the device is configured.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    fn device_id(&self) -> u32 {
        match self.model {
            Model::Net(_) => 1,
            Model::Block(_) => 2,
        }
    }

    fn device_features(&self) -> u64 {
        F_VERSION_1
            | match &self.model {
                Model::Block(b) => b.features(),
                Model::Net(n) => n.features(),
            }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt_status = 0;
        self.irq_pending = false;
        for q in &mut self.queues {
            q.reset();
        }
    }

    /// A register read at `offset`. Unknown registers read as zero.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            match &self.model {
                Model::Block(b) => b.read_config(offset - reg::CONFIG, data),
                Model::Net(n) => n.read_config(offset - reg::CONFIG, data),
            }
            return;
        }
        let value: u32 = match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features() as u32,
                1 => (self.device_features() >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            reg::INTERRUPT_STATUS => self.interrupt_status,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A register write at `offset`; a queue notification runs the device.
    pub fn write(&mut self, offset: u64, data: &[u8], mem: &GuestMem, world: &mut dyn World) {
        if offset >= reg::CONFIG {
            // Both devices' config spaces are read-only for the driver.
            return;
        }
        let mut b = [0u8; 4];
        for (d, s) in b.iter_mut().zip(data) {
            *d = *s;
        }
        let v = u32::from_le_bytes(b);
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            reg::QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            reg::QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            reg::QUEUE_DRIVER_LOW => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            reg::QUEUE_DRIVER_HIGH => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            reg::QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            reg::QUEUE_DEVICE_HIGH => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            reg::QUEUE_NOTIFY => self.notify(v as usize, mem, world),
            reg::INTERRUPT_ACK => self.interrupt_status &= !v,
            reg::STATUS => self.write_status(v),
            _ => tracing::trace!("virtio: write {v:#x} to unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device_features();
            let ok =
                self.driver_features & F_VERSION_1 != 0 && self.driver_features & !offered == 0;
            if !ok {
                tracing::debug!(
                    "virtio: driver features {:#x} refused (offered {offered:#x})",
                    self.driver_features
                );
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v;
    }

    fn notify(&mut self, index: usize, mem: &GuestMem, world: &mut dyn World) {
        let Some(queue) = self.queues.get_mut(index) else {
            return;
        };
        if !queue.ready() {
            return;
        }
        if !queue.is_valid(mem) {
            tracing::debug!(
                "virtio: queue {index} set up outside guest memory; device needs reset"
            );
            self.status |= STATUS_DEVICE_NEEDS_RESET;
            return;
        }
        let used = match &mut self.model {
            Model::Block(b) if index == 0 => b.process(queue, mem, world),
            Model::Net(n) if index == Net::TX_QUEUE => n.transmit(queue, mem, world),
            _ => false,
        };
        if used {
            self.signal_used();
        }
    }

    fn signal_used(&mut self) {
        self.interrupt_status |= INT_USED_RING;
        self.irq_pending = true;
    }

    /// Takes a raised interrupt, returning whether one was raised.
    pub fn take_irq(&mut self) -> bool {
        std::mem::take(&mut self.irq_pending)
    }

    /// Whether an interrupt is raised and not yet taken.
    pub fn irq_pending(&self) -> bool {
        self.irq_pending
    }

    /// For a network device: whether the guest has a receive buffer posted.
    pub fn can_receive(&self, mem: &GuestMem) -> bool {
        match &self.model {
            Model::Net(_) => self
                .queues
                .get(Net::RX_QUEUE)
                .is_some_and(|q| q.ready() && Net::has_buffer(q, mem)),
            Model::Block(_) => false,
        }
    }

    /// For a network device: puts `frame` into the next receive buffer.
    pub fn deliver(&mut self, frame: &[u8], mem: &GuestMem) {
        if let (Model::Net(n), Some(q)) = (&mut self.model, self.queues.get_mut(Net::RX_QUEUE)) {
            if n.receive(q, frame, mem) {
                self.signal_used();
            }
        }
    }
}
