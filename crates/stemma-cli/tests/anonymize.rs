//! Anonymized branches: `anonymize suggest` on the Chinook sample.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn suggest_flags_chinook_pii_without_printing_values() {
    let env = Env::new();
    env.up();
    load_chinook(&env, "main");
    let rules = env.ok(&["anonymize", "suggest", "main"]);
    for needle in [
        "table = \"public.customer\"",
        "column = \"email\"",
        "mask = \"email\"",
        "column = \"first_name\"",
        "column = \"phone\"",
        "column = \"billing_address\"",
    ] {
        assert!(rules.contains(needle), "{needle} missing from:\n{rules}");
    }
    // Sampled values inform the suggestion but never appear in it.
    let sample = env.sql("main", "select 1");
    assert_eq!(sample, "1");
    let chinook = env.ok(&["connection-string", "main", "--database", "chinook"]);
    let email = psql(
        chinook.trim(),
        "select email from customer order by customer_id limit 1",
    );
    assert!(!email.is_empty());
    assert!(!rules.contains(&email), "a raw value leaked into the rules");
}

/// Generated "production" whose personal data carries a marker (`zqxmark`), in a unique
/// column referenced by a foreign key, a jsonb document, free text, and ordinary columns.
const SHOP_SQL: &str = r#"
CREATE DATABASE shop;
\c shop
CREATE TABLE account (
    id serial PRIMARY KEY,
    email text NOT NULL UNIQUE,
    full_name text NOT NULL,
    phone varchar(24),
    profile jsonb,
    notes text,
    birth_date date,
    last_ip inet,
    plan text NOT NULL
);
CREATE TABLE orders (
    id serial PRIMARY KEY,
    account_email text NOT NULL REFERENCES account(email),
    amount numeric(10,2) NOT NULL,
    shipping_address text
);
CREATE INDEX orders_account ON orders(account_email);
CREATE VIEW big_orders AS SELECT * FROM orders WHERE amount > 100;
COMMENT ON TABLE account IS 'customers';
INSERT INTO account(email, full_name, phone, profile, notes, birth_date, last_ip, plan)
SELECT 'zqxmark' || g || '@corp.test',
       'Zqxmark Person' || g,
       '+1 555 01' || lpad(g::text, 4, '0'),
       jsonb_build_object('contact', jsonb_build_object('email', 'zqxmark.json' || g || '@corp.test'), 'tier', 'gold'),
       'Call zqxmark' || g || ' about the renewal',
       date '1980-01-01' + g,
       ('10.1.' || (g / 250) || '.' || (g % 250))::inet,
       CASE WHEN g % 2 = 0 THEN 'pro' ELSE 'free' END
FROM generate_series(1, 300) g;
INSERT INTO orders(account_email, amount, shipping_address)
SELECT 'zqxmark' || (1 + g % 300) || '@corp.test', (g % 250) + 0.5, g || ' Zqxmark Street'
FROM generate_series(1, 1000) g;
"#;

const SHOP_RULES: &str = r#"
[options]
unlisted = "keep"

[[rule]]
database = "shop"
table = "public.account"
column = "email"
mask = "email"

[[rule]]
database = "shop"
table = "public.orders"
column = "account_email"
mask = "email"

[[rule]]
database = "shop"
table = "public.account"
column = "full_name"
mask = "full_name"

[[rule]]
database = "shop"
table = "public.account"
column = "phone"
mask = "phone"

[[rule]]
database = "shop"
table = "public.account"
column = "profile"
mask = "json"
paths = [ { path = "$.contact.email", mask = "email" } ]

[[rule]]
database = "shop"
table = "public.account"
column = "notes"
mask = "text"

[[rule]]
database = "shop"
table = "public.account"
column = "birth_date"
mask = "date_shift"
max_days = 30

[[rule]]
database = "shop"
table = "public.account"
column = "last_ip"
mask = "ip"

[[rule]]
database = "shop"
table = "public.orders"
column = "shipping_address"
mask = "street_address"
"#;

