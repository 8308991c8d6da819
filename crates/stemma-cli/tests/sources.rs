//! Sources: a root branch fed by a production database that runs elsewhere (a separate
//! PostgreSQL cluster on loopback stands in for production).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::production::{Background, Production, APP_PASSWORD, REPLICATOR_PASSWORD};
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(90);

fn source(env: &Env, name: &str) -> Value {
    env.json(&["source", "status", name])[0].clone()
}

/// The walsender serving the standby of `slot` on production, if it streams.
fn walsender(prod: &Production, slot: &str) -> Option<String> {
    let pid = prod.sql(
        "postgres",
        &format!(
            "select pid from pg_stat_replication where application_name = '{slot}' and state = 'streaming'"
        ),
    );
    (!pid.is_empty()).then_some(pid)
}

/// The root's endpoint with production's credentials (a standby has production's roles).
fn root_as(env: &Env, branch: &str, user: &str, password: &str) -> String {
    let b = env.json(&["branch", "get", branch]);
    format!(
        "postgresql://{user}:{password}@127.0.0.1:{}/app",
        b["port"].as_u64().expect("port")
    )
}

#[test]
fn physical_source_streams_and_branches_never_touch_production() {
    let env = Env::new();
    env.up();
    let mut prod = Production::start();
    prod.sql(
        "app",
        "create table t(id int primary key, note text); alter table t owner to app",
    );
    let init = Command::new(pg_bin("pgbench"))
        .args(["-i", "-s", "1", "-q", "-d", &prod.socket_uri("app")])
        .stdin(Stdio::null())
        .output()
        .expect("run pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    // pgbench keeps writing to production for the whole test (rate-limited: 2 shared cores).
    let _pgbench = Background(
        Command::new(pg_bin("pgbench"))
            .args([
                "-n",
                "-c",
                "1",
                "-R",
                "20",
                "-T",
                "600",
                "-d",
                &prod.socket_uri("app"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pgbench"),
    );

    let url = prod.replicator_url();
    let out = env.ok(&["source", "add", "prod", "--url", &url, "--mode", "physical"]);
    assert!(
        !out.contains(REPLICATOR_PASSWORD),
        "password printed: {out}"
    );
    let s = source(&env, "prod");
    assert_eq!(s["mode"], "physical");
    assert_eq!(s["branch"], "main");
    assert_eq!(s["state"], "ready");
    let slot = s["slot"].as_str().expect("a slot").to_string();
    assert!(slot.starts_with("stemma_prod_"), "{slot}");
    assert!(s["url"].as_str().unwrap().contains("****"), "{s}");
    assert!(!s.to_string().contains(REPLICATOR_PASSWORD), "{s}");
    assert_eq!(prod.slots(), vec![slot.clone()]);
    // The password is kept where only the daemon's user can read it.
    let mode = std::fs::metadata(env.data_dir.join("metadata.db"))
        .expect("the metadata store")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    // A root with a source is not deleted behind its back (its slot would stay on production).
    let e = env.fail(&["branch", "delete", "main"]);
    assert!(e.contains("source remove"), "{e}");
    wait_for("the standby to stream", WAIT, || {
        walsender(&prod, &slot).is_some()
    });
    let s = source(&env, "prod");
    assert_eq!(s["replication"], "streaming", "{s}");
    assert!(s["retained_wal_bytes"].is_u64(), "{s}");

    // A row committed on production shows up in the standby, then in a new branch of it.
    prod.sql("app", "insert into t values (1, 'from production')");
    let main_ro = root_as(&env, "main", "app", APP_PASSWORD);
    wait_for("the row to reach main", WAIT, || {
        try_psql(&main_ro, "select count(*) from t where id = 1").as_deref() == Some("1")
    });
    assert_eq!(
        try_psql(&main_ro, "select pg_is_in_recovery()").as_deref(),
        Some("t")
    );
    // main's connection string names production's user (never its password) and says why.
    let out = env.run(&["connection-string", "main"]);
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        printed.starts_with("postgresql://replicator@127.0.0.1:") && printed.ends_with("/app"),
        "{printed}"
    );
    assert!(
        note.contains("read-only hot standby of source \"prod\""),
        "{note}"
    );
    assert!(!printed.contains(REPLICATOR_PASSWORD) && !note.contains(REPLICATOR_PASSWORD));
    let cs = env.json(&["connection-string", "main"]);
    assert_eq!(cs["follows_source"], "prod", "{cs}");
    assert!(cs.get("source_password").is_none(), "{cs}");
    let b = env.json(&["branch", "get", "main"]);
    assert_eq!(b["follows_source"], "prod", "{b}");
    assert_eq!(b["connection_string"].as_str(), Some(printed.as_str()));
    assert!(
        b["note"]
            .as_str()
            .is_some_and(|n| n.contains("production's credentials")),
        "{b}"
    );
    assert!(!b.to_string().contains(REPLICATOR_PASSWORD), "{b}");
    let human = env.ok(&["branch", "get", "main"]);
    assert!(human.contains("read-only hot standby"), "{human}");
    assert!(!human.contains(REPLICATOR_PASSWORD), "{human}");
    // `stemma psql main` logs in with the source's stored credentials.
    let out = env.ok(&[
        "psql",
        "main",
        "--",
        "-X",
        "-A",
        "-t",
        "-c",
        "select current_user || ' ' || pg_is_in_recovery()",
    ]);
    assert_eq!(out.trim(), "replicator true");
    env.ok(&["branch", "create", "dev", "--parent", "main"]);
    let dev = env.connection_string("dev");
    assert_eq!(
        psql(&dev, "select note from t where id = 1"),
        "from production"
    );
    assert_eq!(psql(&dev, "select pg_is_in_recovery()"), "f");
    assert_eq!(psql(&dev, "select count(*) from pg_stat_wal_receiver"), "0");
    psql(&dev, "insert into t values (2, 'only in dev')");
    psql(
        &dev,
        "update pgbench_accounts set abalance = abalance + 1 where aid < 100",
    );
    assert_eq!(prod.sql("app", "select count(*) from t where id = 2"), "0");
    let amcheck = Command::new(pg_bin("pg_amcheck"))
        .args(["--install-missing", "--heapallindexed", &dev])
        .stdin(Stdio::null())
        .output()
        .expect("run pg_amcheck");
    assert!(
        amcheck.status.success(),
        "pg_amcheck: {}{}",
        String::from_utf8_lossy(&amcheck.stdout),
        String::from_utf8_lossy(&amcheck.stderr)
    );
    // Only the standby replicates from production; the branch never does.
    assert_eq!(
        prod.sql(
            "postgres",
            "select string_agg(application_name, ',') from pg_stat_replication"
        ),
        slot
    );
    let dev_conf = env.json(&["branch", "get", "dev"]);
    let tl = dev_conf["timeline_id"].as_str().unwrap();
    let conf_dir = env.timeline_dir(tl);
    assert!(
        conf_dir.join("PG_VERSION").exists(),
        "{}",
        conf_dir.display()
    );
    assert!(!conf_dir.join("standby.signal").exists());
    let conf = std::fs::read_to_string(conf_dir.join("postgresql.conf")).unwrap_or_default()
        + &std::fs::read_to_string(conf_dir.join("postgresql.auto.conf")).unwrap_or_default();
    assert!(!conf.contains("primary_conninfo"), "{conf}");
    assert!(!conf.contains(REPLICATOR_PASSWORD), "{conf}");

    // Killing the standby's compute: it is restarted and streams again.
    let before = walsender(&prod, &slot).expect("streaming");
    let pid = env.json(&["branch", "get", "main"])["compute"]["pid"]
        .as_u64()
        .expect("main runs") as u32;
    kill9(pid);
    wait_for("streaming to resume after the standby died", WAIT, || {
        walsender(&prod, &slot).is_some_and(|p| p != before)
    });

    // Restarting production: the standby reconnects by itself.
    let before = walsender(&prod, &slot).expect("streaming");
    prod.stop();
    prod.start_again();
    wait_for(
        "streaming to resume after production restarted",
        WAIT,
        || walsender(&prod, &slot).is_some_and(|p| p != before),
    );
    prod.sql("app", "insert into t values (3, 'after restart')");
    wait_for("the new row to reach main", WAIT, || {
        try_psql(&main_ro, "select count(*) from t where id = 3").as_deref() == Some("1")
    });

    // Removing the source leaves nothing on production; main becomes an ordinary root.
    env.ok(&["source", "remove", "prod"]);
    assert!(prod.slots().is_empty(), "{:?}", prod.slots());
    assert_eq!(
        prod.sql("postgres", "select count(*) from pg_stat_replication"),
        "0"
    );
    assert_eq!(env.json(&["source", "status"]), serde_json::json!([]));
    let b = env.json(&["branch", "get", "main"]);
    assert!(b["follows_source"].is_null() && b["note"].is_null(), "{b}");
    assert!(
        !b["connection_string"]
            .as_str()
            .unwrap_or_default()
            .starts_with("postgresql://replicator"),
        "{b}"
    );
    assert_eq!(
        env.sql("main", "select count(*) from t where id in (1, 3)"),
        "2"
    );
    assert_eq!(env.sql("main", "select pg_is_in_recovery()"), "f");
    // The branch made while following is untouched.
    assert_eq!(psql(&dev, "select count(*) from t where id = 2"), "1");
}

#[test]
fn snapshot_source_refreshes_main_and_keeps_older_branches() {
    let env = Env::new();
    env.up();
    let mut prod = Production::start();
    prod.sql(
        "app",
        "create table t(id int primary key, note text); alter table t owner to app; \
         insert into t values (1, 'one'), (2, 'two')",
    );
    let url = prod.url("app", APP_PASSWORD, "app");
    let out = env.ok(&["source", "add", "prod", "--url", &url, "--mode", "snapshot"]);
    assert!(!out.contains(APP_PASSWORD), "password printed: {out}");
    let s = source(&env, "prod");
    assert_eq!(s["mode"], "snapshot");
    assert_eq!(s["state"], "ready");
    assert!(s["slot"].is_null());
    assert!(s["last_refresh_at"].is_string(), "{s}");
    assert_eq!(env.sql("main", "select count(*) from t"), "2");
    let main_conn = env.connection_string("main");

    env.ok(&["branch", "create", "before", "--parent", "main"]);
    prod.sql("app", "insert into t values (3, 'three')");
    let refreshed = env.json(&["source", "refresh", "prod"]);
    assert_eq!(refreshed[0]["state"], "ready");
    // The root switched to the new snapshot and kept its connection string.
    assert_eq!(env.connection_string("main"), main_conn);
    assert_eq!(psql(&main_conn, "select count(*) from t"), "3");
    // A branch made before keeps the old rows; a reset brings the new state.
    assert_eq!(env.sql("before", "select count(*) from t"), "2");
    env.ok(&["branch", "reset", "before"]);
    assert_eq!(env.sql("before", "select count(*) from t"), "3");

    // Production down: the refresh fails, main keeps serving what it had and status says why.
    prod.sql("app", "insert into t values (4, 'four')");
    prod.stop();
    let e = env.fail(&["source", "refresh", "prod"]);
    assert!(e.contains("cannot reach"), "{e}");
    assert!(!e.contains(APP_PASSWORD), "{e}");
    assert_eq!(psql(&main_conn, "select count(*) from t"), "3");
    let s = source(&env, "prod");
    assert_eq!(s["state"], "ready");
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|m| m.contains("cannot reach")),
        "{s}"
    );
    prod.start_again();
    env.ok(&["source", "refresh", "prod"]);
    assert_eq!(psql(&main_conn, "select count(*) from t"), "4");
    assert!(source(&env, "prod")["last_error"].is_null());

    // Removing a snapshot source leaves the root as it is.
    env.ok(&["source", "remove", "prod"]);
    assert_eq!(psql(&main_conn, "select count(*) from t"), "4");
    assert!(prod.slots().is_empty());
}

#[test]
fn bad_sources_are_refused_and_leave_nothing_behind() {
    let env = Env::new();
    env.up();
    let prod = Production::start();
    let timelines = env.timeline_dirs().len();
    let branches = env.json(&["branch", "list"]).as_array().unwrap().len();
    let nothing_created = |what: &str| {
        assert_eq!(
            env.json(&["source", "status"]),
            serde_json::json!([]),
            "{what}"
        );
        assert_eq!(env.timeline_dirs().len(), timelines, "{what}");
        assert_eq!(
            env.json(&["branch", "list"]).as_array().unwrap().len(),
            branches,
            "{what}"
        );
        assert!(prod.slots().is_empty(), "{what}: {:?}", prod.slots());
    };
    let add = |url: &str, extra: &[&str]| {
        let mut args = vec!["source", "add", "prod", "--url", url, "--mode", "physical"];
        args.extend_from_slice(extra);
        env.fail(&args)
    };

    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let e = add(
        &format!("postgresql://replicator:x@127.0.0.1:{closed}/app"),
        &[],
    );
    assert!(e.contains("cannot reach the source database"), "{e}");
    nothing_created("unreachable");

    let e = add(&prod.url("replicator", "wrong-secret", "app"), &[]);
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong-secret"), "{e}");
    nothing_created("wrong password");

    let e = add(&prod.url("app", APP_PASSWORD, "app"), &[]);
    assert!(e.contains("REPLICATION"), "{e}");
    assert!(!e.contains(APP_PASSWORD), "{e}");
    nothing_created("no replication privilege");

    let e = add(&prod.url("blocked", "blocked", "app"), &[]);
    assert!(e.contains("pg_hba.conf"), "{e}");
    nothing_created("pg_hba refusal");

    let e = env.fail(&[
        "source",
        "add",
        "prod",
        "--url",
        "mysql://x@y/z",
        "--mode",
        "physical",
    ]);
    assert!(e.contains("postgresql://"), "{e}");
    // A new root of its own (--branch names one that does not exist yet) is removed too.
    let e = add(
        &prod.url("app", APP_PASSWORD, "app"),
        &["--branch", "mirror"],
    );
    assert!(e.contains("REPLICATION"), "{e}");
    nothing_created("failed add into a new root");

    // A root that holds data is replaced only with --replace.
    env.sql("main", "create table keep(id int)");
    let e = add(&prod.replicator_url(), &[]);
    assert!(e.contains("--replace"), "{e}");
    nothing_created("root holds data");
    env.sql("main", "drop table keep");

    // A second source for the same branch.
    env.ok(&[
        "source",
        "add",
        "snap",
        "--url",
        &prod.url("app", APP_PASSWORD, "app"),
        "--mode",
        "snapshot",
        "--branch",
        "mirror",
    ]);
    let e = env.fail(&[
        "source",
        "add",
        "other",
        "--url",
        &prod.replicator_url(),
        "--mode",
        "physical",
        "--branch",
        "mirror",
        "--replace",
    ]);
    assert!(e.contains("already has the source"), "{e}");
    let e = env.fail(&[
        "source",
        "add",
        "snap",
        "--url",
        &prod.replicator_url(),
        "--mode",
        "physical",
    ]);
    assert!(e.contains("already exists"), "{e}");
    let e = env.fail(&["source", "refresh", "nope"]);
    assert!(e.contains("does not exist"), "{e}");
    assert!(prod.slots().is_empty());
    assert_eq!(env.json(&["source", "status"]).as_array().unwrap().len(), 1);
}

#[test]
fn physical_source_on_the_pagestore_survives_a_daemon_restart() {
    let env = Env::new();
    env.up_with(&["--storage", "pagestore"]);
    let prod = Production::start();
    prod.sql(
        "app",
        "create table t(id int primary key, note text); alter table t owner to app",
    );
    env.ok(&[
        "source",
        "add",
        "prod",
        "--url",
        &prod.replicator_url(),
        "--mode",
        "physical",
    ]);
    let slot = source(&env, "prod")["slot"].as_str().unwrap().to_string();
    wait_for("the standby to stream", WAIT, || {
        walsender(&prod, &slot).is_some()
    });
    prod.sql("app", "insert into t values (1, 'from production')");
    let main_ro = root_as(&env, "main", "app", APP_PASSWORD);
    wait_for("the row to reach main", WAIT, || {
        try_psql(&main_ro, "select count(*) from t where id = 1").as_deref() == Some("1")
    });
    // An O(1) branch of the running standby, promoted on its own.
    env.ok(&["branch", "create", "dev", "--parent", "main"]);
    let dev = env.connection_string("dev");
    assert_eq!(
        psql(&dev, "select note from t where id = 1"),
        "from production"
    );
    psql(&dev, "insert into t values (2, 'only in dev')");
    assert_eq!(prod.sql("app", "select count(*) from t"), "1");

    // A branch of a past moment of the standby is cut loose as well. The pagestore resolves a
    // time to a position up to its granularity (1 s) earlier, so the moment is taken that
    // long after the standby was seen consistent (else it may resolve to the middle of the
    // base backup, which no start can recover).
    std::thread::sleep(Duration::from_millis(1100));
    let at = prod.sql(
        "postgres",
        "select to_char(now() at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    wait_for("a moment strictly in the past", WAIT, || {
        prod.sql(
            "postgres",
            &format!("select now() > '{at}'::timestamptz + interval '10 milliseconds'"),
        ) == "t"
    });
    env.ok(&["branch", "create", "past", "--parent", "main", "--at", &at]);
    let past = env.connection_string("past");
    assert_eq!(psql(&past, "select pg_is_in_recovery()"), "f");
    psql(&past, "insert into t values (100, 'only in past')");
    assert_eq!(
        prod.sql(
            "postgres",
            "select string_agg(application_name, ',') from pg_stat_replication"
        ),
        slot
    );
    let e = env.fail(&["branch", "restore", "main", "--at", &at]);
    assert!(e.contains("follows production"), "{e}");

    // Stemma stops and starts again: the root streams again by itself. A branch whose first
    // start was cut off (its promotion directory is left, as a crash would leave it) is gone.
    let before = walsender(&prod, &slot).expect("streaming");
    let past_tl = env.json(&["branch", "get", "past"])["timeline_id"]
        .as_str()
        .expect("a timeline")
        .to_string();
    env.ok(&["down"]);
    std::fs::create_dir_all(
        env.data_dir
            .join("run")
            .join(format!("promoting-{past_tl}")),
    )
    .expect("a promotion directory");
    env.up_with(&["--storage", "pagestore"]);
    let names: Vec<String> = env
        .json(&["branch", "list"])
        .as_array()
        .expect("branches")
        .iter()
        .filter_map(|b| b["name"].as_str().map(String::from))
        .collect();
    assert!(!names.contains(&"past".to_string()), "{names:?}");
    assert!(names.contains(&"dev".to_string()), "{names:?}");
    assert!(!env
        .data_dir
        .join("run")
        .join(format!("promoting-{past_tl}"))
        .exists());
    wait_for("streaming to resume after a daemon restart", WAIT, || {
        walsender(&prod, &slot).is_some_and(|p| p != before)
    });
    prod.sql("app", "insert into t values (3, 'after restart')");
    wait_for("the new row to reach main", WAIT, || {
        try_psql(&main_ro, "select count(*) from t where id = 3").as_deref() == Some("1")
    });
    assert_eq!(psql(&dev, "select count(*) from t"), "2");
    env.ok(&["source", "remove", "prod"]);
    assert!(prod.slots().is_empty());
}

