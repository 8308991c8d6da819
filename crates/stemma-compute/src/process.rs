//! One postgres process: initdb, spawn, readiness, adoption and stop.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::{ComputeError, ComputeUser, PgInstall, Result};

/// What `initdb` is told.
pub struct InitdbOptions<'a> {
    pub superuser: &'a str,
    pub password: &'a str,
}

/// Runs `initdb` on an empty, existing `data_dir` owned by the compute's user. Local and TCP
/// connections need the password (scram-sha-256).
///
/// `initdb` dies with the process that runs it ([`DiesWithParent`]; this function waits for
/// it on the calling thread, which the signal is tied to). Its standalone backends write a
/// negative pid in `postmaster.pid`, so stopping a postmaster does not find them; the
/// backend reads its commands from `initdb` through a pipe and ends at the pipe's end.
pub fn initdb(
    install: &PgInstall,
    user: &Option<ComputeUser>,
    data_dir: &Path,
    opts: &InitdbOptions<'_>,
) -> Result<()> {
    // The password file must be readable by the compute's user and by nobody else.
    let pwfile = tempfile_path("stemma-initdb-pw");
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pwfile)
            .map_err(ComputeError::io("writing initdb's password file"))?;
        f.write_all(opts.password.as_bytes())
            .map_err(ComputeError::io("writing initdb's password file"))?;
    }
    if let Some(u) = user {
        std::os::unix::fs::chown(&pwfile, Some(u.uid), Some(u.gid)).map_err(ComputeError::io(
            "handing initdb's password file to the compute user",
        ))?;
    }
    let mut cmd = Command::new(install.bin("initdb"));
    cmd.arg("-D")
        .arg(data_dir)
        .arg("-U")
        .arg(opts.superuser)
        .arg(format!("--pwfile={}", pwfile.display()))
        .args(["-A", "scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8"])
        .arg("--no-instructions")
        .stdin(Stdio::null());
    as_compute_user(&mut cmd, user);
    cmd.dies_with_parent();
    let out = cmd.output();
    let _ = fs::remove_file(&pwfile);
    let out = out.map_err(ComputeError::io(format!(
        "running {}",
        install.bin("initdb").display()
    )))?;
    if !out.status.success() {
        return Err(ComputeError::Failed(format!(
            "initdb failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Programs an operation runs (`initdb`, `pg_basebackup`, `pg_dump`, `pg_restore`, `psql`)
/// die when the thread that started them does (`PR_SET_PDEATHSIG` with `SIGKILL`): one cut
/// off by a `kill -9` of the daemon must not go on writing in a timeline that the restarted
/// daemon deletes as an interrupted operation's (nor into a branch). Computes are not started
/// this way: they outlive the daemon.
///
/// The signal is tied to the *thread* that forks, so start the program from one that outlives
/// it: a thread that waits for it, a tokio worker or the runtime's own thread; never from a
/// `spawn_blocking` thread that returns before the program ends (idle blocking threads exit).
pub trait DiesWithParent {
    fn dies_with_parent(&mut self) -> &mut Self;
}

fn set_pdeathsig() -> std::io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
}

impl DiesWithParent for Command {
    fn dies_with_parent(&mut self) -> &mut Self {
        // SAFETY: `prctl` is a system call, async-signal-safe; it runs in the child after any
        // uid change (which would clear the setting) and before exec.
        unsafe { self.pre_exec(set_pdeathsig) }
    }
}

impl DiesWithParent for tokio::process::Command {
    fn dies_with_parent(&mut self) -> &mut Self {
        // SAFETY: as above.
        unsafe { self.pre_exec(set_pdeathsig) }
    }
}

fn tempfile_path(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ))
}

/// Makes `cmd` run as the compute's user (std drops supplementary groups when root sets a uid),
/// with a minimal environment, in its own process group so that a signal sent to the daemon's
/// group (Ctrl-C in `stemma serve`) does not reach computes.
pub(crate) fn as_compute_user(cmd: &mut Command, user: &Option<ComputeUser>) {
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .env("LC_ALL", "C.UTF-8")
        .process_group(0);
    if let Some(u) = user {
        cmd.uid(u.uid)
            .gid(u.gid)
            .env("USER", &u.name)
            .env("HOME", "/tmp");
    }
}

/// The contents of `postmaster.pid`, which a running postmaster keeps in its data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostmasterPid {
    pub pid: i32,
    pub data_dir: PathBuf,
    pub port: u16,
    /// The first Unix socket directory.
    pub socket_dir: PathBuf,
    /// The first TCP listen address (empty when it listens on none).
    pub listen_address: String,
    /// `starting`, `ready`, `standby` or `stopping`.
    pub status: String,
}

/// Reads `postmaster.pid` in `data_dir`; `None` when absent or unreadable (no compute).
pub fn read_postmaster_pid(data_dir: &Path) -> Option<PostmasterPid> {
    let text = fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    Some(PostmasterPid {
        pid: lines.first()?.trim().parse().ok()?,
        data_dir: PathBuf::from(lines.get(1)?.trim()),
        port: lines.get(3)?.trim().parse().ok()?,
        socket_dir: PathBuf::from(lines.get(4)?.trim()),
        listen_address: lines
            .get(5)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        status: lines
            .get(7)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
    })
}

