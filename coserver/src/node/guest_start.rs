//! Starting the guest on this node: booted fresh as the first primary, or activated from
//! the standby replica at a takeover, with the outputs and frames the old primary left
//! and the announcements that move the guest's network identity here.

use ftvm_vmm::input_watch::InputDelivery;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ftvm_devices::backend::disk::DiskFile;
use ftvm_devices::backend::tap::Tap;
use ftvm_devices::virtio::DeviceConfig;
use ftvm_devices::world::LiveWorld;
use ftvm_vmm::{Attachments, Vm, VmConfig};

use ftvm_devices::world::record::RecordingWorld;
use ftvm_devices::world::World;

use super::{Node, NodeError, Running};
use crate::protocol::{Output, ReplicationMode};
use crate::replication::commit::{Commit, CommitWorld, Sinks};
use crate::replication::lockstep::{Follower, LockstepTakeover};
use crate::replication::primary::{EpochLoop, EpochParts, EpochStats, LockstepLog};
use crate::replication::secondary::Takeover;

/// Lockstep: the longest console output waits before the slice of the log holding it
/// ends (it also ends as soon as the guest idles; a frame ends it at once).
const LOCKSTEP_OUTPUT_WAIT: Duration = Duration::from_micros(200);

/// Where the guest this node starts comes from.
pub(super) enum GuestFrom {
    /// Booted fresh (the first primary).
    Boot,
    /// A checkpoint-mode standby VM (takeover).
    Standby(Box<Takeover>),
    /// A lockstep follower's running guest (takeover).
    Follower(Follower),
}

