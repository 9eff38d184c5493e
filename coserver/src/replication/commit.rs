//! Output commit, the World side: the primary's World keeps each output the session
//! says to hold with the running epoch (and lets the others leave at once), records the
//! epoch's disk writes for its checkpoint, forwards received frames while outputs are
//! held, and ends epochs (at their deadline, or early when the guest idles with output
//! waiting). Which outputs are held, and when they leave, is the session's: it returns
//! them in `Action::Release` and the drivers write them here.

use crate::link::Outbox;
use std::collections::VecDeque;
use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ftvm_devices::world::{IdleRequest, Wake, World, WorldError};
use xxhash_rust::xxh3::xxh3_64;

use crate::protocol::{DiskRange, DiskWrite, Message, Output};
use crate::session::{OutputPolicy, SharedSession};

/// How long an epoch may last while the guest idles with nothing to commit (no output,
/// no disk write): an idle guest costs a checkpoint per wake-up, or one per this period,
/// rather than one per epoch length.
const IDLE_EPOCH: Duration = Duration::from_millis(100);

/// Where released outputs go.
pub struct Sinks {
    /// Console bytes.
    pub console: Box<dyn Write + Send>,
    /// Frames (a second handle on the tap), if the guest has a network.
    pub tap: Option<File>,
}

struct State {
    /// Whether disk writes are recorded (a secondary is being fed).
    recording: bool,
    /// Outputs held with the running epoch.
    outputs: Vec<Output>,
    writes: Vec<DiskWrite>,
    /// Where the guest flushed: after the first `n` of `writes`, for each `n`.
    flushes: Vec<u32>,
    deadline: Instant,
    started: Instant,
    pause: bool,
    sinks: Sinks,
    /// The running epoch.
    epoch: u64,
    /// Where received frames are forwarded while outputs are held.
    forward: Option<Outbox>,
    /// This node lost the arbiter: nothing is released any more.
    discarded: bool,
    /// After a takeover: when the old primary was last heard, until the first output.
    takeover_heard: Option<Instant>,
    /// Lockstep: how long a held output may wait before the slice holding it ends.
    prompt: Option<Duration>,
    /// When the oldest output held with the running epoch was made.
    held_since: Option<Instant>,
    /// Lockstep: the disk ranges the guest wrote in the running epoch (a repair of a
    /// diverged replica's disk sends them).
    ranges: Option<Vec<DiskRange>>,
    /// Frames to deliver to the guest before the tap's: at a takeover, those the old
    /// primary's guest never took (received after the checkpoint this VM resumed from,
    /// or heard by this host's tap after what the old guest took).
    redeliver: VecDeque<Vec<u8>>,
    /// The digest of the last frame the guest took.
    last_frame: Option<u64>,
}

/// The World-side output state shared by the primary's World, its epoch loop and the
/// node (which writes what the session releases).
#[derive(Clone)]
pub struct Commit(Arc<Mutex<State>>);

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What an epoch leaves for its checkpoint.
#[derive(Debug, Default)]
pub struct Sealed {
    /// Disk writes in order.
    pub writes: Vec<DiskWrite>,
    /// Where the guest flushed: after the first `n` writes, for each `n`.
    pub flushes: Vec<u32>,
    /// The outputs held with the epoch, for the session to hold or release.
    pub outputs: Vec<Output>,
    /// Lockstep: the disk ranges written in the epoch.
    pub ranges: Vec<DiskRange>,
}

impl Commit {
    /// Output commit releasing to `sinks`.
    pub fn new(sinks: Sinks) -> Self {
        Self(Arc::new(Mutex::new(State {
            recording: false,
            outputs: Vec::new(),
            writes: Vec::new(),
            flushes: Vec::new(),
            deadline: Instant::now(),
            started: Instant::now(),
            pause: false,
            sinks,
            epoch: 0,
            forward: None,
            discarded: false,
            takeover_heard: None,
            prompt: None,
            held_since: None,
            ranges: None,
            redeliver: VecDeque::new(),
            last_frame: None,
        })))
    }

