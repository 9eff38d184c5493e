//! Links over real loopback TCP: redundancy, the handshake against strangers, replays
//! and reflections, guests that do not match, bounds before authentication, and large
//! messages next to heartbeats.

use std::io::{Read, Write};
use std::net::TcpStream;

use super::blocking::{self, BlockingError};
use super::frame::Plain;
use super::handshake::{Opening, OPENING_LEN};
use super::test_support::*;
use super::*;
use crate::protocol::PROTOCOL_VERSION;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn healthy(l: &[LinkStatus]) -> usize {
    l.iter().filter(|s| s.healthy).count()
}

/// Two connected link sets: x listens on both links, y dials.
fn connected(encrypt: bool) -> ((Links, Events), (Links, Events)) {
    let (xc, yc) = pair_configs();
    let x = Links::start(&xc, options(KEY, encrypt), local("x", 64)).unwrap();
    let y = Links::start(&yc, options(KEY, encrypt), local("y", 64)).unwrap();
    assert!(wait_status(&x.0, |s| healthy(s) == 2), "{:?}", x.0.status());
    assert!(wait_status(&y.0, |s| healthy(s) == 2), "{:?}", y.0.status());
    (x, y)
}

#[test]
fn dedup_accepts_each_sequence_once_and_resets_per_session() {
    let mut d = Dedup::default();
    assert!(d.fresh(1, 1));
    assert!(d.fresh(1, 3));
    assert!(!d.fresh(1, 1));
    assert!(d.fresh(1, 2), "late but unseen");
    assert!(!d.fresh(1, 3));
    assert!(d.fresh(2, 1), "a restarted peer starts again");
    assert!(!d.fresh(2, 1));
    assert!(d.fresh(2, u64::MAX));
    assert!(!d.fresh(2, 5), "far below the window");
}

#[test]
fn a_message_sent_on_two_links_arrives_once_and_links_measure_round_trips() {
    for encrypt in [true, false] {
        let ((x, _xrx), (y, mut yrx)) = connected(encrypt);
        assert_eq!(x.send(&Message::Join).unwrap(), 2, "queued on both links");
        assert_eq!(
            next_message(&mut yrx, Duration::from_secs(5)),
            Some(Message::Join)
        );
        assert_eq!(
            next_message(&mut yrx, ms(300)),
            None,
            "the second copy is dropped"
        );
        assert!(wait_status(&x, |s| s.iter().all(|l| l.rtt_ms.is_some())));
        assert!(x.status().iter().all(|l| l.encrypted == encrypt));
        x.shutdown();
        y.shutdown();
    }
}

#[test]
fn a_message_larger_than_a_frame_arrives_whole_while_heartbeats_keep_the_link_alive() {
    let ((x, _xrx), (y, mut yrx)) = connected(true);
    // Incompressible bytes, many chunks.
    let mut data = vec![0u8; 48 << 20];
    handshake::fill_random(&mut data);
    let big = Message::Inbound {
        position: 7,
        frame: data,
    };
    let started = Instant::now();
    assert_eq!(x.send(&big).unwrap(), 2);
    let mut worst = Duration::ZERO;
    let mut got = None;
    while got.is_none() && started.elapsed() < Duration::from_secs(30) {
        if let Some(t) = y.last_heard() {
            worst = worst.max(t.elapsed());
        }
        got = next_message(&mut yrx, ms(5));
    }
    assert_eq!(got.as_ref(), Some(&big), "split into chunks, joined whole");
    assert!(
        worst < Duration::from_millis(500),
        "the receiver heard nothing for {worst:?} during the transfer"
    );
    assert_eq!(healthy(&y.status()), 2, "{:?}", y.status());
    x.shutdown();
    y.shutdown();
}

