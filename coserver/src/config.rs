//! The CoServer configuration file (TOML): parsing and validation with errors that name
//! the offending key.

use ftvm_vmm::cpu_template::CpuTemplate;
use ftvm_vmm::input_watch::InputDelivery;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors of loading a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (it names the line and key).
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// One CoServer's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's name (unique in the pair).
    pub node: String,
    /// The guest.
    pub guest: GuestConfig,
    /// This host's resources.
    pub host: HostConfig,
    /// The links to the peer (two or more).
    #[serde(rename = "link")]
    pub links: Vec<LinkConfig>,
    /// Heartbeats.
    #[serde(default)]
    pub heartbeat: HeartbeatConfig,
    /// Replication (checkpoint or lockstep).
    #[serde(default)]
    pub replication: ReplicationConfig,
    /// The split-brain arbiter.
    pub arbiter: ArbiterConfig,
    /// The control API.
    #[serde(default)]
    pub control: ControlConfig,
    /// Link authentication.
    pub security: SecurityConfig,
}

/// The guest both CoServers run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GuestConfig {
    /// Kernel image; default the built-in test guest.
    pub kernel: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Memory in MiB.
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    /// The guest's MAC address.
    #[serde(default = "default_mac")]
    pub mac: String,
    /// The guest's IPv4 address (announced by gratuitous ARP on takeover).
    pub ip: Option<Ipv4Addr>,
    /// The CPUID the guest sees (`host`, `baseline` or `emulated-kernel`); both
    /// CoServers must name the same.
    #[serde(default)]
    pub cpu_template: CpuTemplate,
    /// An initial ramdisk for the kernel.
    pub initrd: Option<PathBuf>,
    /// When frames and console input reach the guest (`at-exits` or `async`); default
    /// `async` with `kernel`, `at-exits` for the built-in test guest.
    pub inputs: Option<InputDelivery>,
}

impl GuestConfig {
    /// When inputs reach the guest, the default applied.
    pub fn inputs(&self) -> InputDelivery {
        self.inputs
            .unwrap_or(InputDelivery::default_for(self.kernel.is_some()))
    }
}

/// This host's replica of the guest's devices.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// This host's replica of the guest's disk (raw image; same size on both hosts).
    pub disk: Option<PathBuf>,
    /// The tap the guest's network uses on this host (checked at startup; held open,
    /// never written, while the guest runs on the other host).
    pub tap: Option<String>,
    /// Where this node keeps its own small state (the last arbiter generation it knew).
    pub state_dir: PathBuf,
}

/// One link: this end's address and the peer's.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    /// Address this node listens on.
    pub local: SocketAddr,
    /// The peer's address on this link.
    pub peer: SocketAddr,
}

/// Heartbeat timing.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// Interval in milliseconds (5 to 1000).
    #[serde(default = "default_interval")]
    pub interval_ms: u64,
    /// Intervals without any message before the peer (or a link) counts as lost.
    #[serde(default = "default_misses")]
    pub misses: u32,
    /// Run the node's event loop and the links' threads at real-time priority
    /// (`crate::priority`), so a busy host does not delay heartbeats.
    #[serde(default = "default_realtime")]
    pub realtime: bool,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval_ms: default_interval(),
            misses: default_misses(),
            realtime: default_realtime(),
        }
    }
}

impl HeartbeatConfig {
    /// The heartbeat interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }

    /// Silence after which the peer (or one link) is lost.
    pub fn timeout(&self) -> Duration {
        self.interval() * self.misses
    }
}

/// Replication.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationConfig {
    /// How the pair replicates: "checkpoint" or "lockstep".
    #[serde(default)]
    pub mode: crate::protocol::ReplicationMode,
    /// Longest epoch in milliseconds (an epoch also ends early when the guest idles with
    /// output waiting).
    #[serde(default = "default_epoch")]
    pub epoch_ms: u64,
    /// How long a primary waits for an acknowledgement before it treats the secondary
    /// as lost (default: the heartbeat timeout).
    pub ack_timeout_ms: Option<u64>,
    /// Lockstep: the primary ends a slice of its log at least every this many exits,
    /// and the secondary compares its exit count, exit trace and output digest with the
    /// primary's at every slice's end.
    #[serde(default = "default_verify_exits")]
    pub verify_exits: u64,
    /// Lockstep: how many exits the secondary's guest may be behind the primary's
    /// before the primary's guest waits for it.
    #[serde(default = "default_max_lag_exits")]
    pub max_lag_exits: u64,
    /// Lockstep: how long (ms) ago the oldest slice the secondary's guest has not
    /// executed may have been cut before the primary's guest waits: a takeover executes
    /// that tail before the guest goes live, so this bounds what it adds to a failover.
    #[serde(default = "default_max_lag_ms")]
    pub max_lag_ms: u64,
    /// Lockstep: how often (ms) the secondary compares a window of its guest's memory
    /// (1 MiB, sweeping all of RAM in turn) with the primary's.
    #[serde(default = "default_verify_memory_ms")]
    pub verify_memory_ms: u64,
    /// The most a copy to a joining secondary sends, in MiB/s (0: as fast as the
    /// secondary applies it). A cap leaves CPU and link time to the running guest
    /// (docs/PERFORMANCE.md).
    #[serde(default)]
    pub copy_max_mib_s: u64,
}

