//! Operator benchmark (needs root: the namespaces, veth links and bridged taps of the
//! pair tests). Prints two tables:
//! - switchovers (`FTVM_BENCH_ONLY=switchover`): per replication mode, a protected pair
//!   serving one key-value client (SETs one at a time, the LAN delivering the guest's
//!   frames to both hosts) switches over [`SWITCHOVERS`] times back and forth, each once
//!   the pair is protected again: the client's longest SET across each switchover (the
//!   guest's stall as a client sees it; p50, p99 and max over the switchovers), how long
//!   `ftvm ctl switchover` took, how long until the old primary was a ready secondary
//!   again, the client's TCP retransmissions, SETs lost;
//! - a join (`FTVM_BENCH_ONLY=join`): a degraded primary with a 1024 MiB guest and a
//!   1024 MiB disk, half of it data, serving the client; a second CoServer starts: the
//!   time to protected, the link throughput the copy used, the client's longest SET
//!   during the join and its SETs/s during the join relative to the 3 s before, without
//!   a cap on the copy and with `replication.copy_max_mib_s = 48`. Node B keeps its
//!   replica in /dev/shm: the two hosts do not share a disk.
//!
//! Run with `cargo bench -p ftvm-coserver --bench operator` (see docs/PERFORMANCE.md).

#[path = "../../tests/common/mod.rs"]
mod common;
#[path = "../../tests/common/pair.rs"]
mod pair;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pair::{
    client_until, edit_config, kv_guest, protected_pair, spec, switch_over_back_and_forth,
    wait_until, write_config, CoServer, GuestSpec, PairNet, ReplicationMode, GUEST_IP, LIMIT,
};

/// Switchovers per mode (`FTVM_BENCH_SWITCHOVERS` for a shorter try).
const SWITCHOVERS: usize = 20;

