//! Human tables and `--output json`.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use stemma_api::{Branch, BranchState, Status};

pub struct Output {
    json: bool,
}

/// `1536` -> `1.5 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// An error and its causes on one line, without repeating a cause the message already holds.
pub fn error_chain(e: &anyhow::Error) -> String {
    stemma_api::error_chain(e.as_ref())
}

fn state(s: BranchState) -> &'static str {
    match s {
        BranchState::Running => "running",
        BranchState::Suspended => "suspended",
    }
}

impl Output {
    pub fn new(json: bool) -> Self {
        Output { json }
    }

    fn print_json(v: &impl serde::Serialize) {
        match serde_json::to_string_pretty(v) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot print JSON: {e}"),
        }
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    pub fn message(&self, text: &str, json: serde_json::Value) {
        if self.json {
            Self::print_json(&json);
        } else {
            println!("{text}");
        }
    }

    /// A spinner with the elapsed time and `msg`, on a terminal only (not with JSON): for a
    /// long call that reports no progress of its own.
    pub fn spinner(&self, msg: &str) -> Option<ProgressBar> {
        if self.json || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(msg.to_string());
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(bar)
    }

    pub fn progress(&self) -> Option<ProgressBar> {
        if self.json || !std::io::stderr().is_terminal() {
            return None;
        }
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(bar)
    }

    pub fn branch(&self, b: &Branch) {
        if self.json {
            return Self::print_json(b);
        }
        println!("branch:            {}", b.name);
        println!("parent:            {}", b.parent.as_deref().unwrap_or("-"));
        match b.state {
            BranchState::Suspended => println!(
                "state:             suspended (no process; the first connection starts it)"
            ),
            BranchState::Running => println!("state:             {}", state(b.state)),
        }
        println!("connection string: {}", b.connection_string);
        if let Some(note) = &b.note {
            println!("note:              {note}");
        }
        println!("created at:        {}", b.created_at.to_rfc3339());
        if let Some(t) = b.last_reset_at {
            println!("last reset at:     {}", t.to_rfc3339());
        }
        println!(
            "protected:         {}",
            if b.protected { "yes" } else { "no" }
        );
        if let Some(t) = b.expires_at {
            println!("expires at:        {}", t.to_rfc3339());
        }
        println!("logical size:      {}", human_bytes(b.logical_size_bytes));
        println!("own storage:       {}", human_bytes(b.own_storage_bytes));
        for (k, v) in &b.settings {
            println!("setting:           {k} = {v}");
        }
        if b.expired {
            println!("expired:           yes, kept because it has children");
        }
        if let Some(a) = &b.anonymization {
            println!("masking rules:     sha256 {}", &a.rules_digest);
            match &a.last_run {
                Some(r) => println!(
                    "anonymized:        {} at {} ({} tables, {} rows{}){}",
                    r.outcome,
                    r.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    r.tables,
                    r.rows,
                    if r.rules_digest == a.rules_digest {
                        ""
                    } else {
                        "; new rules apply at the next reset"
                    },
                    r.message
                        .as_deref()
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                ),
                None => println!("anonymized:        never"),
            }
        }
        if let Some(m) = &b.migration {
            println!(
                "migration:         {} at {}",
                m.status,
                m.finished_at.to_rfc3339()
            );
            if m.status == "failed" {
                for line in m
                    .log
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    println!("    {line}");
                }
            }
        }
        if let Some(t) = b.next_reset_at {
            println!("next reset:        {}", t.to_rfc3339());
        }
        if let Some(r) = &b.last_scheduled_reset {
            println!(
                "last sched. reset: {} at {}{}",
                r.outcome,
                r.at.to_rfc3339(),
                r.message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            );
        }
        if let Some(c) = &b.compute {
            println!("compute:           running, pid {}", c.pid);
        }
        if let Some(e) = &b.compute_error {
            println!("compute error:     {e}");
        }
        if let Some(e) = &b.endpoint_error {
            println!("endpoint error:    {e}");
        }
    }

    /// `KEY='value'` lines for `eval $(stemma env NAME)` or a `.env` file.
    pub fn env(&self, b: &Branch, cs: &stemma_api::ConnectionString) {
        // `user:password@` or, for a root that follows production, `user@` alone.
        let (user, password) = cs
            .connection_string
            .trim_start_matches("postgresql://")
            .split_once('@')
            .map(|(creds, _)| match creds.split_once(':') {
                Some((u, p)) => (u.to_string(), p.to_string()),
                None => (creds.to_string(), String::new()),
            })
            .unwrap_or_default();
        if let (Some(note), false) = (&cs.note, self.json) {
            eprintln!("note: {note}");
        }
        let vars = [
            ("DATABASE_URL", cs.connection_string.clone()),
            ("PGHOST", "127.0.0.1".to_string()),
            ("PGPORT", b.port.to_string()),
            ("PGUSER", user),
            ("PGPASSWORD", password),
            ("PGDATABASE", cs.database.clone()),
        ];
        if self.json {
            let map: serde_json::Map<String, serde_json::Value> = vars
                .iter()
                .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.clone())))
                .collect();
            return Self::print_json(&map);
        }
        for (k, v) in vars {
            println!("{k}='{}'", v.replace('\'', "'\\''"));
        }
    }

    pub fn schema_diff(&self, d: &stemma_api::SchemaDiff) {
        if self.json {
            return Self::print_json(d);
        }
        if d.identical && !d.diff.starts_with('#') {
            println!("no schema changes in {} against {}", d.branch, d.against);
        } else {
            print!("{}", d.diff);
        }
    }

    pub fn branches(&self, branches: &[Branch]) {
        if self.json {
            return Self::print_json(&branches);
        }
        println!("{}", branch_tree(branches));
    }

    pub fn status(&self, s: &Status) {
        if self.json {
            return Self::print_json(s);
        }
        println!(
            "daemon:    running (pid {}, since {})",
            s.pid,
            s.started_at.to_rfc3339()
        );
        println!(
            "api:       {} (OpenAPI at {}/openapi.json)",
            s.api_url, s.api_url
        );
        println!("data dir:  {}", s.data_dir);
        println!("storage:   {}", s.storage_detail);
        println!(
            "postgres:  {} ({}), computes run as {}",
            s.postgres_version, s.postgres_bin_dir, s.compute_user
        );
        println!("branches:  {}", s.branches);
        if s.computes.is_empty() {
            println!("computes:  none running");
        } else {
            println!("computes:");
            for c in &s.computes {
                println!("  {:<24} pid {:<8} port {}", c.branch, c.pid, c.port);
            }
        }
    }

    pub fn up(&self, s: &Status, branches: &[Branch], already: bool) {
        if self.json {
            return Self::print_json(s);
        }
        let verb = if already {
            "is already running"
        } else {
            "is running"
        };
        println!("Stemma {verb} (pid {}).", s.pid);
        println!(
            "  API:      {}  (OpenAPI: {}/openapi.json)",
            s.api_url, s.api_url
        );
        println!("  data:     {}", s.data_dir);
        println!("  storage:  {}", s.storage_detail);
        println!();
        println!("{}", branch_tree(branches));
        println!();
        for b in branches {
            println!("  {:<20} {}", b.name, b.connection_string);
        }
    }
}

