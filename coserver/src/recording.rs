//! The file `ftvm run --record` writes and `ftvm replay` reads: how the VM was built,
//! its input log, and what the recorded run reported, behind a magic, a version and a
//! checksum.

use std::path::{Path, PathBuf};

use bincode::Options;
use ftvm_devices::virtio::DeviceConfig;
use ftvm_devices::world::record::InputLog;
use ftvm_vmm::cpu_template::CpuTemplate;
use serde::{Deserialize, Serialize};

const MAGIC: [u8; 8] = *b"FTVMLOG1";
const VERSION: u32 = 2;
const HEADER_LEN: usize = 24;
/// Largest recording accepted.
const MAX_PAYLOAD: u64 = 4 << 30;

/// Errors of recording files.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not a recording, another version, or damaged.
    #[error("{path}: {what}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Which kernel the recorded VM booted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KernelSource {
    /// The built-in test guest.
    Builtin,
    /// A kernel file, with the xxh3 of its bytes.
    File {
        /// Its path.
        path: PathBuf,
        /// xxh3-64 of its content.
        hash: u64,
    },
}

/// What the recorded run printed in its report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Exits.
    pub exits: u64,
    /// Exit-trace digest.
    pub exit_trace: u64,
    /// Memory hash.
    pub memory_hash: u64,
    /// Output digest.
    pub output_digest: u64,
    /// Guest exit code.
    pub exit_code: u32,
}

/// A recorded run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recording {
    /// Kernel.
    pub kernel: KernelSource,
    /// Kernel command line as given (device tokens are appended again on replay).
    pub cmdline: String,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Entropy seed.
    pub entropy_seed: u64,
    /// The CPU template (the replay gives the guest the same CPUID).
    pub cpu_template: CpuTemplate,
    /// Virtio devices.
    pub devices: Vec<DeviceConfig>,
    /// Whether the run had a network.
    pub has_network: bool,
    /// Inputs.
    pub log: InputLog,
    /// The recorded run's report.
    pub summary: Summary,
}

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(MAX_PAYLOAD)
}

/// Writes `rec` to `path`.
pub fn write(path: &Path, rec: &Recording) -> Result<(), RecordingError> {
    let payload = codec()
        .serialize(rec)
        .map_err(|e| RecordingError::Invalid {
            path: path.to_path_buf(),
            what: format!("cannot encode: {e}"),
        })?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    std::fs::write(path, out).map_err(|source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and validates a recording.
pub fn read(path: &Path) -> Result<Recording, RecordingError> {
    let invalid = |what: &str| RecordingError::Invalid {
        path: path.to_path_buf(),
        what: what.to_string(),
    };
    let bytes = std::fs::read(path).map_err(|source| RecordingError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() < HEADER_LEN || bytes[..8] != MAGIC {
        return Err(invalid("not an ftvm recording"));
    }
    let mut v = [0u8; 4];
    v.copy_from_slice(&bytes[8..12]);
    if u32::from_le_bytes(v) != VERSION {
        return Err(invalid("recording of another format version"));
    }
    let mut c = [0u8; 8];
    c.copy_from_slice(&bytes[16..24]);
    let payload = &bytes[HEADER_LEN..];
    if xxhash_rust::xxh3::xxh3_64(payload) != u64::from_le_bytes(c) {
        return Err(invalid("checksum mismatch, the recording is corrupt"));
    }
    codec()
        .deserialize(payload)
        .map_err(|e| invalid(&format!("cannot decode: {e}")))
}
