//! Building the live World from command-line attachments: disk images, a tap and the
//! console input.

use std::path::PathBuf;

use ftvm_devices::backend::console_in::{ConsoleInput, ConsoleInputError};
use ftvm_devices::backend::disk::{DiskError, DiskFile};
use ftvm_devices::backend::tap::{Tap, TapError};
use ftvm_devices::virtio::DeviceConfig;
use ftvm_devices::world::live::IdlePacing;
use ftvm_devices::world::LiveWorld;
use ftvm_vmm::Attachments;

use crate::cli::{ConsoleIn, Idle};

/// Errors of attaching host resources.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A disk image.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A tap.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Console input.
    #[error(transparent)]
    ConsoleInput(#[from] ConsoleInputError),
    /// A malformed --disk value.
    #[error("invalid --disk {0:?}: expected FILE or FILE,ro")]
    DiskSpec(String),
    /// A malformed MAC.
    #[error("invalid MAC address {0:?}: expected six hex bytes like 52:54:00:12:34:56")]
    Mac(String),
    /// The snapshot's devices and the attachments disagree.
    #[error("{0}")]
    Mismatch(String),
}

/// Parses `FILE[,ro]`.
pub fn parse_disk(spec: &str) -> Result<(PathBuf, bool), AttachError> {
    match spec.rsplit_once(',') {
        Some((path, "ro")) if !path.is_empty() => Ok((PathBuf::from(path), true)),
        Some((_, _)) => Err(AttachError::DiskSpec(spec.to_string())),
        None if !spec.is_empty() => Ok((PathBuf::from(spec), false)),
        None => Err(AttachError::DiskSpec(spec.to_string())),
    }
}

/// Parses a MAC address; it must be unicast.
pub fn parse_mac(s: &str) -> Result<[u8; 6], AttachError> {
    let bad = || AttachError::Mac(s.to_string());
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(bad());
    }
    Ok(mac)
}

fn pacing(idle: Idle) -> IdlePacing {
    match idle {
        Idle::Sleep => IdlePacing::Sleep,
        Idle::Skip => IdlePacing::Skip,
    }
}

/// A live World on stdout with the attachments opened, and the virtio devices they
/// back (block first, then net).
pub fn live_world(
    attachments: &Attachments,
    mac: [u8; 6],
    idle: Idle,
    console: ConsoleIn,
) -> Result<(LiveWorld<std::io::Stdout>, Vec<DeviceConfig>), AttachError> {
    let mut world = LiveWorld::new(std::io::stdout()).with_pacing(pacing(idle));
    if console == ConsoleIn::Stdin {
        world = world.with_console_input(ConsoleInput::stdin()?);
    }
    let mut devices = Vec::new();
    for (i, (path, ro)) in attachments.disks.iter().enumerate() {
        let disk = DiskFile::open(path, *ro)?;
        devices.push(DeviceConfig::Block {
            disk: i,
            capacity_sectors: disk.capacity_sectors(),
            read_only: *ro,
        });
        world = world.with_disk(disk);
    }
    if let Some(name) = &attachments.tap {
        world = world.with_tap(Tap::open(name)?);
        devices.push(DeviceConfig::Net { mac });
    }
    Ok((world, devices))
}

/// Checks that reopened attachments still fit the devices a snapshot holds (same disk
/// capacity and mode, a tap if it has a network device).
pub fn check_matches(saved: &[DeviceConfig], opened: &[DeviceConfig]) -> Result<(), AttachError> {
    let describe = |d: &[DeviceConfig]| format!("{d:?}");
    let same = saved.len() == opened.len()
        && saved.iter().zip(opened).all(|(s, o)| match (s, o) {
            (DeviceConfig::Net { .. }, DeviceConfig::Net { .. }) => true,
            (a, b) => a == b,
        });
    if same {
        Ok(())
    } else {
        Err(AttachError::Mismatch(format!(
            "the snapshot's devices {} do not match the attached ones {}",
            describe(saved),
            describe(opened)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert_eq!(
            parse_disk("a.img").unwrap(),
            (PathBuf::from("a.img"), false)
        );
        assert_eq!(
            parse_disk("/x/a.img,ro").unwrap(),
            (PathBuf::from("/x/a.img"), true)
        );
        assert!(parse_disk("a.img,rw").is_err());
        assert!(parse_disk("").is_err());
        assert!(parse_disk(",ro").is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:0a:bc:FF").unwrap(),
            [0x52, 0x54, 0, 0xa, 0xbc, 0xff]
        );
        assert!(parse_mac("52:54:00:0a:bc").is_err());
        assert!(parse_mac("52:54:00:0a:bc:fg").is_err());
        assert!(parse_mac("01:00:5e:00:00:01").is_err(), "multicast");
    }
}