/// Whether `pid` is a live (not zombie) postgres process serving `data_dir`.
pub(crate) fn is_live_postmaster(pid: i32, data_dir: &Path) -> bool {
    if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    if is_zombie(pid) {
        return false;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let is_postgres = args
        .first()
        .map(|a| a.ends_with(b"postgres") || a.ends_with(b"postmaster"))
        .unwrap_or(false);
    let dir = data_dir.as_os_str().as_encoded_bytes();
    is_postgres && args.contains(&dir)
}

/// Whether process `pid` has exited and waits to be reaped (state `Z` in `/proc/PID/stat`).
fn is_zombie(pid: i32) -> bool {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state is the first field after the parenthesised command name.
    stat.rsplit(')')
        .next()
        .is_some_and(|rest| rest.trim_start().starts_with('Z'))
}

/// Spawns `postgres` for `data_dir` and returns the child. Does not wait for readiness.
pub(crate) fn spawn_postgres(
    install: &PgInstall,
    user: &Option<ComputeUser>,
    data_dir: &Path,
    port: u16,
    settings: &BTreeMap<String, String>,
    log_path: &Path,
) -> Result<std::process::Child> {
    if let Some(parent) = log_path.parent() {
        fs::create_dir_all(parent).map_err(ComputeError::io("creating the log directory"))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(ComputeError::io(format!("opening {}", log_path.display())))?;
    let _ = fs::set_permissions(log_path, fs::Permissions::from_mode(0o640));
    let log2 = log
        .try_clone()
        .map_err(ComputeError::io("duplicating the log descriptor"))?;
    let mut cmd = Command::new(install.bin("postgres"));
    cmd.arg("-D").arg(data_dir).arg("-p").arg(port.to_string());
    for (k, v) in settings {
        cmd.arg("-c").arg(format!("{k}={v}"));
    }
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    as_compute_user(&mut cmd, user);
    cmd.spawn().map_err(ComputeError::io(format!(
        "starting {}",
        install.bin("postgres").display()
    )))
}

/// Waits until the postmaster `pid` for `data_dir` says `ready` (or `standby`), it exits, or
/// `timeout` passes. `exited` tells whether the process is gone.
pub(crate) async fn wait_ready(
    pid: i32,
    data_dir: &Path,
    timeout: Duration,
    mut exited: impl FnMut() -> bool,
) -> std::result::Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(2);
    loop {
        if let Some(pm) = read_postmaster_pid(data_dir) {
            if pm.pid == pid && (pm.status == "ready" || pm.status == "standby") {
                return Ok(());
            }
        }
        if exited() {
            return Err("postgres exited during startup".into());
        }
        if Instant::now() >= deadline {
            return Err(format!("not ready after {}s", timeout.as_secs()));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// The last `n` lines of a log file, for error messages.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Stops the postmaster `pid`: a fast shutdown (SIGINT: clients are disconnected, a checkpoint
/// is written), escalating to an immediate shutdown and then SIGKILL if it does not exit.
pub(crate) async fn stop_postmaster(pid: i32, data_dir: &Path, mut reap: impl FnMut() -> bool) {
    let steps = [
        (Signal::SIGINT, Duration::from_secs(60)),
        (Signal::SIGQUIT, Duration::from_secs(10)),
        (Signal::SIGKILL, Duration::from_secs(10)),
    ];
    for (signal, wait) in steps {
        if reap() || !is_live_postmaster(pid, data_dir) {
            return;
        }
        tracing::debug!(pid, ?signal, "stopping compute");
        let _ = kill(Pid::from_raw(pid), signal);
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if reap() || !is_live_postmaster(pid, data_dir) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tracing::warn!(pid, ?signal, "compute did not stop in time; escalating");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postmaster_pid() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("postmaster.pid"),
            "4242\n/var/lib/x\n1700000000\n5433\n/run/s\n127.0.0.1\n  1234  5678\nready   \n",
        )
        .unwrap();
        let pm = read_postmaster_pid(dir.path()).unwrap();
        assert_eq!(pm.pid, 4242);
        assert_eq!(pm.port, 5433);
        assert_eq!(pm.status, "ready");
        assert_eq!(pm.socket_dir, PathBuf::from("/run/s"));
        assert_eq!(pm.data_dir, PathBuf::from("/var/lib/x"));
        fs::write(dir.path().join("postmaster.pid"), "garbage").unwrap();
        assert!(read_postmaster_pid(dir.path()).is_none());
    }

    #[test]
    fn our_own_process_is_not_a_postmaster() {
        assert!(!is_live_postmaster(
            std::process::id() as i32,
            Path::new("/x")
        ));
        assert!(!is_live_postmaster(0, Path::new("/x")));
    }

    /// Whether process `pid` is gone or a zombie (dead, not yet reaped).
    fn dead(pid: u32) -> bool {
        !Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid as i32)
    }

    #[test]
    fn a_program_started_to_die_with_its_parent_dies_when_the_starting_thread_ends() {
        // std: the thread starts `sleep` and ends without waiting for it.
        let mut child = std::thread::spawn(|| {
            Command::new("sleep")
                .arg("30")
                .dies_with_parent()
                .spawn()
                .expect("start sleep")
        })
        .join()
        .expect("the starting thread");
        let status = child.wait().expect("wait for sleep");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");

        // tokio: the same from a thread with its own runtime.
        let pid = std::thread::spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                let child = tokio::process::Command::new("sleep")
                    .arg("30")
                    .dies_with_parent()
                    .spawn()
                    .expect("start sleep");
                child.id().expect("its pid")
            })
        })
        .join()
        .expect("the starting thread");
        let gone = (0..1000).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            dead(pid)
        });
        assert!(gone, "sleep {pid} outlived the thread that started it");

        // Without it, the program lives on.
        let mut child = std::thread::spawn(|| {
            Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("start sleep")
        })
        .join()
        .expect("the starting thread");
        std::thread::sleep(Duration::from_millis(200));
        assert!(!dead(child.id()));
        let _ = child.kill();
        let _ = child.wait();
    }
}