    /// Lockstep: an epoch (a slice of the log) ends at the exit after a frame is held,
    /// and at most `wait` after console bytes are, so an output waits about one round
    /// trip, not an epoch; the disk ranges each slice writes are noted.
    pub fn lockstep(&self, wait: Duration) {
        let mut s = lock(&self.0);
        s.prompt = Some(wait);
        s.ranges = Some(Vec::new());
    }

    /// Notes the disk ranges the guest writes in each epoch (`Sealed::ranges`).
    pub fn note_ranges(&self) {
        lock(&self.0).ranges.get_or_insert_with(Vec::new);
    }

    /// Delivers `frames` to the guest before anything its tap receives.
    pub fn redeliver(&self, frames: Vec<Vec<u8>>) {
        if !frames.is_empty() {
            tracing::info!(
                frames = frames.len(),
                "delivering frames the old primary's guest never took"
            );
        }
        lock(&self.0).redeliver.extend(frames);
    }

    /// The digest (xxh3) of the last frame the guest took, if any.
    pub fn last_frame(&self) -> Option<u64> {
        lock(&self.0).last_frame
    }

    /// Forwards the frames the guest receives to `out` while outputs are held.
    pub fn forward_inbound(&self, out: Outbox) {
        lock(&self.0).forward = Some(out);
    }

    fn inbound(&self, frame: &[u8]) {
        let s = lock(&self.0);
        if let Some(out) = &s.forward {
            out.send(Message::Inbound {
                position: s.epoch,
                frame: frame.to_vec(),
            });
        }
    }

    /// Starts epoch `epoch`, which ends by `length` from now.
    pub fn start_epoch(&self, epoch: u64, length: Duration) {
        let mut s = lock(&self.0);
        s.epoch = epoch;
        s.started = Instant::now();
        s.deadline = s.started + length;
        s.pause = false;
    }

    /// Ends the epoch: its held outputs and disk writes.
    pub fn seal(&self) -> Sealed {
        let mut s = lock(&self.0);
        let _ = s.sinks.console.flush();
        s.held_since = None;
        Sealed {
            writes: std::mem::take(&mut s.writes),
            flushes: std::mem::take(&mut s.flushes),
            outputs: std::mem::take(&mut s.outputs),
            ranges: s.ranges.as_mut().map(std::mem::take).unwrap_or_default(),
        }
    }

    /// Records disk writes for a secondary (from a copy on) or not.
    pub fn set_recording(&self, recording: bool) {
        let mut s = lock(&self.0);
        s.recording = recording;
        if !recording {
            s.writes.clear();
        }
    }

    /// Drops every held output and every later one, for good (this node lost the
    /// arbiter: its unacknowledged epochs never happened for the world).
    pub fn discard(&self) {
        let mut s = lock(&self.0);
        s.discarded = true;
        s.outputs.clear();
        s.sinks.tap = None;
    }

    /// This node took over; the old primary was last heard at `heard`. The first
    /// output released is logged with the time since (the takeover as the world sees
    /// it, measured inside the CoServer).
    pub fn took_over(&self, heard: Option<Instant>) {
        lock(&self.0).takeover_heard = heard;
    }

    /// Lets outputs leave (those the session released).
    pub fn release(&self, outputs: Vec<Output>) {
        let s = lock(&self.0);
        released(s, outputs);
    }

    /// [`Commit::release`] unless another thread holds the commit (the vCPU thread,
    /// perhaps descheduled): then the outputs are given back. For a thread of real-time
    /// priority, which must not wait for one of normal priority.
    pub fn try_release(&self, outputs: Vec<Output>) -> Result<(), Vec<Output>> {
        match self.0.try_lock() {
            Ok(s) => {
                released(s, outputs);
                Ok(())
            }
            Err(std::sync::TryLockError::Poisoned(e)) => {
                released(e.into_inner(), outputs);
                Ok(())
            }
            Err(std::sync::TryLockError::WouldBlock) => Err(outputs),
        }
    }

    /// Sends a frame of the VMM's own at once (a gratuitous ARP on takeover); not the
    /// guest's output.
    pub fn announce(&self, frame: &[u8]) {
        let mut s = lock(&self.0);
        if let Some(tap) = &mut s.sinks.tap {
            if let Err(e) = tap.write(frame) {
                tracing::warn!("announcement not sent: {e}");
            }
        }
    }

