//! A synchronous virtio-blk driver: one request at a time, each a chain of a 16-byte
//! header, at most one data buffer (up to [`MAX_TRANSFER`] bytes; larger transfers are
//! split) and a status byte.
//!
//! A request costs one VM exit (its QueueNotify) when the device completes it during that
//! exit, which is how the device is expected to work: the driver then finds it in the
//! used ring at once, with used-buffer interrupts suppressed. Otherwise it enables them,
//! acknowledges a pending interrupt if needed and idles (WAIT) until the completion.

use super::mmio::{Notifier, Transport};
use super::noinit_zeroed;
use super::queue::{QueueMem, Virtq, DESC_NEXT, DESC_WRITE};
use crate::io::wait_for_event;

/// Sector size of the request interface.
pub const SECTOR: usize = 512;
/// Largest data buffer of one request (larger transfers are split).
pub const MAX_TRANSFER: usize = 64 * 1024;

/// VIRTIO_BLK_F_SEG_MAX.
const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO: the disk is read-only.
const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH: the device supports FLUSH.
const F_FLUSH: u64 = 1 << 9;
/// Configuration: capacity in sectors (u64).
const CONFIG_CAPACITY: usize = 0x00;

/// Request types.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
/// Status the driver stores before a request, to detect a device that did not write one.
const STATUS_UNSET: u8 = 0xff;

/// The request header and status byte, in memory the device reads and writes.
#[repr(C, align(16))]
struct ReqMem {
    /// Request type (`T_*`).
    kind: u32,
    /// Reserved (0).
    reserved: u32,
    /// First sector.
    sector: u64,
    /// Status written by the device (0 OK, 1 IOERR, 2 UNSUPP).
    status: u8,
}

/// An error of a request.
#[derive(Clone, Copy, Debug)]
pub enum BlkError {
    /// The device answered with this status (1 IOERR, 2 UNSUPP, 0xff: none written).
    Status(u8),
    /// The request lies outside the disk or is not a whole number of sectors.
    Range,
}

/// A virtio-blk device.
pub struct Blk {
    transport: Transport,
    queue: Virtq,
    notifier: Notifier,
    /// The request memory (exclusively owned; shared only with the device).
    req: *mut ReqMem,
    /// Capacity in 512-byte sectors.
    capacity: u64,
    features: u64,
}

impl Blk {
    /// Initialises the block device behind `transport`. Only once per boot.
    pub fn new(mut transport: Transport) -> Result<Blk, &'static str> {
        let features = transport.begin_init(F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH)?;
        let mut queue = Virtq::new(noinit_zeroed!(QueueMem));
        transport.setup_queue(0, &mut queue)?;
        if queue.size() < 3 {
            return Err("the request queue has fewer than 3 entries");
        }
        let capacity = transport.config_u64(CONFIG_CAPACITY);
        transport.driver_ok();
        let notifier = transport.notifier(0);
        Ok(Blk {
            transport,
            queue,
            notifier,
            req: noinit_zeroed!(ReqMem),
            capacity,
            features,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the device says the disk is read-only.
    pub fn read_only(&self) -> bool {
        self.features & F_RO != 0
    }

    /// Reads `buf.len()` bytes (a multiple of 512) from `sector` on.
    pub fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), BlkError> {
        self.transfer(T_IN, sector, buf.as_mut_ptr() as u64, buf.len())
    }

    /// Writes `buf` (a multiple of 512 bytes) from `sector` on.
    pub fn write(&mut self, sector: u64, buf: &[u8]) -> Result<(), BlkError> {
        self.transfer(T_OUT, sector, buf.as_ptr() as u64, buf.len())
    }

    /// Makes all completed writes durable (a no-op if the device has no FLUSH, i.e. no
    /// volatile write cache).
    pub fn flush(&mut self) -> Result<(), BlkError> {
        if self.features & F_FLUSH == 0 {
            return Ok(());
        }
        self.request(T_FLUSH, 0, None)
    }

    /// Reads or writes `len` bytes at `addr` from `sector` on, in requests of at most
    /// [`MAX_TRANSFER`] bytes.
    fn transfer(&mut self, kind: u32, sector: u64, addr: u64, len: usize) -> Result<(), BlkError> {
        let sectors = (len / SECTOR) as u64;
        if !len.is_multiple_of(SECTOR)
            || sector
                .checked_add(sectors)
                .is_none_or(|e| e > self.capacity)
        {
            return Err(BlkError::Range);
        }
        let mut done = 0;
        while done < len {
            let chunk = (len - done).min(MAX_TRANSFER);
            let first = sector + (done / SECTOR) as u64;
            self.request(kind, first, Some((addr + done as u64, chunk as u32)))?;
            done += chunk;
        }
        Ok(())
    }

    /// Submits one request (header, optional data buffer, status) and waits for it.
    fn request(
        &mut self,
        kind: u32,
        sector: u64,
        data: Option<(u64, u32)>,
    ) -> Result<(), BlkError> {
        let req = self.req;
        // SAFETY: `req` is this driver's request memory; no request is in flight, so the
        // device does not access it now.
        unsafe {
            req.write_volatile(ReqMem {
                kind,
                reserved: 0,
                sector,
                status: STATUS_UNSET,
            });
        }
        // SAFETY: only an address is computed.
        let status_addr = unsafe { core::ptr::addr_of!((*req).status) } as u64;
        self.queue.set_desc(0, req as u64, 16, DESC_NEXT, 1);
        match data {
            Some((addr, len)) => {
                let flags = if kind == T_IN { DESC_WRITE } else { 0 };
                self.queue.set_desc(1, addr, len, flags | DESC_NEXT, 2);
                self.queue.set_desc(2, status_addr, 1, DESC_WRITE, 0);
            }
            None => self.queue.set_desc(1, status_addr, 1, DESC_WRITE, 0),
        }
        self.queue.push(0);
        self.notifier.notify();
        self.wait();
        // SAFETY: the device has used the chain, so it no longer writes the status.
        match unsafe { core::ptr::addr_of!((*req).status).read_volatile() } {
            0 => Ok(()),
            status => Err(BlkError::Status(status)),
        }
    }

    /// Waits until the device has used the (only) request in flight.
    fn wait(&mut self) {
        loop {
            if let Some((head, _)) = self.queue.pop_used() {
                assert_eq!(head, 0, "virtio-blk: the device used an unknown chain");
                return;
            }
            self.queue.set_interrupts(true);
            if !self.queue.has_used() && !self.transport.ack_interrupts() {
                wait_for_event();
            }
            self.queue.set_interrupts(false);
        }
    }
}
