//! The control API: HTTP/JSON, every route behind the bearer token. docs/api.md documents it.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequestParts as _, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post, put};
use maru_api::{
    ApiError, DeployRequest, ErrorBody, LogLine, LogsResponse, ManifestLocation, RemoveResponse,
    RollbackResponse,
};
use runtime::{ArtifactError, ComponentHash};
use serde::Deserialize;

use crate::authz::Caller;
use crate::node::{ControlError, Node};
use crate::state::StateError;
use crate::token;

/// Largest component upload accepted.
pub const BLOB_BYTES_MAX: usize = 256 << 20;

#[derive(Clone)]
struct Ctx {
    node: Arc<Node>,
    token: Arc<str>,
    audit: Arc<policy::audit::AuditLog>,
    identities: Arc<policy::identity::Identities>,
    policies: Arc<policy::authz::Policies>,
    data: Arc<std::path::Path>,
}

/// What guards the API: the audit log, identities and the Cedar policies (with the data
/// directory, where `maru policy set` keeps them).
pub struct Guards {
    pub audit: Arc<policy::audit::AuditLog>,
    pub identities: Arc<policy::identity::Identities>,
    pub policies: Arc<policy::authz::Policies>,
    pub data: std::path::PathBuf,
}

/// Every path the API serves. The router is built from this list, so a test that walks it
/// covers every route, including ones added later.
pub const ROUTES: &[&str] = &[
    "/v1/health",
    "/v1/apps",
    "/v1/apps/{app}",
    "/v1/apps/{app}/rollback",
    "/v1/services",
    "/v1/nodes",
    "/v1/nodes/{node}/drain",
    "/v1/anomalies",
    "/v1/logs/{app}/{service}",
    "/v1/history/{app}/{service}",
    "/v1/blobs/{hash}",
    "/v1/events",
    "/v1/events/{topic}",
    "/v1/store/status",
    "/v1/store/keys",
    "/v1/store/keys/{id}",
    "/v1/store/scrub",
    "/v1/store/rotate-key",
    "/v1/audit",
    "/v1/audit/checkpoint",
    "/v1/admin/init",
    "/v1/operators",
    "/v1/login",
    "/v1/logout",
    "/v1/whoami",
    "/v1/tokens",
    "/v1/tokens/{id}",
    "/v1/policy",
    "/v1/policy/test",
    "/metrics",
];

