//! End-to-end tests of the operator's API on a real pair (two `ftvm coserver`
//! processes in namespaces, veth links, taps bridged to a client LAN): switchovers under
//! a TCP client, a secondary leaving and joining again, a replacement host on new
//! addresses after a reload, the Prometheus metrics and the status page in a real
//! headless browser.

mod common;
#[path = "common/pair.rs"]
mod pair;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use pair::{
    client_until, edit_config, field, kv_guest, protected, protected_pair, setup, spec,
    switch_over_back_and_forth, wait_until, write_config, CoServer, Config, GUEST_IP, LIMIT,
};

#[test]
fn ten_switchovers_back_and_forth_keep_the_client_connection_and_every_set() {
    let Some((net, dir)) = setup("pair_switchover", "w") else {
        return;
    };
    // The LAN delivers the guest's frames to both hosts (docs/operations.md): a request
    // that reaches the old primary after its guest stopped is delivered by the new one.
    net.mirror_lan();
    let (a, b) = protected_pair(&net, dir.path(), &kv_guest());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let client = client_until(&net, stop.clone());
    let nodes = [a, b];
    let (rounds, primary) = switch_over_back_and_forth(&nodes, 10, Duration::ZERO, |round, p| {
        if round > 0 {
            // The old primary rejoined from the memory and disk its guest stopped
            // with: only what changed since was copied, not the 8 MiB disk.
            let (pages, disk) = p.typed().last_copy.expect("a copy");
            assert!(
                disk < 1 << 20,
                "round {round}: the rejoin copied {pages} pages and {disk} disk bytes"
            );
        }
    });
    // Each switchover won the arbiter once more: nobody else claimed.
    assert_eq!(nodes[primary].typed().generation, 11);
    // Refused with a reason while the pair is not protected (the old primary is
    // being copied to right after a switchover, or is its secondary).
    let (ok, out) = nodes[1 - primary].ctl(&["switchover"]);
    assert!(!ok && out.contains("refused"), "{out}");
    stop.store(true, Ordering::SeqCst);
    let run = client.join().expect("the client saw every SET and GET");
    let line = format!(
        "10 switchovers under a TCP client (mirrored LAN): {} SETs acknowledged and read back over one connection, longest SET {:?}, {} TCP retransmissions; ftvm ctl switchover took {:?} at most; protected again {:?} after a switchover at most",
        run.sets.len(),
        run.worst(started, Instant::now()),
        run.retransmits,
        rounds.iter().map(|r| r.took).max().unwrap_or_default(),
        rounds.iter().filter_map(|r| r.reprotected).max().unwrap_or_default()
    );
    println!("{line}");
    report(&line);
    let mut p = nodes;
    assert_eq!(p[primary].wait(LIMIT), Some(0), "{}", p[primary].log());
}

