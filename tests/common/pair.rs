//! A CoServer pair for end-to-end tests: three network namespaces the test creates
//! (host A, host B and a client LAN), two veth links between A and B, and on each host a
//! bridge joining its tap to the LAN, so the guest keeps one address whichever host runs
//! it. Everything is removed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::net::SocketAddr;

pub use ftvm_coserver::config::{ArbiterConfig, Config, HeartbeatConfig, LinkConfig};
use ftvm_coserver::netns::ip;
pub use ftvm_coserver::protocol::ReplicationMode;

use crate::common::{kvm_available, root_available};

pub const LIMIT: Duration = Duration::from_secs(60);
/// 20 ms heartbeats, peer lost after 200 ms: clear of false failovers on a loaded
/// machine running other tests.
pub const HEARTBEAT: (u64, u32) = (20, 10);

/// Starts A, waits until it runs the guest, starts B and waits until the pair is
/// protected.
pub fn protected_pair(
    net: &PairNet,
    dir: &std::path::Path,
    guest: &GuestSpec,
) -> (CoServer, CoServer) {
    let ca = write_config(dir, 0, guest);
    let cb = write_config(dir, 1, guest);
    let a = CoServer::start_initial("a", &net.ns[0], &ca);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "role") == "primary"),
        "A never became primary:\n{}",
        a.log()
    );
    let b = CoServer::start("b", &net.ns[1], &cb);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "mode") == "protected"
            && field(&b.status(), "mode") == "ready"),
        "the pair never became protected:\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    (a, b)
}

/// The guest `cmdline` with a disk replica of `disk_mib` MiB (0: none) and, if
/// `network`, a tap on each host.
pub fn spec(cmdline: &str, disk_mib: u64, network: bool) -> GuestSpec {
    GuestSpec {
        cmdline: cmdline.into(),
        disk_mib,
        network,
        heartbeat: HEARTBEAT,
        epoch_ms: 10,
        b_disk_dir: None,
        arbiter: TestArbiter::Shared,
        mode: ReplicationMode::Checkpoint,
        linux: None,
    }
}

/// [`spec`] in lockstep mode.
pub fn lockstep(cmdline: &str, disk_mib: u64, network: bool) -> GuestSpec {
    GuestSpec {
        mode: ReplicationMode::Lockstep,
        ..spec(cmdline, disk_mib, network)
    }
}

/// A disk guest writing for about ten seconds at a paced rate, its 16 MiB replica on
/// node B kept in `b_disk_dir` (a file system the test freezes or fills).
pub fn paced_disk_with_b_on(b_disk_dir: PathBuf) -> GuestSpec {
    GuestSpec {
        b_disk_dir: Some(b_disk_dir),
        ..spec(
            "workload=disk blocks=3072 batch=1 pace_us=3000 progress=128",
            16,
            false,
        )
    }
}

/// A counter guest that runs for about ten seconds.
pub const COUNTER: &str = "workload=counter pages=800 steps=400 tick_ms=25";

/// Checks KVM and root, builds the namespaces and a temporary directory, or says why
/// the test skips.
pub fn setup(test: &str, tag: &str) -> Option<(PairNet, tempfile::TempDir)> {
    if !kvm_available(test) || !root_available(test) {
        return None;
    }
    let net = PairNet::create(test, tag)?;
    Some((net, tempfile::tempdir().unwrap()))
}

/// The guest's address on the LAN.
pub const GUEST_IP: &str = "10.0.99.2";
/// The guest's MAC address.
pub const GUEST_MAC: &str = "52:54:00:f7:00:01";

/// The namespaces and links.
pub struct PairNet {
    /// Namespace of host A, host B, and the client LAN.
    pub ns: [String; 3],
}

