//! End-to-end tests of the redirected devices with the built-in guest: virtio-blk on
//! image files, virtio-net on a tap in a namespace the test makes, record and replay
//! through the World seam, and snapshots taken in the middle of I/O.

mod common;
#[path = "common/netns.rs"]
mod netns;

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::*;

fn image(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(mib << 20).unwrap();
    p
}

fn disk_run(disk: &str, cmdline: &str, extra: &[&str]) -> Outcome {
    let mut args = vec![
        "run",
        "--idle",
        "skip",
        "--report",
        "--disk",
        disk,
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    ftvm_outcome(&args)
}

#[test]
fn disk_workload_verifies_and_data_persists() {
    if !kvm_available("disk_workload") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "d.img", 16);
    let o = disk_run(s(&img), "workload=disk blocks=200 gen=7", &[]);
    assert_eq!(o.code, 0, "console:\n{}\nstderr:\n{}", o.console, o.stderr);
    assert!(
        o.console.contains("disk: verified 200 blocks ok"),
        "console:\n{}",
        o.console
    );
    let again = disk_run(s(&img), "workload=disk blocks=200 gen=7 mode=verify", &[]);
    assert_eq!(
        again.code, 0,
        "a second boot reads what the first wrote:\n{}",
        again.console
    );
    let wrong = disk_run(s(&img), "workload=disk blocks=200 gen=8 mode=verify", &[]);
    assert_eq!(
        wrong.code, 4,
        "another generation must fail verification:\n{}",
        wrong.console
    );
}

#[test]
fn disk_workload_rounds_write_successive_generations() {
    if !kvm_available("disk_workload_rounds") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "r.img", 16);
    let o = disk_run(s(&img), "workload=disk blocks=64 gen=3 rounds=3", &[]);
    assert_eq!(o.code, 0, "console:\n{}\nstderr:\n{}", o.console, o.stderr);
    assert_eq!(o.console.matches("disk: verified 64 blocks ok").count(), 3);
    assert!(o.console.contains("disk: round 3/3 done"), "{}", o.console);
    // The last round (generation 3 + 2) is what stays on the disk.
    let last = disk_run(s(&img), "workload=disk blocks=64 gen=5 mode=verify", &[]);
    assert_eq!(last.code, 0, "{}", last.console);
    let first = disk_run(s(&img), "workload=disk blocks=64 gen=3 mode=verify", &[]);
    assert_eq!(first.code, 4, "{}", first.console);
}

#[test]
fn read_only_disk_rejects_writes_and_the_guest_reports_it() {
    if !kvm_available("read_only_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "ro.img", 4);
    let ro = format!("{},ro", s(&img));
    let o = disk_run(&ro, "workload=disk blocks=8", &[]);
    assert_eq!(o.code, 3, "console:\n{}", o.console);
    assert!(
        o.console.contains("write rejected by the device"),
        "console:\n{}",
        o.console
    );
    assert!(
        std::fs::read(&img).unwrap().iter().all(|&b| b == 0),
        "image untouched"
    );
}

#[test]
fn missing_disk_or_tap_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.img");
    assert_clean_error(
        &ftvm_outcome(&["run", "--disk", s(&missing)]),
        "cannot open disk image",
    );
    assert_clean_error(
        &ftvm_outcome(&["run", "--tap", "ftvmnosuch9"]),
        "does not exist",
    );
    assert_clean_error(
        &ftvm_outcome(&["run", "--disk", "x.img,rw"]),
        "invalid --disk",
    );
}

#[test]
fn recorded_disk_run_replays_identically_without_the_disk() {
    if !kvm_available("record_replay_disk") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "r.img", 8);
    let log = dir.path().join("run.log");
    let rec = disk_run(s(&img), "workload=disk blocks=64", &["--record", s(&log)]);
    assert_eq!(rec.code, 0, "stderr:\n{}", rec.stderr);
    std::fs::remove_file(&img).unwrap(); // the replay must not need it
    let rep = ftvm_outcome(&["replay", s(&log), "--report"]);
    assert_eq!(rep.code, 0, "stderr:\n{}", rep.stderr);
    assert_eq!(rep.report, rec.report);
    assert_eq!(rep.console, rec.console);
    // A damaged recording is refused clearly.
    let mut bytes = std::fs::read(&log).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&log, bytes).unwrap();
    assert_clean_error(&ftvm_outcome(&["replay", s(&log)]), "checksum mismatch");
}

