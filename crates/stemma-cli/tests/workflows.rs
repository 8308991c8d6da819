//! The team workflows: PR branches by webhook and by command, migrations, schema diffs,
//! scheduled resets, `stemma env`, the default parent.

mod common;

use common::*;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

const SECRET: &str = "It's a Secret to Everybody";

fn sign(secret: &str, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A `pull_request` payload shaped like GitHub's (the fields Stemma reads, and more).
fn pr_payload(action: &str, number: u64, merged: bool) -> Vec<u8> {
    serde_json::to_vec_pretty(&serde_json::json!({
        "action": action,
        "number": number,
        "pull_request": {
            "url": format!("https://api.github.com/repos/Codertocat/Hello-World/pulls/{number}"),
            "number": number,
            "state": if action == "closed" { "closed" } else { "open" },
            "merged": merged,
            "head": { "ref": "changes", "sha": "ec26c3e57ca3a959ca5aad62de7213c562f8c821" },
            "base": { "ref": "master" },
        },
        "repository": { "full_name": "Codertocat/Hello-World" },
        "sender": { "login": "Codertocat" },
    }))
    .unwrap()
}

/// POSTs a webhook delivery to the daemon; returns the HTTP status.
fn deliver(env: &Env, event: &str, delivery: &str, body: &[u8], signature: Option<String>) -> u16 {
    let url = env.json(&["status"])["api_url"]
        .as_str()
        .unwrap()
        .to_string();
    let host = url.trim_start_matches("http://").to_string();
    let mut s = std::net::TcpStream::connect(&host).unwrap();
    let mut req = format!(
        "POST /webhooks/github HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nUser-Agent: GitHub-Hookshot/abc1234\r\nX-GitHub-Event: {event}\r\nX-GitHub-Delivery: {delivery}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(sig) = signature {
        req.push_str(&format!("X-Hub-Signature-256: {sig}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

fn names(env: &Env) -> Vec<String> {
    env.json(&["branch", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

fn write_config(dir: &Path, text: &str) -> String {
    let path = dir.join("stemma.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn github_webhooks_drive_pull_request_branches() {
    let env = Env::new();
    let project = tempfile::tempdir().unwrap();
    let migrations = project.path().join("migrations");
    std::fs::create_dir(&migrations).unwrap();
    std::fs::write(
        migrations.join("001_users.sql"),
        "create table users(id int primary key);",
    )
    .unwrap();
    let config = write_config(
        project.path(),
        "[migrations]\ndirectory = \"migrations\"\n[pull_requests]\nttl = \"2d\"\n",
    );
    let base = env.port_base.to_string();
    let out = env
        .cmd(&[
            "up",
            "--api-listen",
            "127.0.0.1:0",
            "--proxy-listen",
            "127.0.0.1:0",
            "--port-base",
            &base,
            "--config",
            &config,
        ])
        .env("STEMMA_GITHUB_WEBHOOK_SECRET", SECRET)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.ok(&["branch", "create", "staging", "--parent", "main"]);
    env.sql(
        "staging",
        "create table marker(v text); insert into marker values ('from-staging')",
    );

    let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    assert_eq!(
        deliver(&env, "ping", "d-0", ping, Some(sign(SECRET, ping))),
        200
    );

    let opened = pr_payload("opened", 2, false);
    let before = names(&env);
    assert_eq!(deliver(&env, "pull_request", "d-1", &opened, None), 401);
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "d-1",
            &opened,
            Some(sign("wrong", &opened))
        ),
        401
    );
    let other = pr_payload("reopened", 2, false);
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "d-1",
            &opened,
            Some(sign(SECRET, &other))
        ),
        401
    );
    assert_eq!(names(&env), before);

    let status = deliver(
        &env,
        "pull_request",
        "d-2",
        &opened,
        Some(sign(SECRET, &opened)),
    );
    assert!((200..300).contains(&status), "{status}");
    wait_for("pr-2", Duration::from_secs(30), || {
        env.run(&["branch", "get", "pr-2"]).status.success()
            && env.json(&["branch", "get", "pr-2"])["migration"]["status"] == "ok"
    });
    let pr = env.json(&["branch", "get", "pr-2"]);
    assert_eq!(pr["parent"], "staging");
    assert!(
        pr["expires_at"].is_string(),
        "PR branches get the configured TTL"
    );
    let conn = pr["connection_string"].as_str().unwrap().to_string();
    assert_eq!(psql(&conn, "select v from marker"), "from-staging");
    assert_eq!(psql(&conn, "select count(*) from users"), "0");
    psql(&conn, "insert into users values (42)");

    // A repeated delivery, and reopened: still exactly one pr-2, with its data.
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "d-2",
            &opened,
            Some(sign(SECRET, &opened))
        ),
        200
    );
    let reopened = pr_payload("reopened", 2, false);
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "d-3",
            &reopened,
            Some(sign(SECRET, &reopened))
        ),
        202
    );

    // A push with a new migration: it is applied, earlier ones are not run again.
    std::fs::write(
        migrations.join("002_email.sql"),
        "alter table users add column email text;",
    )
    .unwrap();
    let sync = pr_payload("synchronize", 2, false);
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "d-4",
            &sync,
            Some(sign(SECRET, &sync))
        ),
        202
    );
    wait_for("the second migration", Duration::from_secs(30), || {
        env.json(&["branch", "get", "pr-2"])["migration"]["log"]
            .as_str()
            .is_some_and(|l| l.contains("002_email.sql"))
    });
    assert_eq!(
        psql(&conn, "select count(email) + count(*) from users"),
        "1"
    );
    assert_eq!(names(&env).iter().filter(|n| *n == "pr-2").count(), 1);

    // Other events and actions change nothing; malformed JSON is refused.
    let labeled = pr_payload("labeled", 2, false);
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "d-5",
            &labeled,
            Some(sign(SECRET, &labeled))
        ),
        202
    );
    let issue = br#"{"action":"opened","issue":{"number":1}}"#;
    assert_eq!(
        deliver(&env, "issues", "d-6", issue, Some(sign(SECRET, issue))),
        202
    );
    let bad = &opened[..opened.len() / 2];
    assert_eq!(
        deliver(&env, "pull_request", "d-7", bad, Some(sign(SECRET, bad))),
        400
    );
    let names_now = names(&env);

    // closed (not merged) deletes the branch; closed again is fine.
    let closed = pr_payload("closed", 2, false);
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "d-8",
            &closed,
            Some(sign(SECRET, &closed))
        ),
        202
    );
    wait_for("pr-2 to go", Duration::from_secs(30), || {
        !env.run(&["branch", "get", "pr-2"]).status.success()
    });
    assert!((200..300).contains(&deliver(
        &env,
        "pull_request",
        "d-8",
        &closed,
        Some(sign(SECRET, &closed))
    )));
    assert!((200..300).contains(&deliver(
        &env,
        "pull_request",
        "d-9",
        &closed,
        Some(sign(SECRET, &closed))
    )));
    let after: Vec<String> = names_now.into_iter().filter(|n| n != "pr-2").collect();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(names(&env), after);
    assert_eq!(env.sql("staging", "select v from marker"), "from-staging");
}

