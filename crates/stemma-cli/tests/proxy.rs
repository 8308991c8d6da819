//! Endpoints and scale to zero: real clients through the proxy.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// The server's message of a database error, else the whole error.
fn msg(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

fn state(env: &Env, branch: &str) -> String {
    env.json(&["branch", "get", branch])["state"]
        .as_str()
        .unwrap()
        .to_string()
}

fn shared_port(env: &Env) -> u64 {
    env.json(&["status"])["proxy_port"]
        .as_u64()
        .expect("proxy_port")
}

#[test]
fn idle_computes_suspend_and_wake_on_connect() {
    let env = Env::new();
    env.up();
    env.sql("main", "create table t(v int); insert into t values (7)");
    env.ok(&["branch", "create", "dev", "--suspend-timeout", "1s"]);
    let conn = env.connection_string("dev");
    wait_for("dev to suspend", Duration::from_secs(30), || {
        state(&env, "dev") == "suspended"
    });
    assert!(env.json(&["status"])["computes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|c| c["branch"] != "dev"));
    // No process of the branch remains.
    assert_eq!(env.compute_pids().len(), 1);
    // The same connection string wakes it.
    assert_eq!(psql(&conn, "select v from t"), "7");
    assert_eq!(env.connection_string("dev"), conn);
    // main has the default timeout (5 minutes): still running.
    assert_eq!(state(&env, "main"), "running");

    // `--suspend-timeout 0` never suspends; `branch set` changes it.
    env.ok(&["branch", "set", "dev", "--suspend-timeout", "0"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(state(&env, "dev"), "running");
    env.ok(&["branch", "set", "dev", "--suspend-timeout", "1s"]);
    wait_for("dev to suspend again", Duration::from_secs(30), || {
        state(&env, "dev") == "suspended"
    });

    let metrics = http_get(&env, "/metrics");
    for name in [
        "stemma_computes_running",
        "stemma_compute_starts_total",
        "stemma_compute_suspensions_total",
        "stemma_cold_start_seconds_bucket",
        "stemma_proxy_connections_open",
        "stemma_proxy_connections_total",
        "stemma_proxy_client_to_compute_bytes_total",
        "stemma_proxy_compute_to_client_bytes_total",
    ] {
        assert!(
            metrics.contains(name),
            "{name} missing from /metrics:\n{metrics}"
        );
    }
    assert!(
        metrics.contains("stemma_cold_start_seconds_count 1"),
        "{metrics}"
    );
}

fn http_get(env: &Env, path: &str) -> String {
    use std::io::{Read, Write};
    let url = env.json(&["status"])["api_url"]
        .as_str()
        .unwrap()
        .to_string();
    let host = url.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&host).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn the_shared_port_routes_by_branch_and_names_unknown_ones() {
    let env = Env::new();
    env.up();
    env.ok(&["branch", "create", "dev/alice"]);
    env.sql("dev/alice", "create table only_here(x int)");
    let port = shared_port(&env);
    let conn = env.connection_string("dev/alice");
    let creds = conn
        .trim_start_matches("postgresql://")
        .split('@')
        .next()
        .unwrap()
        .to_string();
    let via_shared = |branch: &str| {
        format!(
            "postgresql://{creds}@127.0.0.1:{port}/postgres?options=branch%3D{}",
            branch.replace('/', "%2F")
        )
    };
    assert_eq!(
        psql(&via_shared("dev/alice"), "select count(*) from only_here"),
        "0"
    );
    // Other options still reach PostgreSQL.
    let with_opts = format!("{}%20-c%20work_mem%3D9MB", via_shared("dev/alice"));
    assert_eq!(psql(&with_opts, "show work_mem"), "9MB");

    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-c", "select 1", &via_shared("nope")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("branch \"nope\" does not exist"), "{err}");

    let no_branch = format!("postgresql://{creds}@127.0.0.1:{port}/postgres");
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-c", "select 1", &no_branch])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no branch chosen"));
}

#[test]
fn ssl_is_refused_cleanly() {
    let env = Env::new();
    env.up();
    let conn = env.connection_string("main");
    // sslmode=prefer falls back to plain text after the proxy says no.
    assert_eq!(psql(&format!("{conn}?sslmode=prefer"), "select 1"), "1");
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-c", "select 1", &format!("{conn}?sslmode=require")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server does not support SSL"), "{err}");
    // GSS encryption is refused as well; gssencmode=prefer falls back.
    assert_eq!(psql(&format!("{conn}?gssencmode=prefer"), "select 1"), "1");
}

