//! Branch operations: the one place where metadata, storage and computes meet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use chrono::{DateTime, Utc};
use stemma_api::{self as api, BranchState};
use stemma_compute::{ComputeSpec, OnlineBackup, SessionTarget, Supervisor};
use stemma_proxy::Proxy;
use stemma_storage::{CloneConsistency, CloneFilter, StorageDriver, TimelineId, Usage};

use crate::metadata::{BranchRow, BranchUpdate, Metadata, NewBranch, TimelineState};
use crate::metrics::Metrics;
use crate::names::{parse_duration, validate_branch_name};
use crate::{Config, ControlError, Result};

/// The port number in a compute's socket name; every compute has its own socket directory.
pub(crate) const COMPUTE_SOCKET_PORT: u16 = 5432;

/// The loopback address where the compute of the branch with endpoint `port` listens on TCP
/// (port [`COMPUTE_SOCKET_PORT`]), for the proxy's kernel shortcut. Derived from the branch's
/// port, which no other branch on this host holds, so it is unique without being stored;
/// all of 127.0.0.0/8 is the loopback interface on Linux.
pub(crate) fn compute_listen_ip(port: u16) -> std::net::Ipv4Addr {
    let [hi, lo] = port.to_be_bytes();
    std::net::Ipv4Addr::new(127, 64, hi, lo)
}

/// How long `branch create` waits for a checkpoint of the parent before the branch point.
const CHECKPOINT_BEFORE_BRANCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The database superuser of every branch (created by `initdb`).
pub const DB_SUPERUSER: &str = "stemma";

/// Settings every compute runs with, sized for development. Computes listen only on a Unix
/// socket (the supervisor sets that); clients come through the proxy. A branch's own settings
/// override these.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("shared_buffers", "32MB"),
    ("max_connections", "100"),
    ("work_mem", "4MB"),
    ("maintenance_work_mem", "32MB"),
    ("effective_cache_size", "256MB"),
    ("max_wal_size", "512MB"),
    ("min_wal_size", "32MB"),
    ("wal_level", "replica"),
    ("max_wal_senders", "4"),
    ("max_replication_slots", "4"),
    ("max_worker_processes", "4"),
    ("max_parallel_workers", "2"),
    ("max_parallel_workers_per_gather", "1"),
    ("autovacuum_max_workers", "2"),
    ("huge_pages", "off"),
    ("jit", "off"),
    ("logging_collector", "off"),
    ("log_line_prefix", "%m [%p] "),
    // A crashed backend takes the postmaster down and the supervisor starts it again, rather
    // than the postmaster reinitialising in place: every crash recovery then begins with the
    // supervisor's before-start hook, which makes the timeline's buffered writes durable
    // (the pagestore keeps page writes in memory until their file is fsynced, and
    // PostgreSQL's own `syncfs` at the start of recovery does not reach a FUSE server).
    ("restart_after_crash", "off"),
    // Not `checkpoint_timeout`: checkpoints every 30 s would bound the WAL a new branch of a
    // busy parent replays, but cost the pagestore a third of its TPC-B throughput in one
    // measurement (0.56 of native against 0.70-0.79 with the default 5 minutes).
];

/// Entries of a data directory that a clone leaves out or takes empty, from PostgreSQL's
/// documentation of base backups ("Making a Base Backup Using the Low Level API").
const CLONE_EXCLUDE: &[&str] = &[
    "postmaster.pid",
    "postmaster.opts",
    "backup_label",
    "tablespace_map",
];
const CLONE_EMPTY: &[&str] = &[
    "pg_replslot",
    "pg_dynshmem",
    "pg_notify",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// A long-running operation tracked for progress polling.
pub(crate) type Jobs = Mutex<HashMap<String, api::Operation>>;

pub struct Engine {
    pub(crate) cfg: Config,
    pub(crate) meta: Metadata,
    pub(crate) storage: Arc<dyn StorageDriver>,
    pub(crate) supervisor: Supervisor,
    /// One mutating branch operation at a time.
    pub(crate) op_lock: tokio::sync::Mutex<()>,
    pub(crate) jobs: Jobs,
    /// Names taken by imports in progress (they hold no operation lock while they run).
    pub(crate) reserved: Mutex<HashSet<String>>,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) api_url: Mutex<String>,
    /// Set once by the daemon right after the engine is made (the proxy calls back into it).
    pub(crate) proxy: std::sync::OnceLock<Arc<Proxy>>,
    pub(crate) proxy_port: Mutex<Option<u16>>,
    /// Per branch: wakes take it shared; reset, delete and suspension take it exclusive, so a
    /// connection never wakes a compute on a timeline that is being swapped or removed.
    pub(crate) gates: Mutex<HashMap<i64, Arc<tokio::sync::RwLock<()>>>>,
    /// Serialises cold starts so that the cap on running computes holds.
    pub(crate) wake_lock: tokio::sync::Mutex<()>,
    /// Why a branch's port could not be listened on, per branch id.
    pub(crate) endpoint_errors: Mutex<HashMap<i64, String>>,
    pub(crate) metrics: Metrics,
    /// The next time of each scheduled reset, by branch.
    pub(crate) schedule_next: Mutex<HashMap<String, DateTime<Utc>>>,
    /// Pull-request events from the webhook, handled in order by one worker.
    pub(crate) pr_events: std::sync::OnceLock<tokio::sync::mpsc::Sender<crate::workflows::PrEvent>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn new_timeline_id() -> TimelineId {
    let now = Utc::now().timestamp_micros() as u64;
    let id = format!("{now:014x}-{:08x}", rand::random::<u32>());
    // Hex digits and '-' only: always a valid id.
    TimelineId::parse(&id).unwrap_or_else(|_| unreachable!("generated timeline ids are valid"))
}

pub(crate) fn random_password() -> String {
    use rand::distributions::{Alphanumeric, DistString};
    Alphanumeric.sample_string(&mut rand::thread_rng(), 24)
}

fn timeline(id: &str) -> Result<TimelineId> {
    TimelineId::parse(id).map_err(|e| ControlError::Internal(anyhow::anyhow!(e)))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlError::Internal(anyhow::anyhow!("a blocking task failed: {e}")))?
}

