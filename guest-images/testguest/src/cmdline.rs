//! Command-line parsing: `workload=NAME` plus the workload's `key=value` parameters,
//! separated by whitespace, and the `virtio_mmio.device=<size>@<base>:<gsi>[:<id>]` tokens
//! the VMM appends (one per virtio device, in device order; docs/guest-abi.md). Errors are
//! fatal (`fatal!`: message, exit code 2).

/// Most parameters (besides `workload=`) a command line may carry.
const MAX_PARAMS: usize = 16;
/// Longest command line read.
const MAX_CMDLINE: usize = 4096;
/// Most entries of a list parameter.
pub const MAX_LIST: usize = 64;
/// Most virtio devices a command line may announce.
pub const MAX_DEVICES: usize = 8;
/// The key of a virtio device announcement.
const VIRTIO_KEY: &str = "virtio_mmio.device";
/// The guest-physical window the test guest maps for virtio MMIO devices (one 2 MiB page).
const MMIO_WINDOW: core::ops::Range<u64> = 0xd000_0000..0xd020_0000;
/// Smallest register window of a virtio-mmio device (registers up to the config space).
const MIN_MMIO_SIZE: u64 = 0x200;
/// Highest GSI the guest can route: vector 0x30 + gsi must stay within 0x31..=0x3f.
const MAX_GSI: u32 = 15;

/// A virtio-mmio device announced on the command line.
#[derive(Clone, Copy)]
pub struct VirtioMmio {
    /// Guest-physical (= virtual) base address of its registers.
    pub base: u64,
    /// Size of its register window.
    pub size: u64,
    /// Its interrupt line (IOAPIC pin), routed to vector 0x30 + gsi.
    pub gsi: u32,
}

/// Reads the NUL-terminated command line the zero page at `boot_params` points to
/// (leading and trailing whitespace removed). If it is not UTF-8, returns its valid prefix
/// as the error.
pub fn read(boot_params: u64) -> Result<&'static str, &'static str> {
    // SAFETY: the zero page is readable (boot protocol); `cmd_line_ptr` is a u32 at 0x228.
    let ptr = unsafe { ((boot_params + 0x228) as *const u32).read_unaligned() } as usize;
    if ptr == 0 {
        return Ok("");
    }
    let base = ptr as *const u8;
    let mut len = 0;
    // SAFETY: the VMM places a NUL-terminated command line at `cmd_line_ptr`, in mapped
    // RAM; reading stops at the NUL (or after MAX_CMDLINE bytes).
    while len < MAX_CMDLINE && unsafe { base.add(len).read_volatile() } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes just read are guest RAM that nothing modifies.
    let bytes = unsafe { core::slice::from_raw_parts(base, len) };
    match core::str::from_utf8(bytes) {
        Ok(s) => Ok(s.trim()),
        // SAFETY: `valid_up_to` bytes are valid UTF-8.
        Err(e) => Err(unsafe { core::str::from_utf8_unchecked(&bytes[..e.valid_up_to()]) }),
    }
}

/// A parsed command line.
pub struct Cmdline {
    /// The `workload=` value.
    pub workload: &'static str,
    /// The other `key=value` pairs and whether a workload has consumed each.
    params: [(&'static str, &'static str, bool); MAX_PARAMS],
    /// Number of entries of `params` in use.
    len: usize,
    /// The announced virtio devices, in order.
    devices: [VirtioMmio; MAX_DEVICES],
    /// Number of entries of `devices` in use.
    ndevices: usize,
}

impl Cmdline {
    /// Parses `line`.
    pub fn parse(line: &'static str) -> Self {
        let mut cmdline = Cmdline {
            workload: "",
            params: [("", "", false); MAX_PARAMS],
            len: 0,
            devices: [VirtioMmio {
                base: 0,
                size: 0,
                gsi: 0,
            }; MAX_DEVICES],
            ndevices: 0,
        };
        for token in line.split_ascii_whitespace() {
            let Some((key, value)) = token.split_once('=') else {
                fatal!("malformed parameter {token:?} (expected key=value)");
            };
            if key.is_empty() {
                fatal!("malformed parameter {token:?} (empty key)");
            }
            if key == VIRTIO_KEY {
                if cmdline.ndevices == MAX_DEVICES {
                    fatal!("too many virtio devices (at most {MAX_DEVICES})");
                }
                cmdline.devices[cmdline.ndevices] = parse_device(value);
                cmdline.ndevices += 1;
                continue;
            }
            if key == "workload" {
                if !cmdline.workload.is_empty() {
                    fatal!("workload= given more than once");
                }
                cmdline.workload = value;
                continue;
            }
            if cmdline.params[..cmdline.len].iter().any(|p| p.0 == key) {
                fatal!("parameter {key:?} given more than once");
            }
            if cmdline.len == MAX_PARAMS {
                fatal!("too many parameters (at most {MAX_PARAMS})");
            }
            cmdline.params[cmdline.len] = (key, value, false);
            cmdline.len += 1;
        }
        if cmdline.workload.is_empty() {
            fatal!("no workload= in the command line");
        }
        cmdline
    }

