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

#[test]
fn branching_a_parent_under_pgbench_is_consistent() {
    let env = Env::new();
    env.up();
    let main = env.connection_string("main");
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-q", "-s", "5"])
        .arg(&main)
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

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

    env.ok(&["branch", "create", "snap-1", "--parent", "main"]);
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
    let load2 = Load(
        Command::new(pg_bin("pgbench"))
            .args(["-n", "-c", "2", "-T", "60"])
            .arg(&snap1)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbench on snap-1"),
    );
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
