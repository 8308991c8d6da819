//! `stemma serve`: the daemon's start, its background loops and its clean stop.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use stemma_compute::{ComputeUser, PgInstall, Supervisor};
use stemma_storage::{CopyDriver, StorageDriver};

use crate::api::{router, AppState};
use crate::config::{info_path, DaemonInfo};
use crate::metadata::Metadata;
use crate::{Config, Engine};

/// Runs the daemon until SIGINT, SIGTERM or `POST /v1/shutdown`; then stops every compute.
pub async fn serve(cfg: Config) -> Result<()> {
    let data_dir = cfg.data_dir.clone();
    fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    // Computes (another user) must traverse it; its secrets have their own modes.
    fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting the mode of {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    let token = load_or_create_token(&cfg.token_path())?;

    let install = PgInstall::discover(cfg.pg_bin.as_deref())?;
    let user = ComputeUser::resolve(cfg.compute_user.as_deref())?;
    if let Some(u) = &user {
        check_traversable(&data_dir, u)?;
    }
    let meta = Metadata::open(&cfg.metadata_path())?;
    let mut cfg = cfg;
    // `auto`: an existing data directory keeps its driver; a new one gets the pagestore
    // wherever FUSE works, else the copy driver. The reason is kept for `stemma status`.
    match (meta.get_kv("storage")?, cfg.storage.as_str()) {
        (Some(existing), "auto") => cfg.storage = existing,
        (Some(existing), wanted) if existing != wanted => bail!(
            "the data directory {} uses the {existing} storage driver; start it with --storage {existing} (drivers cannot be switched in place)",
            data_dir.display()
        ),
        (Some(_), _) => {}
        (None, wanted) => {
            let (chosen, why) = match wanted {
                "auto" => match stemma_fuse::fuse_available() {
                    Ok(()) => ("pagestore".to_string(), "chosen: FUSE works on this host".to_string()),
                    Err(why) => {
                        tracing::warn!(%why, "FUSE is not usable here: using the copy driver");
                        ("copy".to_string(), format!("chosen because FUSE is not usable here: {why}"))
                    }
                },
                other => (other.to_string(), "chosen with --storage".to_string()),
            };
            meta.set_kv("storage", &chosen)?;
            meta.set_kv("storage_reason", &why)?;
            cfg.storage = chosen;
        }
    }
    cfg.storage_reason = meta.get_kv("storage_reason")?;
    // The pagestore's FUSE mounts live in a server process of their own, which outlives
    // this daemon (so do the computes using them); it is kept apart to stop it after the
    // computes stopped.
    let mut pagestore: Option<Arc<stemma_fuse::PagestoreClient>> = None;
    let storage: Arc<dyn StorageDriver> = match cfg.storage.as_str() {
        "copy" => Arc::new(CopyDriver::open(
            &cfg.timelines_dir(),
            ComputeUser::ids(&user),
        )?),
        "pagestore" => {
            stemma_fuse::fuse_available().map_err(|why| {
                anyhow::anyhow!("the pagestore driver needs FUSE, which is not usable here: {why}; use --storage copy")
            })?;
            // The window given now, else the one given before: shrinking it silently on a
            // restart would collect history the user meant to keep.
            if let Some(r) = cfg.retention {
                if r.is_zero() {
                    bail!("--retention must be longer than 0 (branches at \"now\" need no history; a window of 1m keeps almost none)");
                }
                meta.set_kv("retention_secs", &r.as_secs().max(1).to_string())?;
            }
            let mut args: Vec<std::ffi::OsString> = vec!["pagestore-server".into()];
            if let Some(secs) = meta.get_kv("retention_secs")? {
                args.push("--retention".into());
                args.push(format!("{secs}s").into());
            }
            let spec = stemma_fuse::ServerSpec {
                program: std::env::current_exe().context("finding the stemma executable")?,
                args,
                root: cfg.data_dir.join("pagestore"),
                owner: ComputeUser::ids(&user),
                log: cfg.logs_dir().join("pagestore-server.log"),
            };
            // Reconnects to the server a previous daemon started, else starts one; restarts
            // it should it die.
            let client = stemma_fuse::PagestoreClient::connect_or_start(spec)?;
            pagestore = Some(client.clone());
            client
        }
        other => bail!("unknown storage driver {other:?}; choose copy or pagestore"),
    };
    fs::create_dir_all(cfg.logs_dir()).context("creating the logs directory")?;
    // Scratch space of imports cut off by a crash.
    let _ = fs::remove_dir_all(cfg.scratch_dir());
    fs::create_dir_all(cfg.scratch_dir()).context("creating the scratch directory")?;
    // Imports stage raw dumps here: the daemon's user only.
    fs::set_permissions(cfg.scratch_dir(), fs::Permissions::from_mode(0o700))
        .context("restricting the scratch directory")?;

    let supervisor = Supervisor::new(install, user);
    {
        // Before any compute starts (restarts too): its timeline's writes durable, so that
        // its crash recovery starts from an image a power cut cannot take back.
        let storage = storage.clone();
        // The data directory is the driver's `data_dir` of the timeline, named by its id:
        // derive the id (and check it maps back) rather than list every timeline per start.
        supervisor.set_before_start(Arc::new(move |spec| {
            let id = spec
                .data_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| stemma_storage::TimelineId::parse(n).ok())
                .filter(|id| storage.data_dir(id) == spec.data_dir);
            match id {
                Some(id) => storage.sync_timeline(&id).map_err(|e| e.to_string()),
                None => Ok(()),
            }
        }));
    }
    let engine = Arc::new(Engine::new(cfg.clone(), meta, storage, supervisor.clone()));
    let tls = match &cfg.tls {
        Some((cert, key)) => Some(stemma_proxy::load_tls(cert, key).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let proxy = stemma_proxy::Proxy::new(
        Arc::new(crate::endpoints::ProxyBackend(Arc::downgrade(&engine))),
        engine.metrics.proxy.clone(),
        tls,
        kernel_shortcut(),
    );
    let _ = engine.proxy.set(proxy.clone());
    // Both listeners, before anything is started on them: a port in use fails the start
    // here, and a pagestore server started for this daemon alone is stopped again.
    let bound: Result<_> = async {
        let shared = proxy
            .listen_shared(cfg.proxy_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} for the shared proxy port; choose another with --proxy-listen",
                    cfg.proxy_listen
                )
            })?;
        let listener = tokio::net::TcpListener::bind(cfg.api_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} for the API; is another daemon using it? Choose another address with --api-listen",
                    cfg.api_listen
                )
            })?;
        Ok((shared, listener))
    }
    .await;
    let (shared, listener) = match bound {
        Ok(b) => b,
        Err(e) => {
            if let Some(client) = pagestore.as_ref().filter(|c| c.started_here()) {
                tracing::info!("stopping the pagestore server this failed start launched");
                if let Err(stop) = client.shutdown_server() {
                    tracing::warn!(error = %stop, "could not stop the pagestore server");
                }
            }
            return Err(e);
        }
    };
    engine.set_proxy_port(shared.port());
    let addr = listener.local_addr()?;
    let api_url = format!("http://{addr}");
    engine.set_api_url(&api_url);

    engine.reconcile().await?;
    engine.bootstrap().await?;

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let monitor = tokio::spawn(supervisor.clone().run_monitor(shutdown_rx.clone()));
    let expiry = tokio::spawn(expiry_loop(engine.clone(), shutdown_rx.clone()));
    let suspender = tokio::spawn(suspend_loop(engine.clone(), shutdown_rx.clone()));
    let scheduler = tokio::spawn(schedule_loop(engine.clone(), shutdown_rx.clone()));
    let sources = tokio::spawn(engine.clone().follow_sources(shutdown_rx.clone()));
    // Pull-request events: a bounded queue, handled in order.
    let (pr_tx, mut pr_rx) = tokio::sync::mpsc::channel(1024);
    let _ = engine.pr_events.set(pr_tx);
    let pr_worker = {
        let engine = engine.clone();
        tokio::spawn(async move {
            while let Some(event) = pr_rx.recv().await {
                engine.handle_pr_event(event).await;
            }
        })
    };

    write_info(
        &data_dir,
        &DaemonInfo {
            pid: std::process::id(),
            api_url: api_url.clone(),
            started_at: chrono::Utc::now(),
        },
    )?;
    tracing::info!(%api_url, data_dir = %data_dir.display(), storage = %engine.status()?.storage_detail, "stemma daemon ready");

    let state = AppState {
        engine: engine.clone(),
        token: Arc::new(token),
        shutdown: shutdown_tx.clone(),
    };
    let mut rx = shutdown_rx.clone();
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot handle SIGTERM");
                        let _ = rx.changed().await;
                        return;
                    }
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
                _ = rx.changed() => tracing::info!("shutdown requested through the API"),
            }
        })
        .await;
    let _ = shutdown_tx.send(true);
    let _ = monitor.await;
    let _ = expiry.await;
    let _ = suspender.await;
    let _ = scheduler.await;
    let _ = sources.await;
    pr_worker.abort();
    tracing::info!("stopping computes");
    supervisor.stop_all().await;
    if let Some(client) = pagestore {
        tracing::info!("stopping the pagestore server (it unmounts every timeline)");
        if let Err(e) = client.shutdown_server() {
            tracing::error!(error = %e, "stopping the pagestore server");
        }
    }
    let _ = fs::remove_file(info_path(&data_dir));
    tracing::info!("stemma daemon stopped");
    served.context("serving the API")
}