impl PairNet {
    /// Builds the topology or says why it cannot.
    pub fn try_create(tag: &str) -> Result<Self, String> {
        let base = format!("fp{}{tag}", std::process::id() % 100_000);
        let net = Self {
            ns: [format!("{base}a"), format!("{base}b"), format!("{base}c")],
        };
        for n in &net.ns {
            ip(&["netns", "add", n])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        let [a, b, c] = [&net.ns[0], &net.ns[1], &net.ns[2]];
        for (link, subnet) in [("l1", "10.1.1"), ("l2", "10.1.2")] {
            ip(&[
                "-n", a, "link", "add", link, "type", "veth", "peer", "name", link, "netns", b,
            ])?;
            ip(&[
                "-n",
                a,
                "addr",
                "add",
                &format!("{subnet}.1/24"),
                "dev",
                link,
            ])?;
            ip(&[
                "-n",
                b,
                "addr",
                "add",
                &format!("{subnet}.2/24"),
                "dev",
                link,
            ])?;
            ip(&["-n", a, "link", "set", link, "up"])?;
            ip(&["-n", b, "link", "set", link, "up"])?;
        }
        ip(&["-n", c, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", c, "addr", "add", "10.0.99.1/24", "dev", "br0"])?;
        ip(&["-n", c, "link", "set", "br0", "up"])?;
        for (host, port) in [(a, "pa"), (b, "pb")] {
            ip(&[
                "-n", c, "link", "add", port, "type", "veth", "peer", "name", "lan", "netns", host,
            ])?;
            ip(&["-n", c, "link", "set", port, "master", "br0"])?;
            ip(&["-n", c, "link", "set", port, "up"])?;
            ip(&["-n", host, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", host, "link", "set", "lan", "master", "br0"])?;
            ip(&["-n", host, "tuntap", "add", "dev", "tap0", "mode", "tap"])?;
            ip(&["-n", host, "link", "set", "tap0", "master", "br0"])?;
            for dev in ["lan", "tap0", "br0"] {
                ip(&["-n", host, "link", "set", dev, "up"])?;
            }
        }
        Ok(net)
    }

    /// Builds the topology. Under FTVM_REQUIRE_KVM=1 a failure panics; otherwise the
    /// test prints why it skips and gets `None`.
    pub fn create(test: &str, tag: &str) -> Option<Self> {
        match Self::try_create(tag) {
            Ok(n) => Some(n),
            Err(e) => {
                if std::env::var("FTVM_REQUIRE_KVM").as_deref() == Ok("1") {
                    panic!("{test}: FTVM_REQUIRE_KVM=1 but the namespaces cannot be made: {e}");
                }
                eprintln!("{test}: SKIPPED: cannot make network namespaces: {e}");
                None
            }
        }
    }

    /// Sets link `n` (1 or 2) down or up on host A's side.
    pub fn link(&self, n: u32, up: bool) {
        let dev = format!("l{n}");
        ip(&[
            "-n",
            &self.ns[0],
            "link",
            "set",
            &dev,
            if up { "up" } else { "down" },
        ])
        .expect("set link");
    }

    /// Cuts (or restores) both links in one direction only: what host `from` (0: A,
    /// 1: B) sends to the other is dropped (a blackhole route to the peer's link
    /// addresses), what it receives still arrives.
    pub fn cut_one_way(&self, from: usize, cut: bool) {
        let peer = if from == 0 { 2 } else { 1 };
        for subnet in ["10.1.1", "10.1.2"] {
            let dest = format!("{subnet}.{peer}/32");
            let verb = if cut { "add" } else { "del" };
            ip(&["-n", &self.ns[from], "route", verb, "blackhole", &dest])
                .expect("blackhole route");
        }
    }

    /// Makes the LAN deliver the guest's frames to both hosts (docs/operations.md, "A
    /// gap-free failover", on a Linux bridge): the LAN bridge learns no address on the
    /// hosts' ports, so it floods frames to the guest to both, and each host's bridge
    /// holds the guest's MAC on its tap for good. Call it before the guest runs.
    pub fn mirror_lan(&self) {
        for port in ["pa", "pb"] {
            ip(&[
                "-n",
                &self.ns[2],
                "link",
                "set",
                "dev",
                port,
                "type",
                "bridge_slave",
                "learning",
                "off",
            ])
            .expect("learning off");
        }
        for host in &self.ns[..2] {
            let out = Command::new("bridge")
                .args([
                    "-n", host, "fdb", "replace", GUEST_MAC, "dev", "tap0", "master", "static",
                    "sticky",
                ])
                .output()
                .expect("run bridge");
            assert!(
                out.status.success(),
                "bridge fdb replace: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs `f` on a thread inside the client LAN namespace.
    pub fn in_lan<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        self.in_ns(2, f)
    }

    /// Runs `f` on a thread inside namespace `n` (0: host A, 1: host B, 2: the LAN).
    pub fn in_ns<T: Send + 'static>(&self, n: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        ftvm_coserver::netns::run_in(&self.ns[n], f).expect("thread in the namespace")
    }
}

impl Drop for PairNet {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = ip(&["netns", "del", n]);
        }
    }
}

/// One CoServer process of the pair.
pub struct CoServer {
    /// "a" or "b".
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its configuration file.
    pub config: PathBuf,
    child: Option<Child>,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
}

/// What the guest runs and which devices it has.
pub struct GuestSpec {
    /// Guest command line.
    pub cmdline: String,
    /// Disk replica size in MiB (0: no disk).
    pub disk_mib: u64,
    /// Give the guest the network (tap in each host's bridge).
    pub network: bool,
    /// Heartbeat interval (ms) and misses before the peer is lost.
    pub heartbeat: (u64, u32),
    /// Longest epoch (ms).
    pub epoch_ms: u64,
    /// Where node B keeps its disk replica, if not in the test's directory (a
    /// filesystem the test can freeze).
    pub b_disk_dir: Option<PathBuf>,
    /// The arbiter both nodes use.
    pub arbiter: TestArbiter,
    /// The replication mode.
    pub mode: ReplicationMode,
    /// A kernel of the test's (default: the built-in test guest), its initrd, memory
    /// (MiB) and CPU template.
    pub linux: Option<LinuxGuest>,
}

/// A Linux kernel for a test pair's guest.
#[derive(Debug, Clone)]
pub struct LinuxGuest {
    /// The kernel (ELF vmlinux).
    pub kernel: PathBuf,
    /// Its initrd.
    pub initrd: PathBuf,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The CPU template.
    pub cpu_template: ftvm_vmm::cpu_template::CpuTemplate,
}

/// The arbiter of a test pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestArbiter {
    /// One shared-storage directory for both nodes.
    Shared,
    /// A shared-storage directory of each node's own (a misconfiguration).
    OwnDirectories,
    /// `kind = "none"`, naming node A as the primary.
    NoneNamingA,
}

/// A CoServer configuration for tests: node `name` with `links` and `arbiter`, a 64 MiB
/// built-in guest (MAC [`GUEST_MAC`]) without devices, control on 127.0.0.1:7200, the
/// tests' key, defaults elsewhere; tests change what they need and write it with
/// [`Config::to_toml`].
pub fn test_config(
    name: &str,
    state_dir: PathBuf,
    links: Vec<LinkConfig>,
    arbiter: ArbiterConfig,
) -> Config {
    let config = ftvm_coserver::config::test_support::config(name, state_dir, links, arbiter);
    assert_eq!(config.guest.mac, GUEST_MAC);
    config
}

/// Changes the configuration file at `path` with `edit`.
pub fn edit_config(path: &Path, edit: &dyn Fn(&mut Config)) {
    let mut c: Config =
        toml::from_str(&std::fs::read_to_string(path).expect("read config")).expect("config");
    edit(&mut c);
    std::fs::write(path, c.to_toml().expect("config as TOML")).expect("write config");
}

/// Writes the configuration of node `name` (index 0 = A, 1 = B) into `dir`.
pub fn write_config(dir: &Path, index: usize, guest: &GuestSpec) -> PathBuf {
    let name = ["a", "b"][index];
    let arbiter = match guest.arbiter {
        TestArbiter::OwnDirectories => dir.join(format!("arbiter-{name}")),
        TestArbiter::Shared | TestArbiter::NoneNamingA => dir.join("arbiter"),
    };
    let (me, peer): (u8, u8) = if index == 0 { (1, 2) } else { (2, 1) };
    let disk = match (&guest.b_disk_dir, index) {
        (Some(d), 1) => d.join(format!("disk-{name}.img")),
        _ => dir.join(format!("disk-{name}.img")),
    };
    if guest.disk_mib > 0 {
        let f = std::fs::File::create(&disk).expect("disk image");
        f.set_len(guest.disk_mib << 20).expect("disk size");
    }
    let link = |subnet: u8| LinkConfig {
        local: SocketAddr::from(([10, 1, subnet, me], 7100)),
        peer: SocketAddr::from(([10, 1, subnet, peer], 7100)),
    };
    let mut config = test_config(
        name,
        dir.join(format!("state-{name}")),
        vec![link(1), link(2)],
        match guest.arbiter {
            TestArbiter::NoneNamingA => ArbiterConfig::None {
                primary: "a".into(),
            },
            TestArbiter::Shared | TestArbiter::OwnDirectories => ArbiterConfig::SharedStorage {
                path: arbiter.clone(),
            },
        },
    );
    config.guest.cmdline = guest.cmdline.clone();
    if let Some(linux) = &guest.linux {
        config.guest.kernel = Some(linux.kernel.clone());
        config.guest.initrd = Some(linux.initrd.clone());
        config.guest.mem_mib = linux.mem_mib;
        config.guest.cpu_template = linux.cpu_template;
    }
    config.guest.ip = GUEST_IP.parse().ok();
    config.host.disk = (guest.disk_mib > 0).then_some(disk);
    config.host.tap = guest.network.then(|| "tap0".to_string());
    config.heartbeat = HeartbeatConfig {
        interval_ms: guest.heartbeat.0,
        misses: guest.heartbeat.1,
        ..HeartbeatConfig::default()
    };
    config.replication.epoch_ms = guest.epoch_ms;
    config.replication.mode = guest.mode;
    std::fs::create_dir_all(&arbiter).expect("arbiter directory");
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config.to_toml().expect("config as TOML")).expect("write config");
    path
}

fn collect(mut stream: impl std::io::Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    // Byte for byte (not by lines), so what a node released is compared exactly.
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = stream.read(&mut chunk) {
            if n == 0 {
                break;
            }
            if let Ok(mut s) = b.lock() {
                s.push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }
    });
    buf
}

impl CoServer {
    /// Starts `ftvm coserver` in namespace `ns`.
    pub fn start(name: &str, ns: &str, config: &Path) -> Self {
        Self::start_with(name, ns, config, &[])
    }

