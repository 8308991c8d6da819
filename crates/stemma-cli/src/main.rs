//! `stemma`: branches of PostgreSQL databases.
//!
//! The binary is thin glue: `serve` runs the daemon from `stemma-control` in the foreground,
//! `up`/`down` manage it in the background, and every other command is a client of the
//! daemon's HTTP API (`stemma-api`).

mod bench;
mod daemon_ctl;
mod output;
mod source_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use stemma_api::{
    AnonymizeRequest, CreateBranchRequest, CreateTokenRequest, InitRequest, ResetBranchRequest,
    RestoreBranchRequest, UpdateBranchRequest,
};

use crate::output::Output;

#[derive(Parser)]
#[command(
    name = "stemma",
    version,
    about = "Branches of PostgreSQL databases: a writable copy of production per developer, per pull request and per environment.",
    after_help = "Start with `stemma up`, then `stemma branch create dev --parent main` and `stemma psql dev`."
)]
struct Cli {
    /// The data directory [default: /var/lib/stemma as root, else ~/.local/share/stemma].
    #[arg(long, global = true, env = "STEMMA_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// How to print results.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Human)]
    output: Format,

    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, PartialEq, Eq, ValueEnum)]
enum Format {
    Human,
    Json,
    /// A pull-request comment (`schema-diff`); other commands print as `human`.
    Markdown,
}

#[derive(Args, Clone)]
struct ServeArgs {
    /// Address of the HTTP API (loopback by default).
    #[arg(long, default_value = stemma_control::DEFAULT_API_LISTEN)]
    api_listen: std::net::SocketAddr,
    /// The storage driver (fixed when the data directory is created).
    /// `auto`: the pagestore where FUSE works, else copy.
    #[arg(long, env = "STEMMA_STORAGE", default_value = "auto", value_parser = ["auto", "copy", "pagestore"])]
    storage: String,
    /// The first port handed to branches.
    #[arg(long, default_value_t = stemma_control::DEFAULT_PORT_BASE)]
    port_base: u16,
    /// The OS user computes run as when the daemon runs as root.
    #[arg(long, default_value = "postgres")]
    compute_user: String,
    /// The directory holding `postgres`, `initdb`, `pg_dump`...
    #[arg(long, env = "STEMMA_PG_BIN")]
    pg_bin: Option<PathBuf>,
    /// The shared proxy port, where `options=branch=NAME` chooses the branch.
    #[arg(long, default_value = stemma_control::DEFAULT_PROXY_LISTEN)]
    proxy_listen: std::net::SocketAddr,
    /// Suspend a compute after this much idleness, unless its branch says otherwise; 0 never.
    #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
    suspend_timeout: std::time::Duration,
    /// At most this many computes run at once; the least recently used idle one is suspended.
    #[arg(long, default_value_t = 32)]
    max_computes: usize,
    /// Checkpoint a running parent before branching it when it has written more WAL than this
    /// since its last checkpoint (PostgreSQL units: 64MB, 1GB), so that the new branch has
    /// little WAL to replay when it starts; `branch create` waits for the checkpoint. 0 never.
    #[arg(long, default_value_t = stemma_control::names::Size(stemma_control::DEFAULT_CHECKPOINT_BEFORE_BRANCH))]
    checkpoint_before_branch: stemma_control::names::Size,
    /// The pagestore's retention window: how far back `branch create --at` and `branch restore
    /// --at` may go; older history is collected. Kept with the data directory once given
    /// [default: 7 days]. Takes effect when the pagestore server starts (after `stemma down`).
    #[arg(long, value_parser = humantime::parse_duration)]
    retention: Option<std::time::Duration>,
    /// A TLS certificate chain (PEM) for the proxy; with --tls-key, clients may use TLS, and on
    /// the shared port the first label of the server name chooses the branch.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The TLS private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// The project's configuration [default: ./stemma.toml when it exists].
    #[arg(long, env = "STEMMA_CONFIG")]
    config: Option<PathBuf>,
    /// How often expired branches are deleted.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, hide = true)]
    expiry_interval: std::time::Duration,
}

