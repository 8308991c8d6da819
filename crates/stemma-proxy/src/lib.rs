//! Stemma's PostgreSQL-protocol proxy.
//!
//! The proxy owns the listening sockets that clients connect to: one per branch, on the port
//! the branch keeps for its whole life, and one shared port where the startup parameter
//! `options=branch=NAME` chooses the branch. It speaks the startup part of the protocol itself
//! (refusing SSL and GSS encryption cleanly, routing CancelRequests to the right compute), asks
//! its [`Backend`] to wake the branch's compute, then relays bytes. Authentication stays end to
//! end between the client and the compute.
//!
//! Architecture invariants:
//! - The proxy knows nothing about metadata, storage or how computes start: it asks the
//!   [`Backend`] for a route and for a socket to connect to.
//! - Server-to-client traffic is relayed message by message, so the proxy can end a connection
//!   with a proper ErrorResponse (a branch reset or deleted) at a message boundary.
//! - Every connection counts in its branch's activity while it is open; idleness, and so
//!   suspension, is decided from that count by the control plane.

mod protocol;
pub mod shortcut;

use shortcut::Shortcut;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::broadcast;

use protocol::{encode_cancel, encode_startup, read_startup};
pub use protocol::{error_response, take_branch_option, StartupPacket};

/// Loads a TLS certificate chain and its private key (PEM files) for the proxy.
pub fn load_tls(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading the TLS certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("reading the TLS key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("the TLS certificate and key do not fit together: {e}"))?;
    Ok(Arc::new(config))
}

/// Where a connection goes: the branch's stable key (its id) and its current name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub key: String,
    pub branch: String,
}

/// Why a connection could not be routed, as the client will read it.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The SQLSTATE: `3D000` for an unknown branch, `57P03` when a compute cannot start,
    /// `53300` when too many computes run.
    pub sqlstate: &'static str,
    pub message: String,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where a running compute accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Its Unix socket.
    pub socket: PathBuf,
    /// Its own TCP address, when it listens on one: plain connections use it when the kernel
    /// shortcut is on (the shortcut joins TCP sockets only).
    pub tcp: Option<SocketAddr>,
}

/// What the proxy needs from the control plane.
pub trait Backend: Send + Sync + 'static {
    /// The branch called `name`, for the shared port.
    fn resolve(&self, name: &str) -> Option<Route>;
    /// Makes sure the branch's compute runs; returns where it listens.
    fn wake<'a>(&'a self, route: &'a Route) -> BoxFuture<'a, Result<Upstream, Refusal>>;
}

/// The proxy's Prometheus metrics; the control plane registers them.
#[derive(Default, Clone)]
pub struct ProxyMetrics {
    pub connections_open: Gauge,
    pub connections_total: Counter,
    pub bytes_client_to_compute: Counter,
    pub bytes_compute_to_client: Counter,
    /// Connections joined by the kernel shortcut.
    pub shortcut_connections: Counter,
}

/// Open connections and the time of the last connect or disconnect of one branch.
#[derive(Debug, Clone, Copy)]
pub struct Activity {
    pub open: usize,
    pub last_change: Instant,
}

/// Lets the control plane end one open connection.
struct ConnControl {
    /// Set before the sockets are shut down: the reason given to the client.
    message: Mutex<Option<String>>,
    server: ServerStream,
    /// Set while the kernel shortcut joins the client and the compute.
    joined: Mutex<Option<shortcut::Joined>>,
}

impl ConnControl {
    fn new(server: ServerStream) -> ConnControl {
        ConnControl {
            message: Mutex::new(None),
            server,
            joined: Mutex::new(None),
        }
    }

    fn terminate(&self, message: &str) {
        *lock(&self.message) = Some(message.to_string());
        // The compute's sends come through the proxy's socket again before it is shut down,
        // so that nothing reaches the client after the ErrorResponse.
        drop(lock(&self.joined).take());
        // Wakes the relay threads blocked in read(); the downstream one then writes the
        // ErrorResponse and closes the client.
        let _ = self.server.shutdown(std::net::Shutdown::Both);
    }
}

fn message_is_set(control: &ConnControl) -> bool {
    lock(&control.message).is_some()
}