    /// Starts the pair's first primary at its first deployment: its disk replica is the
    /// pair's data (`--initial-primary`).
    pub fn start_initial(name: &str, ns: &str, config: &Path) -> Self {
        Self::start_with(name, ns, config, &["--initial-primary"])
    }

    /// Starts `ftvm coserver` in namespace `ns` with `extra` arguments.
    pub fn start_with(name: &str, ns: &str, config: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                env!("CARGO_BIN_EXE_ftvm"),
                "coserver",
                "--config",
            ])
            .arg(config)
            .args(extra)
            .env(
                "FTVM_LOG",
                std::env::var("FTVM_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn coserver");
        let out = collect(child.stdout.take().expect("stdout"));
        let err = collect(child.stderr.take().expect("stderr"));
        Self {
            name: name.to_string(),
            ns: ns.to_string(),
            config: config.to_path_buf(),
            child: Some(child),
            out,
            err,
        }
    }

    /// The guest console this node released so far.
    pub fn console(&self) -> String {
        self.out.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.err.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Output of `ftvm ctl status` with `extra` arguments, run in its namespace.
    fn ctl_status(&self, extra: &[&str]) -> Option<Vec<u8>> {
        ctl_status_in(&self.ns, extra)
    }

    /// Its status as JSON, if it answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.ctl_status(&["--json"])?).ok()
    }

