//! The pagestore server: a long-lived process that owns the [`PagestoreDriver`] (the page store
//! and every FUSE mount) and serves the driver's calls over a Unix socket.
//!
//! Why a process of its own: a FUSE mount lives exactly as long as the process serving it. In
//! the daemon, a `kill -9` of the daemon aborted every mount, and every compute on the
//! pagestore died with `ENOTCONN`. Here the daemon only holds a [`PagestoreClient`]; the
//! server runs in its own session, outlives the daemon, and the next daemon reconnects to it.
//!
//! ```text
//! <root>/server/    0700 (only root may reach the socket)
//!   socket          the Unix socket: one JSON request and its response per line (see wire.rs)
//!   pid             the server's pid, written once it serves
//! ```
//!
//! The store's `LOCK` (flock) is taken before anything else, so a second server on the same
//! root fails at once instead of mounting twice. The server stops on a `shutdown` request or
//! on SIGTERM/SIGINT: it waits for the calls in flight, unmounts every timeline, removes its
//! socket and pid file, and exits.
//!
//! [`PagestoreClient`]: crate::PagestoreClient

use std::io::{self, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use parking_lot::{Condvar, Mutex, RwLock};
use stemma_storage::{Result, StorageDriver, StorageError};

use crate::driver::{DriverOptions, PagestoreDriver};
use crate::maintenance::{self, Maintainer, AFTER_DELETE, MAINTENANCE_EVERY};
use crate::wire::{self, Reply, Request, Response, WireError};

/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 32;
/// A connection idle for this long is closed (a client sends its request at once).
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// The directory of a root's server files.
pub fn server_dir(root: &Path) -> PathBuf {
    root.join("server")
}

/// The Unix socket of the server of `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    server_dir(root).join("socket")
}

/// The pid file of the server of `root`.
pub fn pid_path(root: &Path) -> PathBuf {
    server_dir(root).join("pid")
}

/// Parses `UID:GID` (the `--owner` argument of the server).
pub fn parse_owner(s: &str) -> std::result::Result<(u32, u32), String> {
    let parsed = s
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse().ok()?, g.parse().ok()?)));
    parsed.ok_or_else(|| format!("expected UID:GID (numbers), got {s:?}"))
}

fn maintenance_err(dir: &Path, e: stemma_pagestore::Error) -> StorageError {
    StorageError::Io {
        context: "maintenance of the page store",
        path: dir.to_path_buf(),
        source: io::Error::new(
            io::Error::from_raw_os_error(e.errno()).kind(),
            e.to_string(),
        ),
    }
}

fn io_err(context: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StorageError {
    let path = path.to_path_buf();
    move |source| StorageError::Io {
        context,
        path,
        source,
    }
}

enum Stop {
    Signal(Signal),
    Requested,
}

struct Shared {
    driver: PagestoreDriver,
    /// The page store's background GC and compaction.
    maintainer: Arc<Maintainer>,
    /// Calls hold it shared; shutdown takes it exclusive, so no call runs while (or after)
    /// the mounts go. `true` once stopped.
    stopped: RwLock<bool>,
    stop: Mutex<Option<mpsc::Sender<Stop>>>,
}

impl Shared {
    /// Unmounts everything, once; later calls are refused.
    fn shut_down(&self) {
        let mut stopped = self.stopped.write();
        if !*stopped {
            *stopped = true;
            self.maintainer.stop();
            tracing::info!("unmounting every timeline");
            self.driver.shutdown();
        }
    }
}

/// Runs the server of `root` until it is asked to stop. Blocks; meant to be the whole life
/// of a process (`stemma pagestore-server`), started by [`PagestoreClient`].
///
/// SIGTERM and SIGINT are handled by a thread of the server: call this before starting any
/// other thread, so that every thread inherits the blocked signal mask.
///
/// [`PagestoreClient`]: crate::PagestoreClient
/// Every FUSE worker thread (four per mounted timeline) allocates a zeroed 16 MiB request
/// buffer (fuser's), which costs nothing while it comes from fresh `mmap` pages that the
/// kernel only backs once touched. glibc's dynamic mmap threshold breaks that: once one such
/// buffer is freed (an unmount), later ones come from the heap, where `calloc` must write the
/// zeros, and each idle mounted branch then held about 25 MiB of the server's memory
/// (measured: 20 branches, +500 MiB). A fixed threshold keeps large allocations on `mmap`.
fn fixed_mmap_threshold() {
    // SAFETY: mallopt only changes the allocator's tuning; called before other threads start.
    let ok = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20) };
    if ok != 1 {
        tracing::warn!(
            "could not fix the allocator's mmap threshold; idle mounts may hold more memory"
        );
    }
}

