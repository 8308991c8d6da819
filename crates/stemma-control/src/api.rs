//! The JSON HTTP API (axum), described by an OpenAPI document served at `/openapi.json`.
//!
//! Every route under `/v1` needs `Authorization: Bearer <token>`, the token the daemon keeps
//! in `<data dir>/api-token` (mode 0600). Handlers are thin: each calls one [`Engine`] method.

use std::sync::Arc;

use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use stemma_api::*;
use utoipa::OpenApi;

use crate::access::{Access, Caller};
use crate::{ControlError, Engine};

#[derive(Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub token: Arc<String>,
    pub shutdown: tokio::sync::watch::Sender<bool>,
}

/// A [`ControlError`] as an HTTP response.
pub struct HttpError(ControlError);

impl From<ControlError> for HttpError {
    fn from(e: ControlError) -> Self {
        HttpError(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let (status, code) = match &self.0 {
            ControlError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ControlError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ControlError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            ControlError::Unsupported(_) => (StatusCode::NOT_IMPLEMENTED, "unsupported"),
            ControlError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ControlError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        let error = match &self.0 {
            ControlError::Internal(e) => stemma_api::error_chain(e.as_ref()),
            other => other.to_string(),
        };
        (
            status,
            Json(ApiError {
                code: code.into(),
                error,
            }),
        )
            .into_response()
    }
}

type ApiResult<T> = Result<Json<T>, HttpError>;

#[derive(OpenApi)]
#[openapi(
    info(title = "Stemma API", description = "Branches of PostgreSQL databases: create, reset, delete, connect."),
    paths(
        status, list_branches, create_branch, get_branch, delete_branch, update_branch,
        reset_branch, restore_branch, rename_branch, start_compute, stop_compute,
        connection_string, init, operation, shutdown, pr_open, pr_close, schema_diff,
        migrate, github_webhook, anonymize_suggest, anonymize, reanonymize, create_token,
        list_tokens, delete_token, list_sources, add_source, get_source, refresh_source,
        remove_source
    ),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            "token",
            Vec::<String>::new(),
        )]);
    }
}

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .route("/status", get(status))
        .route("/branches", get(list_branches).post(create_branch))
        .route(
            "/branches/{name}",
            get(get_branch).delete(delete_branch).patch(update_branch),
        )
        .route("/branches/{name}/reset", post(reset_branch))
        .route("/branches/{name}/restore", post(restore_branch))
        .route("/branches/{name}/rename", post(rename_branch))
        .route("/branches/{name}/compute/start", post(start_compute))
        .route("/branches/{name}/compute/stop", post(stop_compute))
        .route("/branches/{name}/connection-string", get(connection_string))
        .route("/branches/{name}/schema-diff", get(schema_diff))
        .route("/branches/{name}/migrate", post(migrate))
        .route("/branches/{name}/anonymize/suggest", get(anonymize_suggest))
        .route("/branches/{name}/reanonymize", post(reanonymize))
        .route("/anonymized-branches", post(anonymize))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{name}", axum::routing::delete(delete_token))
        .route("/pull-requests/{number}/open", post(pr_open))
        .route("/pull-requests/{number}/close", post(pr_close))
        .route("/init", post(init))
        .route("/operations/{id}", get(operation))
        .route("/shutdown", post(shutdown))
        .route("/sources", get(list_sources).post(add_source))
        .route("/sources/{name}", get(get_source).delete(remove_source))
        .route("/sources/{name}/refresh", post(refresh_source))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        // Authenticated by its signature, not by the API token.
        .route("/webhooks/github", post(github_webhook))
        .nest("/v1", v1)
        .with_state(state)
}

