//! The kernel shortcut on its own: real sockets, the real BPF programs, no PostgreSQL. Needs
//! root (this project's test machines run as root).
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;

use stemma_proxy::shortcut::{Shortcut, BULK_SEND};

/// A server on its own loopback address that answers each `size`-byte message with the same
/// bytes, plus one.
fn echo_server(ip: Ipv4Addr, size: usize) -> u16 {
    let listener = TcpListener::bind((ip, 0)).expect("bind the echo server");
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for s in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut s = s;
                let mut buf = vec![0u8; size];
                while s.read_exact(&mut buf).is_ok() {
                    for b in buf.iter_mut() {
                        *b = b.wrapping_add(1);
                    }
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A userspace relay between two sockets (what the proxy does when not joined).
fn relay(a: TcpStream, b: TcpStream) {
    for (mut from, mut to) in [(a.try_clone().unwrap(), b.try_clone().unwrap()), (b, a)] {
        thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Write);
        });
    }
}

/// A client connected through a "proxy" on `proxy`, with its upstream connection to the
/// echo server: (client, accepted, upstream).
fn connect(proxy: &TcpListener, server: (Ipv4Addr, u16)) -> (TcpStream, TcpStream, TcpStream) {
    let client = TcpStream::connect(proxy.local_addr().unwrap()).unwrap();
    let (accepted, _) = proxy.accept().unwrap();
    let upstream = TcpStream::connect(server).unwrap();
    for s in [&client, &accepted, &upstream] {
        s.set_nodelay(true).unwrap();
    }
    (client, accepted, upstream)
}

fn round_trips(client: &mut TcpStream, size: usize, rounds: usize, seed: u8) {
    let mut back = vec![0u8; size];
    for r in 0..rounds {
        let msg: Vec<u8> = (0..size).map(|i| (i + r) as u8 ^ seed).collect();
        client.write_all(&msg).unwrap();
        client.read_exact(&mut back).unwrap();
        let want: Vec<u8> = msg.iter().map(|b| b.wrapping_add(1)).collect();
        assert_eq!(back, want, "round trip {r}");
    }
}

#[test]
fn joined_sockets_talk_directly_and_leave_on_a_bulk_send() {
    let shortcut =
        Arc::new(Shortcut::install().expect("the kernel shortcut installs (root, BPF, cgroup v2)"));
    let ip = Ipv4Addr::new(127, 64, 255, 1);
    shortcut.watch_compute(ip).unwrap();
    let size = 100;
    let server = (ip, echo_server(ip, size));
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    shortcut
        .watch_listen_port(proxy.local_addr().unwrap().port())
        .unwrap();

    let (mut client, accepted, upstream) = connect(&proxy, server);
    // The proxy's own sockets see nothing while joined: watch them through clones.
    let (acc_probe, up_probe) = (accepted.try_clone().unwrap(), upstream.try_clone().unwrap());
    let joined = shortcut
        .join(&accepted, &upstream)
        .expect("both far ends were captured when established");
    assert!(joined.is_joined());
    let (before_up, before_down) = shortcut.bytes();
    round_trips(&mut client, size, 1000, 0);
    let (up, down) = shortcut.bytes();
    assert_eq!(up - before_up, 100_000, "client-to-server bytes counted");
    assert_eq!(
        down - before_down,
        100_000,
        "server-to-client bytes counted"
    );
    for probe in [&acc_probe, &up_probe] {
        probe.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        assert!(
            (&*probe).read(&mut b).is_err(),
            "a byte went through the proxy's socket while joined"
        );
        probe.set_nonblocking(false).unwrap();
    }

    // A bulk send leaves the shortcut; the relay takes over, in order.
    relay(accepted, upstream);
    let big: Vec<u8> = (0..size * 500).map(|i| (i % 251) as u8).collect();
    assert!(big.len() > BULK_SEND as usize);
    let writer = {
        let mut c = client.try_clone().unwrap();
        let big = big.clone();
        thread::spawn(move || c.write_all(&big).unwrap())
    };
    let mut back = vec![0u8; big.len()];
    client.read_exact(&mut back).unwrap();
    writer.join().unwrap();
    let want: Vec<u8> = big.iter().map(|b| b.wrapping_add(1)).collect();
    assert!(
        back == want,
        "the bulk transfer arrived intact and in order"
    );
    assert!(!joined.is_joined(), "a bulk send unjoins the pair");
    round_trips(&mut client, size, 100, 7);
    drop(joined);
}

#[test]
fn only_watched_ports_and_addresses_are_captured() {
    let shortcut = Arc::new(Shortcut::install().expect("the kernel shortcut installs"));
    let watched_ip = Ipv4Addr::new(127, 64, 255, 2);
    let other_ip = Ipv4Addr::new(127, 64, 255, 3);
    shortcut.watch_compute(watched_ip).unwrap();
    let watched = (watched_ip, echo_server(watched_ip, 10));
    let other = (other_ip, echo_server(other_ip, 10));
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();

    // The proxy's port is not watched: its clients are not captured.
    let (_c, accepted, upstream) = connect(&proxy, watched);
    assert!(shortcut.join(&accepted, &upstream).is_none());

    shortcut
        .watch_listen_port(proxy.local_addr().unwrap().port())
        .unwrap();
    // A server address that is not watched.
    let (_c, accepted, upstream) = connect(&proxy, other);
    assert!(shortcut.join(&accepted, &upstream).is_none());
    // Both watched.
    let (mut c, accepted, upstream) = connect(&proxy, watched);
    let joined = shortcut.join(&accepted, &upstream).expect("joined");
    round_trips(&mut c, 10, 10, 3);
    drop(joined);
    // Unjoined by the proxy: the bytes take the proxy's sockets again.
    relay(accepted, upstream);
    round_trips(&mut c, 10, 10, 5);

    shortcut.unwatch_listen_port(proxy.local_addr().unwrap().port());
    let (_c, accepted, upstream) = connect(&proxy, watched);
    assert!(shortcut.join(&accepted, &upstream).is_none());
}