/// The handlers of one of [`ROUTES`].
fn handlers(path: &str) -> MethodRouter<Ctx> {
    match path {
        "/v1/health" => get(|| async { axum::Json(serde_json::json!({ "status": "ok" })) }),
        "/v1/apps" => get(list_apps).post(deploy),
        "/v1/apps/{app}" => axum::routing::delete(remove_app),
        "/v1/apps/{app}/rollback" => post(rollback),
        "/v1/services" => get(list_services),
        "/v1/nodes" => get(|State(ctx): State<Ctx>| async move { json(&ctx.node.nodes()) }),
        "/v1/nodes/{node}/drain" => put(
            |State(ctx): State<Ctx>, Path(node): Path<String>| async move {
                ctx.node.drain(&node, true).await.map(|()| StatusCode::NO_CONTENT)
            },
        )
        .delete(
            |State(ctx): State<Ctx>, Path(node): Path<String>| async move {
                ctx.node.drain(&node, false).await.map(|()| StatusCode::NO_CONTENT)
            },
        ),
        "/v1/anomalies" => get(|State(ctx): State<Ctx>| async move { json(&ctx.node.anomalies()) }),
        "/v1/logs/{app}/{service}" => get(logs),
        "/v1/history/{app}/{service}" => get(history),
        "/v1/blobs/{hash}" => put(put_blob)
            .head(head_blob)
            .layer(DefaultBodyLimit::max(BLOB_BYTES_MAX)),
        "/v1/events" => get(list_topics),
        "/v1/events/{topic}" => get(read_events),
        "/v1/store/status" => get(|State(ctx): State<Ctx>| async move {
            crate::store_api::status(ctx.node.store.clone(), ctx.node.s3_endpoint())
                .await
                .map(|s| json(&s))
        }),
        "/v1/store/keys" => get(|State(ctx): State<Ctx>| async move {
            crate::store_api::list_keys(ctx.node.store.clone())
                .await
                .map(|k| json(&k))
        })
        .post(create_key),
        "/v1/store/keys/{id}" => axum::routing::delete(
            |State(ctx): State<Ctx>, Path(id): Path<String>| async move {
                crate::store_api::revoke_key(ctx.node.store.clone(), id)
                    .await
                    .map(|()| StatusCode::NO_CONTENT)
            },
        ),
        "/v1/store/scrub" => post(|State(ctx): State<Ctx>| async move {
            crate::store_api::scrub(ctx.node.store.clone(), ctx.node.s3_endpoint())
                .await
                .map(|s| json(&s))
        }),
        "/v1/store/rotate-key" => post(|State(ctx): State<Ctx>| async move {
            crate::store_api::rotate_key(ctx.node.store.clone())
                .await
                .map(|r| json(&r))
        }),
        "/v1/audit" => get(
            |State(ctx): State<Ctx>, Query(query): Query<crate::audit_api::Query>| async move {
                crate::audit_api::entries(ctx.audit.clone(), query)
                    .await
                    .map(|e| json(&e))
                    .map_err(audit_unavailable)
            },
        ),
        "/v1/audit/checkpoint" => get(|State(ctx): State<Ctx>| async move {
            match crate::audit_api::checkpoint(ctx.audit.clone()).await {
                Ok(Some(checkpoint)) => json(&checkpoint),
                Ok(None) => error(
                    StatusCode::NOT_FOUND,
                    "not_found",
                    "the audit log has no entries to sign yet",
                    None,
                ),
                Err(e) => audit_unavailable(e),
            }
        }),
        "/v1/admin/init" => post(|State(ctx): State<Ctx>, body: Bytes| async move {
            crate::identity_api::admin_init(ctx.identities.clone(), &body).await
        }),
        "/v1/operators" => post(|State(ctx): State<Ctx>, body: Bytes| async move {
            crate::identity_api::create_operator(ctx.identities.clone(), &body).await
        }),
        "/v1/login" => post(
            |State(ctx): State<Ctx>,
             peer: Option<axum::Extension<crate::listener::PeerAddress>>,
             body: Bytes| async move {
                let address = peer.map(|p| p.0.0.ip().to_string());
                crate::identity_api::login(
                    ctx.identities.clone(),
                    ctx.audit.clone(),
                    address,
                    &body,
                )
                .await
            },
        ),
        "/v1/logout" => post(
            |State(ctx): State<Ctx>, axum::Extension(caller): axum::Extension<Caller>| async move {
                let answer = crate::identity_api::logout(ctx.identities.clone(), &caller).await;
                ctx.node.data.invalidate();
                answer
            },
        ),
        "/v1/whoami" => get(
            |axum::Extension(caller): axum::Extension<Caller>| async move {
                crate::identity_api::whoami(&caller)
            },
        ),
        "/v1/tokens" => get(|State(ctx): State<Ctx>| async move {
            crate::identity_api::list_tokens(ctx.identities.clone()).await
        })
        .post(
            |State(ctx): State<Ctx>,
             axum::Extension(caller): axum::Extension<Caller>,
             body: Bytes| async move {
                crate::identity_api::create_token(ctx.identities.clone(), &caller, &body).await
            },
        ),
        "/v1/tokens/{id}" => axum::routing::delete(
            |State(ctx): State<Ctx>, Path(id): Path<String>| async move {
                let answer = crate::identity_api::revoke_token(ctx.identities.clone(), id).await;
                // Producers holding the token find out at their next publish.
                ctx.node.data.invalidate();
                answer
            },
        ),
        "/v1/policy" => get(|State(ctx): State<Ctx>| async move { ctx.policies.text() }).put(
            |State(ctx): State<Ctx>, body: Bytes| async move {
                let Ok(text) = String::from_utf8(body.to_vec()) else {
                    return error(StatusCode::BAD_REQUEST, "bad_request", "the policies are not UTF-8", None);
                };
                let (policies, data) = (ctx.policies.clone(), ctx.data.clone());
                let digest = blake3::hash(text.as_bytes()).to_hex().to_string();
                let result = tokio::task::spawn_blocking(move || {
                    crate::authz::set(&disk::Env::os(), &data, &policies, &text)
                })
                .await;
                // The outcome is recorded too: which text (by hash) became active, or why
                // it was refused.
                let mut details = serde_json::Map::new();
                details.insert("policies_blake3".into(), digest.into());
                let outcome = policy::audit::Event {
                    kind: policy::audit::Kind::Action,
                    actor: "maru".into(),
                    action: "policy.set".into(),
                    resource: "node".into(),
                    decision: policy::audit::Decision::Note,
                    reason: match &result {
                        Ok(Ok(())) => "the new policies are active".into(),
                        Ok(Err(message)) => format!("refused: {}", message.lines().next().unwrap_or("")),
                        Err(e) => format!("failed: {e}"),
                    },
                    address: None,
                    details,
                };
                if matches!(result, Ok(Ok(()))) {
                    // Running triggers, key-value guards and producers decide again.
                    ctx.node.data.invalidate();
                }
                let audit = ctx.audit.clone();
                if !matches!(tokio::task::spawn_blocking(move || audit.append(outcome)).await, Ok(Ok(_))) {
                    tracing::error!("the outcome of a policy change could not be recorded in the audit log");
                }
                match result {
                    Ok(Ok(())) => StatusCode::NO_CONTENT.into_response(),
                    Ok(Err(message)) => error(
                        StatusCode::BAD_REQUEST,
                        "bad_policy",
                        &message,
                        Some("the policies must validate strictly against Maru's schema (docs/policy.md); nothing was changed".into()),
                    ),
                    Err(e) => internal(format!("setting the policies failed: {e}")),
                }
            },
        ),
        "/v1/policy/test" => post(|State(ctx): State<Ctx>, body: Bytes| async move {
            let request: maru_api::PolicyTestRequest = match serde_json::from_slice(&body) {
                Ok(request) => request,
                Err(e) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        &format!("the request is not a PolicyTestRequest: {e}"),
                        None,
                    );
                }
            };
            let principal = policy::identity::Principal {
                subject: request.subject.clone(),
                roles: request.roles.clone(),
                token_id: None,
                expires_ms: None,
            };
            let decided = match policy::data::DataAction::from_name(&request.action) {
                // A data action: on a deployed dataset, by a deployed service or a caller.
                Some(action) => {
                    let Some(dataset) = ctx.node.dataset(&request.resource) else {
                        return error(
                            StatusCode::NOT_FOUND,
                            "unknown_dataset",
                            &format!("no deployed dataset is {}", request.resource),
                            Some("name a deployed topic (topic/NAME) or key-value bucket (kv/APP/NAME)".into()),
                        );
                    };
                    let service = request
                        .subject
                        .strip_prefix("service:")
                        .and_then(|s| s.split_once('/'))
                        .map(|(app, service)| (app.to_string(), service.to_string()));
                    let principal_of_service = match &service {
                        Some((app, name)) => match ctx.node.service_principal(app, name) {
                            Some(found) => Some(found),
                            None => {
                                return error(
                                    StatusCode::NOT_FOUND,
                                    "unknown_service",
                                    &format!("no running service is {app}/{name}"),
                                    Some("`maru ps` lists the services".into()),
                                );
                            }
                        },
                        None => None,
                    };
                    let actor = match &principal_of_service {
                        Some(service) => policy::data::Actor::Service(service),
                        None => policy::data::Actor::Caller(&principal),
                    };
                    ctx.policies.decide_data_under(
                        request.policies.as_deref(),
                        &actor,
                        action,
                        &dataset,
                        ctx.node.data.node(),
                    )
                }
                None => ctx.policies.decide_under(
                    request.policies.as_deref(),
                    &principal,
                    &request.action,
                    &request.resource,
                ),
            };
            match decided {
                Ok(decision) => json(&maru_api::PolicyDecision {
                    allowed: decision.allowed,
                    reason: decision.reason(),
                    policies: decision.policies,
                    errors: decision.errors,
                }),
                Err(e) => error(StatusCode::BAD_REQUEST, "bad_policy", &e.to_string(), None),
            }
        }),
        "/metrics" => get(metrics),
        other => panic!("ROUTES lists {other} but no handlers are given for it"),
    }
}

