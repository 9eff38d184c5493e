//! The snapshot format: a directory with `vm.state` (a header with magic, format
//! version, payload length and checksum, then the serialized state) and `memory.bin`
//! (the guest pages listed in the state, back to back). See docs/snapshot-format.md.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bincode::Options;
use ftvm_devices::manager::DevicesState;
use ftvm_devices::GuestMem;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::PAGE_SIZE;
use crate::memory::{self, MemoryError, PageSet};
use crate::vcpu_state::{VcpuState, VmLevelState};

/// First bytes of `vm.state`.
pub const MAGIC: [u8; 8] = *b"FTVMSNAP";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 2;
/// Size of the `vm.state` header.
pub const HEADER_LEN: usize = 32;
/// Name of the state file.
pub const STATE_FILE: &str = "vm.state";
/// Name of the memory file.
pub const MEMORY_FILE: &str = "memory.bin";
/// Largest state payload accepted (the memory is in its own file).
pub const MAX_PAYLOAD: u64 = 64 << 20;

/// Errors of snapshot writing and reading.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The state file does not start with the magic.
    #[error("{0}: not an ftvm snapshot (bad magic)")]
    BadMagic(PathBuf),
    /// The snapshot was written by another format version.
    #[error("{path}: snapshot format version {found}, this ftvm reads version {supported}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version in the file.
        found: u32,
        /// Version this build reads.
        supported: u32,
    },
    /// A file is shorter or longer than its header says.
    #[error("{path}: truncated or padded: expected {expected} bytes, found {found}")]
    Length {
        /// The file.
        path: PathBuf,
        /// Expected size.
        expected: u64,
        /// Actual size.
        found: u64,
    },
    /// Content does not match its checksum.
    #[error("{0}: checksum mismatch, the file is corrupt")]
    Checksum(PathBuf),
    /// The state payload could not be decoded or encoded.
    #[error("{path}: cannot decode the state: {source}")]
    Decode {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: bincode::Error,
    },
    /// The state payload could not be encoded.
    #[error("cannot encode the VM state: {0}")]
    Encode(bincode::Error),
    /// The page index refers to memory the VM does not have.
    #[error("{0}: page index lies outside guest memory")]
    PageOutOfRange(PathBuf),
    /// Guest memory could not be accessed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// Which guest pages `memory.bin` holds, and its checksum.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryIndex {
    /// Runs of pages (first gpa, count), ascending; every other page is zero.
    pub runs: Vec<(u64, u64)>,
    /// xxh3-64 of `memory.bin`.
    pub checksum: u64,
}

impl MemoryIndex {
    /// Size of `memory.bin`.
    pub fn bytes(&self) -> u64 {
        self.runs.iter().map(|(_, n)| n * PAGE_SIZE).sum()
    }
}

/// Everything a snapshot holds besides the page contents.
#[derive(Serialize, Deserialize)]
pub struct SnapshotState {
    /// Version of the ftvm that wrote it (informational).
    pub writer: String,
    /// Guest memory size in MiB.
    pub mem_mib: u64,
    /// The pages in `memory.bin`.
    pub memory: MemoryIndex,
    /// vCPU 0.
    pub vcpu: VcpuState,
    /// VM-level KVM state.
    pub vm: VmLevelState,
    /// Device models.
    pub devices: DevicesState,
    /// VM exits since boot.
    pub exits: u64,
    /// Exit-trace digest since boot.
    pub exit_trace: u64,
    /// Output digest since boot.
    pub output_digest: u64,
    /// Host resources the devices were attached to.
    pub attachments: crate::vm::Attachments,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_PAYLOAD)
}

/// Sizes written by [`write`].
#[derive(Debug, Clone, Copy)]
pub struct SavedSizes {
    /// Bytes of `vm.state`.
    pub state_bytes: u64,
    /// Bytes of `memory.bin`.
    pub memory_bytes: u64,
}

/// Writes a snapshot into `dir` (created if needed): the `pages` of `mem` and `state`
/// (whose memory index is filled in here). Files are written under temporary names and
/// renamed, so a crash leaves either the old snapshot or the new one.
pub fn write(
    dir: &Path,
    mem: &GuestMem,
    pages: &PageSet,
    mut state: SnapshotState,
) -> Result<SavedSizes, SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let runs = pages.runs();
    let mem_tmp = dir.join(format!("{MEMORY_FILE}.tmp"));
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    {
        let mut f = File::create(&mem_tmp).map_err(io(&mem_tmp))?;
        for &(gpa, n) in &runs {
            let bytes = page_run(mem, gpa, n)
                .ok_or_else(|| SnapshotError::PageOutOfRange(mem_tmp.clone()))??;
            hasher.update(bytes);
            f.write_all(bytes).map_err(io(&mem_tmp))?;
        }
        f.sync_all().map_err(io(&mem_tmp))?;
    }
    state.memory = MemoryIndex {
        runs,
        checksum: hasher.digest(),
    };
    let payload = codec().serialize(&state).map_err(SnapshotError::Encode)?;
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    let state_tmp = dir.join(format!("{STATE_FILE}.tmp"));
    {
        let mut f = File::create(&state_tmp).map_err(io(&state_tmp))?;
        f.write_all(&header).map_err(io(&state_tmp))?;
        f.write_all(&payload).map_err(io(&state_tmp))?;
        f.sync_all().map_err(io(&state_tmp))?;
    }
    let mem_path = dir.join(MEMORY_FILE);
    let state_path = dir.join(STATE_FILE);
    std::fs::rename(&mem_tmp, &mem_path).map_err(io(&mem_path))?;
    std::fs::rename(&state_tmp, &state_path).map_err(io(&state_path))?;
    Ok(SavedSizes {
        state_bytes: (HEADER_LEN + payload.len()) as u64,
        memory_bytes: state.memory.bytes(),
    })
}

