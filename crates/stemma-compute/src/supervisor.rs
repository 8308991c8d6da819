//! Keeps the computes that should run running.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::process::{
    is_live_postmaster, log_tail, read_postmaster_pid, spawn_postgres, stop_postmaster, wait_ready,
};
use crate::{ComputeError, ComputeUser, PgInstall, Result};

/// How long a compute may take to accept connections (crash recovery included).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Restart backoff after a compute dies: doubles from the first value up to the second.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How often the monitor looks at every compute.
const MONITOR_INTERVAL: Duration = Duration::from_millis(500);

/// Everything needed to run one compute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeSpec {
    /// A stable key (the control plane uses the branch's id): survives renames.
    pub key: String,
    /// A human name for logs and errors (the branch name).
    pub label: String,
    pub data_dir: PathBuf,
    /// The compute listens on a Unix socket in this directory (created, owned by the
    /// compute's user), and on `listen_ip` if set; clients reach it through the proxy.
    pub socket_dir: PathBuf,
    /// The port number in the socket's name (`.s.PGSQL.<port>`), and of the TCP address.
    pub port: u16,
    /// A loopback address of its own where the compute also listens on TCP (`port`), for the
    /// proxy's kernel shortcut (which works between TCP sockets only). When the address
    /// cannot be bound, the compute listens on its Unix socket alone.
    pub listen_ip: Option<std::net::Ipv4Addr>,
    /// `-c name=value` settings.
    pub settings: BTreeMap<String, String>,
    pub log_path: PathBuf,
    /// The OS user to run as, when not the supervisor's (computes of one subtree of branches
    /// can be kept apart from the others' files this way).
    pub user: Option<ComputeUser>,
}

impl ComputeSpec {
    /// The path of the compute's Unix socket.
    pub fn socket_path(&self) -> PathBuf {
        self.socket_dir.join(format!(".s.PGSQL.{}", self.port))
    }
}

/// A postgres process this daemon spawned. It must be reaped once it exits, or it stays a
/// zombie: whoever drops one that may still run hands it to a thread that waits for it.
/// (Checking /proc alone is not enough: an exiting process reads as gone before it is a
/// zombie, and its exit status must still be collected.)
#[derive(Default)]
struct OwnedChild(Option<std::process::Child>);

impl OwnedChild {
    /// Collects the exit status if the process exited; returns whether it did.
    fn try_reap(&mut self) -> bool {
        match self.0.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) | Some(Err(_)) => {
                self.0 = None;
                true
            }
            _ => false,
        }
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            if let Ok(None) = child.try_wait() {
                let spawned = std::thread::Builder::new()
                    .name("compute-reaper".into())
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        let _ = child.wait();
                    });
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start a thread to reap a compute");
                }
            }
        }
    }
}

/// A running compute, as reported to the control plane.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeInfo {
    pub key: String,
    pub label: String,
    pub pid: i32,
    pub port: u16,
    /// The Unix socket to connect to.
    pub socket_path: PathBuf,
    /// Its TCP address, when it listens on one.
    pub tcp_addr: Option<std::net::SocketAddr>,
    pub started_at: SystemTime,
    /// Restarts after unexpected exits since the daemon started.
    pub restarts: u32,
    /// Whether this daemon found the compute already running (after a daemon restart).
    pub adopted: bool,
}

struct Entry {
    spec: ComputeSpec,
    pid: Option<i32>,
    /// Present when this daemon spawned the process, so it must also reap it.
    child: OwnedChild,
    started_at: SystemTime,
    restarts: u32,
    adopted: bool,
    /// When set, the compute died and is restarted at this time.
    retry_at: Option<Instant>,
    /// Set once the compute accepts connections; until then it is not reported as running.
    ready: bool,
    backoff: Duration,
    last_error: Option<String>,
    /// Where it listens on TCP, if anywhere.
    tcp_addr: Option<std::net::SocketAddr>,
}

impl Entry {
    /// Reaps our child if it exited; returns whether the process is still alive.
    fn alive(&mut self) -> bool {
        let Some(pid) = self.pid else { return false };
        if self.child.try_reap() {
            return false;
        }
        is_live_postmaster(pid, &self.spec.data_dir)
    }
}

/// Runs (on a blocking thread) before every postgres process the supervisor spawns, first
/// starts and restarts alike; an error fails that start. The control plane makes the
/// storage durable here (see `StorageDriver::sync_timeline`).
pub type BeforeStart = Arc<dyn Fn(&ComputeSpec) -> std::result::Result<(), String> + Send + Sync>;

