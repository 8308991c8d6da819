//! Finding, starting and stopping the daemon.

use std::fs::OpenOptions;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use stemma_api::{Branch, Client, Operation, OperationState};
use stemma_control::{Config, DaemonInfo};

use crate::output::Output;
use crate::ServeArgs;

/// How long `up` waits for the daemon to be ready (first start runs initdb).
const UP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `down` waits for computes and the daemon to stop.
const DOWN_TIMEOUT: Duration = Duration::from_secs(180);

pub fn default_data_dir() -> PathBuf {
    if nix::unistd::geteuid().is_root() {
        PathBuf::from("/var/lib/stemma")
    } else {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".local/share/stemma")
    }
}

pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STEMMA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The project configuration file: `--config`/`STEMMA_CONFIG`, else `./stemma.toml` when it
/// exists; as an absolute path, since the daemon does not run from the caller's directory.
pub fn config_file(args: &ServeArgs) -> Option<PathBuf> {
    let path = match &args.config {
        Some(p) => p.clone(),
        None => {
            let p = PathBuf::from("stemma.toml");
            if !p.is_file() {
                return None;
            }
            p
        }
    };
    Some(std::path::absolute(&path).unwrap_or(path))
}

pub fn config(data_dir: &Path, args: &ServeArgs) -> Result<Config> {
    let data_dir = std::path::absolute(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let mut cfg = Config::new(data_dir);
    cfg.api_listen = args.api_listen;
    cfg.storage = args.storage.clone();
    cfg.port_base = args.port_base;
    cfg.compute_user = Some(args.compute_user.clone());
    cfg.pg_bin = args.pg_bin.clone();
    cfg.expiry_interval = args.expiry_interval;
    cfg.proxy_listen = args.proxy_listen;
    cfg.suspend_timeout = args.suspend_timeout;
    cfg.max_computes = args.max_computes.max(1);
    cfg.checkpoint_before_branch = args.checkpoint_before_branch.0;
    cfg.retention = args.retention;
    if let Some(path) = config_file(args) {
        cfg.project = stemma_control::ProjectConfig::load(&path)?;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        cfg.tls = Some((
            std::path::absolute(cert).unwrap_or(cert.clone()),
            std::path::absolute(key).unwrap_or(key.clone()),
        ));
    }
    Ok(cfg)
}

/// Whether `pid` is a live process (a zombie, dead but not yet reaped, is not).
fn pid_alive(pid: u32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A client of the daemon: `STEMMA_API_URL`/`STEMMA_TOKEN` when set, else the daemon that
/// serves `data_dir`.
pub fn client(data_dir: &Path) -> Result<Client> {
    let token_file = stemma_control::Config::new(data_dir.to_path_buf()).token_path();
    let read_token = || -> Result<String> {
        std::fs::read_to_string(&token_file)
            .map(|t| t.trim().to_string())
            .with_context(|| {
                format!(
                    "reading the API token {} (set STEMMA_TOKEN, or run as a user who can read it)",
                    token_file.display()
                )
            })
    };
    if let Ok(url) = std::env::var("STEMMA_API_URL") {
        let token = match std::env::var("STEMMA_TOKEN") {
            Ok(t) => t,
            Err(_) => read_token()?,
        };
        return Ok(Client::new(&url, &token));
    }
    let info = DaemonInfo::read(data_dir).filter(|i| pid_alive(i.pid));
    let Some(info) = info else {
        bail!(
            "the Stemma daemon is not running for data directory {}; start it with `stemma up`",
            data_dir.display()
        );
    };
    let token = match std::env::var("STEMMA_TOKEN") {
        Ok(t) => t,
        Err(_) => read_token()?,
    };
    Ok(Client::new(&info.api_url, &token))
}

pub fn up(data_dir: &Path, args: &ServeArgs, out: &Output) -> Result<()> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data directory {}", data_dir.display()))?;
    if let Some(info) = DaemonInfo::read(data_dir).filter(|i| pid_alive(i.pid)) {
        // A daemon still starting, or still exiting after a signal (SIGKILL waits for the
        // process to leave a blocking wait in the kernel), may not answer yet: give it a
        // moment to answer or to be gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(client) = client(data_dir) {
                if let Ok(status) = client.status() {
                    out.up(&status, &client.list_branches()?, true);
                    return Ok(());
                }
            }
            if !pid_alive(info.pid) {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "a daemon (pid {}) holds {} but does not answer at {}; see {}",
                    info.pid,
                    data_dir.display(),
                    info.api_url,
                    data_dir.join("logs/daemon.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let logs = data_dir.join("logs");
    std::fs::create_dir_all(&logs).context("creating the logs directory")?;
    let log_path = logs.join("daemon.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the stemma executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("serve")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--api-listen")
        .arg(args.api_listen.to_string())
        .arg("--storage")
        .arg(&args.storage)
        .arg("--port-base")
        .arg(args.port_base.to_string())
        .arg("--compute-user")
        .arg(&args.compute_user)
        .arg("--expiry-interval")
        .arg(humantime::format_duration(args.expiry_interval).to_string())
        .arg("--proxy-listen")
        .arg(args.proxy_listen.to_string())
        .arg("--suspend-timeout")
        .arg(if args.suspend_timeout.is_zero() {
            "0".to_string()
        } else {
            humantime::format_duration(args.suspend_timeout).to_string()
        })
        .arg("--max-computes")
        .arg(args.max_computes.to_string())
        .arg("--checkpoint-before-branch")
        .arg(args.checkpoint_before_branch.to_string());
    if let Some(r) = args.retention {
        cmd.arg("--retention")
            .arg(humantime::format_duration(r).to_string());
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        cmd.arg("--tls-cert")
            .arg(std::path::absolute(cert).unwrap_or(cert.clone()))
            .arg("--tls-key")
            .arg(std::path::absolute(key).unwrap_or(key.clone()));
    }
    if let Some(path) = config_file(args) {
        // Checked here too, so that a mistake is reported by `up` itself.
        stemma_control::ProjectConfig::load(&path)?;
        cmd.arg("--config").arg(path);
    }
    if let Some(bin) = &args.pg_bin {
        cmd.arg("--pg-bin").arg(bin);
    }
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own session: it outlives this terminal.
        .process_group(0);
    let mut child = cmd.spawn().context("starting the daemon")?;
    let pid = child.id();
    let deadline = Instant::now() + UP_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "the daemon exited during start ({status}); the end of {}:\n{}",
                log_path.display(),
                tail.join("\n")
            );
        }
        if let Some(info) = DaemonInfo::read(data_dir) {
            if info.pid == pid {
                let client = client(data_dir)?;
                if let Ok(status) = client.status() {
                    out.up(&status, &client.list_branches()?, false);
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not become ready in {}s; see {}",
                UP_TIMEOUT.as_secs(),
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn down(data_dir: &Path) -> Result<()> {
    let Some(info) = DaemonInfo::read(data_dir).filter(|i| pid_alive(i.pid)) else {
        eprintln!(
            "the Stemma daemon is not running for {}",
            data_dir.display()
        );
        return Ok(());
    };
    let client = client(data_dir)?;
    client.shutdown()?;
    let deadline = Instant::now() + DOWN_TIMEOUT;
    while pid_alive(info.pid) {
        if Instant::now() > deadline {
            bail!(
                "the daemon (pid {}) did not stop in {}s",
                info.pid,
                DOWN_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("stopped the Stemma daemon and its computes");
    Ok(())
}

/// Polls a background operation until it ends, showing its progress.
pub fn wait_operation(client: &Client, mut op: Operation, out: &Output) -> Result<Branch> {
    let bar = out.progress();
    let multi = bar.as_ref().map(|b| {
        let m = indicatif::MultiProgress::new();
        m.add(b.clone());
        m
    });
    // One bar per table once it starts (anonymization), rows and bytes with their rate.
    let mut table_bars: std::collections::HashMap<usize, indicatif::ProgressBar> =
        std::collections::HashMap::new();
    let mut tables_reported = std::collections::HashSet::new();
    let mut last_phase = String::new();
    loop {
        if let Some(bar) = &bar {
            bar.set_length(op.total.max(1));
            bar.set_position(op.done.min(op.total));
            bar.set_message(op.phase.clone());
            if let Some(m) = &multi {
                for (i, t) in op.tables.iter().enumerate() {
                    if t.rows == 0 && !t.done {
                        continue;
                    }
                    let tb = table_bars.entry(i).or_insert_with(|| {
                        let tb = m.add(indicatif::ProgressBar::new_spinner());
                        tb.set_style(
                            indicatif::ProgressStyle::with_template(
                                "  {prefix:30} {msg} ({binary_bytes_per_sec})",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
                        );
                        tb.set_prefix(t.table.clone());
                        tb
                    });
                    tb.set_position(t.bytes);
                    tb.set_message(format!(
                        "{} rows, {}{}",
                        t.rows,
                        indicatif::HumanBytes(t.bytes),
                        if t.done { ", done" } else { "" }
                    ));
                    if t.done && !tb.is_finished() {
                        tb.finish();
                    }
                }
            }
        } else if op.state == OperationState::Running {
            if op.phase != last_phase {
                eprintln!("{}: {} ({}/{})", op.kind, op.phase, op.done, op.total);
                last_phase = op.phase.clone();
            }
            for t in op.tables.iter().filter(|t| t.done) {
                if tables_reported.insert(t.table.clone()) {
                    eprintln!(
                        "  {} ({}): {} rows, {}",
                        t.table,
                        t.database,
                        t.rows,
                        indicatif::HumanBytes(t.bytes)
                    );
                }
            }
        }
        match op.state {
            OperationState::Succeeded => {
                if let Some(bar) = &bar {
                    bar.finish_and_clear();
                }
                return op
                    .branch
                    .ok_or_else(|| anyhow!("the operation succeeded but returned no branch"));
            }
            OperationState::Failed => {
                if let Some(bar) = &bar {
                    bar.abandon();
                }
                bail!(op.error.unwrap_or_else(|| "the operation failed".into()));
            }
            OperationState::Running => {}
        }
        std::thread::sleep(Duration::from_millis(200));
        op = client.operation(&op.id)?;
    }
}

/// psql from the daemon's PostgreSQL installation, else from PATH.
pub fn psql_path(client: &Client) -> PathBuf {
    if let Ok(status) = client.status() {
        let p = Path::new(&status.postgres_bin_dir).join("psql");
        if p.is_file() {
            return p;
        }
    }
    PathBuf::from("psql")
}

/// Replaces this process with psql on `conn`; `password`, when given, goes in `PGPASSWORD`
/// (never on the command line).
pub fn exec_psql(
    psql: &Path,
    conn: &str,
    args: &[String],
    password: Option<&str>,
) -> Result<ExitCode> {
    let mut cmd = Command::new(psql);
    cmd.arg(conn).args(args);
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    let err = cmd.exec();
    Err(anyhow!(err).context(format!("running {}", psql.display())))
}