async fn require_token(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let caller = match given {
        Some(t) if constant_time_eq(t.as_bytes(), state.token.as_bytes()) => Some(Caller::Admin),
        // Restricted tokens are looked up by digest: comparing digests leaks nothing useful.
        Some(t) => match state.engine.caller_for(&t) {
            Ok(c) => c,
            Err(e) => return HttpError(e).into_response(),
        },
        None => None,
    };
    match caller {
        Some(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            Json(ApiError {
                code: "unauthorized".into(),
                error: "missing or wrong API token: the CLI reads it from <data dir>/api-token, or set STEMMA_TOKEN".into(),
            }),
        )
            .into_response(),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[utoipa::path(post, path = "/v1/pull-requests/{number}/open", params(("number" = u64, Path)),
    request_body = PullRequestRequest, responses((status = 200, body = Branch)))]
async fn pr_open(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(number): Path<u64>,
    body: Option<Json<PullRequestRequest>>,
) -> ApiResult<Branch> {
    s.engine
        .require_admin(&caller, "opening a pull request's branch")?;
    let parent = body.and_then(|Json(b)| b.parent);
    Ok(Json(s.engine.pr_open(number, parent.as_deref()).await?))
}

#[utoipa::path(post, path = "/v1/pull-requests/{number}/close", params(("number" = u64, Path)),
    responses((status = 200, body = Object)))]
async fn pr_close(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(number): Path<u64>,
) -> ApiResult<serde_json::Value> {
    s.engine
        .require_admin(&caller, "closing a pull request's branch")?;
    let deleted = s.engine.pr_close(number).await?;
    Ok(Json(serde_json::json!({
        "branch": s.engine.pr_branch_name(number),
        "deleted": deleted,
    })))
}

#[derive(Deserialize)]
struct DiffQuery {
    against: Option<String>,
    format: Option<String>,
}

#[utoipa::path(get, path = "/v1/branches/{name}/schema-diff",
    params(("name" = String, Path), ("against" = Option<String>, Query), ("format" = Option<String>, Query)),
    responses((status = 200, body = SchemaDiff)))]
async fn schema_diff(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<DiffQuery>,
) -> ApiResult<SchemaDiff> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    let against = match &q.against {
        Some(a) => Some(a.clone()),
        None => s.engine.get_branch(&name).await?.parent,
    };
    if let Some(a) = &against {
        s.engine.authorize(&caller, a, Access::Use)?;
    }
    let markdown = q.format.as_deref() == Some("markdown");
    Ok(Json(
        s.engine
            .schema_diff(&name, against.as_deref(), markdown)
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/branches/{name}/migrate", params(("name" = String, Path)),
    responses((status = 200, body = Branch)))]
async fn migrate(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Branch> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    Ok(Json(s.engine.run_migrations(&name).await?))
}

#[utoipa::path(get, path = "/v1/branches/{name}/anonymize/suggest", params(("name" = String, Path)),
    responses((status = 200, body = Object, description = "`{\"rules\": TOML}`")))]
async fn anonymize_suggest(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    let rules = s.engine.anonymize_suggest(&name).await?;
    Ok(Json(serde_json::json!({ "branch": name, "rules": rules })))
}

/// Whether `signature` (`sha256=<hex>`) is the HMAC-SHA256 of `body` with `secret`.
fn signature_valid(secret: &str, body: &[u8], signature: Option<&str>) -> bool {
    use hmac::{KeyInit, Mac};
    let Some(hex_sig) = signature.and_then(|s| s.strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig.trim()) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn webhook_answer(status: StatusCode, body: serde_json::Value) -> Response {
    (status, Json(body)).into_response()
}

/// GitHub webhooks: `pull_request` opened/reopened creates the PR's branch, `synchronize`
/// migrates it again (resetting first when configured), `closed` deletes it. The work is
/// queued and done in order; the answer comes at once (GitHub gives up after 10 s).
#[utoipa::path(post, path = "/webhooks/github", request_body = Object,
    responses((status = 200), (status = 202), (status = 400), (status = 401)), security(()))]