    /// The virtio devices the command line announces, in device order.
    pub fn devices(&self) -> &[VirtioMmio] {
        &self.devices[..self.ndevices]
    }

    /// The value of `key`, marking it as used.
    pub fn get(&mut self, key: &str) -> Option<&'static str> {
        let param = self.params[..self.len].iter_mut().find(|p| p.0 == key)?;
        param.2 = true;
        Some(param.1)
    }

    /// The decimal u64 value of `key`, or `default` if absent.
    pub fn u64_or(&mut self, key: &str, default: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(value) => match value.parse() {
                Ok(n) => n,
                Err(_) => fatal!("{}: {key}={value:?} is not a decimal u64", self.workload),
            },
        }
    }

    /// The comma-separated list of decimal u64 values of `key` (empty if absent or empty).
    pub fn list(&mut self, key: &str) -> List {
        let mut list = List {
            items: [0; MAX_LIST],
            len: 0,
        };
        let Some(value) = self.get(key) else {
            return list;
        };
        if value.is_empty() {
            return list;
        }
        for item in value.split(',') {
            let Ok(n) = item.parse() else {
                fatal!("{}: {key}: {item:?} is not a decimal u64", self.workload);
            };
            if list.len == MAX_LIST {
                fatal!("{}: {key}: more than {MAX_LIST} entries", self.workload);
            }
            list.items[list.len] = n;
            list.len += 1;
        }
        list
    }

    /// Fails if a parameter was not consumed by the workload.
    pub fn finish(&self) {
        if let Some(p) = self.params[..self.len].iter().find(|p| !p.2) {
            fatal!("{}: unknown parameter {:?}", self.workload, p.0);
        }
    }
}

/// Parses the value of a `virtio_mmio.device=` token: `<size>@<base>:<gsi>[:<id>]` (size
/// and base decimal or 0x-hex, size with an optional K/M suffix as Linux's `memparse`; gsi
/// decimal; a trailing platform-device id is accepted and ignored).
fn parse_device(value: &'static str) -> VirtioMmio {
    let parsed = value.split_once('@').and_then(|(size, rest)| {
        let mut parts = rest.split(':');
        let base = parse_number(parts.next()?, false)?;
        let gsi: u32 = parts.next()?.parse().ok()?;
        if let Some(id) = parts.next() {
            id.parse::<u32>().ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(VirtioMmio {
            base,
            size: parse_number(size, true)?,
            gsi,
        })
    });
    let Some(dev) = parsed else {
        fatal!("malformed {VIRTIO_KEY}={value:?} (expected <size>@<base>:<gsi>)");
    };
    let end = dev.base.saturating_add(dev.size);
    if dev.base < MMIO_WINDOW.start || end > MMIO_WINDOW.end {
        let (start, end) = (MMIO_WINDOW.start, MMIO_WINDOW.end);
        fatal!("{VIRTIO_KEY}={value:?}: not inside the MMIO window {start:#x}..{end:#x}");
    }
    if dev.size < MIN_MMIO_SIZE {
        fatal!("{VIRTIO_KEY}={value:?}: smaller than {MIN_MMIO_SIZE:#x} bytes");
    }
    if !dev.base.is_multiple_of(4) {
        fatal!("{VIRTIO_KEY}={value:?}: the base address is not 4-byte aligned");
    }
    if dev.gsi == 0 || dev.gsi > MAX_GSI {
        fatal!(
            "{VIRTIO_KEY}={value:?}: gsi {} is not in 1..={MAX_GSI}",
            dev.gsi
        );
    }
    dev
}

/// Parses a decimal or `0x` hexadecimal number, with a K or M suffix if `suffix`.
fn parse_number(text: &str, suffix: bool) -> Option<u64> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'k' | b'K') if suffix => (&text[..text.len() - 1], 10),
        Some(b'm' | b'M') if suffix => (&text[..text.len() - 1], 20),
        _ => (text, 0),
    };
    let n = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None => digits.parse().ok()?,
    };
    n.checked_mul(1 << shift)
}

/// A list parameter: up to [`MAX_LIST`] u64 values.
pub struct List {
    items: [u64; MAX_LIST],
    len: usize,
}

impl List {
    /// The values.
    pub fn as_slice(&self) -> &[u64] {
        &self.items[..self.len]
    }
}
