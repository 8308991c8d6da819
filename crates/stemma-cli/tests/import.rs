//! `stemma init --from URL`: importing an existing database as a new root branch.

mod common;

use common::*;

const TABLES: &[&str] = &[
    "album",
    "artist",
    "customer",
    "employee",
    "genre",
    "invoice",
    "invoice_line",
    "media_type",
    "playlist",
    "playlist_track",
    "track",
];

fn fingerprint(conn: &str) -> Vec<String> {
    TABLES
        .iter()
        .map(|t| psql(conn, &format!("select '{t}:' || count(*) from {t}")))
        .collect()
}

#[test]
fn imports_a_database_and_branches_it() {
    let env = Env::new();
    env.up();
    // "Production": the Chinook database, served by a real PostgreSQL over TCP.
    load_chinook(&env, "main");
    let production = env
        .ok(&["connection-string", "main", "--database", "chinook"])
        .trim()
        .to_string();
    let expected = fingerprint(&production);
    assert!(expected.iter().any(|l| l == "customer:59"), "{expected:?}");

    let prod = env.json(&["init", "--from", &production, "--name", "prod"]);
    assert_eq!(prod["name"], "prod");
    assert!(prod["parent"].is_null());
    assert_eq!(prod["database"], "chinook");
    let prod_conn = prod["connection_string"].as_str().unwrap().to_string();
    assert!(prod_conn.ends_with("/chinook"), "{prod_conn}");
    assert_eq!(fingerprint(&prod_conn), expected);

    env.ok(&["branch", "create", "prod-dev", "--parent", "prod"]);
    let dev = env.connection_string("prod-dev");
    assert_eq!(fingerprint(&dev), expected);
    psql(&dev, "delete from invoice_line");
    assert_eq!(fingerprint(&prod_conn), expected);

    // The duplicate name is refused before anything is done.
    let e = env.fail(&["init", "--from", &production, "--name", "prod"]);
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn an_unreachable_source_leaves_nothing_behind() {
    let env = Env::new();
    env.up();
    let timelines = env.timeline_dirs().len();
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("postgresql://u:p@127.0.0.1:{port}/app");
    let e = env.fail(&["init", "--from", &url, "--name", "prod"]);
    assert!(e.contains("cannot reach the source database"), "{e}");
    env.fail(&["branch", "get", "prod"]);
    assert_eq!(env.timeline_dirs().len(), timelines);

    // A source that answers but refuses us: wrong password.
    let main = env.connection_string("main");
    let wrong = main.replacen("stemma:", "stemma:wrong", 1);
    let e = env.fail(&["init", "--from", &wrong, "--name", "prod"]);
    assert!(e.contains("password authentication failed"), "{e}");
    assert_eq!(env.timeline_dirs().len(), timelines);
    // The name is free again.
    env.ok(&["init", "--name", "prod"]);
}
