//! Starting the guest on this node: booted fresh as the first primary, or activated from
//! the standby replica at a takeover, with the outputs and frames the old primary left
//! and the announcements that move the guest's network identity here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvm_devices::backend::disk::DiskFile;
use ftvm_devices::backend::tap::Tap;
use ftvm_devices::virtio::DeviceConfig;
use ftvm_devices::world::LiveWorld;
use ftvm_vmm::{Attachments, Vm, VmConfig};

use super::{Node, NodeError, Running};
use crate::replication::commit::{Commit, CommitWorld, Sinks};
use crate::replication::primary::{EpochLoop, EpochStats};
use crate::replication::secondary::Takeover;

/// Frames at most discarded from a held tap at takeover (the kernel queues ~1000).
const MAX_STALE_FRAMES: usize = 4096;

impl Node {
    /// Starts the guest here: booted fresh, or from the standby at `epoch`.
    pub(super) fn become_primary(&mut self, from: Option<Takeover>) -> Result<(), NodeError> {
        let heard = self.links.last_heard();
        if from.is_some() {
            tracing::info!(
                "takeover: starting the guest {:.3} ms after the old primary was last heard",
                heard.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0)
            );
        }
        let guest = |e: String| NodeError::Guest(e);
        let mut redo_frames = Vec::new();
        let mac =
            crate::attach::parse_mac(&self.cfg.guest.mac).map_err(|e| guest(e.to_string()))?;
        let mut live = LiveWorld::new(std::io::sink());
        let mut devices = Vec::new();
        if let Some(p) = &self.cfg.host.disk {
            let disk = DiskFile::open(p, false).map_err(|e| guest(e.to_string()))?;
            devices.push(DeviceConfig::Block {
                disk: 0,
                capacity_sectors: disk.capacity_sectors(),
                read_only: false,
            });
            live = live.with_disk(disk);
        }
        let mut tap_sender = None;
        if let Some(name) = &self.cfg.host.tap {
            let mut tap = match self.held_tap.take() {
                Some(t) => t,
                None => Tap::open(name).map_err(|e| guest(e.to_string()))?,
            };
            // Frames that reached the tap while the guest ran elsewhere are stale.
            let mut stale = 0;
            while stale < MAX_STALE_FRAMES && matches!(tap.read_frame(), Ok(Some(_))) {
                stale += 1;
            }
            tracing::debug!(stale, "discarded frames queued on the tap");
            tap_sender = Some(
                tap.sender()
                    .map_err(|e| guest(format!("tap {name}: {e}")))?,
            );
            live = live.with_tap(tap);
            devices.push(DeviceConfig::Net { mac });
        }
        let commit = Commit::new(Sinks {
            console: Box::new(std::io::stdout()),
            tap: tap_sender,
        });
        commit.forward_inbound(self.out.clone());
        if from.is_some() {
            commit.took_over(heard);
        }
        let mut world = CommitWorld::new(Box::new(live), commit.clone(), self.session.clone());
        let vm = match from {
            Some(Takeover {
                standby,
                outputs,
                frames,
            }) => {
                if !outputs.is_empty() {
                    tracing::info!(
                        outputs = outputs.len(),
                        "releasing outputs of acknowledged epochs the old primary may not have released"
                    );
                    // Console bytes now; frames right after the first announcement (see
                    // below), so that the LAN has learnt where the guest now is.
                    let (console, frames): (Vec<_>, Vec<_>) = outputs
                        .into_iter()
                        .partition(|o| matches!(o, crate::protocol::Output::Console(_)));
                    commit.release(console);
                    redo_frames = frames;
                }
                if !frames.is_empty() {
                    tracing::info!(
                        frames = frames.len(),
                        "re-delivering frames received after the checkpoint"
                    );
                }
                world = world.with_redelivery(frames);
                standby
                    .activate(Box::new(world))
                    .map_err(|e| guest(e.to_string()))?
            }
            None => {
                let kernel = match &self.cfg.guest.kernel {
                    Some(p) => std::fs::read(p)
                        .map_err(|e| guest(format!("kernel {}: {e}", p.display())))?,
                    None => ftvm_guest_images::TEST_GUEST_ELF.to_vec(),
                };
                let config = VmConfig {
                    mem_mib: self.cfg.guest.mem_mib,
                    kernel,
                    cmdline: self.cfg.guest.cmdline.clone(),
                    initrd: None,
                    entropy_seed: 0,
                    devices,
                    attachments: Attachments {
                        disks: self
                            .cfg
                            .host
                            .disk
                            .iter()
                            .map(|p| (p.clone(), false))
                            .collect(),
                        tap: self.cfg.host.tap.clone(),
                    },
                };
                Vm::boot(&config, Box::new(world)).map_err(|e| guest(e.to_string()))?
            }
        };
        if let (Some(ip), Some(_)) = (self.cfg.guest.ip, &self.cfg.host.tap) {
            // Announced a few times, in case a switch misses the first; the frames the old
            // primary may not have sent follow the first announcement.
            let frame = crate::replication::garp::frame(mac, ip);
            let announcer = commit.clone();
            std::thread::spawn(move || {
                for delay_ms in [0, 20, 50, 100, 200] {
                    std::thread::sleep(Duration::from_millis(delay_ms));
                    announcer.announce(&frame);
                    if delay_ms == 0 {
                        announcer.release(std::mem::take(&mut redo_frames));
                    }
                }
            });
        } else {
            commit.release(redo_frames);
        }
        let stats = Arc::new(Mutex::new(EpochStats::default()));
        let epoch_loop = EpochLoop {
            vm,
            commit: commit.clone(),
            session: self.session.clone(),
            stats: stats.clone(),
            out: self.out.clone(),
            links: self.links.clone(),
            disk: self.cfg.host.disk.clone(),
            epoch_length: Duration::from_millis(self.cfg.replication.epoch_ms),
        };
        std::thread::Builder::new()
            .name("vcpu".into())
            .spawn(move || epoch_loop.run())
            .map_err(|e| guest(format!("cannot start the vCPU thread: {e}")))?;
        self.running = Some(Running { commit, stats });
        Ok(())
    }
}
