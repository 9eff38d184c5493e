//! A World wrapper that folds every outbound effect (console bytes, frames, disk writes
//! and flushes) into one running digest, so two runs can be compared by their outputs.

use ftvm_devices::world::{IdleRequest, Wake, World, WorldError};

/// Forwards to an inner World and digests the outputs on the way.
pub struct OutputDigestWorld {
    inner: Box<dyn World>,
    digest: u64,
}

impl OutputDigestWorld {
    /// Wraps `inner`, continuing from `digest`.
    pub fn new(inner: Box<dyn World>, digest: u64) -> Self {
        Self { inner, digest }
    }

    /// The digest of all outputs so far.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    fn fold(&mut self, tag: u8, a: u64, b: u64, data: &[u8]) {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(&self.digest.to_le_bytes());
        h.update(&[tag]);
        h.update(&a.to_le_bytes());
        h.update(&b.to_le_bytes());
        h.update(data);
        self.digest = h.digest();
    }
}

impl World for OutputDigestWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        self.fold(1, 0, 0, bytes);
        self.inner.console_output(bytes);
    }

    fn transmit(&mut self, frame: &[u8]) {
        self.fold(2, 0, 0, frame);
        self.inner.transmit(frame);
    }

    fn receive(&mut self, exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        self.inner.receive(exit)
    }

    fn has_network(&self) -> bool {
        self.inner.has_network()
    }

    fn input_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.inner.input_fds()
    }

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        self.inner.disk_read(disk, offset, buf)
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        self.fold(3, disk as u64, offset, data);
        self.inner.disk_write(disk, offset, data)
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        self.fold(4, disk as u64, 0, &[]);
        self.inner.disk_flush(disk)
    }

    fn console_input(&mut self, exit: u64, max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        self.inner.console_input(exit, max)
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        self.inner.idle(request)
    }

    fn set_virtual_now(&mut self, now_ns: u64) {
        self.inner.set_virtual_now(now_ns);
    }

    fn pause_requested(&mut self) -> bool {
        self.inner.pause_requested()
    }

    fn flush(&mut self) {
        self.inner.flush();
    }
}