fn default_max_lag_ms() -> u64 {
    50
}

fn default_verify_memory_ms() -> u64 {
    100
}

fn default_verify_exits() -> u64 {
    20_000
}

fn default_max_lag_exits() -> u64 {
    200_000
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        Self {
            mode: Default::default(),
            epoch_ms: default_epoch(),
            ack_timeout_ms: None,
            verify_exits: default_verify_exits(),
            max_lag_exits: default_max_lag_exits(),
            max_lag_ms: default_max_lag_ms(),
            verify_memory_ms: default_verify_memory_ms(),
            copy_max_mib_s: 0,
        }
    }
}

impl Config {
    /// The configuration as TOML, as [`Config::load`] reads it (tools and tests write
    /// configurations from this struct rather than by hand).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// How long a primary waits for an acknowledgement before it treats the secondary
    /// as lost.
    pub fn ack_timeout(&self) -> Duration {
        self.replication.ack_timeout_ms.map_or(
            self.heartbeat.timeout().max(MIN_DEFAULT_ACK_TIMEOUT),
            Duration::from_millis,
        )
    }
}

/// The arbiter consulted before taking over.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ArbiterConfig {
    /// A lock on storage both hosts see (a directory).
    SharedStorage {
        /// The directory.
        path: PathBuf,
    },
    /// No arbiter: never take over automatically. `primary` names the node that starts
    /// the guest.
    None {
        /// The node that runs the guest at start.
        primary: String,
    },
}

/// The control API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Listen address (localhost by default).
    #[serde(default = "default_control")]
    pub listen: SocketAddr,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: default_control(),
        }
    }
}

/// Link authentication.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// The pre-shared key, inline (at least 16 characters).
    pub psk: Option<String>,
    /// A file holding the pre-shared key.
    pub psk_file: Option<PathBuf>,
    /// Encrypt link traffic (the guest's memory and disk). Off only for a dedicated
    /// cable between the hosts; links are authenticated either way.
    #[serde(default = "default_true")]
    pub encrypt: bool,
}

fn default_true() -> bool {
    true
}

fn default_mem() -> u64 {
    128
}
fn default_mac() -> String {
    "52:54:00:f7:00:01".to_string()
}
fn default_interval() -> u64 {
    // The fastest setting with no false failover in 10 minutes of a busy guest on busy
    // cores (docs/PERFORMANCE.md, "False failovers").
    5
}
fn default_misses() -> u32 {
    3
}
fn default_realtime() -> bool {
    false
}
fn default_epoch() -> u64 {
    20
}
fn default_control() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7200))
}

/// The default acknowledgement timeout is the peer timeout, but not shorter than this:
/// a secondary's `fdatasync` on a busy host took up to 39 ms (docs/PERFORMANCE.md,
/// "False failovers"), and a fast heartbeat must not make that a failover.
const MIN_DEFAULT_ACK_TIMEOUT: Duration = Duration::from_millis(100);

