//! The demo's network (when run as root): a network namespace of its own holding a bridge
//! at 10.0.99.1/24 and one tap per CoServer, which the demo process enters before it
//! starts anything, and a TCP client of the guest's key-value service.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::netns::{enter, ip};

/// The guest's address.
pub const GUEST_IP: &str = "10.0.99.2";

/// The demo's namespace, removed on drop.
pub struct DemoNet {
    name: String,
}

impl DemoNet {
    /// Creates the namespace with its bridge and taps `tapa` and `tapb`, and moves this
    /// thread into it (threads and processes it starts afterwards live there too).
    pub fn create() -> Result<Self, String> {
        let name = format!("ftvmdemo{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let net = Self { name };
        let n = net.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&["-n", n, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", n, "addr", "add", "10.0.99.1/24", "dev", "br0"])?;
        ip(&["-n", n, "link", "set", "br0", "up"])?;
        for tap in ["tapa", "tapb"] {
            ip(&["-n", n, "tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["-n", n, "link", "set", tap, "master", "br0"])?;
            ip(&["-n", n, "link", "set", tap, "up"])?;
        }
        enter(n)?;
        Ok(net)
    }
}

impl Drop for DemoNet {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

fn request(c: &mut BufReader<TcpStream>, line: &str) -> Result<String, String> {
    c.get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut reply = String::new();
    match c.read_line(&mut reply) {
        Ok(0) => Err("the connection closed".into()),
        Ok(_) => Ok(reply.trim_end().to_string()),
        Err(e) => Err(format!("receive: {e}")),
    }
}

/// The client: SETs `count` keys one by one over one connection, printing progress and
/// the longest wait, then reads every key back and shuts the guest down. `start` says
/// when the pair is protected.
pub fn client(start: Receiver<()>, count: u32) -> Result<(), String> {
    start.recv().map_err(|_| "the demo ended".to_string())?;
    let addr = format!("{GUEST_IP}:7000");
    let s = TcpStream::connect(&addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut c = BufReader::new(s);
    println!("[client] connected to the guest's key-value service at {addr}");
    let mut longest = Duration::ZERO;
    for i in 1..=count {
        let t = Instant::now();
        let reply = request(&mut c, &format!("SET key{i} value{i}"))?;
        if reply != "OK" {
            return Err(format!("SET key{i}: {reply}"));
        }
        let took = t.elapsed();
        if took > longest {
            longest = took;
            if took > Duration::from_millis(50) {
                println!(
                    "[client] SET key{i} waited {:.1} ms (same connection)",
                    took.as_secs_f64() * 1e3
                );
            }
        }
        if i % 50 == 0 {
            println!(
                "[client] {i} SETs acknowledged; longest wait {:.1} ms",
                longest.as_secs_f64() * 1e3
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for i in 1..=count {
        let reply = request(&mut c, &format!("GET key{i}"))?;
        if reply != format!("VALUE value{i}") {
            return Err(format!("GET key{i} after the failover: {reply}"));
        }
    }
    println!("[client] all {count} acknowledged SETs read back after the failover");
    request(&mut c, "SHUTDOWN")?;
    Ok(())
}