/// Branches as a tree: roots first, children indented under their parent.
pub fn branch_tree(branches: &[Branch]) -> String {
    let mut children: BTreeMap<Option<&str>, Vec<&Branch>> = BTreeMap::new();
    let names: std::collections::HashSet<&str> = branches.iter().map(|b| b.name.as_str()).collect();
    for b in branches {
        let parent = b.parent.as_deref().filter(|p| names.contains(p));
        children.entry(parent).or_default().push(b);
    }
    for list in children.values_mut() {
        list.sort_by(|a, b| a.name.cmp(&b.name));
    }
    let mut rows: Vec<[String; 6]> = vec![[
        "NAME".into(),
        "STATE".into(),
        "PORT".into(),
        "SIZE".into(),
        "OWN".into(),
        "EXPIRES".into(),
    ]];
    fn walk<'a>(
        parent: Option<&'a str>,
        prefix: &str,
        children: &BTreeMap<Option<&'a str>, Vec<&'a Branch>>,
        rows: &mut Vec<[String; 6]>,
    ) {
        let Some(list) = children.get(&parent) else {
            return;
        };
        for (i, b) in list.iter().enumerate() {
            let last = i + 1 == list.len();
            let (branch, next) = match parent {
                None => (String::new(), String::new()),
                Some(_) => (
                    format!("{prefix}{}", if last { "└─ " } else { "├─ " }),
                    format!("{prefix}{}", if last { "   " } else { "│  " }),
                ),
            };
            let mut name = format!("{branch}{}", b.name);
            if b.protected {
                name.push_str(" (protected)");
            }
            rows.push([
                name,
                state(b.state).into(),
                b.port.to_string(),
                human_bytes(b.logical_size_bytes),
                human_bytes(b.own_storage_bytes),
                b.expires_at
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_else(|| "-".into()),
            ]);
            walk(Some(b.name.as_str()), &next, children, rows);
        }
    }
    walk(None, "", &children, &mut rows);
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|r| {
            r.iter()
                .enumerate()
                .map(|(c, cell)| {
                    let pad = widths[c] - cell.chars().count();
                    format!("{cell}{}", " ".repeat(pad))
                })
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str, parent: Option<&str>) -> Branch {
        Branch {
            name: name.into(),
            parent: parent.map(Into::into),
            created_at: chrono::Utc::now(),
            state: BranchState::Running,
            connection_string: String::new(),
            protected: false,
            expires_at: None,
            logical_size_bytes: 2048,
            own_storage_bytes: 1024,
            database: "postgres".into(),
            port: 1,
            timeline_id: "t".into(),
            last_reset_at: None,
            suspend_timeout_seconds: None,
            settings: Default::default(),
            compute: None,
            compute_error: None,
            endpoint_error: None,
            expired: false,
            migration: None,
            anonymization: None,
            next_reset_at: None,
            last_scheduled_reset: None,
            follows_source: None,
            note: None,
        }
    }

    #[test]
    fn bytes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }

    #[test]
    fn tree_nests_children() {
        let t = branch_tree(&[
            b("main", None),
            b("dev", Some("main")),
            b("dev-child", Some("dev")),
            b("alice", Some("main")),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("main"));
        assert!(lines[2].starts_with("├─ alice"));
        assert!(lines[3].starts_with("└─ dev"));
        assert!(lines[4].starts_with("   └─ dev-child"));
    }
}