fn load_shop(env: &Env) {
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
        .arg(env.connection_string("main"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .expect("stdin")
                .write_all(SHOP_SQL.as_bytes())?;
            c.wait_with_output()
        })
        .expect("run psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_rules(env: &Env, name: &str, text: &str) -> PathBuf {
    let p = env.data_dir.parent().expect("parent").join(name);
    fs::write(&p, text).expect("write rules");
    p.to_path_buf()
}

/// `stemma branch create NAME --parent main --anonymize RULES`, which must succeed.
fn anonymize(env: &Env, name: &str, rules: &Path) -> String {
    let rules = rules.to_str().expect("utf-8 path");
    env.ok(&[
        "branch",
        "create",
        name,
        "--parent",
        "main",
        "--anonymize",
        rules,
    ])
}

/// The same, which must fail: its error.
fn anonymize_fails(env: &Env, name: &str, rules: &Path) -> String {
    let rules = rules.to_str().expect("utf-8 path");
    env.fail(&[
        "branch",
        "create",
        name,
        "--parent",
        "main",
        "--anonymize",
        rules,
    ])
}

/// The names of the branches the daemon lists.
fn branch_names(env: &Env) -> Vec<String> {
    env.json(&["branch", "list"])
        .as_array()
        .expect("a list")
        .iter()
        .map(|b| b["name"].as_str().expect("a name").to_string())
        .collect()
}

fn shop(env: &Env, branch: &str) -> String {
    env.ok(&["connection-string", branch, "--database", "shop"])
        .trim()
        .to_string()
}

/// Every file under `dir`, read whole, searched for each needle (case-insensitively for
/// ASCII). Returns the (file, needle) pairs found.
fn scan(dir: &Path, needles: &[&str]) -> Vec<(PathBuf, String)> {
    let needles: Vec<Vec<u8>> = needles
        .iter()
        .map(|n| n.to_ascii_lowercase().into_bytes())
        .collect();
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                let bytes = fs::read(&p).expect("read").to_ascii_lowercase();
                for n in &needles {
                    if memchr::memmem::find(&bytes, n).is_some() {
                        hits.push((p.clone(), String::from_utf8_lossy(n).into_owned()));
                    }
                }
            }
        }
    }
    hits
}

/// A branch's data directory, whichever the driver (with the pagestore, its mount: what the
/// branch can read).
fn timeline_dir(env: &Env, branch: &str) -> PathBuf {
    let b = env.json(&["branch", "get", branch]);
    env.timeline_dir(b["timeline_id"].as_str().expect("timeline id"))
}

#[test]
fn an_anonymized_branch_and_its_children_hold_no_raw_value_anywhere() {
    let env = Env::new();
    env.up();
    load_shop(&env);
    let rules = write_rules(&env, "masking.toml", SHOP_RULES);
    let out = anonymize(&env, "anon", &rules);
    assert!(out.contains("anonymized:        ok"), "{out}");
    env.ok(&["branch", "create", "alice", "--parent", "anon"]);
    psql(
        &shop(&env, "alice"),
        "insert into orders(account_email, amount) select email, 1 from account limit 5",
    );

    // Raw values that must not appear: the marker, and exact values of several columns.
    let (m, a) = (shop(&env, "main"), shop(&env, "anon"));
    let phone = psql(&m, "select phone from account where id = 7");
    let ip = psql(&m, "select host(last_ip) from account where id = 77");
    let name = psql(&m, "select full_name from account where id = 123");
    assert!(name.to_ascii_lowercase().contains("zqxmark"));

    // Shape: equal row and join counts, masked columns changed on every row, others equal.
    for sql in [
        "select count(*) from account",
        "select count(*) from orders",
        "select count(*) from orders o join account a on a.email = o.account_email",
        "select count(*) from big_orders",
        "select string_agg(plan || ':' || id, ',' order by id) from account",
        "select sum(amount) from orders",
        "select count(distinct email) from account",
        "select last_value from account_id_seq",
        "select obj_description('account'::regclass)",
    ] {
        assert_eq!(psql(&m, sql), psql(&a, sql), "{sql}");
    }
    for col in [
        "email",
        "full_name",
        "phone",
        "profile::text",
        "notes",
        "birth_date::text",
        "host(last_ip)",
    ] {
        let sql = format!("select string_agg(coalesce({col}, '-'), '|' order by id) from account");
        let (raw, masked) = (psql(&m, &sql), psql(&a, &sql));
        let same = raw
            .split('|')
            .zip(masked.split('|'))
            .filter(|(x, y)| x == y)
            .count();
        assert_eq!(same, 0, "{col}: {same} values kept");
    }
    assert_eq!(
        psql(&a, "select count(*) from account where profile->>'tier' = 'gold' and profile->'contact'->>'email' like '%@%'"),
        "300"
    );
    let diff = env.json(&["schema-diff", "anon", "--against", "main"]);
    assert_eq!(diff["identical"], true, "{diff}");

    // The auditor's scan: every byte of the anonymized branch's and its child's data
    // directories, after a checkpoint (computes stopped, so everything is on disk).
    env.ok(&["compute", "stop", "anon"]);
    env.ok(&["compute", "stop", "alice"]);
    env.ok(&["compute", "stop", "main"]);
    let needles = ["zqxmark", phone.as_str(), ip.as_str(), name.as_str()];
    assert!(
        !scan(&timeline_dir(&env, "main"), &needles).is_empty(),
        "the scan finds the marker in the raw parent (it can find what it looks for)"
    );
    for b in ["anon", "alice"] {
        let hits = scan(&timeline_dir(&env, b), &needles);
        assert!(hits.is_empty(), "raw values in {b}: {hits:?}");
    }
    // Logs of the anonymization never print row values either.
    let logs = scan(&env.data_dir.join("logs"), &["zqxmark"]);
    assert!(
        logs.iter().all(|(p, _)| p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("compute-"))),
        "{logs:?}"
    );
}