#[test]
fn snapshot_in_the_middle_of_disk_io_restores_and_completes() {
    if !kvm_available("snapshot_mid_io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cmd = "workload=disk blocks=128";
    let full_img = image(dir.path(), "full.img", 8);
    let full = disk_run(s(&full_img), cmd, &[]);
    assert_eq!(full.code, 0, "stderr:\n{}", full.stderr);
    let total: u64 = full.report["exits"].parse().unwrap();
    let full_disk = std::fs::read(&full_img).unwrap();
    for n in [total / 4, total / 2, total * 3 / 4] {
        let img = image(dir.path(), &format!("half{n}.img"), 8);
        let snap = dir.path().join(format!("snap{n}"));
        let n_s = n.to_string();
        let first = disk_run(s(&img), cmd, &["--save-at-exit", &n_s, "--save", s(&snap)]);
        assert_eq!(first.code, 0, "stderr:\n{}", first.stderr);
        let second = ftvm_outcome(&["restore", s(&snap), "--idle", "skip", "--report"]);
        assert_eq!(second.code, 0, "restore at {n}: stderr:\n{}", second.stderr);
        assert_eq!(
            second.report, full.report,
            "report after a save at exit {n}"
        );
        assert_eq!(format!("{}{}", first.console, second.console), full.console);
        assert!(
            std::fs::read(&img).unwrap() == full_disk,
            "disk content after a save at {n}"
        );
    }
}

fn kv(stream: &mut BufReader<TcpStream>, request: &str) -> String {
    stream
        .get_mut()
        .write_all(format!("{request}\n").as_bytes())
        .unwrap();
    let mut reply = String::new();
    stream.read_line(&mut reply).unwrap();
    reply.trim_end().to_string()
}

fn connect() -> BufReader<TcpStream> {
    let addr = format!("{}:7000", netns::GUEST_IP);
    let s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(10))
        .expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    BufReader::new(s)
}

