//! The supervisor with a real PostgreSQL: the before-start hook runs before every spawn (the
//! first start and the restart after a crash), and a failing hook fails the start with its
//! reason and leaves nothing running.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use stemma_compute::{
    initdb, read_postmaster_pid, ComputeSpec, ComputeUser, InitdbOptions, PgInstall, Supervisor,
};

/// Stops whatever postmaster runs in `data` when dropped, so that a failed assertion leaks no
/// process.
struct KillOnDrop(PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pm) = read_postmaster_pid(&self.0) {
            // Immediate shutdown: the postmaster takes its children with it.
            let _ = kill(Pid::from_raw(pm.pid), Signal::SIGQUIT);
            for _ in 0..100 {
                if kill(Pid::from_raw(pm.pid), None).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn data_dir(root: &Path, user: &Option<ComputeUser>) -> PathBuf {
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).expect("chmod root");
    let data = root.join("data");
    std::fs::create_dir(&data).expect("mkdir data");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700)).expect("chmod data");
    if let Some((uid, gid)) = ComputeUser::ids(user) {
        std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown data");
    }
    data
}

/// A PostgreSQL installation, the compute user, and a fresh data directory (initdb) in a
/// temporary root that lives as long as the returned `TempDir`.
fn initdb_data_dir() -> (PgInstall, Option<ComputeUser>, tempfile::TempDir, PathBuf) {
    let install = PgInstall::discover(None).expect("a PostgreSQL installation");
    let user = ComputeUser::resolve(None).expect("the compute user");
    let root = tempfile::tempdir().expect("tempdir");
    let data = data_dir(root.path(), &user);
    initdb(
        &install,
        &user,
        &data,
        &InitdbOptions {
            superuser: "stemma",
            password: "secret",
        },
    )
    .expect("initdb");
    (install, user, root, data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_before_start_hook_runs_before_every_spawn() {
    let (install, user, root, data) = initdb_data_dir();
    let _guard = KillOnDrop(data.clone());

    let sup = Supervisor::new(install, user);
    let calls = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(AtomicBool::new(false));
    {
        let (calls, fail) = (calls.clone(), fail.clone());
        sup.set_before_start(Arc::new(move |spec: &ComputeSpec| {
            assert_eq!(spec.key, "hooked");
            calls.fetch_add(1, Ordering::SeqCst);
            if fail.load(Ordering::SeqCst) {
                Err("the storage is unavailable".to_string())
            } else {
                Ok(())
            }
        }));
    }
    let spec = ComputeSpec {
        key: "hooked".into(),
        label: "hooked".into(),
        data_dir: data.clone(),
        socket_dir: root.path().join("sock"),
        port: 5432,
        listen_ip: None,
        settings: BTreeMap::from([("restart_after_crash".into(), "off".into())]),
        log_path: root.path().join("compute.log"),
        user: None,
    };

    let first = sup.start(spec.clone()).await.expect("start");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "hook before the first start"
    );

    // A crash: the monitor restarts the compute, through the hook again.
    kill(Pid::from_raw(first.pid), Signal::SIGKILL).expect("kill the postmaster");
    let mut restarted = None;
    for _ in 0..150 {
        sup.check_once().await;
        if let Some(i) = sup.info("hooked").filter(|i| i.restarts >= 1) {
            restarted = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restarted = restarted.expect("the compute was restarted within 30 s");
    assert_ne!(restarted.pid, first.pid);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "hook before the restart");

    // A failing hook fails the start with its reason, and nothing is left running.
    sup.stop("hooked", &data).await.expect("stop");
    fail.store(true, Ordering::SeqCst);
    let err = sup.start(spec).await.expect_err("a start whose hook fails");
    assert!(
        err.to_string().contains("the storage is unavailable"),
        "the error says why: {err}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert!(sup.info("hooked").is_none());
    assert!(
        read_postmaster_pid(&data).is_none(),
        "no postmaster after a refused start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compute_listens_on_its_own_address_or_on_its_socket_alone_when_that_is_taken() {
    let (install, user, root, data) = initdb_data_dir();
    let _guard = KillOnDrop(data.clone());
    let sup = Supervisor::new(install, user);
    // An address of its own for this test process, on the port PostgreSQL will use.
    let ip = std::net::Ipv4Addr::new(
        127,
        65,
        (std::process::id() >> 8) as u8,
        std::process::id() as u8,
    );
    let spec = ComputeSpec {
        key: "tcp".into(),
        label: "tcp".into(),
        data_dir: data.clone(),
        socket_dir: root.path().join("sock"),
        port: 5432,
        listen_ip: Some(ip),
        settings: BTreeMap::new(),
        log_path: root.path().join("compute.log"),
        user: None,
    };
    let started = sup.start(spec.clone()).await.expect("start");
    let addr = std::net::SocketAddr::from((ip, 5432));
    assert_eq!(started.tcp_addr, Some(addr));
    std::net::TcpStream::connect(addr).expect("the compute accepts on its address");
    sup.stop("tcp", &data).await.expect("stop");

    // The address taken by another program: the compute starts on its Unix socket alone.
    let squatter = std::net::TcpListener::bind(addr).expect("take the address");
    let started = sup.start(spec).await.expect("start without TCP");
    assert_eq!(started.tcp_addr, None);
    assert!(started.socket_path.exists());
    sup.stop("tcp", &data).await.expect("stop");
    drop(squatter);
}

/// Processes running `initdb` on `data`, or running in it (a backend's working directory is
/// its data directory), with their command lines.
fn processes_of(data: &Path) -> Vec<(u32, Vec<String>)> {
    let dir = data.display().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|pid| {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                    let args: Vec<String> = cmd
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    let initdb =
                        args.first().is_some_and(|a| a.ends_with("/initdb")) && args.contains(&dir);
                    let inside = std::fs::read_link(format!("/proc/{pid}/cwd"))
                        .is_ok_and(|cwd| cwd.starts_with(data));
                    (initdb || inside).then_some((pid, args))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Waits up to `secs` seconds for `cond`.
fn wait_until(secs: u64, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..secs * 200 {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Not a test: the process `initdb_dies_with_the_process_that_runs_it` runs (this test binary
/// again) and kills while it runs `initdb`.
#[test]
#[ignore = "a helper process of initdb_dies_with_the_process_that_runs_it"]
fn initdb_helper_process() {
    let Ok(dir) = std::env::var("STEMMA_TEST_INITDB_DIR") else {
        return;
    };
    let install = PgInstall::discover(None).expect("a PostgreSQL installation");
    let user = ComputeUser::resolve(None).expect("the compute user");
    let _ = initdb(
        &install,
        &user,
        Path::new(&dir),
        &InitdbOptions {
            superuser: "stemma",
            password: "secret",
        },
    );
}

/// A daemon killed while it runs `initdb` (for a new branch or an import) takes `initdb` with
/// it: nothing goes on writing in a timeline the restarted daemon deletes. The process is
/// killed during initdb's longest step, which it runs silently (an initdb that outlives its
/// parent dies of `SIGPIPE` only at its next line of output): the single-user backend that
/// runs the post-bootstrap SQL, whose last command creates the database `postgres` (base/5).
#[test]
fn initdb_dies_with_the_process_that_runs_it() {
    let user = ComputeUser::resolve(None).expect("the compute user");
    let root = tempfile::tempdir().expect("tempdir");
    let data = data_dir(root.path(), &user);
    let mut helper = std::process::Command::new(std::env::current_exe().expect("this test"))
        .args(["--exact", "initdb_helper_process", "--ignored"])
        .env("STEMMA_TEST_INITDB_DIR", &data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the helper process");
    let post_bootstrap = wait_until(60, || {
        processes_of(&data)
            .iter()
            .any(|(_, args)| args.iter().any(|a| a == "--single"))
    });
    let _ = helper.kill();
    let _ = helper.wait();
    assert!(
        post_bootstrap,
        "initdb's post-bootstrap step never ran in {}",
        data.display()
    );
    assert!(
        wait_until(30, || processes_of(&data).is_empty()),
        "initdb or its backend outlived the process that ran it: {:?}",
        processes_of(&data)
    );
    assert!(
        !data.join("base/5").exists(),
        "initdb ran to its end after the process that ran it died"
    );
}