#[test]
fn masks_are_deterministic_and_reset_re_anonymizes_the_parent() {
    let env = Env::new();
    env.up();
    load_shop(&env);
    let rules = write_rules(&env, "masking.toml", SHOP_RULES);
    anonymize(&env, "anon", &rules);
    anonymize(&env, "anon2", &rules);
    let q = "select string_agg(email || full_name, ',' order by id) from account";
    assert_eq!(psql(&shop(&env, "anon"), q), psql(&shop(&env, "anon2"), q));
    // Main's credentials do not open the anonymized branch, nor the other way round.
    let main_b = env.json(&["branch", "get", "main"]);
    let anon_b = env.json(&["branch", "get", "anon"]);
    let swap = |cs: &str, port: u64| {
        let (head, tail) = cs.rsplit_once('@').expect("uri");
        let (_, db) = tail.split_once('/').expect("db");
        format!("{head}@127.0.0.1:{port}/{db}")
    };
    let cross = swap(
        main_b["connection_string"].as_str().unwrap(),
        anon_b["port"].as_u64().unwrap(),
    );
    let out = Command::new(pg_bin("psql"))
        .args(["-X", "-c", "select 1", &cross])
        .output()
        .expect("psql");
    assert!(
        !out.status.success(),
        "main's password opened the anonymized branch"
    );

    let child = env.ok(&["branch", "create", "dev", "--parent", "anon"]);
    assert!(child.contains("parent:            anon"));
    psql(&shop(&env, "dev"), "delete from orders where id <= 10");
    psql(&shop(&env, "main"), "insert into account(email, full_name, plan) values ('zqxmark-new@corp.test', 'Zqxmark New', 'pro')");
    let cs = env.connection_string("anon");
    let out = env.ok(&["branch", "reset", "anon"]);
    assert!(out.contains("anonymized:        ok"), "{out}");
    assert_eq!(
        env.connection_string("anon"),
        cs,
        "the connection string stays"
    );
    assert_eq!(
        psql(&shop(&env, "anon"), "select count(*) from account"),
        "301"
    );
    assert_eq!(
        psql(
            &shop(&env, "anon"),
            "select count(*) from account where email like '%zqxmark%'"
        ),
        "0"
    );
    // Children keep their state.
    assert_eq!(
        psql(&shop(&env, "dev"), "select count(*) from orders"),
        "990"
    );
    assert_eq!(
        psql(&shop(&env, "dev"), "select count(*) from account"),
        "300"
    );
}