/// Shortest pre-shared key accepted.
const MIN_PSK: usize = 16;

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        if self.node.is_empty() || self.node.len() > 64 {
            return Err(bad("node", "must be 1 to 64 characters".into()));
        }
        if self.links.len() < 2 {
            return Err(bad(
                "link",
                format!(
                    "{} link(s) configured; a pair needs two or more redundant links",
                    self.links.len()
                ),
            ));
        }
        for (i, l) in self.links.iter().enumerate() {
            if self.links[..i].iter().any(|o| o.local == l.local) {
                return Err(bad("link.local", format!("{} is used twice", l.local)));
            }
        }
        let hb = &self.heartbeat;
        if !(5..=1000).contains(&hb.interval_ms) {
            return Err(bad(
                "heartbeat.interval_ms",
                format!("{} is outside 5 to 1000", hb.interval_ms),
            ));
        }
        if !(1..=100).contains(&hb.misses) {
            return Err(bad(
                "heartbeat.misses",
                format!("{} is outside 1 to 100", hb.misses),
            ));
        }
        if !(1..=1000).contains(&self.replication.epoch_ms) {
            return Err(bad(
                "replication.epoch_ms",
                format!("{} is outside 1 to 1000", self.replication.epoch_ms),
            ));
        }
        let r = &self.replication;
        if !(100..=10_000_000).contains(&r.verify_exits) {
            return Err(bad(
                "replication.verify_exits",
                format!("{} is outside 100 to 10000000", r.verify_exits),
            ));
        }
        if !(1..=60_000).contains(&r.max_lag_ms) {
            return Err(bad(
                "replication.max_lag_ms",
                format!("{} is outside 1 to 60000", r.max_lag_ms),
            ));
        }
        if !(1..=60_000).contains(&r.verify_memory_ms) {
            return Err(bad(
                "replication.verify_memory_ms",
                format!("{} is outside 1 to 60000", r.verify_memory_ms),
            ));
        }
        if r.max_lag_exits < r.verify_exits {
            return Err(bad(
                "replication.max_lag_exits",
                format!(
                    "{} is less than replication.verify_exits ({}): the secondary could never be a slice behind",
                    r.max_lag_exits, r.verify_exits
                ),
            ));
        }
        if let Some(t) = self.replication.ack_timeout_ms {
            if !(10..=60_000).contains(&t) {
                return Err(bad(
                    "replication.ack_timeout_ms",
                    format!("{t} is outside 10 to 60000"),
                ));
            }
        }
        if self.replication.mode == crate::protocol::ReplicationMode::Lockstep
            && self.guest.inputs() == InputDelivery::Async
        {
            return Err(bad(
                "guest.inputs",
                "lockstep replays inputs at exits; a guest given inputs asynchronously (the default with guest.kernel) cannot be replayed exactly: set guest.inputs = \"at-exits\" or use replication.mode = \"checkpoint\"".into(),
            ));
        }
        if !(16..=65536).contains(&self.guest.mem_mib) {
            return Err(bad(
                "guest.mem_mib",
                format!("{} is outside 16 to 65536", self.guest.mem_mib),
            ));
        }
        if crate::attach::parse_mac(&self.guest.mac).is_err() {
            return Err(bad(
                "guest.mac",
                format!(
                    "{:?} is not a unicast MAC like 52:54:00:12:34:56",
                    self.guest.mac
                ),
            ));
        }
        if self.host.tap.is_some() && self.guest.ip.is_none() {
            return Err(bad(
                "guest.ip",
                "required with host.tap (a new primary announces it by gratuitous ARP)".into(),
            ));
        }
        match (&self.security.psk, &self.security.psk_file) {
            (Some(_), Some(_)) => {
                return Err(bad("security", "give psk or psk_file, not both".into()))
            }
            (None, None) => return Err(bad("security", "psk or psk_file is required".into())),
            (Some(k), None) if k.len() < MIN_PSK => {
                return Err(bad(
                    "security.psk",
                    format!("{} characters; at least {MIN_PSK} required", k.len()),
                ))
            }
            _ => {}
        }
        if let ArbiterConfig::None { primary } = &self.arbiter {
            if primary.is_empty() {
                return Err(bad("arbiter.primary", "must name a node".into()));
            }
        }
        Ok(())
    }

    /// The pre-shared key's bytes (read from `psk_file` if given).
    pub fn psk(&self) -> Result<Vec<u8>, ConfigError> {
        match (&self.security.psk, &self.security.psk_file) {
            (Some(k), _) => Ok(k.as_bytes().to_vec()),
            (None, Some(f)) => {
                let key = std::fs::read(f).map_err(|source| ConfigError::Read {
                    path: f.clone(),
                    source,
                })?;
                let key = key.trim_ascii().to_vec();
                if key.len() < MIN_PSK {
                    return Err(ConfigError::Invalid {
                        path: f.clone(),
                        key: "security.psk_file".into(),
                        message: format!("{} bytes; at least {MIN_PSK} required", key.len()),
                    });
                }
                Ok(key)
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
node = "a"
[guest]
cmdline = "workload=counter"
[host]
state_dir = "/tmp/a"
[[link]]
local = "127.0.0.1:7101"
peer = "127.0.0.1:7201"
[[link]]
local = "127.0.0.1:7102"
peer = "127.0.0.1:7202"
[arbiter]
kind = "shared-storage"
path = "/tmp/arb"
[security]
psk = "0123456789abcdef"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("pair.toml"))
    }

    #[test]
    fn a_good_config_gets_defaults() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.links.len(), 2);
        assert_eq!(c.heartbeat.interval_ms, 5);
        assert_eq!(c.heartbeat.misses, 3);
        assert_eq!(c.guest.mem_mib, 128);
        assert_eq!(c.control.listen.ip().to_string(), "127.0.0.1");
        assert!(matches!(c.arbiter, ArbiterConfig::SharedStorage { .. }));
        assert!(c.security.encrypt, "encrypted by default");
        assert_eq!(
            c.ack_timeout(),
            Duration::from_millis(100),
            "a fast heartbeat does not make the acknowledgement timeout as short"
        );
        assert!(!c.heartbeat.realtime, "normal priority unless asked");
        let slow = parse(&GOOD.replace(
            "[security]",
            "[heartbeat]\ninterval_ms = 50\nmisses = 3\n[security]",
        ))
        .unwrap();
        assert_eq!(slow.ack_timeout(), Duration::from_millis(150));
        let plain = parse(&GOOD.replace("[security]", "[security]\nencrypt = false")).unwrap();
        assert!(!plain.security.encrypt);
        assert_eq!(c.guest.cpu_template, CpuTemplate::Host);
        let emulated = parse(&GOOD.replace(
            "cmdline = \"workload=counter\"",
            "cmdline = \"workload=counter\"\ncpu_template = \"emulated-kernel\"",
        ))
        .unwrap();
        assert_eq!(emulated.guest.cpu_template, CpuTemplate::EmulatedKernel);
        assert_eq!(
            c.guest.inputs(),
            InputDelivery::AtExits,
            "the built-in guest"
        );
        let linux = parse(&GOOD.replace("[guest]", "[guest]\nkernel = \"/srv/vmlinux\"")).unwrap();
        assert_eq!(
            linux.guest.inputs(),
            InputDelivery::Async,
            "a kernel of the user's"
        );
    }

    #[test]
    fn bad_configs_name_the_key() {
        let cases = [
            (
                GOOD.replace(
                    "[[link]]\nlocal = \"127.0.0.1:7102\"\npeer = \"127.0.0.1:7202\"\n",
                    "",
                ),
                "two or more",
            ),
            (
                GOOD.replace("[security]", "[heartbeat]\ninterval_ms = 4\n[security]"),
                "heartbeat.interval_ms",
            ),
            (
                GOOD.replace("psk = \"0123456789abcdef\"", "psk = \"short\""),
                "security.psk",
            ),
            (
                GOOD.replace("node = \"a\"", "node = \"a\"\ncolour = 3"),
                "unknown field",
            ),
            (
                GOOD.replace("kind = \"shared-storage\"", "kind = \"coin\""),
                "unknown variant",
            ),
            (GOOD.replace("[host]", "[host]\ntap = \"tap0\""), "guest.ip"),
            (
                GOOD.replace("[guest]", "[guest]\nkernel = \"/srv/vmlinux\"")
                    .replace(
                        "[security]",
                        "[replication]\nmode = \"lockstep\"\n[security]",
                    ),
                "guest.inputs",
            ),
            (
                GOOD.replace("[host]", "cpu_template = \"skylake\"\n[host]"),
                "expected one of `host`, `baseline`, `emulated-kernel`",
            ),
            (
                GOOD.replace("[security]", "[replication]\nmode = \"mirror\"\n[security]"),
                "unknown variant",
            ),
            (
                GOOD.replace(
                    "[security]",
                    "[replication]\nack_timeout_ms = 0\n[security]",
                ),
                "replication.ack_timeout_ms",
            ),
            (
                GOOD.replace("peer = \"127.0.0.1:7201\"", "peer = \"nowhere\""),
                "invalid socket address",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(needle), "{needle:?} not in {e:?}");
            assert!(e.starts_with("pair.toml"), "{e}");
        }
    }
}

