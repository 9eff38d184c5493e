//! Network namespaces as the demo and the end-to-end tests make them: running `ip`, and
//! moving the calling thread into a named namespace.

use std::os::fd::AsRawFd;
use std::process::Command;

/// Runs `ip ARGS`; an error carries the command and what `ip` said.
pub fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Moves the calling thread into network namespace `name` (made with `ip netns add`):
/// sockets it opens and processes it starts afterwards live there.
pub fn enter(name: &str) -> Result<(), String> {
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).map_err(|e| format!("open namespace {path}: {e}"))?;
    // SAFETY: setns with a valid namespace descriptor changes only this thread's network
    // namespace.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {name}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Runs `f` on a new thread inside namespace `name` and returns its result.
pub fn run_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let name = name.to_string();
    std::thread::spawn(move || enter(&name).map(|()| f()))
        .join()
        .map_err(|_| "the thread in the namespace panicked".to_string())?
}