/// The proxy's connection to a compute: its Unix socket, or its TCP address (for the kernel
/// shortcut).
enum ServerStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl ServerStream {
    fn try_clone(&self) -> std::io::Result<ServerStream> {
        Ok(match self {
            ServerStream::Unix(s) => ServerStream::Unix(s.try_clone()?),
            ServerStream::Tcp(s) => ServerStream::Tcp(s.try_clone()?),
        })
    }
    fn shutdown(&self, how: std::net::Shutdown) -> std::io::Result<()> {
        match self {
            ServerStream::Unix(s) => s.shutdown(how),
            ServerStream::Tcp(s) => s.shutdown(how),
        }
    }
    fn set_nonblocking(&self, on: bool) -> std::io::Result<()> {
        match self {
            ServerStream::Unix(s) => s.set_nonblocking(on),
            ServerStream::Tcp(s) => s.set_nonblocking(on),
        }
    }
}

impl std::io::Read for ServerStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            ServerStream::Unix(s) => s.read(buf),
            ServerStream::Tcp(s) => s.read(buf),
        }
    }
}

impl std::io::Write for ServerStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            ServerStream::Unix(s) => s.write(buf),
            ServerStream::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connection routed and started: what the relay needs.
struct Connected {
    route: Route,
    socket: PathBuf,
    server: ServerStream,
    /// What the compute sent before the relay started (read while choosing the transport).
    first: Vec<u8>,
    guard: ConnectionGuard,
    terminated: broadcast::Receiver<String>,
}

fn refusal_of(sqlstate: &'static str, message: String) -> Refusal {
    Refusal { sqlstate, message }
}

/// Finds where whole server messages end in a buffer, so that only whole messages are
/// forwarded (and a termination can add an ErrorResponse at a boundary). A message larger
/// than the buffer is streamed through instead.
#[derive(Default)]
struct Framer {
    /// Bytes of a streamed message still to pass.
    passthrough: usize,
    /// Whether a ReadyForQuery passed: the startup phase is over and the session is idle.
    ready_seen: bool,
}

impl Framer {
    /// How many leading bytes of `data` can be forwarded now. `capacity` is the buffer's size;
    /// `on_key` receives the (pid, secret) of a BackendKeyData message.
    fn complete(
        &mut self,
        data: &[u8],
        capacity: usize,
        mut on_key: impl FnMut((i32, i32)),
    ) -> std::io::Result<usize> {
        let mut cut = 0;
        // Bounded: each round consumes a message or stops.
        loop {
            if self.passthrough > 0 {
                let n = self.passthrough.min(data.len() - cut);
                cut += n;
                self.passthrough -= n;
                if self.passthrough > 0 {
                    return Ok(cut);
                }
                continue;
            }
            let rest = &data[cut..];
            if rest.len() < 5 {
                return Ok(cut);
            }
            let len = i32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
            if len < 4 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "bad message length from the compute",
                ));
            }
            let total = 1 + len as usize;
            if rest[0] == b'K' && total >= 13 && rest.len() >= 13 {
                let b = &rest[5..13];
                on_key((
                    i32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                    i32::from_be_bytes([b[4], b[5], b[6], b[7]]),
                ));
            }
            if rest.len() >= total {
                cut += total;
                self.ready_seen |= rest[0] == b'Z';
            } else if total > capacity {
                self.passthrough = total - rest.len();
                return Ok(data.len());
            } else {
                return Ok(cut);
            }
        }
    }

    /// Whether a streamed message is only partly forwarded.
    fn in_message(&self) -> bool {
        self.passthrough > 0
    }
}

/// Connects to a compute's TCP address, sends the startup message and reads the compute's
/// first message. `None` when that is pg_hba.conf refusing the connection (a data directory
/// whose rules cover only Unix sockets).
async fn startup_over_tcp(
    addr: SocketAddr,
    startup: &[u8],
) -> std::io::Result<Option<(TcpStream, Vec<u8>)>> {
    let mut server = TcpStream::connect(addr).await?;
    server.set_nodelay(true)?;
    server.write_all(startup).await?;
    let mut first = Vec::with_capacity(1024);
    let read_first = async {
        // Bounded: each round reads bytes or returns; a message is at most 16 KiB here.
        loop {
            if first.len() >= 5 {
                let len = i32::from_be_bytes([first[1], first[2], first[3], first[4]]);
                if !(4..=16 * 1024).contains(&len) || first.len() > len as usize {
                    return Ok::<_, std::io::Error>(());
                }
            }
            let mut chunk = [0u8; 4096];
            let n = server.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            first.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), read_first)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the compute did not answer the startup message",
            )
        })??;
    if is_hba_refusal(&first) {
        return Ok(None);
    }
    Ok(Some((server, first)))
}