async fn github_webhook(
    State(s): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(secret) = s.engine.config().project.webhook_secret() else {
        return webhook_answer(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "no webhook secret is configured (STEMMA_GITHUB_WEBHOOK_SECRET or [github] webhook_secret)" }),
        );
    };
    if !signature_valid(&secret, &body, header("x-hub-signature-256")) {
        return webhook_answer(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({ "error": "missing or invalid X-Hub-Signature-256" }),
        );
    }
    let event = header("x-github-event").unwrap_or("");
    if event == "ping" {
        return webhook_answer(StatusCode::OK, serde_json::json!({ "ok": true }));
    }
    if event != "pull_request" {
        return webhook_answer(
            StatusCode::ACCEPTED,
            serde_json::json!({ "ignored": format!("event {event:?} needs no action") }),
        );
    }
    let payload: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return webhook_answer(
                StatusCode::BAD_REQUEST,
                serde_json::json!({ "error": format!("the body is not valid JSON: {e}") }),
            )
        }
    };
    let action = payload["action"].as_str().unwrap_or("");
    let number = payload["number"]
        .as_u64()
        .or_else(|| payload["pull_request"]["number"].as_u64());
    let Some(number) = number else {
        return webhook_answer(
            StatusCode::BAD_REQUEST,
            serde_json::json!({ "error": "a pull_request event without a number" }),
        );
    };
    let repository = payload["repository"]["full_name"]
        .as_str()
        .map(String::from);
    let event = match action {
        "opened" | "reopened" => crate::workflows::PrEvent::Open { number, repository },
        "synchronize" => crate::workflows::PrEvent::Synchronize { number, repository },
        "closed" => crate::workflows::PrEvent::Close { number },
        other => {
            return webhook_answer(
                StatusCode::ACCEPTED,
                serde_json::json!({ "ignored": format!("action {other:?} needs no action") }),
            )
        }
    };
    if let Some(id) = header("x-github-delivery") {
        match s.engine.meta.record_delivery(id) {
            Ok(true) => {}
            Ok(false) => {
                return webhook_answer(
                    StatusCode::OK,
                    serde_json::json!({ "duplicate": true, "delivery": id }),
                )
            }
            Err(e) => tracing::warn!(error = %e, "recording a webhook delivery"),
        }
    }
    let Some(queue) = s.engine.pr_events.get() else {
        return webhook_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "the daemon is starting" }),
        );
    };
    match queue.try_send(event) {
        Ok(()) => webhook_answer(
            StatusCode::ACCEPTED,
            serde_json::json!({ "queued": action, "branch": s.engine.pr_branch_name(number) }),
        ),
        Err(_) => webhook_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "error": "too many pull request events queued; retry later" }),
        ),
    }
}

/// Prometheus metrics (loopback, no token: scrapers rarely carry one).
async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.engine.metrics_text(),
    )
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[utoipa::path(get, path = "/v1/status", responses((status = 200, body = Status)))]
async fn status(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Status> {
    let mut status = s.engine.status()?;
    if caller != Caller::Admin {
        status
            .computes
            .retain(|c| s.engine.authorize(&caller, &c.branch, Access::Use).is_ok());
        status.branches = status.computes.len();
    }
    Ok(Json(status))
}

#[utoipa::path(get, path = "/v1/branches", responses((status = 200, body = [Branch])))]
async fn list_branches(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Vec<Branch>> {
    let all = s.engine.list_branches().await?;
    Ok(Json(s.engine.visible(&caller, all)))
}

#[utoipa::path(post, path = "/v1/branches", request_body = CreateBranchRequest,
    responses((status = 200, body = Branch), (status = 409, body = ApiError), (status = 404, body = ApiError)))]
async fn create_branch(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(mut req): Json<CreateBranchRequest>,
) -> ApiResult<Branch> {
    req.parent = Some(parent_for(&s.engine, &caller, req.parent.take())?);
    Ok(Json(s.engine.create_branch(&req).await?))
}

/// The parent of a new branch: as given, else the caller's subtree root for a restricted
/// token, else the default parent; checked against the caller's reach.
fn parent_for(
    engine: &Engine,
    caller: &Caller,
    given: Option<String>,
) -> Result<String, HttpError> {
    let parent = match (given, caller) {
        (Some(p), _) => p,
        (None, Caller::Restricted { root, .. }) => engine
            .meta
            .branch_by_id(*root)
            .map_err(ControlError::from)?
            .map(|b| b.name)
            .ok_or_else(|| ControlError::Forbidden("the token's branch no longer exists".into()))?,
        (None, Caller::Admin) => engine.default_parent(),
    };
    engine.authorize(caller, &parent, Access::Use)?;
    Ok(parent)
}