pub fn run(root: &Path, owner: Option<(u32, u32)>, options: DriverOptions) -> Result<()> {
    let signals = {
        let mut s = SigSet::empty();
        s.add(Signal::SIGTERM);
        s.add(Signal::SIGINT);
        s
    };
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&signals), None)
        .map_err(|e| io_err("blocking SIGTERM and SIGINT", root)(e.into()))?;
    fixed_mmap_threshold();

    // The store's lock first (inside open): it proves that no other server owns the root.
    let driver = PagestoreDriver::open(root, owner, options)?;
    let dir = server_dir(root);
    std::fs::create_dir_all(&dir).map_err(io_err("creating the server directory", &dir))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting the mode of the server directory", &dir))?;
    let socket = socket_path(root);
    // A socket file left by a dead server: we hold the lock, so nobody listens on it.
    match std::fs::remove_file(&socket) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("removing a stale socket", &socket)(e)),
    }
    let listener = UnixListener::bind(&socket).map_err(io_err("listening on", &socket))?;
    let pid_file = pid_path(root);
    let tmp = pid_file.with_extension("tmp");
    std::fs::write(&tmp, format!("{}\n", std::process::id()))
        .and_then(|()| std::fs::rename(&tmp, &pid_file))
        .map_err(io_err("writing the pid file", &pid_file))?;

    let maintainer = Maintainer::start(driver.store().clone(), MAINTENANCE_EVERY)
        .map_err(io_err("starting the maintenance thread", root))?;
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        driver,
        maintainer,
        stopped: RwLock::new(false),
        stop: Mutex::new(Some(tx.clone())),
    });
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Ok(sig) = signals.wait() {
                let _ = tx.send(Stop::Signal(sig));
            }
        })
        .map_err(io_err("starting the signal thread", root))?;
    {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("accept".into())
            .spawn(move || accept_loop(listener, shared))
            .map_err(io_err("starting the accept thread", root))?;
    }
    tracing::info!(
        pid = std::process::id(),
        root = %root.display(),
        socket = %socket.display(),
        "pagestore server ready"
    );

    match rx.recv() {
        Ok(Stop::Signal(sig)) => tracing::info!(?sig, "stopping on a signal"),
        Ok(Stop::Requested) => tracing::info!("stopping as requested"),
        Err(_) => tracing::warn!("stop channel closed; stopping"),
    }
    shared.shut_down();
    for path in [&socket, &pid_file] {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove");
        }
    }
    tracing::info!("pagestore server stopped");
    Ok(())
}

fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let slots = Arc::new((Mutex::new(0usize), Condvar::new()));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        {
            let (n, cv) = &*slots;
            let mut n = n.lock();
            while *n >= MAX_CONNECTIONS {
                cv.wait(&mut n);
            }
            *n += 1;
        }
        let (shared, slots2) = (shared.clone(), slots.clone());
        let spawned = std::thread::Builder::new()
            .name("conn".into())
            .spawn(move || {
                if let Err(e) = serve_connection(conn, &shared) {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                let (n, cv) = &*slots2;
                *n.lock() -= 1;
                cv.notify_one();
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a connection thread");
            let (n, _) = &*slots;
            *n.lock() -= 1;
        }
    }
}

