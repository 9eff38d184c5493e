//! The durable key-value store of workload `net`: a hash table on the virtio disk, with no
//! RAM cache (every GET reads the disk), so a later boot on the same disk image finds the
//! keys an earlier one stored.
//!
//! Layout: slot `s` is sector `s` (512 bytes), for `s` in `0..slots` with
//! `slots = min(capacity in sectors, 8192)` (so the table of a given disk image is the
//! same on every boot). A key lives in the first slot, probing linearly (wrapping) from
//! `FNV-1a-64(key) % slots`, that is free or holds the key. A slot (integers little
//! endian):
//!
//! | bytes | content |
//! |---|---|
//! | 0..8 | magic `FTVMKV01` |
//! | 8..10 | key length (1..=64, u16) |
//! | 10..12 | value length (0..=256, u16) |
//! | 12..76 | key, zero-padded |
//! | 76..332 | value, zero-padded |
//! | 332..504 | zero |
//! | 504..512 | FNV-1a-64 of bytes 0..504 (u64) |
//!
//! A slot whose magic, lengths or checksum do not check out is free (an all-zero disk is
//! an empty table; a torn slot write loses only that slot). Keys are never deleted. A SET
//! writes the one sector and then FLUSHes; only then is it acknowledged.

use crate::virtio::blk::{Blk, BlkError, SECTOR};
use crate::virtio::noinit_zeroed;

/// Longest key.
pub const MAX_KEY: usize = 64;
/// Longest value.
pub const MAX_VALUE: usize = 256;
/// Most slots of a table.
const MAX_SLOTS: u64 = 8192;
/// The slot magic.
const MAGIC: &[u8; 8] = b"FTVMKV01";
/// Offsets of the slot fields.
const KEY_LEN_AT: usize = 8;
const VALUE_LEN_AT: usize = 10;
const KEY_AT: usize = 12;
const VALUE_AT: usize = KEY_AT + MAX_KEY;
const CHECKSUM_AT: usize = 504;
const _: () = assert!(VALUE_AT + MAX_VALUE <= CHECKSUM_AT);

/// An error of the store.
#[derive(Clone, Copy, Debug)]
pub enum KvError {
    /// The disk rejected a request.
    Io(BlkError),
    /// Every slot holds another key (or the disk has no sector).
    Full,
}

impl From<BlkError> for KvError {
    fn from(e: BlkError) -> KvError {
        KvError::Io(e)
    }
}

/// The store on a virtio-blk disk.
pub struct Kv {
    blk: Blk,
    slots: u64,
    /// The sector buffer for slot reads and writes.
    sector: &'static mut [u8; SECTOR],
}

impl Kv {
    /// The store on `blk`. Only once per boot.
    pub fn new(blk: Blk) -> Kv {
        let slots = blk.capacity().min(MAX_SLOTS);
        Kv {
            blk,
            slots,
            sector: noinit_zeroed!([u8; SECTOR]),
        }
    }

    /// Number of slots.
    pub fn slots(&self) -> u64 {
        self.slots
    }

    /// Reads the value of `key` into `value`; returns its length, or `None` if the key is
    /// not stored.
    pub fn get(
        &mut self,
        key: &[u8],
        value: &mut [u8; MAX_VALUE],
    ) -> Result<Option<usize>, KvError> {
        match self.find(key)? {
            (_, false) => Ok(None),
            (_, true) => {
                let len = usize::from(self.u16_at(VALUE_LEN_AT));
                value[..len].copy_from_slice(&self.sector[VALUE_AT..VALUE_AT + len]);
                Ok(Some(len))
            }
        }
    }

    /// Stores `value` under `key` durably (written and flushed).
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), KvError> {
        assert!((1..=MAX_KEY).contains(&key.len()) && value.len() <= MAX_VALUE);
        let (slot, _) = self.find(key)?;
        let s = &mut *self.sector;
        s.fill(0);
        s[..8].copy_from_slice(MAGIC);
        s[KEY_LEN_AT..KEY_LEN_AT + 2].copy_from_slice(&(key.len() as u16).to_le_bytes());
        s[VALUE_LEN_AT..VALUE_LEN_AT + 2].copy_from_slice(&(value.len() as u16).to_le_bytes());
        s[KEY_AT..KEY_AT + key.len()].copy_from_slice(key);
        s[VALUE_AT..VALUE_AT + value.len()].copy_from_slice(value);
        let sum = fnv1a(&s[..CHECKSUM_AT]);
        s[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
        self.blk.write(slot, &self.sector[..])?;
        self.blk.flush()?;
        Ok(())
    }

    /// Probes for `key`: returns the slot that holds it (`true`; the slot is left in the
    /// sector buffer) or the first free slot (`false`).
    fn find(&mut self, key: &[u8]) -> Result<(u64, bool), KvError> {
        if self.slots == 0 {
            return Err(KvError::Full);
        }
        let home = fnv1a(key) % self.slots;
        for i in 0..self.slots {
            let slot = (home + i) % self.slots;
            self.blk.read(slot, &mut self.sector[..])?;
            if !self.valid() {
                return Ok((slot, false));
            }
            let len = usize::from(self.u16_at(KEY_LEN_AT));
            if &self.sector[KEY_AT..KEY_AT + len] == key {
                return Ok((slot, true));
            }
        }
        Err(KvError::Full)
    }

    /// Whether the sector buffer holds a valid slot.
    fn valid(&self) -> bool {
        let s = &self.sector;
        let key_len = usize::from(self.u16_at(KEY_LEN_AT));
        let value_len = usize::from(self.u16_at(VALUE_LEN_AT));
        let sum = u64::from_le_bytes(s[CHECKSUM_AT..].try_into().unwrap());
        &s[..8] == MAGIC
            && (1..=MAX_KEY).contains(&key_len)
            && value_len <= MAX_VALUE
            && sum == fnv1a(&s[..CHECKSUM_AT])
    }

    /// The u16 at `at` in the sector buffer.
    fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.sector[at], self.sector[at + 1]])
    }
}

/// FNV-1a-64 of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
