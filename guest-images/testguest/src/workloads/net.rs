//! Workload `net`: a small network service on the first virtio-net device, with the
//! `smoltcp` TCP/IP stack.
//!
//! Parameters: `ip` (address/prefix, default `10.0.99.2/24`), `udp` (UDP echo port,
//! default 7), `kv` (TCP port of the key-value service, default 7000). It answers ARP and
//! ICMP echo (smoltcp), echoes UDP datagrams, and serves the line protocol of
//! [`super::kvproto`] on [`TCP_SOCKETS`] listening sockets (re-listening after each
//! connection), storing values on the first virtio-blk device ([`super::kv`]) if there is
//! one. Prints `net: up <ip>/<prefix> mac <mac>` when ready; `SHUTDOWN` powers off with
//! exit code 0 once the `BYE` is acknowledged (or after a second).
//!
//! The main loop reads the time once per wake-up (two exits), polls the stack, serves
//! the sockets, polls again if they produced output, notifies the device once, then arms
//! the platform timer for smoltcp's next deadline (only if it is earlier than the armed
//! one) and WAITs, to be woken by a frame or the timer.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet, SocketStorage};
use smoltcp::socket::{tcp, udp};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};

use super::kv::Kv;
use super::kvproto::Conn;
use crate::cmdline::Cmdline;
use crate::io::{arm_timer, entropy_u64, power_off, time_ns, timer_irqs, wait_for_event};
use crate::virtio::blk::Blk;
use crate::virtio::net::VirtioNet;
use crate::virtio::{self, noinit_zeroed, DEVICE_BLK, DEVICE_NET};

/// Listening TCP sockets of the key-value service (concurrent connections).
const TCP_SOCKETS: usize = 8;
/// Bytes of each TCP receive and transmit buffer.
const TCP_BUF: usize = 4096;
/// Datagrams and bytes of each UDP buffer (room for the burst a takeover delivers).
const UDP_PACKETS: usize = 64;
const UDP_BUF: usize = 16384;
/// How long a `SHUTDOWN` waits for its `BYE` to be acknowledged.
const SHUTDOWN_GRACE_NS: u64 = 1_000_000_000;

/// The socket buffers (in `.noinit`).
struct Buffers {
    tcp: [[[u8; TCP_BUF]; 2]; TCP_SOCKETS],
    udp_rx: [u8; UDP_BUF],
    udp_tx: [u8; UDP_BUF],
}

/// Runs the workload.
pub fn run(cmdline: &mut Cmdline) -> ! {
    let ip = cmdline.get("ip").unwrap_or("10.0.99.2/24");
    let Some((addr, prefix)) = parse_cidr(ip) else {
        fatal!("net: ip={ip:?} is not an IPv4 address/prefix (e.g. 10.0.99.2/24)");
    };
    let udp_port = port(cmdline, "udp", 7);
    let kv_port = port(cmdline, "kv", 7000);
    cmdline.finish();

    let Some(transport) = virtio::find(cmdline.devices(), DEVICE_NET) else {
        fatal!("net: no virtio-net device");
    };
    let mut dev = match VirtioNet::new(transport) {
        Ok(dev) => dev,
        Err(why) => fatal!("net: cannot initialise the virtio-net device: {why}"),
    };
    let mut kv = virtio::find(cmdline.devices(), DEVICE_BLK).map(|t| match Blk::new(t) {
        Ok(blk) => Kv::new(blk),
        Err(why) => fatal!("net: cannot initialise the virtio-blk device: {why}"),
    });

    let mac = dev.mac();
    let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
    config.random_seed = entropy_u64();
    let mut iface = Interface::new(config, &mut dev, now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::new(addr.into(), prefix));
    });

    let bufs = noinit_zeroed!(Buffers);
    let mut storage = [SocketStorage::EMPTY; TCP_SOCKETS + 1];
    let mut sockets = SocketSet::new(&mut storage[..]);
    let mut udp_rx_meta = [udp::PacketMetadata::EMPTY; UDP_PACKETS];
    let mut udp_tx_meta = [udp::PacketMetadata::EMPTY; UDP_PACKETS];
    let mut udp_socket = udp::Socket::new(
        udp::PacketBuffer::new(&mut udp_rx_meta[..], &mut bufs.udp_rx[..]),
        udp::PacketBuffer::new(&mut udp_tx_meta[..], &mut bufs.udp_tx[..]),
    );
    if udp_socket.bind(udp_port).is_err() {
        fatal!("net: cannot bind UDP port {udp_port}");
    }
    let udp_handle = sockets.add(udp_socket);
    let mut tcp_handles = [None::<SocketHandle>; TCP_SOCKETS];
    for (handle, [rx, tx]) in tcp_handles.iter_mut().zip(bufs.tcp.iter_mut()) {
        let rx = tcp::SocketBuffer::new(&mut rx[..]);
        let tx = tcp::SocketBuffer::new(&mut tx[..]);
        let mut socket = tcp::Socket::new(rx, tx);
        socket.set_nagle_enabled(false);
        if socket.listen(kv_port).is_err() {
            fatal!("net: cannot listen on TCP port {kv_port}");
        }
        *handle = Some(sockets.add(socket));
    }
    let tcp_handles = tcp_handles.map(Option::unwrap);
    let mut conns = [const { Conn::new() }; TCP_SOCKETS];

    match &kv {
        Some(kv) => println!("net: key-value store on disk, {} slots", kv.slots()),
        None => println!("net: no disk"),
    }
    let m = mac;
    println!(
        "net: up {addr}/{prefix} mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    );

    let mut timer = Timer::new();
    let mut shutdown: Option<(SocketHandle, u64)> = None;
    loop {
        let now_ns = time_ns();
        let now = instant(now_ns);
        iface.poll(now, &mut dev, &mut sockets);
        let mut output = echo_udp(sockets.get_mut::<udp::Socket>(udp_handle));
        for (&handle, conn) in tcp_handles.iter().zip(conns.iter_mut()) {
            let socket = sockets.get_mut::<tcp::Socket>(handle);
            if !socket.is_open() {
                conn.reset();
                if socket.listen(kv_port).is_err() {
                    fatal!("net: cannot listen on TCP port {kv_port}");
                }
                continue;
            }
            if shutdown.is_some() {
                continue;
            }
            let (active, bye) = conn.serve(socket, &mut kv);
            output |= active;
            if bye {
                socket.close();
                shutdown = Some((handle, now_ns.saturating_add(SHUTDOWN_GRACE_NS)));
            } else if socket.state() == tcp::State::CloseWait && !socket.can_recv() {
                socket.close();
                output = true;
            }
        }
        if output {
            iface.poll(now, &mut dev, &mut sockets);
        }
        dev.flush();
        if let Some((handle, deadline)) = shutdown {
            let socket = sockets.get::<tcp::Socket>(handle);
            if now_ns >= deadline || bye_delivered(socket) {
                println!("net: shutdown");
                power_off(0);
            }
            timer.arm(deadline);
        }
        match iface.poll_delay(now, &sockets) {
            Some(Duration::ZERO) => continue,
            Some(delay) => timer.arm(now_ns.saturating_add(delay.total_micros() * 1000)),
            None => {}
        }
        if dev.prepare_idle() {
            wait_for_event();
            dev.after_idle();
        }
    }
}

