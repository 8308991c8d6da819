//! Finding PostgreSQL and the user computes run as.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{ComputeError, Result};

/// An installed PostgreSQL: the directory holding `postgres`, `initdb`, `pg_dump`...
#[derive(Debug, Clone)]
pub struct PgInstall {
    pub bin_dir: PathBuf,
    /// The major version, e.g. 15.
    pub major_version: u32,
}

impl PgInstall {
    /// Looks in order at `override_dir` (from `STEMMA_PG_BIN`), `postgres` on PATH,
    /// `pg_config --bindir`, then the newest `/usr/lib/postgresql/*/bin`.
    pub fn discover(override_dir: Option<&Path>) -> Result<Self> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Some(dir) = override_dir {
            if !dir.join("postgres").is_file() {
                return Err(ComputeError::Failed(format!(
                    "STEMMA_PG_BIN={} does not contain a `postgres` executable",
                    dir.display()
                )));
            }
            candidates.push(dir.to_path_buf());
        }
        if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                if dir.join("postgres").is_file() && dir.join("initdb").is_file() {
                    candidates.push(dir);
                }
            }
        }
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
            if out.status.success() {
                let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
                if dir.join("postgres").is_file() {
                    candidates.push(dir);
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut versions: Vec<(u32, PathBuf)> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let v: u32 = e.file_name().to_str()?.parse().ok()?;
                    let bin = e.path().join("bin");
                    bin.join("postgres").is_file().then_some((v, bin))
                })
                .collect();
            versions.sort();
            candidates.extend(versions.into_iter().rev().map(|(_, b)| b));
        }
        let first = candidates
            .into_iter()
            .next()
            .ok_or(ComputeError::NoPostgres)?;
        // `postgres` on PATH is often a symlink into the real installation (where psql,
        // pg_dump and the rest live too): follow it.
        let bin_dir = std::fs::canonicalize(first.join("postgres"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .unwrap_or(first);
        let out = Command::new(bin_dir.join("postgres"))
            .arg("--version")
            .output()
            .map_err(ComputeError::io(format!(
                "running {}/postgres --version",
                bin_dir.display()
            )))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let major_version = parse_major(&text).ok_or_else(|| {
            ComputeError::Failed(format!("cannot read the PostgreSQL version from {text:?}"))
        })?;
        Ok(PgInstall {
            bin_dir,
            major_version,
        })
    }

    /// The path of one of the installation's programs.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// `postgres (PostgreSQL) 15.18 (Debian ...)` -> 15.
fn parse_major(version_output: &str) -> Option<u32> {
    let after = version_output.split(')').nth(1)?.trim();
    let num = after.split(|c: char| !c.is_ascii_digit()).next()?;
    num.parse().ok()
}

/// The unprivileged OS user that computes run as when the daemon runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComputeUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl ComputeUser {
    /// PostgreSQL refuses to run as root. When this process is root, computes run as `name`
    /// (default `postgres`); otherwise as the current user, and `None` is returned.
    pub fn resolve(name: Option<&str>) -> Result<Option<ComputeUser>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let name = name.unwrap_or("postgres");
        let user = nix::unistd::User::from_name(name)
            .map_err(|e| ComputeError::User(format!("looking up user {name}: {e}")))?
            .ok_or_else(|| {
                ComputeError::User(format!(
                    "the daemon runs as root, and PostgreSQL refuses to: computes run as an unprivileged user, but user {name:?} does not exist; create it (`useradd --system {name}`) or choose another with --compute-user"
                ))
            })?;
        if user.uid.is_root() {
            return Err(ComputeError::User(format!(
                "compute user {name:?} is root; PostgreSQL refuses to run as root"
            )));
        }
        Ok(Some(ComputeUser {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }))
    }

    pub fn ids(user: &Option<ComputeUser>) -> Option<(u32, u32)> {
        user.as_ref().map(|u| (u.uid, u.gid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(
            parse_major("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n"),
            Some(15)
        );
        assert_eq!(parse_major("postgres (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(parse_major("garbage"), None);
    }

    #[test]
    fn finds_the_installed_postgres() {
        let install = PgInstall::discover(None).expect("PostgreSQL is installed on test machines");
        assert!(install.major_version >= 12);
        assert!(install.bin("initdb").is_file());
    }

    #[test]
    fn a_bad_override_is_an_error() {
        let err = PgInstall::discover(Some(Path::new("/nonexistent"))).unwrap_err();
        assert!(err.to_string().contains("STEMMA_PG_BIN"), "{err}");
    }
}