    fn output(&self, policy: OutputPolicy, o: Output) {
        let mut s = lock(&self.0);
        if s.discarded {
            return;
        }
        match policy {
            OutputPolicy::Hold => {
                // Lockstep: a frame ends its slice at once (a client waits for it);
                // console bytes, written one exit each, wait for the line's end.
                if s.prompt.is_some() && matches!(o, Output::Frame(_)) {
                    s.pause = true;
                }
                s.outputs.push(o);
                s.held_since.get_or_insert_with(Instant::now);
            }
            OutputPolicy::Pass => {
                first_output(&mut s);
                release(&mut s.sinks, vec![o]);
            }
            OutputPolicy::Discard => {}
        }
    }
}

/// Logs the first output after a takeover.
/// Writes released outputs to their sinks (see [`Commit::release`]).
fn released(mut s: MutexGuard<'_, State>, outputs: Vec<Output>) {
    if s.discarded || outputs.is_empty() {
        return;
    }
    first_output(&mut s);
    release(&mut s.sinks, outputs);
    // Out of this process before the secondary is told they left (`Released`): a
    // line's start buffered here would die with it, and the secondary would not emit
    // it again.
    let _ = s.sinks.console.flush();
}

fn first_output(s: &mut State) {
    if let Some(heard) = s.takeover_heard.take() {
        let ms = heard.elapsed().as_secs_f64() * 1000.0;
        tracing::info!("takeover: first output {ms:.3} ms after the old primary was last heard");
    }
}

/// Writes outputs to their sinks. The console is flushed at line ends (and when an epoch
/// is sealed, and after a release of held outputs), not per byte: a degraded primary
/// releases each exit's byte at once.
fn release(sinks: &mut Sinks, outputs: Vec<Output>) {
    let mut line_end = false;
    for o in outputs {
        match o {
            Output::Console(b) => {
                line_end |= b.contains(&b'\n');
                if let Err(e) = sinks.console.write_all(&b) {
                    tracing::warn!("console output dropped: {e}");
                }
            }
            Output::Frame(f) => {
                if let Some(tap) = &mut sinks.tap {
                    if let Err(e) = tap.write(&f) {
                        tracing::debug!("frame dropped by the tap: {e}");
                    }
                }
            }
        }
    }
    if line_end {
        let _ = sinks.console.flush();
    }
}

/// The primary's World: a live World whose outputs pass through [`Commit`].
pub struct CommitWorld {
    inner: Box<dyn World>,
    commit: Commit,
    session: Arc<SharedSession>,
}

impl CommitWorld {
    /// Wraps `inner` (which does the disk and input work; its own console and frame
    /// output are bypassed).
    pub fn new(inner: Box<dyn World>, commit: Commit, session: Arc<SharedSession>) -> Self {
        Self {
            inner,
            commit,
            session,
        }
    }

    fn policy(&self) -> OutputPolicy {
        self.session.lock().output_policy()
    }
}

impl World for CommitWorld {
    fn console_output(&mut self, bytes: &[u8]) {
        self.commit
            .output(self.policy(), Output::Console(bytes.to_vec()));
    }

    fn transmit(&mut self, frame: &[u8]) {
        self.commit
            .output(self.policy(), Output::Frame(frame.to_vec()));
    }

    fn receive(&mut self, exit: u64) -> Result<Option<Vec<u8>>, WorldError> {
        let redelivered = {
            let mut s = lock(&self.commit.0);
            let frame = s.redeliver.pop_front();
            if let Some(f) = &frame {
                s.last_frame = Some(xxh3_64(f));
            }
            frame
        };
        if redelivered.is_some() {
            return Ok(redelivered);
        }
        let frame = self.inner.receive(exit)?;
        if let Some(f) = &frame {
            lock(&self.commit.0).last_frame = Some(xxh3_64(f));
            if self.policy() == OutputPolicy::Hold {
                self.commit.inbound(f);
            }
        }
        Ok(frame)
    }

