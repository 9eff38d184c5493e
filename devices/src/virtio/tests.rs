//! Tests that drive the virtio devices through their MMIO registers the way a driver
//! would, with well-formed and hostile queues.

use vm_memory::{Address, Bytes, GuestAddress};

use super::blk::{S_IOERR, S_OK, S_UNSUPP, T_FLUSH, T_IN, T_OUT};
use super::{DeviceConfig, VirtioMmio, F_VERSION_1};
use crate::backend::disk::DiskFile;
use crate::world::live::{LiveWorld, SharedBuffer};
use crate::world::{IdleRequest, Wake, World, WorldError};
use crate::GuestMem;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const MEM_SIZE: usize = 0x10_0000;
const F_WRITE: u16 = 2;
const F_NEXT: u16 = 1;

/// A World that records transmitted frames and serves one disk.
struct TestWorld {
    live: LiveWorld<SharedBuffer>,
    sent: Vec<Vec<u8>>,
}

impl World for TestWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        self.live.console_output(bytes);
    }
    fn transmit(&mut self, frame: &[u8]) {
        self.sent.push(frame.to_vec());
    }
    fn disk_read(&mut self, d: usize, o: u64, b: &mut [u8]) -> Result<(), WorldError> {
        self.live.disk_read(d, o, b)
    }
    fn disk_write(&mut self, d: usize, o: u64, b: &[u8]) -> Result<(), WorldError> {
        self.live.disk_write(d, o, b)
    }
    fn disk_flush(&mut self, d: usize) -> Result<(), WorldError> {
        self.live.disk_flush(d)
    }
    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        self.live.idle(request)
    }
}

struct Rig {
    mem: GuestMem,
    dev: VirtioMmio,
    world: TestWorld,
    _dir: tempfile::TempDir,
    disk_path: std::path::PathBuf,
    next_desc: u16,
    avail_idx: u16,
}

fn w32(dev: &mut VirtioMmio, off: u64, v: u32, mem: &GuestMem, world: &mut TestWorld) {
    dev.write(off, &v.to_le_bytes(), mem, world);
}

fn r32(dev: &mut VirtioMmio, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.read(off, &mut b);
    u32::from_le_bytes(b)
}

impl Rig {
    fn new(config_of: impl FnOnce(u64) -> DeviceConfig, read_only: bool) -> Self {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let disk_path = dir.path().join("d.img");
        std::fs::write(&disk_path, vec![0u8; 64 * 512]).unwrap();
        let disk = DiskFile::open(&disk_path, read_only).unwrap();
        let cap = disk.capacity_sectors();
        let world = TestWorld {
            live: LiveWorld::new(SharedBuffer::default()).with_disk(disk),
            sent: Vec::new(),
        };
        let dev = VirtioMmio::new(config_of(cap));
        let mut rig = Self {
            mem,
            dev,
            world,
            _dir: dir,
            disk_path,
            next_desc: 0,
            avail_idx: 0,
        };
        rig.negotiate(true);
        rig
    }

    fn reg(&mut self, off: u64, v: u32) {
        w32(&mut self.dev, off, v, &self.mem, &mut self.world);
    }

    fn negotiate(&mut self, version_1: bool) {
        self.reg(0x70, 0);
        self.reg(0x70, 1 | 2);
        self.reg(0x24, 1);
        self.reg(
            0x20,
            if version_1 {
                (F_VERSION_1 >> 32) as u32
            } else {
                0
            },
        );
        self.reg(0x70, 1 | 2 | 8);
    }

    fn setup_queue(&mut self, index: u32, desc: u64) {
        self.reg(0x30, index);
        self.reg(0x38, QSIZE.into());
        self.reg(0x80, desc as u32);
        self.reg(0x84, (desc >> 32) as u32);
        self.reg(0x90, AVAIL as u32);
        self.reg(0xa0, USED as u32);
        self.reg(0x44, 1);
        self.reg(0x70, 1 | 2 | 8 | 4);
    }