pub fn router(node: Arc<Node>, token: String, guards: Guards) -> Router {
    let ctx = Ctx {
        node,
        token: token.into(),
        audit: guards.audit,
        identities: guards.identities,
        policies: guards.policies,
        data: guards.data.into(),
    };
    ROUTES
        .iter()
        .fold(Router::new(), |router, path| {
            router.route(path, handlers(path))
        })
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such API route",
                Some("see docs/api.md".into()),
            )
        })
        .layer(middleware::from_fn_with_state(ctx.clone(), authenticate))
        .with_state(ctx)
}

/// The request's bearer token, checked, then the decision recorded in the audit log before
/// the handler runs (crate::audit_api).
async fn authenticate(State(ctx): State<Ctx>, request: Request, next: Next) -> Response {
    let (mut parts, body) = request.into_parts();
    let params: Vec<(String, String)> =
        axum::extract::RawPathParams::from_request_parts(&mut parts, &ctx)
            .await
            .map(|p| {
                p.iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .unwrap_or_default();
    let route = parts
        .extensions
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string());
    let address = parts
        .extensions
        .get::<crate::listener::PeerAddress>()
        .map(|p| p.0.ip().to_string());
    let request = Request::from_parts(parts, body);
    let action = crate::audit_api::action(request.method(), route.as_deref(), &params);
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let caller = match given {
        Some(given) if token::matches(&ctx.token, given) => {
            let identities = ctx.identities.clone();
            match tokio::task::spawn_blocking(move || identities.initialised()).await {
                Ok(Ok(false)) => Caller::Known(policy::identity::Principal {
                    subject: "bootstrap".into(),
                    roles: vec!["admin".into()],
                    token_id: None,
                    expires_ms: None,
                }),
                Ok(Ok(true)) => Caller::RetiredBootstrap,
                _ => return internal("the identity database cannot be read".into()),
            }
        }
        Some(given) => {
            let identities = ctx.identities.clone();
            let given = given.to_string();
            match tokio::task::spawn_blocking(move || identities.authenticate(&given)).await {
                Ok(Ok(Some(principal))) => Caller::Known(principal),
                Ok(Ok(None)) => Caller::Unknown,
                _ => return internal("the identity database cannot be read".into()),
            }
        }
        None => Caller::Unknown,
    };
    let actor = match (&caller, given) {
        (Caller::Known(principal), _) => match &principal.token_id {
            Some(id) => format!("{} ({id})", principal.subject),
            None => format!("token:{}", ctx.audit.redact(given.unwrap_or_default())),
        },
        (_, Some(given)) if !given.is_empty() => format!("token:{}", ctx.audit.redact(given)),
        _ => "anonymous".to_string(),
    };
    let decision = match &action {
        Some(action) if crate::authz::public(action.name) => Ok(String::new()),
        Some(action) => crate::authz::decide(&ctx.policies, &caller, action.name, &action.resource),
        None if matches!(caller, Caller::Unknown) => Err((401, "no valid bearer token".into())),
        None => Ok(String::new()),
    };
    if let Some(action) = action.as_ref().filter(|a| !crate::authz::public(a.name)) {
        let (verdict, reason) = match &decision {
            Ok(reason) => (policy::audit::Decision::Allow, reason.as_str()),
            Err((_, reason)) => (policy::audit::Decision::Deny, reason.as_str()),
        };
        if let Err(e) =
            crate::audit_api::record(&ctx.audit, action, actor, verdict, reason, address).await
        {
            return audit_unavailable(e);
        }
    }
    if let Err((status, reason)) = decision {
        if status == 403 {
            return error(
                StatusCode::FORBIDDEN,
                "forbidden",
                &reason,
                Some(
                    "docs/policy.md lists what each role may do; `maru whoami` shows yours".into(),
                ),
            );
        }
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
            Some("log in with `maru login`, or send `Authorization: Bearer <token>` (before `maru admin init`, the node's bootstrap token in DATA/token)".into()),
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let mut request = request;
    request.extensions_mut().insert(caller);
    next.run(request).await
}

fn audit_unavailable(e: policy::audit::AuditError) -> Response {
    tracing::error!(error = %e, "control API request refused: the audit log cannot be written");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        "audit_unavailable",
        &e.to_string(),
        Some("free space on the data directory's disk or fix its errors; maru's log says what failed (after a failed sync, restart the machine)".into()),
    )
}

pub(crate) fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    hint: Option<String>,
) -> Response {
    let body = ApiError {
        error: ErrorBody {
            status: status.as_u16(),
            code: code.into(),
            message: message.into(),
            location: None,
            hint,
        },
    };
    (status, axum::Json(body)).into_response()
}

