//! Crashes: the daemon or a compute killed with SIGKILL, operations cut off midway.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;
use stemma_storage::StorageDriver;

#[test]
fn kill_9_of_the_daemon_keeps_every_branch_and_its_computes() {
    let env = Env::new();
    env.up();
    env.sql("main", "create table t(v int); insert into t values (1)");
    env.ok(&["branch", "create", "dev"]);
    env.sql("dev", "insert into t values (2)");
    env.ok(&["branch", "create", "off"]);
    env.ok(&["compute", "stop", "off"]);
    let conn = env.connection_string("dev");
    let direct = env.direct_uri("dev");
    let computes_before = {
        let mut p = env.compute_pids();
        p.sort();
        p
    };
    assert_eq!(computes_before.len(), 2);

    let daemon = env.daemon_pid().unwrap();
    kill9(daemon);
    wait_for("daemon death", Duration::from_secs(10), || !alive(daemon));
    // Computes do not notice (clients connect again through the proxy once it is back).
    assert_eq!(psql(&direct, "select count(*) from t"), "2");

    env.up();
    assert_ne!(env.daemon_pid(), Some(daemon));
    let mut computes_after = env.compute_pids();
    computes_after.sort();
    assert_eq!(
        computes_before, computes_after,
        "computes were restarted instead of adopted"
    );
    let list = env.json(&["branch", "list"]);
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["dev", "main", "off"]);
    assert_eq!(env.json(&["branch", "get", "off"])["state"], "suspended");
    assert_eq!(env.connection_string("dev"), conn);
    assert_eq!(
        env.sql("dev", "select string_agg(v::text, ',' order by v) from t"),
        "1,2"
    );
    assert_eq!(env.sql("main", "select count(*) from t"), "1");
}

#[test]
fn a_compute_that_dies_is_restarted() {
    let env = Env::new();
    env.up();
    env.sql("main", "create table t(v int); insert into t values (1)");
    let before = env.json(&["branch", "get", "main"]);
    let pid = before["compute"]["pid"].as_i64().unwrap() as u32;
    kill9(pid);
    wait_for("the compute to come back", Duration::from_secs(60), || {
        let b = env.json(&["branch", "get", "main"]);
        b["state"] == "running" && b["compute"]["pid"].as_i64() != Some(pid as i64)
    });
    let after = env.json(&["branch", "get", "main"]);
    assert!(after["compute"]["restarts"].as_u64().unwrap() >= 1);
    assert_eq!(env.sql("main", "select count(*) from t"), "1");
}

#[test]
fn interrupted_operations_are_repaired_on_start() {
    let env = Env::new();
    env.up();
    env.ok(&["down"]);
    let timelines = env.data_dir.join("timelines");
    // What a crash can leave: a clone half made, a deletion half done, an unrecorded copy.
    let db = rusqlite::Connection::open(env.data_dir.join("metadata.db")).unwrap();
    for (id, state) in [("aaaa-0001", "creating"), ("aaaa-0002", "deleting")] {
        db.execute(
            "INSERT INTO timelines(id, parent_id, state, created_at) VALUES (?1, NULL, ?2, '2026-01-01T00:00:00Z')",
            [id, state],
        )
        .unwrap();
    }
    drop(db);
    let ids = ["aaaa-0001", "aaaa-0002", "aaaa-0003"];
    if env.uses_pagestore() {
        // The same in the page store, written with the driver while no server runs.
        let driver = stemma_fuse::PagestoreDriver::open(
            &env.data_dir.join("pagestore"),
            None,
            stemma_fuse::DriverOptions::default(),
        )
        .unwrap();
        for id in ids {
            let id = stemma_storage::TimelineId::parse(id).unwrap();
            let dir = driver.create_empty(&id).unwrap();
            std::fs::create_dir(dir.join("base")).unwrap();
            std::fs::write(dir.join("base/1"), b"partial").unwrap();
        }
        driver.shutdown();
    } else {
        for id in ids {
            std::fs::create_dir_all(timelines.join(id).join("base")).unwrap();
            std::fs::write(timelines.join(id).join("base/1"), b"partial").unwrap();
        }
    }
    env.up();
    for id in ids {
        assert!(!env.timeline_dir(id).exists(), "{id} left behind");
    }
    assert_eq!(env.timeline_dirs().len(), 1);
    assert_eq!(env.sql("main", "select 1"), "1");
}

