//! The platform device: ftvm's own ports for power-off, virtual time, entropy, a
//! one-shot timer, idling ("wait for event"), an entropy DMA fill, crash reports and
//! progress markers. The register map is documented in docs/guest-abi.md.

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::clock::VirtualClock;
use crate::GuestMem;

/// First port of the platform device.
pub const PLATFORM_PORT_BASE: u16 = 0x600;
/// Number of ports it occupies.
pub const PLATFORM_PORT_LEN: u16 = 0x40;
/// Interrupt vector of the platform timer.
pub const TIMER_VECTOR: u8 = 0x30;
/// Largest ENTROPY_FILL the device performs in one request.
pub const MAX_FILL_BYTES: u32 = 1 << 20;

/// Register offsets from [`PLATFORM_PORT_BASE`].
pub mod reg {
    /// W: power off with the written exit code.
    pub const POWER_OFF: u64 = 0x00;
    /// R: virtual time, low half (latches the high half).
    pub const TIME_LO: u64 = 0x04;
    /// R: virtual time, latched high half.
    pub const TIME_HI: u64 = 0x08;
    /// R: 32 bits of entropy.
    pub const ENTROPY: u64 = 0x0c;
    /// W: timer deadline, low half.
    pub const TIMER_LO: u64 = 0x10;
    /// W: timer deadline, high half; arms the timer.
    pub const TIMER_HI: u64 = 0x14;
    /// W: idle until an event is pending.
    pub const WAIT: u64 = 0x18;
    /// W: cancel the timer.
    pub const TIMER_DISARM: u64 = 0x1c;
    /// W: DMA address, low half.
    pub const DMA_ADDR_LO: u64 = 0x20;
    /// W: DMA address, high half.
    pub const DMA_ADDR_HI: u64 = 0x24;
    /// W: fill this many bytes at the DMA address with entropy.
    pub const ENTROPY_FILL: u64 = 0x28;
    /// R: status of the last fill (0 ok, 1 rejected).
    pub const FILL_STATUS: u64 = 0x2c;
    /// W: the guest crashed (exception vector, or 0x100 for a software panic).
    pub const GUEST_PANIC: u64 = 0x30;
    /// W: progress marker.
    pub const MARKER: u64 = 0x34;
    /// W (8 bits): ACPI sleep control (the FADT's SLEEP_CONTROL_REG): SLP_EN (bit 5)
    /// with SLP_TYP (bits 2-4) 5, soft off, powers off with exit code 0.
    pub const SLEEP_CONTROL: u64 = 0x38;
    /// R (8 bits): ACPI sleep status (the FADT's SLEEP_STATUS_REG): always 0.
    pub const SLEEP_STATUS: u64 = 0x39;
    /// W (8 bits): ACPI reset register (the FADT's RESET_REG): 1 resets the machine.
    pub const RESET: u64 = 0x3a;
    /// SLP_EN in SLEEP_CONTROL.
    pub const SLP_EN: u32 = 1 << 5;
    /// SLP_TYP of soft off (S5), as the DSDT's `\_S5_` names it.
    pub const SLP_TYP_S5: u32 = 5;
}

/// What the VMM must do after a platform register access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlatformAction {
    /// Nothing beyond the register access itself.
    None,
    /// The guest powered off with this exit code.
    PowerOff(u32),
    /// The guest idles until an event is pending.
    Wait,
    /// The guest reported a crash with this code.
    GuestPanic(u32),
    /// The guest passed a progress marker.
    Marker(u32),
    /// The guest asked for a reset (reboot) through the ACPI reset register.
    Reset,
}

/// The saveable state of the platform device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformState {
    /// Virtual time.
    pub clock: VirtualClock,
    /// High half of the time latched by the last TIME_LO read.
    pub time_hi_latch: u32,
    /// Low half of a deadline being written.
    pub timer_lo: u32,
    /// Armed timer deadline.
    pub timer_deadline: Option<u64>,
    /// A fired timer whose interrupt the VMM has not injected yet.
    pub timer_irq_pending: bool,
    /// An interrupt was delivered since the guest's last WAIT: the next WAIT returns at
    /// once, so a guest that checks for work and then waits never misses a wake-up.
    pub woken_since_wait: bool,
    /// DMA address for ENTROPY_FILL.
    pub dma_addr: u64,
    /// Result of the last ENTROPY_FILL.
    pub fill_status: u32,
    /// The entropy stream.
    pub rng: ChaCha20Rng,
}

/// The platform device.
#[derive(Debug, Clone)]
pub struct Platform {
    state: PlatformState,
}

impl Platform {
    /// A platform device whose entropy stream is seeded with `entropy_seed`.
    pub fn new(entropy_seed: u64) -> Self {
        Self {
            state: PlatformState {
                clock: VirtualClock::default(),
                time_hi_latch: 0,
                timer_lo: 0,
                timer_deadline: None,
                timer_irq_pending: false,
                woken_since_wait: false,
                dma_addr: 0,
                fill_status: 0,
                rng: ChaCha20Rng::seed_from_u64(entropy_seed),
            },
        }
    }