impl IntoResponse for ControlError {
    fn into_response(self) -> Response {
        match self {
            ControlError::BadManifest(manifest) => {
                let body = ApiError {
                    error: ErrorBody {
                        status: 400,
                        code: "bad_manifest".into(),
                        message: manifest.message.clone(),
                        location: Some(ManifestLocation {
                            file: manifest.file,
                            line: manifest.line,
                            column: manifest.column,
                            field: manifest.field,
                        }),
                        hint: manifest.hint,
                    },
                };
                (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
            }
            ControlError::BadRequest { message, hint } => {
                error(StatusCode::BAD_REQUEST, "bad_request", &message, hint)
            }
            ControlError::Conflict { message, hint } => {
                error(StatusCode::CONFLICT, "conflict", &message, hint)
            }
            ControlError::Forbidden { message, hint } => {
                error(StatusCode::FORBIDDEN, "forbidden", &message, hint)
            }
            ControlError::AuditUnavailable(message) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                &message,
                Some("free space on the data directory's disk or fix its errors; maru's log says what failed (after a failed sync, restart the machine)".into()),
            ),
            ControlError::ClusterUnavailable(message) => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "cluster_unavailable",
                &message,
                Some("the change was not made; try again once the NATS servers answer (`maru nodes` lists the nodes that do)".into()),
            ),
            ControlError::State(StateError::NotFound(app)) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no app named `{app}` is deployed"),
                Some("`maru apps` lists the deployed apps".into()),
            ),
            ControlError::State(nothing @ StateError::NothingToRollBack(_)) => {
                error(StatusCode::CONFLICT, "conflict", &nothing.to_string(), None)
            }
            ControlError::State(other) => internal(other.to_string()),
            ControlError::Internal(message) => internal(message),
        }
    }
}