fn main() {
    let only = std::env::var("FTVM_BENCH_ONLY").ok();
    println!("ftvm operator benchmark (2 veth links and a bridged LAN in namespaces)\n");
    if only.is_none() || only.as_deref() == Some("switchover") {
        switchover_rows();
    }
    if only.is_none() || only.as_deref() == Some("join") {
        join_rows();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p50 / p99 / max of `v`, in ms.
fn spread(v: &mut [Duration]) -> String {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "{:.1} / {:.1} / {:.1} ms",
        ms(at(0.5)),
        ms(at(0.99)),
        ms(v[v.len() - 1])
    )
}

fn switchover_rows() {
    let count: usize = std::env::var("FTVM_BENCH_SWITCHOVERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SWITCHOVERS);
    println!(
        "| {count} switchovers under a TCP client (mirrored LAN) | client's longest SET across a switchover (p50 / p99 / max) | `ftvm ctl switchover` (p50 / p99 / max) | protected again after it returned (p50 / p99 / max) | TCP retransmissions | SETs lost |\n|---|---|---|---|---|---|"
    );
    for mode in [ReplicationMode::Checkpoint, ReplicationMode::Lockstep] {
        let Ok(net) = PairNet::try_create("so") else {
            println!("operator benchmark SKIPPED: needs root for network namespaces");
            return;
        };
        net.mirror_lan();
        let dir = tempfile::tempdir().expect("temporary directory");
        let guest = GuestSpec { mode, ..kv_guest() };
        let (a, b) = protected_pair(&net, dir.path(), &guest);
        let stop = Arc::new(AtomicBool::new(false));
        let client = client_until(&net, stop.clone());
        let nodes = [a, b];
        // Some SETs before each, so the window holds the one the switchover delayed.
        let (rounds, _) =
            switch_over_back_and_forth(&nodes, count, Duration::from_millis(100), |_, _| {});
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::SeqCst);
        let run = client.join().expect("the client saw every SET read back");
        // The client's longest SET from the request to 100 ms after it returned.
        let mut stalls: Vec<Duration> = rounds
            .iter()
            .map(|r| run.worst(r.asked, r.asked + r.took + Duration::from_millis(100)))
            .collect();
        let mut took: Vec<Duration> = rounds.iter().map(|r| r.took).collect();
        let mut reprotect: Vec<Duration> = rounds.iter().filter_map(|r| r.reprotected).collect();
        println!(
            "| {} | {} | {} | {} | {} | 0 of {} |",
            mode.name(),
            spread(&mut stalls),
            spread(&mut took),
            spread(&mut reprotect),
            run.retransmits,
            run.sets.len()
        );
        let _ = std::io::stdout().flush();
        drop(nodes);
    }
}

fn join_rows() {
    println!(
        "\n| join: 1024 MiB guest, 1024 MiB disk (512 MiB data), one TCP client | time to protected | copied (MiB) / link throughput | client's longest SET during the join | SETs/s during the join / degraded |\n|---|---|---|---|---|"
    );
    for cap in [0u64, 48] {
        let Ok(net) = PairNet::try_create("jo") else {
            println!("operator benchmark SKIPPED: needs root for network namespaces");
            return;
        };
        let dir = tempfile::tempdir().expect("temporary directory");
        // Node B's replica on a disk of its own (memory): on one machine, B's writeback
        // of the copy would otherwise hold up the fsync of every SET on A's disk, which
        // two hosts do not share.
        let b_disk = tempfile::tempdir_in("/dev/shm").expect("a directory in /dev/shm");
        let guest = GuestSpec {
            b_disk_dir: Some(b_disk.path().to_path_buf()),
            ..spec(&format!("workload=net ip={GUEST_IP}/24"), 1024, true)
        };
        let configs: Vec<_> = (0..2)
            .map(|i| {
                let c = write_config(dir.path(), i, &guest);
                edit_config(&c, &|c| {
                    c.guest.mem_mib = 1024;
                    c.replication.copy_max_mib_s = cap;
                });
                c
            })
            .collect();
        fill_data(&dir.path().join("disk-a.img"));
        let a = CoServer::start_initial("a", &net.ns[0], &configs[0]);
        assert!(
            wait_until(LIMIT, || a.typed().role == "primary"),
            "{}",
            a.log()
        );
        let stop = Arc::new(AtomicBool::new(false));
        let client = client_until(&net, stop.clone());
        std::thread::sleep(Duration::from_secs(4));
        let join = Instant::now();
        let b = CoServer::start("b", &net.ns[1], &configs[1]);
        let mut copied = 0;
        assert!(
            wait_until(Duration::from_secs(300), || {
                let s = a.typed();
                if let Some(c) = &s.copy {
                    copied = copied.max(c.total_bytes);
                }
                s.mode.as_deref() == Some("protected")
            }),
            "never protected:\n{}",
            b.log()
        );
        let protected_at = Instant::now();
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::SeqCst);
        let run = client.join().expect("the client saw every SET read back");
        let secs = (protected_at - join).as_secs_f64();
        let mib = copied as f64 / (1 << 20) as f64;
        let during = run.rate(join, protected_at);
        let before = run.rate(join - Duration::from_secs(3), join);
        println!(
            "| {} | {secs:.1} s | {mib:.0} MiB / {:.0} MiB/s | {:.1} ms | {during:.0} / {before:.0} = {:.2} |",
            if cap == 0 {
                "copy uncapped".to_string()
            } else {
                format!("copy_max_mib_s = {cap}")
            },
            mib / secs,
            ms(run.worst(join, protected_at)),
            during / before
        );
        let _ = std::io::stdout().flush();
    }
}

/// Writes 512 MiB of data (a pseudo-random stream, incompressible) into the disk image
/// from 8 MiB on (the key-value table lives below).
fn fill_data(disk: &std::path::Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(disk)
        .expect("disk image");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut block = vec![0u8; 1 << 20];
    for i in 0..512u64 {
        for b in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all_at(&block, (8 << 20) + (i << 20)).expect("fill");
    }
    f.sync_all().expect("sync");
}