#[test]
fn strangers_garbage_and_wrong_keys_are_counted_and_refused_not_fatal() {
    let ((x, mut xrx), (y, _yrx)) = connected(true);
    let target: std::net::SocketAddr = x.status()[0].local.parse().unwrap();
    let connects = x.status()[0].connects;
    // Garbage: not an opening at all (a frame header announcing 256 MiB, then bytes).
    let mut s = TcpStream::connect(target).unwrap();
    let mut junk = (256u32 << 20).to_le_bytes().to_vec();
    junk.extend_from_slice(&[0x5a; 100]);
    s.write_all(&junk).unwrap();
    assert!(
        wait_status(&x, |l| l[0].bad_frames >= 1),
        "{:?}",
        x.status()
    );
    // A well-formed handshake under another key.
    let s = TcpStream::connect(target).unwrap();
    let r = blocking::dial(s, b"not-the-pair-key-at-all", true, 0);
    assert!(r.is_err(), "a wrong key completes no handshake");
    assert!(
        wait_status(&x, |l| l[0].auth_failures >= 1),
        "{:?}",
        x.status()
    );
    // A wrong protocol version is refused, with the reason in the log.
    let mut s = TcpStream::connect(target).unwrap();
    let old = Opening {
        version: 2,
        ..Opening::new(true, 0)
    };
    s.write_all(&old.encode()).unwrap();
    assert!(
        wait_status(&x, |l| l[0].bad_frames >= 2),
        "{:?}",
        x.status()
    );
    // A link index the listener does not hold on this port.
    let s = TcpStream::connect(target).unwrap();
    assert!(matches!(
        blocking::dial(s, KEY, true, 1),
        Err(BlockingError::Handshake(
            handshake::HandshakeError::WrongLink { .. }
        ))
    ));
    // A handshake cut short.
    let mut s = TcpStream::connect(target).unwrap();
    s.write_all(&Opening::new(true, 0).encode()[..20]).unwrap();
    drop(s);
    std::thread::sleep(ms(100));
    assert_eq!(
        x.status()[0].connects,
        connects,
        "no stranger was installed"
    );
    assert!(
        wait_status(&x, |l| healthy(l) == 2),
        "the real peer's links are untouched: {:?}",
        x.status()
    );
    while let Some(ev) = xrx.try_recv() {
        assert!(
            !matches!(ev, Event::Message(_)),
            "a stranger's message reached the CoServer: {ev:?}"
        );
    }
    x.shutdown();
    y.shutdown();
}

#[test]
fn frames_recorded_on_one_connection_are_rejected_on_another_and_when_reflected() {
    let (xc, _) = pair_configs();
    let (x, mut xrx) = Links::start(&xc, options(KEY, true), local("x", 64)).unwrap();
    let target = xc[0].local;
    // A key holder dials and records what it sends and receives.
    let mut a = blocking::dial(TcpStream::connect(target).unwrap(), KEY, true, 0).unwrap();
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        node: "y".into(),
        session: 77,
        role: Role::Primary,
        generation: 1,
        standing: crate::protocol::Standing::Blank,
        arbiter: None,
        guest: local("y", 64).guest,
    };
    let mut sent = Vec::new();
    for plain in [
        Plain::Control(hello.encode().unwrap()),
        frame::chunks(1, false, &Message::Join.encode().unwrap())
            .next()
            .unwrap(),
    ] {
        let f = a.sealer.seal(&plain);
        a.stream.write_all(&f).unwrap();
        sent.push(f);
    }
    assert_eq!(
        next_message(&mut xrx, Duration::from_secs(5)),
        Some(Message::Join)
    );
    // What the listener sent on that connection (its hello, heartbeats).
    let (_, received) = a.read().unwrap();
    let auth_before = x.status()[0].auth_failures;
    // Replayed on a new connection by a key holder: the keys differ, nothing opens.
    let mut b = blocking::dial(TcpStream::connect(target).unwrap(), KEY, true, 0).unwrap();
    for f in &sent {
        let _ = b.stream.write_all(f);
    }
    assert!(
        wait_status(&x, |l| l[0].auth_failures > auth_before),
        "{:?}",
        x.status()
    );
    // Reflected: the listener's own frame written back to it on the first connection.
    let before = x.status()[0].auth_failures;
    let _ = a.stream.write_all(&received);
    assert!(
        wait_status(&x, |l| l[0].auth_failures > before),
        "{:?}",
        x.status()
    );
    // A stranger replays a recorded dialer opening and confirm: the listener's fresh
    // nonce makes the old confirm worthless.
    let before = x.status()[0].auth_failures;
    let mut c = TcpStream::connect(target).unwrap();
    let _ = c.write_all(&a.sent_handshake);
    assert!(
        wait_status(&x, |l| l[0].auth_failures > before),
        "{:?}",
        x.status()
    );
    assert_eq!(
        next_message(&mut xrx, ms(300)),
        None,
        "nothing replayed was delivered"
    );
    x.shutdown();
}

