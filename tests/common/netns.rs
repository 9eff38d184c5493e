//! A network namespace with a tap inside, made by the test and removed on drop, and a
//! way to run client code inside it.
#![allow(dead_code)]

use std::process::Command;

use ftvm_coserver::netns::ip;

/// Guest address used in the namespace.
pub const GUEST_IP: &str = "10.0.99.2";
/// Host-side (tap) address in the namespace.
pub const HOST_IP: &str = "10.0.99.1";

/// A namespace `name` holding tap `tap` with [`HOST_IP`]/24.
pub struct NetNs {
    /// Namespace name.
    pub name: String,
    /// Tap name.
    pub tap: String,
}

impl NetNs {
    /// Creates the namespace and tap, or says why it cannot.
    pub fn try_create(test: &str) -> Result<Self, String> {
        let name = format!("ftvmt{}{}", std::process::id(), test.len());
        let ns = Self {
            name: name.clone(),
            tap: "ftvmtap0".to_string(),
        };
        ip(&["netns", "add", &name])?;
        let ex = |args: &[&str]| {
            let mut a = vec!["netns", "exec", name.as_str(), "ip"];
            a.extend_from_slice(args);
            ip(&a)
        };
        ex(&["link", "set", "lo", "up"])?;
        ex(&["tuntap", "add", "dev", "ftvmtap0", "mode", "tap"])?;
        ex(&["addr", "add", &format!("{HOST_IP}/24"), "dev", "ftvmtap0"])?;
        ex(&["link", "set", "ftvmtap0", "up"])?;
        Ok(ns)
    }

    /// Creates the namespace and tap. Under FTVM_REQUIRE_KVM=1 a failure panics;
    /// otherwise the test prints why it skips and gets `None`.
    pub fn create(test: &str) -> Option<Self> {
        match Self::try_create(test) {
            Ok(ns) => Some(ns),
            Err(e) => {
                if std::env::var("FTVM_REQUIRE_KVM").as_deref() == Ok("1") {
                    panic!(
                        "{test}: FTVM_REQUIRE_KVM=1 but the network namespace cannot be made: {e}"
                    );
                }
                eprintln!("{test}: SKIPPED: cannot make a network namespace and tap: {e}");
                None
            }
        }
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c.stdin(std::process::Stdio::null());
        c
    }

    /// Runs `f` on a thread that has entered the namespace (sockets it opens live there).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        ftvm_coserver::netns::run_in(&self.name, f).expect("client thread in the namespace")
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