/// Whether `data` ends with a whole ReadyForQuery message ('Z', length 5, a status byte).
fn ends_with_ready_for_query(data: &[u8]) -> bool {
    data.len() >= 6 && data[data.len() - 6..data.len() - 1] == [b'Z', 0, 0, 0, 5]
}

/// Whether `message` is an ErrorResponse of pg_hba.conf refusing a connection (SQLSTATE
/// 28000 and a message naming the file).
fn is_hba_refusal(message: &[u8]) -> bool {
    if message.len() < 5 || message[0] != b'E' {
        return false;
    }
    let (mut code, mut text) = ("", "");
    for field in message[5..].split(|&b| b == 0) {
        let Some((&kind, value)) = field.split_first() else {
            break;
        };
        let value = std::str::from_utf8(value).unwrap_or("");
        match kind {
            b'C' => code = value,
            b'M' => text = value,
            _ => {}
        }
    }
    code == "28000" && text.contains("pg_hba.conf")
}

/// Per relay thread: the stack (the relay loops are shallow) and the buffer.
const RELAY_STACK: usize = 256 * 1024;
const RELAY_BUFFER: usize = 64 * 1024;

/// Client to compute: raw bytes.
fn relay_upstream(
    from: &mut std::net::TcpStream,
    to: &mut ServerStream,
    bytes: &Counter,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        bytes.inc_by(n as u64);
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
    Ok(())
}

struct BranchState {
    activity: Activity,
    /// Open connections, to end them on reset or delete.
    connections: HashMap<u64, Arc<ConnControl>>,
    /// Ends every open connection of the branch with the message sent.
    terminate: broadcast::Sender<String>,
    listener: Option<tokio::task::JoinHandle<()>>,
    route: Option<Route>,
    /// The branch's own port, while listened on.
    port: Option<u16>,
}

pub struct Proxy {
    backend: Arc<dyn Backend>,
    /// When set, SSLRequests are accepted with this certificate.
    tls: Option<tokio_rustls::TlsAcceptor>,
    metrics: ProxyMetrics,
    branches: Mutex<HashMap<String, BranchState>>,
    /// (pid, secret key) of each backend behind an open connection -> its socket, so that a
    /// CancelRequest reaches the right compute.
    cancel_keys: Mutex<HashMap<(i32, i32), PathBuf>>,
    next_id: AtomicU64,
    /// When on, plain connections go to the compute's TCP address and the kernel passes
    /// their bytes once the session starts.
    shortcut: Option<Arc<Shortcut>>,
    /// Compute addresses whose pg_hba.conf refused the proxy's TCP connection: those
    /// computes are reached on their Unix socket.
    tcp_refused: Mutex<HashSet<SocketAddr>>,
}