#[test]
fn a_512_mib_guest_with_a_512_mib_disk_joins_while_a_client_sets_keys() {
    let Some((net, dir)) = setup("pair_join_large", "j") else {
        return;
    };
    let guest = spec(&format!("workload=net ip={GUEST_IP}/24"), 512, true);
    let configs: Vec<_> = (0..2)
        .map(|i| {
            let c = write_config(dir.path(), i, &guest);
            edit_config(&c, &|c| c.guest.mem_mib = 512);
            c
        })
        .collect();
    let a = CoServer::start_initial("a", &net.ns[0], &configs[0]);
    assert!(
        wait_until(LIMIT, || field(&a.status(), "role") == "primary"),
        "{}",
        a.log()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let client = client_until(&net, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let join = Instant::now();
    let b = CoServer::start("b", &net.ns[1], &configs[1]);
    let mut progress = None;
    assert!(
        wait_until(Duration::from_secs(120), || {
            let s = a.typed();
            if let Some(c) = s.copy {
                progress.get_or_insert(c);
            }
            s.mode.as_deref() == Some("protected")
        }),
        "never protected:\n{}\n{}",
        a.status_text(),
        b.log()
    );
    let protected_at = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::SeqCst);
    let run = client.join().expect("the client saw every SET and GET");
    let progress = progress.expect("the primary's status showed the copy's progress");
    assert!(
        progress.total_bytes >= 512 << 20,
        "the copy's total holds the disk: {progress:?}"
    );
    let line = format!(
        "join of a 512 MiB guest with a 512 MiB disk under a client: protected after {:.1} s; longest SET during the join {:?}; {:.0} SETs/s during the join, {:.0} degraded before it; {} SETs read back",
        (protected_at - join).as_secs_f64(),
        run.worst(join, protected_at),
        run.rate(join, protected_at),
        run.rate(join - Duration::from_millis(1500), join),
        run.sets.len()
    );
    println!("{line}");
    report(&line);
}

#[test]
fn a_secondary_leaves_and_rejoins_and_a_replacement_on_new_addresses_joins_after_a_reload() {
    let Some((net, dir)) = setup("pair_leave_reload", "l") else {
        return;
    };
    let guest = kv_guest();
    let (a, mut b) = protected_pair(&net, dir.path(), &guest);
    let (ok, out) = a.ctl(&["leave"]);
    assert!(!ok && out.contains("switch over first"), "{out}");
    let before = a.typed();
    let (ok, out) = b.ctl(&["leave"]);
    assert!(ok, "{out}");
    assert_eq!(
        b.wait(LIMIT),
        Some(0),
        "B exits after leaving:\n{}",
        b.log()
    );
    assert!(
        wait_until(LIMIT, || a.typed().mode.as_deref() == Some("degraded")),
        "{}",
        a.status_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    let after = a.typed();
    let new_alerts = &after.alerts[before.alerts.len()..];
    assert_eq!(new_alerts.len(), 1, "one alert: {new_alerts:?}");
    assert!(new_alerts[0].contains("left the pair"), "{new_alerts:?}");
    assert_eq!(
        after.generation, before.generation,
        "nobody claimed the arbiter"
    );
    assert_eq!(after.role, "primary");
    // It joins again later.
    let b = CoServer::start("b", &net.ns[1], &dir.path().join("b.toml"));
    assert!(wait_until(LIMIT, || protected(&a, &b)), "{}", b.log());
    let (ok, out) = b.ctl(&["leave"]);
    assert!(ok, "{out}");
    drop(b);

    // A replacement host with other link addresses: A is told them by a reload.
    for (link, subnet) in [("l1", "10.1.1"), ("l2", "10.1.2")] {
        ftvm_coserver::netns::ip(&[
            "-n",
            &net.ns[1],
            "addr",
            "add",
            &format!("{subnet}.12/24"),
            "dev",
            link,
        ])
        .expect("new address");
    }
    let new_b = |c: &mut Config, me: bool| {
        for (i, l) in c.links.iter_mut().enumerate() {
            let addr: std::net::SocketAddr = format!("10.1.{}.12:7100", i + 1).parse().unwrap();
            if me {
                l.local = addr;
            } else {
                l.peer = addr;
            }
        }
    };
    let a_cfg = dir.path().join("a.toml");
    edit_config(&a_cfg, &|c| c.guest.mem_mib = 128);
    let (ok, out) = a.ctl(&["reload"]);
    assert!(!ok && out.contains("guest.mem_mib changed"), "{out}");
    edit_config(&a_cfg, &|c| {
        c.guest.mem_mib = 64;
        new_b(c, false);
    });
    let (ok, out) = a.ctl(&["reload"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("link0 peer 10.1.1.2:7100 -> 10.1.1.12:7100"),
        "{out}"
    );
    // The replacement: a blank state directory and a blank disk of its own.
    let replacement = dir.path().join("replacement");
    std::fs::create_dir_all(&replacement).unwrap();
    let c_cfg = write_config(&replacement, 1, &guest);
    edit_config(&c_cfg, &|c| new_b(c, true));
    let c = CoServer::start("b", &net.ns[1], &c_cfg);
    assert!(
        wait_until(LIMIT, || protected(&a, &c)),
        "the replacement never joined:\n{}\n{}",
        a.status_text(),
        c.log()
    );
    assert!(
        a.typed()
            .links
            .iter()
            .all(|l| l.peer.ends_with(".12:7100") && l.healthy),
        "{}",
        a.status_text()
    );
}

#[test]
fn metrics_parse_as_prometheus_text_and_the_status_page_shows_both_roles_in_chromium() {
    let Some((net, dir)) = setup("pair_metrics_page", "m") else {
        return;
    };
    let browser = "chromium-headless-shell";
    let have_browser = std::process::Command::new(browser)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have_browser {
        assert!(
            std::env::var("FTVM_REQUIRE_KVM").as_deref() != Ok("1"),
            "{browser} is not installed (scripts/test installs it)"
        );
        eprintln!("SKIP metrics_parse_as_prometheus_text_and_the_status_page_shows_both_roles_in_chromium: no {browser}");
        return;
    }
    let (a, b) = protected_pair(&net, dir.path(), &kv_guest());
    let text = net.in_ns(0, || {
        ftvm_coserver::control::fetch_text("127.0.0.1:7200", "/metrics")
    });
    let text = text.expect("metrics");
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("Prometheus text format");
    let value = |name: &str, label: (&str, &str)| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && s.labels.get(label.0) == Some(label.1))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    for (name, label, want) in [
        ("ftvm_role", ("role", "primary"), 1.0),
        ("ftvm_role", ("role", "secondary"), 0.0),
        ("ftvm_mode", ("mode", "protected"), 1.0),
        ("ftvm_peer_alive", ("peer", "b"), 1.0),
        ("ftvm_link_up", ("link", "link1"), 1.0),
    ] {
        assert_eq!(value(name, label), Some(want), "{name} {label:?}:\n{text}");
    }
    assert!(
        value("ftvm_link_rtt_seconds", ("link", "link0")).is_some_and(|v| v > 0.0 && v < 1.0),
        "{text}"
    );
    // The primary's pauses so far, as a histogram whose last bucket holds them all.
    let pauses = scrape.samples.iter().find_map(|s| match &s.value {
        prometheus_parse::Value::Histogram(b) if s.metric == "ftvm_checkpoint_pause_seconds" => {
            b.last().map(|b| b.count)
        }
        _ => None,
    });
    assert!(pauses.is_some_and(|n| n > 0.0), "{pauses:?}\n{text}");
    assert!(
        scrape.docs.contains_key("ftvm_checkpoint_pause_seconds"),
        "{text}"
    );

    // The page as a browser draws it after its script fetched the status.
    let shot = dir.path().join("status.png");
    let browse = |extra: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &a.ns, browser])
            .args([
                "--no-sandbox",
                "--disable-gpu",
                "--virtual-time-budget=5000",
                "--window-size=1000,700",
            ])
            .args(extra)
            .arg("http://127.0.0.1:7200/")
            .output()
            .expect("run the browser")
    };
    // The browser itself now and then exits without output here (seen once in a few
    // dozen runs): up to three tries; the page must show both roles in one of them.
    let shows_both = |dom: &str| {
        dom.contains("id=\"self-role\">primary · protected<")
            && dom.contains("id=\"peer-role\">secondary<")
            && dom.contains(">a (this node)<")
            && dom.contains(">b (peer)<")
    };
    let mut tries = Vec::new();
    while tries.len() < 3 {
        let dom = browse(&["--dump-dom"]);
        let text = String::from_utf8_lossy(&dom.stdout).into_owned();
        let shown = shows_both(&text);
        tries.push(format!("{text}\n{}", String::from_utf8_lossy(&dom.stderr)));
        if shown {
            break;
        }
    }
    assert!(
        tries.len() < 3 || tries.last().is_some_and(|t| shows_both(t)),
        "the page does not show both roles:\n{}",
        tries.join("\n---\n")
    );
    let mut out = browse(&[&format!("--screenshot={}", shot.display())]);
    for _ in 0..2 {
        if shot.exists() {
            break;
        }
        out = browse(&[&format!("--screenshot={}", shot.display())]);
    }
    let decoder = png::Decoder::new(std::fs::File::open(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    }));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut pixels = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut pixels).expect("PNG pixels");
    assert_eq!((info.width, info.height), (1000, 700));
    let channels = info.color_type.samples();
    let colours: std::collections::HashSet<&[u8]> =
        pixels[..info.buffer_size()].chunks(channels).collect();
    assert!(
        colours.len() > 8,
        "the screenshot is nearly blank: {} colours",
        colours.len()
    );
    drop(b);
}

#[test]
fn force_primary_starts_the_guest_on_the_host_left_when_the_other_is_gone_for_good() {
    let Some((net, dir)) = setup("pair_force_primary", "f") else {
        return;
    };
    let (mut a, b) = protected_pair(&net, dir.path(), &kv_guest());
    a.kill();
    assert!(
        wait_until(LIMIT, || b.typed().role == "primary"),
        "{}",
        b.log()
    );
    let mut b = b;
    b.kill();
    // A comes back alone: B ran the guest after A's replica, so A waits for it.
    let a = CoServer::start("a", &net.ns[0], &dir.path().join("a.toml"));
    assert!(
        wait_until(LIMIT, || a
            .typed()
            .waiting
            .is_some_and(|w| w.contains("holds generation 2"))),
        "{}",
        a.status_text()
    );
    let (ok, out) = a.ctl(&["force-primary"]);
    assert!(ok, "{out}\n{}", a.log());
    assert!(out.contains("runs the guest (generation 3)"), "{out}");
    let s = a.typed();
    assert_eq!((s.role.as_str(), s.guest_running), ("primary", true));
    let (ok, out) = a.ctl(&["force-primary"]);
    assert!(!ok && out.contains("this node is primary"), "{out}");
}
