//! A stand-in for production: a separate PostgreSQL cluster on a free loopback TCP port, run
//! as the `postgres` user, with `wal_level = replica`, a replication user and a `pg_hba.conf`
//! that allows replication from 127.0.0.1. Stopped (and its files removed) when dropped, even
//! when the test fails.
//!
//! Roles: `replicator` (REPLICATION, may replicate from 127.0.0.1), `app` (no REPLICATION),
//! `blocked` (REPLICATION, but no pg_hba line for replication). Database `app`.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{kill9, pg_bin, psql, wait_for};

pub const REPLICATOR_PASSWORD: &str = "rep-Secret-1";
pub const APP_PASSWORD: &str = "app-Secret-2";

const HBA: &str = "local all all trust\n\
host replication replicator 127.0.0.1/32 scram-sha-256\n\
host all all 127.0.0.1/32 scram-sha-256\n";

pub struct Production {
    _dir: tempfile::TempDir,
    pub data: PathBuf,
    pub port: u16,
    child: Option<Child>,
}

fn postgres_ids() -> (u32, u32) {
    let u = nix::unistd::User::from_name("postgres")
        .ok()
        .flatten()
        .expect("the postgres user exists");
    (u.uid.as_raw(), u.gid.as_raw())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Production {
    /// initdb, configure, start, create the roles and the `app` database.
    pub fn start() -> Production {
        let dir = tempfile::Builder::new()
            .prefix("stemma-test-prod-")
            .tempdir()
            .expect("a temporary directory");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
        let data = dir.path().join("pgdata");
        fs::create_dir(&data).expect("mkdir");
        let (uid, gid) = postgres_ids();
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown");
        fs::set_permissions(&data, fs::Permissions::from_mode(0o700)).expect("chmod");
        let out = Command::new(pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ])
            .arg("--no-instructions")
            .uid(uid)
            .gid(gid)
            .current_dir("/")
            .env("HOME", "/tmp")
            .stdin(Stdio::null())
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        fs::write(data.join("pg_hba.conf"), HBA).expect("write pg_hba.conf");
        let mut p = Production {
            _dir: dir,
            data,
            port: free_port(),
            child: None,
        };
        p.start_again();
        p.sql(
            "postgres",
            &format!(
                "CREATE ROLE replicator REPLICATION LOGIN PASSWORD '{REPLICATOR_PASSWORD}';\
                 CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}';\
                 CREATE ROLE blocked REPLICATION LOGIN PASSWORD 'blocked';"
            ),
        );
        p.sql("postgres", "CREATE DATABASE app OWNER app");
        p
    }

    /// Starts the stopped cluster on the same port and waits until it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "production already runs");
        let (uid, gid) = postgres_ids();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.parent().expect("parent").join("postgres.log"))
            .expect("open the log");
        let child = Command::new(pg_bin("postgres"))
            .arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.data.display()))
            .args([
                "-c",
                "wal_level=replica",
                "-c",
                "max_wal_senders=10",
                "-c",
                "max_replication_slots=10",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "fsync=off",
                "-c",
                "logging_collector=off",
            ])
            .uid(uid)
            .gid(gid)
            .process_group(0)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("start production");
        self.child = Some(child);
        let sock = self.socket_uri("postgres");
        wait_for(
            "production to accept connections",
            Duration::from_secs(60),
            || {
                Command::new(pg_bin("psql"))
                    .args(["-X", "-A", "-t", "-d", &sock, "-c", "select 1"])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    /// Fast shutdown, bounded; then SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        kill9(child.id());
        let _ = child.wait();
    }

    /// A superuser connection through the cluster's Unix socket (trust).
    pub fn socket_uri(&self, db: &str) -> String {
        format!(
            "postgresql://postgres@/{db}?host={}&port={}",
            self.data.display(),
            self.port
        )
    }

    /// A TCP URL for a role of production.
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgresql://{user}:{password}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    pub fn replicator_url(&self) -> String {
        self.url("replicator", REPLICATOR_PASSWORD, "app")
    }

    /// Runs SQL as the superuser; returns unaligned output.
    pub fn sql(&self, db: &str, sql: &str) -> String {
        psql(&self.socket_uri(db), sql)
    }

    /// The replication slots production has.
    pub fn slots(&self) -> Vec<String> {
        self.sql(
            "postgres",
            "select slot_name from pg_replication_slots order by 1",
        )
        .lines()
        .map(String::from)
        .filter(|l| !l.is_empty())
        .collect()
    }
}

impl Drop for Production {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A background process killed (and reaped) when dropped: pgbench writing to production.
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
