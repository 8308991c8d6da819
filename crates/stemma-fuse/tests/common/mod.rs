//! Helpers for the tests: a driver in a temporary directory that never leaks a mount, and
//! PostgreSQL servers that are always stopped.

#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stemma_fuse::{mounts_under, DriverOptions, PagestoreDriver};
use stemma_storage::TimelineId;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "stemma_fuse=info,stemma_pagestore=warn".into()),
        )
        .with_test_writer()
        .try_init();
}

pub fn tl(s: &str) -> TimelineId {
    TimelineId::parse(s).unwrap()
}

/// The uid and gid of the `postgres` user.
pub fn postgres_user() -> (u32, u32) {
    let u = nix::unistd::User::from_name("postgres")
        .unwrap()
        .expect("the postgres user exists");
    (u.uid.as_raw(), u.gid.as_raw())
}

/// A temporary directory that other users can traverse, holding a driver. Dropping it shuts
/// the driver down (unmounting) before the directory is removed, and detaches anything left.
pub struct Fixture {
    pub driver: Option<PagestoreDriver>,
    pub dir: tempfile::TempDir,
}

impl Fixture {
    pub fn new(owner: Option<(u32, u32)>) -> Self {
        Self::with_options(owner, DriverOptions::default())
    }

    pub fn with_options(owner: Option<(u32, u32)>, options: DriverOptions) -> Self {
        init_tracing();
        let dir = tempfile::Builder::new()
            .prefix("stemma-fuse-test-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let driver = PagestoreDriver::open(&dir.path().join("root"), owner, options).unwrap();
        Fixture {
            driver: Some(driver),
            dir,
        }
    }

    pub fn driver(&self) -> &PagestoreDriver {
        self.driver.as_ref().unwrap()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// Shuts the driver down and checks that no mount is left.
    pub fn finish(mut self) {
        if let Some(d) = self.driver.take() {
            d.shutdown();
        }
        let left = mounts_under(self.dir.path()).unwrap();
        assert!(left.is_empty(), "mounts left behind: {left:?}");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(d) = self.driver.take() {
            d.shutdown();
        }
        // Even after a panic: nothing may stay mounted under the test's directory.
        if let Ok(left) = mounts_under(self.dir.path()) {
            for m in left {
                let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// Runs a PostgreSQL binary as the `postgres` user.
pub fn pg_command(bin: &str) -> Command {
    let (uid, gid) = postgres_user();
    let mut c = Command::new(Path::new(PG_BIN).join(bin));
    c.uid(uid)
        .gid(gid)
        .env_clear()
        .env("LC_ALL", "C")
        .env("PATH", "/usr/bin:/bin");
    c
}

pub fn initdb(data: &Path) {
    let out = pg_command("initdb")
        .args(["-D"])
        .arg(data)
        .args([
            "-U",
            "postgres",
            "--auth=trust",
            "--no-instructions",
            "-E",
            "UTF8",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "initdb failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running postmaster, stopped (fast, then SIGKILL) when dropped.
pub struct Pg {
    pub data: PathBuf,
    pub sock: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Pg {
    /// Starts postgres on `data`, listening only on a Unix socket in `sock` (created, owned
    /// by postgres).
    pub fn start(data: &Path, sock: &Path, extra: &[&str]) -> Pg {
        let (uid, gid) = postgres_user();
        std::fs::create_dir_all(sock).unwrap();
        std::os::unix::fs::chown(sock, Some(uid), Some(gid)).unwrap();
        let log = sock.join("postgres.log");
        let logf = std::fs::File::create(&log).unwrap();
        let mut cmd = pg_command("postgres");
        cmd.arg("-D")
            .arg(data)
            .args(["-c", "listen_addresses="])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", sock.display()))
            .args(["-c", "shared_buffers=32MB", "-c", "max_connections=20"])
            // As the daemon runs computes on the pagestore (its `compute_settings`).
            .args(["-c", "wal_recycle=off", "-c", "wal_init_zero=on"]);
        for e in extra {
            cmd.args(["-c", e]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(logf)
            .process_group(0)
            .spawn()
            .unwrap();
        let mut pg = Pg {
            data: data.to_path_buf(),
            sock: sock.to_path_buf(),
            log,
            child: Some(child),
        };
        pg.wait_ready(Duration::from_secs(60));
        pg
    }

    fn wait_ready(&mut self, limit: Duration) {
        let start = Instant::now();
        loop {
            let ok = pg_command("pg_isready")
                .arg("-h")
                .arg(&self.sock)
                .args(["-U", "postgres", "-q"])
                .status()
                .unwrap()
                .success();
            if ok {
                return;
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("postgres exited ({st}):\n{}", self.log_text());
                }
            }
            assert!(
                start.elapsed() < limit,
                "postgres did not become ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn psql_cmd(&self, sql: &str) -> Command {
        let mut c = pg_command("psql");
        c.arg("-h")
            .arg(&self.sock)
            .args(["-U", "postgres", "-d", "postgres", "-X", "-A", "-t", "-q"])
            .args(["-v", "ON_ERROR_STOP=1", "-c", sql]);
        c
    }

    /// Runs `sql` and returns its trimmed output; panics with the server log on failure.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_cmd(sql).output().unwrap();
        assert!(
            out.status.success(),
            "psql {sql:?} failed: {}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Fast shutdown; SIGKILL of the whole process group after a timeout.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
                    let _ = child.wait();
                    break;
                }
            }
        }
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child process killed (with its process group) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}