#[test]
fn pr_commands_are_idempotent_and_failed_migrations_are_kept() {
    let env = Env::new();
    let project = tempfile::tempdir().unwrap();
    let migrations = project.path().join("migrations");
    std::fs::create_dir(&migrations).unwrap();
    std::fs::write(migrations.join("001.sql"), "create table a(x int);").unwrap();
    let config = write_config(project.path(), "[migrations]\ndirectory = \"migrations\"\n");
    env.up_with(&["--config", &config]);

    let first = env.json(&["pr", "open", "--number", "7"]);
    assert_eq!(first["name"], "pr-7");
    assert_eq!(first["parent"], "main");
    assert_eq!(first["migration"]["status"], "ok");
    let again = env.json(&["pr", "open", "--number", "7"]);
    assert_eq!(again["connection_string"], first["connection_string"]);
    assert_eq!(names(&env), ["main", "pr-7"]);

    // A failing migration: the branch stays, the outcome says what failed.
    std::fs::write(
        migrations.join("002.sql"),
        "alter table nope add column y int;",
    )
    .unwrap();
    let out = env.run(&["migrate", "pr-7"]);
    assert!(!out.status.success());
    let b = env.json(&["branch", "get", "pr-7"]);
    assert_eq!(b["migration"]["status"], "failed");
    assert!(b["migration"]["log"]
        .as_str()
        .unwrap()
        .contains("relation \"nope\" does not exist"));

    env.ok(&["pr", "close", "--number", "7"]);
    let v = env.json(&["pr", "close", "--number", "7"]);
    assert_eq!(v["deleted"], false);
    assert_eq!(names(&env), ["main"]);
}

