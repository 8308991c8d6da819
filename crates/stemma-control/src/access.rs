//! Who may do what through the API: the daemon's own token reaches everything; a restricted
//! token (`stemma token create NAME --branch B`) reaches branch `B` and the branches under it,
//! and nothing else. A developer who works on an anonymized branch gets a token for it, so
//! that nothing they hold can list, read, branch from or reset production.
//!
//! Only a digest of each restricted token is stored; the token itself is shown once.

use sha2::{Digest, Sha256};
use stemma_api as api;

use crate::engine::Engine;
use crate::metadata::BranchRow;
use crate::{ControlError, Result};

/// The OS user that computes of anonymized subtrees run as, apart from every other compute's
/// files (see [`Engine::compute_user_of`]).
pub const ANONYMIZED_COMPUTE_USER: &str = "stemma-anon";

/// The caller of an API request, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The daemon's token (`<data dir>/api-token`).
    Admin,
    /// A restricted token: the subtree under branch `root` (by id, so renames keep it).
    Restricted { token: String, root: i64 },
}

/// What a caller wants to do with a branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read it, connect to it, branch from it, start or stop its compute, reset it.
    Use,
    /// Delete, rename, restore or reconfigure it: refused on the root of a restricted token's
    /// subtree (its holder must not be able to remove or replace the scope itself).
    Manage,
}