fn serve_connection(conn: UnixStream, shared: &Shared) -> io::Result<()> {
    conn.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let mut reader = BufReader::new(&conn);
    let mut writer = &conn;
    while let Some(line) = wire::read_frame(&mut reader)? {
        let req = match wire::parse::<Request>(&line) {
            Ok(req) => req,
            Err(e) => {
                // A client of another version, say: an answer it can show, not a hang-up.
                let refusal = StorageError::Unsupported(format!(
                    "the pagestore server (pid {}) does not understand this request ({e}); are the daemon and the server the same version? Stop them both with `stemma down`",
                    std::process::id()
                ));
                wire::write_line(&mut writer, &Response::Err(WireError::from(&refusal)))?;
                continue;
            }
        };
        if let Request::Shutdown = req {
            shared.shut_down();
            wire::write_line(&mut writer, &Response::Ok(Reply::Unit))?;
            if let Some(tx) = shared.stop.lock().take() {
                let _ = tx.send(Stop::Requested);
            }
            return Ok(());
        }
        let response = {
            let stopped = shared.stopped.read();
            if *stopped {
                Response::Err(WireError::from(&StorageError::Unsupported(
                    "the pagestore server is shutting down".into(),
                )))
            } else {
                match dispatch(shared, req) {
                    Ok(reply) => Response::Ok(reply),
                    Err(e) => Response::Err(WireError::from(&e)),
                }
            }
        };
        wire::write_line(&mut writer, &response)?;
    }
    Ok(())
}

fn dispatch(shared: &Shared, req: Request) -> Result<Reply> {
    use wire::id_from_wire as id;
    let d = &shared.driver;
    Ok(match req {
        Request::Ping => {
            // Through the store's lock: a store that is stuck must not look healthy to the
            // daemon's watchdog.
            let _ = d.store().last_lsn();
            Reply::Pong {
                pid: std::process::id(),
            }
        }
        Request::Describe => Reply::Text(d.describe()),
        Request::CreateEmpty { id: i } => Reply::Path(d.create_empty(&id(&i)?)?),
        Request::CloneTimeline {
            parent,
            child,
            filter,
        } => {
            d.clone_timeline(&id(&parent)?, &id(&child)?, &filter.into())?;
            Reply::Unit
        }
        Request::BranchAt {
            parent,
            child,
            at_secs,
            at_nanos,
            filter,
        } => {
            let at = wire::time_from_wire(at_secs, at_nanos);
            d.branch_at(&id(&parent)?, &id(&child)?, at, &filter.into())?;
            Reply::Unit
        }
        Request::WriteFile {
            id: i,
            path,
            contents,
        } => {
            d.write_file(&id(&i)?, &path, &contents)?;
            Reply::Unit
        }
        Request::RemoveFile { id: i, path } => {
            d.remove_file(&id(&i)?, &path)?;
            Reply::Unit
        }
        Request::Exists { id: i } => Reply::Bool(d.exists(&id(&i)?)),
        Request::SyncTimeline { id: i } => {
            d.sync_timeline(&id(&i)?)?;
            Reply::Unit
        }
        Request::Delete { id: i } => {
            d.delete(&id(&i)?)?;
            // Its pages are garbage now: give the space back soon.
            shared.maintainer.poke(AFTER_DELETE);
            Reply::Unit
        }
        Request::Maintain => {
            let store = d.store();
            let r = store
                .maintain()
                .map_err(|e| maintenance_err(store.dir(), e))?;
            maintenance::log_report(&r);
            Reply::Maintained((&r).into())
        }
        Request::List => Reply::Ids(d.list()?.iter().map(|t| t.to_string()).collect()),
        Request::Usage { id: i } => {
            let u = d.usage(&id(&i)?)?;
            Reply::Usage {
                logical: u.logical_size_bytes,
                own: u.own_storage_bytes,
            }
        }
        Request::Shutdown => Reply::Unit,
    })
}
