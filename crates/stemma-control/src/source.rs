//! Sources: a root branch that keeps up with a production database running elsewhere.
//!
//! Two modes:
//!
//! - **physical**: a replication slot named `stemma_<source>_<random>` is created on production,
//!   `pg_basebackup` copies production into a new timeline, and the root's compute runs there as
//!   a hot standby streaming through that slot (`standby.signal`, `primary_conninfo`,
//!   `primary_slot_name`). The root's compute never suspends while it follows. A branch made
//!   from it is cut loose before its first start ([`Engine::cut_loose_from_production`]): no
//!   standby signal, no primary connection, no slot, and a `stemma` superuser with the
//!   branch's own password, so the child is promoted and never connects to production.
//! - **snapshot**: `pg_dump` (synchronized snapshot, parallel jobs) and `pg_restore` into a new
//!   timeline, the same code as `init --from` ([`crate::import::Import`]); the root switches
//!   to it in one step and keeps its port and credentials. A failure leaves everything serving.
//!
//! Safety toward production: Stemma only creates and drops its own slot there and reads.
//! The URL (with its password) lives in the metadata store (mode 0600) and in the standby's
//! `postgresql.conf` (0600, owned by the compute user); every message shows it redacted.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use chrono::Utc;
use stemma_api as api;
use stemma_compute::DiesWithParent;
use stemma_storage::{StorageDriver, TimelineId};
use tokio::process::Command;

use crate::engine::{new_timeline_id, Engine, DB_SUPERUSER};
use crate::import::Import;
use crate::metadata::{BranchRow, BranchUpdate, SourceRow};
use crate::names::validate_branch_name;
use crate::{ControlError, Result};

/// `source status` warns above this much WAL held back on production, unless told otherwise.
pub const DEFAULT_MAX_RETAINED_WAL: u64 = 1 << 30;
/// How long one statement or connection attempt to production may take.
const PRODUCTION_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the daemon makes sure following roots run.
const FOLLOW_INTERVAL: Duration = Duration::from_secs(2);
/// How often the daemon asks production how much WAL each slot holds back.
const RETENTION_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// Beyond this many times its warning limit, a slot is dropped and the root re-seeded: WAL on
/// production never grows without bound because of Stemma.
pub const HARD_LIMIT_FACTOR: u64 = 4;
/// Settings a hot standby needs at least as high as its primary's.
const STANDBY_MINIMUMS: &[&str] = &[
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
];
/// A branch of a standby, and a standby: local connections need a password (the roles are
/// production's; `md5` accepts SCRAM secrets too).
/// TCP from 127.0.0.1 is the proxy's connection to the compute's own loopback address (for
/// its kernel shortcut); clients reach that address only on this host, as they reach the
/// branch's port.
const HBA_PASSWORD: &str =
    "# Written by stemma.\nlocal all all md5\nhost all all 127.0.0.1/32 md5\n";
/// Only while a new branch of a standby gets its superuser, on a private socket, from a file
/// outside the data directory (`hba_file`): a crash cannot leave it in force.
const HBA_TRUST: &str = "# Written by stemma, for a moment.\nlocal all all trust\n";
/// Lines of `postgresql.auto.conf` that would make a copy follow production.
const FOLLOW_SETTINGS: &[&str] = &[
    "primary_conninfo",
    "primary_slot_name",
    "restore_command",
    "recovery_target",
    "archive_cleanup_command",
];

// ----- URLs ---------------------------------------------------------------------------------

