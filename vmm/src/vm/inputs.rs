//! How inputs and interrupts reach the guest: the kick that ends `KVM_RUN`, the
//! asynchronous input watcher, moving waiting input into the devices, injecting the
//! devices' interrupts at an exit boundary, and idling.

use ftvm_devices::world::{IdleRequest, World};
use kvm_bindings::kvm_msi;

use super::{kvm, Vm, VmError, MSI_ADDRESS};
use crate::input_watch::InputWatcher;

impl Vm {
    /// A handle that ends this VM's `KVM_RUN` at once from any thread (see
    /// [`crate::kick`]); the run loop then asks the World whether to stop. Call it on
    /// the thread that runs the VM, and run and drop the VM on that thread.
    pub fn arm_kick(&mut self) -> Result<crate::kick::VcpuKick, VmError> {
        let run = self.vcpu.get_kvm_run() as *mut kvm_bindings::kvm_run;
        // Armed again (a follower that becomes primary): the old arming is undone
        // first, or dropping it after would disarm the new one.
        self.kick.take();
        // The input watcher holds the old handle: it restarts with the new one.
        self.watcher.take();
        let (kick, armed) = crate::kick::arm(run).map_err(VmError::Kick)?;
        self.kick = Some(armed);
        self.kick_handle = Some(kick.clone());
        Ok(kick)
    }

    /// Delivers frames and console input as they arrive, kicking the vCPU out of
    /// `KVM_RUN` (see [`crate::input_watch`]), instead of only at exits: for guests that
    /// idle inside KVM, such as Linux. Runs are then not deterministic.
    pub fn deliver_inputs_asynchronously(&mut self) {
        self.async_inputs = true;
    }

    /// Starts the input watcher if inputs are asynchronous and it is not running, after
    /// moving in what input already waits (frames a takeover redelivers, which no
    /// descriptor announces).
    pub(super) fn start_watcher(&mut self) -> Result<(), VmError> {
        if !self.async_inputs || self.watcher.is_some() {
            return Ok(());
        }
        self.service_inputs()?;
        let fds = self.world.input_fds();
        if fds.is_empty() {
            return Ok(());
        }
        let kick = match self.kick_handle.clone() {
            Some(k) => k,
            None => self.arm_kick()?,
        };
        self.watcher = Some(InputWatcher::start(fds, kick).map_err(VmError::Kick)?);
        Ok(())
    }

    /// Moves waiting input (frames, console bytes) into the devices; returns whether
    /// any moved.
    pub(super) fn service_inputs(&mut self) -> Result<bool, VmError> {
        let mut moved = 0;
        if self.world.has_network() {
            moved += self
                .devices
                .receive_packets(self.exits, &self.mem, &mut self.world)?;
        }
        moved += self
            .devices
            .receive_console_input(self.exits, &mut self.world)?;
        if let Some(w) = &self.watcher {
            w.serviced(moved > 0);
        }
        Ok(moved > 0)
    }

    /// Delivers the interrupts the devices raised, at this exit boundary.
    pub(super) fn inject_pending_irqs(&mut self) -> Result<(), VmError> {
        let irqs = self.devices.take_pending_irqs();
        if !irqs.msi_vectors.is_empty() || !irqs.gsi_pulses.is_empty() {
            self.devices.platform().note_interrupt_delivered();
        }
        for vector in irqs.msi_vectors {
            let msi = kvm_msi {
                address_lo: MSI_ADDRESS,
                address_hi: 0,
                data: vector.into(),
                ..Default::default()
            };
            self.vm.signal_msi(msi).map_err(kvm("KVM_SIGNAL_MSI"))?;
        }
        for gsi in irqs.gsi_pulses {
            self.vm
                .set_irq_line(gsi, true)
                .and_then(|_| self.vm.set_irq_line(gsi, false))
                .map_err(kvm("KVM_IRQ_LINE"))?;
        }
        Ok(())
    }

    /// The guest idles: the World decides when it resumes (its timer deadline, or a
    /// packet), virtual time advances to that point, and a due timer fires so its
    /// interrupt is injected before the guest runs again.
    pub(super) fn idle(&mut self) -> Result<(), VmError> {
        // An interrupt delivered since the previous WAIT may have come after the guest
        // last looked for work (its handler ran just before this WAIT), and one raised at
        // this very exit (a frame, a completion, the timer) is the event the guest waits
        // for: either way it resumes at once and looks again.
        let woken = self.devices.platform().take_wake_latch();
        if woken || self.devices.has_pending_irq() {
            return Ok(());
        }
        let console_room = self.devices.console_input_room() > 0;
        let platform = self.devices.platform();
        let request = IdleRequest {
            exit: self.exits,
            now_ns: platform.now_ns(),
            deadline_ns: platform.timer_deadline(),
            console_room,
            give_up_at: None,
        };
        let wake = self.world.idle(&request)?;
        self.devices.platform().advance_to(wake.at_ns);
        Ok(())
    }
}