#[test]
fn a_daemon_killed_during_branch_creation_leaves_all_or_nothing() {
    let env = Env::new();
    env.up();
    let init = std::process::Command::new(pg_bin("pgbench"))
        .args(["-i", "-q", "-s", "10"])
        .arg(env.connection_string("main"))
        .output()
        .unwrap();
    assert!(init.status.success());
    let mut create = env
        .cmd(&["branch", "create", "big"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill the daemon as soon as the clone has started writing.
    wait_for("the clone to start", Duration::from_secs(60), || {
        env.timeline_dirs().len() > 1
    });
    kill9(env.daemon_pid().unwrap());
    let _ = create.wait();

    env.up();
    let exists = env.run(&["branch", "get", "big"]).status.success();
    let expected_timelines = if exists { 2 } else { 1 };
    assert_eq!(
        env.timeline_dirs().len(),
        expected_timelines,
        "an orphan timeline remains"
    );
    if exists {
        assert_eq!(
            env.sql("big", "select count(*) from pgbench_branches"),
            "10"
        );
    }
    // The name is usable either way.
    if exists {
        env.ok(&["branch", "delete", "big"]);
    }
    env.ok(&["branch", "create", "big"]);
    assert_eq!(
        env.sql("big", "select count(*) from pgbench_branches"),
        "10"
    );
}

/// Children of `pid` that exited but were not reaped.
fn zombie_children(pid: u32) -> usize {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            let rest: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect();
            rest.first() == Some(&"Z") && rest.get(1) == Some(&pid.to_string().as_str())
        })
        .count()
}

#[test]
fn stopped_computes_are_reaped() {
    let env = Env::new();
    env.up_with(&["--suspend-timeout", "1s"]);
    env.ok(&["branch", "create", "a"]);
    for _ in 0..3 {
        env.ok(&["compute", "stop", "a"]);
        env.ok(&["compute", "start", "a"]);
    }
    env.ok(&["branch", "reset", "a"]);
    wait_for("a to suspend", Duration::from_secs(30), || {
        env.json(&["branch", "get", "a"])["state"] == "suspended"
    });
    env.ok(&["branch", "delete", "a"]);
    let daemon = env.daemon_pid().unwrap();
    wait_for("no zombie computes", Duration::from_secs(10), || {
        zombie_children(daemon) == 0
    });
}

/// The pagestore's mounts live in a server process of their own: `kill -9` of the daemon
/// leaves it and the computes reading through it running, and the next daemon reconnects to
/// it instead of starting another. `down` then stops everything and leaves no mount.
#[test]
fn kill_9_of_the_daemon_keeps_pagestore_computes_and_their_server() {
    let env = Env::new();
    let pagestore = ["--storage", "pagestore"];
    env.up_with(&pagestore);
    env.sql("main", "create table t(v int); insert into t values (1)");
    env.ok(&["branch", "create", "dev"]);
    env.sql("dev", "insert into t values (2)");
    let direct = env.direct_uri("dev");
    let sorted = |mut v: Vec<i32>| {
        v.sort();
        v
    };
    let computes_before = sorted(env.compute_pids());
    assert_eq!(computes_before.len(), 2, "main and dev run");
    let servers = env.pagestore_server_pids();
    assert_eq!(servers.len(), 1, "one pagestore server");
    assert_eq!(
        std::fs::read_to_string(env.data_dir.join("pagestore/server/pid"))
            .unwrap()
            .trim(),
        servers[0].to_string()
    );

    let daemon = env.daemon_pid().unwrap();
    kill9(daemon);
    wait_for("daemon death", Duration::from_secs(10), || !alive(daemon));
    // The compute keeps reading and writing its data directory through the server.
    assert_eq!(psql(&direct, "select count(*) from t"), "2");
    psql(&direct, "insert into t values (3)");
    assert_eq!(env.pagestore_server_pids(), servers);

    env.up_with(&pagestore);
    assert_ne!(env.daemon_pid(), Some(daemon));
    assert_eq!(
        env.pagestore_server_pids(),
        servers,
        "the restarted daemon started a second server instead of reconnecting"
    );
    assert_eq!(
        sorted(env.compute_pids()),
        computes_before,
        "computes were restarted instead of adopted"
    );
    let status = env.json(&["status"]);
    assert_eq!(status["storage"], "pagestore");
    assert_eq!(
        env.sql("dev", "select string_agg(v::text, ',' order by v) from t"),
        "1,2,3"
    );
    assert_eq!(env.sql("main", "select count(*) from t"), "1");
    // Storage operations go through the adopted server.
    env.ok(&["branch", "create", "feature", "--parent", "dev"]);
    env.sql("feature", "insert into t values (4)");
    assert_eq!(env.sql("dev", "select count(*) from t"), "3");
    assert_eq!(env.sql("feature", "select count(*) from t"), "4");
    let all_computes = env.compute_pids();
    assert_eq!(all_computes.len(), 3);

    env.ok(&["down"]);
    for pid in &servers {
        assert!(!alive(*pid), "the pagestore server outlived `down`");
    }
    for pid in &all_computes {
        assert!(!alive(*pid as u32), "compute {pid} outlived `down`");
    }
    assert!(env.pagestore_server_pids().is_empty());
    assert_eq!(
        env.mounts(),
        Vec::<std::path::PathBuf>::new(),
        "mounts left"
    );
}