/// A libpq URI, taken apart so that the password travels in `PGPASSWORD`, never on a command
/// line or in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SourceUrl {
    pub host: String,
    pub port: Option<u16>,
    pub user: String,
    pub password: String,
    pub database: String,
    pub params: Vec<(String, String)>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl SourceUrl {
    pub(crate) fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| {
            ControlError::Invalid(format!(
                "invalid source URL {}: {why}; give it as postgresql://USER:PASSWORD@HOST:PORT/DATABASE",
                redact(url)
            ))
        };
        let rest = url
            .strip_prefix("postgresql://")
            .or_else(|| url.strip_prefix("postgres://"))
            .ok_or_else(|| bad("it does not start with postgresql://"))?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("", authority));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        if hostport.contains(',') {
            return Err(bad("several hosts are not supported"));
        }
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !p.contains(']') => {
                let port = p
                    .parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?;
                (h, Some(port))
            }
            _ => (hostport, None),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut params = Vec::new();
        let mut host = percent_decode(host);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let (k, v) = (percent_decode(k), percent_decode(v));
            match k.as_str() {
                "host" => host = v,
                "password" | "user" | "dbname" | "port" | "replication" => {
                    return Err(bad(&format!(
                        "put {k} in the URL itself, not in its parameters"
                    )))
                }
                _ => params.push((k, v)),
            }
        }
        let user = percent_decode(user);
        if user.is_empty() {
            return Err(bad("it names no user"));
        }
        if host.is_empty() {
            return Err(bad("it names no host"));
        }
        let database = match percent_decode(path) {
            d if d.is_empty() => user.clone(),
            d => d,
        };
        Ok(SourceUrl {
            host,
            port,
            user,
            password: percent_decode(password),
            database,
            params,
        })
    }

    /// A libpq keyword/value connection string, without the password unless asked.
    pub(crate) fn conninfo(&self, with_password: bool, extra: &[(&str, &str)]) -> String {
        let mut parts = vec![
            ("host".to_string(), self.host.clone()),
            ("user".to_string(), self.user.clone()),
            ("dbname".to_string(), self.database.clone()),
        ];
        if let Some(p) = self.port {
            parts.push(("port".into(), p.to_string()));
        }
        if with_password && !self.password.is_empty() {
            parts.push(("password".into(), self.password.clone()));
        }
        parts.extend(self.params.iter().cloned());
        parts.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        parts
            .iter()
            .map(|(k, v)| format!("{k}='{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The URL with its password replaced by `****` (also a `password=` parameter).
pub fn redact(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        let end = out[start..]
            .find(['/', '?'])
            .map(|i| start + i)
            .unwrap_or(out.len());
        if let Some(at) = out[start..end].rfind('@').map(|i| start + i) {
            if let Some(colon) = out[start..at].find(':').map(|i| start + i) {
                out.replace_range(colon + 1..at, "****");
            }
        }
    }
    // key=value forms and URI parameters.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("password=") {
        let value_start = i + "password=".len();
        result.push_str(&rest[..value_start]);
        result.push_str("****");
        let tail = &rest[value_start..];
        let value_end = tail.find(['&', ' ']).unwrap_or(tail.len());
        rest = &tail[value_end..];
    }
    result.push_str(rest);
    result
}

/// `text` with every occurrence of `secret` replaced, for messages that quote tools' output.
fn scrub(text: &str, secret: &str) -> String {
    if secret.len() < 2 {
        return text.to_string();
    }
    text.replace(secret, "****")
}

// ----- talking to production ----------------------------------------------------------------

/// What production told us before anything is created.
#[derive(Debug)]
struct Probe {
    major: u32,
    can_replicate: bool,
    wal_level: String,
    database: String,
    minimums: BTreeMap<String, u64>,
}

/// Turns a failed connection's stderr into an error that says what to change.
fn connection_error(stderr: &str, url: &SourceUrl, what: &str) -> ControlError {
    let first = stderr
        .lines()
        .map(|l| l.trim_start_matches("psql: ").trim())
        .find(|l| !l.is_empty())
        .unwrap_or("no answer")
        .to_string();
    let first = scrub(&first, &url.password);
    let host = match url.port {
        Some(p) => format!("{}:{p}", url.host),
        None => url.host.clone(),
    };
    if stderr.contains("password authentication failed") {
        ControlError::Invalid(format!(
            "production at {host} refused the password of user {:?} (password authentication failed); check the password in the URL",
            url.user
        ))
    } else if stderr.contains("no pg_hba.conf entry") {
        ControlError::Invalid(format!(
            "production at {host} refuses {what} from this host in its pg_hba.conf ({first}); add a line such as `host {} {} <this host's address>/32 scram-sha-256` to production's pg_hba.conf and reload it",
            if what.contains("replication") { "replication" } else { &url.database },
            url.user
        ))
    } else if stderr.contains("must be superuser or replication role")
        || stderr.contains("permission denied to start WAL sender")
    {
        ControlError::Invalid(format!(
            "user {:?} may not replicate from production ({first}); on production run `ALTER ROLE \"{}\" REPLICATION`, or use --mode snapshot",
            url.user, url.user
        ))
    } else if stderr.contains("Connection refused")
        || stderr.contains("timeout expired")
        || stderr.contains("could not translate host name")
        || stderr.contains("No route to host")
        || stderr.contains("could not connect")
    {
        ControlError::Invalid(format!(
            "cannot reach the source database at {host}: {first}"
        ))
    } else {
        ControlError::Invalid(format!("production at {host} refused {what}: {first}"))
    }
}

impl Engine {
    fn pg_tool(&self, name: &str) -> PathBuf {
        self.supervisor.install().bin(name)
    }

    /// Runs `psql -c sql` on `conninfo` (the password through the environment), bounded in
    /// time. Returns stdout, or stderr as the error.
    async fn psql_raw(
        &self,
        conninfo: &str,
        password: &str,
        sql: &str,
    ) -> Result<std::result::Result<String, String>> {
        let mut cmd = Command::new(self.pg_tool("psql"));
        cmd.args([
            "-X",
            "-w",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ])
        .env("PGCONNECT_TIMEOUT", "15")
        .env("PGAPPNAME", "stemma")
        .env_remove("PGPASSFILE")
        .dies_with_parent()
        .stdin(Stdio::null())
        .kill_on_drop(true);
        if password.is_empty() {
            cmd.env_remove("PGPASSWORD");
        } else {
            cmd.env("PGPASSWORD", password);
        }
        let out = tokio::time::timeout(PRODUCTION_TIMEOUT, cmd.output())
            .await
            .map_err(|_| {
                ControlError::Invalid(format!(
                    "no answer within {}s (psql)",
                    PRODUCTION_TIMEOUT.as_secs()
                ))
            })?
            .context("running psql")?;
        Ok(if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        })
    }

    /// Runs SQL on production; a failure becomes a clear error.
    async fn production_sql(&self, url: &SourceUrl, sql: &str) -> Result<String> {
        self.psql_raw(&url.conninfo(false, &[]), &url.password, sql)
            .await?
            .map_err(|e| connection_error(&e, url, "connections"))
    }

    /// Runs a replication command on a physical replication connection to production.
    async fn production_replication(&self, url: &SourceUrl, command: &str) -> Result<String> {
        self.psql_raw(
            &url.conninfo(false, &[("replication", "true")]),
            &url.password,
            command,
        )
        .await?
        .map_err(|e| connection_error(&e, url, "replication connections"))
    }

    async fn probe(&self, url: &SourceUrl) -> Result<Probe> {
        let mut sql = String::from(
            "SELECT current_setting('server_version_num') || '|' || \
             coalesce((SELECT (rolreplication OR rolsuper)::text FROM pg_roles WHERE rolname = current_user), 'false') || '|' || \
             current_setting('wal_level') || '|' || current_database()",
        );
        for s in STANDBY_MINIMUMS {
            sql.push_str(&format!(" || '|' || current_setting('{s}')"));
        }
        let answer = self.production_sql(url, &sql).await?;
        let parts: Vec<&str> = answer.split('|').collect();
        if parts.len() != 4 + STANDBY_MINIMUMS.len() {
            return Err(anyhow!("unexpected answer from production: {answer:?}").into());
        }
        let minimums = STANDBY_MINIMUMS
            .iter()
            .zip(&parts[4..])
            .filter_map(|(k, v)| v.parse::<u64>().ok().map(|v| (k.to_string(), v)))
            .collect();
        Ok(Probe {
            major: parts[0].parse::<u32>().unwrap_or(0) / 10000,
            can_replicate: parts[1] == "true",
            wal_level: parts[2].to_string(),
            database: parts[3].to_string(),
            minimums,
        })
    }

    async fn drop_slot(&self, url: &SourceUrl, slot: &str) -> Result<()> {
        match self
            .production_replication(url, &format!("DROP_REPLICATION_SLOT {slot} WAIT"))
            .await
        {
            Ok(_) => Ok(()),
            Err(ControlError::Invalid(m)) if m.contains("does not exist") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Whether a physical standby can follow production with the installed PostgreSQL.
fn check_physical(probe: &Probe, local_major: u32, user: &str) -> Result<()> {
    if probe.major != local_major {
        return Err(ControlError::Invalid(format!(
            "production runs PostgreSQL {}, but the installed PostgreSQL is {local_major}; a physical standby needs the same major version: install PostgreSQL {} here (and set STEMMA_PG_BIN), or use --mode snapshot",
            probe.major, probe.major
        )));
    }
    if !probe.can_replicate {
        return Err(ControlError::Invalid(format!(
            "user {user:?} has no REPLICATION privilege, which physical mode needs: on production run `ALTER ROLE \"{user}\" REPLICATION`, or use --mode snapshot"
        )));
    }
    if probe.wal_level == "minimal" {
        return Err(ControlError::Invalid(
            "production runs with wal_level = minimal, which cannot feed a standby: set wal_level = replica there and restart it, or use --mode snapshot".into(),
        ));
    }
    Ok(())
}

/// A replication slot name production will accept: `stemma_<source>_<random>`.
fn slot_name(source: &str) -> String {
    let clean: String = source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("stemma_{clean}_{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// `postgresql.auto.conf` without the settings that make a server follow another.
fn without_follow_settings(conf: &str) -> String {
    conf.lines()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or("").trim();
            !FOLLOW_SETTINGS.iter().any(|s| key.starts_with(s))
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// A value in `postgresql.conf`, quoted.
fn conf_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "''"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ControlError::Internal(anyhow!("a blocking task failed: {e}")))?
}

fn timeline(id: &str) -> Result<TimelineId> {
    TimelineId::parse(id).map_err(|e| ControlError::Internal(anyhow!(e)))
}

/// Whether a timeline's data directory is a standby's (it has `standby.signal`).
pub(crate) fn is_standby(storage: &dyn StorageDriver, tl: &TimelineId) -> bool {
    storage.data_dir(tl).join("standby.signal").exists()
}

/// How to log in to a root while it follows a physical source: production's user (never its
/// password in anything printed).
pub(crate) struct StandbyLogin {
    pub source: String,
    pub connection_string: String,
    pub note: String,
    pub password: String,
}

/// Percent-encodes a URI component (user or database name).
fn uri_component(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ----- operations ---------------------------------------------------------------------------

impl Engine {
    /// While `b` follows a physical source (its timeline is a standby's), how to log in: it
    /// has production's roles only, and Stemma cannot add its own there.
    pub(crate) fn standby_login(&self, b: &BranchRow, database: &str) -> Option<StandbyLogin> {
        let source = self.meta.source_of_branch(b.id).ok().flatten()?;
        if source.mode != "physical" {
            return None;
        }
        let tl = TimelineId::parse(&b.timeline_id).ok()?;
        if !is_standby(self.storage.as_ref(), &tl) {
            return None;
        }
        let url = SourceUrl::parse(&source.url).ok()?;
        Some(StandbyLogin {
            connection_string: format!(
                "postgresql://{}@127.0.0.1:{}/{}",
                uri_component(&url.user),
                b.port,
                uri_component(database)
            ),
            note: format!(
                "branch \"{}\" is a read-only hot standby of source \"{}\": log in with production's credentials (user \"{}\" of the source URL, or any role of production); `stemma psql {}` uses the source's stored password",
                b.name, source.name, url.user, b.name
            ),
            source: source.name,
            password: url.password,
        })
    }

    fn source_row(&self, name: &str) -> Result<SourceRow> {
        self.meta.source(name)?.ok_or_else(|| {
            ControlError::NotFound(format!(
                "source {name:?} does not exist (see `stemma source status`)"
            ))
        })
    }

    /// A root that follows production is changed only through its source.
    pub(crate) fn refuse_if_following(&self, b: &BranchRow) -> Result<()> {
        match self.meta.source_of_branch(b.id)? {
            Some(s) if s.mode == "physical" => Err(ControlError::Conflict(format!(
                "branch {:?} follows production (source {:?}); remove the source first (`stemma source remove {}`), or branch from it: `stemma branch create NAME --parent {} --at TIME`",
                b.name, s.name, s.name, b.name
            ))),
            _ => Ok(()),
        }
    }

    /// Whether a root holds anything beyond what `initdb` made (or cannot be asked).
    async fn holds_data(&self, b: &BranchRow) -> bool {
        if self.start_compute_of(b).await.is_err() {
            return true;
        }
        let Ok(spec) = self.compute_spec(b) else {
            return true;
        };
        let conn = format!(
            "host='{}' port='{}' user='{}' dbname='postgres'",
            spec.socket_dir.display(),
            spec.port,
            b.db_user
        );
        let sql = "SELECT (SELECT count(*) FROM pg_database WHERE datname NOT IN ('postgres','template0','template1')) + \
                   (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                    WHERE c.relkind IN ('r','p','m','v','S','f') AND n.nspname NOT IN ('pg_catalog','information_schema') \
                    AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%')";
        match self.psql_raw(&conn, &b.db_password, sql).await {
            Ok(Ok(n)) => n != "0",
            _ => true,
        }
    }

    /// The metadata store holds sources' passwords: only the daemon's user may read it.
    fn protect_metadata(&self) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.cfg.metadata_path();
        let mut paths = vec![path.clone()];
        for suffix in ["-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            paths.push(PathBuf::from(p));
        }
        for p in paths {
            if p.exists() {
                if let Err(e) = std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))
                {
                    tracing::warn!(path = %p.display(), error = %e, "cannot make the metadata store private");
                }
            }
        }
    }

    pub async fn add_source(self: &Arc<Self>, req: &api::AddSourceRequest) -> Result<api::Source> {
        validate_branch_name(&req.name)
            .map_err(|e| ControlError::Invalid(format!("invalid source name: {e}")))?;
        let url = SourceUrl::parse(&req.url)?;
        let branch = req
            .branch
            .clone()
            .unwrap_or_else(|| self.cfg.root_branch.clone());
        if self.meta.source(&req.name)?.is_some() {
            return Err(ControlError::Conflict(format!(
                "source {:?} already exists; remove it first (`stemma source remove {}`) or choose another name",
                req.name, req.name
            )));
        }
        let existing = self.meta.branch(&branch)?;
        if let Some(b) = &existing {
            if let Some(s) = self.meta.source_of_branch(b.id)? {
                return Err(ControlError::Conflict(format!(
                    "branch {branch:?} already has the source {:?}; a branch has one source: remove it first (`stemma source remove {}`)",
                    s.name, s.name
                )));
            }
            if b.parent_id.is_some() {
                return Err(ControlError::Invalid(format!(
                    "branch {branch:?} is not a root; a source feeds a root branch (--branch names one, or a new one)"
                )));
            }
            if !req.replace && self.holds_data(b).await {
                return Err(ControlError::Conflict(format!(
                    "branch {branch:?} already holds data; add --replace to replace it with production (its children keep their state)"
                )));
            }
        } else {
            validate_branch_name(&branch)?;
        }

        // Production first: nothing is created until it answered.
        let probe = self.probe(&url).await?;
        let local_major = self.supervisor.install().major_version;
        let slot = match req.mode {
            api::SourceMode::Physical => {
                check_physical(&probe, local_major, &url.user)?;
                Some(slot_name(&req.name))
            }
            api::SourceMode::Snapshot => None,
        };

        let created_root = if existing.is_none() {
            self.create_root(&branch).await?;
            true
        } else {
            false
        };
        let root = self.meta.branch(&branch)?.ok_or_else(|| {
            ControlError::Internal(anyhow!("the root branch vanished while a source was added"))
        })?;
        let row = SourceRow {
            name: req.name.clone(),
            branch_id: root.id,
            mode: req.mode.as_str().into(),
            url: req.url.clone(),
            slot: slot.clone(),
            jobs: req.jobs.unwrap_or(2).clamp(1, 16),
            max_retained_wal_bytes: req
                .max_retained_wal_bytes
                .unwrap_or(DEFAULT_MAX_RETAINED_WAL),
            state: "adding".into(),
            created_at: Utc::now(),
            last_refresh_at: None,
            last_error: None,
            last_error_at: None,
        };
        if let Err(e) = self.meta.insert_source(&row) {
            if created_root {
                let _ = self.delete_branch(&branch).await;
            }
            return Err(ControlError::Conflict(format!(
                "source {:?} or branch {branch:?} got a source meanwhile: {e}",
                req.name
            )));
        }
        self.protect_metadata();
        let result = match req.mode {
            api::SourceMode::Physical => self.seed_physical(&row, &url, &probe).await,
            api::SourceMode::Snapshot => self.refresh_snapshot(&row).await,
        };
        if let Err(e) = result {
            tracing::warn!(source = %req.name, error = %e, "adding the source failed; undoing it");
            if let Some(slot) = &slot {
                if let Err(e2) = self.drop_slot(&url, slot).await {
                    tracing::error!(source = %req.name, slot, error = %e2, "could not drop the slot on production after a failed add");
                }
            }
            let _ = self.meta.delete_source(&req.name);
            if created_root {
                if let Err(e2) = self.delete_branch(&branch).await {
                    tracing::warn!(branch, error = %e2, "removing the root made for the failed source");
                }
            }
            return Err(e);
        }
        self.meta.source_refreshed(&req.name, &Utc::now())?;
        tracing::info!(source = %req.name, branch, mode = req.mode.as_str(), url = %redact(&req.url), "source added");
        self.source_status(&req.name).await
    }

    /// Base backup of production into a new timeline, checked as a standby, then swapped under
    /// the root. On failure the new timeline is gone (the caller drops the slot).
    async fn seed_physical(&self, row: &SourceRow, url: &SourceUrl, probe: &Probe) -> Result<()> {
        let slot = row
            .slot
            .clone()
            .ok_or_else(|| ControlError::Internal(anyhow!("a physical source has no slot")))?;
        self.production_replication(
            url,
            &format!("CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL"),
        )
        .await?;
        let tl = new_timeline_id();
        self.meta.begin_timeline(tl.as_str(), None)?;
        let result = self.seed_timeline(row, url, probe, &slot, &tl).await;
        if let Err(e) = result {
            if let Err(e2) = self.destroy_timeline(tl.as_str()).await {
                tracing::error!(error = %e2, "removing the failed base backup; the next start removes it");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn seed_timeline(
        &self,
        row: &SourceRow,
        url: &SourceUrl,
        probe: &Probe,
        slot: &str,
        tl: &TimelineId,
    ) -> Result<()> {
        let storage = self.storage.clone();
        let dir = {
            let tl = tl.clone();
            blocking(move || storage.create_empty(&tl).map_err(Into::into)).await?
        };
        tracing::info!(source = %row.name, slot, "base backup of production");
        let mut cmd = Command::new(self.pg_tool("pg_basebackup"));
        cmd.arg("-D")
            .arg(&dir)
            .args(["-d", &url.conninfo(false, &[])])
            .args(["-X", "stream", "-S", slot, "-c", "fast", "--no-password"])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("PGPASSWORD", &url.password)
            .env("PGCONNECT_TIMEOUT", "15")
            .env("PGAPPNAME", "stemma-basebackup")
            .env("HOME", "/tmp")
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .dies_with_parent();
        if let Some(u) = self.supervisor.user() {
            cmd.uid(u.uid).gid(u.gid);
        }
        let out = cmd.output().await.context("running pg_basebackup")?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(ControlError::Internal(anyhow!(
                "pg_basebackup failed ({}): {}",
                out.status,
                scrub(err.trim(), &url.password)
            )));
        }

        // The standby's configuration: ours, not production's (which may name files, addresses
        // and libraries this host does not have).
        let conninfo = url.conninfo(true, &[("application_name", slot)]);
        let conf = format!(
            "# Written by stemma: the root of source \"{}\" follows production as a hot standby.\n\
             # Production's own postgresql.conf is not used here.\n\
             primary_conninfo = {}\n\
             primary_slot_name = {}\n\
             hot_standby = on\n",
            row.name,
            conf_quote(&conninfo),
            conf_quote(slot),
        );
        let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap_or_default();
        let storage = self.storage.clone();
        let tl2 = tl.clone();
        blocking(move || {
            let w = |f: &str, c: &[u8]| storage.write_file(&tl2, Path::new(f), c);
            w("postgresql.conf", conf.as_bytes())?;
            w(
                "postgresql.auto.conf",
                without_follow_settings(&auto).as_bytes(),
            )?;
            w("pg_hba.conf", HBA_PASSWORD.as_bytes())?;
            w("pg_ident.conf", b"")?;
            w("standby.signal", b"")?;
            storage.remove_file(&tl2, Path::new("recovery.signal"))?;
            Ok(())
        })
        .await?;

        // The root's compute must satisfy a hot standby's minimums, and never suspend.
        let root = self
            .meta
            .branch_by_id(row.branch_id)?
            .ok_or_else(|| ControlError::NotFound("the source's branch is gone".into()))?;
        let mut settings = root.settings.clone();
        let defaults = self.compute_spec(&root)?.settings;
        for (k, v) in &probe.minimums {
            let ours = defaults
                .get(k)
                .and_then(|d| d.parse::<u64>().ok())
                .unwrap_or(0);
            if *v > ours {
                settings.insert(k.clone(), v.to_string());
            }
        }

        // Started once on a private socket: it must reach a consistent state before it
        // replaces anything.
        let mut probe_row = root.clone();
        probe_row.timeline_id = tl.to_string();
        probe_row.settings = settings.clone();
        let mut spec = self.compute_spec(&probe_row)?;
        spec.key = format!("source-{}", tl);
        spec.label = format!("{} (standby check)", root.name);
        spec.socket_dir = self
            .cfg
            .data_dir
            .join("run")
            .join(format!("source-{:08x}", rand::random::<u32>()));
        spec.log_path = self.cfg.logs_dir().join(format!("source-{}.log", row.name));
        self.supervisor
            .start(spec.clone())
            .await
            .map_err(|e| ControlError::Internal(anyhow!("the standby did not start: {e}")))?;
        self.supervisor.stop(&spec.key, &spec.data_dir).await?;

        let _op = self.op_lock.lock().await;
        let root = self
            .meta
            .branch_by_id(row.branch_id)?
            .ok_or_else(|| ControlError::NotFound("the source's branch is gone".into()))?;
        self.meta.update_branch(
            root.id,
            &BranchUpdate {
                settings: Some(settings),
                suspend_timeout_secs: Some(Some(0)),
                ..BranchUpdate::default()
            },
        )?;
        self.meta.set_branch_database(root.id, &probe.database)?;
        self.meta.set_compute_running(root.id, true)?;
        let root = self
            .meta
            .branch_by_id(root.id)?
            .ok_or_else(|| ControlError::NotFound("the source's branch is gone".into()))?;
        let why = format!(
            "branch \"{}\" now follows production (source \"{}\"); reconnect with production's credentials",
            root.name, row.name
        );
        let root = self.replace_timeline(&root, tl, None, &why).await?;
        self.start_compute_of(&root).await?;
        Ok(())
    }

    /// Refreshes (or first fills) a snapshot source's root: a new timeline from `pg_dump`,
    /// swapped under the root in one step. On failure the root keeps serving what it had.
    async fn refresh_snapshot(self: &Arc<Self>, row: &SourceRow) -> Result<()> {
        let root = self
            .meta
            .branch_by_id(row.branch_id)?
            .ok_or_else(|| ControlError::NotFound("the source's branch is gone".into()))?;
        let secret = SourceUrl::parse(&row.url)
            .map(|u| u.password)
            .unwrap_or_default();
        let op = format!("source-{}-{}", row.name, new_timeline_id());
        let mut import = Import::new(self.clone(), &op, &root.name, row.url.clone(), row.jobs);
        let built = import.build(&root.db_password).await;
        import.cleanup_scratch().await;
        let (tl, database) = match built {
            Ok(x) => x,
            Err(e) => {
                import.roll_back().await;
                return Err(match e {
                    ControlError::Invalid(m) => ControlError::Invalid(scrub(&m, &secret)),
                    other => ControlError::Internal(anyhow!(
                        "the snapshot failed: {}",
                        scrub(&format!("{other:#}"), &secret)
                    )),
                });
            }
        };
        let _op = self.op_lock.lock().await;
        let root = match self.meta.branch_by_id(row.branch_id)? {
            Some(r) => r,
            None => {
                import.roll_back().await;
                return Err(ControlError::NotFound("the source's branch is gone".into()));
            }
        };
        let why = format!(
            "branch \"{}\" switched to a new snapshot of source \"{}\"; reconnect with the same connection string",
            root.name, row.name
        );
        // replace_timeline removes the new timeline itself when it fails.
        import.disown();
        let root = self.replace_timeline(&root, &tl, None, &why).await?;
        if root.database != database {
            self.meta.set_branch_database(root.id, &database)?;
        }
        Ok(())
    }

    pub async fn refresh_source(self: &Arc<Self>, name: &str) -> Result<api::Source> {
        let row = self.source_row(name)?;
        if row.mode != "snapshot" {
            return Err(ControlError::Invalid(format!(
                "source {name:?} is physical: its root follows production continuously, so there is nothing to refresh (see `stemma source status`)"
            )));
        }
        if row.state != "ready" {
            return Err(ControlError::Conflict(format!(
                "source {name:?} is {} already; wait for it to finish",
                row.state
            )));
        }
        self.meta.set_source_state(name, "refreshing")?;
        match self.refresh_snapshot(&row).await {
            Ok(()) => {
                self.meta.source_refreshed(name, &Utc::now())?;
                tracing::info!(source = name, "source refreshed");
                self.source_status(name).await
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::warn!(source = name, error = %msg, "refresh failed; the root keeps its state");
                self.meta.source_failed(name, &msg, "ready")?;
                Err(ControlError::Invalid(format!(
                    "refreshing source {name:?} failed; branch kept serving its previous state: {msg}"
                )))
            }
        }
    }

    pub async fn remove_source(&self, name: &str) -> Result<()> {
        let row = self.source_row(name)?;
        if row.mode == "physical" {
            self.meta.set_source_state(name, "removing")?;
            if let Some(root) = self.meta.branch_by_id(row.branch_id)? {
                let _op = self.op_lock.lock().await;
                let tl = timeline(&root.timeline_id)?;
                if is_standby(self.storage.as_ref(), &tl) {
                    let gate = self.gate(root.id);
                    let _exclusive = gate.write().await;
                    if let Some(p) = self.proxy.get() {
                        p.terminate(
                            &Self::compute_key(&root),
                            &format!("branch \"{}\" stopped following production", root.name),
                        );
                    }
                    let spec = self.compute_spec(&root)?;
                    self.supervisor.stop(&spec.key, &spec.data_dir).await?;
                    self.cut_loose_from_production(&root, &tl).await?;
                    let mut settings = root.settings.clone();
                    for k in STANDBY_MINIMUMS {
                        settings.remove(*k);
                    }
                    self.meta.update_branch(
                        root.id,
                        &BranchUpdate {
                            settings: Some(settings),
                            suspend_timeout_secs: Some(None),
                            ..BranchUpdate::default()
                        },
                    )?;
                    if let Some(root) = self.meta.branch_by_id(root.id)? {
                        self.start_compute_of(&root).await?;
                    }
                }
            }
            if let Some(slot) = &row.slot {
                let url = SourceUrl::parse(&row.url)?;
                if let Err(e) = self.drop_slot(&url, slot).await {
                    let msg = format!(
                        "branch stopped following production, but the replication slot {slot} could not be dropped there: {e}; run `stemma source remove {name}` again once production answers, or on production run SELECT pg_drop_replication_slot('{slot}')"
                    );
                    self.meta.source_failed(name, &msg, "removing")?;
                    return Err(ControlError::Conflict(msg));
                }
            }
        }
        self.meta.delete_source(name)?;
        tracing::info!(source = name, "source removed");
        Ok(())
    }

    /// The configuration of a copy of a standby, on its own: no signal file, no primary, no
    /// slot, no restore command, password logins. Its next start is a crash recovery that
    /// ends with the copy a primary of its own.
    async fn write_cut_loose_files(&self, tl: &TimelineId) -> Result<()> {
        let dir = self.storage.data_dir(tl);
        let auto = std::fs::read_to_string(dir.join("postgresql.auto.conf")).unwrap_or_default();
        let (storage, tl) = (self.storage.clone(), tl.clone());
        blocking(move || {
            let w = |f: &str, c: &[u8]| storage.write_file(&tl, Path::new(f), c);
            w(
                "postgresql.conf",
                b"# Written by stemma: a copy of a standby, on its own; it follows nothing.\n",
            )?;
            w(
                "postgresql.auto.conf",
                without_follow_settings(&auto).as_bytes(),
            )?;
            w("pg_hba.conf", HBA_PASSWORD.as_bytes())?;
            storage.remove_file(&tl, Path::new("standby.signal"))?;
            storage.remove_file(&tl, Path::new("recovery.signal"))?;
            Ok(())
        })
        .await
    }

    /// Writes `dir/pg_hba.conf` with `content`, in a directory of its own that only the
    /// compute's user can enter (the scratch directory is the daemon's alone: imports stage
    /// raw dumps there).
    fn write_private_hba(
        &self,
        dir: &Path,
        content: &str,
        user: Option<&stemma_compute::ComputeUser>,
    ) -> Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let hba = dir.join("pg_hba.conf");
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
        if let Some(u) = user {
            std::os::unix::fs::chown(dir, Some(u.uid), Some(u.gid))
                .with_context(|| format!("handing {} to the compute user", dir.display()))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&hba)
            .with_context(|| format!("writing {}", hba.display()))?;
        f.write_all(content.as_bytes())
            .with_context(|| format!("writing {}", hba.display()))?;
        if let Some(u) = user {
            std::os::unix::fs::chown(&hba, Some(u.uid), Some(u.gid))
                .with_context(|| format!("handing {} to the compute user", hba.display()))?;
        }
        Ok(hba)
    }

    /// A branch (of a running parent, or a copy of a standby) starts with a crash recovery,
    /// which first fsyncs every file of the data directory: through FUSE with the pagestore
    /// a round trip per file, 0.4 s of a 0.56 s cold start. One `syncfs` does the same for
    /// a local filesystem; the pagestore's FUSE server does not implement it (PostgreSQL
    /// logs that and goes on), and needs not: every sync there makes all earlier writes
    /// durable (one log), so the recovery's own WAL and checkpoint syncs cover the copy.
    /// PostgreSQL 14 and later; every compute gets it (see `compute_spec`).
    pub(crate) fn fast_recovery_sync(&self, settings: &mut BTreeMap<String, String>) {
        if self.supervisor.install().major_version >= 14 {
            settings.insert("recovery_init_sync_method".into(), "syncfs".into());
        }
    }

    /// Production's user, from the source of `branch` or of its parent (a role that exists
    /// on any copy of the standby).
    pub(crate) fn production_login(&self, branch: &BranchRow) -> Result<String> {
        let source = match self.meta.source_of_branch(branch.id)? {
            Some(s) => Some(s),
            None => match branch.parent_id {
                Some(p) => self.meta.source_of_branch(p)?,
                None => None,
            },
        };
        Ok(source
            .and_then(|s| SourceUrl::parse(&s.url).ok())
            .map(|u| u.user)
            .unwrap_or_default())
    }

    /// Connection info for a compute's private socket, as `user`.
    fn private_conn(socket_dir: &Path, port: u16, user: &str) -> String {
        format!(
            "host='{}' port='{}' user='{}' dbname='template1'",
            socket_dir.display(),
            port,
            user.replace(['\'', '\\'], "")
        )
    }

    /// The name of production's bootstrap superuser (the role with OID 10), asked through the
    /// transient trust rule as production's user, `postgres` or ours; `None` when no login
    /// works (yet).
    async fn bootstrap_superuser(
        &self,
        socket_dir: &Path,
        port: u16,
        login: &str,
    ) -> Option<String> {
        for user in [login, "postgres", DB_SUPERUSER] {
            if user.is_empty() {
                continue;
            }
            if let Ok(Ok(name)) = self
                .psql_raw(
                    &Self::private_conn(socket_dir, port, user),
                    "",
                    "SELECT rolname FROM pg_roles WHERE oid = 10",
                )
                .await
            {
                return Some(name);
            }
        }
        None
    }

    /// Makes `branch.db_user` a superuser with `branch.db_password` on a compute that trusts
    /// local connections for now; logs in as production's bootstrap superuser. Returns that
    /// superuser's name.
    async fn create_branch_superuser(
        &self,
        socket_dir: &Path,
        port: u16,
        branch: &BranchRow,
        login: &str,
    ) -> Result<String> {
        let su = self
            .bootstrap_superuser(socket_dir, port, login)
            .await
            .ok_or_else(|| {
                ControlError::Internal(anyhow!("no role to log in with on the copy of the standby"))
            })?;
        // Generated passwords are alphanumeric; quote anyway.
        let pw = branch.db_password.replace('\'', "''");
        let sql = format!(
            "DO $$ BEGIN \
               IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{u}') THEN \
                 ALTER ROLE \"{u}\" WITH SUPERUSER LOGIN PASSWORD '{pw}'; \
               ELSE \
                 CREATE ROLE \"{u}\" WITH SUPERUSER LOGIN PASSWORD '{pw}'; \
               END IF; END $$",
            u = branch.db_user.replace(['\'', '"'], "")
        );
        self.psql_raw(&Self::private_conn(socket_dir, port, &su), "", &sql)
            .await?
            .map_err(|e| ControlError::Internal(anyhow!("creating the branch's superuser: {e}")))?;
        Ok(su)
    }

    /// Makes the timeline `tl`, a copy of a standby (with `standby.signal`), a server of its
    /// own: it follows nothing, and `stemma` is a superuser with `branch`'s password (the
    /// roles are production's otherwise). The first start, on a private socket, ends the
    /// recovery and promotes it. Does nothing to a timeline that is no standby's copy.
    ///
    /// Two starts (this one, then the branch's own): for a reset, a past moment and a source's
    /// removal. A new branch takes the faster road of [`Engine::prepare_promotion`] and
    /// [`Engine::start_promoting`].
    pub(crate) async fn cut_loose_from_production(
        &self,
        branch: &BranchRow,
        tl: &TimelineId,
    ) -> Result<()> {
        if !is_standby(self.storage.as_ref(), tl) {
            return Ok(());
        }
        let t0 = std::time::Instant::now();
        self.write_cut_loose_files(tl).await?;
        let mut row = branch.clone();
        row.timeline_id = tl.to_string();
        let mut spec = self.compute_spec(&row)?;
        spec.key = format!("promote-{tl}");
        spec.label = format!("{} (promoting)", branch.name);
        spec.socket_dir = self
            .cfg
            .data_dir
            .join("run")
            .join(format!("promote-{:08x}", rand::random::<u32>()));
        spec.log_path = self.cfg.logs_dir().join(format!("promote-{tl}.log"));
        let hba_dir = self
            .cfg
            .data_dir
            .join("run")
            .join(format!("hba-{:08x}", rand::random::<u32>()));
        let user = spec.user.clone().or_else(|| self.supervisor.user().clone());
        let hba = match self.write_private_hba(&hba_dir, HBA_TRUST, user.as_ref()) {
            Ok(h) => h,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&hba_dir);
                return Err(e);
            }
        };
        spec.settings
            .insert("hba_file".into(), hba.display().to_string());
        self.fast_recovery_sync(&mut spec.settings);
        let t_files = t0.elapsed();
        if let Err(e) = self.supervisor.start(spec.clone()).await {
            let _ = std::fs::remove_dir_all(&hba_dir);
            return Err(e.into());
        }
        let t_started = t0.elapsed();
        let result = async {
            let login = self.production_login(branch)?;
            self.create_branch_superuser(&spec.socket_dir, spec.port, branch, &login)
                .await
        }
        .await;
        let t_role = t0.elapsed();
        let stopped = self.supervisor.stop(&spec.key, &spec.data_dir).await;
        let _ = std::fs::remove_dir_all(&hba_dir);
        tracing::info!(
            branch = %branch.name,
            timeline = %tl,
            files_ms = t_files.as_millis() as u64,
            start_ms = (t_started - t_files).as_millis() as u64,
            role_ms = (t_role - t_started).as_millis() as u64,
            stop_ms = (t0.elapsed() - t_role).as_millis() as u64,
            "cut a copy of the standby loose from production (two starts)"
        );
        result?;
        stopped?;
        Ok(())
    }

    /// The directory of a pending promotion of timeline `tl`: it holds the transient `trust`
    /// pg_hba of the first start, and while it exists the timeline's branch is not served.
    /// One left at a daemon start means the promotion was cut off.
    pub(crate) fn promotion_dir(&self, tl: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("run")
            .join(format!("promoting-{tl}"))
    }

    /// Whether timeline `tl` waits for its promoting first start (nothing else may start it).
    pub(crate) fn promotion_pending(&self, tl: &str) -> bool {
        self.promotion_dir(tl).exists()
    }

    /// Prepares `tl`, a fresh copy of `parent` (a standby), for a first start that cuts it
    /// loose ([`Engine::start_promoting`]): it follows nothing, and its promotion directory
    /// marks it pending. Returns false (and does nothing) when `tl` is no standby's copy.
    pub(crate) async fn prepare_promotion(
        &self,
        parent: &BranchRow,
        tl: &TimelineId,
    ) -> Result<bool> {
        if !is_standby(self.storage.as_ref(), tl) {
            return Ok(false);
        }
        let dir = self.promotion_dir(tl.as_str());
        let user = self
            .compute_user_of(parent)?
            .or_else(|| self.supervisor.user().clone());
        // The marker first: from here on, nothing but the promotion starts this timeline.
        if let Err(e) = self.write_private_hba(&dir, HBA_TRUST, user.as_ref()) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        if let Err(e) = self.write_cut_loose_files(tl).await {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(true)
    }

    /// Forgets a pending promotion (done, or undone with its timeline).
    pub(crate) fn end_promotion(&self, tl: &str) {
        let dir = self.promotion_dir(tl);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a promotion's directory");
            }
        }
    }

    /// The first start of branch `b`, whose timeline [`Engine::prepare_promotion`] prepared:
    /// its own compute (its socket, its settings) starts once; the crash recovery that ends
    /// with it a primary replays the WAL its copy holds (no `standby.signal`: it follows
    /// nothing). Our superuser is then created through the transient `trust` rule of an
    /// `hba_file` outside the data directory, which is replaced by password rules and
    /// reloaded before anything can connect: the branch's gate is held, wakes are refused
    /// while the promotion is pending, and its port is served only afterwards. One start
    /// instead of two (a private one, stopped, then the branch's). On failure the caller
    /// stops the compute and undoes the branch.
    pub(crate) async fn start_promoting(&self, b: &BranchRow, login: &str) -> Result<()> {
        let t0 = std::time::Instant::now();
        let gate = self.gate(b.id);
        let _exclusive = gate.write().await;
        let final_spec = self.compute_spec(b)?;
        let mut spec = final_spec.clone();
        let hba = self.promotion_dir(&b.timeline_id).join("pg_hba.conf");
        spec.settings
            .insert("hba_file".into(), hba.display().to_string());
        self.make_room(&spec.key)
            .await
            .map_err(|r| ControlError::Conflict(r.message))?;
        self.fast_recovery_sync(&mut spec.settings);
        // Ready once the recovery is over and its end-of-recovery checkpoint is written.
        self.supervisor.start(spec.clone()).await?;
        let t_started = t0.elapsed();
        let pid = self
            .supervisor
            .info(&spec.key)
            .map(|i| i.pid)
            .ok_or_else(|| ControlError::Internal(anyhow!("the new compute vanished")))?;
        let t_promoted = t0.elapsed();
        let su = self
            .create_branch_superuser(&spec.socket_dir, spec.port, b, login)
            .await?;
        let t_role = t0.elapsed();
        // Password rules replace the trust rule, and the compute reloads them.
        let user = spec.user.clone().or_else(|| self.supervisor.user().clone());
        self.write_private_hba(
            &self.promotion_dir(&b.timeline_id),
            HBA_PASSWORD,
            user.as_ref(),
        )?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGHUP,
        )
        .context("asking the compute to reload its pg_hba")?;
        let conn = Self::private_conn(&spec.socket_dir, spec.port, &su);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.psql_raw(&conn, "", "SELECT 1").await? {
                // A password is asked for: the trust rule is gone.
                Err(e) if e.contains("password") => break,
                Err(e) => {
                    return Err(ControlError::Internal(anyhow!(
                        "the promoted compute does not answer after reloading its pg_hba: {e}"
                    )))
                }
                Ok(_) if std::time::Instant::now() >= deadline => {
                    return Err(ControlError::Internal(anyhow!(
                        "the promoted compute did not reload its pg_hba within 30s"
                    )));
                }
                Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        // From now on the compute is the branch's own, as any start would make it (its
        // data directory's pg_hba.conf holds the same password rules; the sync method only
        // matters to a recovery).
        self.supervisor.set_spec(&spec.key, final_spec);
        if let Some(p) = self.proxy.get() {
            p.touch(&spec.key);
        }
        self.end_promotion(&b.timeline_id);
        tracing::info!(
            branch = %b.name,
            timeline = %b.timeline_id,
            start_ms = t_started.as_millis() as u64,
            role_ms = (t_role - t_promoted).as_millis() as u64,
            reload_ms = (t0.elapsed() - t_role).as_millis() as u64,
            "cut a copy of the standby loose in its first start"
        );
        Ok(())
    }

    /// At a daemon start: a branch whose promoting first start was cut off (its promotion
    /// directory is left) may lack our superuser, and its compute may still trust local
    /// connections: it is stopped and deleted (its creation never returned). Call with the
    /// operation lock held, before computes are adopted.
    pub(crate) async fn undo_interrupted_promotions(&self) -> Result<()> {
        let run = self.cfg.data_dir.join("run");
        let Ok(entries) = std::fs::read_dir(&run) else {
            return Ok(());
        };
        let pending: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("promoting-")
                    .filter(|tl| TimelineId::parse(tl).is_ok())
                    .map(String::from)
            })
            .collect();
        for tl in pending {
            if let Some(b) = self
                .meta
                .branches()?
                .into_iter()
                .find(|b| b.timeline_id == tl)
            {
                tracing::warn!(branch = %b.name, timeline = %tl, "removing a branch whose creation was cut off while it was promoted");
                let spec = self.compute_spec(&b)?;
                self.supervisor.stop(&spec.key, &spec.data_dir).await?;
                self.meta.delete_branch(b.id)?;
            }
            self.end_promotion(&tl);
        }
        Ok(())
    }

    /// Clones a running standby with a file-copying driver: the standby stops for the copy
    /// (production does not notice; the standby resumes streaming through its slot), because
    /// an online backup needs a superuser that only production could create.
    pub(crate) async fn clone_paused_standby(
        &self,
        parent: &BranchRow,
        child: &TimelineId,
        filter: stemma_storage::CloneFilter,
    ) -> Result<()> {
        let gate = self.gate(parent.id);
        let _exclusive = gate.write().await;
        let spec = self.compute_spec(parent)?;
        self.supervisor.stop(&spec.key, &spec.data_dir).await?;
        let (storage, parent_tl, child) = (
            self.storage.clone(),
            timeline(&parent.timeline_id)?,
            child.clone(),
        );
        let copied = blocking(move || {
            storage
                .clone_timeline(&parent_tl, &child, &filter)
                .map_err(Into::into)
        })
        .await;
        // The standby resumes while the copy is being prepared; starts of one compute are
        // serialised by the supervisor, so a connection that wakes it meanwhile waits for it.
        let supervisor = self.supervisor.clone();
        let label = parent.name.clone();
        tokio::spawn(async move {
            if let Err(e) = supervisor.start(spec).await {
                tracing::warn!(branch = %label, error = %e, "the standby did not restart after a copy; the daemon retries");
            }
        });
        copied
    }

    // ----- status ---------------------------------------------------------------------------

    pub async fn list_sources(&self) -> Result<Vec<api::Source>> {
        let mut out = Vec::new();
        for row in self.meta.sources()? {
            out.push(self.view_source(&row).await?);
        }
        Ok(out)
    }

    pub async fn source_status(&self, name: &str) -> Result<api::Source> {
        let row = self.source_row(name)?;
        self.view_source(&row).await
    }

    async fn view_source(&self, row: &SourceRow) -> Result<api::Source> {
        let branch = self.meta.branch_by_id(row.branch_id)?;
        let mut warnings = Vec::new();
        let mut view = api::Source {
            name: row.name.clone(),
            branch: branch.as_ref().map(|b| b.name.clone()).unwrap_or_default(),
            mode: if row.mode == "physical" {
                api::SourceMode::Physical
            } else {
                api::SourceMode::Snapshot
            },
            state: row.state.clone(),
            url: redact(&row.url),
            slot: row.slot.clone(),
            replication: None,
            lag_bytes: None,
            lag_seconds: None,
            retained_wal_bytes: None,
            max_retained_wal_bytes: row.max_retained_wal_bytes,
            jobs: row.jobs,
            created_at: row.created_at,
            last_refresh_at: row.last_refresh_at,
            last_error: row.last_error.clone(),
            last_error_at: row.last_error_at,
            warnings: Vec::new(),
            last_scheduled_refresh: self
                .meta
                .schedule_run(&format!("source:{}", row.name))
                .ok()
                .flatten()
                .map(|r| api::ScheduledReset {
                    at: r.at,
                    outcome: r.outcome,
                    message: r.message,
                }),
        };
        if branch.is_none() {
            warnings.push("the source's branch no longer exists; remove the source".into());
        }
        if let (Some(slot), "physical") = (&row.slot, row.mode.as_str()) {
            match SourceUrl::parse(&row.url) {
                Ok(url) => {
                    // The slot name is ours: letters, digits and underscores only.
                    let sql = format!(
                        "SELECT coalesce((SELECT active::text FROM pg_replication_slots WHERE slot_name = '{slot}'), 'missing') || '|' || \
                         coalesce((SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint::text FROM pg_replication_slots WHERE slot_name = '{slot}'), '') || '|' || \
                         coalesce((SELECT state FROM pg_stat_replication WHERE application_name = '{slot}' LIMIT 1), '') || '|' || \
                         coalesce((SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint::text FROM pg_stat_replication WHERE application_name = '{slot}' LIMIT 1), '') || '|' || \
                         coalesce((SELECT extract(epoch FROM replay_lag)::text FROM pg_stat_replication WHERE application_name = '{slot}' LIMIT 1), '')"
                    );
                    match self.production_sql(&url, &sql).await {
                        Ok(answer) => {
                            let p: Vec<&str> = answer.split('|').collect();
                            if p.len() == 5 {
                                if p[0] == "missing" {
                                    warnings.push(format!(
                                        "the replication slot {slot} is missing on production: the standby cannot resume; add the source again with --replace"
                                    ));
                                }
                                // pg_stat_replication shows details only to roles with
                                // pg_read_all_stats; the slot is visible to everyone.
                                view.retained_wal_bytes = p[1].parse().ok();
                                view.replication = Some(match (p[2], p[0]) {
                                    ("", "true") => "streaming".to_string(),
                                    ("", _) => "disconnected".to_string(),
                                    (state, _) => state.to_string(),
                                });
                                view.lag_bytes = p[3].parse().ok().or(view.retained_wal_bytes);
                                view.lag_seconds = p[4].parse().ok();
                            }
                        }
                        Err(e) => {
                            view.replication = Some("unknown".into());
                            warnings.push(format!("cannot ask production: {e}"));
                        }
                    }
                }
                Err(e) => warnings.push(e.to_string()),
            }
            if let Some(r) = view.retained_wal_bytes {
                if r > row.max_retained_wal_bytes {
                    warnings.push(format!(
                        "the slot {slot} holds back {r} bytes of WAL on production, more than the limit of {} bytes: is the standby streaming? (`stemma source remove {}` drops the slot)",
                        row.max_retained_wal_bytes, row.name
                    ));
                }
            }
            if view.replication.as_deref() == Some("disconnected") && row.state == "ready" {
                warnings.push("the standby is not connected to production right now".into());
            }
        }
        view.warnings = warnings;
        Ok(view)
    }

    /// The WAL the slot of a physical source holds back on production, if it answers.
    async fn retained_wal(&self, url: &SourceUrl, slot: &str) -> Option<u64> {
        let sql = format!(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = '{slot}'"
        );
        self.production_sql(url, &sql).await.ok()?.parse().ok()
    }

    /// Drops the slot of every physical source that holds back more than its hard limit, and
    /// re-seeds its root from a new base backup through a new slot.
    async fn enforce_retention_limits(&self) {
        let rows = self.meta.sources().unwrap_or_default();
        for row in rows
            .into_iter()
            .filter(|r| r.mode == "physical" && r.state == "ready")
        {
            let (Some(slot), Ok(url)) = (row.slot.clone(), SourceUrl::parse(&row.url)) else {
                continue;
            };
            let Some(retained) = self.retained_wal(&url, &slot).await else {
                continue;
            };
            let hard = row.max_retained_wal_bytes.saturating_mul(HARD_LIMIT_FACTOR);
            if retained <= hard {
                continue;
            }
            let why = format!(
                "the slot {slot} held back {retained} bytes of WAL on production, more than the hard limit of {hard} bytes ({HARD_LIMIT_FACTOR} x max_retained_wal_bytes)"
            );
            tracing::warn!(source = %row.name, slot, retained, hard, "{why}: dropping the slot and re-seeding the root");
            let note = match self.reseed(&row, &url, &slot).await {
                Ok(()) => format!("{why}: Stemma dropped it and re-seeded the root from a new base backup"),
                Err(e) => format!("{why}: Stemma dropped it, but re-seeding the root failed: {e}; add the source again (`source remove`, then `source add`)"),
            };
            tracing::warn!(source = %row.name, "{note}");
            if let Err(e) = self.meta.source_failed(&row.name, &note, "ready") {
                tracing::error!(error = %e, "recording a re-seed");
            }
        }
    }

    async fn reseed(&self, row: &SourceRow, url: &SourceUrl, old_slot: &str) -> Result<()> {
        self.meta.set_source_state(&row.name, "reseeding")?;
        if let Some(root) = self.meta.branch_by_id(row.branch_id)? {
            // The standby must let go of the slot before it can be dropped.
            let gate = self.gate(root.id);
            let _exclusive = gate.write().await;
            let spec = self.compute_spec(&root)?;
            self.supervisor.stop(&spec.key, &spec.data_dir).await?;
        }
        self.drop_slot(url, old_slot).await?;
        let probe = self.probe(url).await?;
        let slot = slot_name(&row.name);
        self.meta.set_source_slot(&row.name, &slot)?;
        let mut row = row.clone();
        row.slot = Some(slot.clone());
        if let Err(e) = self.seed_physical(&row, url, &probe).await {
            if let Err(e2) = self.drop_slot(url, &slot).await {
                tracing::error!(source = %row.name, slot, error = %e2, "could not drop the new slot after a failed re-seed");
            }
            return Err(e);
        }
        self.meta.source_refreshed(&row.name, &Utc::now())?;
        Ok(())
    }

    // ----- schedules ------------------------------------------------------------------------

    /// Runs a schedule's steps in order and records each outcome (a branch's under its name,
    /// shown by `branch get`; a source's under `source:NAME`, shown by `source status`). The
    /// first failure skips the remaining steps.
    pub(crate) async fn run_schedule_steps(self: &Arc<Self>, schedule: &crate::project::Schedule) {
        use crate::metadata::ScheduleRun;
        use crate::project::Step;
        let steps = match schedule.steps() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(schedule = %schedule.key(), error = %e, "invalid schedule");
                return;
            }
        };
        let mut failed: Option<String> = None;
        for step in steps {
            let (key, what) = match &step {
                Step::Reset(b) => (b.clone(), format!("reset {b}")),
                Step::Refresh(s) => (format!("source:{s}"), format!("refresh {s}")),
            };
            let outcome = match (&failed, &step) {
                (Some(earlier), _) => Err(("skipped", format!("skipped: {earlier} failed"))),
                (None, Step::Reset(b)) => self
                    .reset_branch(b, None)
                    .await
                    .map(|_| None)
                    .map_err(|e| ("failed", e.to_string())),
                (None, Step::Refresh(src)) => match self.meta.source(src) {
                    Ok(Some(row)) if row.mode == "physical" => Ok(Some(
                        "physical: follows production continuously".to_string(),
                    )),
                    _ => self
                        .refresh_source(src)
                        .await
                        .map(|_| None)
                        .map_err(|e| ("failed", e.to_string())),
                },
            };
            let run = match outcome {
                Ok(message) => ScheduleRun {
                    at: Utc::now(),
                    outcome: "ok".into(),
                    message,
                },
                Err((outcome, message)) => {
                    if failed.is_none() {
                        failed = Some(what.clone());
                    }
                    ScheduleRun {
                        at: Utc::now(),
                        outcome: outcome.into(),
                        message: Some(message),
                    }
                }
            };
            tracing::info!(schedule = %schedule.key(), step = %what, outcome = %run.outcome, "scheduled step");
            if let Err(e) = self.meta.record_schedule_run(&key, &run) {
                tracing::error!(error = %e, "recording a scheduled step");
            }
        }
    }

    // ----- the daemon's loop ----------------------------------------------------------------

    /// Undoes adds that a crash cut off (their timelines went with reconciliation), then keeps
    /// every following root's compute running so that it streams.
    pub async fn follow_sources(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        if let Ok(rows) = self.meta.sources() {
            for row in rows.into_iter().filter(|r| r.state == "adding") {
                // Cut off after the swap: the root follows already; the add is complete.
                let swapped = row.mode == "physical"
                    && self
                        .meta
                        .branch_by_id(row.branch_id)
                        .ok()
                        .flatten()
                        .and_then(|b| TimelineId::parse(&b.timeline_id).ok())
                        .is_some_and(|tl| is_standby(self.storage.as_ref(), &tl));
                if swapped {
                    tracing::warn!(source = %row.name, "finishing a source whose add was interrupted after the swap");
                    let _ = self.meta.source_refreshed(&row.name, &Utc::now());
                    continue;
                }
                tracing::warn!(source = %row.name, "removing a source whose add was interrupted");
                if let (Some(slot), Ok(url)) = (&row.slot, SourceUrl::parse(&row.url)) {
                    if let Err(e) = self.drop_slot(&url, slot).await {
                        tracing::warn!(source = %row.name, slot, error = %e, "could not drop the slot of an interrupted add");
                    }
                }
                let _ = self.meta.delete_source(&row.name);
            }
        }
        // A refresh or a re-seed cut off by a stop left its new timeline `creating`, which
        // reconciliation removed: the root still has what it had.
        if let Ok(rows) = self.meta.sources() {
            for row in rows
                .iter()
                .filter(|r| r.state == "refreshing" || r.state == "reseeding")
            {
                let msg = format!(
                    "the {} was interrupted by a stop of Stemma; the branch kept what it had",
                    if row.state == "refreshing" {
                        "refresh"
                    } else {
                        "re-seed"
                    }
                );
                tracing::warn!(source = %row.name, "{msg}");
                let _ = self.meta.source_failed(&row.name, &msg, "ready");
            }
        }
        let mut last_errors: HashMap<String, String> = HashMap::new();
        let mut last_check = std::time::Instant::now();
        loop {
            if last_check.elapsed() >= RETENTION_CHECK_INTERVAL {
                last_check = std::time::Instant::now();
                self.enforce_retention_limits().await;
            }
            let rows = self.meta.sources().unwrap_or_default();
            for row in rows
                .iter()
                .filter(|r| r.mode == "physical" && r.state == "ready")
            {
                let Ok(Some(root)) = self.meta.branch_by_id(row.branch_id) else {
                    continue;
                };
                // A standby stopped on purpose (`compute stop`) stays stopped; its slot is
                // watched by the retention limit.
                if !root.compute_running
                    || self.supervisor.info(&Self::compute_key(&root)).is_some()
                {
                    last_errors.remove(&row.name);
                    continue;
                }
                let gate = self.gate(root.id);
                let Ok(_shared) = gate.try_read() else {
                    continue;
                };
                match self.start_compute_of(&root).await {
                    Ok(()) => {
                        tracing::info!(source = %row.name, branch = %root.name, "standby started: streaming resumes");
                        last_errors.remove(&row.name);
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if last_errors.get(&row.name) != Some(&msg) {
                            tracing::warn!(source = %row.name, error = %msg, "the standby does not start");
                            last_errors.insert(row.name.clone(), msg);
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_INTERVAL) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let u = SourceUrl::parse("postgresql://rep:s%40cret@db.internal:6543/app?sslmode=require")
            .unwrap();
        assert_eq!(u.user, "rep");
        assert_eq!(u.password, "s@cret");
        assert_eq!(u.host, "db.internal");
        assert_eq!(u.port, Some(6543));
        assert_eq!(u.database, "app");
        assert_eq!(u.params, vec![("sslmode".into(), "require".into())]);
        let c = u.conninfo(false, &[("replication", "true")]);
        assert!(!c.contains("s@cret"), "{c}");
        assert!(c.contains("replication='true'"), "{c}");
        assert!(u.conninfo(true, &[]).contains("password='s@cret'"));

        let d = SourceUrl::parse("postgres://app@localhost").unwrap();
        assert_eq!(d.database, "app");
        assert_eq!(d.port, None);
        assert!(SourceUrl::parse("host=x user=y").is_err());
        assert!(SourceUrl::parse("postgresql://localhost/app").is_err());
        assert!(SourceUrl::parse("postgresql://u@a,b/app").is_err());
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgresql://rep:secret@db:5432/app"),
            "postgresql://rep:****@db:5432/app"
        );
        assert_eq!(redact("postgresql://rep@db/app"), "postgresql://rep@db/app");
        assert_eq!(
            redact("postgresql://db/app?user=x&password=secret&sslmode=require"),
            "postgresql://db/app?user=x&password=****&sslmode=require"
        );
        assert_eq!(
            redact("host=db password=secret user=x"),
            "host=db password=**** user=x"
        );
    }

    #[test]
    fn checks_what_a_standby_needs() {
        let probe = |major, can_replicate, wal: &str| Probe {
            major,
            can_replicate,
            wal_level: wal.into(),
            database: "app".into(),
            minimums: BTreeMap::new(),
        };
        assert!(check_physical(&probe(15, true, "replica"), 15, "rep").is_ok());
        let e = check_physical(&probe(16, true, "replica"), 15, "rep").unwrap_err();
        assert!(e.to_string().contains("PostgreSQL 16"), "{e}");
        let e = check_physical(&probe(15, false, "replica"), 15, "rep").unwrap_err();
        assert!(e.to_string().contains("REPLICATION"), "{e}");
        assert!(check_physical(&probe(15, true, "minimal"), 15, "rep").is_err());
    }

    #[test]
    fn connection_errors_say_what_to_change() {
        let url = SourceUrl::parse("postgresql://rep:pw@db:5432/app").unwrap();
        let e = connection_error(
            "psql: error: connection to server at \"db\", port 5432 failed: Connection refused",
            &url,
            "connections",
        );
        assert!(
            e.to_string()
                .contains("cannot reach the source database at db:5432"),
            "{e}"
        );
        let e = connection_error(
            "FATAL:  password authentication failed for user \"rep\"",
            &url,
            "connections",
        );
        assert!(e.to_string().contains("check the password"), "{e}");
        let e = connection_error(
            "FATAL:  no pg_hba.conf entry for replication connection from host \"10.0.0.1\", user \"rep\"",
            &url,
            "replication connections",
        );
        assert!(e.to_string().contains("host replication rep"), "{e}");
        let e = connection_error(
            "FATAL:  must be superuser or replication role to start walsender",
            &url,
            "replication connections",
        );
        assert!(
            e.to_string().contains("ALTER ROLE \"rep\" REPLICATION"),
            "{e}"
        );
        // A tool that echoes the password never gets it into the message.
        let e = connection_error("FATAL: something about pw", &url, "connections");
        assert!(!e.to_string().contains(" pw"), "{e}");
    }

    #[test]
    fn slot_names_are_valid() {
        let s = slot_name("Prod-EU.1");
        assert!(s.starts_with("stemma_prod_eu_1_"), "{s}");
        assert!(s.len() <= 63);
        assert!(s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
    }

    #[test]
    fn strips_follow_settings() {
        let conf =
            "work_mem = '8MB'\nprimary_conninfo = 'host=x password=y'\nprimary_slot_name = 's'\n";
        assert_eq!(without_follow_settings(conf), "work_mem = '8MB'\n");
    }
}