#[test]
fn a_slot_beyond_its_hard_limit_is_dropped_and_the_root_reseeded() {
    let env = Env::new();
    env.up();
    let prod = Production::start();
    prod.sql(
        "app",
        "create table t(id int primary key, note text); alter table t owner to app",
    );
    // Warn above 4 MiB, drop and re-seed above 4 x 4 MiB.
    let limit = (4u64 << 20).to_string();
    env.ok(&[
        "source",
        "add",
        "prod",
        "--url",
        &prod.replicator_url(),
        "--mode",
        "physical",
        "--max-retained-wal-bytes",
        &limit,
    ]);
    let old_slot = source(&env, "prod")["slot"].as_str().unwrap().to_string();
    wait_for("the standby to stream", WAIT, || {
        walsender(&prod, &old_slot).is_some()
    });
    // The standby stops on purpose; production goes on writing and the slot holds WAL back.
    env.ok(&["compute", "stop", "main"]);
    prod.sql(
        "app",
        "create table filler as select g, repeat('x', 200) as pad from generate_series(1, 120000) g",
    );
    prod.sql("app", "insert into t values (1, 'after the drop')");
    wait_for("the slot to be replaced", WAIT, || {
        let s = source(&env, "prod");
        s["state"] == "ready" && s["slot"].as_str() != Some(old_slot.as_str())
    });
    let s = source(&env, "prod");
    let new_slot = s["slot"].as_str().unwrap().to_string();
    assert!(
        s["last_error"]
            .as_str()
            .is_some_and(|m| m.contains("hard limit") && m.contains("re-seeded")),
        "{s}"
    );
    assert_eq!(prod.slots(), vec![new_slot.clone()]);
    wait_for("the re-seeded standby to stream", WAIT, || {
        walsender(&prod, &new_slot).is_some()
    });
    let main_ro = root_as(&env, "main", "app", APP_PASSWORD);
    assert_eq!(
        try_psql(&main_ro, "select count(*) from t where id = 1").as_deref(),
        Some("1")
    );
    env.ok(&["source", "remove", "prod"]);
    assert!(prod.slots().is_empty());
}