pub(crate) fn token_digest(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl Engine {
    /// Whether `b` is an anonymized branch or descends from one.
    pub(crate) fn in_anonymized_subtree(&self, b: &BranchRow) -> Result<bool> {
        let mut cur = Some(b.clone());
        for _ in 0..10_000 {
            let Some(c) = cur else { return Ok(false) };
            if self.meta.anonymization(c.id)?.is_some() {
                return Ok(true);
            }
            cur = match c.parent_id {
                Some(p) => self.meta.branch_by_id(p)?,
                None => None,
            };
        }
        Ok(false)
    }

    /// The OS user a branch's compute runs as, when it is not the default one: computes of
    /// anonymized subtrees run as [`ANONYMIZED_COMPUTE_USER`], so that their superusers
    /// (whoever holds their connection strings) cannot read other computes' files, production's
    /// among them. Only when the daemon runs as root; otherwise every compute runs as the
    /// daemon's own user.
    pub(crate) fn compute_user_of(
        &self,
        b: &BranchRow,
    ) -> Result<Option<stemma_compute::ComputeUser>> {
        if self.supervisor.user().is_none() || !self.in_anonymized_subtree(b)? {
            return Ok(None);
        }
        self.anonymized_compute_user().map(Some)
    }

    /// [`ANONYMIZED_COMPUTE_USER`], created (a system user without a home or a shell) when
    /// missing.
    pub(crate) fn anonymized_compute_user(&self) -> Result<stemma_compute::ComputeUser> {
        let name = ANONYMIZED_COMPUTE_USER;
        if let Ok(Some(u)) = stemma_compute::ComputeUser::resolve(Some(name)) {
            return Ok(u);
        }
        let out = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                tracing::info!(
                    user = name,
                    "created the compute user of anonymized branches"
                )
            }
            Ok(o) => {
                tracing::warn!(user = name, stderr = %String::from_utf8_lossy(&o.stderr).trim(), "useradd failed")
            }
            Err(e) => tracing::warn!(user = name, error = %e, "running useradd"),
        }
        stemma_compute::ComputeUser::resolve(Some(name))?
            .ok_or_else(|| anyhow::anyhow!("no compute user {name}").into())
    }

    /// The caller a bearer token names, if any.
    pub fn caller_for(&self, token: &str) -> Result<Option<Caller>> {
        Ok(self
            .meta
            .token_by_hash(&token_digest(token))?
            .map(|t| Caller::Restricted {
                token: t.name,
                root: t.branch_id,
            }))
    }

    /// Whether `b` is `root` or under it.
    fn in_subtree(&self, b: &BranchRow, root: i64) -> Result<bool> {
        let mut cur = Some(b.clone());
        // Bounded by the depth of the tree: parents never form a cycle.
        for _ in 0..10_000 {
            let Some(c) = cur else { return Ok(false) };
            if c.id == root {
                return Ok(true);
            }
            cur = match c.parent_id {
                Some(p) => self.meta.branch_by_id(p)?,
                None => None,
            };
        }
        Ok(false)
    }

    /// Fails with 403 when `caller` may not `access` branch `name`.
    pub fn authorize(&self, caller: &Caller, name: &str, access: Access) -> Result<()> {
        let Caller::Restricted { token, root } = caller else {
            return Ok(());
        };
        let b = self
            .meta
            .branch(name)?
            .ok_or_else(|| ControlError::NotFound(format!("branch {name:?} does not exist")))?;
        let root_name = self
            .meta
            .branch_by_id(*root)?
            .map(|r| r.name)
            .unwrap_or_else(|| "(deleted)".into());
        if !self.in_subtree(&b, *root)? {
            return Err(ControlError::Forbidden(format!(
                "token {token:?} reaches only branch {root_name:?} and the branches under it, not {name:?}"
            )));
        }
        if access == Access::Manage && b.id == *root {
            return Err(ControlError::Forbidden(format!(
                "token {token:?} may use branch {root_name:?} but not delete, rename, restore or reconfigure it"
            )));
        }
        Ok(())
    }

    /// Fails with 403 unless the caller holds the daemon's own token.
    pub fn require_admin(&self, caller: &Caller, what: &str) -> Result<()> {
        match caller {
            Caller::Admin => Ok(()),
            Caller::Restricted { token, .. } => Err(ControlError::Forbidden(format!(
                "token {token:?} is restricted to a subtree of branches; {what} needs the daemon's own token"
            ))),
        }
    }

    /// Keeps the branches the caller may see.
    pub fn visible(&self, caller: &Caller, branches: Vec<api::Branch>) -> Vec<api::Branch> {
        match caller {
            Caller::Admin => branches,
            Caller::Restricted { .. } => branches
                .into_iter()
                .filter(|b| self.authorize(caller, &b.name, Access::Use).is_ok())
                .collect(),
        }
    }

    pub async fn create_token(&self, req: &api::CreateTokenRequest) -> Result<api::Token> {
        crate::names::validate_branch_name(&req.name).map_err(|_| {
            ControlError::Invalid(format!(
                "invalid token name {:?}: use letters, digits, '-' and '_'",
                req.name
            ))
        })?;
        let b = self.meta.branch(&req.branch)?.ok_or_else(|| {
            ControlError::NotFound(format!("branch {:?} does not exist", req.branch))
        })?;
        if self.meta.tokens()?.iter().any(|t| t.name == req.name) {
            return Err(ControlError::Conflict(format!(
                "a token named {:?} exists already",
                req.name
            )));
        }
        use rand::distributions::{Alphanumeric, DistString};
        let secret = format!(
            "stm_{}",
            Alphanumeric.sample_string(&mut rand::thread_rng(), 40)
        );
        self.meta
            .insert_token(&req.name, &token_digest(&secret), b.id)?;
        tracing::info!(token = %req.name, branch = %b.name, "restricted token created");
        Ok(api::Token {
            name: req.name.clone(),
            branch: b.name,
            created_at: chrono::Utc::now(),
            token: Some(secret),
        })
    }

    pub fn list_tokens(&self) -> Result<Vec<api::Token>> {
        let mut out = Vec::new();
        for t in self.meta.tokens()? {
            out.push(api::Token {
                name: t.name,
                branch: self
                    .meta
                    .branch_by_id(t.branch_id)?
                    .map(|b| b.name)
                    .unwrap_or_default(),
                created_at: t.created_at,
                token: None,
            });
        }
        Ok(out)
    }

    pub fn delete_token(&self, name: &str) -> Result<()> {
        if !self.meta.delete_token(name)? {
            return Err(ControlError::NotFound(format!(
                "token {name:?} does not exist"
            )));
        }
        tracing::info!(token = name, "restricted token deleted");
        Ok(())
    }
}
