//! [`PagestoreClient`]: the `pagestore` [`StorageDriver`] as the daemon sees it, forwarding
//! every call to the pagestore server (see `server.rs`), which it starts when none runs.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{self, BufReader, ErrorKind};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use stemma_storage::{
    Capabilities, CloneFilter, Result, StorageDriver, StorageError, TimelineId, Usage,
};

use crate::driver::{mount_point, CAPABILITIES};
use crate::server::socket_path;
use crate::wire::{self, MaintenanceSummary, Reply, Request, Response};

/// How long a new server may take to open the store (it replays the log) and mount.
const START_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one call may wait for its answer. Calls are short (metadata, a mount, an
/// unmount that waits at most a few seconds); a server that takes longer is stuck.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the watchdog checks that the server runs.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long a ping waits when looking for a running server.
const PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watchdog asks a running server to answer. The answer takes the store's
/// lock, so a server whose store is stuck (a deadlock, a disk that no longer answers) stops
/// answering, not only one whose process is gone.
const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a running server may leave the watchdog's pings unanswered before it counts as
/// hung: it is then killed and started again, like a dead one. Long, because that stops
/// every compute on the pagestore for a few seconds; `STEMMA_PAGESTORE_HANG_TIMEOUT`
/// (seconds) overrides it (tests).
const HANG_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest wait between two attempts to start a server that keeps failing.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a shutdown waits for the server process to exit after it answered.
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start the server of a pagestore root, and where it logs.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// The program, e.g. the `stemma` executable.
    pub program: PathBuf,
    /// Arguments before the server's own (`["pagestore-server"]`, with `--retention` when
    /// one was given); then come
    /// `--root ROOT [--owner UID:GID]`.
    pub args: Vec<OsString>,
    /// The driver's root: `<root>/store`, `<root>/mnt`, `<root>/server`.
    pub root: PathBuf,
    /// The computes' uid/gid (owner of new timelines' root directories).
    pub owner: Option<(u32, u32)>,
    /// The server's stdout and stderr (appended).
    pub log: PathBuf,
}

impl ServerSpec {
    /// The command that starts the server: its own session (setsid), so that neither a
    /// signal to the daemon's process group nor the daemon's death reaches it; stdin from
    /// /dev/null, output to the log; working directory `/`, so it pins no directory.
    pub fn command(&self) -> io::Result<Command> {
        if let Some(dir) = self.log.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = Command::new(program_path(&self.program));
        cmd.args(&self.args).arg("--root").arg(&self.root);
        if let Some((uid, gid)) = self.owner {
            cmd.arg("--owner").arg(format!("{uid}:{gid}"));
        }
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .current_dir("/");
        // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| nix::unistd::setsid().map(drop).map_err(io::Error::from));
        }
        Ok(cmd)
    }
}

/// `program`, or, when it is the path of an executable replaced since this process started
/// (`current_exe()` then ends with " (deleted)"), the new file at the original path: an
/// upgrade of the package must not stop a dead server from being started again.
fn program_path(program: &Path) -> PathBuf {
    if !program.exists() {
        if let Some(name) = program.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            return PathBuf::from(name);
        }
    }
    program.to_path_buf()
}

/// The `pagestore` driver seen from the daemon: every call goes to the pagestore server over
/// its Unix socket (one connection per call, so concurrent calls need no coordination here;
/// the server serializes what must be). Errors keep their [`StorageError`] variant.
///
/// Dropping the client leaves the server running (that is the point: computes keep their
/// data directories); [`PagestoreClient::shutdown_server`] stops it.
pub struct PagestoreClient {
    spec: ServerSpec,
    socket: PathBuf,
    /// The server's pid.
    pid: AtomicU32,
    /// The server process when this process started it: it must reap it.
    child: Mutex<Option<Child>>,
    /// Set by [`PagestoreClient::shutdown_server`]: the watchdog restarts nothing after it.
    stopping: AtomicBool,
    /// Held while the server is started again or shut down, so the two never overlap.
    lifecycle: Mutex<()>,
}

impl PagestoreClient {
    /// Connects to the running server of `spec.root`; fails when none answers.
    pub fn connect(spec: ServerSpec) -> Result<Self> {
        let socket = socket_path(&spec.root);
        let pid = ping(&socket, PING_TIMEOUT).map_err(|e| StorageError::Io {
            context: "connecting to the pagestore server",
            path: socket.clone(),
            source: e,
        })?;
        Ok(PagestoreClient {
            spec,
            socket,
            pid: AtomicU32::new(pid),
            child: Mutex::new(None),
            stopping: AtomicBool::new(false),
            lifecycle: Mutex::new(()),
        })
    }