    /// Its typed status (the default while it does not answer).
    pub fn typed(&self) -> ftvm_coserver::control::Status {
        self.status()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }

    /// What its replica record holds, as its status says.
    pub fn replica(&self) -> Option<ftvm_coserver::protocol::Standing> {
        self.typed().replica
    }

    /// `ftvm ctl ACTION` against it: its output (stdout then stderr) and whether it
    /// succeeded.
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        match ctl_in(&self.ns, args) {
            Some(o) => (
                o.status.success(),
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr),
            ),
            None => (false, "ftvm ctl did not run".into()),
        }
    }

    /// Its human-readable status.
    pub fn status_text(&self) -> String {
        self.ctl_status(&[])
            .map(|o| String::from_utf8_lossy(&o).into_owned())
            .unwrap_or_default()
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Its resident memory (KiB), from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Kills it with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes it with SIGSTOP, like a host that stops being scheduled.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a paused CoServer run again (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(c) = &self.child {
            // SAFETY: kill has no memory preconditions; the pid is our own child's
            // (`ip netns exec` execs the CoServer in place), not yet reaped.
            let r = unsafe { libc::kill(c.id() as libc::pid_t, sig) };
            assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
        }
    }

    /// Waits for it to exit by itself; its exit code.
    pub fn wait(&mut self, limit: Duration) -> Option<i32> {
        let start = Instant::now();
        let c = self.child.as_mut()?;
        while start.elapsed() < limit {
            if let Ok(Some(s)) = c.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for CoServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `ftvm ctl` with `args`, run in namespace `ns` against the CoServer there.
pub fn ctl_in(ns: &str, args: &[&str]) -> Option<std::process::Output> {
    Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ftvm")])
        .args(["ctl", "--connect", "127.0.0.1:7200"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()
}

/// Output of `ftvm ctl status` with `extra` arguments, run in namespace `ns`.
pub fn ctl_status_in(ns: &str, extra: &[&str]) -> Option<Vec<u8>> {
    let args: Vec<&str> = ["status"].iter().chain(extra).copied().collect();
    Some(ctl_in(ns, &args)?.stdout)
}

/// The typed status of the CoServer in namespace `ns`, if it answers.
pub fn status_in(ns: &str) -> Option<ftvm_coserver::control::Status> {
    serde_json::from_slice(&ctl_status_in(ns, &["--json"])?).ok()
}

/// One request of the guest's key-value protocol on `stream`; its reply line.
pub fn kv(
    stream: &mut std::io::BufReader<std::net::TcpStream>,
    request: &str,
) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    stream
        .get_mut()
        .write_all(format!("{request}\n").as_bytes())?;
    let mut reply = String::new();
    if stream.read_line(&mut reply)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    Ok(reply.trim_end().to_string())
}

/// Segments the kernel retransmitted on `stream` so far (`TCP_INFO`'s
/// `tcpi_total_retrans`: retransmission timeouts, tail-loss probes and fast
/// retransmissions alike).
pub fn tcp_retransmits(stream: &std::net::TcpStream) -> u32 {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain integers; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which lives for the
    // call, and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
    info.tcpi_total_retrans
}

/// A key-value client's connection to the guest (run in the LAN namespace): connected
/// within 10 s, each reply within 20 s.
pub fn kv_connect() -> std::io::BufReader<std::net::TcpStream> {
    let addr = format!("{GUEST_IP}:7000").parse().expect("guest address");
    let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    std::io::BufReader::new(s)
}

/// SETs `k0` to `k{count - 1}` one at a time over `c`, each answered `OK`, telling
/// `signal` just before SET number `at`; returns the longest SET.
pub fn set_keys(
    c: &mut std::io::BufReader<std::net::TcpStream>,
    count: u32,
    at: u32,
    signal: &std::sync::mpsc::Sender<()>,
) -> Duration {
    let mut worst = Duration::ZERO;
    for i in 0..count {
        if i == at {
            signal.send(()).expect("signal");
        }
        let t = Instant::now();
        let reply = kv(c, &format!("SET k{i} v{i}")).expect("SET over the same connection");
        assert_eq!(reply, "OK", "SET k{i}");
        worst = worst.max(t.elapsed());
    }
    worst
}

/// GETs `k0` to `k{count - 1}` over `c`: every acknowledged SET reads back.
pub fn get_keys(c: &mut std::io::BufReader<std::net::TcpStream>, count: u32) {
    for i in 0..count {
        assert_eq!(
            kv(c, &format!("GET k{i}")).expect("GET over the same connection"),
            format!("VALUE v{i}"),
            "acknowledged SET k{i} lost"
        );
    }
}

/// The console of `cmdline` run alone (idle waits skipped: the same output, sooner) on a
/// fresh disk of `disk_mib` MiB (none if 0).
pub fn solo_console(dir: &std::path::Path, cmdline: &str, disk_mib: u64) -> String {
    let img = dir.join("solo.img");
    let mut args = vec!["run", "--mem", "64", "--idle", "skip", "--cmdline", cmdline];
    if disk_mib > 0 {
        std::fs::File::create(&img)
            .unwrap()
            .set_len(disk_mib << 20)
            .unwrap();
        args.extend(["--disk", crate::common::s(&img)]);
    }
    let solo = crate::common::ftvm_outcome(&args);
    assert_eq!(solo.code, 0, "{}", solo.stderr);
    solo.console
}

/// A key-value client in the LAN SETs `count` keys over one connection while the
/// primary `primary` is SIGKILLed just before SET `at`; then it reads every key back
/// over the same connection and powers the guest off. Returns the longest SET.
pub fn sets_across_a_primary_kill(
    net: &PairNet,
    mut primary: CoServer,
    count: u32,
    at: u32,
) -> Duration {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            rx.recv().expect("the client's signal");
            primary.kill();
        });
        net.in_lan(move || {
            let mut c = kv_connect();
            let worst = set_keys(&mut c, count, at, &tx);
            get_keys(&mut c, count);
            assert_eq!(kv(&mut c, "SHUTDOWN").expect("SHUTDOWN"), "BYE");
            worst
        })
    })
}

