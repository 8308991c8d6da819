//! The project's configuration file, `stemma.toml`: the default parent of new branches, what
//! pull-request branches derive from and how long they live, migrations, GitHub, and schedules.
//!
//! ```toml
//! default_parent = "main"          # parent of `stemma branch create NAME` without --parent
//!
//! [pull_requests]
//! parent = "staging"               # default: `staging` when it exists, else default_parent
//! ttl = "7d"                       # a missed `closed` event cannot leave a branch for ever
//! reset_on_synchronize = false     # on a push to the PR: reset to the parent first
//! prefix = "pr-"
//!
//! [migrations]                     # run on PR branches when created and on each push
//! directory = "migrations"         # *.sql applied in name order, each once (relative to this file)
//! # command = "sqlx migrate run"   # or a command run with DATABASE_URL of the branch
//! database = "app"                 # default: the branch's database
//!
//! [github]
//! webhook_secret = "..."           # or STEMMA_GITHUB_WEBHOOK_SECRET
//! token = "..."                    # or STEMMA_GITHUB_TOKEN: post schema diffs on pull requests
//! api_url = "https://api.github.com"
//!
//! [[schedule]]
//! branch = "dev"
//! reset = "0 3 * * *"              # cron, UTC; a sixth leading field counts seconds
//!
//! [[schedule]]                     # or steps in order, stopping at the first failure
//! name = "nightly"
//! at = "0 2 * * *"
//! steps = ["refresh prod", "reset anon", "reset dev"]   # refresh SOURCE | reset BRANCH
//! ```

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectConfig {
    pub default_parent: Option<String>,
    #[serde(default)]
    pub pull_requests: PullRequests,
    #[serde(default)]
    pub migrations: Migrations,
    #[serde(default)]
    pub github: Github,
    #[serde(default, rename = "schedule")]
    pub schedules: Vec<Schedule>,
    /// The directory of the file, against which relative paths resolve.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PullRequests {
    pub parent: Option<String>,
    #[serde(default = "default_pr_ttl")]
    pub ttl: String,
    #[serde(default)]
    pub reset_on_synchronize: bool,
    #[serde(default = "default_pr_prefix")]
    pub prefix: String,
}

fn default_pr_ttl() -> String {
    "7d".into()
}

fn default_pr_prefix() -> String {
    "pr-".into()
}

