//! Checkpoints of a running VM, and the standby VM that checkpoints are applied to.
//!
//! A checkpoint is the VM's state (vCPU, VM-level KVM state, devices, counters; the
//! snapshot payload without page contents) plus the contents of the pages written since
//! the previous checkpoint. A [`Standby`] is a created but never-run VM: pages and state
//! are written into it as they arrive, and [`Standby::activate`] turns it into a [`Vm`]
//! that continues from the last state applied.

use ftvm_devices::world::World;
use ftvm_devices::GuestMem;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::{create_kvm, KvmParts, Vm, VmError};
use crate::layout::PAGE_SIZE;
use crate::memory::{self, PageSet};
use crate::snapshot::{self, SnapshotState};

/// Guest pages and their contents: `data` holds one 4 KiB page per entry of `gpas`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageBatch {
    /// Guest-physical addresses, page aligned.
    pub gpas: Vec<u64>,
    /// The pages' contents, in `gpas` order.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl PageBatch {
    /// Number of pages.
    pub fn len(&self) -> usize {
        self.gpas.len()
    }

    /// Whether the batch holds no page.
    pub fn is_empty(&self) -> bool {
        self.gpas.is_empty()
    }
}

impl Vm {
    /// Captures the VM's state for a checkpoint (the last exit's I/O completed first).
    /// The VM can keep running afterwards.
    pub fn capture_state(&mut self) -> Result<Vec<u8>, VmError> {
        let state = self.capture_snapshot_state()?;
        Ok(snapshot::encode_state(&state)?)
    }

    /// Every page written since boot or restore (what a fresh replica needs).
    pub fn touched_pages(&mut self) -> Result<PageSet, VmError> {
        self.collect_dirty()?;
        Ok(self.touched.clone())
    }

    /// The contents of `gpas` (the vCPU must be stopped, as between two runs).
    pub fn read_pages(&self, gpas: impl IntoIterator<Item = u64>) -> Result<PageBatch, VmError> {
        read_pages(&self.mem, gpas)
    }
}

fn read_pages(mem: &GuestMem, gpas: impl IntoIterator<Item = u64>) -> Result<PageBatch, VmError> {
    let mut batch = PageBatch::default();
    for gpa in gpas {
        let at = batch.data.len();
        batch.data.resize(at + PAGE_SIZE as usize, 0);
        mem.read_slice(&mut batch.data[at..], GuestAddress(gpa))
            .map_err(|e| VmError::BadCheckpoint(format!("page {gpa:#x}: {e}")))?;
        batch.gpas.push(gpa);
    }
    Ok(batch)
}

/// A created VM that has never run, holding a replica of a primary's guest.
pub struct Standby {
    parts: KvmParts,
    mem: GuestMem,
    mem_mib: u64,
    touched: PageSet,
    state: Option<SnapshotState>,
}

impl std::fmt::Debug for Standby {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standby")
            .field("mem_mib", &self.mem_mib)
            .field("pages", &self.touched.len())
            .field("has_state", &self.state.is_some())
            .finish_non_exhaustive()
    }
}

impl Standby {
    /// Creates the VM (memory, irqchip, vCPU) so that taking over costs only the state
    /// restore.
    pub fn new(mem_mib: u64) -> Result<Self, VmError> {
        let mem = memory::allocate(mem_mib)?;
        let parts = create_kvm(&mem)?;
        Ok(Self {
            touched: PageSet::empty_for(&mem),
            parts,
            mem,
            mem_mib,
            state: None,
        })
    }

    /// Guest memory size in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.mem_mib
    }

    /// Pages applied so far (ever).
    pub fn pages(&self) -> usize {
        self.touched.len()
    }

    /// Whether a complete state has been applied (the standby can take over).
    pub fn has_state(&self) -> bool {
        self.state.is_some()
    }

    /// Writes `batch` into guest memory. A page outside RAM, unaligned, or data of the
    /// wrong length is refused before anything is written.
    pub fn apply_pages(&mut self, batch: &PageBatch) -> Result<(), VmError> {
        if batch.data.len() as u64 != batch.gpas.len() as u64 * PAGE_SIZE {
            return Err(VmError::BadCheckpoint(format!(
                "{} pages but {} bytes of data",
                batch.gpas.len(),
                batch.data.len()
            )));
        }
        if let Some(&gpa) = batch
            .gpas
            .iter()
            .find(|&&g| g % PAGE_SIZE != 0 || !memory::in_ram(&self.mem, g, PAGE_SIZE))
        {
            return Err(VmError::BadCheckpoint(format!(
                "page {gpa:#x} is not a page of this {} MiB guest",
                self.mem_mib
            )));
        }
        for (gpa, page) in batch
            .gpas
            .iter()
            .zip(batch.data.chunks_exact(PAGE_SIZE as usize))
        {
            self.mem
                .write_slice(page, GuestAddress(*gpa))
                .map_err(|e| VmError::BadCheckpoint(format!("page {gpa:#x}: {e}")))?;
            self.touched.insert(*gpa);
        }
        Ok(())
    }

    /// Decodes and keeps `bytes` (from [`Vm::capture_state`]) as the state to resume.
    pub fn set_state(&mut self, bytes: &[u8]) -> Result<(), VmError> {
        let state = snapshot::decode_state(bytes, "checkpoint")?;
        if state.mem_mib != self.mem_mib {
            return Err(VmError::BadCheckpoint(format!(
                "state of a {} MiB guest for a {} MiB standby",
                state.mem_mib, self.mem_mib
            )));
        }
        // A guest's CPUID is set at boot and never changes: checked at the first state,
        // so a secondary on a host that cannot run the guest refuses the copy at once.
        let same_cpuid = self
            .state
            .as_ref()
            .is_some_and(|s| s.vcpu.cpuid.as_slice() == state.vcpu.cpuid.as_slice());
        if !same_cpuid {
            super::check_cpuid_offered(&self.parts.kvm, &state)?;
        }
        self.state = Some(state);
        Ok(())
    }

    /// A hash of the standby's guest memory (as [`Vm::memory_hash`]).
    pub fn memory_hash(&self) -> Result<u64, VmError> {
        Ok(memory::hash(&self.mem)?)
    }

    /// Turns the standby into a VM continuing from the last state applied, with `world`.
    pub fn activate(self, world: Box<dyn World>) -> Result<Vm, VmError> {
        let state = self.state.ok_or_else(|| {
            VmError::BadCheckpoint("no complete checkpoint was applied".to_string())
        })?;
        Vm::assemble(state, self.mem, self.parts, self.touched, world)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_batches_round_trip_through_guest_memory() {
        let mem = memory::allocate(8).unwrap();
        mem.write_slice(&[7u8; 16], GuestAddress(0x3000)).unwrap();
        let batch = read_pages(&mem, [0x3000, 0x5000]).unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(&batch.data[..16], &[7u8; 16]);
        assert!(batch.data[4096..].iter().all(|&b| b == 0));
        assert!(read_pages(&mem, [8 << 20]).is_err(), "outside RAM");
    }
}
