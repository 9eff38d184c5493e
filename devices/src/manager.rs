//! The set of devices of one VM: routes port I/O to them, collects their interrupts and
//! console output, and saves and restores their state as one unit.

use serde::{Deserialize, Serialize};

use crate::bus::{Bus, BusError};
use crate::platform::{
    Platform, PlatformAction, PlatformState, PLATFORM_PORT_BASE, PLATFORM_PORT_LEN,
};
use crate::serial::{SerialConsole, SerialConsoleState, COM1_PORT_BASE, COM1_PORT_LEN};
use crate::virtio::{self, DeviceConfig, VirtioMmio, VirtioState};
use crate::world::{World, WorldError};
use crate::GuestMem;

/// Which device owns a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PioDevice {
    Serial,
    Platform,
}

/// Interrupts the devices want delivered at this exit boundary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PendingIrqs {
    /// Vectors to deliver as MSIs to the local APIC.
    pub msi_vectors: Vec<u8>,
    /// Legacy interrupt lines (GSIs) to pulse.
    pub gsi_pulses: Vec<u32>,
}

impl PendingIrqs {
    /// Whether nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.msi_vectors.is_empty() && self.gsi_pulses.is_empty()
    }
}

/// The saveable state of every device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The platform device.
    pub platform: PlatformState,
    /// The virtio devices, in MMIO slot order.
    pub virtio: Vec<VirtioState>,
}

/// Errors of device set-up.
#[derive(Debug, thiserror::Error)]
pub enum DevicesError {
    /// Overlapping device ranges.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A saved queue is inconsistent.
    #[error(transparent)]
    Queue(#[from] virtio::transport_error::QueueStateError),
}

/// Most frames delivered at one exit, so one busy link cannot starve the guest.
const MAX_RX_PER_EXIT: usize = 8;

/// All devices of a VM.
#[derive(Debug)]
pub struct DeviceManager {
    pio: Bus<PioDevice>,
    mmio: Bus<usize>,
    serial: SerialConsole,
    platform: Platform,
    virtio: Vec<VirtioMmio>,
}

impl DeviceManager {
    /// The standard devices plus the virtio devices `virtio` (in MMIO slot order);
    /// `entropy_seed` seeds the platform's entropy stream.
    pub fn new(entropy_seed: u64, virtio: &[DeviceConfig]) -> Result<Self, DevicesError> {
        Self::with_devices(
            SerialConsole::default(),
            Platform::new(entropy_seed),
            virtio.iter().cloned().map(VirtioMmio::new).collect(),
        )
    }

    /// Rebuilds the device set from saved state.
    pub fn from_state(state: &DevicesState) -> Result<Self, DevicesError> {
        Self::with_devices(
            SerialConsole::from_state(&state.serial),
            Platform::from_state(state.platform.clone()),
            state
                .virtio
                .iter()
                .map(VirtioMmio::from_state)
                .collect::<Result<_, _>>()?,
        )
    }

    fn with_devices(
        serial: SerialConsole,
        platform: Platform,
        virtio: Vec<VirtioMmio>,
    ) -> Result<Self, DevicesError> {
        let mut pio = Bus::default();
        pio.insert(
            COM1_PORT_BASE.into(),
            COM1_PORT_LEN.into(),
            PioDevice::Serial,
        )?;
        pio.insert(
            PLATFORM_PORT_BASE.into(),
            PLATFORM_PORT_LEN.into(),
            PioDevice::Platform,
        )?;
        let mut mmio = Bus::default();
        for i in 0..virtio.len() {
            mmio.insert(
                virtio::MMIO_BASE + i as u64 * virtio::MMIO_SIZE,
                virtio::MMIO_SIZE,
                i,
            )?;
        }
        Ok(Self {
            pio,
            mmio,
            serial,
            platform,
            virtio,
        })
    }

    /// The kernel command-line tokens announcing the virtio devices.
    pub fn cmdline_tokens(&self) -> Vec<String> {
        (0..self.virtio.len()).map(virtio::cmdline_token).collect()
    }

    /// The virtio devices' configurations, in slot order.
    pub fn virtio_configs(&self) -> Vec<DeviceConfig> {
        self.virtio.iter().map(|d| d.config().clone()).collect()
    }

