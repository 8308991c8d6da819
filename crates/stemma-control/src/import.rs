//! `stemma init --from URL`: a new root branch imported from an external PostgreSQL database
//! with `pg_dump` and `pg_restore` (directory format, parallel jobs), roles where permitted.
//!
//! The import runs as a background operation that the CLI polls for progress. Until it
//! succeeds, no branch exists: the new timeline is `creating` in the metadata, the name is
//! reserved in memory, and any failure (or a daemon crash, through reconciliation) removes both.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use chrono::Utc;
use stemma_api as api;
use stemma_compute::ComputeSpec;
use stemma_compute::DiesWithParent;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::engine::{new_timeline_id, random_password, Engine, DB_SUPERUSER};
use crate::metadata::NewBranch;
use crate::{ControlError, Result};

/// How many of a tool's last output lines an error message quotes.
const TAIL_LINES: usize = 12;

impl Engine {
    /// Starts `init`: an empty root at once, or an import as a background operation.
    pub async fn init(self: &Arc<Self>, req: &api::InitRequest) -> Result<api::Operation> {
        let id = format!("op-{}", new_timeline_id());
        let Some(url) = req.from.clone() else {
            let branch = self.create_root(&req.name).await?;
            return Ok(api::Operation {
                id,
                kind: "init".into(),
                state: api::OperationState::Succeeded,
                phase: "done".into(),
                done: 1,
                total: 1,
                error: None,
                branch: Some(branch),
                tables: Vec::new(),
            });
        };
        {
            let _op = self.op_lock.lock().await;
            self.reserve_name(&req.name)?;
        }
        let op = api::Operation {
            id: id.clone(),
            kind: "import".into(),
            state: api::OperationState::Running,
            phase: "connecting to the source".into(),
            done: 0,
            total: 0,
            error: None,
            branch: None,
            tables: Vec::new(),
        };
        self.insert_job(op.clone());
        let engine = self.clone();
        let name = req.name.clone();
        let jobs = req.jobs.unwrap_or(2).clamp(1, 16);
        tokio::spawn(async move {
            let mut import = Import::new(engine.clone(), &id, &name, url, jobs);
            let result = import.run().await;
            import.cleanup_scratch().await;
            match result {
                Ok(branch) => engine.update_job(&id, |op| {
                    op.state = api::OperationState::Succeeded;
                    op.phase = "done".into();
                    op.done = op.total;
                    op.branch = Some(branch);
                }),
                Err(e) => {
                    tracing::error!(branch = %name, error = %e, "import failed");
                    import.roll_back().await;
                    engine.update_job(&id, |op| {
                        op.state = api::OperationState::Failed;
                        op.error = Some(format!("import into {name:?} failed: {e}"));
                    });
                }
            }
            engine.release_name(&name);
        });
        Ok(op)
    }
}

/// A dump of an external database restored into a new timeline (`creating` until the caller
/// points a branch at it): `init --from` makes it a new root, a snapshot source swaps it under
/// an existing root (`source.rs`).
pub(crate) struct Import {
    engine: Arc<Engine>,
    op: String,
    name: String,
    /// The source as a connection string without its password, when it is a URI we can take
    /// apart (the password then travels in `PGPASSWORD`, not on command lines).
    url: String,
    password: Option<String>,
    jobs: u32,
    scratch: PathBuf,
    timeline: Option<String>,
    temp_compute: Option<ComputeSpec>,
}

/// What a tool run printed, for progress and errors.
struct ToolOutput {
    ok: bool,
    status: String,
    tail: VecDeque<String>,
    errors: Vec<String>,
}

impl Import {
    /// `op` names the operation whose progress it reports (none need exist); `name` labels
    /// the temporary compute and the logs.
    pub(crate) fn new(engine: Arc<Engine>, op: &str, name: &str, url: String, jobs: u32) -> Self {
        let scratch = engine.cfg.scratch_dir().join(op);
        let (url, password) = match crate::source::SourceUrl::parse(&url) {
            Ok(u) => (
                u.conninfo(false, &[]),
                Some(u.password).filter(|p| !p.is_empty()),
            ),
            Err(_) => (url, None),
        };
        Import {
            engine,
            op: op.to_string(),
            name: name.to_string(),
            url,
            password,
            jobs,
            scratch,
            timeline: None,
            temp_compute: None,
        }
    }

    fn phase(&self, phase: &str) {
        tracing::info!(op = %self.op, phase, "import");
        self.engine
            .update_job(&self.op, |op| op.phase = phase.to_string());
    }