/// How often idle computes are looked for.
const SUSPEND_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

async fn suspend_loop(engine: Arc<Engine>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SUSPEND_CHECK_INTERVAL) => {}
            _ = shutdown.changed() => return,
        }
        engine.suspend_idle().await;
    }
}

async fn schedule_loop(engine: Arc<Engine>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    if engine.config().project.schedules.is_empty() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
        engine.run_due_schedules().await;
    }
}

async fn expiry_loop(engine: Arc<Engine>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let interval = engine.config().expiry_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        match engine.expire_branches().await {
            Ok(deleted) if !deleted.is_empty() => {
                tracing::info!(?deleted, "deleted expired branches")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "looking for expired branches"),
        }
    }
}

/// One daemon per data directory: an exclusive lock held for the daemon's life.
fn lock_data_dir(data_dir: &Path) -> Result<nix::fcntl::Flock<fs::File>> {
    let path = data_dir.join("daemon.lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, errno)) => {
            let holder = DaemonInfo::read(data_dir)
                .map(|i| format!(" (pid {}, {})", i.pid, i.api_url))
                .unwrap_or_default();
            bail!(
                "another stemma daemon is already running on {}{holder}: {errno}; stop it with `stemma down`",
                data_dir.display()
            )
        }
    }
}

fn load_or_create_token(path: &Path) -> Result<String> {
    if let Ok(t) = fs::read_to_string(path) {
        let t = t.trim().to_string();
        if !t.is_empty() {
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
            return Ok(t);
        }
    }
    use rand::distributions::{Alphanumeric, DistString};
    let token = Alphanumeric.sample_string(&mut rand::thread_rng(), 40);
    let tmp = path.with_extension("tmp");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

fn write_info(data_dir: &Path, info: &DaemonInfo) -> Result<()> {
    let path = info_path(data_dir);
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(info)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The compute's user must reach its data directory through every ancestor directory. An
/// ancestor that this daemon (root) owns but that others cannot traverse, typically a
/// `mktemp -d` directory (0700), gets the search bit for others only (o+x: enter, not list),
/// with a warning; any other obstacle is an error that says what to change.
fn check_traversable(data_dir: &Path, user: &ComputeUser) -> Result<()> {
    let abs = fs::canonicalize(data_dir)?;
    let me = nix::unistd::geteuid().as_raw();
    for dir in abs.ancestors() {
        let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
        let mode = meta.mode();
        let ok = if meta.uid() == user.uid {
            mode & 0o100 != 0
        } else if meta.gid() == user.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if ok {
            continue;
        }
        if meta.uid() == me && meta.uid() != user.uid && dir != Path::new("/") {
            let fixed = (mode & 0o7777) | 0o001;
            fs::set_permissions(dir, fs::Permissions::from_mode(fixed)).with_context(|| {
                format!(
                    "letting the compute user {:?} traverse {}",
                    user.name,
                    dir.display()
                )
            })?;
            tracing::warn!(
                dir = %dir.display(),
                from = format!("{:o}", mode & 0o7777),
                to = format!("{fixed:o}"),
                "gave others the search bit on an ancestor of the data directory, so that computes (user {}) can reach it",
                user.name
            );
            continue;
        }
        bail!(
            "computes run as user {:?}, who cannot enter {} (mode {:o}); choose a data directory it can reach (for example /var/lib/stemma) or `chmod o+x {}`",
            user.name,
            dir.display(),
            mode & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

/// The proxy's kernel shortcut (crates/stemma-proxy/src/shortcut.rs), unless
/// `STEMMA_PROXY_SHORTCUT=0` turns it off or the host does not allow it (it needs root, BPF
/// and cgroup v2): then the proxy relays every byte itself, which costs more CPU per query.
fn kernel_shortcut() -> Option<Arc<stemma_proxy::shortcut::Shortcut>> {
    if std::env::var("STEMMA_PROXY_SHORTCUT").is_ok_and(|v| v == "0") {
        tracing::info!("proxy: the kernel shortcut is off (STEMMA_PROXY_SHORTCUT=0)");
        return None;
    }
    match stemma_proxy::shortcut::Shortcut::install() {
        Ok(s) => {
            tracing::info!("proxy: kernel shortcut on (client and compute sockets joined in the kernel once a session starts)");
            Some(Arc::new(s))
        }
        Err(e) => {
            tracing::info!(reason = %e, "proxy: no kernel shortcut; relaying in userspace");
            None
        }
    }
}