    /// An MMIO read. Unclaimed addresses read as all ones.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) {
        match self.mmio.lookup(addr) {
            Some((i, off)) => self.virtio[i].read(off, data),
            None => {
                tracing::trace!("mmio read from unclaimed address {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    /// An MMIO write. Writes to unclaimed addresses are ignored.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8], mem: &GuestMem, world: &mut dyn World) {
        match self.mmio.lookup(addr) {
            Some((i, off)) => self.virtio[i].write(off, data, mem, world),
            None => tracing::trace!("mmio write to unclaimed address {addr:#x}"),
        }
    }

    /// Delivers waiting frames from the World into network devices that have receive
    /// buffers, at exit `exit`; returns how many.
    pub fn receive_packets(
        &mut self,
        exit: u64,
        mem: &GuestMem,
        world: &mut dyn World,
    ) -> Result<usize, WorldError> {
        let mut delivered = 0;
        for dev in &mut self.virtio {
            for _ in 0..MAX_RX_PER_EXIT {
                if !dev.can_receive(mem) {
                    break;
                }
                match world.receive(exit)? {
                    Some(frame) => {
                        dev.deliver(&frame, mem);
                        delivered += 1;
                    }
                    None => break,
                }
            }
        }
        Ok(delivered)
    }

    /// Room in the UART's receive FIFO for console input.
    pub fn console_input_room(&self) -> usize {
        self.serial.input_room()
    }

    /// Moves waiting console input from the World into the UART (returning how many
    /// bytes it took), as much as it has room
    /// for, at exit `exit`.
    pub fn receive_console_input(
        &mut self,
        exit: u64,
        world: &mut dyn World,
    ) -> Result<usize, WorldError> {
        let room = self.serial.input_room();
        if room == 0 {
            return Ok(0);
        }
        let mut taken = 0;
        if let Some(bytes) = world.console_input(exit, room)? {
            taken = self.serial.enqueue_input(&bytes);
            if taken < bytes.len() {
                tracing::warn!(
                    dropped = bytes.len() - taken,
                    "console input beyond the UART's room dropped"
                );
            }
        }
        Ok(taken)
    }

    /// The saveable state of every device.
    pub fn state(&self) -> DevicesState {
        DevicesState {
            serial: self.serial.state(),
            platform: self.platform.state().clone(),
            virtio: self.virtio.iter().map(VirtioMmio::state).collect(),
        }
    }

    /// The platform device (clock and timer queries of the run loop).
    pub fn platform(&mut self) -> &mut Platform {
        &mut self.platform
    }

    /// A port read. Unclaimed ports and unknown registers read as all ones.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        let value: u32 = match self.pio.lookup(port.into()) {
            Some((PioDevice::Serial, off)) => self.serial.read(off as u8).into(),
            Some((PioDevice::Platform, off)) => self.platform.read(off),
            None => {
                tracing::trace!("pio read from unclaimed port {port:#x}");
                u32::MAX
            }
        };
        let bytes = value.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            *d = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A port write. Writes to unclaimed ports are ignored.
    pub fn pio_write(&mut self, port: u16, data: &[u8], mem: &GuestMem) -> PlatformAction {
        let mut bytes = [0u8; 4];
        for (b, d) in bytes.iter_mut().zip(data) {
            *b = *d;
        }
        match self.pio.lookup(port.into()) {
            Some((PioDevice::Serial, off)) => {
                self.serial.write(off as u8, bytes[0]);
                PlatformAction::None
            }
            Some((PioDevice::Platform, off)) => {
                self.platform.write(off, u32::from_le_bytes(bytes), mem)
            }
            None => {
                tracing::trace!("pio write to unclaimed port {port:#x}");
                PlatformAction::None
            }
        }
    }

    /// Takes the console bytes written since the last call.
    pub fn take_console_output(&mut self) -> Vec<u8> {
        self.serial.take_output()
    }

    /// Whether any device has an interrupt waiting to be injected: a guest that asks to
    /// wait for an event then resumes at once (the event has already happened).
    pub fn has_pending_irq(&self) -> bool {
        self.platform.has_pending_irq()
            || self.serial.irq_pending()
            || self.virtio.iter().any(VirtioMmio::irq_pending)
    }

    /// Takes the interrupts due at this exit boundary.
    pub fn take_pending_irqs(&mut self) -> PendingIrqs {
        let mut irqs = PendingIrqs::default();
        if let Some(v) = self.platform.take_pending_irq() {
            irqs.msi_vectors.push(v);
        }
        if self.serial.take_irq() {
            irqs.gsi_pulses.push(crate::serial::COM1_GSI);
        }
        for (i, dev) in self.virtio.iter_mut().enumerate() {
            if dev.take_irq() {
                irqs.gsi_pulses.push(virtio::GSI_BASE + i as u32);
            }
        }
        irqs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn a_raised_interrupt_is_pending_until_taken() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut d = DeviceManager::new(3, &[]).unwrap();
        assert!(!d.has_pending_irq());
        // Transmit-holding-register-empty interrupt enabled, then one byte sent.
        d.pio_write(0x3f9, &[0x02], &mem);
        d.pio_write(0x3f8, b"x", &mem);
        assert!(d.has_pending_irq());
        assert_eq!(
            d.take_pending_irqs().gsi_pulses,
            vec![crate::serial::COM1_GSI]
        );
        assert!(!d.has_pending_irq());
    }

    #[test]
    fn routes_ports_and_round_trips_state() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let mut d = DeviceManager::new(3, &[]).unwrap();
        d.pio_write(0x3f8, b"A", &mem);
        d.pio_write(0x3f8, b"\n", &mem);
        assert_eq!(d.take_console_output(), b"A\n");
        assert_eq!(
            d.pio_write(0x600, &5u32.to_le_bytes(), &mem),
            PlatformAction::PowerOff(5)
        );
        let mut unclaimed = [0u8; 2];
        d.pio_read(0x1234, &mut unclaimed);
        assert_eq!(unclaimed, [0xff, 0xff]);

        let mut e1 = [0u8; 4];
        d.pio_read(0x60c, &mut e1);
        let saved = d.state();
        let mut e2 = [0u8; 4];
        d.pio_read(0x60c, &mut e2);
        let mut r = DeviceManager::from_state(&saved).unwrap();
        let mut e3 = [0u8; 4];
        r.pio_read(0x60c, &mut e3);
        assert_eq!(e2, e3, "the entropy stream continues from the saved point");
    }
}
