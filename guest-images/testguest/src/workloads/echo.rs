//! Workload `echo`: reads lines from the console (COM1 input) and echoes them, so that
//! console input through the VMM's World can be tested.
//!
//! Prints `echo: ready`, then for each line `L` read prints `echo: L` (carriage returns
//! dropped, lines cut at 128 bytes, non-ASCII bytes shown as `?`). The line
//! `quit` prints `echo: bye` and powers off with exit code 0. While no input waits the
//! guest idles on the platform WAIT port, woken by the UART's receive interrupt.

use crate::cmdline::Cmdline;
use crate::io::{console_read, console_rx_interrupts, power_off, wait_for_event, COM1_GSI};
use crate::ioapic;

/// Longest line kept.
const LINE_MAX: usize = 128;

/// Runs the workload.
pub fn run(cmdline: &mut Cmdline) -> ! {
    cmdline.finish();
    ioapic::route(COM1_GSI);
    console_rx_interrupts();
    println!("echo: ready");
    let mut line = [0u8; LINE_MAX];
    let mut len = 0;
    loop {
        let Some(byte) = console_read() else {
            wait_for_event();
            continue;
        };
        match byte {
            b'\n' => {
                let text = &mut line[..len];
                for b in text.iter_mut() {
                    if !b.is_ascii() {
                        *b = b'?';
                    }
                }
                let text = core::str::from_utf8(text).unwrap_or("?");
                if text == "quit" {
                    println!("echo: bye");
                    power_off(0);
                }
                println!("echo: {text}");
                len = 0;
            }
            b'\r' => {}
            _ if len < LINE_MAX => {
                line[len] = byte;
                len += 1;
            }
            _ => {}
        }
    }
}