/// Whether `a` is a protected primary and `b` its ready secondary.
pub fn protected(a: &CoServer, b: &CoServer) -> bool {
    a.typed().mode.as_deref() == Some("protected") && b.typed().mode.as_deref() == Some("ready")
}

/// Polls `cond` every 20 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A status field as a string ("" if absent).
pub fn field<'a>(status: &'a Option<serde_json::Value>, key: &str) -> &'a str {
    status
        .as_ref()
        .and_then(|s| s.get(key))
        .and_then(|v| v.as_str())
        .unwrap_or("")
}

/// The key-value guest with an 8 MiB disk, on the network.
pub fn kv_guest() -> GuestSpec {
    spec(&format!("workload=net ip={GUEST_IP}/24"), 8, true)
}

/// What a key-value client saw: when each SET was answered and how long it took, and
/// the segments its TCP stack retransmitted.
pub struct ClientRun {
    /// When each SET was answered, and how long it took.
    pub sets: Vec<(Instant, Duration)>,
    /// Segments its TCP stack retransmitted.
    pub retransmits: u32,
}

impl ClientRun {
    /// The longest SET answered in `[from, to]`.
    pub fn worst(&self, from: Instant, to: Instant) -> Duration {
        self.in_window(from, to)
            .map(|(_, d)| *d)
            .max()
            .unwrap_or_default()
    }