    /// Writes a chain of (addr, len, flags) descriptors and makes it available.
    fn post(&mut self, chain: &[(u64, u32, u16)]) -> u16 {
        if self.next_desc as usize + chain.len() > QSIZE as usize {
            self.next_desc = 0; // earlier chains have all been used
        }
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let idx = self.next_desc + i as u16;
            let last = i + 1 == chain.len();
            let flags = flags | if last { 0 } else { F_NEXT };
            let at = GuestAddress(DESC + u64::from(idx) * 16);
            self.mem.write_obj(addr, at).unwrap();
            self.mem.write_obj(len, at.unchecked_add(8)).unwrap();
            self.mem.write_obj(flags, at.unchecked_add(12)).unwrap();
            self.mem.write_obj(idx + 1, at.unchecked_add(14)).unwrap();
        }
        self.next_desc += chain.len() as u16;
        self.push_avail(head);
        head
    }

    fn push_avail(&mut self, head: u16) {
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn notify(&mut self, queue: u32) {
        self.reg(0x50, queue);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    /// The (id, len) of used element `n`.
    fn used(&self, n: u16) -> (u32, u32) {
        let at = USED + 4 + 8 * u64::from(n % QSIZE);
        (
            self.mem.read_obj(GuestAddress(at)).unwrap(),
            self.mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }

    fn status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

fn blk(read_only: bool) -> Rig {
    let mut rig = Rig::new(
        |cap| DeviceConfig::Block {
            disk: 0,
            capacity_sectors: cap,
            read_only,
        },
        read_only,
    );
    rig.setup_queue(0, DESC);
    rig
}

fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) {
    mem.write_obj(kind, GuestAddress(at)).unwrap();
    mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
    mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
}

/// Submits one block request with header at 0x8000, data at 0x9000 and status at
/// 0x7ff0; returns the status byte and the used length.
fn request(rig: &mut Rig, kind: u32, sector: u64, data: &[(u64, u32, u16)]) -> (u8, u32) {
    header(&rig.mem, 0x8000, kind, sector);
    rig.mem.write_obj(0xeeu8, GuestAddress(0x7ff0)).unwrap();
    let mut chain = vec![(0x8000, 16, 0)];
    chain.extend_from_slice(data);
    chain.push((0x7ff0, 1, F_WRITE));
    let before = rig.used_idx();
    rig.post(&chain);
    rig.notify(0);
    assert_eq!(rig.used_idx(), before.wrapping_add(1), "request answered");
    (rig.status(0x7ff0), rig.used(before).1)
}

#[test]
fn registers_identify_a_modern_device() {
    let mut rig = blk(false);
    assert_eq!(r32(&mut rig.dev, 0x000), 0x7472_6976);
    assert_eq!(r32(&mut rig.dev, 0x004), 2);
    assert_eq!(r32(&mut rig.dev, 0x008), 2);
    assert_eq!(r32(&mut rig.dev, 0x070) & 8, 8, "FEATURES_OK accepted");
    let mut cap = [0u8; 8];
    rig.dev.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 64);
}

#[test]
fn a_driver_without_version_1_is_refused() {
    let mut rig = blk(false);
    rig.negotiate(false);
    assert_eq!(
        r32(&mut rig.dev, 0x070) & 8,
        0,
        "FEATURES_OK must not stick"
    );
}

#[test]
fn write_then_read_round_trips_and_reaches_the_file() {
    let mut rig = blk(false);
    rig.mem
        .write_slice(&[0x5a; 1024], GuestAddress(0x9000))
        .unwrap();
    assert_eq!(request(&mut rig, T_OUT, 3, &[(0x9000, 1024, 0)]), (S_OK, 1));
    assert_eq!(request(&mut rig, T_FLUSH, 0, &[]), (S_OK, 1));
    let file = std::fs::read(&rig.disk_path).unwrap();
    assert!(file[3 * 512..5 * 512].iter().all(|&b| b == 0x5a));
    assert!(file[5 * 512..].iter().all(|&b| b == 0));
    assert_eq!(
        request(
            &mut rig,
            T_IN,
            3,
            &[(0xa000, 512, F_WRITE), (0xb000, 512, F_WRITE)]
        ),
        (S_OK, 1025)
    );
    let mut back = [0u8; 512];
    rig.mem.read_slice(&mut back, GuestAddress(0xb000)).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
    assert_eq!(
        r32(&mut rig.dev, 0x060) & 1,
        1,
        "used-buffer interrupt raised"
    );
    assert!(rig.dev.take_irq());
}

#[test]
fn bad_requests_get_an_error_status_and_the_device_keeps_working() {
    let mut rig = blk(false);
    let outside = MEM_SIZE as u64 + 0x1000;
    assert_eq!(
        request(&mut rig, T_IN, 0, &[(outside, 512, F_WRITE)]).0,
        S_IOERR
    );
    assert_eq!(request(&mut rig, T_OUT, 0, &[(outside, 512, 0)]).0, S_IOERR);
    assert_eq!(
        request(&mut rig, T_IN, 0, &[(0x9000, 0, F_WRITE)]).0,
        S_IOERR,
        "zero length"
    );
    assert_eq!(
        request(&mut rig, T_IN, 0, &[(0x9000, 100, F_WRITE)]).0,
        S_IOERR,
        "partial sector"
    );
    assert_eq!(
        request(&mut rig, T_IN, 0, &[(0x9000, 8 << 20, F_WRITE)]).0,
        S_IOERR,
        "oversize"
    );
    assert_eq!(request(&mut rig, T_IN, 0, &[]).0, S_IOERR, "no data");
    assert_eq!(
        request(&mut rig, T_IN, 63, &[(0x9000, 1024, F_WRITE)]).0,
        S_IOERR,
        "past the end"
    );
    assert_eq!(
        request(&mut rig, T_IN, u64::MAX, &[(0x9000, 512, F_WRITE)]).0,
        S_IOERR,
        "overflow"
    );
    assert_eq!(
        request(&mut rig, T_OUT, 0, &[(0x9000, 512, F_WRITE)]).0,
        S_IOERR,
        "wrong direction"
    );
    assert_eq!(request(&mut rig, 77, 0, &[(0x9000, 512, 0)]).0, S_UNSUPP);
    // Still healthy.
    assert_eq!(
        request(&mut rig, T_IN, 0, &[(0x9000, 512, F_WRITE)]),
        (S_OK, 513)
    );
}

#[test]
fn read_only_disks_reject_writes() {
    let mut rig = blk(true);
    assert_eq!(r32(&mut rig.dev, 0x010) & (1 << 5), 1 << 5, "RO offered");
    rig.mem
        .write_slice(&[1; 512], GuestAddress(0x9000))
        .unwrap();
    assert_eq!(request(&mut rig, T_OUT, 0, &[(0x9000, 512, 0)]).0, S_IOERR);
    assert!(std::fs::read(&rig.disk_path)
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        request(&mut rig, T_IN, 0, &[(0x9000, 512, F_WRITE)]).0,
        S_OK
    );
}

#[test]
fn looping_and_unanswerable_chains_do_not_hang_or_panic() {
    let mut rig = blk(false);
    // A two-descriptor loop: 0 -> 1 -> 0.
    header(&rig.mem, 0x8000, T_IN, 0);
    let d = |i: u64| GuestAddress(DESC + i * 16);
    rig.mem.write_obj(0x8000u64, d(0)).unwrap();
    rig.mem.write_obj(16u32, d(0).unchecked_add(8)).unwrap();
    rig.mem.write_obj(F_NEXT, d(0).unchecked_add(12)).unwrap();
    rig.mem.write_obj(1u16, d(0).unchecked_add(14)).unwrap();
    rig.mem.write_obj(0x9000u64, d(1)).unwrap();
    rig.mem.write_obj(512u32, d(1).unchecked_add(8)).unwrap();
    rig.mem
        .write_obj(F_NEXT | F_WRITE, d(1).unchecked_add(12))
        .unwrap();
    rig.mem.write_obj(0u16, d(1).unchecked_add(14)).unwrap();
    rig.next_desc = 2;
    rig.push_avail(0);
    rig.notify(0);
    assert_eq!(rig.used_idx(), 1, "the looping chain is returned");
    // A chain whose only descriptor is the header: no status byte to answer with.
    rig.post(&[(0x8000, 16, 0)]);
    rig.notify(0);
    assert_eq!(rig.used(1).1, 0);
    // A descriptor index beyond the table.
    rig.push_avail(QSIZE + 3);
    rig.notify(0);
    assert_eq!(
        request(&mut rig, T_IN, 0, &[(0x9000, 512, F_WRITE)]).0,
        S_OK
    );
}

#[test]
fn garbage_ring_indices_and_queue_addresses_are_survived() {
    let mut rig = blk(false);
    rig.mem
        .write_obj(0x7fffu16, GuestAddress(AVAIL + 2))
        .unwrap();
    rig.notify(0);
    rig.notify(9); // no such queue
    let mut rig = blk(false);
    rig.setup_queue(0, MEM_SIZE as u64 * 4);
    rig.notify(0);
    assert_eq!(r32(&mut rig.dev, 0x070) & 64, 64, "DEVICE_NEEDS_RESET");
}

fn net() -> Rig {
    let mut rig = Rig::new(
        |_| DeviceConfig::Net {
            mac: [2, 0, 0, 0, 0, 1],
        },
        false,
    );
    rig.setup_queue(1, DESC);
    rig
}

#[test]
fn transmit_strips_the_header_and_drops_malformed_chains() {
    let mut rig = net();
    let frame: Vec<u8> = (0..60u8).collect();
    rig.mem
        .write_slice(&[0u8; 12], GuestAddress(0x9000))
        .unwrap();
    rig.mem.write_slice(&frame, GuestAddress(0x900c)).unwrap();
    rig.post(&[(0x9000, 72, 0)]);
    rig.post(&[(0x9000, 72, F_WRITE)]); // device-writable: malformed
    rig.post(&[(0x9000, 8, 0)]); // shorter than the header
    rig.post(&[(MEM_SIZE as u64, 72, 0)]); // outside memory
    rig.notify(1);
    assert_eq!(rig.world.sent, vec![frame]);
    assert_eq!(rig.used_idx(), 4, "every chain is returned");
    let mut mac = [0u8; 6];
    rig.dev.read(0x100, &mut mac);
    assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
}

#[test]
fn receive_fills_posted_buffers_and_returns_small_ones_empty() {
    let mut rig = net();
    rig.setup_queue(0, DESC + 0x800);
    // Descriptors of the receive queue live at DESC + 0x800.
    let post_rx = |rig: &mut Rig, idx: u16, addr: u64, len: u32| {
        let at = GuestAddress(DESC + 0x800 + u64::from(idx) * 16);
        rig.mem.write_obj(addr, at).unwrap();
        rig.mem.write_obj(len, at.unchecked_add(8)).unwrap();
        rig.mem.write_obj(F_WRITE, at.unchecked_add(12)).unwrap();
        rig.push_avail(idx);
    };
    assert!(!rig.dev.can_receive(&rig.mem));
    post_rx(&mut rig, 0, 0xa000, 2048);
    post_rx(&mut rig, 1, 0xb000, 20);
    assert!(rig.dev.can_receive(&rig.mem));
    let frame = vec![0xabu8; 100];
    rig.dev.deliver(&frame, &rig.mem);
    rig.dev.deliver(&frame, &rig.mem);
    assert_eq!(rig.used(0), (0, 112));
    assert_eq!(rig.used(1), (1, 0), "too small: returned empty");
    let mut got = vec![0u8; 112];
    rig.mem.read_slice(&mut got, GuestAddress(0xa000)).unwrap();
    assert_eq!(&got[12..], &frame[..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert!(!rig.dev.can_receive(&rig.mem));
    // A delivered frame leaves an interrupt pending until it is taken: a guest that asks
    // to wait for an event at this exit must resume at once, not sleep past its frame.
    assert!(rig.dev.irq_pending());
    assert!(rig.dev.take_irq());
    assert!(!rig.dev.irq_pending());
}
