//! The World seam: the one interface through which guest effects leave the VM.
//!
//! A standalone VM uses a live World that writes to the host. Later a recording World
//! (primary) holds outputs until they are committed and a replaying World (lockstep
//! secondary) feeds a log back in; the devices do not know which one they talk to.

use std::io::Write;

/// Where the guest's outbound effects go.
pub trait World: Send {
    /// Console bytes the guest wrote to its UART.
    fn console_output(&mut self, bytes: &[u8]);
    /// Called when the VM stops or is about to be snapshotted: flush buffered output.
    fn flush(&mut self) {}
}

/// A live World that writes console bytes to a host writer (stdout for `ftvm run`).
pub struct LiveWorld<W: Write + Send> {
    console: W,
    failed: bool,
}

impl<W: Write + Send> LiveWorld<W> {
    /// A World writing console output to `console`.
    pub fn new(console: W) -> Self {
        Self {
            console,
            failed: false,
        }
    }

    /// The writer, for callers that collect output in memory.
    pub fn console(&self) -> &W {
        &self.console
    }
}

impl<W: Write + Send> World for LiveWorld<W> {
    fn console_output(&mut self, bytes: &[u8]) {
        if self.failed {
            return;
        }
        if let Err(e) = self.console.write_all(bytes) {
            // A closed stdout must not stop the guest; report once and drop output.
            tracing::warn!("console output dropped: {e}");
            self.failed = true;
        }
    }

    fn flush(&mut self) {
        if !self.failed {
            let _ = self.console.flush();
        }
    }
}

/// A cloneable in-memory writer: give one clone to a [`LiveWorld`], read the other
/// (tests and benchmarks collect console output this way).
#[derive(Debug, Default, Clone)]
pub struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0.lock().map(|b| b.clone()).unwrap_or_default()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut b) => {
                b.extend_from_slice(buf);
                Ok(buf.len())
            }
            Err(_) => Err(std::io::Error::other("console buffer poisoned")),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_world_forwards_console_bytes() {
        let buf = SharedBuffer::default();
        let mut world = LiveWorld::new(buf.clone());
        world.console_output(b"hello ");
        world.console_output(b"world");
        world.flush();
        assert_eq!(buf.contents(), b"hello world");
    }
}