#[test]
fn a_schedule_refreshes_the_source_then_resets_dev_and_stops_at_a_failure() {
    let env = Env::new();
    let project = tempfile::tempdir().unwrap();
    let config = project.path().join("stemma.toml");
    std::fs::write(
        &config,
        "[[schedule]]\nname = \"nightly\"\nat = \"*/2 * * * * *\"\nsteps = [\"refresh prod\", \"reset dev\"]\n",
    )
    .unwrap();
    env.up_with(&["--config", config.to_str().unwrap()]);
    let mut prod = Production::start();
    prod.sql(
        "app",
        "create table t(id int primary key); alter table t owner to app; insert into t values (1)",
    );
    let url = prod.url("app", APP_PASSWORD, "app");
    env.ok(&["source", "add", "prod", "--url", &url, "--mode", "snapshot"]);
    env.ok(&["branch", "create", "dev", "--parent", "main"]);
    prod.sql("app", "insert into t values (2)");
    wait_for("a scheduled refresh, then a reset of dev", WAIT, || {
        let s = source(&env, "prod");
        s["last_scheduled_refresh"]["outcome"] == "ok"
            && env.json(&["branch", "get", "dev"])["last_scheduled_reset"]["outcome"] == "ok"
            && env.sql("dev", "select count(*) from t") == "2"
    });
    // Production down: the refresh fails and the reset of dev is skipped; dev keeps its rows.
    prod.stop();
    wait_for("a failed refresh and a skipped reset", WAIT, || {
        let s = source(&env, "prod");
        s["last_scheduled_refresh"]["outcome"] == "failed"
            && env.json(&["branch", "get", "dev"])["last_scheduled_reset"]["outcome"] == "skipped"
    });
    assert_eq!(env.sql("dev", "select count(*) from t"), "2");
    assert_eq!(env.sql("main", "select count(*) from t"), "2");
}

