//! virtio-blk: requests from the guest's queue executed against a World disk. Every
//! byte the device puts into guest memory goes through the dirty-tracked memory API.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::disk::SECTOR_SIZE;
use crate::world::World;
use crate::GuestMem;

/// VIRTIO_BLK_F_SEG_MAX.
pub const F_SEG_MAX: u64 = 1 << 2;
/// VIRTIO_BLK_F_RO.
pub const F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_BLK_SIZE.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// VIRTIO_BLK_F_FLUSH.
pub const F_FLUSH: u64 = 1 << 9;
/// Largest number of data segments in one request.
pub const SEG_MAX: u32 = 126;
/// Largest data size of one request.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// Request types.
pub const T_IN: u32 = 0;
/// Write.
pub const T_OUT: u32 = 1;
/// Flush.
pub const T_FLUSH: u32 = 4;
/// Device id string.
pub const T_GET_ID: u32 = 8;
/// Request status: success.
pub const S_OK: u8 = 0;
/// Request status: I/O error (also: bad request, read-only, out of range).
pub const S_IOERR: u8 = 1;
/// Request status: unsupported request type.
pub const S_UNSUPP: u8 = 2;
/// Length of the device id.
const ID_LEN: usize = 20;

/// A block device model.
#[derive(Debug)]
pub struct Block {
    disk: usize,
    capacity_sectors: u64,
    read_only: bool,
}

/// A data segment of a request.
struct Segment {
    addr: GuestAddress,
    len: u32,
    device_writes: bool,
}

impl Block {
    /// One request queue of 256 entries.
    pub const QUEUE_SIZES: &'static [u16] = &[256];

    /// A device on World disk `disk`.
    pub fn new(disk: usize, capacity_sectors: u64, read_only: bool) -> Self {
        Self {
            disk,
            capacity_sectors,
            read_only,
        }
    }

    /// Offered feature bits (besides VERSION_1).
    pub fn features(&self) -> u64 {
        F_SEG_MAX | F_BLK_SIZE | F_FLUSH | if self.read_only { F_RO } else { 0 }
    }

    /// Reads the config space: capacity, size_max, seg_max, geometry, blk_size.
    pub fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; 0x18];
        cfg[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        cfg[0x0c..0x10].copy_from_slice(&SEG_MAX.to_le_bytes());
        cfg[0x14..0x18].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| cfg.get(o + i))
                .copied()
                .unwrap_or(0);
        }
    }

    /// Executes every available request; returns whether any buffer was used.
    pub fn process(&mut self, queue: &mut Queue, mem: &GuestMem, world: &mut dyn World) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.handle(&descs, mem, world);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::debug!("virtio-blk: cannot return a buffer: {e:?}");
                break;
            }
            used = true;
        }
        used
    }

    /// Handles one request; returns the number of bytes written into guest buffers.
    /// A chain without a usable status byte (too short, looping, status not writable)
    /// cannot be answered and is returned with length 0.
    fn handle(&mut self, descs: &[Descriptor], mem: &GuestMem, world: &mut dyn World) -> u32 {
        let Some((last, rest)) = descs.split_last() else {
            return 0;
        };
        if rest.is_empty() || !last.is_write_only() || last.len() == 0 || last.has_next() {
            return 0;
        }
        let Some(status_addr) = last.addr().0.checked_add(u64::from(last.len()) - 1) else {
            return 0;
        };
        let mut segments: Vec<Segment> = rest[1..]
            .iter()
            .map(|d| Segment {
                addr: d.addr(),
                len: d.len(),
                device_writes: d.is_write_only(),
            })
            .collect();
        if last.len() > 1 {
            segments.push(Segment {
                addr: last.addr(),
                len: last.len() - 1,
                device_writes: true,
            });
        }
        let header = &rest[0];
        let (status, written) = if header.is_write_only() || header.len() < 16 {
            (S_IOERR, 0)
        } else {
            match mem.read_obj::<[u8; 16]>(header.addr()) {
                Ok(h) => self.execute(&h, &segments, mem, world),
                Err(_) => (S_IOERR, 0),
            }
        };
        if mem.write_obj(status, GuestAddress(status_addr)).is_err() {
            return 0;
        }
        written + 1
    }

    fn execute(
        &mut self,
        header: &[u8; 16],
        segments: &[Segment],
        mem: &GuestMem,
        world: &mut dyn World,
    ) -> (u8, u32) {
        let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&header[8..16]);
        let sector = u64::from_le_bytes(sector);
        match kind {
            T_IN | T_OUT => {
                let device_writes = kind == T_IN;
                if kind == T_OUT && self.read_only {
                    return (S_IOERR, 0);
                }
                let Some(offset) = self.check_range(sector, segments, device_writes) else {
                    return (S_IOERR, 0);
                };
                self.transfer(offset, segments, device_writes, mem, world)
            }
            T_FLUSH => match world.disk_flush(self.disk) {
                Ok(()) => (S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    (S_IOERR, 0)
                }
            },
            T_GET_ID => {
                let mut id = [0u8; ID_LEN];
                let name = format!("ftvm-disk{}", self.disk);
                id[..name.len()].copy_from_slice(name.as_bytes());
                match segments.first() {
                    Some(s) if s.device_writes => {
                        let n = (s.len as usize).min(ID_LEN);
                        match mem.write_slice(&id[..n], s.addr) {
                            Ok(()) => (S_OK, n as u32),
                            Err(_) => (S_IOERR, 0),
                        }
                    }
                    _ => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// Validates a read or write: direction of every segment, a non-empty whole number
    /// of sectors, a bounded size, and the range inside the disk. Returns the byte
    /// offset.
    fn check_range(&self, sector: u64, segments: &[Segment], device_writes: bool) -> Option<u64> {
        if segments.is_empty() || segments.len() > SEG_MAX as usize {
            return None;
        }
        if segments.iter().any(|s| s.device_writes != device_writes) {
            return None;
        }
        let total: u64 = segments.iter().map(|s| u64::from(s.len)).sum();
        if total == 0 || !total.is_multiple_of(SECTOR_SIZE) || total > MAX_REQUEST_BYTES {
            return None;
        }
        let end_sector = sector.checked_add(total / SECTOR_SIZE)?;
        if end_sector > self.capacity_sectors {
            return None;
        }
        sector.checked_mul(SECTOR_SIZE)
    }

    fn transfer(
        &mut self,
        mut offset: u64,
        segments: &[Segment],
        device_writes: bool,
        mem: &GuestMem,
        world: &mut dyn World,
    ) -> (u8, u32) {
        let mut written = 0u32;
        for s in segments {
            let mut buf = vec![0u8; s.len as usize];
            let ok = if device_writes {
                world.disk_read(self.disk, offset, &mut buf).is_ok()
                    && mem.write_slice(&buf, s.addr).is_ok()
            } else {
                mem.read_slice(&mut buf, s.addr).is_ok()
                    && world.disk_write(self.disk, offset, &buf).is_ok()
            };
            if !ok {
                return (S_IOERR, written);
            }
            if device_writes {
                written += s.len;
            }
            offset += u64::from(s.len);
        }
        (S_OK, written)
    }
}