#[utoipa::path(get, path = "/v1/branches/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Branch), (status = 404, body = ApiError)))]
async fn get_branch(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Branch> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    Ok(Json(s.engine.get_branch(&name).await?))
}

#[utoipa::path(delete, path = "/v1/branches/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 409, body = ApiError)))]
async fn delete_branch(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    s.engine.authorize(&caller, &name, Access::Manage)?;
    s.engine.delete_branch(&name).await?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

#[utoipa::path(patch, path = "/v1/branches/{name}", params(("name" = String, Path)),
    request_body = UpdateBranchRequest, responses((status = 200, body = Branch)))]
async fn update_branch(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(req): Json<UpdateBranchRequest>,
) -> ApiResult<Branch> {
    s.engine.authorize(&caller, &name, Access::Manage)?;
    Ok(Json(s.engine.update_branch(&name, &req).await?))
}

#[utoipa::path(post, path = "/v1/branches/{name}/reset", params(("name" = String, Path)),
    request_body = ResetBranchRequest, responses((status = 200, body = Branch)))]
async fn reset_branch(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(req): Json<ResetBranchRequest>,
) -> ApiResult<Branch> {
    let access = if req.preserve_under_name.is_some() {
        Access::Manage
    } else {
        Access::Use
    };
    s.engine.authorize(&caller, &name, access)?;
    Ok(Json(
        s.engine
            .reset_branch(&name, req.preserve_under_name.as_deref())
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/branches/{name}/restore", params(("name" = String, Path)),
    request_body = RestoreBranchRequest, responses((status = 200, body = Branch), (status = 501, body = ApiError)))]
async fn restore_branch(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(req): Json<RestoreBranchRequest>,
) -> ApiResult<Branch> {
    s.engine.authorize(&caller, &name, Access::Manage)?;
    Ok(Json(s.engine.restore_branch(&name, &req).await?))
}

#[utoipa::path(post, path = "/v1/branches/{name}/rename", params(("name" = String, Path)),
    request_body = RenameBranchRequest, responses((status = 200, body = Branch)))]
async fn rename_branch(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Json(req): Json<RenameBranchRequest>,
) -> ApiResult<Branch> {
    s.engine.authorize(&caller, &name, Access::Manage)?;
    Ok(Json(s.engine.rename_branch(&name, &req.new_name).await?))
}

#[utoipa::path(post, path = "/v1/branches/{name}/compute/start", params(("name" = String, Path)),
    responses((status = 200, body = Branch)))]
async fn start_compute(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Branch> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    Ok(Json(s.engine.start_compute(&name).await?))
}

#[utoipa::path(post, path = "/v1/branches/{name}/compute/stop", params(("name" = String, Path)),
    responses((status = 200, body = Branch)))]
async fn stop_compute(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Branch> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    Ok(Json(s.engine.stop_compute(&name).await?))
}

#[derive(Deserialize)]
struct ConnectionStringQuery {
    database: Option<String>,
    #[serde(default)]
    source_password: bool,
}

#[utoipa::path(get, path = "/v1/branches/{name}/connection-string",
    params(("name" = String, Path), ("database" = Option<String>, Query),
        ("source_password" = Option<bool>, Query, description = "production's password too, while the branch follows a physical source (the daemon's token only)")),
    responses((status = 200, body = ConnectionString)))]
async fn connection_string(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(q): Query<ConnectionStringQuery>,
) -> ApiResult<ConnectionString> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    if q.source_password {
        s.engine
            .require_admin(&caller, "reading a source's password")?;
    }
    Ok(Json(
        s.engine
            .connection_string_for(&name, q.database.as_deref(), q.source_password)
            .await?,
    ))
}

#[utoipa::path(post, path = "/v1/init", request_body = InitRequest,
    responses((status = 200, body = Operation)))]