fn internal(message: String) -> Response {
    tracing::error!(%message, "control API request failed");
    error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        &message,
        None,
    )
}

fn json<T: serde::Serialize>(value: &T) -> Response {
    axum::Json(value).into_response()
}

async fn create_key(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ControlError> {
    let request: maru_api::CreateKeyRequest =
        serde_json::from_slice(&body).map_err(|e| ControlError::BadRequest {
            message: format!("the request is not a CreateKeyRequest: {e}"),
            hint: Some("send {\"buckets\": [\"NAME\"]}; see docs/api.md".into()),
        })?;
    let key = crate::store_api::create_key(ctx.node.store.clone(), request).await?;
    Ok((StatusCode::CREATED, axum::Json(key)).into_response())
}

async fn list_apps(State(ctx): State<Ctx>) -> Result<Response, ControlError> {
    Ok(json(&ctx.node.apps()?))
}

async fn deploy(State(ctx): State<Ctx>, body: Bytes) -> Result<Response, ControlError> {
    let request: DeployRequest =
        serde_json::from_slice(&body).map_err(|e| ControlError::BadRequest {
            message: format!("the deploy request is not valid JSON of the expected shape: {e}"),
            hint: Some("see DeployRequest in docs/api.md".into()),
        })?;
    let response = ctx.node.deploy(request).await?;
    Ok(json(&response))
}

async fn remove_app(
    State(ctx): State<Ctx>,
    Path(app): Path<String>,
) -> Result<Response, ControlError> {
    let services_stopped = ctx.node.remove(&app).await?;
    Ok(json(&RemoveResponse {
        app,
        services_stopped,
    }))
}

async fn rollback(
    State(ctx): State<Ctx>,
    Path(app): Path<String>,
) -> Result<Response, ControlError> {
    let (from, to) = ctx.node.rollback(&app).await?;
    Ok(json(&RollbackResponse { app, from, to }))
}

async fn list_services(State(ctx): State<Ctx>) -> Response {
    json(&ctx.node.services())
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

async fn logs(
    State(ctx): State<Ctx>,
    Path((app, service)): Path<(String, String)>,
    Query(query): Query<LogsQuery>,
) -> Response {
    let Some(log) = ctx.node.log(&app, &service) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no service {app}/{service} has run on this node"),
            Some("`maru ps` lists the services".into()),
        );
    };
    let (lines, next) = log.read(query.after, query.limit.unwrap_or(1000).min(10_000));
    let lines = lines
        .into_iter()
        .map(|l| LogLine {
            sequence: l.sequence,
            unix_ms: l.unix_ms,
            stream: l.stream.as_str().into(),
            text: l.text,
        })
        .collect();
    json(&LogsResponse { lines, next })
}

