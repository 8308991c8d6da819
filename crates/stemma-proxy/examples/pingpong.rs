//! Round trips of small messages through each kind of connection the proxy can offer, to
//! compare their cost: a Unix socket, TCP loopback, a userspace relay, the kernel shortcut.
//!
//!     cargo run --release -p stemma-proxy --example pingpong -- [ROUNDS]
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Instant;

use stemma_proxy::shortcut::Shortcut;

const MSG: usize = 100;

fn echo<S: Read + Write>(mut s: S) {
    let mut buf = [0u8; MSG];
    while s.read_exact(&mut buf).is_ok() {
        if s.write_all(&buf).is_err() {
            break;
        }
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

fn run<S: Read + Write>(name: &str, mut s: S, rounds: usize) {
    let buf = [7u8; MSG];
    let mut back = [0u8; MSG];
    let (t0, c0) = (Instant::now(), cpu_seconds());
    for _ in 0..rounds {
        s.write_all(&buf).unwrap();
        s.read_exact(&mut back).unwrap();
    }
    let (dt, dc) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
    println!(
        "{name:10} {:7.1} us/round trip, {:7.1} us CPU/round trip",
        dt * 1e6 / rounds as f64,
        dc * 1e6 / rounds as f64
    );
}

fn relay(a: TcpStream, b: TcpStream) {
    let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a2, &mut b2);
    });
    let (mut a, mut b) = (a, b);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b, &mut a);
    });
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50_000);
    let dir = std::env::temp_dir().join(format!("pingpong-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("sock");
    let ul = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for s in ul.incoming().flatten() {
            std::thread::spawn(move || echo(s));
        }
    });
    run("unix", UnixStream::connect(&path).unwrap(), rounds);

    let compute_ip = std::net::Ipv4Addr::new(127, 64, 0, 1);
    let server = TcpListener::bind((compute_ip, 0)).unwrap();
    let server_port = server.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in server.incoming().flatten() {
            s.set_nodelay(true).unwrap();
            std::thread::spawn(move || echo(s));
        }
    });
    let c = TcpStream::connect((compute_ip, server_port)).unwrap();
    c.set_nodelay(true).unwrap();
    run("tcp", c, rounds);

    let shortcut = match Shortcut::install() {
        Ok(s) => Some(Arc::new(s)),
        Err(e) => {
            println!("no shortcut: {e}");
            None
        }
    };
    if let Some(s) = &shortcut {
        s.watch_compute(compute_ip).unwrap();
    }
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    if let Some(s) = &shortcut {
        s.watch_listen_port(proxy_port).unwrap();
    }
    for mode in ["relay", "shortcut"] {
        if mode == "shortcut" && shortcut.is_none() {
            continue;
        }
        let client = TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
        client.set_nodelay(true).unwrap();
        let (accepted, _) = proxy.accept().unwrap();
        accepted.set_nodelay(true).unwrap();
        let upstream = TcpStream::connect((compute_ip, server_port)).unwrap();
        upstream.set_nodelay(true).unwrap();
        let joined = if mode == "shortcut" {
            let j = shortcut.as_ref().unwrap().join(&accepted, &upstream);
            println!("joined: {}", j.is_some());
            j
        } else {
            None
        };
        relay(accepted, upstream);
        run(mode, client.try_clone().unwrap(), rounds);
        if let Some(j) = &joined {
            println!(
                "still joined: {}, bytes {:?}",
                j.is_joined(),
                shortcut.as_ref().unwrap().bytes()
            );
        }
        // A bulk send leaves the shortcut; the echo must still come back whole and in order.
        let mut client = client;
        let big: Vec<u8> = (0..MSG * 1000).map(|i| (i % 251) as u8).collect();
        let writer = {
            let mut c = client.try_clone().unwrap();
            let big = big.clone();
            std::thread::spawn(move || c.write_all(&big).unwrap())
        };
        let mut back = vec![0u8; big.len()];
        client.read_exact(&mut back).unwrap();
        writer.join().unwrap();
        println!("bulk echo intact: {}", back == big);
        if let Some(j) = &joined {
            println!("still joined after bulk: {}", j.is_joined());
        }
        run(mode, client, rounds / 10);
        drop(joined);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