#[test]
fn cancel_reaches_the_right_compute() {
    let env = Env::new();
    env.up();
    env.ok(&["branch", "create", "dev"]);
    let conn = env.connection_string("dev");
    rt().block_on(async {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        let token = client.cancel_token();
        let sleeper = tokio::spawn(async move { client.simple_query("select pg_sleep(30)").await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let result = tokio::time::timeout(Duration::from_secs(10), sleeper)
            .await
            .expect("cancelled in time")
            .unwrap();
        let err = result.expect_err("the query was cancelled");
        assert!(
            msg(&err).contains("canceling statement due to user request"),
            "{err:?}"
        );
    });
}

#[test]
fn reset_and_delete_end_open_connections_with_a_clear_error() {
    let env = Env::new();
    env.up();
    env.sql("main", "create table t(v int)");
    env.ok(&["branch", "create", "dev"]);
    env.sql("dev", "insert into t values (1)");
    let conn = env.connection_string("dev");
    rt().block_on(async {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn_task = tokio::spawn(connection);
        client.simple_query("select 1").await.unwrap();
        let out = tokio::task::spawn_blocking({
            let data = env.data_dir.clone();
            move || {
                Command::new(STEMMA)
                    .args(["branch", "reset", "dev"])
                    .env("STEMMA_DATA_DIR", data)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ended = tokio::time::timeout(Duration::from_secs(10), conn_task)
            .await
            .expect("connection ended")
            .unwrap();
        let err = ended.expect_err("the connection ended with an error");
        assert!(msg(&err).contains("was reset"), "{}", msg(&err));
    });
    // The same connection string works again, on the parent's state.
    assert_eq!(psql(&conn, "select count(*) from t"), "0");

    rt().block_on(async {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        let conn_task = tokio::spawn(connection);
        client.simple_query("select 1").await.unwrap();
        let data = env.data_dir.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(STEMMA)
                .args(["branch", "delete", "dev"])
                .env("STEMMA_DATA_DIR", data)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(10), conn_task)
            .await
            .expect("connection ended")
            .unwrap();
        assert!(msg(&ended.expect_err("ended")).contains("was deleted"));
    });
}

#[test]
fn fifty_concurrent_first_connections_start_one_compute() {
    let env = Env::new();
    env.up();
    env.ok(&["branch", "create", "dev"]);
    env.ok(&["compute", "stop", "dev"]);
    assert_eq!(state(&env, "dev"), "suspended");
    let conn = env.connection_string("dev");
    let starts_before = metric(&env, "stemma_compute_starts_total");
    rt().block_on(async {
        let mut tasks = Vec::new();
        for i in 0..50 {
            let conn = conn.clone();
            tasks.push(tokio::spawn(async move {
                let (client, connection) =
                    tokio_postgres::connect(&conn, tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                let row = client.query_one("select $1::int + 1", &[&i]).await?;
                Ok::<i32, tokio_postgres::Error>(row.get(0))
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as i32 + 1);
        }
    });
    assert_eq!(
        metric(&env, "stemma_compute_starts_total"),
        starts_before + 1.0
    );
    assert_eq!(state(&env, "dev"), "running");
}

fn metric(env: &Env, name: &str) -> f64 {
    let text = http_get(env, "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in {text}"))
}

#[test]
fn the_cap_suspends_the_least_recently_used_idle_compute() {
    let env = Env::new();
    env.up_with(&["--max-computes", "2"]);
    env.ok(&["branch", "create", "a"]);
    env.ok(&["compute", "stop", "a"]);
    env.ok(&["branch", "create", "b"]);
    // main and b run; waking a suspends the least recently used idle one.
    env.sql("b", "select 1");
    assert_eq!(env.sql("a", "select 1"), "1");
    assert_eq!(state(&env, "main"), "suspended");
    assert_eq!(state(&env, "b"), "running");

    // With both running computes busy, a third connection gets a clear error.
    let a = env.connection_string("a");
    let b = env.connection_string("b");
    let main = env.connection_string("main");
    rt().block_on(async {
        let (ca, xa) = tokio_postgres::connect(&a, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(xa);
        let (cb, xb) = tokio_postgres::connect(&b, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(xb);
        let err = tokio_postgres::connect(&main, tokio_postgres::NoTls)
            .await
            .err()
            .expect("refused");
        assert!(
            msg(&err).contains("too many computes are running"),
            "{}",
            msg(&err)
        );
        drop((ca, cb));
    });
}

#[test]
fn a_daemon_restart_keeps_every_port() {
    let env = Env::new();
    env.up();
    for b in ["a", "b", "c"] {
        env.ok(&["branch", "create", b]);
    }
    let before: Vec<(String, String)> = ["main", "a", "b", "c"]
        .iter()
        .map(|b| (b.to_string(), env.connection_string(b)))
        .collect();
    env.ok(&["down"]);
    env.up();
    for (b, conn) in &before {
        assert_eq!(&env.connection_string(b), conn);
        // Suspended after the restart, woken by the connection.
        assert_eq!(psql(conn, "select 1"), "1");
    }
}

#[test]
fn tls_with_the_branch_chosen_by_the_server_name() {
    let certified = rcgen::generate_simple_self_signed(vec![
        "stemma.test".to_string(),
        "*.stemma.test".to_string(),
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    let env = Env::new();
    env.up_with(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    env.ok(&["branch", "create", "dev"]);
    env.sql("dev", "create table only_in_dev(x int)");
    let conn = env.connection_string("dev");
    let creds = conn
        .trim_start_matches("postgresql://")
        .split('@')
        .next()
        .unwrap()
        .to_string();
    // The branch's own port, encrypted.
    assert_eq!(
        psql(
            &format!("{conn}?sslmode=require"),
            "select count(*) from only_in_dev"
        ),
        "0"
    );
    // The shared port: `dev.stemma.test` chooses dev (SNI), verified against the certificate.
    let port = shared_port(&env);
    let via_sni = format!(
        "postgresql://{creds}@dev.stemma.test:{port}/postgres?hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}",
        cert.display()
    );
    assert_eq!(psql(&via_sni, "select count(*) from only_in_dev"), "0");
    let unknown = via_sni.replace("dev.stemma.test", "nope.stemma.test");
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-c", "select 1", &unknown])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("branch \"nope\" does not exist"));
}

/// Whether this run's daemon joins connections in the kernel: on by default where the host
/// allows it (root, BPF, cgroup v2: this project's test machines), off with
/// `STEMMA_PROXY_SHORTCUT=0` (the suite's second run, which keeps the userspace relay tested).
fn shortcut_expected() -> bool {
    std::env::var("STEMMA_PROXY_SHORTCUT").map_or(true, |v| v != "0")
}

#[test]
fn sessions_bulk_transfers_and_unix_only_hba_rules_through_the_proxy() {
    let env = Env::new();
    env.up();
    env.sql("main", "create table t(id int, s text)");
    let conn = env.connection_string("main");
    let joined_before = metric(&env, "stemma_proxy_shortcut_connections_total");
    rt().block_on(async {
        let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        // Short round trips (what the shortcut carries)...
        for i in 0..500i32 {
            let row = client.query_one("select $1::int * 2", &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i * 2);
        }
        // ...a large result (a bulk send: the connection leaves the shortcut)...
        let rows = client
            .query(
                "select g, repeat(md5(g::text), 8) from generate_series(1, 50000) g",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 50000);
        for (i, r) in rows.iter().enumerate() {
            assert_eq!(r.get::<_, i32>(0), i as i32 + 1);
            assert_eq!(r.get::<_, &str>(1).len(), 256);
        }
        // ...and short ones again, through the proxy's sockets.
        for i in 0..100i32 {
            let row = client.query_one("select $1::int + 1", &[&i]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), i + 1);
        }
    });
    let joined = metric(&env, "stemma_proxy_shortcut_connections_total") - joined_before;
    if shortcut_expected() {
        assert_eq!(joined, 1.0, "the session was joined in the kernel");
    } else {
        assert_eq!(joined, 0.0);
    }

    // Bulk from the client: COPY of 8 MB on psql's standard input.
    let data: String = (0..100_000)
        .map(|i| format!("{i}\t{}\n", "x".repeat(80)))
        .collect();
    let mut child = Command::new(pg_bin("psql"))
        .args([conn.as_str(), "-X", "-q", "-v", "ON_ERROR_STOP=1"])
        .args(["-c", "copy t from stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(data.as_bytes()).unwrap();
    }
    assert!(child.wait().unwrap().success());
    assert_eq!(
        psql(&conn, "select count(*), sum(id), sum(length(s)) from t"),
        "100000|4999950000|8000000"
    );

    // A data directory whose pg_hba.conf has rules for Unix sockets only: the proxy cannot
    // use the compute's TCP address and connects to its socket instead.
    let dir = psql(&conn, "show data_directory");
    std::fs::write(
        std::path::Path::new(&dir).join("pg_hba.conf"),
        "local all all scram-sha-256\n",
    )
    .unwrap();
    assert_eq!(psql(&conn, "select pg_reload_conf()"), "t");
    let joined_before = metric(&env, "stemma_proxy_shortcut_connections_total");
    for _ in 0..3 {
        assert_eq!(psql(&conn, "select 41 + 1"), "42");
    }
    assert_eq!(
        metric(&env, "stemma_proxy_shortcut_connections_total"),
        joined_before,
        "relayed by the proxy, not joined"
    );
}
