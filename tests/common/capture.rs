//! Records the TCP payload an interface of a test namespace carries (an AF_PACKET
//! socket, as a capture tool would), so a test can replay real link traffic.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One captured TCP segment with data.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number of the first data byte.
    pub seq: u32,
    /// The data.
    pub data: Vec<u8>,
}

/// A capture running on a thread inside a namespace.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Segment>, String>>,
}

/// Bytes kept at most.
const LIMIT: usize = 64 << 20;

/// Starts capturing on `dev` in namespace `ns`.
pub fn start(ns: &str, dev: &str) -> Capture {
    let stop = Arc::new(AtomicBool::new(false));
    let (ns, dev, flag) = (ns.to_string(), dev.to_string(), stop.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let r = capture(&ns, &dev, &flag, &ready_tx);
        let _ = ready_tx.send(());
        r
    });
    // The socket is open once the thread says so.
    let _ = ready_rx.recv();
    Capture { stop, thread }
}

fn capture(
    ns: &str,
    dev: &str,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<()>,
) -> Result<Vec<Segment>, String> {
    ftvm_coserver::netns::enter(ns)?;
    let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto) };
    if fd < 0 {
        return Err(format!(
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    let name = std::ffi::CString::new(dev).map_err(|e| e.to_string())?;
    // SAFETY: `name` is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: sockaddr_ll is plain old data; zeroed is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto as u16;
    addr.sll_ifindex = index as i32;
    // SAFETY: `addr` is a properly initialised sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            fd,
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(format!("bind {dev}: {}", std::io::Error::last_os_error()));
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: `tv` is a valid timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    let _ = ready.send(());
    let mut segs = Vec::new();
    let mut kept = 0;
    let mut buf = vec![0u8; 1 << 17];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
        if n <= 0 {
            continue;
        }
        if let Some(s) = parse(&buf[..n as usize]) {
            if kept < LIMIT {
                kept += s.data.len();
                segs.push(s);
            }
        }
    }
    // SAFETY: `fd` is the socket opened above, closed once.
    unsafe { libc::close(fd) };
    Ok(segs)
}

/// Ethernet, IPv4, TCP with data.
fn parse(f: &[u8]) -> Option<Segment> {
    if f.len() < 14 + 20 || f[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &f[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip[9] != 6 || ip.len() < ihl + 20 || total > ip.len() {
        return None;
    }
    let tcp = &ip[ihl..total];
    let off = ((tcp[12] >> 4) as usize) * 4;
    if tcp.len() <= off {
        return None;
    }
    Some(Segment {
        sport: u16::from_be_bytes([tcp[0], tcp[1]]),
        dport: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        data: tcp[off..].to_vec(),
    })
}

impl Capture {
    /// Stops and returns what was captured.
    pub fn stop(self) -> Vec<Segment> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => panic!("capture failed: {e}"),
            Err(_) => panic!("capture thread panicked"),
        }
    }
}

/// The byte stream of the first captured connection to port `port` (`to_port`: the
/// bytes sent to it; else those it sent back), in sequence order, repeats dropped.
pub fn stream(segs: &[Segment], port: u16, to_port: bool) -> Vec<u8> {
    let dir = |s: &&Segment| {
        if to_port {
            s.dport == port
        } else {
            s.sport == port
        }
    };
    let Some(first) = segs.iter().find(dir) else {
        return Vec::new();
    };
    let peer_port = if to_port { first.sport } else { first.dport };
    let mut mine: Vec<&Segment> = segs
        .iter()
        .filter(dir)
        .filter(|s| if to_port { s.sport } else { s.dport } == peer_port)
        .collect();
    let base = first.seq;
    mine.sort_by_key(|s| s.seq.wrapping_sub(base));
    let mut out = Vec::new();
    for s in mine {
        let at = s.seq.wrapping_sub(base) as usize;
        if at + s.data.len() <= out.len() {
            continue;
        }
        if at > out.len() {
            break; // a gap: keep what is contiguous
        }
        out.extend_from_slice(&s.data[out.len() - at..]);
    }
    out
}