impl Node {
    /// Starts the guest here: booted fresh, or continued from the replica.
    pub(super) fn become_primary(&mut self, from: GuestFrom) -> Result<(), NodeError> {
        let heard = self.links.last_heard();
        let takeover = !matches!(from, GuestFrom::Boot);
        if takeover {
            tracing::info!(
                "takeover: starting the guest {:.3} ms after the old primary was last heard",
                heard.map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0)
            );
        }
        let guest = |e: String| NodeError::Guest(e);
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
        let mut tap_heard = None;
        // The mirror's tap announced the takeover already (`Action::Announce`).
        let mut announced = false;
        if let Some(name) = &self.cfg.host.tap {
            // Everything queued on the tap is read into the mirror's window first.
            let (held, window) = match self.mirror.take() {
                Some(m) => {
                    let w = m.window();
                    announced = m.announced();
                    (m.stop(), Some(w))
                }
                None => (None, None),
            };
            let tap = match held {
                Some(t) => t,
                None => Tap::open(name).map_err(|e| guest(e.to_string()))?,
            };
            tap_heard = window;
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
        let lockstep = self.cfg.replication.mode == ReplicationMode::Lockstep;
        if lockstep {
            // The log carries what the guest received; outputs wait a round trip.
            commit.lockstep(LOCKSTEP_OUTPUT_WAIT);
        } else {
            commit.forward_inbound(self.out.clone());
        }
        let garp = self.announcement.clone();
        if takeover {
            commit.took_over(heard);
            // The LAN learns where the guest is now before anything else is done: the
            // guest's state, the rest of the log, the outputs follow (unless the
            // mirror's tap announced it already).
            if let (Some(frame), false) = (&garp, announced) {
                commit.announce(frame);
                self.announced_after_answer();
            }
        }
        let commit_world = CommitWorld::new(Box::new(live), commit.clone(), self.session.clone());
        let mut redo = Vec::new();
        let (standby, follower) = match from {
            GuestFrom::Boot => {
                // A fresh guest: what reached the tap before is stale.
                if let Some(w) = tap_heard.take() {
                    w.clear();
                }
                (None, None)
            }
            GuestFrom::Standby(t) => {
                let Takeover {
                    standby,
                    outputs,
                    mut frames,
                } = *t;
                // Received after the checkpoint by the old primary, then what this
                // host's tap heard after the last of those.
                frames.extend(
                    tap_heard
                        .take()
                        .map(|w| w.take_untaken())
                        .unwrap_or_default(),
                );
                commit.redeliver(frames);
                redo = outputs;
                (Some(standby), None)
            }
            // Its log is executed first: the follower delivers what the tap heard.
            GuestFrom::Follower(f) => (None, Some(f)),
        };
        // The log records what the guest takes, outermost: everything the VM sees.
        let (world, log): (Box<dyn World>, _) = if lockstep {
            let rec = RecordingWorld::new(commit_world).digest_disk_reads();
            let log = rec.log_handle();
            (Box::new(rec), Some(log))
        } else {
            (Box::new(commit_world), None)
        };
        let stats = Arc::new(Mutex::new(EpochStats::default()));
        let parts = EpochParts {
            commit: commit.clone(),
            session: self.session.clone(),
            stats: stats.clone(),
            out: self.out.clone(),
            links: self.links.clone(),
            disk: self.cfg.host.disk.clone(),
            epoch_length: Duration::from_millis(self.cfg.replication.epoch_ms),
            copy_max_bytes_s: (self.cfg.replication.copy_max_mib_s > 0)
                .then_some(self.cfg.replication.copy_max_mib_s << 20),
            lockstep: log.map(|log| LockstepLog {
                log,
                verify_exits: self.cfg.replication.verify_exits,
                verify_memory: Duration::from_millis(self.cfg.replication.verify_memory_ms),
            }),
        };
        let announcer = commit.clone();
        let release = move |outputs: Vec<Output>| announce_and_release(announcer, garp, outputs);
        self.running = Some(Running {
            commit,
            stats: stats.clone(),
        });
        if let Some(follower) = follower {
            if !follower.take_over(LockstepTakeover {
                world,
                parts,
                release: Box::new(release),
                heard: tap_heard,
            }) {
                return Err(guest("the lockstep replica's guest had stopped".into()));
            }
            return Ok(());
        }
        let mut vm = match standby {
            Some(standby) => standby.activate(world).map_err(|e| guest(e.to_string()))?,
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
                    initrd: match &self.cfg.guest.initrd {
                        Some(p) => Some(
                            std::fs::read(p)
                                .map_err(|e| guest(format!("initrd {}: {e}", p.display())))?,
                        ),
                        None => None,
                    },
                    entropy_seed: 0,
                    cpu_template: self.cfg.guest.cpu_template,
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
                Vm::boot(&config, world).map_err(|e| guest(e.to_string()))?
            }
        };
        if self.cfg.guest.inputs() == InputDelivery::Async {
            vm.deliver_inputs_asynchronously();
        }
        release(redo);
        let epoch_loop = EpochLoop::new(vm, parts);
        std::thread::Builder::new()
            .name("vcpu".into())
            .spawn(move || epoch_loop.run())
            .map_err(|e| guest(format!("cannot start the vCPU thread: {e}")))?;
        Ok(())
    }

    /// Announces the guest's address from this host at once, through the tap the
    /// mirror holds (`Action::Announce`: a takeover follows).
    pub(super) fn announce(&mut self) {
        let (Some(frame), Some(mirror)) = (&self.announcement, &mut self.mirror) else {
            return;
        };
        match mirror.announce(frame) {
            Ok(()) => self.announced_after_answer(),
            Err(e) => tracing::warn!("takeover: gratuitous ARP not sent ahead: {e}"),
        }
    }

    fn announced_after_answer(&self) {
        tracing::info!(
            "takeover: gratuitous ARP sent {:.3} ms after the arbiter's answer",
            self.claim_answered
                .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0)
        );
    }
}

/// Releases the outputs the old primary may not have released (the guest's network
/// identity was announced when the takeover began), then repeats the announcement a few
/// times, in case a switch missed the first.
fn announce_and_release(commit: Commit, garp: Option<Vec<u8>>, outputs: Vec<Output>) {
    if !outputs.is_empty() {
        tracing::info!(
            outputs = outputs.len(),
            "releasing outputs the old primary may not have released"
        );
    }
    commit.release(outputs);
    let Some(frame) = garp else {
        return;
    };
    std::thread::spawn(move || {
        for delay_ms in [20, 50, 100, 200] {
            std::thread::sleep(Duration::from_millis(delay_ms));
            commit.announce(&frame);
        }
    });
}
