//! Links between two pairs of ends on loopback, for the links' tests and benchmark.

use super::*;

/// A free loopback address.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Two link configurations, the first end listening on both.
pub fn pair_configs() -> (Vec<LinkConfig>, Vec<LinkConfig>) {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let (mut p, mut q) = (free_addr(), free_addr());
        if p.to_string() < q.to_string() {
            std::mem::swap(&mut p, &mut q);
        }
        // p sorts higher: its end listens.
        xs.push(LinkConfig { local: p, peer: q });
        ys.push(LinkConfig { local: q, peer: p });
    }
    (xs, ys)
}

/// The key of the tests' pair.
pub const KEY: &[u8] = b"link-test-key-0123456789";

/// Options with 10 ms heartbeats.
pub fn options(key: &[u8], encrypt: bool) -> LinkOptions {
    LinkOptions {
        psk: key.to_vec(),
        encrypt,
        interval: Duration::from_millis(10),
        timeout: Duration::from_millis(500),
        realtime: false,
    }
}

/// What node `node` advertises, with `mem_mib` of guest memory.
pub fn local(node: &str, mem_mib: u64) -> LocalInfo {
    LocalInfo {
        node: node.into(),
        role: Role::Starting,
        generation: 0,
        standing: Standing::Blank,
        arbiter: None,
        guest: GuestShape {
            mem_mib,
            disk_bytes: vec![],
            mode: Default::default(),
            cpu_template: Default::default(),
        },
    }
}

/// The next protocol message within `limit`.
pub fn next_message(rx: &mut Events, limit: Duration) -> Option<Message> {
    let end = Instant::now() + limit;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(Event::Message(m)) => return Some(m),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Waits until `cond` holds for `links`' status, at most 10 s.
pub fn wait_status(links: &Links, cond: impl Fn(&[LinkStatus]) -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if cond(&links.status()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond(&links.status())
}