    fn bin(&self, name: &str) -> PathBuf {
        self.engine.supervisor.install().bin(name)
    }

    /// Runs a PostgreSQL client tool, counting stderr lines that `progress` recognises.
    async fn tool(
        &self,
        program: &Path,
        args: &[String],
        progress: impl Fn(&str) -> bool,
    ) -> Result<ToolOutput> {
        let mut child = Command::new(program)
            .args(args)
            .env("PGCONNECT_TIMEOUT", "15")
            .envs(self.password.iter().map(|p| ("PGPASSWORD", p)))
            .env("PGAPPNAME", "stemma-import")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .dies_with_parent()
            .spawn()
            .with_context(|| format!("running {}", program.display()))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr from {}", program.display()))?;
        let mut lines = BufReader::new(stderr).lines();
        let mut tail = VecDeque::new();
        let mut errors = Vec::new();
        while let Some(line) = lines.next_line().await.context("reading a tool's output")? {
            if progress(&line) {
                self.engine.update_job(&self.op, |op| {
                    op.done = (op.done + 1).min(op.total.max(op.done + 1))
                });
            }
            if line.contains("error:") || line.contains("FATAL:") {
                errors.push(line.clone());
            }
            if tail.len() == TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
        let status = child.wait().await.context("waiting for a tool")?;
        Ok(ToolOutput {
            ok: status.success(),
            status: status.to_string(),
            tail,
            errors,
        })
    }

    async fn psql(&self, conn: &str, sql: &str) -> Result<String> {
        let out = Command::new(self.bin("psql"))
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
            .env("PGCONNECT_TIMEOUT", "15")
            .envs(self.password.iter().map(|p| ("PGPASSWORD", p)))
            .stdin(Stdio::null())
            .output()
            .await
            .context("running psql")?;
        if !out.status.success() {
            return Err(ControlError::Internal(anyhow!(
                "{}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// The import's own compute, through its Unix socket.
    fn target(&self, password: &str, db: &str) -> String {
        match &self.temp_compute {
            Some(spec) => format!(
                "postgresql://{DB_SUPERUSER}:{password}@/{db}?host={}&port={}",
                spec.socket_dir.display(),
                spec.port
            ),
            None => String::new(),
        }
    }

    async fn run(&mut self) -> Result<api::Branch> {
        let password = random_password();
        let (tl, database) = self.build(&password).await?;

        // 7. Make it a branch: record the branch, start its own compute.
        self.phase("finishing");
        let _op = self.engine.op_lock.lock().await;
        self.engine.release_name(&self.name);
        self.engine.check_new_name(&self.name)?;
        let port = self.engine.allocate_port(&[])?;
        let row = self.engine.meta.commit_new_branch(&NewBranch {
            name: self.name.clone(),
            parent_id: None,
            timeline_id: tl.to_string(),
            protected: false,
            expires_at: None,
            port,
            db_user: DB_SUPERUSER.into(),
            db_password: password,
            database,
            suspend_timeout_secs: None,
            settings: Default::default(),
        })?;
        self.timeline = None;
        if let Err(e) = self.engine.open_endpoint(&row).await {
            tracing::error!(branch = %row.name, error = %e, "imported branch has no endpoint");
        }
        if let Err(e) = self.engine.start_compute_of(&row).await {
            tracing::error!(branch = %row.name, error = %e, "imported branch did not start");
        }
        tracing::info!(branch = %row.name, "import finished");
        drop(_op);
        self.engine.get_branch(&row.name).await
    }

    /// Dumps the source and restores it into a new `creating` timeline whose superuser
    /// (`DB_SUPERUSER`) has `password`. Returns the timeline (left to the caller: on success
    /// [`Import::disown`] it once a branch points at it, or [`Import::roll_back`]) and the
    /// source's database name. The import's compute is stopped when this returns `Ok`.
    pub(crate) async fn build(
        &mut self,
        password: &str,
    ) -> Result<(stemma_storage::TimelineId, String)> {
        // 1. The source: reachable, and not newer than our pg_dump.
        let probe = self
            .psql(
                &self.url,
                "SELECT current_database() || '|' || current_setting('server_version_num') || '|' || \
                 (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                  WHERE c.relkind IN ('r','p','m') AND n.nspname NOT IN ('pg_catalog','information_schema') \
                  AND n.nspname NOT LIKE 'pg_toast%')",
            )
            .await
            .map_err(|e| {
                ControlError::Invalid(format!("cannot reach the source database: {e}"))
            })?;
        let parts: Vec<&str> = probe.split('|').collect();
        let [database, version, tables] = parts[..] else {
            return Err(anyhow!("unexpected answer from the source: {probe:?}").into());
        };
        let database = database.to_string();
        let source_major = version.parse::<u32>().unwrap_or(0) / 10000;
        let local_major = self.engine.supervisor.install().major_version;
        if source_major > local_major {
            return Err(ControlError::Invalid(format!(
                "the source runs PostgreSQL {source_major}, newer than the installed PostgreSQL {local_major}; install PostgreSQL {source_major} here (or set STEMMA_PG_BIN) to import it"
            )));
        }
        let tables: u64 = tables.parse().unwrap_or(0);
        self.engine
            .update_job(&self.op, |op| op.total = tables * 2 + 2);

        // 2. An empty root with its own compute, on the port the branch keeps.
        self.phase("creating the root branch");
        let tl = new_timeline_id();
        self.engine.meta.begin_timeline(tl.as_str(), None)?;
        self.timeline = Some(tl.to_string());
        self.engine.initdb_timeline(&tl, password).await?;
        let mut spec = self.engine.compute_spec(&NewBranchView::row(&tl, 0))?;
        spec.key = format!("import-{}", self.op);
        spec.socket_dir = self
            .engine
            .cfg
            .data_dir
            .join("run")
            .join(format!("import-{:08x}", rand::random::<u32>()));
        spec.label = format!("{} (importing)", self.name);
        spec.log_path = self.engine.cfg.logs_dir().join(format!("{}.log", self.op));
        self.engine.supervisor.start(spec.clone()).await?;
        self.temp_compute = Some(spec);
        self.engine.update_job(&self.op, |op| op.done += 1);

        // 3. Roles, where the source lets us read them.
        self.phase("copying roles");
        tokio::fs::create_dir_all(&self.scratch)
            .await
            .context("creating the import's scratch directory")?;
        let roles_file = self.scratch.join("roles.sql");
        let mut roles = false;
        for extra in [None, Some("--no-role-passwords")] {
            let mut args = vec![
                "--roles-only".to_string(),
                "-d".into(),
                self.url.clone(),
                "-f".into(),
                roles_file.display().to_string(),
            ];
            args.extend(extra.map(String::from));
            let out = self.tool(&self.bin("pg_dumpall"), &args, |_| false).await?;
            if out.ok {
                roles = true;
                break;
            }
            tracing::info!(errors = ?out.errors, "pg_dumpall --roles-only was refused");
        }
        let admin = self.target(password, "postgres");
        if roles {
            // The source may have a role named like our superuser: its password must not
            // replace ours.
            let sql = tokio::fs::read_to_string(&roles_file)
                .await
                .context("reading the roles dump")?;
            tokio::fs::write(&roles_file, without_role(&sql, DB_SUPERUSER))
                .await
                .context("writing the roles dump")?;
            let args = vec![
                "-X".to_string(),
                "-q".into(),
                "-d".into(),
                admin.clone(),
                "-f".into(),
                roles_file.display().to_string(),
            ];
            // Roles that exist already (ours among them) fail one by one; that is fine.
            self.tool(&self.bin("psql"), &args, |_| false).await?;
            // The source may have a role named like ours: keep our password.
            self.psql(
                &admin,
                &format!("ALTER ROLE {DB_SUPERUSER} WITH SUPERUSER LOGIN PASSWORD '{password}'"),
            )
            .await?;
        }

        // 4. The database itself.
        if database != "postgres" {
            self.psql(
                &admin,
                &format!("CREATE DATABASE {}", quote_ident(&database)),
            )
            .await?;
        }

        // 5. Dump.
        self.phase("dumping the source");
        let dump_dir = self.scratch.join("dump");
        let args = vec![
            "-Fd".to_string(),
            "-j".into(),
            self.jobs.to_string(),
            "-v".into(),
            "-f".into(),
            dump_dir.display().to_string(),
            "-d".into(),
            self.url.clone(),
        ];
        let out = self
            .tool(&self.bin("pg_dump"), &args, |l| {
                l.contains("dumping contents of table")
            })
            .await?;
        if !out.ok {
            return Err(ControlError::Internal(anyhow!(
                "pg_dump failed ({}):\n{}",
                out.status,
                Vec::from(out.tail).join("\n")
            )));
        }

        // 6. Restore into the new root, in parallel.
        self.phase("restoring into the new branch");
        let mut args = vec![
            "-j".to_string(),
            self.jobs.to_string(),
            "-v".into(),
            "-d".into(),
            self.target(password, &database),
        ];
        if !roles {
            args.extend(["--no-owner".to_string(), "--no-privileges".to_string()]);
        }
        args.push(dump_dir.display().to_string());
        let out = self
            .tool(&self.bin("pg_restore"), &args, |l| {
                l.contains("processing data for table") || l.contains("finished item")
            })
            .await?;
        if !out.ok {
            // pg_restore goes on after errors and fails at the end. Missing roles and objects
            // that already exist (from initdb) are harmless; anything else is a failed import.
            let serious: Vec<&String> = out
                .errors
                .iter()
                .filter(|l| {
                    !(l.contains("already exists")
                        || l.contains("does not exist") && l.contains("role")
                        || l.contains("must be owner of")
                        || l.contains("errors ignored on restore"))
                })
                .collect();
            if !serious.is_empty() || out.errors.is_empty() {
                return Err(ControlError::Internal(anyhow!(
                    "pg_restore failed ({}):\n{}",
                    out.status,
                    Vec::from(out.tail).join("\n")
                )));
            }
            tracing::warn!(errors = ?out.errors, "pg_restore reported harmless errors");
        }

        // The import's compute is done; the branch gets its own.
        if let Some(spec) = self.temp_compute.take() {
            self.engine
                .supervisor
                .stop(&spec.key, &spec.data_dir)
                .await?;
        }
        Ok((tl, database))
    }

    /// The timeline now belongs to a branch: a later roll back must leave it alone.
    pub(crate) fn disown(&mut self) {
        self.timeline = None;
    }

    pub(crate) async fn roll_back(&mut self) {
        if let Some(spec) = self.temp_compute.take() {
            let _ = self.engine.supervisor.stop(&spec.key, &spec.data_dir).await;
        }
        if let Some(tl) = self.timeline.take() {
            if let Err(e) = self.engine.destroy_timeline(&tl).await {
                tracing::error!(error = %e, "removing the failed import's timeline; the next start removes it");
            }
        }
    }

    pub(crate) async fn cleanup_scratch(&self) {
        if let Err(e) = tokio::fs::remove_dir_all(&self.scratch).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "removing the import's scratch directory");
            }
        }
    }
}

/// A branch row for a timeline not yet recorded as a branch, to derive a compute spec from.
pub(crate) struct NewBranchView;

impl NewBranchView {
    pub(crate) fn row(tl: &stemma_storage::TimelineId, port: u16) -> crate::metadata::BranchRow {
        crate::metadata::BranchRow {
            id: 0,
            name: String::new(),
            parent_id: None,
            timeline_id: tl.to_string(),
            created_at: Utc::now(),
            protected: false,
            expires_at: None,
            port,
            db_user: DB_SUPERUSER.into(),
            db_password: String::new(),
            database: String::new(),
            suspend_timeout_secs: None,
            settings: Default::default(),
            compute_running: true,
            last_reset_at: None,
            migration: None,
        }
    }
}

/// `pg_dumpall --roles-only` output without the statements that create or alter `role`.
pub(crate) fn without_role(sql: &str, role: &str) -> String {
    let plain = format!("ROLE {role} ");
    let plain_end = format!("ROLE {role};");
    let quoted = format!("ROLE \"{role}\"");
    sql.lines()
        .filter(|l| {
            let touches = l.contains(&plain) || l.contains(&plain_end) || l.contains(&quoted);
            !((l.starts_with("CREATE ROLE") || l.starts_with("ALTER ROLE")) && touches)
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Quotes an SQL identifier.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_our_role_from_a_roles_dump() {
        let sql = "CREATE ROLE stemma;\nALTER ROLE stemma WITH SUPERUSER PASSWORD 'x';\nCREATE ROLE app;\nALTER ROLE app WITH LOGIN;\nCREATE ROLE stemma_ro;\nGRANT app TO stemma;\n";
        let kept = without_role(sql, "stemma");
        assert_eq!(
            kept,
            "CREATE ROLE app;\nALTER ROLE app WITH LOGIN;\nCREATE ROLE stemma_ro;\nGRANT app TO stemma;\n"
        );
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_ident("chinook"), "\"chinook\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