/// The host bytes of `n` pages from `gpa`, if they lie in one region.
fn page_run(mem: &GuestMem, gpa: u64, n: u64) -> Option<Result<&[u8], MemoryError>> {
    let region = mem.iter().find(|r| {
        let start = r.start_addr().0;
        gpa >= start && gpa + n * PAGE_SIZE <= start + r.len()
    })?;
    let off = (gpa - region.start_addr().0) as usize;
    let len = (n * PAGE_SIZE) as usize;
    Some(memory::region_bytes(region).map(|b| &b[off..off + len]))
}

/// Reads and validates `vm.state` in `dir`: magic, version, length and checksum are
/// checked before anything is decoded.
pub fn read_state(dir: &Path) -> Result<SnapshotState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let mut f = File::open(&path).map_err(io(&path))?;
    let size = f.metadata().map_err(io(&path))?.len();
    let mut header = [0u8; HEADER_LEN];
    if size < HEADER_LEN as u64 {
        let mut start = vec![0u8; size as usize];
        f.read_exact(&mut start).map_err(io(&path))?;
        if !start.starts_with(&MAGIC[..start.len().min(8)]) || start.is_empty() {
            return Err(SnapshotError::BadMagic(path));
        }
        return Err(SnapshotError::Length {
            path,
            expected: HEADER_LEN as u64,
            found: size,
        });
    }
    f.read_exact(&mut header).map_err(io(&path))?;
    if header[0..8] != MAGIC {
        return Err(SnapshotError::BadMagic(path));
    }
    let word = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&header[r]);
        u64::from_le_bytes(b)
    };
    let version = word(8..12) as u32;
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path,
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let payload_len = word(16..24);
    let expected = HEADER_LEN as u64 + payload_len;
    if payload_len > MAX_PAYLOAD || size != expected {
        return Err(SnapshotError::Length {
            path,
            expected,
            found: size,
        });
    }
    let mut payload = vec![0u8; payload_len as usize];
    f.read_exact(&mut payload).map_err(io(&path))?;
    if xxhash_rust::xxh3::xxh3_64(&payload) != word(24..32) {
        return Err(SnapshotError::Checksum(path));
    }
    codec()
        .deserialize(&payload)
        .map_err(|source| SnapshotError::Decode { path, source })
}

/// Encodes `state` for sending (checkpoints): the snapshot payload without the file
/// header; the carrier checks integrity.
pub fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, SnapshotError> {
    codec().serialize(state).map_err(SnapshotError::Encode)
}

/// Decodes what [`encode_state`] produced; `from` names the source in errors.
pub fn decode_state(bytes: &[u8], from: &str) -> Result<SnapshotState, SnapshotError> {
    codec()
        .deserialize(bytes)
        .map_err(|source| SnapshotError::Decode {
            path: PathBuf::from(from),
            source,
        })
}

/// Reads `memory.bin` in `dir` into `mem` (fresh, all-zero guest memory) as `index`
/// describes, verifying its length and checksum.
pub fn read_memory(dir: &Path, index: &MemoryIndex, mem: &GuestMem) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let size = f.metadata().map_err(io(&path))?.len();
    if size != index.bytes() {
        return Err(SnapshotError::Length {
            path,
            expected: index.bytes(),
            found: size,
        });
    }
    let mut reader = f;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    for &(gpa, n) in &index.runs {
        let region = mem
            .iter()
            .find(|r| {
                let start = r.start_addr().0;
                gpa >= start && n <= r.len() / PAGE_SIZE && gpa - start <= r.len() - n * PAGE_SIZE
            })
            .ok_or_else(|| SnapshotError::PageOutOfRange(path.clone()))?;
        let len = (n * PAGE_SIZE) as usize;
        mem.read_exact_volatile_from(GuestAddress(gpa), &mut reader, len)
            .map_err(|e| SnapshotError::Io {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        let off = (gpa - region.start_addr().0) as usize;
        hasher.update(&memory::region_bytes(region)?[off..off + len]);
    }
    // Restored pages are the baseline, not writes since it: clear the VMM bitmap.
    for region in mem.iter() {
        region.get_mmap().bitmap().reset();
    }
    if hasher.digest() != index.checksum {
        return Err(SnapshotError::Checksum(path));
    }
    Ok(())
}