async fn put_blob(
    State(ctx): State<Ctx>,
    Path(hash): Path<String>,
    body: Bytes,
) -> Result<Response, ControlError> {
    let hash = ComponentHash::parse(&hash).map_err(|e| ControlError::BadRequest {
        message: e.to_string(),
        hint: None,
    })?;
    let cache = ctx.node.files.cache.clone();
    let stored = tokio::task::spawn_blocking(move || cache.put_component(&hash, &body))
        .await
        .map_err(|e| ControlError::Internal(format!("store blob: {e}")))?;
    match stored {
        Ok(()) => Ok(StatusCode::CREATED.into_response()),
        Err(error @ ArtifactError::HashMismatch { .. }) => Err(ControlError::BadRequest {
            message: error.to_string(),
            hint: Some("upload again".into()),
        }),
        Err(other) => Err(ControlError::Internal(other.to_string())),
    }
}

async fn head_blob(State(ctx): State<Ctx>, Path(hash): Path<String>) -> StatusCode {
    match ComponentHash::parse(&hash) {
        Ok(hash) if ctx.node.files.cache.has_component(&hash) => StatusCode::OK,
        Ok(_) => StatusCode::NOT_FOUND,
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ctx.node.metrics_text(),
    )
        .into_response()
}

#[derive(Deserialize)]
struct HistoryQuery {
    resolution: Option<String>,
}

async fn history(
    State(ctx): State<Ctx>,
    Path((app, service)): Path<(String, String)>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    let resolution = query.resolution.unwrap_or_else(|| "seconds".into());
    if resolution != "seconds" && resolution != "minutes" {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("`{resolution}` is not a resolution"),
            Some("use resolution=seconds or resolution=minutes".into()),
        );
    }
    let Some((seconds, minutes)) = ctx.node.history(&app, &service) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no service {app}/{service} is running"),
            Some("`maru ps` lists the services".into()),
        );
    };
    let samples = if resolution == "seconds" {
        seconds
    } else {
        minutes
    };
    let samples = samples
        .into_iter()
        .map(|s| maru_api::HistorySample {
            unix_s: s.unix_s,
            arrivals_per_second: s.arrivals,
            completions_per_second: s.completions,
            in_flight: s.in_flight,
            queued: s.queued,
            latency_ms: s.latency_ms,
            instances: s.instances,
            cold_starts: s.cold_starts,
            startup_ms: s.startup_ms,
        })
        .collect();
    json(&maru_api::HistoryResponse {
        resolution,
        samples,
    })
}

