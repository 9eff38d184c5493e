//! The 16550 UART console (COM1) on top of vm-superio, with saveable state.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

/// First port of COM1.
pub const COM1_PORT_BASE: u16 = 0x3f8;
/// Number of ports a 16550 occupies.
pub const COM1_PORT_LEN: u16 = 8;
/// The legacy interrupt line (GSI) of COM1.
pub const COM1_GSI: u32 = 4;

/// Records that the UART raised its interrupt; the VMM turns it into an interrupt at
/// the next exit boundary.
#[derive(Debug, Clone, Default)]
pub struct IrqFlag(Arc<AtomicBool>);

impl IrqFlag {
    /// Takes the flag, returning whether it was set.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl Trigger for IrqFlag {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::Release);
        Ok(())
    }
}

/// The saveable state of the UART (the register file and its input FIFO).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialConsoleState {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
    irq_pending: bool,
}

/// COM1: a 16550 whose transmitted bytes are collected for the World.
pub struct SerialConsole {
    uart: Serial<IrqFlag, NoEvents, Vec<u8>>,
    irq: IrqFlag,
}

impl std::fmt::Debug for SerialConsole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl Default for SerialConsole {
    fn default() -> Self {
        let irq = IrqFlag::default();
        Self {
            uart: Serial::new(irq.clone(), Vec::new()),
            irq,
        }
    }
}

impl SerialConsole {
    /// Rebuilds the UART from saved state.
    pub fn from_state(state: &SerialConsoleState) -> Self {
        let irq = IrqFlag::default();
        if state.irq_pending {
            let _ = irq.trigger();
        }
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        // `from_state` only fails when the input FIFO is larger than a 16550's; the
        // state is then treated as corrupt and a reset UART with the same registers
        // minus the excess input is the safest recovery.
        let uart = match Serial::from_state(&s, irq.clone(), NoEvents, Vec::new()) {
            Ok(u) => u,
            Err(e) => {
                tracing::warn!("serial state rejected ({e:?}); input FIFO dropped");
                let trimmed = SerialState {
                    in_buffer: Vec::new(),
                    ..s
                };
                Serial::from_state(&trimmed, irq.clone(), NoEvents, Vec::new())
                    .unwrap_or_else(|_| Serial::new(irq.clone(), Vec::new()))
            }
        };
        Self { uart, irq }
    }

    /// The saveable state. Transmitted bytes not yet taken are not part of it: the VMM
    /// drains them to the World at every exit.
    pub fn state(&self) -> SerialConsoleState {
        let s = self.uart.state();
        SerialConsoleState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
            irq_pending: self.irq.0.load(Ordering::Acquire),
        }
    }

    /// A byte read of register `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        self.uart.read(offset)
    }

    /// A byte write of `value` to register `offset`.
    pub fn write(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.uart.write(offset, value) {
            tracing::debug!("serial: write to register {offset} failed: {e:?}");
        }
    }

    /// Takes the bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.uart.writer_mut())
    }

    /// Takes a raised interrupt, returning whether one was raised.
    pub fn take_irq(&self) -> bool {
        self.irq.take()
    }

    /// How many input bytes the receive FIFO can take now.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues console input for the guest (raising the data-available interrupt if the
    /// guest enabled it). Returns how many bytes were taken: at most [`Self::input_room`],
    /// none in loopback mode.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Whether an interrupt is raised and not yet taken.
    pub fn irq_pending(&self) -> bool {
        self.irq.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transmitted_bytes_are_collected() {
        let mut s = SerialConsole::default();
        for b in b"hi\n" {
            s.write(0, *b);
        }
        assert_eq!(s.take_output(), b"hi\n");
        assert!(s.take_output().is_empty());
    }

    #[test]
    fn state_round_trips() {
        let mut s = SerialConsole::default();
        s.write(7, 0x5a); // scratch register
        s.write(3, 0x03); // line control: 8 bits
        s.write(1, 0x02); // IER: THR-empty interrupt
        let state = s.state();
        let mut r = SerialConsole::from_state(&state);
        assert_eq!(r.read(7), 0x5a);
        assert_eq!(r.state(), state);
    }
}