/// Whether the `BYE` of a closed socket is acknowledged and its FIN sent.
fn bye_delivered(socket: &tcp::Socket<'_>) -> bool {
    use tcp::State::*;
    socket.send_queue() == 0 && !matches!(socket.state(), Established | CloseWait | FinWait1)
}

/// Echoes the received UDP datagrams; returns whether it sent any.
fn echo_udp(socket: &mut udp::Socket<'_>) -> bool {
    let mut sent = false;
    let mut copy = [0u8; 2048];
    while socket.can_recv() && socket.can_send() {
        let Ok((data, meta)) = socket.recv() else {
            break;
        };
        let len = data.len().min(copy.len());
        copy[..len].copy_from_slice(&data[..len]);
        sent |= socket.send_slice(&copy[..len], meta).is_ok();
    }
    sent
}

/// The platform timer, armed only when the new deadline is earlier than the armed one.
struct Timer {
    /// The armed deadline (ns), if it has not fired.
    deadline: Option<u64>,
    /// Timer interrupts taken when it was armed.
    irqs: u64,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            deadline: None,
            irqs: 0,
        }
    }

    /// Makes sure the timer fires no later than `deadline` (two exits if it re-arms).
    fn arm(&mut self, deadline: u64) {
        if timer_irqs() != self.irqs {
            self.deadline = None;
        }
        if self.deadline.is_some_and(|armed| armed <= deadline) {
            return;
        }
        self.irqs = timer_irqs();
        self.deadline = Some(deadline);
        arm_timer(deadline);
    }
}

/// The smoltcp time of virtual time `ns`.
fn instant(ns: u64) -> Instant {
    Instant::from_micros((ns / 1000) as i64)
}

/// The current smoltcp time.
fn now() -> Instant {
    instant(time_ns())
}

/// The port parameter `key` (1..=65535), or `default`.
fn port(cmdline: &mut Cmdline, key: &str, default: u16) -> u16 {
    match cmdline.u64_or(key, u64::from(default)) {
        n @ 1..=65535 => n as u16,
        n => fatal!("net: {key}={n} is not a port (1..=65535)"),
    }
}

/// Parses `a.b.c.d/prefix` (prefix 0..=32; `/24` if omitted).
fn parse_cidr(text: &str) -> Option<(Ipv4Address, u8)> {
    let (addr, prefix) = text.split_once('/').unwrap_or((text, "24"));
    let prefix: u8 = prefix.parse().ok().filter(|&p| p <= 32)?;
    let mut octets = [0u8; 4];
    let mut parts = addr.split('.');
    for octet in &mut octets {
        *octet = parts.next()?.parse().ok()?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some((Ipv4Address::from(octets), prefix))
}