/// Configurations for tests.
#[doc(hidden)]
pub mod test_support {
    use super::*;

    /// Node `name` with `links` and `arbiter`, a 64 MiB built-in guest without devices,
    /// control on 127.0.0.1:7200, the tests' key, 50 ms × 3 heartbeats, defaults
    /// elsewhere; tests change what they need (and write it with [`Config::to_toml`]).
    pub fn config(
        name: &str,
        state_dir: PathBuf,
        links: Vec<LinkConfig>,
        arbiter: ArbiterConfig,
    ) -> Config {
        Config {
            node: name.into(),
            guest: GuestConfig {
                kernel: None,
                cmdline: String::new(),
                mem_mib: 64,
                mac: "52:54:00:f7:00:01".into(),
                ip: None,
                cpu_template: Default::default(),
                initrd: None,
                inputs: None,
            },
            host: HostConfig {
                disk: None,
                tap: None,
                state_dir,
            },
            links,
            heartbeat: HeartbeatConfig {
                interval_ms: 50,
                misses: 3,
                ..HeartbeatConfig::default()
            },
            replication: ReplicationConfig::default(),
            arbiter,
            control: ControlConfig {
                listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7200)),
            },
            security: SecurityConfig {
                psk: Some("pair-test-key-0123456789".into()),
                psk_file: None,
                encrypt: true,
            },
        }
    }
}