impl Engine {
    pub fn new(
        cfg: Config,
        meta: Metadata,
        storage: Arc<dyn StorageDriver>,
        supervisor: Supervisor,
    ) -> Self {
        Engine {
            cfg,
            meta,
            storage,
            supervisor,
            op_lock: tokio::sync::Mutex::new(()),
            jobs: Mutex::new(HashMap::new()),
            reserved: Mutex::new(HashSet::new()),
            started_at: Utc::now(),
            api_url: Mutex::new(String::new()),
            proxy: std::sync::OnceLock::new(),
            proxy_port: Mutex::new(None),
            gates: Mutex::new(HashMap::new()),
            wake_lock: tokio::sync::Mutex::new(()),
            endpoint_errors: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            schedule_next: Mutex::new(HashMap::new()),
            pr_events: std::sync::OnceLock::new(),
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    pub(crate) fn set_api_url(&self, url: &str) {
        *lock(&self.api_url) = url.to_string();
    }

    pub(crate) fn set_proxy_port(&self, port: u16) {
        *lock(&self.proxy_port) = Some(port);
    }

    /// The Prometheus text exposition of the daemon's metrics.
    pub fn metrics_text(&self) -> String {
        self.metrics
            .render(self.supervisor.list().len(), self.supervisor.starts())
    }

    // ----- views -------------------------------------------------------------------------

    pub(crate) fn compute_key(b: &BranchRow) -> String {
        format!("branch-{}", b.id)
    }

    pub(crate) fn branch_id_of_key(key: &str) -> Option<i64> {
        key.strip_prefix("branch-")?.parse().ok()
    }

    pub(crate) fn compute_spec(&self, b: &BranchRow) -> Result<ComputeSpec> {
        let tl = timeline(&b.timeline_id)?;
        let mut settings: BTreeMap<String, String> = DEFAULT_SETTINGS
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.fast_recovery_sync(&mut settings);
        settings.extend(b.settings.clone());
        for (k, v) in self.storage.capabilities().compute_settings {
            settings.insert(k.to_string(), v.to_string());
        }
        Ok(ComputeSpec {
            key: Self::compute_key(b),
            label: b.name.clone(),
            data_dir: self.storage.data_dir(&tl),
            socket_dir: self.cfg.data_dir.join("run").join(Self::compute_key(b)),
            port: COMPUTE_SOCKET_PORT,
            // Computes without an endpoint (an operation's private compute) have port 0 and
            // no proxy in front: no TCP address.
            listen_ip: (b.port != 0).then(|| compute_listen_ip(b.port)),
            settings,
            log_path: self.cfg.logs_dir().join(format!("compute-{}.log", b.id)),
            user: self.compute_user_of(b)?,
        })
    }

    pub(crate) fn connection_string(b: &BranchRow, database: &str) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/{}",
            b.db_user, b.db_password, b.port, database
        )
    }

    fn to_api(&self, b: &BranchRow, parent: Option<String>, usage: Usage) -> api::Branch {
        let compute = self.supervisor.info(&Self::compute_key(b));
        let login = self.standby_login(b, &b.database);
        api::Branch {
            name: b.name.clone(),
            parent,
            created_at: b.created_at,
            state: if compute.is_some() {
                BranchState::Running
            } else {
                BranchState::Suspended
            },
            connection_string: match &login {
                Some(l) => l.connection_string.clone(),
                None => Self::connection_string(b, &b.database),
            },
            protected: b.protected,
            expires_at: b.expires_at,
            logical_size_bytes: usage.logical_size_bytes,
            own_storage_bytes: usage.own_storage_bytes,
            database: b.database.clone(),
            port: b.port,
            timeline_id: b.timeline_id.clone(),
            last_reset_at: b.last_reset_at,
            suspend_timeout_seconds: b.suspend_timeout_secs,
            settings: b.settings.clone(),
            compute: compute.map(|c| api::Compute {
                branch: b.name.clone(),
                pid: c.pid,
                // The branch's endpoint; the compute itself listens on a private socket.
                port: b.port,
                started_at: DateTime::<Utc>::from(c.started_at),
                restarts: c.restarts,
            }),
            compute_error: if b.compute_running {
                self.supervisor.last_error(&Self::compute_key(b))
            } else {
                None
            },
            endpoint_error: lock(&self.endpoint_errors).get(&b.id).cloned(),
            expired: b.expires_at.is_some_and(|t| t <= Utc::now()),
            migration: b.migration.as_ref().map(|m| api::Migration {
                status: m.status.clone(),
                finished_at: m.at,
                log: m.log.clone(),
            }),
            next_reset_at: self.next_reset_at(&b.name),
            last_scheduled_reset: self.meta.schedule_run(&b.name).ok().flatten().map(|r| {
                api::ScheduledReset {
                    at: r.at,
                    outcome: r.outcome,
                    message: r.message,
                }
            }),
            anonymization: self.meta.anonymization(b.id).ok().flatten().map(|a| {
                api::Anonymization {
                    rules_digest: a.digest,
                    last_run: a.last_run.map(|r| api::AnonymizationRun {
                        at: r.at,
                        rules_digest: r.digest,
                        outcome: r.outcome,
                        message: r.message,
                        tables: r.tables,
                        rows: r.rows,
                    }),
                }
            }),
            follows_source: login.as_ref().map(|l| l.source.clone()),
            note: login.map(|l| l.note),
        }
    }

    async fn usage_of(&self, timeline_ids: Vec<String>) -> Result<Vec<Usage>> {
        let storage = self.storage.clone();
        blocking(move || {
            Ok(timeline_ids
                .iter()
                .map(|t| {
                    TimelineId::parse(t)
                        .ok()
                        .and_then(|id| storage.usage(&id).ok())
                        .unwrap_or_default()
                })
                .collect())
        })
        .await
    }

    pub async fn list_branches(&self) -> Result<Vec<api::Branch>> {
        let rows = self.meta.branches()?;
        let names: HashMap<i64, String> = rows.iter().map(|b| (b.id, b.name.clone())).collect();
        let usage = self
            .usage_of(rows.iter().map(|b| b.timeline_id.clone()).collect())
            .await?;
        Ok(rows
            .iter()
            .zip(usage)
            .map(|(b, u)| {
                let parent = b.parent_id.and_then(|p| names.get(&p).cloned());
                self.to_api(b, parent, u)
            })
            .collect())
    }

    fn row(&self, name: &str) -> Result<BranchRow> {
        self.meta.branch(name)?.ok_or_else(|| {
            ControlError::NotFound(format!(
                "branch {name:?} does not exist (see `stemma branch list`)"
            ))
        })
    }

    async fn view(&self, b: &BranchRow) -> Result<api::Branch> {
        let parent = match b.parent_id {
            Some(p) => self.meta.branch_by_id(p)?.map(|p| p.name),
            None => None,
        };
        let usage = self.usage_of(vec![b.timeline_id.clone()]).await?;
        Ok(self.to_api(b, parent, usage.into_iter().next().unwrap_or_default()))
    }