    /// Notes that an interrupt was delivered to the guest.
    pub fn note_interrupt_delivered(&mut self) {
        self.state.woken_since_wait = true;
    }

    /// At a WAIT: whether an interrupt was delivered since the previous WAIT (then the
    /// guest resumes at once). Clears the latch.
    pub fn take_wake_latch(&mut self) -> bool {
        std::mem::take(&mut self.state.woken_since_wait)
    }

    /// Rebuilds the device from saved state.
    pub fn from_state(state: PlatformState) -> Self {
        Self { state }
    }

    /// The saveable state.
    pub fn state(&self) -> &PlatformState {
        &self.state
    }

    /// Current virtual time.
    pub fn now_ns(&self) -> u64 {
        self.state.clock.now_ns()
    }

    /// The armed timer deadline, if any.
    pub fn timer_deadline(&self) -> Option<u64> {
        self.state.timer_deadline
    }

    /// Accounts one VM exit: advances virtual time and fires a due timer.
    pub fn on_exit(&mut self) {
        self.state.clock.tick_exit();
        self.fire_due_timer();
    }

    /// Advances virtual time to `deadline_ns` (an idle guest skipping ahead) and fires a
    /// timer that became due.
    pub fn advance_to(&mut self, deadline_ns: u64) {
        self.state.clock.advance_to(deadline_ns);
        self.fire_due_timer();
    }

    /// Whether an interrupt is waiting to be injected.
    pub fn has_pending_irq(&self) -> bool {
        self.state.timer_irq_pending
    }

    /// Takes the pending timer interrupt, if any, returning its vector.
    pub fn take_pending_irq(&mut self) -> Option<u8> {
        std::mem::take(&mut self.state.timer_irq_pending).then_some(TIMER_VECTOR)
    }

    fn fire_due_timer(&mut self) {
        if let Some(deadline) = self.state.timer_deadline {
            if self.state.clock.now_ns() >= deadline {
                self.state.timer_deadline = None;
                self.state.timer_irq_pending = true;
            }
        }
    }

    /// A 32-bit read at `offset`. Unknown registers read as all ones.
    pub fn read(&mut self, offset: u64) -> u32 {
        match offset {
            reg::TIME_LO => {
                let now = self.state.clock.now_ns();
                self.state.time_hi_latch = (now >> 32) as u32;
                now as u32
            }
            reg::TIME_HI => self.state.time_hi_latch,
            reg::ENTROPY => self.state.rng.next_u32(),
            reg::FILL_STATUS => self.state.fill_status,
            reg::SLEEP_STATUS => 0,
            _ => u32::MAX,
        }
    }

    /// A 32-bit write of `value` at `offset`. Writes to unknown registers are ignored.
    pub fn write(&mut self, offset: u64, value: u32, mem: &GuestMem) -> PlatformAction {
        match offset {
            reg::POWER_OFF => return PlatformAction::PowerOff(value),
            reg::TIMER_LO => self.state.timer_lo = value,
            reg::TIMER_HI => {
                let deadline = (u64::from(value) << 32) | u64::from(self.state.timer_lo);
                self.state.timer_deadline = Some(deadline);
                self.fire_due_timer();
            }
            reg::TIMER_DISARM => self.state.timer_deadline = None,
            reg::WAIT => return PlatformAction::Wait,
            reg::DMA_ADDR_LO => {
                self.state.dma_addr = (self.state.dma_addr & !0xffff_ffff) | u64::from(value)
            }
            reg::DMA_ADDR_HI => {
                self.state.dma_addr = (self.state.dma_addr & 0xffff_ffff) | (u64::from(value) << 32)
            }
            reg::ENTROPY_FILL => self.state.fill_status = self.entropy_fill(value, mem),
            reg::GUEST_PANIC => return PlatformAction::GuestPanic(value),
            reg::MARKER => return PlatformAction::Marker(value),
            reg::SLEEP_CONTROL => {
                let value = value & 0xff;
                if value & reg::SLP_EN != 0 && (value >> 2) & 7 == reg::SLP_TYP_S5 {
                    return PlatformAction::PowerOff(0);
                }
                tracing::debug!("platform: sleep control {value:#x} (only S5 is supported)");
            }
            reg::RESET if value & 0xff == 1 => return PlatformAction::Reset,
            _ => tracing::debug!("platform: write {value:#x} to unknown register {offset:#x}"),
        }
        PlatformAction::None
    }