async fn list_topics(State(ctx): State<Ctx>) -> Response {
    json(&ctx.node.topics())
}

#[derive(Deserialize)]
struct EventsQuery {
    /// Default: the last `limit` events.
    from: Option<u64>,
    limit: Option<usize>,
}

async fn read_events(
    State(ctx): State<Ctx>,
    Path(topic): Path<String>,
    Query(query): Query<EventsQuery>,
    axum::Extension(caller): axum::Extension<Caller>,
    peer: Option<axum::Extension<crate::listener::PeerAddress>>,
) -> Response {
    use base64::Engine as _;
    let topic_handle = match ctx.node.events.topic(&topic) {
        Ok(topic) => topic,
        Err(not_open) if not_open.is_transient() => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "topic_unavailable",
                &not_open.to_string(),
                Some("ask again in a few seconds: the node opens it again, and its log says why it could not".into()),
            );
        }
        Err(unknown) => {
            return error(
                StatusCode::NOT_FOUND,
                "unknown_topic",
                &unknown.to_string(),
                Some("`maru events stats` lists the topics".into()),
            );
        }
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    let from = query.from.unwrap_or_else(|| {
        topic_handle
            .next_offset()
            .saturating_sub(limit as u64)
            .max(topic_handle.first_offset())
    });
    // The control decision let the caller read events; the data policy decides this
    // topic (personal data only for some, and every such read recorded).
    if let (Some(dataset), Some(principal)) =
        (ctx.node.topic_dataset(&topic), caller.principal().cloned())
    {
        let guard = ctx.node.data.clone();
        let address = peer.map(|p| p.0.0.ip().to_string());
        let mut details = serde_json::Map::new();
        details.insert("from".into(), from.into());
        details.insert("limit".into(), limit.into());
        let checked = tokio::task::spawn_blocking(move || {
            guard.check(
                &policy::data::Actor::Caller(&principal),
                policy::data::DataAction::TopicConsume,
                &dataset,
                address,
                details,
            )
        })
        .await;
        match checked {
            Ok(Ok(decision)) if decision.allowed => {}
            Ok(Ok(decision)) => {
                return error(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &format!("you may not read topic {topic}: {}", decision.reason()),
                    Some("the node's data policies decide who reads which data (docs/policy.md); personal data is for the services whose purpose it serves".into()),
                );
            }
            Ok(Err(e)) => return audit_unavailable(e),
            Err(e) => return internal(format!("the data policy check failed: {e}")),
        }
    }
    let events = match topic_handle.read(from, limit, 16 << 20).await {
        Ok(events) => events,
        Err(events::ReadError::Expired { first, .. }) => {
            return error(
                StatusCode::GONE,
                "expired",
                &format!("offset {from} of topic {topic} was deleted by retention"),
                Some(format!("read from {first}, the oldest stored offset")),
            );
        }
        Err(unavailable @ events::ReadError::Unavailable { .. }) => {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "topic_unavailable",
                &unavailable.to_string(),
                Some("in a cluster, JetStream may be electing a leader: try again".into()),
            );
        }
        Err(other) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "read_failed",
                &other.to_string(),
                None,
            );
        }
    };
    // Past the last event read, or past offsets that are lost when none was readable.
    let next = events
        .last()
        .map_or_else(|| topic_handle.skip_lost(from), |e| e.offset + 1);
    let events = events
        .into_iter()
        .map(|e| {
            let text = std::str::from_utf8(&e.payload).ok().map(str::to_string);
            maru_api::EventInfo {
                offset: e.offset,
                unix_ms: e.time_ms,
                key: e.key,
                content_type: e.content_type,
                kind: e.kind,
                source: e.source,
                data_base64: text
                    .is_none()
                    .then(|| base64::engine::general_purpose::STANDARD.encode(&e.payload)),
                data: text,
            }
        })
        .collect();
    json(&maru_api::EventsResponse {
        topic,
        events,
        next,
    })
}