#[test]
fn network_ping_udp_echo_and_durable_tcp_kv() {
    if !kvm_available("network") {
        return;
    }
    let Some(ns) = netns::NetNs::create("network") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path(), "kv.img", 8);
    let log = dir.path().join("net.log");
    let bin = env!("CARGO_BIN_EXE_ftvm");
    let cmdline = format!("workload=net ip={}/24", netns::GUEST_IP);
    let boot = |record: Option<&Path>| {
        let mut c = ns.command(bin);
        c.args([
            "run",
            "--tap",
            &ns.tap,
            "--disk",
            s(&img),
            "--cmdline",
            &cmdline,
            "--report",
        ]);
        if let Some(r) = record {
            c.args(["--record", s(r)]);
        }
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ftvm")
    };

    let mut vm = boot(Some(&log));
    let out = ConsoleLines::new(vm.stdout.take().unwrap());
    out.wait_for("net: up", Duration::from_secs(30));

    let ping = ns
        .command("ping")
        .args(["-c", "3", "-i", "0.2", "-W", "2", netns::GUEST_IP])
        .output()
        .expect("run ping");
    assert!(
        ping.status.success(),
        "ping:\n{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let acked: Vec<(String, String)> = ns.run(|| {
        let udp = UdpSocket::bind("0.0.0.0:0").unwrap();
        udp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        udp.send_to(b"echo me", format!("{}:7", netns::GUEST_IP))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = udp.recv_from(&mut buf).expect("udp echo");
        assert_eq!(&buf[..n], b"echo me");
        // Every datagram of a sequential stream comes back (a frame that arrives as the
        // guest goes idle must wake it, not wait for its next timer).
        for i in 0..200u32 {
            let msg = i.to_le_bytes();
            udp.send_to(&msg, format!("{}:7", netns::GUEST_IP)).unwrap();
            let (n, _) = udp
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("udp echo {i} not answered in 5 s: {e}"));
            assert_eq!(&buf[..n], &msg, "echo {i}");
        }

        let mut a = connect();
        let mut b = connect();
        let mut acked = Vec::new();
        for i in 0..20 {
            let (k, v) = (format!("key{i}"), format!("value-{i}-{}", i * 7));
            let c = if i % 2 == 0 { &mut a } else { &mut b };
            assert_eq!(kv(c, &format!("SET {k} {v}")), "OK");
            acked.push((k, v));
        }
        assert_eq!(kv(&mut a, "GET key3"), "VALUE value-3-21");
        assert_eq!(kv(&mut b, "GET nosuchkey"), "NOTFOUND");
        assert_eq!(kv(&mut a, "SHUTDOWN"), "BYE");
        acked
    });
    let status = vm.wait().unwrap();
    assert!(status.success(), "guest exit: {status:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut vm.stderr.take().unwrap(), &mut stderr).unwrap();
    let recorded = outcome(&std::process::Output {
        status,
        stdout: Vec::new(),
        stderr: stderr.into_bytes(),
    });

    // The recorded run replays exactly, with no tap and no disk.
    let rep = ftvm_outcome(&["replay", s(&log), "--report"]);
    assert_eq!(rep.code, 0, "replay stderr:\n{}", rep.stderr);
    assert_eq!(rep.report, recorded.report);

    // Boot again from the same image: every acknowledged SET is there.
    let mut vm = boot(None);
    let out = ConsoleLines::new(vm.stdout.take().unwrap());
    out.wait_for("net: up", Duration::from_secs(30));
    ns.run(move || {
        let mut c = connect();
        for (k, v) in &acked {
            assert_eq!(kv(&mut c, &format!("GET {k}")), format!("VALUE {v}"));
        }
        assert_eq!(kv(&mut c, "SHUTDOWN"), "BYE");
    });
    assert!(vm.wait().unwrap().success());
}

#[test]
fn console_input_reaches_the_guest_and_replays_identically() {
    if !kvm_available("console_input") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("console.log");
    let mut vm = ftvm()
        .args(["run", "--cmdline", "workload=echo", "--report", "--record"])
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ftvm");
    let mut input = vm.stdin.take().unwrap();
    let out = ConsoleLines::new(vm.stdout.take().unwrap());
    let limit = Duration::from_secs(30);
    let mut console = out.wait_for("echo: ready", limit);
    input.write_all(b"first line\n").unwrap();
    console += &out.wait_for("echo: first line", limit);
    // A line in two pieces, the second after the guest has gone idle again.
    input.write_all(b"sec").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    input.write_all(b"ond\r\n").unwrap();
    console += &out.wait_for("echo: second", limit);
    // More than the UART's 64-byte receive FIFO at once: nothing is lost.
    let long = "0123456789".repeat(12);
    input
        .write_all(format!("{long}\nquit\n").as_bytes())
        .unwrap();
    console += &out.wait_for(&format!("echo: {long}"), limit);
    console += &out.rest(limit);
    let status = vm.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut vm.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "guest exit {status:?}:\n{stderr}");
    assert!(console.ends_with("echo: bye\n"), "console:\n{console}");
    let recorded = outcome(&std::process::Output {
        status,
        stdout: console.clone().into_bytes(),
        stderr: stderr.into_bytes(),
    });

    let rep = ftvm_outcome(&["replay", s(&log), "--report"]);
    assert_eq!(rep.code, 0, "replay stderr:\n{}", rep.stderr);
    assert_eq!(rep.report, recorded.report);
    assert_eq!(rep.console, console);

    // No input source and nothing else to wait for: a clear error, not a hang.
    let o = ftvm_outcome(&[
        "run",
        "--cmdline",
        "workload=echo",
        "--console-input",
        "none",
    ]);
    assert_clean_error(&o, "waits for an event");
}