#[test]
fn a_peer_whose_guest_differs_is_refused_with_a_reason_naming_the_difference() {
    let (xc, yc) = pair_configs();
    let (x, mut xrx) = Links::start(&xc, options(KEY, true), local("x", 64)).unwrap();
    let (y, mut yrx) = Links::start(&yc, options(KEY, true), local("y", 128)).unwrap();
    let refused = |rx: &mut Events| {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            match rx.recv_timeout(ms(50)) {
                Ok(Event::Refused { reason }) => return Some(reason),
                Ok(Event::Message(m)) => panic!("message from a refused peer: {m:?}"),
                _ => {}
            }
        }
        None
    };
    let rx_reason = refused(&mut xrx).expect("x refuses y");
    assert!(rx_reason.contains("guest.mem_mib = 128"), "{rx_reason}");
    let ry_reason = refused(&mut yrx).expect("y hears why");
    assert!(ry_reason.contains("mem_mib"), "{ry_reason}");
    x.shutdown();
    y.shutdown();
}

#[test]
fn ends_that_disagree_on_encryption_never_connect() {
    let (xc, yc) = pair_configs();
    let (x, _xrx) = Links::start(&xc, options(KEY, true), local("x", 64)).unwrap();
    let (y, _yrx) = Links::start(&yc, options(KEY, false), local("y", 64)).unwrap();
    assert!(wait_status(&x, |l| l.iter().all(|s| s.bad_frames >= 1)));
    assert!(x.status().iter().all(|s| s.connects == 0));
    x.shutdown();
    y.shutdown();
}

#[test]
fn two_hundred_strangers_hold_a_few_connections_and_the_peer_still_connects() {
    let (xc, yc) = pair_configs();
    let (x, _xrx) = Links::start(&xc, options(KEY, true), local("x", 64)).unwrap();
    let target = xc[0].local;
    // Each stranger sends a valid opening, then trickles bytes and never confirms.
    let mut strangers = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(target).unwrap();
        s.write_all(&Opening::new(true, 0).encode()).unwrap();
        s.write_all(&[0x10]).unwrap();
        strangers.push(s);
    }
    assert!(
        wait_status(&x, |l| l[0].evicted >= (200 - MAX_PENDING) as u64),
        "{:?}",
        x.status()
    );
    // The evicted ones are closed: reading gives the opening, then the end.
    let mut closed = 0;
    for s in strangers.iter_mut().take(50) {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; OPENING_LEN + 1];
        let mut got = 0;
        loop {
            match s.read(&mut buf[got..]) {
                // Closed, with a FIN or (unread bytes were left) a reset.
                Ok(0) => break closed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break closed += 1,
                Err(e) => panic!("a stranger's connection is still open: {e}"),
                Ok(n) => got += n,
            }
            assert!(got <= OPENING_LEN, "a stranger got more than the opening");
        }
    }
    assert_eq!(closed, 50, "the oldest strangers were closed");
    let (y, _yrx) = Links::start(&yc, options(KEY, true), local("y", 64)).unwrap();
    assert!(wait_status(&x, |l| healthy(l) == 2), "{:?}", x.status());
    drop(strangers);
    x.shutdown();
    y.shutdown();
}