    /// Connects to the server of `spec.root` when one runs (a daemon restarted after a
    /// crash), else starts one and waits until it serves (it has then mounted every
    /// timeline). A watchdog thread then starts a new server whenever this one dies, until
    /// [`PagestoreClient::shutdown_server`].
    pub fn connect_or_start(spec: ServerSpec) -> Result<Arc<Self>> {
        let socket = socket_path(&spec.root);
        let (pid, child) = match ping(&socket, PING_TIMEOUT) {
            Ok(pid) => {
                tracing::info!(pid, socket = %socket.display(), "reconnected to the running pagestore server");
                (pid, None)
            }
            Err(_) => start_server(&spec, &socket)?,
        };
        let client = Arc::new(PagestoreClient {
            spec,
            socket,
            pid: AtomicU32::new(pid),
            child: Mutex::new(child),
            stopping: AtomicBool::new(false),
            lifecycle: Mutex::new(()),
        });
        client.spawn_watchdog();
        Ok(client)
    }

    /// Watches the server; when it dies (its mounts died with it, and the computes on them
    /// stop), starts a new one, which detaches the dead mounts and mounts every timeline
    /// again, so that the compute monitor's restarts find their data directories. Holds
    /// only a weak reference: it ends with the client, or at shutdown.
    fn spawn_watchdog(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("pagestore-watchdog".into())
            .spawn(move || {
                let hang_timeout = hang_timeout();
                let mut wait = WATCH_INTERVAL;
                let mut last_check = Instant::now();
                let mut last_answer = Instant::now();
                loop {
                    std::thread::sleep(wait);
                    let Some(client) = weak.upgrade() else {
                        return;
                    };
                    if client.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    if client.server_alive() {
                        wait = WATCH_INTERVAL;
                        if last_check.elapsed() >= HEALTH_INTERVAL {
                            last_check = Instant::now();
                            client.check_health(hang_timeout, &mut last_answer);
                        }
                        continue;
                    }
                    let _lifecycle = client.lifecycle.lock();
                    if client.stopping.load(Ordering::SeqCst) {
                        return;
                    }
                    tracing::error!(
                        pid = client.server_pid(),
                        log = %client.spec.log.display(),
                        "the pagestore server died, and with it the data directories of the computes on the pagestore; starting a new one"
                    );
                    match start_server(&client.spec, &client.socket) {
                        Ok((pid, child)) => {
                            client.pid.store(pid, Ordering::SeqCst);
                            *client.child.lock() = child;
                            wait = WATCH_INTERVAL;
                            last_answer = Instant::now();
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "could not start a new pagestore server; trying again");
                            wait = (wait * 2).min(RESTART_BACKOFF_MAX);
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the pagestore server's watchdog: a dead server will not be restarted");
        }
    }

    /// Pings the running server; when it has answered nothing for `hang_timeout`, kills it
    /// (SIGKILL), so that the watchdog starts a new one as for a server that died.
    fn check_health(&self, hang_timeout: Duration, last_answer: &mut Instant) {
        match ping(&self.socket, hang_timeout) {
            Ok(_) => *last_answer = Instant::now(),
            Err(e) => {
                let silent = last_answer.elapsed();
                let pid = self.server_pid();
                if silent < hang_timeout {
                    tracing::warn!(pid, error = %e, silent_s = silent.as_secs(), "the pagestore server did not answer a ping");
                    return;
                }
                let _lifecycle = self.lifecycle.lock();
                if self.stopping.load(Ordering::SeqCst) || !self.server_alive() {
                    return;
                }
                tracing::error!(
                    pid,
                    error = %e,
                    silent_s = silent.as_secs(),
                    log = %self.spec.log.display(),
                    "the pagestore server runs but has not answered for too long (hung): killing it so that a new one takes over"
                );
                if let Err(e) = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                ) {
                    tracing::error!(pid, error = %e, "cannot kill the hung pagestore server");
                }
            }
        }
    }

    /// Whether this process started the server (rather than reconnecting to one that ran).
    pub fn started_here(&self) -> bool {
        self.child.lock().is_some()
    }

    /// The server's pid.
    pub fn server_pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.spec.log
    }

    /// Asks the server to unmount every timeline and exit, and waits until it has exited.
    /// Stop the computes first: a busy mount is only detached. A server that is already
    /// gone is not an error.
    pub fn shutdown_server(&self) -> Result<()> {
        self.stopping.store(true, Ordering::SeqCst);
        let _lifecycle = self.lifecycle.lock();
        let pid = self.server_pid();
        if !self.server_alive() {
            tracing::warn!(pid, "the pagestore server was not running");
            return Ok(());
        }
        self.call(&Request::Shutdown)?;
        if pid == std::process::id() {
            // A server on a thread of this process (tests): it has unmounted everything.
            return Ok(());
        }
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while self.server_alive() {
            if Instant::now() > deadline {
                return Err(self.log_error(io::Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the pagestore server (pid {}) unmounted everything but did not exit within {}s",
                        pid,
                        EXIT_TIMEOUT.as_secs()
                    ),
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!(pid, "the pagestore server stopped");
        Ok(())
    }

    /// Whether the server process still runs (reaping it when this process started it).
    pub fn server_alive(&self) -> bool {
        if let Some(child) = self.child.lock().as_mut() {
            return matches!(child.try_wait(), Ok(None));
        }
        pid_alive(self.server_pid())
    }

    fn log_error(&self, source: io::Error) -> StorageError {
        StorageError::Io {
            context: "the pagestore server failed; see its log",
            path: self.spec.log.clone(),
            source,
        }
    }

    /// One request, one response, on a connection of its own.
    fn call(&self, req: &Request) -> Result<Reply> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| {
            let pid = self.server_pid();
            self.log_error(io::Error::new(
                e.kind(),
                format!(
                    "cannot reach the pagestore server (pid {pid}) at {}: {e}",
                    self.socket.display()
                ),
            ))
        })?;
        let lost = |e: io::Error| {
            self.log_error(io::Error::new(
                e.kind(),
                format!("the pagestore server connection failed: {e}"),
            ))
        };
        stream.set_read_timeout(Some(CALL_TIMEOUT)).map_err(lost)?;
        wire::write_line(&mut &stream, req).map_err(lost)?;
        match wire::read_line::<Response>(&mut BufReader::new(&stream)).map_err(lost)? {
            Some(Response::Ok(reply)) => Ok(reply),
            Some(Response::Err(e)) => Err(e.into()),
            None => Err(self.log_error(io::Error::new(
                ErrorKind::UnexpectedEof,
                "the pagestore server closed the connection without an answer (did it die?)",
            ))),
        }
    }

    /// Runs the page store's maintenance (GC, compaction, checkpoint) now, in the server, and
    /// says what it gave back. The server also runs it on its own, periodically and after a
    /// deletion.
    pub fn maintain(&self) -> Result<MaintenanceSummary> {
        match self.call(&Request::Maintain)? {
            Reply::Maintained(s) => Ok(s),
            other => Err(self.unexpected(other)),
        }
    }

    fn unexpected(&self, reply: Reply) -> StorageError {
        self.log_error(io::Error::new(
            ErrorKind::InvalidData,
            format!("unexpected answer from the pagestore server: {reply:?}"),
        ))
    }

    fn call_unit(&self, req: &Request) -> Result<()> {
        match self.call(req)? {
            Reply::Unit => Ok(()),
            other => Err(self.unexpected(other)),
        }
    }
}

/// Starts a server and waits until it answers; returns its pid, and the child to reap (none
/// when another server, started meanwhile by someone else, answered first).
fn start_server(spec: &ServerSpec, socket: &Path) -> Result<(u32, Option<Child>)> {
    let log_err = |e: io::Error| StorageError::Io {
        context: "starting the pagestore server (its log)",
        path: spec.log.clone(),
        source: e,
    };
    let mut child = spec
        .command()
        .and_then(|mut c| c.spawn())
        .map_err(log_err)?;
    let pid = child.id();
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(p) = ping(socket, PING_TIMEOUT) {
            if p != pid {
                // Another server won the race to the store's lock; ours exits by itself.
                tracing::warn!(
                    pid = p,
                    "another pagestore server started meanwhile; using it"
                );
                reap_in_background(child);
                return Ok((p, None));
            }
            tracing::info!(pid, log = %spec.log.display(), "started the pagestore server");
            return Ok((pid, Some(child)));
        }
        if let Some(status) = child.try_wait().map_err(log_err)? {
            return Err(log_err(io::Error::other(format!(
                "the server exited during start ({status}); the end of its log:\n{}",
                log_tail(&spec.log)
            ))));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(log_err(io::Error::new(
                ErrorKind::TimedOut,
                format!(
                    "the server did not answer within {}s; the end of its log:\n{}",
                    START_TIMEOUT.as_secs(),
                    log_tail(&spec.log)
                ),
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The hang timeout: [`HANG_TIMEOUT`] unless `STEMMA_PAGESTORE_HANG_TIMEOUT` says otherwise.
fn hang_timeout() -> Duration {
    match std::env::var("STEMMA_PAGESTORE_HANG_TIMEOUT") {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => {
                tracing::warn!(value = %v, "STEMMA_PAGESTORE_HANG_TIMEOUT is not a positive number of seconds; using the default");
                HANG_TIMEOUT
            }
        },
        Err(_) => HANG_TIMEOUT,
    }
}

/// Asks the server at `socket` for its pid, waiting at most `timeout` for the answer; fails
/// when none answers.
fn ping(socket: &Path, timeout: Duration) -> io::Result<u32> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    wire::write_line(&mut &stream, &Request::Ping)?;
    match wire::read_line::<Response>(&mut BufReader::new(&stream))? {
        Some(Response::Ok(Reply::Pong { pid })) => Ok(pid),
        other => Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("unexpected answer to a ping: {other:?}"),
        )),
    }
}

/// Whether `pid` is a live process (a zombie is not).
fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    !stat
        .rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'))
}

fn reap_in_background(mut child: Child) {
    let _ = std::thread::Builder::new()
        .name("reap-server".into())
        .spawn(move || {
            let _ = child.wait();
        });
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

impl StorageDriver for PagestoreClient {
    fn name(&self) -> &'static str {
        "pagestore"
    }

    fn describe(&self) -> String {
        let pid = self.server_pid();
        match self.call(&Request::Describe) {
            Ok(Reply::Text(t)) => format!(
                "{t}; served by the pagestore server (pid {pid}, log {}), which outlives the daemon",
                self.spec.log.display()
            ),
            Ok(other) => format!("pagestore: {}", self.unexpected(other)),
            Err(e) => format!("pagestore: the server does not answer: {e}"),
        }
    }

    fn capabilities(&self) -> Capabilities {
        CAPABILITIES
    }

    fn create_empty(&self, id: &TimelineId) -> Result<PathBuf> {
        match self.call(&Request::CreateEmpty { id: id.to_string() })? {
            Reply::Path(p) => Ok(p),
            other => Err(self.unexpected(other)),
        }
    }

    fn clone_timeline(
        &self,
        parent: &TimelineId,
        child: &TimelineId,
        filter: &CloneFilter,
    ) -> Result<()> {
        self.call_unit(&Request::CloneTimeline {
            parent: parent.to_string(),
            child: child.to_string(),
            filter: filter.into(),
        })
    }

    fn branch_at(
        &self,
        parent: &TimelineId,
        child: &TimelineId,
        at: SystemTime,
        filter: &CloneFilter,
    ) -> Result<()> {
        let (at_secs, at_nanos) = wire::time_to_wire(at)?;
        self.call_unit(&Request::BranchAt {
            parent: parent.to_string(),
            child: child.to_string(),
            at_secs,
            at_nanos,
            filter: filter.into(),
        })
    }

    fn write_file(&self, id: &TimelineId, relative: &Path, contents: &[u8]) -> Result<()> {
        self.call_unit(&Request::WriteFile {
            id: id.to_string(),
            path: relative.to_path_buf(),
            contents: contents.to_vec(),
        })
    }

    fn remove_file(&self, id: &TimelineId, relative: &Path) -> Result<()> {
        self.call_unit(&Request::RemoveFile {
            id: id.to_string(),
            path: relative.to_path_buf(),
        })
    }

    fn data_dir(&self, id: &TimelineId) -> PathBuf {
        mount_point(&self.spec.root, id)
    }

    fn sync_timeline(&self, id: &TimelineId) -> Result<()> {
        self.call_unit(&Request::SyncTimeline { id: id.to_string() })
    }

    fn exists(&self, id: &TimelineId) -> bool {
        match self.call(&Request::Exists { id: id.to_string() }) {
            Ok(Reply::Bool(b)) => b,
            Ok(other) => {
                tracing::error!(error = %self.unexpected(other), "exists");
                false
            }
            Err(e) => {
                tracing::error!(timeline = %id, error = %e, "cannot ask the pagestore server whether a timeline exists");
                false
            }
        }
    }

    fn delete(&self, id: &TimelineId) -> Result<()> {
        self.call_unit(&Request::Delete { id: id.to_string() })
    }

    fn list(&self) -> Result<Vec<TimelineId>> {
        match self.call(&Request::List)? {
            Reply::Ids(ids) => ids.iter().map(|s| wire::id_from_wire(s)).collect(),
            other => Err(self.unexpected(other)),
        }
    }

    fn usage(&self, id: &TimelineId) -> Result<Usage> {
        match self.call(&Request::Usage { id: id.to_string() })? {
            Reply::Usage { logical, own } => Ok(wire::usage_from_wire(logical, own)),
            other => Err(self.unexpected(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_executable_is_found_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("stemma");
        std::fs::write(&exe, b"").unwrap();
        let deleted = PathBuf::from(format!("{} (deleted)", exe.display()));
        assert_eq!(program_path(&deleted), exe);
        assert_eq!(program_path(&exe), exe);
        let missing = dir.path().join("other");
        assert_eq!(program_path(&missing), missing);
    }
}