#[test]
fn a_scheduled_reset_fires_and_is_reported() {
    let env = Env::new();
    let project = tempfile::tempdir().unwrap();
    let config = write_config(
        project.path(),
        "default_parent = \"main\"\n[[schedule]]\nbranch = \"dev\"\nreset = \"*/2 * * * * *\"\n",
    );
    env.up_with(&["--config", &config]);
    env.sql("main", "create table t(v int)");
    env.ok(&["branch", "create", "dev"]);
    env.ok(&["branch", "create", "dev-child", "--parent", "dev"]);
    env.sql("dev", "insert into t values (1)");
    env.sql("dev-child", "insert into t values (2)");
    assert!(env.json(&["branch", "get", "dev"])["next_reset_at"].is_string());
    let conn = env.connection_string("dev");
    wait_for("the scheduled reset", Duration::from_secs(30), || {
        let b = env.json(&["branch", "get", "dev"]);
        // A reset every 2 s may end this very query: ask again then.
        b["last_scheduled_reset"]["outcome"] == "ok"
            && try_psql(&conn, "select count(*) from t").as_deref() == Some("0")
    });
    // Same connection string; the child keeps its data.
    assert_eq!(env.connection_string("dev"), conn);
    assert_eq!(
        env.sql("dev-child", "select string_agg(v::text, ',') from t"),
        "2"
    );
}

#[test]
fn schema_diff_shows_added_table_column_and_index() {
    let env = Env::new();
    env.up();
    env.sql("main", "create table t(id int primary key)");
    env.ok(&["branch", "create", "feature"]);
    let same = env.json(&["schema-diff", "feature"]);
    assert_eq!(same["identical"], true);
    env.sql(
        "feature",
        "create table extra(id int); alter table t add column note text; create index t_note on t(note)",
    );
    let diff = env.ok(&["schema-diff", "feature"]);
    assert!(diff.contains("--- main/postgres"), "{diff}");
    assert!(diff.contains("+++ feature/postgres"), "{diff}");
    assert!(diff.contains("+CREATE TABLE public.extra"), "{diff}");
    assert!(diff.contains("+    note text"), "{diff}");
    assert!(
        diff.contains("+CREATE INDEX t_note ON public.t USING btree (note);"),
        "{diff}"
    );
    let md = env.ok(&[
        "--output",
        "markdown",
        "schema-diff",
        "feature",
        "--against",
        "main",
    ]);
    assert!(
        md.starts_with("### Schema changes in `feature` against `main`"),
        "{md}"
    );
    assert!(md.contains("```diff"), "{md}");
}

#[test]
fn env_prints_variables_and_the_default_parent_comes_from_the_config() {
    let env = Env::new();
    let project = tempfile::tempdir().unwrap();
    let config = write_config(project.path(), "default_parent = \"staging\"\n");
    env.up_with(&["--config", &config]);
    env.ok(&["branch", "create", "staging", "--parent", "main"]);
    let dev = env.json(&["branch", "create", "dev/alice"]);
    assert_eq!(dev["parent"], "staging");

    let vars = env.ok(&["env", "dev/alice"]);
    assert!(vars.contains("DATABASE_URL='postgresql://"), "{vars}");
    let script = format!(
        "{vars}\nexport PGHOST PGPORT PGUSER PGPASSWORD PGDATABASE\n{} -X -A -t -c 'select 40 + 2'",
        pg_bin("psql").display()
    );
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "42",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_schema_diff_is_posted_on_the_pull_request() {
    // A local HTTP server playing the GitHub API.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", server.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for stream in server.incoming().take(1) {
            let Ok(mut s) = stream else { continue };
            s.set_read_timeout(Some(Duration::from_secs(10))).ok();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Headers, then the body by Content-Length.
            loop {
                let n = s.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            let _ = s.write_all(b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}");
            let _ = tx.send(String::from_utf8_lossy(&buf).to_string());
        }
    });
    let env = Env::new();
    let project = tempfile::tempdir().unwrap();
    let config = write_config(
        project.path(),
        &format!("[github]\nwebhook_secret = \"{SECRET}\"\ntoken = \"test-token\"\napi_url = \"{api}\"\n"),
    );
    env.up_with(&["--config", &config]);
    let opened = pr_payload("opened", 5, false);
    assert_eq!(
        deliver(
            &env,
            "pull_request",
            "c-1",
            &opened,
            Some(sign(SECRET, &opened))
        ),
        202
    );
    let request = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a comment was posted");
    assert!(
        request.starts_with("POST /repos/Codertocat/Hello-World/issues/5/comments"),
        "{request}"
    );
    assert!(
        request.contains("authorization: Bearer test-token")
            || request.contains("Authorization: Bearer test-token"),
        "{request}"
    );
    assert!(
        request.contains("Schema changes in `pr-5` against `main`"),
        "{request}"
    );
}