/// Takes the even `Released` positions it is offered, logging them; gives back the rest.
struct EvenReleases(Arc<Mutex<Vec<(&'static str, u64)>>>);

impl QuickHandler for EvenReleases {
    fn offer(&self, msg: Message) -> Option<Message> {
        match msg {
            Message::Released { position } if position % 2 == 0 => {
                lock(&self.0).push(("quick", position));
                None
            }
            other => Some(other),
        }
    }
}

#[test]
fn a_message_handled_quickly_overtakes_no_event_still_queued_or_being_handled() {
    let ((x, _xrx), (y, mut yrx)) = connected(true);
    let log = Arc::new(Mutex::new(Vec::new()));
    y.set_quick(Arc::new(EvenReleases(log.clone())));
    // Nothing taken from y's queue yet (hellos and heartbeats wait there): nothing is
    // handled quickly.
    x.send(&Message::Released { position: 0 }).unwrap();
    std::thread::sleep(ms(200));
    assert!(lock(&log).is_empty(), "{:?}", lock(&log));
    // A consumer that takes a while over each event, logging the messages in the order
    // it takes them.
    let stop = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(Event::Message(Message::Released { position })) = yrx.recv_timeout(ms(20))
                {
                    lock(&log).push(("queued", position));
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
        })
    };
    const COUNT: u64 = 200;
    for position in 1..=COUNT {
        x.send(&Message::Released { position }).unwrap();
        // Mostly spaced out (the consumer is done before the next arrives), sometimes
        // in a burst (it is not).
        if position % 16 != 0 {
            std::thread::sleep(ms(1));
        }
    }
    let end = Instant::now() + Duration::from_secs(10);
    while lock(&log).len() < COUNT as usize + 1 && Instant::now() < end {
        std::thread::sleep(ms(10));
    }
    stop.store(true, Ordering::SeqCst);
    consumer.join().unwrap();
    let log = lock(&log).clone();
    let order: Vec<u64> = log.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        order,
        (0..=COUNT).collect::<Vec<_>>(),
        "every message once, in order: {log:?}"
    );
    assert!(
        log.iter()
            .all(|(how, p)| *how == "queued" || (*p % 2 == 0 && *p > 0)),
        "only what the handler takes goes quickly: {log:?}"
    );
    let quick = log.iter().filter(|(how, _)| *how == "quick").count();
    assert!(quick > 0, "no message was handled quickly: {log:?}");
    eprintln!("{quick} of {COUNT} messages handled quickly");
    x.shutdown();
    y.shutdown();
}

#[test]
fn direct_sends_between_queued_ones_arrive_once_each_and_in_order() {
    // Large queued messages fill the sockets; direct ones between them must wait their
    // turn (queued before them) or leave their rest to the writer (larger than the
    // socket's buffer), and none may overtake or be lost.
    let ((x, _xrx), (y, mut yrx)) = connected(true);
    let sizes = [
        1536 << 10,
        2 << 20,
        64,
        700 << 10,
        64,
        64,
        3 << 20,
        64,
        900 << 10,
        64,
    ];
    let rounds = 6;
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        while got.len() < sizes.len() * rounds {
            match next_message(&mut yrx, Duration::from_secs(20)) {
                Some(Message::Inbound { position, frame }) => got.push((position, frame.len())),
                Some(_) => {}
                None => break,
            }
        }
        (got, y)
    });
    let mut sent = Vec::new();
    for round in 0..rounds {
        for (i, &size) in sizes.iter().enumerate() {
            let position = (round * sizes.len() + i) as u64;
            let mut frame = vec![0u8; size];
            handshake::fill_random(&mut frame);
            let msg = Message::Inbound { position, frame };
            // 2 MiB and more queued, the rest direct (1.5 MiB does not fit the
            // socket's buffer at once).
            let links = if size >= 2 << 20 {
                x.send(&msg)
            } else {
                x.send_direct(&msg)
            };
            assert_eq!(links.unwrap(), 2, "taken by both links");
            sent.push((position, size));
        }
    }
    let (got, y) = receiver.join().expect("receiver");
    assert_eq!(got, sent, "every message once, in the order sent");
    assert!(wait_status(&x, |s| healthy(s) == 2), "{:?}", x.status());
    x.shutdown();
    y.shutdown();
}

#[test]
fn direct_sends_while_the_links_come_up_never_go_before_a_connections_hello() {
    // Sent from the moment the links start: each connection's first frame must still be
    // its hello (a message before it is a protocol error that drops the connection).
    let (xc, yc) = pair_configs();
    let (y, _yrx) = Links::start(&yc, options(KEY, true), local("y", 64)).unwrap();
    let (x, _xrx) = Links::start(&xc, options(KEY, true), local("x", 64)).unwrap();
    let sender = std::thread::spawn({
        let x = x.clone();
        move || {
            let (mut sent, started) = (0u64, Instant::now());
            while started.elapsed() < Duration::from_secs(2) {
                if x.send_direct(&Message::Join).unwrap() > 0 {
                    sent += 1;
                }
            }
            sent
        }
    });
    let sent = sender.join().expect("sender");
    assert!(sent > 0, "the links came up and took direct sends");
    for s in y.status().iter().chain(x.status().iter()) {
        assert_eq!(s.bad_frames, 0, "{s:?}");
        assert_eq!(s.connects, 1, "never dropped and connected again: {s:?}");
    }
    x.shutdown();
    y.shutdown();
}