    pub async fn get_branch(&self, name: &str) -> Result<api::Branch> {
        let b = self.row(name)?;
        self.view(&b).await
    }

    /// A branch's connection string. `with_source_password`: production's password too, when
    /// the branch follows a physical source (the API asks it of the daemon's token only).
    pub async fn connection_string_for(
        &self,
        name: &str,
        database: Option<&str>,
        with_source_password: bool,
    ) -> Result<api::ConnectionString> {
        let b = self.row(name)?;
        let database = database.unwrap_or(&b.database).to_string();
        Ok(match self.standby_login(&b, &database) {
            Some(login) => api::ConnectionString {
                branch: b.name.clone(),
                connection_string: login.connection_string,
                database,
                follows_source: Some(login.source),
                note: Some(login.note),
                source_password: with_source_password.then_some(login.password),
            },
            None => api::ConnectionString {
                branch: b.name.clone(),
                connection_string: Self::connection_string(&b, &database),
                database,
                follows_source: None,
                note: None,
                source_password: None,
            },
        })
    }

    pub fn status(&self) -> Result<api::Status> {
        let branches = self.meta.branches()?;
        let names: HashMap<String, (String, u16)> = branches
            .iter()
            .map(|b| (Self::compute_key(b), (b.name.clone(), b.port)))
            .collect();
        let computes = self
            .supervisor
            .list()
            .into_iter()
            .map(|c| api::Compute {
                branch: names.get(&c.key).map(|n| n.0.clone()).unwrap_or(c.label),
                pid: c.pid,
                port: names.get(&c.key).map(|n| n.1).unwrap_or(c.port),
                started_at: DateTime::<Utc>::from(c.started_at),
                restarts: c.restarts,
            })
            .collect();
        let install = self.supervisor.install();
        Ok(api::Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            api_url: lock(&self.api_url).clone(),
            pid: std::process::id(),
            started_at: self.started_at,
            data_dir: self.cfg.data_dir.display().to_string(),
            storage: self.storage.name().to_string(),
            storage_detail: match &self.cfg.storage_reason {
                Some(why) => format!("{} ({why})", self.storage.describe()),
                None => self.storage.describe(),
            },
            proxy_port: *lock(&self.proxy_port),
            postgres_version: install.major_version,
            postgres_bin_dir: install.bin_dir.display().to_string(),
            compute_user: match self.supervisor.user() {
                Some(u) => u.name.clone(),
                None => nix::unistd::User::from_uid(nix::unistd::geteuid())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
                    .unwrap_or_default(),
            },
            branches: branches.len(),
            computes,
        })
    }

    // ----- helpers for mutations ---------------------------------------------------------

    /// Fails when `name` is invalid or taken (by a branch or an import in progress).
    pub(crate) fn check_new_name(&self, name: &str) -> Result<()> {
        validate_branch_name(name)?;
        if self.meta.branch(name)?.is_some() || lock(&self.reserved).contains(name) {
            return Err(ControlError::Conflict(format!(
                "branch {name:?} already exists; choose another name"
            )));
        }
        Ok(())
    }

    /// The lowest free port at or above the configured base: unused by any branch and not
    /// held by another program right now.
    pub(crate) fn allocate_port(&self, also_taken: &[u16]) -> Result<u16> {
        let used: HashSet<u16> = self
            .meta
            .used_ports()?
            .into_iter()
            .chain(also_taken.iter().copied())
            .collect();
        let base = self.cfg.port_base;
        for offset in 0..2000u16 {
            let Some(port) = base.checked_add(offset) else {
                break;
            };
            if !used.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
        Err(ControlError::Conflict(format!(
            "no free port in {base}..{}; choose another range with --port-base",
            base.saturating_add(2000)
        )))
    }

    pub(crate) async fn start_compute_of(&self, b: &BranchRow) -> Result<()> {
        if self.promotion_pending(&b.timeline_id) {
            return Err(ControlError::Conflict(format!(
                "branch {:?} is being created (its copy of the standby is promoted); try again in a moment",
                b.name
            )));
        }
        let spec = self.compute_spec(b)?;
        let was_running = self.supervisor.info(&spec.key).is_some();
        if !was_running {
            self.make_room(&spec.key)
                .await
                .map_err(|r| ControlError::Conflict(r.message))?;
        }
        self.supervisor.start(spec.clone()).await?;
        if !was_running {
            // A compute started by a command counts as activity, so it is not suspended at once.
            if let Some(p) = self.proxy.get() {
                p.touch(&spec.key);
            }
        }
        Ok(())
    }

    async fn stop_compute_of(&self, b: &BranchRow) -> Result<()> {
        let spec = self.compute_spec(b)?;
        self.supervisor
            .stop(&spec.key, &spec.data_dir)
            .await
            .map_err(Into::into)
    }

    /// Creates the empty timeline `tl` in storage and runs `initdb` in it, with our superuser
    /// and `password`.
    pub(crate) async fn initdb_timeline(&self, tl: &TimelineId, password: &str) -> Result<()> {
        self.initdb_timeline_as(tl, password, None).await
    }

    /// [`Engine::initdb_timeline`], with the timeline owned by (and initdb run as) `owner`
    /// instead of the default compute user.
    pub(crate) async fn initdb_timeline_as(
        &self,
        tl: &TimelineId,
        password: &str,
        owner: Option<stemma_compute::ComputeUser>,
    ) -> Result<()> {
        let storage = self.storage.clone();
        let install = self.supervisor.install().clone();
        let user = owner.clone().or_else(|| self.supervisor.user().clone());
        let (tl, pw) = (tl.clone(), password.to_string());
        blocking(move || {
            let dir = storage.create_empty(&tl)?;
            if let Some(o) = &owner {
                std::os::unix::fs::chown(&dir, Some(o.uid), Some(o.gid))
                    .with_context(|| format!("handing {} to user {}", dir.display(), o.name))?;
            }
            stemma_compute::initdb(
                &install,
                &user,
                &dir,
                &stemma_compute::InitdbOptions {
                    superuser: DB_SUPERUSER,
                    password: &pw,
                },
            )
            .map_err(ControlError::from)
        })
        .await
    }

    /// Deletes a timeline from storage, then from metadata (in that order: see the crate docs).
    /// With a driver whose clones read through their parent, a timeline that still has
    /// children is retired instead, and deleted with its last child; so is each ancestor that
    /// this deletion frees.
    pub(crate) async fn destroy_timeline(&self, id: &str) -> Result<()> {
        let dependent = self.storage.capabilities().children_depend_on_parent;
        let mut next = Some(id.to_string());
        // Bounded by the depth of the ancestry: each round moves one timeline up.
        while let Some(id) = next.take() {
            if dependent && self.meta.timeline_children(&id)? > 0 {
                tracing::info!(timeline = %id, "timeline retired: its children still read through it");
                self.meta.retire_timeline(&id)?;
                break;
            }
            let parent = self.meta.timeline_parent(&id)?;
            let tl = timeline(&id)?;
            let storage = self.storage.clone();
            blocking(move || storage.delete(&tl).map_err(Into::into)).await?;
            self.meta.forget_timeline(&id)?;
            if let Some(p) = parent.filter(|_| dependent) {
                let free = !self.meta.timeline_in_use(&p)? && self.meta.timeline_children(&p)? == 0;
                let retired = self
                    .meta
                    .timelines()?
                    .iter()
                    .any(|t| t.id == p && t.state == TimelineState::Ready);
                if free && retired {
                    next = Some(p);
                }
            }
        }
        Ok(())
    }

    /// What a clone leaves out of a data directory.
    fn clone_filter() -> CloneFilter {
        CloneFilter {
            exclude: CLONE_EXCLUDE.iter().map(PathBuf::from).collect(),
            empty: CLONE_EMPTY.iter().map(PathBuf::from).collect(),
            only: Vec::new(),
        }
    }

    /// How the control plane reaches the compute of `b` as its superuser.
    fn session_target<'a>(b: &'a BranchRow, spec: &'a ComputeSpec) -> SessionTarget<'a> {
        SessionTarget {
            socket_dir: &spec.socket_dir,
            port: spec.port,
            user: &b.db_user,
            password: &b.db_password,
        }
    }

    /// Before a crash-consistent branch of the running `parent`: checkpoints the parent when
    /// the branch would otherwise replay more than `checkpoint_before_branch` bytes of its WAL
    /// at its first start (seconds on a busy parent, on any disk; the checkpoint takes a
    /// fraction of that, see docs/pagestore.md). Best effort: the branch is correct either
    /// way, so a failure or a checkpoint slower than [`CHECKPOINT_BEFORE_BRANCH_WAIT`] only
    /// leaves the branch more to replay.
    async fn checkpoint_before_branch(&self, parent: &BranchRow) {
        let limit = self.cfg.checkpoint_before_branch;
        if limit == 0 {
            return;
        }
        let Ok(parent_tl) = timeline(&parent.timeline_id) else {
            return;
        };
        // A source's standby replays its primary's WAL; its restartpoints are its own.
        if crate::source::is_standby(self.storage.as_ref(), &parent_tl) {
            return;
        }
        // The files alone can say "far under the limit" without a session (the idle case).
        let dir = self.storage.data_dir(&parent_tl);
        let bound = blocking(move || Ok(stemma_compute::replay_bound(&dir).ok().flatten())).await;
        if matches!(bound, Ok(Some(bound)) if bound <= limit) {
            return;
        }
        let spec = match self.compute_spec(parent) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!(branch = %parent.name, error = %e, "no checkpoint before the branch point");
                return;
            }
        };
        let t0 = std::time::Instant::now();
        let checkpoint =
            stemma_compute::checkpoint_if_behind(Self::session_target(parent, &spec), limit);
        match tokio::time::timeout(CHECKPOINT_BEFORE_BRANCH_WAIT, checkpoint).await {
            Ok(Ok(debt)) => tracing::debug!(
                branch = %parent.name,
                wal_bytes = debt.bytes,
                checkpointed = debt.checkpointed,
                ms = t0.elapsed().as_millis() as u64,
                "replay debt before the branch point"
            ),
            Ok(Err(e)) => {
                tracing::warn!(branch = %parent.name, error = %e, "no checkpoint before the branch point")
            }
            Err(_) => tracing::warn!(
                branch = %parent.name,
                "the checkpoint before the branch point took over {}s; branching without waiting for it",
                CHECKPOINT_BEFORE_BRANCH_WAIT.as_secs()
            ),
        }
    }

    /// Fills the `creating` timeline `child` with the current state of branch `parent`.
    ///
    /// With a file-copying driver and a running parent this is an online backup: the parent
    /// keeps serving, and the copy plus its WAL is recovered by PostgreSQL to a consistent
    /// state when the child starts.
    async fn clone_state(&self, parent: &BranchRow, child: &TimelineId) -> Result<()> {
        let parent_tl = timeline(&parent.timeline_id)?;
        let storage = self.storage.clone();
        let base_filter = Self::clone_filter();
        // A crash-consistent clone is a state the parent's files could be left in by a power
        // loss at that moment, whatever its compute is doing: PostgreSQL recovers it. Starting
        // a parent that is not running would only make the clone wait for that parent's own
        // recovery (seconds for a new branch of a busy branch, which nobody connected to yet).
        let crash_consistent =
            self.storage.capabilities().clone_consistency == CloneConsistency::CrashConsistent;
        let parent_running = self.supervisor.info(&Self::compute_key(parent)).is_some();
        // Otherwise a parent that should run but is between restarts is started: copying its
        // files while the supervisor may start it would not be consistent.
        let parent_running = if !crash_consistent && !parent_running && parent.compute_running {
            self.start_compute_of(parent).await?;
            true
        } else {
            parent_running
        };
        if crash_consistent && parent_running {
            self.checkpoint_before_branch(parent).await;
        }
        if crash_consistent || !parent_running {
            let child = child.clone();
            return blocking(move || {
                storage
                    .clone_timeline(&parent_tl, &child, &base_filter)
                    .map_err(Into::into)
            })
            .await;
        }

        // A standby (a source's root) has no superuser of ours for an online backup.
        if crate::source::is_standby(self.storage.as_ref(), &parent_tl) {
            return self.clone_paused_standby(parent, child, base_filter).await;
        }
        let label = format!("stemma clone of {} into {}", parent.name, child);
        let spec = self.compute_spec(parent)?;
        let backup = OnlineBackup::start(Self::session_target(parent, &spec), &label).await?;
        let mut data_filter = base_filter.clone();
        data_filter.exclude.push(PathBuf::from("pg_wal"));
        {
            let (storage, parent_tl, child) = (storage.clone(), parent_tl.clone(), child.clone());
            blocking(move || {
                storage
                    .clone_timeline(&parent_tl, &child, &data_filter)
                    .map_err(Into::into)
            })
            .await?;
        }
        let files = backup.stop().await?;
        let child = child.clone();
        blocking(move || {
            // The WAL last: it must reach past the end of the backup.
            storage.clone_timeline(&parent_tl, &child, &CloneFilter::only(&["pg_wal"]))?;
            storage.write_file(
                &child,
                Path::new("backup_label"),
                files.backup_label.as_bytes(),
            )?;
            if !files.tablespace_map.is_empty() {
                storage.write_file(
                    &child,
                    Path::new("tablespace_map"),
                    files.tablespace_map.as_bytes(),
                )?;
            }
            Ok(())
        })
        .await
    }

    /// A copy of a standby is cut loose from production before anything starts it: at once
    /// (`promote_at_first_start` false: a start of its own), or prepared for a first start
    /// that promotes it ([`Engine::prepare_promotion`]).
    async fn cut_loose(
        &self,
        parent: &BranchRow,
        tl: &TimelineId,
        promote_at_first_start: bool,
    ) -> Result<()> {
        if promote_at_first_start {
            self.prepare_promotion(parent, tl).await.map(|_| ())
        } else {
            self.cut_loose_from_production(parent, tl).await
        }
    }

    /// A new timeline holding `parent`'s current state, recorded as `creating`. On failure
    /// nothing is left behind.
    async fn fork_timeline(
        &self,
        parent: &BranchRow,
        promote_at_first_start: bool,
    ) -> Result<TimelineId> {
        let tl = new_timeline_id();
        self.meta
            .begin_timeline(tl.as_str(), Some(&parent.timeline_id))?;
        let t0 = std::time::Instant::now();
        let cloned = match self.clone_state(parent, &tl).await {
            Ok(()) => {
                tracing::debug!(timeline = %tl, ms = t0.elapsed().as_millis() as u64, "cloned");
                self.cut_loose(parent, &tl, promote_at_first_start).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = cloned {
            tracing::warn!(error = %e, timeline = %tl, "clone failed; removing the partial timeline");
            self.end_promotion(tl.as_str());
            if let Err(e2) = self.destroy_timeline(tl.as_str()).await {
                tracing::error!(error = %e2, "removing a partial timeline failed; the next start removes it");
            }
            return Err(e);
        }
        Ok(tl)
    }

    fn expires_at(ttl: Option<&str>) -> Result<Option<DateTime<Utc>>> {
        match ttl {
            None => Ok(None),
            Some(t) if t.trim().eq_ignore_ascii_case("none") => Ok(None),
            Some(t) => {
                let d = parse_duration(t)?;
                let d = chrono::Duration::from_std(d)
                    .map_err(|_| ControlError::Invalid(format!("duration {t:?} is too long")))?;
                Ok(Some(Utc::now() + d))
            }
        }
    }

    /// Checks per-branch PostgreSQL settings. Stemma owns the settings that decide where the
    /// compute listens and logs; everything else PostgreSQL validates when the compute starts.
    fn check_settings<'a>(
        keys: impl IntoIterator<Item = (&'a String, Option<&'a String>)>,
    ) -> Result<()> {
        const MANAGED: &[&str] = &[
            "port",
            "listen_addresses",
            "unix_socket_directories",
            "data_directory",
            "config_file",
            "hba_file",
            "ident_file",
            "external_pid_file",
            "logging_collector",
        ];
        for (k, v) in keys {
            let valid = k.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                && k.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
            if !valid {
                return Err(ControlError::Invalid(format!(
                    "invalid PostgreSQL setting name {k:?}"
                )));
            }
            if MANAGED.contains(&k.as_str()) {
                return Err(ControlError::Invalid(format!(
                    "the setting {k:?} is managed by Stemma and cannot be overridden"
                )));
            }
            if v.is_some_and(|v| v.contains(['\n', '\r', '\0'])) {
                return Err(ControlError::Invalid(format!(
                    "the value of {k:?} holds a line break"
                )));
            }
        }
        Ok(())
    }

    fn suspend_timeout(s: Option<&str>) -> Result<Option<u64>> {
        s.map(|s| parse_duration(s).map(|d| d.as_secs()))
            .transpose()
    }

    // ----- mutations ---------------------------------------------------------------------

    pub async fn create_branch(&self, req: &api::CreateBranchRequest) -> Result<api::Branch> {
        let t_begin = std::time::Instant::now();
        let _op = self.op_lock.lock().await;
        let op_wait = t_begin.elapsed();
        self.check_new_name(&req.name)?;
        let default_parent = self.default_parent();
        let parent_name = req.parent.as_deref().unwrap_or(&default_parent);
        let parent = self.row(parent_name).map_err(|_| {
            ControlError::NotFound(format!(
                "parent branch {parent_name:?} does not exist (see `stemma branch list`)"
            ))
        })?;
        if req.at.is_some() && !self.storage.capabilities().point_in_time {
            return Err(ControlError::Unsupported(format!(
                "the {} storage driver cannot branch from a past moment (--at); it keeps no history. Use the pagestore driver for point-in-time branches",
                self.storage.name()
            )));
        }
        let at = req.at.as_deref().map(Self::parse_at).transpose()?;
        let expires_at = Self::expires_at(req.ttl.as_deref())?;
        let suspend_timeout_secs = Self::suspend_timeout(req.suspend_timeout.as_deref())?;
        let settings = match &req.settings {
            Some(s) => {
                Self::check_settings(s.iter().map(|(k, v)| (k, Some(v))))?;
                let mut merged = parent.settings.clone();
                merged.extend(s.clone());
                merged
            }
            None => parent.settings.clone(),
        };
        let port = self.allocate_port(&[])?;

        // A copy of a standby (a source's root) is promoted in its first start.
        let t_fork = std::time::Instant::now();
        let tl = match at {
            Some(at) => self.fork_timeline_at(&parent, at, true).await?,
            None => self.fork_timeline(&parent, true).await?,
        };
        let fork = t_fork.elapsed();
        let promote = self.promotion_pending(tl.as_str());
        let new = NewBranch {
            name: req.name.clone(),
            parent_id: Some(parent.id),
            timeline_id: tl.to_string(),
            protected: req.protected,
            expires_at,
            port,
            db_user: parent.db_user.clone(),
            db_password: parent.db_password.clone(),
            database: parent.database.clone(),
            suspend_timeout_secs,
            settings,
        };
        let row = match self.meta.commit_new_branch(&new) {
            Ok(r) => r,
            Err(e) => {
                self.end_promotion(tl.as_str());
                let _ = self.destroy_timeline(tl.as_str()).await;
                return Err(e.into());
            }
        };
        let t_start = std::time::Instant::now();
        if promote {
            // Its own compute, started once: promoted, then given our superuser; only then
            // is its port served.
            let login = self.production_login(&row)?;
            if let Err(e) = self.start_promoting(&row, &login).await {
                tracing::warn!(branch = %row.name, error = %e, "the copy of the standby was not promoted; rolling back");
                let _ = self.stop_compute_of(&row).await;
                self.end_promotion(tl.as_str());
                self.meta.delete_branch(row.id)?;
                self.destroy_timeline(tl.as_str()).await?;
                return Err(e);
            }
        }
        if let Err(e) = self.open_endpoint(&row).await {
            let _ = self.stop_compute_of(&row).await;
            self.meta.delete_branch(row.id)?;
            self.destroy_timeline(tl.as_str()).await?;
            return Err(e);
        }
        // No compute yet (except a copy of a standby, started above to cut it loose): the
        // first connection starts it through the endpoint (computes run on demand), so
        // creating a branch costs what the storage driver's fork costs, which on the
        // pagestore is one record. A compute that cannot start gives that connection a clear
        // error; the branch stays, like any suspended branch.
        tracing::info!(
            branch = %row.name,
            parent = %parent.name,
            port,
            op_wait_ms = op_wait.as_millis() as u64,
            fork_ms = fork.as_millis() as u64,
            start_ms = t_start.elapsed().as_millis() as u64,
            total_ms = t_begin.elapsed().as_millis() as u64,
            "branch created"
        );
        self.view(&row).await
    }

    /// Creates an empty root branch (`initdb`).
    pub async fn create_root(&self, name: &str) -> Result<api::Branch> {
        let _op = self.op_lock.lock().await;
        self.create_root_locked(name).await
    }

    async fn create_root_locked(&self, name: &str) -> Result<api::Branch> {
        self.check_new_name(name)?;
        let port = self.allocate_port(&[])?;
        let tl = new_timeline_id();
        self.meta.begin_timeline(tl.as_str(), None)?;
        let password = random_password();
        let result = async {
            self.initdb_timeline(&tl, &password).await?;
            let row = self.meta.commit_new_branch(&NewBranch {
                name: name.to_string(),
                parent_id: None,
                timeline_id: tl.to_string(),
                protected: false,
                expires_at: None,
                port,
                db_user: DB_SUPERUSER.into(),
                db_password: password.clone(),
                database: "postgres".into(),
                suspend_timeout_secs: None,
                settings: BTreeMap::new(),
            })?;
            Ok::<_, ControlError>(row)
        }
        .await;
        let row = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = self.destroy_timeline(tl.as_str()).await;
                return Err(e);
            }
        };
        if let Err(e) = self.open_endpoint(&row).await {
            self.meta.delete_branch(row.id)?;
            self.destroy_timeline(tl.as_str()).await?;
            return Err(e);
        }
        if let Err(e) = self.start_compute_of(&row).await {
            self.close_endpoint(&row, "the branch could not start");
            let _ = self.stop_compute_of(&row).await;
            self.meta.delete_branch(row.id)?;
            self.destroy_timeline(tl.as_str()).await?;
            return Err(e);
        }
        tracing::info!(branch = name, port, "root branch created");
        self.view(&row).await
    }

    pub async fn delete_branch(&self, name: &str) -> Result<()> {
        let _op = self.op_lock.lock().await;
        self.delete_branch_locked(name).await
    }

    pub(crate) async fn delete_branch_locked(&self, name: &str) -> Result<()> {
        let b = self.row(name)?;
        if b.protected {
            return Err(ControlError::Conflict(format!(
                "branch {name:?} is protected; remove the protection first: `stemma branch set {name} --protected false`"
            )));
        }
        if let Some(s) = self.meta.source_of_branch(b.id)? {
            return Err(ControlError::Conflict(format!(
                "branch {name:?} is fed by the source {:?}; remove it first (`stemma source remove {}`), which also drops its slot on production",
                s.name, s.name
            )));
        }
        let children = self.meta.children(b.id)?;
        if !children.is_empty() {
            return Err(ControlError::Conflict(format!(
                "branch {name:?} has children ({}); delete them first",
                children.join(", ")
            )));
        }
        let gate = self.gate(b.id);
        let _exclusive = gate.write().await;
        self.close_endpoint(&b, &format!("branch \"{name}\" was deleted"));
        self.stop_compute_of(&b).await?;
        self.meta.delete_branch(b.id)?;
        lock(&self.gates).remove(&b.id);
        self.destroy_timeline(&b.timeline_id).await?;
        tracing::info!(branch = name, "branch deleted");
        Ok(())
    }

    pub async fn reset_branch(
        &self,
        name: &str,
        preserve_under_name: Option<&str>,
    ) -> Result<api::Branch> {
        // An anonymized branch is reset by masking its parent's current state again (a long
        // run that takes the operation lock only for its final swap).
        let row = self.row(name)?;
        if self.meta.anonymization(row.id)?.is_some() {
            if preserve_under_name.is_some() {
                return Err(ControlError::Unsupported(format!(
                    "branch {name:?} is anonymized: its reset masks the parent again and cannot keep the old state under another name"
                )));
            }
            return self.reanonymize_and_wait(name, None).await;
        }
        let _op = self.op_lock.lock().await;
        let b = self.row(name)?;
        let Some(parent_id) = b.parent_id else {
            return Err(ControlError::Invalid(format!(
                "branch {name:?} is a root: it has no parent to reset to"
            )));
        };
        if let Some(keep) = preserve_under_name {
            self.check_new_name(keep)?;
        }
        let parent = self
            .meta
            .branch_by_id(parent_id)?
            .context("the parent of a branch is missing from the metadata")?;
        // Copy first, so the branch is down only for the swap.
        let tl = self.fork_timeline(&parent, false).await?;
        let why = format!(
            "branch \"{name}\" was reset to the current state of \"{}\"; reconnect with the same connection string",
            parent.name
        );
        let b = self
            .replace_timeline(&b, &tl, preserve_under_name, &why)
            .await?;
        tracing::info!(branch = name, parent = %parent.name, "branch reset");
        self.view(&b).await
    }

    /// Points branch `b` at the new (`creating`) timeline `tl`, ending its connections with
    /// `why`; the old timeline becomes the branch `preserve_under_name`, or goes.
    pub(crate) async fn replace_timeline(
        &self,
        b: &BranchRow,
        tl: &TimelineId,
        preserve_under_name: Option<&str>,
        why: &str,
    ) -> Result<BranchRow> {
        let preserve = match preserve_under_name {
            Some(keep) => Some(NewBranch {
                name: keep.to_string(),
                parent_id: b.parent_id,
                timeline_id: String::new(),
                protected: false,
                expires_at: None,
                port: self.allocate_port(&[])?,
                db_user: b.db_user.clone(),
                db_password: b.db_password.clone(),
                database: b.database.clone(),
                suspend_timeout_secs: b.suspend_timeout_secs,
                settings: b.settings.clone(),
            }),
            None => None,
        };
        let gate = self.gate(b.id);
        let _exclusive = gate.write().await;
        let was_running = self.supervisor.info(&Self::compute_key(b)).is_some();
        if let Some(p) = self.proxy.get() {
            p.terminate(&Self::compute_key(b), why);
        }
        if let Err(e) = self.stop_compute_of(b).await {
            let _ = self.destroy_timeline(tl.as_str()).await;
            return Err(e);
        }
        let (old, preserved) = match self.meta.swap_timeline(b.id, tl.as_str(), preserve) {
            Ok(x) => x,
            Err(e) => {
                let _ = self.destroy_timeline(tl.as_str()).await;
                let _ = self.start_compute_of(b).await;
                return Err(e.into());
            }
        };
        match &preserved {
            Some(p) => {
                if let Err(e) = self.open_endpoint(p).await {
                    tracing::warn!(branch = %p.name, error = %e, "preserved branch has no endpoint");
                }
            }
            None => self.destroy_timeline(&old).await?,
        }
        let b = self
            .meta
            .branch_by_id(b.id)?
            .context("a branch vanished while its timeline was replaced")?;
        if was_running {
            self.start_compute_of(&b).await?;
        }
        Ok(b)
    }

    /// Parses a point in time (RFC 3339) and checks it is in the past.
    fn parse_at(at: &str) -> Result<DateTime<Utc>> {
        let t = DateTime::parse_from_rfc3339(at.trim())
            .map_err(|e| {
                ControlError::Invalid(format!(
                    "invalid time {at:?}: {e} (use RFC 3339, e.g. 2026-11-25T14:00:00Z)"
                ))
            })?
            .with_timezone(&Utc);
        if t > Utc::now() {
            return Err(ControlError::Invalid(format!("{at} is in the future")));
        }
        Ok(t)
    }

    /// A new `creating` timeline holding the state of `source`'s timeline at `at`.
    async fn fork_timeline_at(
        &self,
        source: &BranchRow,
        at: DateTime<Utc>,
        promote_at_first_start: bool,
    ) -> Result<TimelineId> {
        let tl = new_timeline_id();
        self.meta
            .begin_timeline(tl.as_str(), Some(&source.timeline_id))?;
        let storage = self.storage.clone();
        let (parent_tl, child) = (timeline(&source.timeline_id)?, tl.clone());
        let filter = Self::clone_filter();
        let result = blocking(move || {
            storage
                .branch_at(&parent_tl, &child, at.into(), &filter)
                .map_err(|e| match e {
                    stemma_storage::StorageError::Io { .. } => ControlError::from(e),
                    other => ControlError::Invalid(other.to_string()),
                })
        })
        .await;
        // A past state of a standby is cut loose from production too.
        let result = match result {
            Ok(()) => self.cut_loose(source, &tl, promote_at_first_start).await,
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            self.end_promotion(tl.as_str());
            let _ = self.destroy_timeline(tl.as_str()).await;
            return Err(e);
        }
        Ok(tl)
    }

    pub async fn restore_branch(
        &self,
        name: &str,
        req: &api::RestoreBranchRequest,
    ) -> Result<api::Branch> {
        let _op = self.op_lock.lock().await;
        let b = self.row(name)?;
        self.refuse_if_following(&b)?;
        if !self.storage.capabilities().point_in_time {
            return Err(ControlError::Unsupported(format!(
                "the {} storage driver keeps no history, so a branch cannot be restored to a past moment; use the pagestore driver",
                self.storage.name()
            )));
        }
        let at = Self::parse_at(&req.at)?;
        if let Some(keep) = req.preserve_under_name.as_deref() {
            self.check_new_name(keep)?;
        }
        let tl = self.fork_timeline_at(&b, at, false).await?;
        let why = format!(
            "branch \"{name}\" was restored to {}; reconnect with the same connection string",
            at.to_rfc3339()
        );
        let b = self
            .replace_timeline(&b, &tl, req.preserve_under_name.as_deref(), &why)
            .await?;
        tracing::info!(branch = name, at = %at, "branch restored");
        self.view(&b).await
    }

    pub async fn rename_branch(&self, name: &str, new_name: &str) -> Result<api::Branch> {
        let _op = self.op_lock.lock().await;
        let b = self.row(name)?;
        self.check_new_name(new_name)?;
        self.meta.rename_branch(b.id, new_name)?;
        if let Some(p) = self.proxy.get() {
            p.rename(&Self::compute_key(&b), new_name);
        }
        let b = self.row(new_name)?;
        tracing::info!(from = name, to = new_name, "branch renamed");
        self.view(&b).await
    }

    pub async fn update_branch(
        &self,
        name: &str,
        req: &api::UpdateBranchRequest,
    ) -> Result<api::Branch> {
        if let Some(rules) = &req.anonymize {
            // Checked against the parent's schema now; applied at the next reset.
            let b = self.row(name)?;
            self.set_anonymization_rules(&b, rules).await?;
        }
        let _op = self.op_lock.lock().await;
        let b = self.row(name)?;
        let settings = match &req.settings {
            Some(changes) => {
                Self::check_settings(changes.iter().map(|(k, v)| (k, v.as_ref())))?;
                let mut merged = b.settings.clone();
                for (k, v) in changes {
                    match v {
                        Some(v) => merged.insert(k.clone(), v.clone()),
                        None => merged.remove(k),
                    };
                }
                (merged != b.settings).then_some(merged)
            }
            None => None,
        };
        let update = BranchUpdate {
            settings: settings.clone(),
            protected: req.protected,
            expires_at: match &req.ttl {
                Some(t) => Some(Self::expires_at(Some(t))?),
                None => None,
            },
            suspend_timeout_secs: match &req.suspend_timeout {
                Some(s) => Some(Self::suspend_timeout(Some(s))?),
                None => None,
            },
        };
        self.meta.update_branch(b.id, &update)?;
        if settings.is_some() && self.supervisor.info(&Self::compute_key(&b)).is_some() {
            // Apply the new settings; if PostgreSQL refuses them, go back to the old ones.
            let updated = self.row(name)?;
            let gate = self.gate(b.id);
            let _exclusive = gate.write().await;
            self.stop_compute_of(&b).await?;
            if let Err(e) = self.start_compute_of(&updated).await {
                let revert = BranchUpdate {
                    settings: Some(b.settings.clone()),
                    ..BranchUpdate::default()
                };
                self.meta.update_branch(b.id, &revert)?;
                let _ = self.stop_compute_of(&updated).await;
                self.start_compute_of(&b).await?;
                return Err(ControlError::Invalid(format!(
                    "the compute did not start with the new settings, which were not applied: {e}"
                )));
            }
        }
        self.view(&self.row(name)?).await
    }

    pub async fn start_compute(&self, name: &str) -> Result<api::Branch> {
        let _op = self.op_lock.lock().await;
        let b = self.row(name)?;
        self.meta.set_compute_running(b.id, true)?;
        let gate = self.gate(b.id);
        let _shared = gate.read().await;
        self.start_compute_of(&b).await?;
        self.view(&self.row(name)?).await
    }

    pub async fn stop_compute(&self, name: &str) -> Result<api::Branch> {
        let _op = self.op_lock.lock().await;
        let b = self.row(name)?;
        self.meta.set_compute_running(b.id, false)?;
        let gate = self.gate(b.id);
        let _exclusive = gate.write().await;
        self.stop_compute_of(&b).await?;
        self.metrics.suspensions.inc();
        self.view(&self.row(name)?).await
    }

    // ----- daemon lifecycle ----------------------------------------------------------------

    /// Repairs what a crash interrupted, then brings computes to their recorded state.
    /// Runs once at start, before the API serves.
    pub async fn reconcile(&self) -> Result<()> {
        let _op = self.op_lock.lock().await;
        self.undo_interrupted_promotions().await?;
        let timelines = self.meta.timelines()?;
        for t in &timelines {
            if t.state != TimelineState::Ready {
                tracing::warn!(timeline = %t.id, state = ?t.state, "finishing an interrupted operation: removing the timeline");
                // An operation's temporary compute (an import, a snapshot, a promotion) may
                // have outlived the daemon in it.
                let dir = self.storage.data_dir(&timeline(&t.id)?);
                self.supervisor
                    .stop(&format!("stray-{}", t.id), &dir)
                    .await?;
                self.destroy_timeline(&t.id).await?;
            }
        }
        // Retired timelines whose last child went while the daemon was down.
        for t in self.meta.timelines()? {
            if t.state == TimelineState::Ready
                && !self.meta.timeline_in_use(&t.id)?
                && self.meta.timeline_children(&t.id)? == 0
            {
                tracing::info!(timeline = %t.id, "removing a timeline nothing uses");
                self.destroy_timeline(&t.id).await?;
            }
        }
        let known: HashSet<String> = self.meta.timelines()?.into_iter().map(|t| t.id).collect();
        let storage = self.storage.clone();
        let present = blocking(move || storage.list().map_err(Into::into)).await?;
        for id in present {
            if !known.contains(id.as_str()) {
                tracing::warn!(timeline = %id, "removing an orphaned timeline left by a crash");
                let storage = self.storage.clone();
                blocking(move || storage.delete(&id).map_err(Into::into)).await?;
            }
        }
        for b in self.meta.branches()? {
            // Scale to zero: computes that still run (a daemon restart) are adopted; the others
            // stay suspended until a connection wakes them.
            let spec = self.compute_spec(&b)?;
            let alive = stemma_compute::read_postmaster_pid(&spec.data_dir)
                .is_some_and(|pm| std::path::Path::new(&format!("/proc/{}", pm.pid)).exists());
            if alive {
                if let Err(e) = self.start_compute_of(&b).await {
                    tracing::error!(branch = %b.name, error = %e, "adopting the compute failed");
                }
            }
            if let Err(e) = self.open_endpoint(&b).await {
                tracing::error!(branch = %b.name, error = %e, "no endpoint for the branch");
            }
        }
        Ok(())
    }

    /// Creates the root branch on a brand-new data directory.
    pub async fn bootstrap(&self) -> Result<()> {
        if self.meta.get_kv("bootstrapped")?.is_some() {
            return Ok(());
        }
        let _op = self.op_lock.lock().await;
        if self.meta.branches()?.is_empty() {
            let root = self.cfg.root_branch.clone();
            self.create_root_locked(&root).await?;
        }
        self.meta.set_kv("bootstrapped", &Utc::now().to_rfc3339())?;
        Ok(())
    }

    /// Deletes branches whose `expires_at` has passed, unless protected; a branch with
    /// children is kept and shows `expired` instead.
    pub async fn expire_branches(&self) -> Result<Vec<String>> {
        let now = Utc::now();
        let mut deleted = Vec::new();
        for b in self.meta.branches()? {
            if b.expires_at.is_none_or(|t| t > now) || b.protected {
                continue;
            }
            if !self.meta.children(b.id)?.is_empty() {
                tracing::debug!(branch = %b.name, "expired, but kept: it has children");
                continue;
            }
            let _op = self.op_lock.lock().await;
            match self.delete_branch_locked(&b.name).await {
                Ok(()) => deleted.push(b.name.clone()),
                Err(e) => tracing::warn!(branch = %b.name, error = %e, "expired branch kept"),
            }
        }
        Ok(deleted)
    }

    pub fn operation(&self, id: &str) -> Result<api::Operation> {
        lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("operation {id:?} does not exist")))
    }

    pub(crate) fn update_job(&self, id: &str, f: impl FnOnce(&mut api::Operation)) {
        if let Some(op) = lock(&self.jobs).get_mut(id) {
            f(op);
        }
    }

    pub(crate) fn reserve_name(&self, name: &str) -> Result<()> {
        self.check_new_name(name)?;
        lock(&self.reserved).insert(name.to_string());
        Ok(())
    }

    pub(crate) fn release_name(&self, name: &str) {
        lock(&self.reserved).remove(name);
    }

    pub(crate) fn insert_job(&self, op: api::Operation) {
        let mut jobs = lock(&self.jobs);
        // Bounded: keep the most recent operations only.
        if jobs.len() >= 256 {
            let finished: Vec<String> = jobs
                .iter()
                .filter(|(_, o)| o.state != api::OperationState::Running)
                .map(|(k, _)| k.clone())
                .collect();
            for k in finished {
                jobs.remove(&k);
            }
        }
        jobs.insert(op.id.clone(), op);
    }
}
