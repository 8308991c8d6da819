//! A branch of a parent that is being written is consistent: the copy driver clones a running
//! compute through an online backup, with no pause of the parent.

mod common;

use common::*;
use std::process::{Command, Stdio};

/// Kills the load generator even when the test fails.
struct Load(std::process::Child);

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pgbench -i -s SCALE` on a connection string.
fn pgbench_init(conn: &str, scale: &str) {
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-q", "-s", scale])
        .arg(conn)
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
}

/// pgbench with `args` on a connection string, in the background until dropped.
fn pgbench_load(conn: &str, args: &[&str]) -> Load {
    Load(
        Command::new(pg_bin("pgbench"))
            .args(args)
            .arg(conn)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbench"),
    )
}

fn assert_pgbench_consistent(env: &Env, branch: &str) {
    let q = |sql: &str| env.sql(branch, sql);
    let history = q("select count(*) from pgbench_history");
    let delta = q("select coalesce(sum(delta), 0) from pgbench_history");
    assert_eq!(
        q("select sum(abalance) from pgbench_accounts"),
        delta,
        "accounts in {branch}"
    );
    assert_eq!(
        q("select sum(tbalance) from pgbench_tellers"),
        delta,
        "tellers in {branch}"
    );
    assert_eq!(
        q("select sum(bbalance) from pgbench_branches"),
        delta,
        "branches in {branch}"
    );
    assert!(
        history.parse::<u64>().unwrap() > 0,
        "{branch} was taken before any transaction"
    );

    let out = Command::new(pg_bin("pg_amcheck"))
        .args(["--install-missing", "--heapallindexed", "--all"])
        .arg("--maintenance-db")
        .arg(env.connection_string(branch))
        .output()
        .expect("run pg_amcheck");
    assert!(
        out.status.success() && out.stdout.is_empty(),
        "pg_amcheck found problems in {branch}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Branches of a parent under pgbench, each one recovered from the parent's WAL like after a
/// crash (no checkpoint before the branch point).
#[test]
fn branching_a_parent_under_pgbench_is_consistent() {
    branching_under_pgbench("0");
}

/// The same with a checkpoint of the parent before every branch point (the daemon's shortcut
/// for a parent far from its last checkpoint, here forced by a 1 MB limit).
#[test]
fn branching_a_parent_under_pgbench_after_a_checkpoint_of_it_is_consistent() {
    branching_under_pgbench("1MB");
}

fn branching_under_pgbench(checkpoint_before_branch: &str) {
    let env = Env::new();
    env.up_with(&["--checkpoint-before-branch", checkpoint_before_branch]);
    let main = env.connection_string("main");
    pgbench_init(&main, "5");

    let load = Load(
        Command::new(pg_bin("pgbench"))
            .args(["-n", "-c", "4", "-j", "2", "-T", "60"])
            .arg(&main)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start pgbench"),
    );
    wait_for(
        "pgbench transactions",
        std::time::Duration::from_secs(30),
        || env.sql("main", "select count(*) from pgbench_history") != "0",
    );

    let redo = || env.sql("main", "select redo_lsn from pg_control_checkpoint()");
    let redo_before = redo();
    env.ok(&["branch", "create", "snap-1", "--parent", "main"]);
    if env.uses_pagestore() && checkpoint_before_branch != "0" {
        assert_ne!(redo(), redo_before, "no checkpoint before the branch point");
    }
    env.ok(&["branch", "create", "snap-2", "--parent", "main"]);
    // The parent kept working while it was cloned.
    let before = env.sql("main", "select count(*) from pgbench_history");
    wait_for(
        "more pgbench transactions",
        std::time::Duration::from_secs(30),
        || env.sql("main", "select count(*) from pgbench_history") != before,
    );
    // A branch of a branch that is itself being written.
    let snap1 = env.connection_string("snap-1");
    let load2 = pgbench_load(&snap1, &["-n", "-c", "2", "-T", "60"]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    env.ok(&["branch", "create", "snap-1-1", "--parent", "snap-1"]);
    drop(load2);
    drop(load);

    for b in ["snap-1", "snap-2", "snap-1-1"] {
        assert_pgbench_consistent(&env, b);
    }
    // Branches are isolated from the parent's later writes.
    let main_count = env.sql("main", "select count(*) from pgbench_history");
    let snap2_count = env.sql("snap-2", "select count(*) from pgbench_history");
    assert_ne!(main_count, snap2_count);
}

/// The page store's maintenance (GC and compaction, which moves live pages into new files)
/// runs soon after a branch is deleted, while pgbench writes to other branches. Every
/// branch stays consistent, and after `kill -9` of the pagestore server the store opens
/// from its checkpoint and every branch comes back intact.
#[test]
fn pagestore_maintenance_under_load_keeps_every_branch_intact() {
    let env = Env::new();
    env.up_with(&["--storage", "pagestore"]);
    let main = env.connection_string("main");
    pgbench_init(&main, "3");
    // A branch that rewrites every account, then goes: garbage for maintenance.
    env.ok(&["branch", "create", "scratch"]);
    env.sql(
        "scratch",
        "update pgbench_accounts set abalance = abalance + 1",
    );
    env.sql("scratch", "checkpoint");
    env.ok(&["branch", "create", "dev"]);
    let dev = env.connection_string("dev");

    let log = env.data_dir.join("logs/pagestore-server.log");
    let maintenance_runs = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("page store maintenance")
            .count()
    };
    let runs_before = maintenance_runs();
    let load = pgbench_load(&main, &["-n", "-c", "2", "-T", "40"]);
    let load_dev = pgbench_load(&dev, &["-n", "-c", "2", "-T", "40"]);
    env.ok(&["branch", "delete", "scratch"]);
    wait_for(
        "maintenance after the deletion",
        std::time::Duration::from_secs(60),
        || maintenance_runs() > runs_before,
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let last = text
        .lines()
        .rfind(|l| l.contains("page store maintenance"))
        .unwrap_or_default()
        .to_string();
    let field = |name: &str| -> u64 {
        last.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {last:?}"))
    };
    assert!(
        field("files_compacted") > 0 && field("pages_moved") > 0,
        "maintenance moved nothing, so this test checks nothing: {last}"
    );
    // A branch taken after maintenance moved pages reads them from their new place.
    env.ok(&["branch", "create", "after", "--parent", "main"]);
    drop(load);
    drop(load_dev);
    for b in ["main", "dev", "after"] {
        assert_pgbench_consistent(&env, b);
    }

    // The store reopens from the checkpoint maintenance wrote, plus the log after it.
    let counts: Vec<String> = ["main", "dev", "after"]
        .iter()
        .map(|b| env.sql(b, "select count(*) from pgbench_history"))
        .collect();
    let servers = env.pagestore_server_pids();
    assert_eq!(servers.len(), 1);
    kill9(servers[0]);
    wait_for(
        "a new pagestore server",
        std::time::Duration::from_secs(60),
        || {
            let now = env.pagestore_server_pids();
            now.len() == 1 && now != servers
        },
    );
    for (b, count) in ["main", "dev", "after"].iter().zip(&counts) {
        let conn = env.connection_string(b);
        wait_for(
            &format!("{b} to come back"),
            std::time::Duration::from_secs(120),
            || try_psql(&conn, "select count(*) from pgbench_history").as_deref() == Some(count),
        );
        assert_pgbench_consistent(&env, b);
    }
    env.down_leaves_nothing();
}