/// `kill -9` of the pagestore server kills its mounts, and the computes on them stop. The
/// daemon starts a new server, which mounts every timeline again, and the computes come
/// back with every committed transaction (commits are fsynced).
#[test]
fn kill_9_of_the_pagestore_server_brings_every_branch_back() {
    let env = Env::new();
    env.up_with(&["--storage", "pagestore"]);
    env.sql("main", "create table t(v int); insert into t values (1)");
    env.ok(&["branch", "create", "dev"]);
    env.sql("dev", "insert into t values (2)");
    let servers = env.pagestore_server_pids();
    assert_eq!(servers.len(), 1);
    let conn = env.connection_string("dev");

    kill9(servers[0]);
    wait_for("a new pagestore server", Duration::from_secs(60), || {
        let now = env.pagestore_server_pids();
        now.len() == 1 && now != servers
    });
    // The new server killed the computes stranded in the dead mounts (PostgreSQL would
    // never leave its working directory); the monitor starts them again on the new mounts.
    wait_for("dev to come back", Duration::from_secs(120), || {
        try_psql(&conn, "select string_agg(v::text, ',' order by v) from t").as_deref()
            == Some("1,2")
    });
    assert_eq!(env.sql("main", "select count(*) from t"), "1");
    env.ok(&["branch", "create", "after", "--parent", "dev"]);
    assert_eq!(env.sql("after", "select count(*) from t"), "2");

    // The daemon and the server at once: the next `up` starts a server that does the same
    // before the daemon looks at its computes, so the first connection finds its data.
    let daemon = env.daemon_pid().unwrap();
    let servers = env.pagestore_server_pids();
    kill9(daemon);
    for pid in &servers {
        kill9(*pid);
    }
    wait_for("daemon and server death", Duration::from_secs(10), || {
        !alive(daemon) && servers.iter().all(|p| !alive(*p))
    });
    env.up_with(&["--storage", "pagestore"]);
    assert_eq!(
        env.sql("dev", "select string_agg(v::text, ',' order by v) from t"),
        "1,2"
    );
    assert_eq!(env.sql("after", "select count(*) from t"), "2");

    env.down_leaves_nothing();
}

/// A pagestore server that runs but answers nothing (stopped with SIGSTOP here; a deadlock
/// or a disk that no longer answers in life) is killed by the daemon's watchdog once it has
/// been silent for the hang timeout, and replaced like a dead one: the branches come back
/// with their committed data.
#[test]
fn a_hung_pagestore_server_is_replaced() {
    let env = Env::new();
    let out = env
        .up_command(&["--storage", "pagestore"])
        .env("STEMMA_PAGESTORE_HANG_TIMEOUT", "3")
        .output()
        .expect("run stemma up");
    assert!(
        out.status.success(),
        "up failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.sql("main", "create table t(v int); insert into t values (1)");
    let conn = env.connection_string("main");
    let servers = env.pagestore_server_pids();
    assert_eq!(servers.len(), 1);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(servers[0] as i32),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .expect("stop the pagestore server");
    wait_for("a new pagestore server", Duration::from_secs(90), || {
        let now = env.pagestore_server_pids();
        now.len() == 1 && now != servers
    });
    assert!(!alive(servers[0]), "the hung server was not killed");
    wait_for("main to come back", Duration::from_secs(120), || {
        try_psql(&conn, "select count(*) from t").as_deref() == Some("1")
    });
    let log = std::fs::read_to_string(env.data_dir.join("logs/daemon.log")).unwrap_or_default();
    assert!(
        log.contains("hung"),
        "the daemon's log does not say the server hung"
    );
    env.down_leaves_nothing();
}

/// A daemon that cannot start (its API port is taken) stops the pagestore server it launched
/// instead of leaving it running with nobody to stop it.
#[test]
fn a_failed_start_leaves_no_pagestore_server() {
    let env = Env::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("address").to_string();
    let base = env.port_base.to_string();
    let stderr = env.fail(&[
        "up",
        "--api-listen",
        &addr,
        "--proxy-listen",
        "127.0.0.1:0",
        "--port-base",
        &base,
        "--storage",
        "pagestore",
    ]);
    assert!(stderr.contains("--api-listen"), "unclear error: {stderr}");
    wait_for(
        "the pagestore server to stop",
        Duration::from_secs(30),
        || env.pagestore_server_pids().is_empty(),
    );
    assert_eq!(
        env.mounts(),
        Vec::<std::path::PathBuf>::new(),
        "mounts left"
    );
    // The data directory is still good for a daemon that can start.
    env.up_with(&["--storage", "pagestore"]);
    env.sql("main", "select 1");
    env.down_leaves_nothing();
    drop(taken);
}
