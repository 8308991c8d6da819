//! `stemma source`: the production database a root branch follows or snapshots.

use anyhow::Result;
use clap::{Subcommand, ValueEnum};
use stemma_api::{AddSourceRequest, Client, Source, SourceMode};

use crate::output::{human_bytes, Output};

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Base backup, then a hot standby streaming from production (needs REPLICATION and the
    /// same PostgreSQL major version).
    Physical,
    /// pg_dump/pg_restore snapshots, taken again by `stemma source refresh` (managed services).
    Snapshot,
}

#[derive(Subcommand)]
pub enum SourceCommand {
    /// Feed a root branch from production.
    Add {
        name: String,
        /// A libpq URI of production, e.g. postgresql://replicator:secret@db.internal/app.
        #[arg(long)]
        url: String,
        #[arg(long, value_enum)]
        mode: Mode,
        /// The root branch it feeds (created when missing) [default: the root branch, main].
        #[arg(long)]
        branch: Option<String>,
        /// Replace a root that already holds data (its children keep their state).
        #[arg(long)]
        replace: bool,
        /// Snapshot mode: parallel pg_dump/pg_restore jobs (connections to production).
        #[arg(long, default_value_t = 2)]
        jobs: u32,
        /// Physical mode: warn when the slot holds back more WAL than this many bytes.
        #[arg(long)]
        max_retained_wal_bytes: Option<u64>,
    },
    /// Mode, state, lag or last refresh, retained WAL, slot and warnings.
    Status { name: Option<String> },
    /// Snapshot mode: take a new consistent snapshot now; the root switches to it in one step.
    Refresh { name: String },
    /// Stop following production and drop Stemma's replication slot there.
    Remove { name: String },
}

pub fn run(client: &Client, cmd: SourceCommand, out: &Output, json: bool) -> Result<()> {
    match cmd {
        SourceCommand::Add {
            name,
            url,
            mode,
            branch,
            replace,
            jobs,
            max_retained_wal_bytes,
        } => {
            if !json {
                eprintln!(
                    "Adding source {name} ({}); this copies production and may take a while...",
                    match mode {
                        Mode::Physical => "physical: base backup, then streaming",
                        Mode::Snapshot => "snapshot: pg_dump and pg_restore",
                    }
                );
            }
            let spinner = out.spinner(match mode {
                Mode::Physical => "copying production (pg_basebackup), then checking the standby",
                Mode::Snapshot => "copying production (pg_dump | pg_restore)",
            });
            let added = client.add_source(&AddSourceRequest {
                name,
                url,
                mode: match mode {
                    Mode::Physical => SourceMode::Physical,
                    Mode::Snapshot => SourceMode::Snapshot,
                },
                branch,
                replace,
                jobs: Some(jobs),
                max_retained_wal_bytes,
            });
            if let Some(sp) = spinner {
                sp.finish_and_clear();
            }
            print(&[added?], json);
        }
        SourceCommand::Status { name } => {
            let sources = match name {
                Some(n) => vec![client.get_source(&n)?],
                None => client.list_sources()?,
            };
            print(&sources, json);
        }
        SourceCommand::Refresh { name } => {
            let spinner = out.spinner(&format!(
                "refreshing {name}: a new snapshot of production (pg_dump | pg_restore)"
            ));
            let refreshed = client.refresh_source(&name);
            if let Some(sp) = spinner {
                sp.finish_and_clear();
            }
            print(&[refreshed?], json);
        }
        SourceCommand::Remove { name } => {
            let v = client.remove_source(&name)?;
            out.message(&format!("source {name} removed"), v);
        }
    }
    Ok(())
}

fn print(sources: &[Source], json: bool) {
    if json {
        match serde_json::to_string_pretty(sources) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: cannot print JSON: {e}"),
        }
        return;
    }
    if sources.is_empty() {
        println!(
            "no sources (add one with `stemma source add NAME --url URL --mode physical|snapshot`)"
        );
        return;
    }
    for s in sources {
        let mode = match s.mode {
            SourceMode::Physical => "physical",
            SourceMode::Snapshot => "snapshot",
        };
        println!("{} -> {} ({mode}, {})", s.name, s.branch, s.state);
        println!("  url:          {}", s.url);
        if let Some(slot) = &s.slot {
            println!("  slot:         {slot}");
        }
        if let Some(r) = &s.replication {
            println!("  replication:  {r}");
        }
        if let Some(l) = s.lag_bytes {
            let secs = s
                .lag_seconds
                .map(|t| format!(", {t:.1}s"))
                .unwrap_or_default();
            println!("  lag:          {}{secs}", human_bytes(l));
        }
        if let Some(r) = s.retained_wal_bytes {
            println!(
                "  retained WAL: {} (warns above {})",
                human_bytes(r),
                human_bytes(s.max_retained_wal_bytes)
            );
        }
        if let Some(t) = s.last_refresh_at {
            println!("  last refresh: {}", t.to_rfc3339());
        }
        if let Some(e) = &s.last_error {
            println!("  last error:   {e}");
        }
        for w in &s.warnings {
            println!("  warning:      {w}");
        }
    }
}
