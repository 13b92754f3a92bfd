//! Operators, logins and tokens over the control API (docs/api.md, docs/policy.md).

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maru_api::{
    CreateOperatorRequest, CreateTokenRequest, Enrolment, LoginRequest, TokenInfo, WhoAmI,
};
use policy::audit::{AuditLog, Decision, Event, Kind};
use policy::identity::{Identities, IdentityError, TokenRecord};

use crate::authz::Caller;

/// An identity error as the API answers it.
pub fn answer(error: IdentityError) -> Response {
    let (status, code) = match &error {
        IdentityError::BadCredentials => (StatusCode::UNAUTHORIZED, "unauthorized"),
        IdentityError::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "throttled"),
        IdentityError::AlreadyInitialised => (StatusCode::CONFLICT, "conflict"),
        IdentityError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        IdentityError::MoreRightsThanCreator(_) => (StatusCode::FORBIDDEN, "forbidden"),
        IdentityError::NoSuchToken(_) => (StatusCode::NOT_FOUND, "not_found"),
        IdentityError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    let mut response = crate::api::error(status, code, &error.to_string(), None);
    if let IdentityError::Throttled { retry_after_ms } = error
        && let Ok(value) = retry_after_ms.div_ceil(1000).to_string().parse()
    {
        response.headers_mut().insert("retry-after", value);
    }
    response
}

fn wire(record: TokenRecord, token: Option<String>) -> TokenInfo {
    TokenInfo {
        id: record.id,
        token,
        subject: record.subject,
        roles: record.roles,
        created_unix_ms: record.created_ms,
        expires_unix_ms: record.expires_ms,
        revoked: record.revoked,
        description: record.description,
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, IdentityError> + Send + 'static,
) -> Result<T, IdentityError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| IdentityError::Storage(format!("an identity task failed: {e}")))?
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8], shape: &str) -> Result<T, IdentityError> {
    serde_json::from_slice(body)
        .map_err(|e| IdentityError::BadRequest(format!("the request is not a {shape}: {e}")))
}

/// `POST /v1/admin/init`: the first operator, an admin, once.
pub async fn admin_init(identities: Arc<Identities>, body: &[u8]) -> Response {
    let request: CreateOperatorRequest = match parse(body, "CreateOperatorRequest") {
        Ok(r) => r,
        Err(e) => return answer(e),
    };
    create(identities, request, vec!["admin".into()], true).await
}

/// `POST /v1/operators`: another operator, by an admin.
pub async fn create_operator(identities: Arc<Identities>, body: &[u8]) -> Response {
    let request: CreateOperatorRequest = match parse(body, "CreateOperatorRequest") {
        Ok(r) => r,
        Err(e) => return answer(e),
    };
    let roles = request.roles.clone();
    create(identities, request, roles, false).await
}

async fn create(
    identities: Arc<Identities>,
    request: CreateOperatorRequest,
    roles: Vec<String>,
    first: bool,
) -> Response {
    let name = request.name.clone();
    let granted = roles.clone();
    match blocking(move || {
        identities.create_operator(&request.name, &request.password, &roles, first)
    })
    .await
    {
        Ok(enrolment) => (
            StatusCode::CREATED,
            axum::Json(Enrolment {
                name,
                roles: granted,
                otpauth_url: enrolment.otpauth_url,
                secret: enrolment.secret_base32,
            }),
        )
            .into_response(),
        Err(e) => answer(e),
    }
}

/// `POST /v1/login`: name, password and TOTP code for a token. Recorded in the audit log
/// (the password and code never are); refused with 503 if the record cannot be written.
pub async fn login(
    identities: Arc<Identities>,
    audit: Arc<AuditLog>,
    address: Option<String>,
    body: &[u8],
) -> Response {
    let request: LoginRequest = match parse(body, "LoginRequest") {
        Ok(r) => r,
        Err(e) => return answer(e),
    };
    let name = request.name.clone();
    let from = address.clone().unwrap_or_default();
    let outcome = blocking(move || {
        identities.login(
            &request.name,
            &request.password,
            &request.code,
            &from,
            request.ttl_seconds.map(|s| s.saturating_mul(1000)),
        )
    })
    .await;
    let (decision, reason) = match &outcome {
        Ok(issued) => (
            Decision::Allow,
            format!("password and TOTP code; token {}", issued.record.id),
        ),
        Err(e) => (Decision::Deny, e.to_string()),
    };
    let mut actor = format!("operator:{name}");
    if policy::identity::check_name(&name).is_err() {
        // Whatever was typed as a name is not echoed into the log as is.
        actor = format!("operator:{}", audit.redact(&name));
    }
    let event = Event {
        kind: Kind::Action,
        actor,
        action: "login".into(),
        resource: "node".into(),
        decision,
        reason,
        address,
        details: serde_json::Map::new(),
    };
    let recorder = audit.clone();
    let recorded = tokio::task::spawn_blocking(move || recorder.append(event)).await;
    if !matches!(recorded, Ok(Ok(_))) {
        // A token issued but not on record is never handed out (nobody holds it).
        return crate::api::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "audit_unavailable",
            "the audit log cannot be written, so the login is refused",
            None,
        );
    }
    match outcome {
        Ok(issued) => axum::Json(wire(issued.record, Some(issued.token))).into_response(),
        Err(e) => answer(e),
    }
}

pub fn whoami(caller: &Caller) -> Response {
    let Some(principal) = caller.principal() else {
        return answer(IdentityError::BadCredentials);
    };
    axum::Json(WhoAmI {
        subject: principal.subject.clone(),
        roles: principal.roles.clone(),
        token_id: principal.token_id.clone(),
        expires_unix_ms: principal.expires_ms,
    })
    .into_response()
}

/// `POST /v1/logout`: revoke the caller's own token.
pub async fn logout(identities: Arc<Identities>, caller: &Caller) -> Response {
    let Some(id) = caller.principal().and_then(|p| p.token_id.clone()) else {
        return answer(IdentityError::BadRequest(
            "the node's bootstrap token cannot log out; it stops working after `maru admin init`"
                .into(),
        ));
    };
    match blocking(move || identities.revoke(&id)).await {
        Ok(record) => axum::Json(wire(record, None)).into_response(),
        Err(e) => answer(e),
    }
}

pub async fn list_tokens(identities: Arc<Identities>) -> Response {
    match blocking(move || identities.tokens()).await {
        Ok(records) => axum::Json(
            records
                .into_iter()
                .map(|r| wire(r, None))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => answer(e),
    }
}

pub async fn create_token(identities: Arc<Identities>, caller: &Caller, body: &[u8]) -> Response {
    let request: CreateTokenRequest = match parse(body, "CreateTokenRequest") {
        Ok(r) => r,
        Err(e) => return answer(e),
    };
    let Some(creator) = caller.principal().cloned() else {
        return answer(IdentityError::BadCredentials);
    };
    match blocking(move || {
        identities.create_machine_token(
            &creator,
            &request.name,
            &request.roles,
            request.ttl_seconds.saturating_mul(1000),
            &request.description,
        )
    })
    .await
    {
        Ok(issued) => (
            StatusCode::CREATED,
            axum::Json(wire(issued.record, Some(issued.token))),
        )
            .into_response(),
        Err(e) => answer(e),
    }
}

pub async fn revoke_token(identities: Arc<Identities>, id: String) -> Response {
    match blocking(move || identities.revoke(&id)).await {
        Ok(record) => axum::Json(wire(record, None)).into_response(),
        Err(e) => answer(e),
    }
}