    /// SETs per second answered in `[from, to]`.
    pub fn rate(&self, from: Instant, to: Instant) -> f64 {
        self.in_window(from, to).count() as f64 / (to - from).as_secs_f64()
    }

    fn in_window(&self, from: Instant, to: Instant) -> impl Iterator<Item = &(Instant, Duration)> {
        self.sets
            .iter()
            .filter(move |(t, _)| *t >= from && *t <= to)
    }
}

/// Keys the client cycles through (the guest's store holds 8192).
pub const KEYS: usize = 4096;

/// A client in the LAN SETting keys one at a time until `stop` (SET number n sets key
/// n mod [`KEYS`] to `v{n}`); then it reads every key back over the same connection
/// (each holds its last acknowledged value) and shuts the guest down.
pub fn client_until(net: &PairNet, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<ClientRun> {
    let ns = net.ns[2].clone();
    std::thread::spawn(move || {
        ftvm_coserver::netns::run_in(&ns, move || {
            let mut c = kv_connect();
            let before = tcp_retransmits(c.get_ref());
            let mut sets = Vec::new();
            while !stop.load(Ordering::SeqCst) && sets.len() < 500_000 {
                let n = sets.len();
                let t = Instant::now();
                let reply = kv(&mut c, &format!("SET k{} v{n}", n % KEYS))
                    .expect("SET over the same connection");
                assert_eq!(reply, "OK", "SET number {n}");
                sets.push((Instant::now(), t.elapsed()));
            }
            let retransmits = tcp_retransmits(c.get_ref()) - before;
            let n = sets.len();
            let mut lost = Vec::new();
            for key in 0..n.min(KEYS) {
                let last = (n - 1 - key) / KEYS * KEYS + key;
                let got = kv(&mut c, &format!("GET k{key}")).expect("GET over the same connection");
                if got != format!("VALUE v{last}") {
                    lost.push((last, got));
                }
            }
            assert!(
                lost.is_empty(),
                "{} of {n} acknowledged SETs lost (SET number, what GET read): {:?}",
                lost.len(),
                &lost[..lost.len().min(20)]
            );
            assert_eq!(kv(&mut c, "SHUTDOWN").expect("SHUTDOWN"), "BYE");
            ClientRun { sets, retransmits }
        })
        .expect("client thread in the LAN")
    })
}

/// One switchover of [`switch_over_back_and_forth`].
pub struct SwitchoverRound {
    /// When `ftvm ctl switchover` was run.
    pub asked: Instant,
    /// How long it took (it returns once the peer is primary).
    pub took: Duration,
    /// How long after the previous switchover returned the pair was protected again
    /// (none before the first).
    pub reprotected: Option<Duration>,
}

/// Switches the protected pair `nodes` (node 0 primary) over `count` times back and
/// forth, each time once it is protected again and `before` has passed; `each` is
/// shown the round and the primary just before it is asked. Returns the rounds and
/// the index of the primary at the end.
pub fn switch_over_back_and_forth(
    nodes: &[CoServer; 2],
    count: usize,
    before: Duration,
    mut each: impl FnMut(usize, &CoServer),
) -> (Vec<SwitchoverRound>, usize) {
    let mut primary = 0;
    let mut rounds = Vec::new();
    for round in 0..count {
        let (p, s) = (&nodes[primary], &nodes[1 - primary]);
        let t = Instant::now();
        assert!(
            wait_until(LIMIT, || protected(p, s)),
            "round {round}: not protected:\n{}\n{}",
            p.status_text(),
            s.log()
        );
        let reprotected = (round > 0).then(|| t.elapsed());
        each(round, p);
        std::thread::sleep(before);
        let asked = Instant::now();
        let (ok, out) = p.ctl(&["switchover"]);
        assert!(ok, "round {round}: switchover failed: {out}\n{}", p.log());
        assert!(out.contains("switched over"), "{out}");
        rounds.push(SwitchoverRound {
            asked,
            took: asked.elapsed(),
            reprotected,
        });
        assert_eq!(s.typed().role, "primary", "round {round}");
        primary = 1 - primary;
    }
    (rounds, primary)
}