#[derive(Subcommand)]
enum Command {
    /// Start the daemon in the background (does nothing if it runs already).
    Up(ServeArgs),
    /// Run the daemon in the foreground.
    Serve(ServeArgs),
    /// Stop every compute cleanly, then the daemon.
    Down,
    /// The daemon, its storage driver and its running computes.
    Status,
    /// Create a root branch: empty, or imported from an existing database.
    Init {
        /// A libpq URI of the database to import, e.g. postgresql://user:pass@host:5432/app.
        #[arg(long)]
        from: Option<String>,
        #[arg(long, default_value = "main")]
        name: String,
        /// Parallel jobs for pg_dump and pg_restore.
        #[arg(long, default_value_t = 2)]
        jobs: u32,
    },
    /// Create, list, inspect, reset, rename and delete branches.
    #[command(subcommand)]
    Branch(BranchCommand),
    /// Print a libpq URI for a branch; stable for the branch's life.
    ConnectionString {
        name: String,
        #[arg(long)]
        database: Option<String>,
    },
    /// Open psql on a branch.
    Psql {
        name: String,
        #[arg(long)]
        database: Option<String>,
        /// Arguments passed to psql.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Start or stop a branch's compute.
    #[command(subcommand)]
    Compute(ComputeCommand),
    /// Print DATABASE_URL and the PG* variables of a branch, for `eval` or a .env file.
    Env {
        name: String,
        #[arg(long)]
        database: Option<String>,
    },
    /// Branches of pull requests, for CI systems without inbound webhooks.
    #[command(subcommand)]
    Pr(PrCommand),
    /// The schema of a branch against another (default: its parent), as a unified diff.
    SchemaDiff {
        name: String,
        #[arg(long)]
        against: Option<String>,
    },
    /// Anonymized branches: masking rules.
    #[command(subcommand)]
    Anonymize(AnonymizeCommand),
    /// Run the configured migrations on a branch now.
    Migrate { name: String },
    /// API tokens restricted to a branch and the branches under it.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Measure Stemma against a baseline in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Internal: the pagestore server, which owns the page store and every FUSE mount and
    /// outlives the daemon that started it (see docs/pagestore.md).
    #[command(hide = true)]
    PagestoreServer {
        /// The pagestore driver's root (`<data dir>/pagestore`).
        #[arg(long)]
        root: PathBuf,
        /// The retention window [default: 7 days].
        #[arg(long, value_parser = humantime::parse_duration)]
        retention: Option<std::time::Duration>,
        /// UID:GID of the computes' user, owner of new timelines' root directories.
        #[arg(long, value_parser = stemma_fuse::server::parse_owner)]
        owner: Option<(u32, u32)>,
    },
    /// Production databases that root branches follow (physical) or snapshot.
    #[command(subcommand)]
    Source(source_cmd::SourceCommand),
}

#[derive(Subcommand)]
enum AnonymizeCommand {
    /// Propose masking rules (TOML, on stdout) from column names, types and sampled values.
    Suggest { branch: String },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a token that reaches only BRANCH and its descendants (printed once).
    Create {
        name: String,
        #[arg(long)]
        branch: String,
    },
    /// List restricted tokens (names and branches, never the secrets).
    List,
    /// Revoke a token.
    Delete { name: String },
}

#[derive(Subcommand)]
enum PrCommand {
    /// Create the branch of a pull request (idempotent) and run migrations on it.
    Open {
        #[arg(long)]
        number: u64,
        #[arg(long)]
        parent: Option<String>,
    },
    /// Delete the branch of a pull request (idempotent).
    Close {
        #[arg(long)]
        number: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Connect-to-first-result time on a suspended branch (cold) against a running one (warm).
    ColdStart {
        /// The branch to measure (created from main when it does not exist).
        #[arg(long, default_value = "bench-cold-start")]
        branch: String,
        #[arg(long, default_value_t = 20)]
        trials: usize,
    },
}

#[derive(Subcommand)]
enum BranchCommand {
    /// Create a branch from its parent's current state.
    Create {
        name: String,
        /// The parent branch [default: main].
        #[arg(long)]
        parent: Option<String>,
        /// Branch from a past moment (RFC 3339); needs the pagestore driver.
        #[arg(long)]
        at: Option<String>,
        /// Delete the branch after this long, e.g. 12h or 7d.
        #[arg(long)]
        ttl: Option<String>,
        /// Refuse deletion until unprotected.
        #[arg(long)]
        protected: bool,
        /// Suspend the compute after this much idleness, e.g. 5m; 0 never suspends.
        #[arg(long)]
        suspend_timeout: Option<String>,
        /// A PostgreSQL setting for this branch's compute, e.g. work_mem=16MB (repeatable).
        #[arg(long = "setting", value_name = "NAME=VALUE", value_parser = parse_setting)]
        settings: Vec<(String, String)>,
        /// Make an anonymized branch: a new root of storage holding the parent's rows masked
        /// by this rules file (see docs/anonymize.md).
        #[arg(long, value_name = "RULES.toml", conflicts_with_all = ["at", "ttl", "settings"])]
        anonymize: Option<PathBuf>,
        /// Tables copied in parallel when anonymizing.
        #[arg(long, default_value_t = 2, requires = "anonymize")]
        jobs: u32,
    },
    /// List branches as a tree.
    List,
    /// Show one branch.
    Get { name: String },
    /// Delete a branch (refused for protected branches and branches with children).
    Delete { name: String },
    /// Bring a branch back to its parent's current state; its connection string stays.
    Reset {
        name: String,
        /// Keep the current state as a new branch with this name.
        #[arg(long)]
        preserve_under_name: Option<String>,
    },
    /// Bring a branch back to a past moment (needs the pagestore driver).
    Restore {
        name: String,
        #[arg(long)]
        at: String,
        #[arg(long)]
        preserve_under_name: Option<String>,
    },
    /// Rename a branch; its connection string stays.
    Rename { old: String, new: String },
    /// Change a branch's settings.
    Set {
        name: String,
        #[arg(long)]
        suspend_timeout: Option<String>,
        /// A duration from now, or `none`.
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        protected: Option<bool>,
        /// Set a PostgreSQL setting, e.g. work_mem=16MB (repeatable; restarts the compute).
        #[arg(long = "setting", value_name = "NAME=VALUE", value_parser = parse_setting)]
        settings: Vec<(String, String)>,
        /// Remove a setting override, back to the default (repeatable).
        #[arg(long = "unset-setting", value_name = "NAME")]
        unset_settings: Vec<String>,
        /// New masking rules for an anonymized branch, applied at its next reset.
        #[arg(long, value_name = "RULES.toml")]
        anonymize: Option<PathBuf>,
    },
}

fn read_rules(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("reading the masking rules {}", path.display()))
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    if s.trim() == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("expected NAME=VALUE, got {s:?}")),
    }
}