    /// Writes `len` entropy bytes at the DMA address; returns the FILL_STATUS value.
    fn entropy_fill(&mut self, len: u32, mem: &GuestMem) -> u32 {
        if len > MAX_FILL_BYTES {
            return 1;
        }
        let mut buf = vec![0u8; len as usize];
        self.state.rng.fill_bytes(&mut buf);
        // `write_slice` goes through the dirty bitmap: DMA pages are reported dirty.
        match mem.write_slice(&buf, GuestAddress(self.state.dma_addr)) {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!("platform: entropy fill rejected: {e}");
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap()
    }

    #[test]
    fn time_is_latched_and_advances_per_exit() {
        let mut p = Platform::new(0);
        p.advance_to(0x1_0000_0005);
        assert_eq!(p.read(reg::TIME_LO), 5);
        p.on_exit();
        assert_eq!(p.read(reg::TIME_HI), 1, "high half latched at TIME_LO");
    }

    #[test]
    fn timer_fires_once_when_due() {
        let m = mem();
        let mut p = Platform::new(0);
        p.write(reg::TIMER_LO, 3_000, &m);
        p.write(reg::TIMER_HI, 0, &m);
        p.on_exit();
        p.on_exit();
        assert!(!p.has_pending_irq());
        p.on_exit();
        assert_eq!(p.take_pending_irq(), Some(TIMER_VECTOR));
        assert_eq!(p.take_pending_irq(), None);
        assert_eq!(p.timer_deadline(), None);
    }

    #[test]
    fn a_delivered_interrupt_lets_exactly_the_next_wait_return() {
        let mut p = Platform::new(0);
        assert!(!p.take_wake_latch());
        p.note_interrupt_delivered();
        p.note_interrupt_delivered();
        let saved = Platform::from_state(p.state().clone());
        assert!(p.take_wake_latch());
        assert!(
            !p.take_wake_latch(),
            "the latch is cleared by the WAIT it releases"
        );
        let mut restored = saved;
        assert!(
            restored.take_wake_latch(),
            "the latch is part of the saved state"
        );
    }

    #[test]
    fn entropy_is_a_seeded_stream() {
        let mut a = Platform::new(7);
        let mut b = Platform::new(7);
        let mut c = Platform::new(8);
        let xa: Vec<u32> = (0..4).map(|_| a.read(reg::ENTROPY)).collect();
        let xb: Vec<u32> = (0..4).map(|_| b.read(reg::ENTROPY)).collect();
        let xc: Vec<u32> = (0..4).map(|_| c.read(reg::ENTROPY)).collect();
        assert_eq!(xa, xb);
        assert_ne!(xa, xc);
    }

    #[test]
    fn entropy_fill_writes_memory_marks_it_dirty_and_rejects_bad_ranges() {
        let m = mem();
        let mut p = Platform::new(1);
        p.write(reg::DMA_ADDR_LO, 0x2000, &m);
        p.write(reg::ENTROPY_FILL, 4096, &m);
        assert_eq!(p.read(reg::FILL_STATUS), 0);
        let mut page = [0u8; 4096];
        m.read_slice(&mut page, GuestAddress(0x2000)).unwrap();
        assert!(page.iter().any(|&b| b != 0));
        let region = m.iter().next().unwrap();
        assert!(region.get_mmap().bitmap().is_addr_set(0x2000));
        assert!(!region.get_mmap().bitmap().is_addr_set(0x3000));

        p.write(reg::DMA_ADDR_LO, 0xf000, &m);
        p.write(reg::ENTROPY_FILL, 0x2000, &m);
        assert_eq!(p.read(reg::FILL_STATUS), 1, "range past the end of RAM");
        p.write(reg::DMA_ADDR_HI, 0xffff_ffff, &m);
        p.write(reg::ENTROPY_FILL, 16, &m);
        assert_eq!(p.read(reg::FILL_STATUS), 1);
        p.write(reg::ENTROPY_FILL, MAX_FILL_BYTES + 1, &m);
        assert_eq!(p.read(reg::FILL_STATUS), 1);
    }

    #[test]
    fn actions_are_reported() {
        let m = mem();
        let mut p = Platform::new(0);
        assert_eq!(p.write(reg::POWER_OFF, 3, &m), PlatformAction::PowerOff(3));
        assert_eq!(p.write(reg::WAIT, 0, &m), PlatformAction::Wait);
        assert_eq!(p.write(reg::MARKER, 9, &m), PlatformAction::Marker(9));
        assert_eq!(
            p.write(reg::GUEST_PANIC, 14, &m),
            PlatformAction::GuestPanic(14)
        );
        assert_eq!(p.write(0x3c, 1, &m), PlatformAction::None);
        assert_eq!(p.read(0x3c), u32::MAX);
    }

    #[test]
    fn acpi_sleep_to_s5_powers_off_and_the_reset_register_resets() {
        let m = mem();
        let mut p = Platform::new(0);
        // What Linux writes for S5 on hardware-reduced ACPI: SLP_TYP 5 << 2 | SLP_EN.
        assert_eq!(
            p.write(reg::SLEEP_CONTROL, (5 << 2) | (1 << 5), &m),
            PlatformAction::PowerOff(0)
        );
        // Other sleep states and SLP_TYP without SLP_EN do nothing.
        assert_eq!(
            p.write(reg::SLEEP_CONTROL, (3 << 2) | (1 << 5), &m),
            PlatformAction::None
        );
        assert_eq!(
            p.write(reg::SLEEP_CONTROL, 5 << 2, &m),
            PlatformAction::None
        );
        assert_eq!(p.read(reg::SLEEP_STATUS), 0);
        assert_eq!(p.write(reg::RESET, 1, &m), PlatformAction::Reset);
        assert_eq!(p.write(reg::RESET, 2, &m), PlatformAction::None);
    }
}
