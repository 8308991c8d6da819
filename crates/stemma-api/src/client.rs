//! A blocking client of the daemon's API, for the CLI.

use std::time::Duration;

use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::*;

/// Characters escaped in a path segment: a branch name's `/` must stay inside its segment.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'/')
    .add(b'%')
    .add(b'?')
    .add(b'#')
    .add(b'"')
    .add(b'<')
    .add(b'>');

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon answered with an error.
    #[error("{}", .0.error)]
    Api(ApiError, u16),
    /// The daemon could not be reached.
    #[error("cannot reach the Stemma daemon at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

/// Talks to one daemon.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base_url: &str, token: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            // Branch operations on large databases take a while with the copy driver.
            .timeout(Duration::from_secs(3600))
            .build();
        Client {
            base: base_url.trim_end_matches('/').to_string(),
            token: token.to_string(),
            agent,
        }
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn seg(name: &str) -> String {
        utf8_percent_encode(name, SEGMENT).to_string()
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{}", self.base, path);
        let req = self
            .agent
            .request(method, &url)
            .set("Authorization", &format!("Bearer {}", self.token));
        let resp = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match resp {
            Ok(r) => r
                .into_json::<T>()
                .map_err(|e| ClientError::Protocol(e.to_string())),
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let err = serde_json::from_str::<ApiError>(&text).unwrap_or(ApiError {
                    code: "internal".into(),
                    error: format!("HTTP {code}: {text}"),
                });
                Err(ClientError::Api(err, code))
            }
            Err(ureq::Error::Transport(t)) => Err(ClientError::Unreachable {
                url: self.base.clone(),
                reason: t.to_string(),
            }),
        }
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        self.call("GET", "/v1/status", None::<&()>)
    }

    pub fn list_branches(&self) -> Result<Vec<Branch>, ClientError> {
        self.call("GET", "/v1/branches", None::<&()>)
    }

    pub fn get_branch(&self, name: &str) -> Result<Branch, ClientError> {
        self.call(
            "GET",
            &format!("/v1/branches/{}", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn create_branch(&self, req: &CreateBranchRequest) -> Result<Branch, ClientError> {
        self.call("POST", "/v1/branches", Some(req))
    }

    pub fn delete_branch(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.call(
            "DELETE",
            &format!("/v1/branches/{}", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn reset_branch(
        &self,
        name: &str,
        req: &ResetBranchRequest,
    ) -> Result<Branch, ClientError> {
        self.call(
            "POST",
            &format!("/v1/branches/{}/reset", Self::seg(name)),
            Some(req),
        )
    }

    pub fn restore_branch(
        &self,
        name: &str,
        req: &RestoreBranchRequest,
    ) -> Result<Branch, ClientError> {
        self.call(
            "POST",
            &format!("/v1/branches/{}/restore", Self::seg(name)),
            Some(req),
        )
    }

    pub fn rename_branch(&self, name: &str, new_name: &str) -> Result<Branch, ClientError> {
        let req = RenameBranchRequest {
            new_name: new_name.to_string(),
        };
        self.call(
            "POST",
            &format!("/v1/branches/{}/rename", Self::seg(name)),
            Some(&req),
        )
    }

    pub fn update_branch(
        &self,
        name: &str,
        req: &UpdateBranchRequest,
    ) -> Result<Branch, ClientError> {
        self.call(
            "PATCH",
            &format!("/v1/branches/{}", Self::seg(name)),
            Some(req),
        )
    }

    pub fn start_compute(&self, name: &str) -> Result<Branch, ClientError> {
        self.call(
            "POST",
            &format!("/v1/branches/{}/compute/start", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn stop_compute(&self, name: &str) -> Result<Branch, ClientError> {
        self.call(
            "POST",
            &format!("/v1/branches/{}/compute/stop", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn connection_string(
        &self,
        name: &str,
        database: Option<&str>,
    ) -> Result<ConnectionString, ClientError> {
        let mut path = format!("/v1/branches/{}/connection-string", Self::seg(name));
        if let Some(db) = database {
            path.push_str("?database=");
            path.push_str(&Self::seg(db));
        }
        self.call("GET", &path, None::<&()>)
    }

    /// [`Client::connection_string`], with production's password when the branch follows a
    /// physical source (the daemon's token only): for `stemma psql`, never to be printed.
    pub fn connection_string_with_source_password(
        &self,
        name: &str,
        database: Option<&str>,
    ) -> Result<ConnectionString, ClientError> {
        let mut path = format!(
            "/v1/branches/{}/connection-string?source_password=true",
            Self::seg(name)
        );
        if let Some(db) = database {
            path.push_str("&database=");
            path.push_str(&Self::seg(db));
        }
        self.call("GET", &path, None::<&()>)
    }

    pub fn pr_open(&self, number: u64, parent: Option<&str>) -> Result<Branch, ClientError> {
        let req = PullRequestRequest {
            parent: parent.map(String::from),
        };
        self.call(
            "POST",
            &format!("/v1/pull-requests/{number}/open"),
            Some(&req),
        )
    }

    pub fn pr_close(&self, number: u64) -> Result<serde_json::Value, ClientError> {
        self.call(
            "POST",
            &format!("/v1/pull-requests/{number}/close"),
            None::<&()>,
        )
    }

    pub fn schema_diff(
        &self,
        name: &str,
        against: Option<&str>,
        markdown: bool,
    ) -> Result<SchemaDiff, ClientError> {
        let mut path = format!(
            "/v1/branches/{}/schema-diff?format={}",
            Self::seg(name),
            if markdown { "markdown" } else { "unified" }
        );
        if let Some(a) = against {
            path.push_str("&against=");
            path.push_str(&Self::seg(a));
        }
        self.call("GET", &path, None::<&()>)
    }

    pub fn migrate(&self, name: &str) -> Result<Branch, ClientError> {
        self.call(
            "POST",
            &format!("/v1/branches/{}/migrate", Self::seg(name)),
            None::<&()>,
        )
    }

    /// Proposed masking rules (TOML) for a branch.
    pub fn anonymize_suggest(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.call(
            "GET",
            &format!("/v1/branches/{}/anonymize/suggest", Self::seg(name)),
            None::<&()>,
        )
    }

    /// Starts building an anonymized branch; follow it with [`Client::operation`].
    pub fn anonymize(&self, req: &AnonymizeRequest) -> Result<Operation, ClientError> {
        self.call("POST", "/v1/anonymized-branches", Some(req))
    }

    /// Starts re-anonymizing a branch from its parent's current state (its reset).
    pub fn reanonymize(&self, name: &str) -> Result<Operation, ClientError> {
        self.call(
            "POST",
            &format!("/v1/branches/{}/reanonymize", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn create_token(&self, req: &CreateTokenRequest) -> Result<Token, ClientError> {
        self.call("POST", "/v1/tokens", Some(req))
    }

    pub fn list_tokens(&self) -> Result<Vec<Token>, ClientError> {
        self.call("GET", "/v1/tokens", None::<&()>)
    }

    pub fn delete_token(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.call(
            "DELETE",
            &format!("/v1/tokens/{}", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn init(&self, req: &InitRequest) -> Result<Operation, ClientError> {
        self.call("POST", "/v1/init", Some(req))
    }

    pub fn operation(&self, id: &str) -> Result<Operation, ClientError> {
        self.call(
            "GET",
            &format!("/v1/operations/{}", Self::seg(id)),
            None::<&()>,
        )
    }

    // ----- sources ------------------------------------------------------------------------

    pub fn add_source(&self, req: &AddSourceRequest) -> Result<Source, ClientError> {
        self.call("POST", "/v1/sources", Some(req))
    }

    pub fn list_sources(&self) -> Result<Vec<Source>, ClientError> {
        self.call("GET", "/v1/sources", None::<&()>)
    }

    pub fn get_source(&self, name: &str) -> Result<Source, ClientError> {
        self.call(
            "GET",
            &format!("/v1/sources/{}", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn refresh_source(&self, name: &str) -> Result<Source, ClientError> {
        self.call(
            "POST",
            &format!("/v1/sources/{}/refresh", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn remove_source(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.call(
            "DELETE",
            &format!("/v1/sources/{}", Self::seg(name)),
            None::<&()>,
        )
    }

    pub fn shutdown(&self) -> Result<serde_json::Value, ClientError> {
        self.call("POST", "/v1/shutdown", None::<&()>)
    }
}