#[derive(Subcommand)]
enum ComputeCommand {
    Start { name: String },
    Stop { name: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Serve(_) | Command::PagestoreServer { .. }
    ) {
        // A client command whose output pipe closes (`stemma status | head`) ends quietly,
        // like other Unix tools. Long-running servers keep Rust's default (ignored), so a
        // client that goes away is an error on that socket, not the end of the process.
        // SAFETY: setting a signal's disposition to its default, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", output::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    let data_dir = cli
        .data_dir
        .clone()
        .unwrap_or_else(daemon_ctl::default_data_dir);
    let out = Output::new(cli.output == Format::Json);
    match cli.command {
        Command::Serve(args) => {
            daemon_ctl::init_logging();
            let cfg = daemon_ctl::config(&data_dir, &args)?;
            let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            rt.block_on(stemma_control::daemon::serve(cfg))?;
        }
        Command::Up(args) => daemon_ctl::up(&data_dir, &args, &out)?,
        Command::Down => daemon_ctl::down(&data_dir)?,
        Command::Status => {
            let client = daemon_ctl::client(&data_dir)?;
            out.status(&client.status()?);
        }
        Command::Init { from, name, jobs } => {
            let client = daemon_ctl::client(&data_dir)?;
            let op = client.init(&InitRequest {
                name,
                from,
                jobs: Some(jobs),
            })?;
            let branch = daemon_ctl::wait_operation(&client, op, &out)?;
            out.branch(&branch);
        }
        Command::Branch(cmd) => {
            let client = daemon_ctl::client(&data_dir)?;
            match cmd {
                BranchCommand::Create {
                    name,
                    parent,
                    at,
                    ttl,
                    protected,
                    suspend_timeout,
                    settings,
                    anonymize: None,
                    jobs: _,
                } => out.branch(&client.create_branch(&CreateBranchRequest {
                    name,
                    parent,
                    at,
                    ttl,
                    protected,
                    suspend_timeout,
                    settings: (!settings.is_empty()).then(|| settings.into_iter().collect()),
                })?),
                BranchCommand::Create {
                    name,
                    parent,
                    protected,
                    suspend_timeout,
                    anonymize: Some(rules),
                    jobs,
                    ..
                } => {
                    let rules = read_rules(&rules)?;
                    let op = client.anonymize(&AnonymizeRequest {
                        name,
                        parent,
                        rules,
                        jobs: Some(jobs),
                        protected,
                        suspend_timeout,
                    })?;
                    let branch = daemon_ctl::wait_operation(&client, op, &out)?;
                    out.branch(&branch);
                }
                BranchCommand::List => out.branches(&client.list_branches()?),
                BranchCommand::Get { name } => out.branch(&client.get_branch(&name)?),
                BranchCommand::Delete { name } => {
                    client.delete_branch(&name)?;
                    out.message(
                        &format!("deleted branch {name}"),
                        serde_json::json!({ "deleted": name }),
                    );
                }
                BranchCommand::Reset {
                    name,
                    preserve_under_name: None,
                } if client.get_branch(&name)?.anonymization.is_some() => {
                    // Re-anonymizing takes a while: follow it with progress.
                    let op = client.reanonymize(&name)?;
                    let branch = daemon_ctl::wait_operation(&client, op, &out)?;
                    out.branch(&branch);
                }
                BranchCommand::Reset {
                    name,
                    preserve_under_name,
                } => out.branch(&client.reset_branch(
                    &name,
                    &ResetBranchRequest {
                        preserve_under_name,
                    },
                )?),
                BranchCommand::Restore {
                    name,
                    at,
                    preserve_under_name,
                } => out.branch(&client.restore_branch(
                    &name,
                    &RestoreBranchRequest {
                        at,
                        preserve_under_name,
                    },
                )?),
                BranchCommand::Rename { old, new } => {
                    out.branch(&client.rename_branch(&old, &new)?)
                }
                BranchCommand::Set {
                    name,
                    suspend_timeout,
                    ttl,
                    protected,
                    settings,
                    unset_settings,
                    anonymize,
                } => {
                    let anonymize = anonymize.as_deref().map(read_rules).transpose()?;
                    let mut changes: std::collections::BTreeMap<String, Option<String>> =
                        settings.into_iter().map(|(k, v)| (k, Some(v))).collect();
                    changes.extend(unset_settings.into_iter().map(|k| (k, None)));
                    out.branch(&client.update_branch(
                        &name,
                        &UpdateBranchRequest {
                            protected,
                            ttl,
                            suspend_timeout,
                            settings: (!changes.is_empty()).then_some(changes),
                            anonymize,
                        },
                    )?)
                }
            }
        }
        Command::ConnectionString { name, database } => {
            let client = daemon_ctl::client(&data_dir)?;
            let cs = client.connection_string(&name, database.as_deref())?;
            if let (Some(note), false) = (&cs.note, out.is_json()) {
                eprintln!("note: {note}");
            }
            out.message(&cs.connection_string, serde_json::to_value(&cs)?);
        }
        Command::Psql {
            name,
            database,
            args,
        } => {
            let client = daemon_ctl::client(&data_dir)?;
            // A branch that follows production logs in with production's credentials: the
            // stored password goes to psql in its environment (a restricted token cannot ask
            // for it; psql then prompts).
            let cs = client
                .connection_string_with_source_password(&name, database.as_deref())
                .or_else(|_| client.connection_string(&name, database.as_deref()))?;
            if let Some(note) = &cs.note {
                eprintln!("note: {note}");
            }
            let psql = daemon_ctl::psql_path(&client);
            return daemon_ctl::exec_psql(
                &psql,
                &cs.connection_string,
                &args,
                cs.source_password.as_deref(),
            );
        }
        Command::Env { name, database } => {
            let client = daemon_ctl::client(&data_dir)?;
            let b = client.get_branch(&name)?;
            let cs = client.connection_string(&name, database.as_deref())?;
            out.env(&b, &cs);
        }
        Command::Pr(PrCommand::Open { number, parent }) => {
            let client = daemon_ctl::client(&data_dir)?;
            out.branch(&client.pr_open(number, parent.as_deref())?);
        }
        Command::Pr(PrCommand::Close { number }) => {
            let client = daemon_ctl::client(&data_dir)?;
            let v = client.pr_close(number)?;
            let name = v["branch"].as_str().unwrap_or_default().to_string();
            let text = if v["deleted"].as_bool() == Some(true) {
                format!("deleted branch {name}")
            } else {
                format!("branch {name} does not exist; nothing to do")
            };
            out.message(&text, v);
        }
        Command::SchemaDiff { name, against } => {
            let client = daemon_ctl::client(&data_dir)?;
            let markdown = cli.output == Format::Markdown;
            let d = client.schema_diff(&name, against.as_deref(), markdown)?;
            out.schema_diff(&d);
        }
        Command::Anonymize(AnonymizeCommand::Suggest { branch }) => {
            let client = daemon_ctl::client(&data_dir)?;
            let v = client.anonymize_suggest(&branch)?;
            let rules = v["rules"].as_str().unwrap_or_default().to_string();
            out.message(rules.trim_end(), v);
        }
        Command::Migrate { name } => {
            let client = daemon_ctl::client(&data_dir)?;
            let b = client.migrate(&name)?;
            let failed = b.migration.as_ref().is_some_and(|m| m.status == "failed");
            out.branch(&b);
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Token(cmd) => {
            let client = daemon_ctl::client(&data_dir)?;
            match cmd {
                TokenCommand::Create { name, branch } => {
                    let t = client.create_token(&CreateTokenRequest { name, branch })?;
                    let secret = t.token.clone().unwrap_or_default();
                    out.message(
                        &format!(
                            "{secret}\n\n(token {:?} reaches branch {:?} and the branches under it; it is shown only now.\nUse it with STEMMA_API_URL={} STEMMA_TOKEN=<token>)",
                            t.name,
                            t.branch,
                            client.base_url()
                        ),
                        serde_json::to_value(&t)?,
                    );
                }
                TokenCommand::List => {
                    let tokens = client.list_tokens()?;
                    let text = tokens
                        .iter()
                        .map(|t| format!("{}\t{}\t{}", t.name, t.branch, t.created_at.to_rfc3339()))
                        .collect::<Vec<_>>()
                        .join("\n");
                    out.message(&text, serde_json::to_value(&tokens)?);
                }
                TokenCommand::Delete { name } => {
                    client.delete_token(&name)?;
                    out.message(
                        &format!("deleted token {name}"),
                        serde_json::json!({ "deleted": name }),
                    );
                }
            }
        }
        Command::Bench(BenchCommand::ColdStart { branch, trials }) => {
            let client = daemon_ctl::client(&data_dir)?;
            bench::cold_start(&client, &branch, trials.max(1), cli.output == Format::Json)?;
        }
        Command::Source(cmd) => {
            let client = daemon_ctl::client(&data_dir)?;
            source_cmd::run(&client, cmd, &out, cli.output == Format::Json)?;
        }
        Command::Compute(cmd) => {
            let client = daemon_ctl::client(&data_dir)?;
            let b = match cmd {
                ComputeCommand::Start { name } => client.start_compute(&name)?,
                ComputeCommand::Stop { name } => client.stop_compute(&name)?,
            };
            out.branch(&b);
        }
        Command::PagestoreServer {
            root,
            owner,
            retention,
        } => {
            // Before any thread starts: the server blocks SIGTERM/SIGINT for all its threads.
            daemon_ctl::init_logging();
            let mut options = stemma_fuse::DriverOptions::default();
            if let Some(r) = retention {
                options.store.retention = r;
            }
            stemma_fuse::server::run(&root, owner, options)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
