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

fn try_psql(conn: &str, sql: &str) -> Option<String> {
    let out = Command::new(pg_bin("psql"))
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
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
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
    let conf_dir = env.data_dir.join("timelines").join(tl);
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
    assert_eq!(
        env.sql("main", "select count(*) from t where id in (1, 3)"),
        "2"
    );
    assert_eq!(env.sql("main", "select pg_is_in_recovery()"), "f");
    // The branch made while following is untouched.
    assert_eq!(psql(&dev, "select count(*) from t where id = 2"), "1");
}
