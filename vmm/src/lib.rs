//! The ftvm VMM: one KVM virtual machine with one vCPU.
//!
//! It boots a kernel (the built-in test guest, an ELF vmlinux or a bzImage) through the
//! Linux 64-bit boot protocol, runs the exit loop under an interrupt policy that keeps
//! runs deterministic, captures and restores the whole VM exactly, and reports the
//! pages written between two points. It knows nothing of replication: the `coserver`
//! crate builds the pair on top of it.

pub mod boot;
pub mod cpu_template;
pub mod exit_trace;
pub mod fallback;
pub mod input_watch;
pub mod kick;
pub mod layout;
pub mod memory;
pub mod output_digest;
pub mod snapshot;
pub mod vcpu_state;
pub mod vm;

pub use kick::VcpuKick;
pub use memory::{MemorySample, PageSet};
pub use vm::{Attachments, PageBatch, RunLimits, RunStop, Standby, Vm, VmConfig, VmError};