#[test]
fn bad_rules_and_failed_runs_leave_everything_as_it_was() {
    let env = Env::new();
    env.up();
    load_shop(&env);
    let dirs_before = env.timeline_dirs().len();
    // A mask kind that does not exist: the line is named, nothing is created.
    let bad = write_rules(
        &env,
        "bad.toml",
        "[[rule]]\ntable = \"public.account\"\ncolumn = \"email\"\nmask = \"scramble\"\n",
    );
    let err = anonymize_fails(&env, "anon", &bad);
    assert!(err.contains("line 4") && err.contains("scramble"), "{err}");
    // An unknown column.
    let bad = write_rules(
        &env,
        "bad2.toml",
        "[[rule]]\ntable = \"public.account\"\ncolumn = \"emial\"\nmask = \"email\"\n",
    );
    let err = anonymize_fails(&env, "anon", &bad);
    assert!(err.contains("emial"), "{err}");
    // Personal data without a rule: refused, with the columns listed.
    let thin = write_rules(
        &env,
        "thin.toml",
        "[[rule]]\ndatabase = \"shop\"\ntable = \"public.account\"\ncolumn = \"notes\"\nmask = \"text\"\n",
    );
    let err = anonymize_fails(&env, "anon", &thin);
    assert!(
        err.contains("account.email") && err.contains("personal data"),
        "{err}"
    );
    // A foreign key whose two sides would be masked differently.
    let broken = SHOP_RULES.replace(
        "column = \"account_email\"\nmask = \"email\"",
        "column = \"account_email\"\nmask = \"hash\"",
    );
    let broken = write_rules(&env, "fk.toml", &broken);
    let err = anonymize_fails(&env, "anon", &broken);
    assert!(err.contains("orders_account_email_fkey"), "{err}");
    let names = branch_names(&env);
    assert_eq!(names, vec!["main"]);
    assert_eq!(env.timeline_dirs().len(), dirs_before);

    // A reset whose parent gained a personal-data column fails and leaves the branch serving.
    let rules = write_rules(&env, "masking.toml", SHOP_RULES);
    anonymize(&env, "anon", &rules);
    let before = env.json(&["branch", "get", "anon"]);
    psql(&shop(&env, "main"), "alter table account add column ssn text; update account set ssn = '078-05-' || lpad(id::text, 4, '0')");
    let err = env.fail(&["branch", "reset", "anon"]);
    assert!(err.contains("account.ssn"), "{err}");
    let after = env.json(&["branch", "get", "anon"]);
    assert_eq!(before["timeline_id"], after["timeline_id"]);
    assert_eq!(after["anonymization"]["last_run"]["outcome"], "failed");
    assert_eq!(
        psql(&shop(&env, "anon"), "select count(*) from account"),
        "300"
    );

    // New rules (keep the new column's masked form) apply at the next reset.
    let fixed = format!("{SHOP_RULES}\n[[rule]]\ndatabase = \"shop\"\ntable = \"public.account\"\ncolumn = \"ssn\"\nmask = \"hash\"\n");
    let fixed = write_rules(&env, "fixed.toml", &fixed);
    env.ok(&[
        "branch",
        "set",
        "anon",
        "--anonymize",
        fixed.to_str().unwrap(),
    ]);
    env.ok(&["branch", "reset", "anon"]);
    let ssn = psql(
        &shop(&env, "anon"),
        "select count(*) from account where ssn like '078-05-%'",
    );
    assert_eq!(ssn, "0");

    // The daemon killed in the middle of a run: after a restart, no half-built branch.
    let dirs = env.timeline_dirs().len();
    let known: Vec<PathBuf> = env.timeline_dirs();
    let mut child = env
        .cmd(&[
            "branch",
            "create",
            "anon3",
            "--parent",
            "main",
            "--anonymize",
            fixed.to_str().unwrap(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // The run's private compute is up (it has a timeline and a postmaster).
    let mut private = None;
    wait_for(
        "the run's compute to start",
        Duration::from_secs(60),
        || {
            private = env
                .timeline_dirs()
                .iter()
                .filter(|d| !known.contains(d))
                .find_map(|d| stemma_compute::read_postmaster_pid(d))
                .map(|pm| pm.pid as u32)
                .filter(|p| alive(*p));
            private.is_some()
        },
    );
    let private = private.expect("pid");
    kill9(env.daemon_pid().expect("daemon"));
    let _ = child.wait();
    env.up();
    let names = branch_names(&env);
    assert!(!names.contains(&"anon3".to_string()), "{names:?}");
    assert_eq!(
        env.timeline_dirs().len(),
        dirs,
        "the half-built timeline was removed"
    );
    // The run's private compute went with its timeline.
    wait_for(
        "the leftover compute to stop",
        Duration::from_secs(30),
        || !alive(private),
    );
}

#[test]
fn a_restricted_token_reaches_only_its_subtree() {
    let env = Env::new();
    env.up();
    load_chinook(&env, "main");
    let rules = env.ok(&["anonymize", "suggest", "main"]);
    let rules = write_rules(&env, "masking.toml", &rules);
    anonymize(&env, "anon", &rules);
    env.ok(&["branch", "create", "other", "--parent", "main"]);
    let t = env.json(&["token", "create", "alice", "--branch", "anon"]);
    let token = t["token"].as_str().expect("token shown once").to_string();
    let api = env.json(&["status"])["api_url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !env.ok(&["token", "list"]).contains(&token),
        "the secret is shown only once"
    );

    let dev = |args: &[&str]| {
        let mut c = env.cmd(args);
        c.env("STEMMA_API_URL", &api)
            .env("STEMMA_TOKEN", &token)
            .env("STEMMA_DATA_DIR", "/nonexistent");
        c.output().expect("run stemma")
    };
    let ok = |args: &[&str]| {
        let out = dev(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let forbidden = |args: &[&str]| {
        let out = dev(args);
        assert!(!out.status.success(), "{args:?} was allowed");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(err.contains("token \"alice\""), "{args:?}: {err}");
    };
    // Without a parent, a restricted token branches from its own root.
    ok(&["branch", "create", "alice-dev"]);
    let list = ok(&["--output", "json", "branch", "list"]);
    let names: Vec<String> = serde_json::from_str::<serde_json::Value>(&list)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 2);
    assert!(names.contains(&"anon".to_string()) && names.contains(&"alice-dev".to_string()));
    ok(&["connection-string", "alice-dev"]);
    ok(&["branch", "reset", "alice-dev"]);
    forbidden(&["branch", "create", "x", "--parent", "main"]);
    forbidden(&["connection-string", "main"]);
    forbidden(&["branch", "get", "other"]);
    forbidden(&["branch", "reset", "main"]);
    forbidden(&["branch", "delete", "anon"]);
    forbidden(&["token", "create", "bob", "--branch", "main"]);
    forbidden(&["init", "--name", "root2"]);
    // The anonymized subtree's computes run as their own OS user: their superuser (anyone
    // holding a connection string) cannot read production's files.
    let main_dir = timeline_dir(&env, "main");
    let anon_cs = ok(&["connection-string", "alice-dev"]);
    let read = |cs: &str, path: &Path| {
        Command::new(pg_bin("psql"))
            .args(["-X", "-A", "-t", "-d", cs.trim(), "-c"])
            .arg(format!(
                "select pg_read_file('{}')",
                path.join("PG_VERSION").display()
            ))
            .output()
            .expect("psql")
    };
    let denied = read(&anon_cs, &main_dir);
    assert!(
        !denied.status.success(),
        "an anonymized branch read production's files"
    );
    assert!(
        String::from_utf8_lossy(&denied.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&denied.stderr)
    );
    assert!(
        read(&env.connection_string("main"), &main_dir)
            .status
            .success(),
        "the check can pass"
    );
    assert!(env.json(&["branch", "get", "alice-dev"])["compute"]["pid"].is_number());
    // And the HTTP status is 403.
    let client = stemma_api::Client::new(&api, &token);
    match client.get_branch("main") {
        Err(stemma_api::ClientError::Api(_, status)) => assert_eq!(status, 403),
        other => panic!("expected 403, got {other:?}"),
    }
    // A revoked token is refused.
    env.ok(&["token", "delete", "alice"]);
    let out = dev(&["branch", "list"]);
    assert!(!out.status.success());
}
