//! PostgreSQL on a page-store timeline through FUSE, running as the unprivileged `postgres`
//! user, and a branch taken while it writes. Needs root, /dev/fuse and PostgreSQL 15.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::{initdb, postgres_user, tl, Fixture, KillOnDrop, Pg};
use stemma_fuse::{mounts_under, DriverOptions};
use stemma_storage::{CloneFilter, StorageDriver};

/// What the control plane leaves out of a clone (see stemma-control's engine).
fn clone_filter() -> CloneFilter {
    CloneFilter {
        exclude: [
            "postmaster.pid",
            "postmaster.opts",
            "backup_label",
            "tablespace_map",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
        empty: [
            "pg_replslot",
            "pg_dynshmem",
            "pg_notify",
            "pg_serial",
            "pg_snapshots",
            "pg_stat_tmp",
            "pg_subtrans",
        ]
        .iter()
        .map(PathBuf::from)
        .collect(),
        only: vec![],
    }
}

#[test]
fn postgres_branch_of_a_running_parent_recovers_and_is_isolated() {
    branch_of_a_running_parent_recovers_and_is_isolated(DriverOptions::default());
}

/// The same with `pg_wal` on a FUSE mount of its own with passthrough instead of a live
/// directory.
#[test]
fn postgres_branch_of_a_running_parent_recovers_and_is_isolated_on_a_wal_mount() {
    let mut options = DriverOptions::default();
    options.fuse.live_external_dir = false;
    branch_of_a_running_parent_recovers_and_is_isolated(options);
}

/// The same with the WAL mount's reads and writes through the server (passthrough turned
/// off; a kernel without passthrough gets the WAL as pages instead, below).
#[test]
fn postgres_branch_of_a_running_parent_recovers_and_is_isolated_without_passthrough() {
    let mut options = DriverOptions::default();
    options.fuse.passthrough = false;
    options.fuse.live_external_dir = false;
    branch_of_a_running_parent_recovers_and_is_isolated(options);
}

/// The same with the WAL as ordinary pages on the timeline's mount: what a kernel without
/// FUSE passthrough gets (the driver then mounts no `pg_wal` of its own).
#[test]
fn postgres_branch_of_a_running_parent_recovers_and_is_isolated_with_the_wal_as_pages() {
    let mut options = DriverOptions::default();
    options.fuse.external_dir = None;
    branch_of_a_running_parent_recovers_and_is_isolated(options);
}

fn branch_of_a_running_parent_recovers_and_is_isolated(options: DriverOptions) {
    let wal_mount = options.fuse.external_dir.is_some();
    // A live directory is mounted only when a compute is about to start.
    let live = wal_mount && options.fuse.live_external_dir;
    let fx = Fixture::with_options(Some(postgres_user()), options);
    let d = fx.driver();
    let main = tl("0c");
    let data = d.create_empty(&main).unwrap();
    initdb(&data);
    // What the daemon does before a compute starts: pg_wal gets a mount of its own, whose
    // new files are external (passthrough) files.
    d.sync_timeline(&main).unwrap();
    let wal_mounted = |dir: &std::path::Path| {
        mounts_under(dir)
            .unwrap()
            .iter()
            .any(|m| m == &dir.join("pg_wal"))
    };
    assert_eq!(wal_mounted(&data), wal_mount, "pg_wal has its own mount");

    let sock_parent = fx.dir.path().join("sock-parent");
    let sock_child = fx.dir.path().join("sock-child");
    // Declared after the fixture: dropped (stopped) before the driver unmounts.
    let parent = Pg::start(&data, &sock_parent, &[]);
    parent.psql(
        "create table t (id int primary key, v text);
         insert into t select g, md5(g::text) from generate_series(1, 20000) g;
         create table ledger (id bigint primary key, v text);
         create extension amcheck;",
    );

    // A writer committing one row per transaction while the branch is taken.
    let writer = KillOnDrop(
        parent
            .psql_cmd(
                "do $$ begin
                   for i in 1..1000000 loop
                     insert into ledger values (i, repeat('x', 500));
                     update t set v = md5(v) where id = 1 + i % 20000;
                     commit;
                   end loop;
                 end $$;",
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Let it write for a while, with a checkpoint in the middle (data files written too).
    std::thread::sleep(Duration::from_millis(1500));
    parent.psql("checkpoint");
    std::thread::sleep(Duration::from_millis(500));
    let committed_before: i64 = parent.psql("select count(*) from ledger").parse().unwrap();
    assert!(committed_before > 0, "the writer is writing");

    let child = tl("0d");
    d.clone_timeline(&main, &child, &clone_filter()).unwrap();
    let committed_after: i64 = parent.psql("select count(*) from ledger").parse().unwrap();
    drop(writer);

    let cdata = d.data_dir(&child);
    assert!(!cdata.join("postmaster.pid").exists());
    assert_eq!(
        wal_mounted(&cdata),
        wal_mount && !live,
        "the branch's pg_wal has its own mount (a live one: once it starts)"
    );
    let objects = || {
        std::fs::read_dir(fx.root().join("store").join("objects"))
            .map(|e| e.count())
            .unwrap_or(0)
    };
    let parent_objects = objects();
    assert_eq!(
        parent_objects > 0,
        wal_mount,
        "the parent's WAL segments are external files with the WAL mount only"
    );
    let own = d.usage(&child).unwrap().own_storage_bytes;
    assert!(own < 1 << 20, "unchanged branch costs {own} bytes");

    // The child recovers the crash-consistent image like a crash (after what the daemon
    // does before a compute starts).
    d.sync_timeline(&child).unwrap();
    let childpg = Pg::start(&cdata, &sock_child, &[]);
    assert!(
        childpg
            .log_text()
            .contains("database system was interrupted")
            || childpg.log_text().contains("not properly shut down"),
        "the child went through crash recovery:\n{}",
        childpg.log_text()
    );
    let n: i64 = childpg.psql("select count(*) from ledger").parse().unwrap();
    assert!(
        n >= committed_before && n <= committed_after,
        "the branch holds every transaction committed before it ({committed_before}) and none after the branch call returned ({committed_after}): {n}"
    );
    // Rows were committed one per transaction, in order: the branch holds a prefix.
    eprintln!(
        "ledger rows: {committed_before} seen before the branch, {n} in the branch, {committed_after} seen after it"
    );
    assert_eq!(
        childpg.psql("select coalesce(max(id), 0) from ledger"),
        n.to_string()
    );
    assert_eq!(childpg.psql("select count(*) from t"), "20000");
    // Indexes and heap are consistent.
    assert_eq!(
        childpg.psql(
            "select count(*) from (select bt_index_parent_check(c.oid, true) from pg_class c
               join pg_index i on i.indexrelid = c.oid join pg_am a on a.oid = c.relam
              where a.amname = 'btree' and c.relpersistence = 'p' and i.indisready and i.indisvalid) s"
        )
        .parse::<i64>()
        .map(|n| n > 0),
        Ok(true)
    );
    assert_eq!(
        childpg.psql(
            "select count(*) from verify_heapam('t') union all select count(*) from verify_heapam('ledger')"
        ),
        "0\n0"
    );

    // Isolation, both ways, with both computes running.
    childpg.psql("insert into t values (-1, 'child only')");
    parent.psql("insert into t values (-2, 'parent only')");
    assert_eq!(parent.psql("select count(*) from t where id = -1"), "0");
    assert_eq!(childpg.psql("select count(*) from t where id = -2"), "0");
    assert_eq!(childpg.psql("select v from t where id = -1"), "child only");
    // The branch writes WAL into copies of its own of the segments it shares.
    childpg.psql("checkpoint");
    assert_eq!(
        objects() > parent_objects,
        wal_mount,
        "the branch copied the segment it writes ({parent_objects} objects before)"
    );
    assert_eq!(parent.psql("select v from t where id = -2"), "parent only");

    drop(childpg);
    drop(parent);
    let root = fx.root();
    fx.finish();
    assert!(mounts_under(&root).unwrap().is_empty());
}

/// A branch at a past moment holds what was committed a second before it and nothing
/// committed after it, with the WAL in external files: their fsyncs reach the log as notes,
/// which the driver commits within 100 ms even when nothing else is written.
#[test]
fn a_point_in_time_branch_holds_the_commits_before_it() {
    let fx = Fixture::new(Some(postgres_user()));
    let d = fx.driver();
    let main = tl("0e");
    let data = d.create_empty(&main).unwrap();
    initdb(&data);
    d.sync_timeline(&main).unwrap();
    let pg = Pg::start(&data, &fx.dir.path().join("sock-main"), &[]);
    pg.psql("create table t (v int); insert into t values (1)");
    // The store resolves a moment to its 1-s granularity, erring towards the past.
    std::thread::sleep(Duration::from_millis(2000));
    let at = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_millis(1500));
    pg.psql("insert into t values (2)");

    let past = tl("0f");
    d.branch_at(&main, &past, at, &clone_filter()).unwrap();
    let ppg = Pg::start(&d.data_dir(&past), &fx.dir.path().join("sock-past"), &[]);
    assert_eq!(ppg.psql("select string_agg(v::text, ',') from t"), "1");
    assert_eq!(
        pg.psql("select string_agg(v::text, ',' order by v) from t"),
        "1,2"
    );

    drop(ppg);
    drop(pg);
    let root = fx.root();
    fx.finish();
    assert!(mounts_under(&root).unwrap().is_empty());
}