async fn init(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<InitRequest>,
) -> ApiResult<Operation> {
    s.engine.require_admin(&caller, "creating a root branch")?;
    Ok(Json(s.engine.init(&req).await?))
}

#[utoipa::path(get, path = "/v1/operations/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Operation)))]
async fn operation(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Operation> {
    let op = s.engine.operation(&id)?;
    // An operation's result carries its branch's connection string.
    if let Some(b) = &op.branch {
        s.engine.authorize(&caller, &b.name, Access::Use)?;
    }
    Ok(Json(op))
}

#[utoipa::path(post, path = "/v1/shutdown", responses((status = 200, body = Object)))]
async fn shutdown(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<serde_json::Value> {
    s.engine.require_admin(&caller, "stopping the daemon")?;
    let _ = s.shutdown.send(true);
    Ok(Json(serde_json::json!({ "shutting_down": true })))
}

#[utoipa::path(post, path = "/v1/anonymized-branches", request_body = AnonymizeRequest,
    responses((status = 200, body = Operation), (status = 400, body = ApiError), (status = 403, body = ApiError)))]
async fn anonymize(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(mut req): Json<AnonymizeRequest>,
) -> ApiResult<Operation> {
    req.parent = Some(parent_for(&s.engine, &caller, req.parent.take())?);
    Ok(Json(s.engine.anonymize(&req).await?))
}

#[utoipa::path(post, path = "/v1/branches/{name}/reanonymize", params(("name" = String, Path)),
    responses((status = 200, body = Operation), (status = 400, body = ApiError)))]
async fn reanonymize(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Operation> {
    s.engine.authorize(&caller, &name, Access::Use)?;
    Ok(Json(s.engine.reanonymize(&name).await?))
}

#[utoipa::path(post, path = "/v1/tokens", request_body = CreateTokenRequest,
    responses((status = 200, body = Token), (status = 403, body = ApiError)))]
async fn create_token(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<CreateTokenRequest>,
) -> ApiResult<Token> {
    s.engine.require_admin(&caller, "creating tokens")?;
    Ok(Json(s.engine.create_token(&req).await?))
}

#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = [Token])))]
async fn list_tokens(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Vec<Token>> {
    s.engine.require_admin(&caller, "listing tokens")?;
    Ok(Json(s.engine.list_tokens()?))
}

#[utoipa::path(delete, path = "/v1/tokens/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Object)))]
async fn delete_token(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    s.engine.require_admin(&caller, "deleting tokens")?;
    s.engine.delete_token(&name)?;
    Ok(Json(serde_json::json!({ "deleted": name })))
}

// ----- sources ------------------------------------------------------------------------------

#[utoipa::path(get, path = "/v1/sources", responses((status = 200, body = Vec<Source>)))]
async fn list_sources(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Vec<Source>> {
    s.engine.require_admin(&caller, "reading sources")?;
    Ok(Json(s.engine.list_sources().await?))
}

#[utoipa::path(post, path = "/v1/sources", request_body = AddSourceRequest,
    responses((status = 200, body = Source), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
async fn add_source(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<AddSourceRequest>,
) -> ApiResult<Source> {
    s.engine.require_admin(&caller, "adding a source")?;
    Ok(Json(s.engine.add_source(&req).await?))
}

#[utoipa::path(get, path = "/v1/sources/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Source), (status = 404, body = ApiError)))]
async fn get_source(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Source> {
    s.engine.require_admin(&caller, "reading sources")?;
    Ok(Json(s.engine.source_status(&name).await?))
}

#[utoipa::path(post, path = "/v1/sources/{name}/refresh", params(("name" = String, Path)),
    responses((status = 200, body = Source), (status = 400, body = ApiError)))]
async fn refresh_source(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<Source> {
    s.engine.require_admin(&caller, "refreshing a source")?;
    Ok(Json(s.engine.refresh_source(&name).await?))
}

#[utoipa::path(delete, path = "/v1/sources/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Object), (status = 409, body = ApiError)))]
async fn remove_source(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> ApiResult<serde_json::Value> {
    s.engine.require_admin(&caller, "removing a source")?;
    s.engine.remove_source(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })))
}