struct Inner {
    before_start: std::sync::OnceLock<BeforeStart>,
    install: PgInstall,
    user: Option<ComputeUser>,
    /// Keyed by [`ComputeSpec::key`]: only computes that should run are here.
    computes: Mutex<HashMap<String, Entry>>,
    /// Serialises starts and stops of one key, so concurrent callers start exactly one compute.
    key_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    starts: std::sync::atomic::AtomicU64,
}

/// Starts, adopts, restarts and stops computes. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl Supervisor {
    pub fn new(install: PgInstall, user: Option<ComputeUser>) -> Self {
        Supervisor {
            inner: Arc::new(Inner {
                before_start: std::sync::OnceLock::new(),
                install,
                user,
                computes: Mutex::new(HashMap::new()),
                key_locks: Mutex::new(HashMap::new()),
                starts: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Sets the hook run before every spawn (once; a second call is ignored).
    pub fn set_before_start(&self, hook: BeforeStart) {
        if self.inner.before_start.set(hook).is_err() {
            tracing::warn!("the supervisor's before-start hook was already set");
        }
    }

    pub fn install(&self) -> &PgInstall {
        &self.inner.install
    }

    pub fn user(&self) -> &Option<ComputeUser> {
        &self.inner.user
    }

    fn computes(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.inner
            .computes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn key_lock(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self
            .inner
            .key_locks
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        locks.entry(key.to_string()).or_default().clone()
    }

    /// Makes sure the compute of `spec` runs and accepts connections: adopts a postmaster that
    /// already serves the data directory, or starts one. Idempotent.
    pub async fn start(&self, spec: ComputeSpec) -> Result<ComputeInfo> {
        let lock = self.key_lock(&spec.key);
        let _guard = lock.lock().await;
        self.start_locked(spec).await
    }

    async fn start_locked(&self, spec: ComputeSpec) -> Result<ComputeInfo> {
        // Already running under this daemon?
        {
            let mut computes = self.computes();
            if let Some(e) = computes.get_mut(&spec.key) {
                if e.retry_at.is_none() && e.ready && e.spec == spec && e.alive() {
                    return Ok(info(e));
                }
            }
        }
        let restarts = self
            .computes()
            .get(&spec.key)
            .map(|e| e.restarts)
            .unwrap_or(0);
        // Running from before a daemon restart? postmaster.pid is the truth.
        if let Some(pm) = read_postmaster_pid(&spec.data_dir) {
            if is_live_postmaster(pm.pid, &spec.data_dir) {
                if pm.port == spec.port && pm.socket_dir == spec.socket_dir {
                    tracing::info!(compute = %spec.label, pid = pm.pid, "adopting running compute");
                    let mut entry = new_entry(spec.clone(), pm.pid, None, restarts);
                    entry.adopted = true;
                    // What it listens on was decided when it started (perhaps by an older
                    // daemon): postmaster.pid says.
                    entry.tcp_addr = spec.listen_ip.and_then(|ip| {
                        (pm.listen_address == ip.to_string())
                            .then(|| std::net::SocketAddr::from((ip, spec.port)))
                    });
                    let out = info(&entry);
                    self.computes().insert(spec.key.clone(), entry);
                    if pm.status != "ready" && pm.status != "standby" {
                        self.wait_started(&spec, pm.pid).await?;
                    }
                    self.mark_ready(&spec.key);
                    return Ok(out);
                }
                // Settings changed (another port): restart it with the new ones.
                stop_postmaster(pm.pid, &spec.data_dir, || false).await;
            }
        }
        if let Some(hook) = self.inner.before_start.get().cloned() {
            let s = spec.clone();
            let r = tokio::task::spawn_blocking(move || hook(&s))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            if let Err(reason) = r {
                return Err(ComputeError::StartFailed {
                    label: spec.label.clone(),
                    reason: format!("preparing its storage: {reason}"),
                });
            }
        }
        let user = spec.user.clone().or_else(|| self.inner.user.clone());
        self.prepare_socket_dir(&spec.socket_dir, &user)?;
        let mut tcp_addr = spec.listen_ip.and_then(|ip| {
            let addr = std::net::SocketAddr::from((ip, spec.port));
            // PostgreSQL refuses to start when it can bind none of its listen_addresses.
            match std::net::TcpListener::bind(addr) {
                Ok(_) => Some(addr),
                Err(e) => {
                    tracing::warn!(compute = %spec.label, %addr, error = %e, "the compute's TCP address is taken; it listens on its Unix socket only");
                    None
                }
            }
        });
        // Bounded: a second attempt only without TCP.
        let out = loop {
            let mut settings = spec.settings.clone();
            settings.insert(
                "listen_addresses".into(),
                tcp_addr.map(|a| a.ip().to_string()).unwrap_or_default(),
            );
            settings.insert(
                "unix_socket_directories".into(),
                spec.socket_dir.display().to_string(),
            );
            let child = spawn_postgres(
                &self.inner.install,
                &user,
                &spec.data_dir,
                spec.port,
                &settings,
                &spec.log_path,
            )?;
            self.inner
                .starts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let pid = child.id() as i32;
            tracing::info!(compute = %spec.label, pid, port = spec.port, "starting compute");
            let mut entry = new_entry(spec.clone(), pid, Some(child), restarts);
            entry.tcp_addr = tcp_addr;
            let out = info(&entry);
            self.computes().insert(spec.key.clone(), entry);
            match self.wait_started(&spec, pid).await {
                Ok(()) => break out,
                Err(e) => {
                    // Leave nothing half started.
                    let reap = self.reaper(&spec.key);
                    stop_postmaster(pid, &spec.data_dir, reap).await;
                    self.computes().remove(&spec.key);
                    // The address was free when probed and taken before PostgreSQL bound it
                    // (another program, or another daemon's compute): start on the Unix
                    // socket alone.
                    let log = std::fs::read_to_string(&spec.log_path).unwrap_or_default();
                    if tcp_addr.is_some() && log.contains("could not create any TCP/IP sockets") {
                        tracing::warn!(compute = %spec.label, "the compute's TCP address was taken while it started; starting it on its Unix socket only");
                        tcp_addr = None;
                        continue;
                    }
                    return Err(e);
                }
            }
        };
        self.mark_ready(&spec.key);
        Ok(out)
    }

    /// The socket directory, private to the compute's user. Unix socket paths are limited to
    /// 107 bytes, so a long data directory path is refused here with a clear error.
    fn prepare_socket_dir(&self, dir: &std::path::Path, user: &Option<ComputeUser>) -> Result<()> {
        let path_len = dir.as_os_str().len() + ".s.PGSQL.65535".len() + 1;
        if path_len > 107 {
            return Err(ComputeError::Failed(format!(
                "the socket directory {} is too long for a Unix socket ({path_len} > 107 bytes); choose a shorter data directory",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(ComputeError::io(format!("creating {}", dir.display())))?;
        if let Some(u) = user {
            std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid)).map_err(ComputeError::io(
                format!("handing {} to the compute user", dir.display()),
            ))?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            ComputeError::io(format!("setting the mode of {}", dir.display())),
        )?;
        Ok(())
    }

    /// Records that the running compute of `key` now matches `spec` (a setting that only
    /// mattered for its first start, and that it no longer uses), so that later starts adopt
    /// it as it is and a restart uses `spec`.
    pub fn set_spec(&self, key: &str, spec: ComputeSpec) {
        if let Some(e) = self.computes().get_mut(key) {
            e.spec = spec;
        }
    }

    /// How many computes this supervisor has spawned (restarts included).
    pub fn starts(&self) -> u64 {
        self.inner.starts.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn mark_ready(&self, key: &str) {
        if let Some(e) = self.computes().get_mut(key) {
            e.ready = true;
        }
    }

    async fn wait_started(&self, spec: &ComputeSpec, pid: i32) -> Result<()> {
        let exited = self.reaper(&spec.key);
        let data_dir = spec.data_dir.clone();
        let mut exited = exited;
        let result = wait_ready(pid, &spec.data_dir, START_TIMEOUT, move || {
            exited() || !is_live_postmaster(pid, &data_dir)
        })
        .await;
        result.map_err(|reason| {
            let tail = log_tail(&spec.log_path, 8);
            ComputeError::StartFailed {
                label: spec.label.clone(),
                reason: format!("{reason}; log {}:\n{tail}", spec.log_path.display()),
            }
        })
    }

    /// A closure that reaps the child of `key` if it exited, returning whether it did.
    fn reaper(&self, key: &str) -> impl FnMut() -> bool + use<> {
        let this = self.clone();
        let key = key.to_string();
        move || {
            let mut computes = this.computes();
            match computes.get_mut(&key) {
                Some(e) => e.child.try_reap(),
                _ => false,
            }
        }
    }

    /// Stops the compute of `key` cleanly (fast shutdown) and forgets it. `data_dir` is used
    /// when this daemon does not know the compute (a leftover from a previous run).
    pub async fn stop(&self, key: &str, data_dir: &std::path::Path) -> Result<()> {
        let lock = self.key_lock(key);
        let _guard = lock.lock().await;
        // The entry stays (reported as running) until the process is gone.
        let found = self
            .computes()
            .get_mut(key)
            .map(|e| (e.pid, e.spec.data_dir.clone(), std::mem::take(&mut e.child)));
        let (pid, dir, mut child) = match found {
            Some(x) => x,
            None => (
                read_postmaster_pid(data_dir).map(|p| p.pid),
                data_dir.to_path_buf(),
                OwnedChild::default(),
            ),
        };
        if let Some(pid) = pid {
            stop_postmaster(pid, &dir, || child.try_reap()).await;
            tracing::info!(key, pid, "compute stopped");
        }
        self.computes().remove(key);
        Ok(())
    }

    /// The running compute of `key`, if any.
    pub fn info(&self, key: &str) -> Option<ComputeInfo> {
        let mut computes = self.computes();
        let e = computes.get_mut(key)?;
        (e.retry_at.is_none() && e.ready && e.alive()).then(|| info(e))
    }

    /// Every running compute.
    pub fn list(&self) -> Vec<ComputeInfo> {
        let mut computes = self.computes();
        let mut out: Vec<ComputeInfo> = computes
            .values_mut()
            .filter_map(|e| (e.retry_at.is_none() && e.ready && e.alive()).then(|| info(e)))
            .collect();
        out.sort_by(|a, b| a.label.cmp(&b.label));
        out
    }

    /// The last start error of a compute that should run but does not.
    pub fn last_error(&self, key: &str) -> Option<String> {
        self.computes().get(key).and_then(|e| e.last_error.clone())
    }

    /// Stops every compute (daemon shutdown).
    pub async fn stop_all(&self) {
        let keys: Vec<(String, PathBuf)> = self
            .computes()
            .iter()
            .map(|(k, e)| (k.clone(), e.spec.data_dir.clone()))
            .collect();
        // PostgreSQL's fast shutdown writes a checkpoint: stop all computes together.
        let mut set = tokio::task::JoinSet::new();
        for (key, dir) in keys {
            let this = self.clone();
            set.spawn(async move { this.stop(&key, &dir).await });
        }
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "stopping a compute"),
                Err(e) => tracing::warn!(error = %e, "stopping a compute panicked"),
            }
        }
    }

    /// One pass of the monitor: finds computes that died and restarts those whose backoff ran
    /// out. Returns how many were restarted. [`Supervisor::run_monitor`] calls it periodically.
    pub async fn check_once(&self) -> usize {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut computes = self.computes();
            for (key, e) in computes.iter_mut() {
                match e.retry_at {
                    None => {
                        if e.ready && !e.alive() {
                            e.restarts += 1;
                            e.ready = false;
                            e.retry_at = Some(now + e.backoff);
                            tracing::warn!(
                                compute = %e.spec.label,
                                restarts = e.restarts,
                                backoff_ms = e.backoff.as_millis() as u64,
                                "compute exited unexpectedly; restarting after backoff"
                            );
                        }
                    }
                    Some(at) if at <= now => due.push((key.clone(), e.spec.clone())),
                    Some(_) => {}
                }
            }
        }
        let mut restarted = 0;
        for (key, spec) in due {
            let lock = self.key_lock(&key);
            let _guard = lock.lock().await;
            // It may have been stopped meanwhile.
            if !self.computes().contains_key(&key) {
                continue;
            }
            match self.start_locked(spec.clone()).await {
                Ok(_) => {
                    restarted += 1;
                    if let Some(e) = self.computes().get_mut(&key) {
                        e.last_error = None;
                    }
                }
                Err(err) => {
                    tracing::error!(compute = %spec.label, error = %err, "restart failed");
                    let mut computes = self.computes();
                    let e = computes
                        .entry(key)
                        .or_insert_with(|| new_entry(spec, 0, None, 0));
                    e.pid = None;
                    e.backoff = (e.backoff * 2).min(BACKOFF_MAX);
                    e.retry_at = Some(Instant::now() + e.backoff);
                    e.last_error = Some(err.to_string());
                }
            }
        }
        restarted
    }

    /// Runs the monitor until `shutdown` resolves.
    pub async fn run_monitor(self, shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut shutdown = shutdown;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(MONITOR_INTERVAL) => { self.check_once().await; }
                _ = shutdown.changed() => return,
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }
}

fn new_entry(
    spec: ComputeSpec,
    pid: i32,
    child: Option<std::process::Child>,
    restarts: u32,
) -> Entry {
    let child = OwnedChild(child);
    Entry {
        spec,
        pid: Some(pid),
        child,
        started_at: SystemTime::now(),
        restarts,
        adopted: false,
        retry_at: None,
        ready: false,
        backoff: BACKOFF_MIN,
        last_error: None,
        tcp_addr: None,
    }
}

fn info(e: &Entry) -> ComputeInfo {
    ComputeInfo {
        key: e.spec.key.clone(),
        label: e.spec.label.clone(),
        pid: e.pid.unwrap_or(0),
        port: e.spec.port,
        socket_path: e.spec.socket_path(),
        tcp_addr: e.tcp_addr,
        started_at: e.started_at,
        restarts: e.restarts,
        adopted: e.adopted,
    }
}