/// Adds the bytes the kernel passed for joined connections to the byte metrics, every second,
/// for as long as the proxy exists.
fn count_shortcut_bytes(proxy: std::sync::Weak<Proxy>) {
    let mut seen = (0u64, 0u64);
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let Some(proxy) = proxy.upgrade() else { return };
        let Some(shortcut) = &proxy.shortcut else {
            return;
        };
        let now = shortcut.bytes();
        let m = &proxy.metrics;
        m.bytes_client_to_compute
            .inc_by(now.0.saturating_sub(seen.0));
        m.bytes_compute_to_client
            .inc_by(now.1.saturating_sub(seen.1));
        seen = now;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Proxy {
    /// A proxy; with `shortcut`, plain connections are joined in the kernel once their
    /// session starts (see [`shortcut`]).
    pub fn new(
        backend: Arc<dyn Backend>,
        metrics: ProxyMetrics,
        tls: Option<Arc<rustls::ServerConfig>>,
        shortcut: Option<Arc<Shortcut>>,
    ) -> Arc<Self> {
        let proxy = Arc::new(Proxy {
            backend,
            tls: tls.map(tokio_rustls::TlsAcceptor::from),
            metrics,
            branches: Mutex::new(HashMap::new()),
            cancel_keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            shortcut,
            tcp_refused: Mutex::new(HashSet::new()),
        });
        if proxy.shortcut.is_some() {
            let weak = Arc::downgrade(&proxy);
            let spawned = std::thread::Builder::new()
                .name("proxy-bytes".into())
                .stack_size(RELAY_STACK)
                .spawn(move || count_shortcut_bytes(weak));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no thread to count the shortcut's bytes");
            }
        }
        proxy
    }

    fn with_branch<T>(&self, key: &str, f: impl FnOnce(&mut BranchState) -> T) -> T {
        let mut branches = lock(&self.branches);
        let state = branches
            .entry(key.to_string())
            .or_insert_with(|| BranchState {
                activity: Activity {
                    open: 0,
                    last_change: Instant::now(),
                },
                terminate: broadcast::channel(4).0,
                connections: HashMap::new(),
                listener: None,
                route: None,
                port: None,
            });
        f(state)
    }

    /// Listens on 127.0.0.1:`port` for `route`'s branch. Fails when the port is taken.
    pub async fn listen_branch(self: &Arc<Self>, port: u16, route: Route) -> std::io::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        self.watch_port(port);
        let this = self.clone();
        let key = route.key.clone();
        let task = tokio::spawn(this.accept_loop(listener, Some(key.clone())));
        self.with_branch(&key, |s| {
            if let Some(old) = s.listener.replace(task) {
                old.abort();
            }
            s.route = Some(route);
            s.port = Some(port);
        });
        Ok(())
    }

    /// Lets the kernel shortcut see clients of `port`.
    fn watch_port(&self, port: u16) {
        if let Some(shortcut) = &self.shortcut {
            if let Err(e) = shortcut.watch_listen_port(port) {
                tracing::warn!(port, error = %e, "the kernel shortcut cannot watch this port; its connections are relayed");
            }
        }
    }

    /// Listens on the shared port, where `options=branch=NAME` chooses the branch. Returns
    /// the bound address (port 0 picks one).
    pub async fn listen_shared(self: &Arc<Self>, addr: SocketAddr) -> std::io::Result<SocketAddr> {
        let listener = TcpListener::bind(addr).await?;
        let bound = listener.local_addr()?;
        self.watch_port(bound.port());
        tokio::spawn(self.clone().accept_loop(listener, None));
        Ok(bound)
    }

    /// The branch was renamed: error messages use the new name.
    pub fn rename(&self, key: &str, branch: &str) {
        self.with_branch(key, |s| {
            if let Some(r) = &mut s.route {
                r.branch = branch.to_string();
            }
        });
    }

    /// Stops listening for a branch (deleted) and ends its connections with `message`.
    pub fn remove_branch(&self, key: &str, message: &str) {
        self.terminate(key, message);
        if let Some(state) = lock(&self.branches).remove(key) {
            if let Some(l) = state.listener {
                l.abort();
            }
            if let (Some(shortcut), Some(port)) = (&self.shortcut, state.port) {
                shortcut.unwatch_listen_port(port);
            }
        }
    }

    /// Ends every open connection of a branch with a FATAL ErrorResponse carrying `message`.
    pub fn terminate(&self, key: &str, message: &str) {
        self.with_branch(key, |s| {
            // Connections still starting up see the broadcast; running ones are ended here.
            let _ = s.terminate.send(message.to_string());
            for c in s.connections.values() {
                c.terminate(message);
            }
        });
    }

    /// Open connections and the last change of a branch.
    pub fn activity(&self, key: &str) -> Activity {
        self.with_branch(key, |s| s.activity)
    }

    /// Counts as activity without a connection (a compute started by a command).
    pub fn touch(&self, key: &str) {
        self.with_branch(key, |s| s.activity.last_change = Instant::now());
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener, key: Option<String>) {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = self.clone();
            let key = key.clone();
            tokio::spawn(async move {
                if let Err(e) = this.handle(stream, key).await {
                    tracing::debug!(error = %e, "proxy connection ended with an error");
                }
            });
        }
    }

    async fn refuse<S: AsyncWrite + Unpin>(
        client: &mut S,
        refusal: &Refusal,
    ) -> std::io::Result<()> {
        client
            .write_all(&error_response(refusal.sqlstate, &refusal.message))
            .await?;
        client.shutdown().await
    }

    async fn handle(
        self: Arc<Self>,
        mut client: TcpStream,
        key: Option<String>,
    ) -> std::io::Result<()> {
        let _ = client.set_nodelay(true);
        // The startup phase: at most an SSL and a GSS request before the startup message.
        let mut packet = read_startup(&mut client).await?;
        for _ in 0..2 {
            match packet {
                StartupPacket::SslRequest if self.tls.is_some() => {
                    client.write_all(b"S").await?;
                    let Some(acceptor) = self.tls.clone() else {
                        break;
                    };
                    let mut tls = acceptor.accept(client).await?;
                    let sni = tls.get_ref().1.server_name().map(String::from);
                    let packet = read_startup(&mut tls).await?;
                    let Some(conn) = self
                        .route_and_connect(&mut tls, packet, key, sni, false)
                        .await?
                    else {
                        return Ok(());
                    };
                    return self.relay_async(tls, conn).await;
                }
                StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                    client.write_all(b"N").await?;
                    packet = read_startup(&mut client).await?;
                }
                _ => break,
            }
        }
        let Some(conn) = self
            .route_and_connect(&mut client, packet, key, None, true)
            .await?
        else {
            return Ok(());
        };
        self.relay_threads(client, conn).await
    }

    /// Routes a startup packet to a branch, wakes its compute and forwards the startup message.
    /// `None` when the connection was answered here (a refusal, a cancel). `plain`: the
    /// client's connection is plain TCP, which the kernel shortcut can join.
    async fn route_and_connect<S: AsyncWrite + Unpin>(
        self: &Arc<Self>,
        client: &mut S,
        packet: StartupPacket,
        key: Option<String>,
        sni: Option<String>,
        plain: bool,
    ) -> std::io::Result<Option<Connected>> {
        let (version, mut params) = match packet {
            StartupPacket::Cancel { pid, secret } => {
                self.forward_cancel(pid, secret).await?;
                return Ok(None);
            }
            StartupPacket::Startup { version, params } => (version, params),
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                Self::refuse(
                    client,
                    &Refusal {
                        sqlstate: "08P01",
                        message: "too many encryption requests".into(),
                    },
                )
                .await?;
                return Ok(None);
            }
        };
        let refuse = |sqlstate, message: String| Refusal { sqlstate, message };
        let route = match key {
            Some(key) => match self.with_branch(&key, |s| s.route.clone()) {
                Some(r) => Ok(r),
                None => Err(refuse("3D000", "this branch no longer exists".into())),
            },
            None => {
                let options = params.iter().position(|(k, _)| k == "options");
                let (branch, rest) = match options {
                    Some(i) => take_branch_option(&params[i].1),
                    None => (None, String::new()),
                };
                if let Some(i) = options {
                    if rest.is_empty() {
                        params.remove(i);
                    } else {
                        params[i].1 = rest;
                    }
                }
                // Without the option, the first label of the TLS server name chooses.
                let branch = branch.or_else(|| {
                    sni.as_deref()
                        .and_then(|h| h.split('.').next())
                        .map(String::from)
                });
                match branch {
                    None => Err(refuse("08004", "no branch chosen: on the shared port, add options=branch%3DNAME to the connection string (or PGOPTIONS='branch=NAME'), or connect with TLS to NAME.<your domain>".into())),
                    Some(branch) => self
                        .backend
                        .resolve(&branch)
                        .ok_or_else(|| refuse("3D000", format!("branch \"{branch}\" does not exist"))),
                }
            }
        };
        let route = match route {
            Ok(r) => r,
            Err(refusal) => {
                Self::refuse(client, &refusal).await?;
                return Ok(None);
            }
        };

        // From here the connection counts as activity of the branch.
        let guard = self.open_connection(&route.key);
        let terminated = self.with_branch(&route.key, |s| s.terminate.subscribe());
        let upstream = match self.backend.wake(&route).await {
            Ok(s) => s,
            Err(refusal) => {
                Self::refuse(client, &refusal).await?;
                return Ok(None);
            }
        };
        let startup = encode_startup(version, &params);
        let (server, first) = match self.connect_upstream(&upstream, plain, &startup).await {
            Ok(s) => s,
            Err(e) => {
                let msg = format!(
                    "the compute of branch \"{}\" is not reachable: {e}",
                    route.branch
                );
                Self::refuse(client, &refusal_of("57P03", msg)).await?;
                return Ok(None);
            }
        };
        Ok(Some(Connected {
            route,
            socket: upstream.socket,
            server,
            first,
            guard,
            terminated,
        }))
    }

    /// Connects to the compute and sends the startup message: over TCP when the kernel
    /// shortcut can join the connection, else (or when the compute's pg_hba.conf refuses
    /// TCP from the proxy) on its Unix socket. Returns what the compute already answered.
    async fn connect_upstream(
        &self,
        upstream: &Upstream,
        plain: bool,
        startup: &[u8],
    ) -> std::io::Result<(ServerStream, Vec<u8>)> {
        let tcp = match (&self.shortcut, upstream.tcp) {
            (Some(shortcut), Some(addr)) if plain && !lock(&self.tcp_refused).contains(&addr) => {
                match addr.ip() {
                    std::net::IpAddr::V4(ip) => match shortcut.watch_compute(ip) {
                        Ok(()) => Some(addr),
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "the kernel shortcut cannot watch this compute");
                            None
                        }
                    },
                    std::net::IpAddr::V6(_) => None,
                }
            }
            _ => None,
        };
        if let Some(addr) = tcp {
            match startup_over_tcp(addr, startup).await {
                Ok(Some((server, first))) => {
                    return Ok((ServerStream::Tcp(server.into_std()?), first));
                }
                Ok(None) => {
                    tracing::info!(%addr, "the compute's pg_hba.conf refuses TCP connections from 127.0.0.1: the proxy uses its Unix socket");
                    lock(&self.tcp_refused).insert(addr);
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "the compute's TCP address failed: the proxy uses its Unix socket");
                }
            }
        }
        let mut server = UnixStream::connect(&upstream.socket).await?;
        server.write_all(startup).await?;
        Ok((ServerStream::Unix(server.into_std()?), Vec::new()))
    }

    /// Registers a relayed connection so that reset and delete can end it.
    fn register(
        &self,
        key: &str,
        control: &Arc<ConnControl>,
        terminated: &mut broadcast::Receiver<String>,
    ) -> u64 {
        let conn_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.with_branch(key, |s| {
            s.connections.insert(conn_id, control.clone());
        });
        // A termination requested before this connection registered still applies.
        if let Ok(msg) = terminated.try_recv() {
            control.terminate(&msg);
        }
        conn_id
    }

    /// Relays a plain connection on two threads with blocking I/O: the kernel wakes the
    /// thread that waits for the bytes, with no reactor in between. Measured on 2 cores, this
    /// halves the proxy's cost per round trip against relaying on the async runtime; a
    /// development host has tens of connections, not thousands, so two small threads per
    /// connection are affordable. Two wake-ups and four syscalls per round trip is the floor
    /// for a relay in userspace; what else was measured (splice, poll, a sockmap redirect) is
    /// in ARCHITECTURE.md.
    async fn relay_threads(
        self: Arc<Self>,
        client: TcpStream,
        conn: Connected,
    ) -> std::io::Result<()> {
        let Connected {
            route,
            socket,
            server,
            first,
            guard,
            mut terminated,
        } = conn;
        let client = client.into_std()?;
        client.set_nonblocking(false)?;
        server.set_nonblocking(false)?;
        let control = Arc::new(ConnControl::new(server.try_clone()?));
        let conn_id = self.register(&route.key, &control, &mut terminated);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<std::io::Result<()>>();
        let up = {
            let (mut from, mut to) = (client.try_clone()?, server.try_clone()?);
            let bytes = self.metrics.bytes_client_to_compute.clone();
            std::thread::Builder::new()
                .name("proxy-up".into())
                .stack_size(RELAY_STACK)
                .spawn(move || relay_upstream(&mut from, &mut to, &bytes))?
        };
        let this = self.clone();
        let key = route.key.clone();
        std::thread::Builder::new()
            .name("proxy-down".into())
            .stack_size(RELAY_STACK)
            .spawn(move || {
                let r = this.relay_downstream(server, client, first, &socket, &control);
                let _ = up.join();
                this.with_branch(&key, |s| {
                    s.connections.remove(&conn_id);
                });
                drop(guard);
                let _ = done_tx.send(r);
            })?;
        done_rx.await.unwrap_or(Ok(()))
    }

    /// Relays a TLS connection on the async runtime (the TLS session cannot be split across
    /// two blocking threads).
    async fn relay_async<C: AsyncRead + AsyncWrite + Unpin>(
        self: Arc<Self>,
        client: C,
        conn: Connected,
    ) -> std::io::Result<()> {
        let Connected {
            route,
            socket,
            server,
            first,
            guard,
            mut terminated,
        } = conn;
        // Only plain connections go over TCP (for the kernel shortcut).
        let ServerStream::Unix(std_server) = server else {
            return Err(std::io::Error::other(
                "a TLS connection reached its compute over TCP",
            ));
        };
        std_server.set_nonblocking(true)?;
        let control = Arc::new(ConnControl::new(ServerStream::Unix(
            std_server.try_clone()?,
        )));
        let server = UnixStream::from_std(std_server)?;
        let conn_id = self.register(&route.key, &control, &mut terminated);
        let (mut client_read, mut client_write) = tokio::io::split(client);
        let (mut server_read, mut server_write) = server.into_split();
        let up_bytes = self.metrics.bytes_client_to_compute.clone();
        let upstream = async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = client_read.read(&mut buf).await?;
                if n == 0 {
                    let _ = server_write.shutdown().await;
                    return Ok::<_, std::io::Error>(());
                }
                server_write.write_all(&buf[..n]).await?;
                up_bytes.inc_by(n as u64);
            }
        };
        let mut framer = Framer::default();
        let mut cancel_key = None;
        let downstream = async {
            let mut buf = vec![0u8; RELAY_BUFFER.max(first.len())];
            buf[..first.len()].copy_from_slice(&first);
            let (mut start, mut end) = (0usize, first.len());
            loop {
                let cut = start
                    + framer.complete(&buf[start..end], buf.len(), |k| {
                        lock(&self.cancel_keys).insert(k, socket.clone());
                        cancel_key = Some(k);
                    })?;
                if cut > start {
                    client_write.write_all(&buf[start..cut]).await?;
                    client_write.flush().await?;
                    self.metrics
                        .bytes_compute_to_client
                        .inc_by((cut - start) as u64);
                    start = cut;
                }
                if start == end {
                    (start, end) = (0, 0);
                } else if end == buf.len() {
                    buf.copy_within(start..end, 0);
                    end -= start;
                    start = 0;
                }
                let n = server_read.read(&mut buf[end..]).await?;
                if n == 0 {
                    return Ok::<_, std::io::Error>(());
                }
                end += n;
            }
        };
        let result = tokio::select! {
            r = upstream => r,
            r = downstream => r,
        };
        if let Some(k) = cancel_key {
            lock(&self.cancel_keys).remove(&k);
        }
        let message = lock(&control.message).clone();
        if let Some(msg) = &message {
            if !framer.in_message() {
                let _ = client_write.write_all(&error_response("57P01", msg)).await;
            }
        }
        let _ = client_write.shutdown().await;
        self.with_branch(&route.key, |s| {
            s.connections.remove(&conn_id);
        });
        drop(guard);
        if message.is_some() {
            return Ok(());
        }
        result
    }

    /// Compute to client, message by message: only whole messages are forwarded, so that a
    /// termination can end the stream with an ErrorResponse at a message boundary, and the
    /// BackendKeyData of the session is seen (for CancelRequests).
    ///
    /// With the kernel shortcut, the connection is joined when the first ReadyForQuery
    /// arrives, before it is forwarded: the client waits for it and the compute for a query,
    /// so no byte is in flight either way. While joined this thread sleeps in read(). Bytes
    /// arriving here again mean the kernel unjoined the pair (a bulk send, see
    /// [`shortcut`]); they start at a message boundary, because every send the kernel passed
    /// ended at one (PostgreSQL sends its buffer when it is full, 8 KiB, which is a bulk
    /// send, or at a message's end).
    fn relay_downstream(
        &self,
        mut server: ServerStream,
        mut client: std::net::TcpStream,
        first: Vec<u8>,
        socket: &std::path::Path,
        control: &ConnControl,
    ) -> std::io::Result<()> {
        use std::io::{Read, Write};
        let mut buf = vec![0u8; RELAY_BUFFER.max(first.len())];
        buf[..first.len()].copy_from_slice(&first);
        let (mut start, mut end) = (0usize, first.len());
        let mut framer = Framer::default();
        let mut cancel_key = None;
        let mut join_tried = false;
        let mut joined = false;
        let result = loop {
            let complete = framer.complete(&buf[start..end], buf.len(), |k| {
                lock(&self.cancel_keys).insert(k, socket.to_path_buf());
                cancel_key = Some(k);
            });
            let cut = match complete {
                Ok(n) => start + n,
                Err(e) => break Err(e),
            };
            if cut > start {
                if !join_tried && framer.ready_seen {
                    // Once, at the first ReadyForQuery, and only when it ends everything the
                    // compute sent: a later moment could have bytes of either side in flight.
                    join_tried = true;
                    if cut == end && ends_with_ready_for_query(&buf[start..cut]) {
                        joined = self.try_join(&client, &server, control);
                    }
                }
                if let Err(e) = client.write_all(&buf[start..cut]) {
                    break Err(e);
                }
                self.metrics
                    .bytes_compute_to_client
                    .inc_by((cut - start) as u64);
                start = cut;
            }
            if start == end {
                start = 0;
                end = 0;
            } else if end == buf.len() {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            match server.read(&mut buf[end..]) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    if joined {
                        joined = false;
                        drop(lock(&control.joined).take());
                    }
                    end += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        drop(lock(&control.joined).take());
        if let Some(k) = cancel_key {
            lock(&self.cancel_keys).remove(&k);
        }
        let message = lock(&control.message).clone();
        if let Some(msg) = message {
            // Ended on purpose (reset, delete): say why, at a message boundary. A termination
            // in the middle of a streamed message cannot be framed: the socket just closes.
            if !framer.in_message() {
                let _ = client.write_all(&error_response("57P01", &msg));
            }
        }
        let _ = client.shutdown(std::net::Shutdown::Both);
        let _ = server.shutdown(std::net::Shutdown::Both);
        match result {
            Err(e) if message_is_set(control) => {
                tracing::debug!(error = %e, "connection terminated");
                Ok(())
            }
            r => r,
        }
    }

    /// Joins the connection in the kernel, when the shortcut is on and the compute is reached
    /// over TCP. Not after a termination began.
    fn try_join(
        &self,
        client: &std::net::TcpStream,
        server: &ServerStream,
        control: &ConnControl,
    ) -> bool {
        let (Some(shortcut), ServerStream::Tcp(upstream)) = (&self.shortcut, server) else {
            return false;
        };
        let mut slot = lock(&control.joined);
        if message_is_set(control) {
            return false;
        }
        match shortcut.join(client, upstream) {
            Some(joined) => {
                *slot = Some(joined);
                self.metrics.shortcut_connections.inc();
                true
            }
            None => false,
        }
    }

    async fn forward_cancel(&self, pid: i32, secret: i32) -> std::io::Result<()> {
        let socket = lock(&self.cancel_keys).get(&(pid, secret)).cloned();
        // Unknown keys are ignored silently, as PostgreSQL does.
        if let Some(socket) = socket {
            let mut s = UnixStream::connect(&socket).await?;
            s.write_all(&encode_cancel(pid, secret)).await?;
            let mut sink = [0u8; 1];
            let _ = s.read(&mut sink).await;
        }
        Ok(())
    }

    fn open_connection(self: &Arc<Self>, key: &str) -> ConnectionGuard {
        self.with_branch(key, |s| {
            s.activity.open += 1;
            s.activity.last_change = Instant::now();
        });
        self.metrics.connections_open.inc();
        self.metrics.connections_total.inc();
        ConnectionGuard {
            proxy: self.clone(),
            key: key.to_string(),
        }
    }
}

/// Counts a connection as open until dropped.
struct ConnectionGuard {
    proxy: Arc<Proxy>,
    key: String,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.proxy.metrics.connections_open.dec();
        let mut branches = lock(&self.proxy.branches);
        if let Some(s) = branches.get_mut(&self.key) {
            s.activity.open = s.activity.open.saturating_sub(1);
            s.activity.last_change = Instant::now();
        }
    }
}
