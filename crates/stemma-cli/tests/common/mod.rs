//! The integration test harness: a real daemon, real computes, in a temporary directory, on
//! ports no other test uses; everything it started is stopped when the [`Env`] drops, even when
//! the test fails.
#![allow(dead_code)]

use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A separate PostgreSQL cluster standing in for production (sources' tests).
pub mod production;

pub const STEMMA: &str = env!("CARGO_BIN_EXE_stemma");

/// Hands out blocks of ports below the kernel's ephemeral range, unique across the test
/// processes that nextest runs in parallel (a counter in a file, under an exclusive lock).
fn port_block() -> u16 {
    const FIRST: u16 = 20000;
    const BLOCK: u16 = 25;
    const BLOCKS: u16 = 400;
    let path = std::env::temp_dir().join("stemma-test-ports");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .expect("open the port counter");
    let mut file = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the port counter");
    let mut s = String::new();
    file.read_to_string(&mut s).expect("read the port counter");
    let n: u16 = s.trim().parse().unwrap_or(0) % BLOCKS;
    file.seek(SeekFrom::Start(0)).expect("seek");
    file.set_len(0).expect("truncate");
    write!(file, "{}", (n + 1) % BLOCKS).expect("write the port counter");
    FIRST + n * BLOCK
}

pub struct Env {
    _dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub port_base: u16,
}

impl Env {
    pub fn new() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("stemma-test-")
            .tempdir()
            .expect("create a temporary directory");
        // Computes run as another user: it must traverse into the data directory.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
        let data_dir = dir.path().join("data");
        Env {
            _dir: dir,
            data_dir,
            port_base: port_block(),
        }
    }

    /// Like [`Env::new`], with the data directory inside a directory only root can enter.
    pub fn new_private() -> Env {
        let mut env = Env::new();
        let private = env.data_dir.parent().expect("parent").join("private");
        fs::create_dir(&private).expect("mkdir");
        fs::set_permissions(&private, fs::Permissions::from_mode(0o700)).expect("chmod");
        env.data_dir = private.join("data");
        env
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(STEMMA);
        c.args(args)
            .env("STEMMA_DATA_DIR", &self.data_dir)
            .env_remove("STEMMA_API_URL")
            .env_remove("STEMMA_TOKEN")
            .env("STEMMA_LOG", "info")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run stemma")
    }

    /// Runs stemma, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "stemma {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs stemma, asserts failure with a message, returns stderr.
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "stemma {args:?} succeeded but should fail: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            stderr.lines().any(|l| l.starts_with("error: ")),
            "no clear error: {stderr:?}"
        );
        stderr
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {out}"))
    }

    pub fn up(&self) -> String {
        self.up_with(&[])
    }

    pub fn up_with(&self, extra: &[&str]) -> String {
        let out = self.up_command(extra).output().expect("run stemma up");
        assert!(
            out.status.success(),
            "stemma up {extra:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `stemma up` on this environment's free ports (API and shared proxy port chosen by the
    /// system), not run yet: to add environment variables, or to expect a failure.
    pub fn up_command(&self, extra: &[&str]) -> Command {
        let base = self.port_base.to_string();
        let mut args = vec![
            "up",
            "--api-listen",
            "127.0.0.1:0",
            "--proxy-listen",
            "127.0.0.1:0",
            "--port-base",
            &base,
        ];
        args.extend_from_slice(extra);
        self.cmd(&args)
    }

    /// `stemma down`, then checks that no pagestore server and no mount is left.
    pub fn down_leaves_nothing(&self) {
        self.ok(&["down"]);
        assert!(
            self.pagestore_server_pids().is_empty(),
            "a pagestore server outlived `down`"
        );
        assert_eq!(self.mounts(), Vec::<PathBuf>::new(), "mounts left");
    }

    pub fn daemon_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data_dir.join("daemon.json")).ok()?;
        let v: Value = serde_json::from_str(&text).ok()?;
        v["pid"].as_u64().map(|p| p as u32)
    }

    pub fn connection_string(&self, branch: &str) -> String {
        self.ok(&["connection-string", branch]).trim().to_string()
    }

    /// Runs SQL on a branch with psql, returns its unaligned output.
    pub fn sql(&self, branch: &str, sql: &str) -> String {
        let conn = self.connection_string(branch);
        psql(&conn, sql)
    }

    /// Postmaster pids of every compute under this environment's data directory (the copy
    /// driver's timelines, or the pagestore's mounts).
    pub fn compute_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in [
            self.data_dir.join("timelines"),
            self.data_dir.join("pagestore/mnt"),
        ] {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                if let Some(pm) = stemma_compute::read_postmaster_pid(&e.path()) {
                    if alive(pm.pid as u32) {
                        pids.push(pm.pid);
                    }
                }
            }
        }
        pids
    }

    /// Live pagestore servers of this environment (`stemma pagestore-server --root
    /// <data>/pagestore`), found in /proc: one may run while the daemon does not.
    pub fn pagestore_server_pids(&self) -> Vec<u32> {
        let root = self.data_dir.join("pagestore");
        let root = root.as_os_str().as_encoded_bytes();
        let mut pids = Vec::new();
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_server = args.iter().any(|a| *a == b"pagestore-server")
                && args.windows(2).any(|w| w[0] == b"--root" && w[1] == root);
            if is_server && alive(pid) {
                pids.push(pid);
            }
        }
        pids.sort();
        pids
    }

    /// Mount points below this environment's directory.
    pub fn mounts(&self) -> Vec<PathBuf> {
        let top = self._dir.path();
        fs::read_to_string("/proc/self/mounts")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .map(|m| PathBuf::from(m.replace("\\040", " ")))
            .filter(|m| m.starts_with(top))
            .collect()
    }

    /// A URI that reaches a branch's compute directly through its Unix socket, bypassing the
    /// proxy (the socket's lock file names the postmaster's pid).
    pub fn direct_uri(&self, branch: &str) -> String {
        let b = self.json(&["branch", "get", branch]);
        let pid = b["compute"]["pid"].as_i64().expect("the compute runs");
        let conn = b["connection_string"].as_str().unwrap();
        let creds = conn
            .trim_start_matches("postgresql://")
            .split('@')
            .next()
            .unwrap();
        for dir in fs::read_dir(self.data_dir.join("run"))
            .expect("run dir")
            .flatten()
        {
            let lock =
                fs::read_to_string(dir.path().join(".s.PGSQL.5432.lock")).unwrap_or_default();
            if lock
                .lines()
                .next()
                .and_then(|l| l.trim().parse::<i64>().ok())
                == Some(pid)
            {
                return format!(
                    "postgresql://{creds}@/{}?host={}&port=5432",
                    b["database"].as_str().unwrap(),
                    dir.path().display()
                );
            }
        }
        panic!("no socket for the compute of {branch}");
    }

    /// The storage driver the daemon chooses: `STEMMA_STORAGE`, else (`auto`) the pagestore
    /// where FUSE works and the copy driver elsewhere.
    pub fn storage(&self) -> String {
        match std::env::var("STEMMA_STORAGE") {
            Ok(s) if s != "auto" => s,
            _ if stemma_fuse::fuse_available().is_ok() => "pagestore".into(),
            _ => "copy".into(),
        }
    }

    /// Whether the data directory uses the pagestore (its timelines are mount points).
    pub fn uses_pagestore(&self) -> bool {
        self.data_dir.join("pagestore").is_dir()
    }

    /// Where the storage driver keeps its timelines' data directories.
    fn timelines_root(&self) -> PathBuf {
        if self.uses_pagestore() {
            self.data_dir.join("pagestore/mnt")
        } else {
            self.data_dir.join("timelines")
        }
    }

    /// The data directory of timeline `id`, whichever the driver.
    pub fn timeline_dir(&self, id: &str) -> PathBuf {
        self.timelines_root().join(id)
    }

    /// One entry per timeline in storage: the copy driver's directories, or the pagestore's
    /// mount points (one per timeline while its server runs).
    pub fn timeline_dirs(&self) -> Vec<PathBuf> {
        fs::read_dir(self.timelines_root())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // A clean stop first, bounded; then force whatever is left.
        if let Some(pid) = self.daemon_pid().filter(|p| alive(*p)) {
            if let Ok(mut child) = self
                .cmd(&["down"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                let deadline = Instant::now() + Duration::from_secs(60);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            kill9(pid);
        }
        // Computes first: their pids are read through the pagestore's mounts.
        for pid in self.compute_pids() {
            kill9(pid as u32);
        }
        // A pagestore server left by a failed test (a clean `down` stops it), then its
        // mounts, which would otherwise outlive the test.
        let servers = self.pagestore_server_pids();
        for pid in &servers {
            kill9(*pid);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while servers.iter().any(|p| alive(*p)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut mounts = self.mounts();
        mounts.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

/// `kill -9`, then waits (bounded) until the process is gone: SIGKILL takes effect only when
/// the process leaves a blocking wait in the kernel (a FUSE request, a disk write), and a test
/// that goes on at once would race with a process still holding its locks.
pub fn kill9(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for("a killed process to exit", Duration::from_secs(60), || {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Gone, or a zombie (dead, its locks and files released).
            Err(_) => true,
            Ok(stat) => stat
                .rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        }
    });
}

/// Waits (bounded) until `f` holds.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn pg_bin(name: &str) -> PathBuf {
    stemma_compute::PgInstall::discover(None)
        .expect("PostgreSQL is installed")
        .bin(name)
}

fn psql_output(conn: &str, sql: &str) -> std::io::Result<Output> {
    Command::new(pg_bin("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conn,
            "-c",
            sql,
        ])
        .stdin(Stdio::null())
        .output()
}

pub fn psql(conn: &str, sql: &str) -> String {
    let out =
        psql_output(conn, sql).unwrap_or_else(|e| panic!("run {}: {e}", pg_bin("psql").display()));
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Like [`psql`], but `None` when psql fails (a connection ended by a reset, say).
pub fn try_psql(conn: &str, sql: &str) -> Option<String> {
    let out = psql_output(conn, sql).ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Loads the Chinook sample into a branch (it creates the database `chinook`).
pub fn load_chinook(env: &Env, branch: &str) {
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(env.connection_string(branch))
        .arg("-f")
        .arg(chinook_sql())
        .output()
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Chinook sample database shipped beside the repository (`../shared/data`).
pub fn chinook_sql() -> PathBuf {
    if let Some(dir) = std::env::var_os("STEMMA_SHARED_DIR") {
        return Path::new(&dir).join("data/chinook_postgresql.sql");
    }
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    for dir in here.ancestors() {
        for candidate in [
            dir.join("shared/data/chinook_postgresql.sql"),
            dir.join("../shared/data/chinook_postgresql.sql"),
        ] {
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    // A clone anywhere else: the copy kept with the tests.
    let vendored = here.join("tests/data/chinook_postgresql.sql");
    assert!(vendored.is_file(), "{} is missing", vendored.display());
    vendored
}