impl Default for PullRequests {
    fn default() -> Self {
        PullRequests {
            parent: None,
            ttl: default_pr_ttl(),
            reset_on_synchronize: false,
            prefix: default_pr_prefix(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migrations {
    pub directory: Option<PathBuf>,
    pub command: Option<String>,
    pub database: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Github {
    pub webhook_secret: Option<String>,
    pub token: Option<String>,
    pub api_url: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// The one-step form: the branch to reset...
    #[serde(default)]
    pub branch: String,
    /// ...on this cron pattern, to its parent.
    #[serde(default)]
    pub reset: String,
    /// The steps form: a name, a cron pattern (`at`) and steps run in order.
    pub name: Option<String>,
    pub at: Option<String>,
    #[serde(default)]
    pub steps: Vec<String>,
}

/// One step of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Take a new snapshot of a source (a physical source follows anyway: nothing to do).
    Refresh(String),
    /// Reset a branch to its parent (re-anonymize an anonymized branch).
    Reset(String),
}

impl Schedule {
    pub fn cron(&self) -> Result<croner::Cron> {
        let pattern = self.at.as_deref().unwrap_or(&self.reset);
        croner::Cron::from_str(pattern).with_context(|| {
            format!(
                "invalid cron pattern {pattern:?} in the schedule {:?}",
                self.key()
            )
        })
    }

    /// What names the schedule: its name, or the branch it resets.
    pub fn key(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.branch.clone())
    }

    /// The steps, in order.
    pub fn steps(&self) -> Result<Vec<Step>> {
        if self.steps.is_empty() {
            return Ok(vec![Step::Reset(self.branch.clone())]);
        }
        self.steps
            .iter()
            .map(|s| {
                let mut words = s.split_whitespace();
                let step = match (words.next(), words.next(), words.next()) {
                    (Some("refresh"), Some(source), None) => Step::Refresh(source.to_string()),
                    (Some("reset"), Some(branch), None) => Step::Reset(branch.to_string()),
                    _ => bail!(
                        "invalid step {s:?} in the schedule {:?}: write `refresh SOURCE` or `reset BRANCH`",
                        self.key()
                    ),
                };
                let (Step::Refresh(n) | Step::Reset(n)) = &step;
                crate::names::validate_branch_name(n)?;
                Ok(step)
            })
            .collect()
    }
}

impl ProjectConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the configuration {}", path.display()))?;
        let mut cfg: ProjectConfig = toml::from_str(&text)
            .with_context(|| format!("in the configuration {}", path.display()))?;
        cfg.base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        cfg.validate()
            .with_context(|| format!("in the configuration {}", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        crate::names::parse_duration(&self.pull_requests.ttl)
            .map_err(|e| anyhow::anyhow!("pull_requests.ttl: {e}"))?;
        for s in &self.schedules {
            if s.steps.is_empty() {
                crate::names::validate_branch_name(&s.branch)
                    .map_err(|e| anyhow::anyhow!("schedule: {e}"))?;
            } else if s.name.is_none() || s.at.is_none() || !s.branch.is_empty() {
                bail!("schedule: a schedule with steps needs `name` and `at` (a cron pattern), and no `branch`");
            }
            s.steps()?;
            s.cron()?;
        }
        if self.migrations.directory.is_some() && self.migrations.command.is_some() {
            bail!("migrations: set either `directory` or `command`, not both");
        }
        Ok(())
    }

    pub fn pr_ttl(&self) -> Duration {
        crate::names::parse_duration(&self.pull_requests.ttl)
            .unwrap_or(Duration::from_secs(7 * 86400))
    }

    /// The migrations directory, resolved against the file's directory.
    pub fn migrations_dir(&self) -> Option<PathBuf> {
        self.migrations.directory.as_ref().map(|d| {
            if d.is_absolute() {
                d.clone()
            } else {
                self.base_dir.join(d)
            }
        })
    }

    /// The webhook secret: the environment first, then the file.
    pub fn webhook_secret(&self) -> Option<String> {
        std::env::var("STEMMA_GITHUB_WEBHOOK_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.github.webhook_secret.clone())
    }

    pub fn github_token(&self) -> Option<String> {
        std::env::var("STEMMA_GITHUB_TOKEN")
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.github.token.clone())
    }

    pub fn github_api_url(&self) -> String {
        self.github
            .api_url
            .clone()
            .unwrap_or_else(|| "https://api.github.com".into())
            .trim_end_matches('/')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stemma.toml");
        std::fs::write(
            &path,
            r#"
default_parent = "anon"
[pull_requests]
parent = "staging"
ttl = "3d"
reset_on_synchronize = true
[migrations]
directory = "db/migrations"
[github]
webhook_secret = "s"
[[schedule]]
branch = "dev"
reset = "0 3 * * *"
[[schedule]]
branch = "qa"
reset = "*/5 * * * * *"
[[schedule]]
name = "nightly"
at = "0 2 * * *"
steps = ["refresh prod", "reset anon", "reset dev"]
"#,
        )
        .unwrap();
        let cfg = ProjectConfig::load(&path).unwrap();
        assert_eq!(cfg.default_parent.as_deref(), Some("anon"));
        assert_eq!(cfg.pr_ttl(), Duration::from_secs(3 * 86400));
        assert_eq!(
            cfg.migrations_dir().unwrap(),
            dir.path().join("db/migrations")
        );
        assert_eq!(cfg.schedules.len(), 3);
        assert_eq!(
            cfg.schedules[2].steps().unwrap(),
            vec![
                Step::Refresh("prod".into()),
                Step::Reset("anon".into()),
                Step::Reset("dev".into())
            ]
        );
        assert_eq!(
            cfg.schedules[0].steps().unwrap(),
            vec![Step::Reset("dev".into())]
        );
        assert!(cfg.pull_requests.reset_on_synchronize);
    }

    #[test]
    fn mistakes_are_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stemma.toml");
        for bad in [
            "defalt_parent = \"x\"",
            "[[schedule]]\nbranch = \"dev\"\nreset = \"every night\"",
            "[[schedule]]\nname = \"n\"\nat = \"0 3 * * *\"\nsteps = [\"vacuum main\"]",
            "[[schedule]]\nat = \"0 3 * * *\"\nsteps = [\"reset dev\"]",
            "[pull_requests]\nttl = \"soon\"",
            "[migrations]\ndirectory = \"m\"\ncommand = \"x\"",
        ] {
            std::fs::write(&path, bad).unwrap();
            let err = format!("{:#}", ProjectConfig::load(&path).unwrap_err());
            assert!(err.contains("stemma.toml"), "{bad}: {err}");
        }
    }
}
