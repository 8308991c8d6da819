//! Branch lifecycle against a real daemon and real computes.

mod common;

use common::*;
use std::time::Duration;

#[test]
fn up_creates_main_and_is_idempotent() {
    let env = Env::new();
    let out = env.up();
    assert!(out.contains("main"), "{out}");
    assert!(out.contains("postgresql://"), "{out}");
    let pid = env.daemon_pid().expect("daemon.json written");
    let again = env.up();
    assert!(again.contains("already running"), "{again}");
    assert_eq!(env.daemon_pid(), Some(pid));

    let status = env.json(&["status"]);
    assert!(status["api_url"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    assert_eq!(status["storage"], env.storage().as_str());
    // ...and why it is the one in use.
    assert!(
        status["storage_detail"]
            .as_str()
            .is_some_and(|d| d.contains("chosen")),
        "{status}"
    );
    assert_eq!(status["computes"].as_array().unwrap().len(), 1);
    assert_eq!(status["computes"][0]["branch"], "main");
    assert!(status.get("proxy_port").is_some());

    // The token file is private, and the API refuses requests without it.
    let token = env.data_dir.join("api-token");
    let mode = std::fs::metadata(&token).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    let url = status["api_url"].as_str().unwrap();
    let refused = ureq_get(&format!("{url}/v1/branches"));
    assert_eq!(refused, 401);
    assert_eq!(ureq_get(&format!("{url}/openapi.json")), 200);

    let branches = env.json(&["branch", "list"]);
    let main = &branches[0];
    for field in [
        "name",
        "parent",
        "created_at",
        "state",
        "connection_string",
        "protected",
        "expires_at",
        "logical_size_bytes",
        "own_storage_bytes",
    ] {
        assert!(main.get(field).is_some(), "missing {field} in {main}");
    }
    assert_eq!(main["state"], "running");
    assert_eq!(env.sql("main", "select 1"), "1");
    // `stemma psql` runs psql on the branch with the arguments after `--`.
    assert_eq!(
        env.ok(&[
            "psql",
            "main",
            "--",
            "-X",
            "-A",
            "-t",
            "-c",
            "select 40 + 2"
        ])
        .trim(),
        "42"
    );

    env.ok(&["down"]);
    wait_for("daemon exit", Duration::from_secs(30), || !alive(pid));
    assert!(env.compute_pids().is_empty(), "computes left after down");
    let err = env.fail(&["branch", "list"]);
    assert!(err.contains("stemma up"), "{err}");
}

/// The HTTP status of a GET without a token, over a plain socket.
fn ureq_get(url: &str) -> u16 {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut s = std::net::TcpStream::connect(host).expect("connect to the API");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[test]
fn branches_are_isolated_and_reset_keeps_the_connection_string() {
    let env = Env::new();
    env.up();
    env.sql(
        "main",
        "create table t(v text); insert into t values ('main')",
    );

    env.ok(&["branch", "create", "dev-alice", "--parent", "main"]);
    env.ok(&["branch", "create", "dev-bob"]); // default parent: main
    env.sql("dev-alice", "insert into t values ('alice')");
    env.sql("dev-bob", "insert into t values ('bob')");
    env.sql("main", "insert into t values ('main-later')");

    let all = |b: &str| env.sql(b, "select string_agg(v, ',' order by v) from t");
    assert_eq!(all("main"), "main,main-later");
    assert_eq!(all("dev-alice"), "alice,main");
    assert_eq!(all("dev-bob"), "bob,main");

    // A branch of a branch.
    env.ok(&["branch", "create", "dev/alice-2", "--parent", "dev-alice"]);
    assert_eq!(all("dev/alice-2"), "alice,main");
    env.sql("dev/alice-2", "insert into t values ('grandchild')");
    assert_eq!(all("dev-alice"), "alice,main");

    let tree = env.ok(&["branch", "list"]);
    assert!(
        tree.contains("└─ dev/alice-2") || tree.contains("├─ dev/alice-2"),
        "{tree}"
    );

    // Reset: the parent's current state, the same connection string.
    let before = env.connection_string("dev-alice");
    let reset = env.json(&[
        "branch",
        "reset",
        "dev-alice",
        "--preserve-under-name",
        "dev-alice-old",
    ]);
    assert_eq!(reset["connection_string"].as_str().unwrap(), before);
    assert!(reset["last_reset_at"].is_string());
    assert_eq!(all("dev-alice"), "main,main-later");
    assert_eq!(all("dev-alice-old"), "alice,main");
    // The child keeps its data.
    assert_eq!(all("dev/alice-2"), "alice,grandchild,main");

    // Rename keeps the connection string too.
    let bob = env.connection_string("dev-bob");
    env.ok(&["branch", "rename", "dev-bob", "dev-robert"]);
    assert_eq!(env.connection_string("dev-robert"), bob);
    assert_eq!(all("dev-robert"), "bob,main");

    // Delete frees the disk.
    let timelines_before = env.timeline_dirs().len();
    let tl = env.json(&["branch", "get", "dev-robert"])["timeline_id"]
        .as_str()
        .unwrap()
        .to_string();
    env.ok(&["branch", "delete", "dev-robert"]);
    assert!(!env.timeline_dir(&tl).exists());
    assert_eq!(env.timeline_dirs().len(), timelines_before - 1);
    env.fail(&["branch", "get", "dev-robert"]);

    // Suspended branches keep their data and connection string.
    env.ok(&["compute", "stop", "dev-alice"]);
    assert_eq!(
        env.json(&["branch", "get", "dev-alice"])["state"],
        "suspended"
    );
    env.ok(&["compute", "start", "dev-alice"]);
    assert_eq!(env.connection_string("dev-alice"), before);
    assert_eq!(all("dev-alice"), "main,main-later");
}

/// On the pagestore a branch of a branch nobody has connected to yet leaves that parent
/// stopped: the clone is crash consistent whatever the parent's compute does, and starting
/// the parent would make the new branch wait for the parent's own recovery (seconds for a new
/// branch of a busy database).
#[test]
fn a_branch_of_a_branch_never_started_leaves_that_parent_stopped() {
    let env = Env::new();
    env.up();
    env.sql(
        "main",
        "create table t(v text); insert into t values ('main')",
    );
    env.ok(&["branch", "create", "child"]);
    env.ok(&["branch", "create", "grandchild", "--parent", "child"]);
    if env.uses_pagestore() {
        assert_eq!(env.json(&["branch", "get", "child"])["state"], "suspended");
    }
    let all = |b: &str| env.sql(b, "select string_agg(v, ',' order by v) from t");
    assert_eq!(all("grandchild"), "main");
    env.sql("grandchild", "insert into t values ('grandchild')");
    assert_eq!(all("child"), "main");
    assert_eq!(all("grandchild"), "grandchild,main");
}

/// A crash-consistent branch of a running parent that has written more WAL since its last
/// checkpoint than `--checkpoint-before-branch` is taken after a checkpoint of the parent, so
/// that the branch has little to replay when it starts; under the limit the parent is left
/// alone. (The copy driver's online backup checkpoints the parent for every clone.)
#[test]
fn a_branch_of_a_parent_far_from_its_last_checkpoint_comes_after_a_checkpoint() {
    let env = Env::new();
    env.up_with(&["--checkpoint-before-branch", "8MB"]);
    env.sql("main", "create table t(v int); insert into t values (0)");
    // The next timed checkpoint is `checkpoint_timeout` (5 minutes) after this one.
    env.sql("main", "checkpoint");
    let redo = || env.sql("main", "select redo_lsn from pg_control_checkpoint()");
    let before = redo();

    env.sql("main", "insert into t values (1)");
    env.ok(&["branch", "create", "small"]);
    if env.uses_pagestore() {
        assert_eq!(redo(), before, "a checkpoint for a few bytes of WAL");
    }

    // About 15 MB of WAL.
    env.sql(
        "main",
        "insert into t select g from generate_series(2, 300001) g",
    );
    env.ok(&["branch", "create", "big"]);
    assert_ne!(
        redo(),
        before,
        "no checkpoint before a branch with ~15 MB to replay"
    );

    let count = |b: &str| env.sql(b, "select count(*) from t");
    assert_eq!(count("small"), "2");
    assert_eq!(count("big"), "300002");
    assert_eq!(count("main"), "300002");
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let env = Env::new();
    env.up();
    let count = || env.json(&["branch", "list"]).as_array().unwrap().len();
    let timelines = || env.timeline_dirs().len();
    assert_eq!(count(), 1);

    let e = env.fail(&["branch", "create", "main"]);
    assert!(e.contains("already exists"), "{e}");
    for bad in ["Bad", "a b", "x/y/z", "_x", &"a".repeat(64)] {
        let e = env.fail(&["branch", "create", bad]);
        assert!(e.contains("invalid branch name"), "{e}");
    }
    let e = env.fail(&["branch", "create", "x", "--parent", "nope"]);
    assert!(e.contains("\"nope\" does not exist"), "{e}");
    for args in [
        vec!["branch", "get", "nope"],
        vec!["branch", "delete", "nope"],
        vec!["branch", "reset", "nope"],
        vec!["connection-string", "nope"],
        vec!["compute", "start", "nope"],
    ] {
        let e = env.fail(&args);
        assert!(e.contains("does not exist"), "{args:?}: {e}");
    }
    let e = env.fail(&["branch", "create", "x", "--ttl", "soon"]);
    assert!(e.contains("invalid duration"), "{e}");
    let e = env.fail(&["branch", "create", "x", "--at", "2026-01-01T00:00:00Z"]);
    assert!(e.contains("past moment"), "{e}");
    let e = env.fail(&["branch", "reset", "main"]);
    assert!(e.contains("root"), "{e}");
    assert_eq!(count(), 1);
    assert_eq!(timelines(), 1);

    env.ok(&["branch", "create", "child", "--protected", "--ttl", "7d"]);
    let child = env.json(&["branch", "get", "child"]);
    assert_eq!(child["protected"], true);
    assert!(child["expires_at"].is_string());
    let e = env.fail(&["branch", "delete", "main"]);
    assert!(e.contains("has children (child)"), "{e}");
    let e = env.fail(&["branch", "delete", "child"]);
    assert!(e.contains("protected"), "{e}");
    let e = env.fail(&["branch", "restore", "child", "--at", "2026-01-01T00:00:00Z"]);
    assert!(e.contains("past moment"), "{e}");
    let e = env.fail(&["branch", "rename", "child", "main"]);
    assert!(e.contains("already exists"), "{e}");
    let e = env.fail(&["branch", "reset", "child", "--preserve-under-name", "main"]);
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(count(), 2);
    assert_eq!(timelines(), 2);

    // A branch's port taken by another program while the daemon was down.
    let port = env.json(&["branch", "get", "child"])["port"]
        .as_u64()
        .unwrap() as u16;
    env.ok(&["down"]);
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the port");
    env.up();
    let e = env.json(&["branch", "get", "child"])["endpoint_error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        e.contains(&format!(
            "port {port} of branch \"child\" is already in use"
        )),
        "{e}"
    );
    drop(squatter);
    env.ok(&["down"]);
    env.up();
    assert!(env.json(&["branch", "get", "child"])["endpoint_error"].is_null());
    assert_eq!(env.sql("child", "select 1"), "1");

    env.ok(&[
        "branch",
        "set",
        "child",
        "--protected",
        "false",
        "--ttl",
        "none",
    ]);
    let child = env.json(&["branch", "get", "child"]);
    assert_eq!(child["protected"], false);
    assert!(child["expires_at"].is_null());
    env.ok(&["branch", "delete", "child"]);
    assert_eq!(count(), 1);
    assert_eq!(timelines(), 1);
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let env = Env::new();
    env.up();
    let base = (env.port_base + 10).to_string();
    let out = env.run(&["serve", "--api-listen", "127.0.0.1:0", "--port-base", &base]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already running"), "{err}");
}

#[test]
fn a_missing_postgres_installation_is_a_clear_error() {
    let env = Env::new();
    let out = env
        .cmd(&["serve", "--api-listen", "127.0.0.1:0"])
        .env("STEMMA_PG_BIN", "/nonexistent/bin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("STEMMA_PG_BIN"), "{err}");
}

#[test]
fn expired_branches_are_deleted_by_the_daemon() {
    let env = Env::new();
    env.up_with(&["--expiry-interval", "200ms"]);
    env.ok(&["branch", "create", "short", "--ttl", "1s"]);
    env.ok(&["branch", "create", "kept", "--ttl", "1s", "--protected"]);
    env.ok(&["branch", "create", "long", "--ttl", "1h"]);
    // The branch leaves the metadata first, then its storage goes.
    wait_for("the expired branch to go", Duration::from_secs(30), || {
        !env.run(&["branch", "get", "short"]).status.success() && env.timeline_dirs().len() == 3
    });
    let names: Vec<String> = env
        .json(&["branch", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["kept", "long", "main"]);
    assert_eq!(env.timeline_dirs().len(), 3);
}

#[test]
fn per_branch_postgres_settings() {
    let env = Env::new();
    env.up();
    assert_eq!(env.sql("main", "show work_mem"), "4MB");
    env.ok(&["branch", "create", "tuned", "--setting", "work_mem=16MB"]);
    assert_eq!(env.sql("tuned", "show work_mem"), "16MB");
    assert_eq!(
        env.json(&["branch", "get", "tuned"])["settings"]["work_mem"],
        "16MB"
    );
    // Children inherit; `set` changes and restarts; a refused value changes nothing.
    env.ok(&["branch", "create", "tuned-child", "--parent", "tuned"]);
    assert_eq!(env.sql("tuned-child", "show work_mem"), "16MB");
    env.ok(&["branch", "set", "tuned", "--setting", "work_mem=32MB"]);
    assert_eq!(env.sql("tuned", "show work_mem"), "32MB");
    let e = env.fail(&["branch", "set", "tuned", "--setting", "work_mem=lots"]);
    assert!(e.contains("not applied"), "{e}");
    assert_eq!(env.sql("tuned", "show work_mem"), "32MB");
    let e = env.fail(&["branch", "set", "tuned", "--setting", "port=1"]);
    assert!(e.contains("managed by Stemma"), "{e}");
    env.ok(&["branch", "set", "tuned", "--unset-setting", "work_mem"]);
    assert_eq!(env.sql("tuned", "show work_mem"), "4MB");
}

#[test]
fn a_data_directory_inside_a_private_temporary_directory_works() {
    // `mktemp -d` makes a 0700 directory: computes (user postgres) could not enter it.
    let env = Env::new_private();
    let parent = env.data_dir.parent().unwrap().to_path_buf();
    let mode = |p: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions())
            & 0o777
    };
    assert_eq!(mode(&parent), 0o700);
    env.up();
    assert_eq!(mode(&parent), 0o701, "only the search bit is added");
    assert_eq!(env.sql("main", "select 1"), "1");
}

/// The pagestore's retention window is set with `up --retention`, shown by `status`, enforced
/// by `branch create --at`, and kept with the data directory when a later `up` omits it.
#[test]
fn the_retention_window_is_configurable_and_kept() {
    let env = Env::new();
    env.up_with(&["--retention", "2h"]);
    if !env.uses_pagestore() {
        // The copy driver keeps no history: nothing to window.
        env.down_leaves_nothing();
        return;
    }
    let status = env.ok(&["status"]);
    assert!(
        status.contains("any moment of the last 2 hours"),
        "{status}"
    );
    let three_hours_ago = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() - Duration::from_secs(3 * 3600),
    )
    .to_string();
    let e = env.fail(&[
        "branch",
        "create",
        "old",
        "--parent",
        "main",
        "--at",
        &three_hours_ago,
    ]);
    // Said once, as the request's fault, without the driver's mount paths.
    assert_eq!(e.matches("outside the retention window").count(), 1, "{e}");
    assert!(!e.contains("/mnt/"), "{e}");
    env.ok(&["down"]);
    env.up();
    let status = env.ok(&["status"]);
    assert!(
        status.contains("any moment of the last 2 hours"),
        "{status}"
    );
    env.down_leaves_nothing();
}