    fn console_input(&mut self, exit: u64, max: usize) -> Result<Option<Vec<u8>>, WorldError> {
        self.inner.console_input(exit, max)
    }

    fn has_network(&self) -> bool {
        self.inner.has_network()
    }

    fn input_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.inner.input_fds()
    }

    fn disk_read(&mut self, disk: usize, offset: u64, buf: &mut [u8]) -> Result<(), WorldError> {
        self.inner.disk_read(disk, offset, buf)
    }

    fn disk_write(&mut self, disk: usize, offset: u64, data: &[u8]) -> Result<(), WorldError> {
        let mut s = lock(&self.commit.0);
        if let Some(ranges) = &mut s.ranges {
            // Noted before the write: one that fails half done is covered too.
            ranges.push(DiskRange {
                offset,
                len: data.len() as u64,
            });
        }
        drop(s);
        self.inner.disk_write(disk, offset, data)?;
        let mut s = lock(&self.commit.0);
        if s.recording {
            s.writes.push(DiskWrite {
                offset,
                data: data.to_vec(),
            });
        }
        Ok(())
    }

    fn disk_flush(&mut self, disk: usize) -> Result<(), WorldError> {
        self.inner.disk_flush(disk)?;
        let mut s = lock(&self.commit.0);
        let at = s.writes.len() as u32;
        if s.flushes.last() != Some(&at) {
            s.flushes.push(at);
        }
        Ok(())
    }

    fn idle(&mut self, request: &IdleRequest) -> Result<Wake, WorldError> {
        if !lock(&self.commit.0).redeliver.is_empty() {
            return Ok(Wake {
                at_ns: request.now_ns,
            });
        }
        let deadline = {
            let mut s = lock(&self.commit.0);
            if !s.outputs.is_empty() {
                // Output is waiting and the guest has nothing to do: end the epoch now
                // rather than hold the output for the rest of it.
                s.pause = true;
                return Ok(Wake {
                    at_ns: request.now_ns,
                });
            }
            if s.outputs.is_empty() && s.writes.is_empty() && s.flushes.is_empty() {
                s.deadline.max(s.started + IDLE_EPOCH)
            } else {
                s.deadline
            }
        };
        let mut req = *request;
        req.give_up_at = Some(deadline);
        self.inner.idle(&req)
    }

    fn set_virtual_now(&mut self, now_ns: u64) {
        self.inner.set_virtual_now(now_ns);
    }

    fn flush(&mut self) {
        self.inner.flush();
    }

    fn pause_requested(&mut self) -> bool {
        let s = lock(&self.commit.0);
        // A fenced node's guest stops at once (the node kicks its vCPU).
        s.pause || s.discarded || Instant::now() >= s.deadline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);

    impl Write for Console {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(s: &str) -> Output {
        Output::Console(s.as_bytes().to_vec())
    }

    #[test]
    fn held_outputs_wait_for_the_session_and_nothing_leaves_after_a_discard() {
        let console = Console::default();
        let released = || String::from_utf8(console.0.lock().unwrap().clone()).unwrap();
        let c = Commit::new(Sinks {
            console: Box::new(console.clone()),
            tap: None,
        });
        c.start_epoch(1, Duration::from_millis(10));
        c.output(OutputPolicy::Pass, line("zero\n"));
        c.output(OutputPolicy::Hold, line("one\n"));
        assert_eq!(released(), "zero\n", "passed at once, held kept");
        assert_eq!(c.seal().outputs, vec![line("one\n")]);
        c.release(vec![line("one\n")]);
        assert_eq!(released(), "zero\none\n");
        c.output(OutputPolicy::Discard, line("two\n"));
        assert!(c.seal().outputs.is_empty());
        c.output(OutputPolicy::Hold, line("three\n"));
        c.discard();
        assert!(c.seal().outputs.is_empty(), "held output dropped");
        c.output(OutputPolicy::Pass, line("four\n"));
        c.release(vec![line("five\n")]);
        assert_eq!(
            released(),
            "zero\none\n",
            "a fenced node releases nothing more"
        );
    }
}