#[test]
fn a_refresh_cut_off_by_a_daemon_crash_leaves_main_serving() {
    let env = Env::new();
    env.up();
    let prod = Production::start();
    prod.sql(
        "app",
        "create table t(id int primary key, pad text); alter table t owner to app; \
         insert into t select g, repeat('x', 100) from generate_series(1, 200000) g",
    );
    let url = prod.url("app", APP_PASSWORD, "app");
    env.ok(&["source", "add", "prod", "--url", &url, "--mode", "snapshot"]);
    assert_eq!(env.sql("main", "select count(*) from t"), "200000");
    prod.sql("app", "insert into t values (0, 'new')");

    let mut refresh = env
        .cmd(&["source", "refresh", "prod"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start a refresh");
    wait_for("the refresh to start", WAIT, || {
        source(&env, "prod")["state"] == "refreshing"
    });
    kill9(env.daemon_pid().expect("the daemon runs"));
    let _ = refresh.wait();
    env.up();
    wait_for("the source to be usable again", WAIT, || {
        source(&env, "prod")["state"] == "ready"
    });
    // Either the whole refresh or none of it; main serves, and the next refresh works.
    let n = env.sql("main", "select count(*) from t");
    assert!(n == "200000" || n == "200001", "{n}");
    env.ok(&["source", "refresh", "prod"]);
    assert_eq!(env.sql("main", "select count(*) from t"), "200001");
    // No stray compute of the cut-off refresh is left: only main's postmaster runs.
    assert_eq!(
        postmasters_under(&env).len(),
        1,
        "{:?}",
        postmasters_under(&env)
    );
}

/// Postmasters (of any timeline, even a deleted one) under the environment's data directory.
fn postmasters_under(env: &Env) -> Vec<u32> {
    let dir = env.data_dir.display().to_string();
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| {
                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let args: Vec<String> = cmd
                        .split(|b| *b == 0)
                        .map(|a| String::from_utf8_lossy(a).into_owned())
                        .collect();
                    alive(*pid)
                        && args.first().is_some_and(|a| a.ends_with("/postgres"))
                        && args.iter().any(|a| a.starts_with(&dir))
                })
                .collect()
        })
        .unwrap_or_default()
}
