//! The control API's side of the audit log: what each request is (action and resource),
//! recording every decision before the handler runs, and the routes that read the log.
//!
//! A request is recorded before it is answered, allowed or denied; if the record cannot be
//! written, the request is refused with 503 and nothing is done (as Vault's audit devices
//! fail closed). `GET /v1/health` alone is not recorded, so a load balancer's probe does
//! not fill the log.

use std::sync::Arc;

use axum::http::Method;
use maru_api::{AuditCheckpoint, AuditEntries, AuditEntry};
use policy::audit::{AuditError, AuditLog, Decision, Entry, Event, Kind};

/// What a request does and to what, from its method and route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub name: &'static str,
    pub resource: String,
}

/// The action a request to `route` (the router's path pattern) with `method` is, and its
/// resource from the path's parameters. `None` for requests that are not recorded.
pub fn action(method: &Method, route: Option<&str>, params: &[(String, String)]) -> Option<Action> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map_or("", |(_, v)| v.as_str())
            .to_string()
    };
    let (name, resource) = match (method.as_str(), route.unwrap_or("")) {
        ("GET", "/v1/health") => return None,
        ("GET", "/v1/apps") => ("apps.list", "node".into()),
        ("POST", "/v1/apps") => ("apps.deploy", "node".into()),
        ("DELETE", "/v1/apps/{app}") => ("apps.remove", format!("app/{}", param("app"))),
        ("POST", "/v1/apps/{app}/rollback") => ("apps.rollback", format!("app/{}", param("app"))),
        ("GET", "/v1/services") => ("services.list", "node".into()),
        ("GET", "/v1/nodes") => ("nodes.list", "node".into()),
        ("PUT", "/v1/nodes/{node}/drain") => ("nodes.drain", format!("node/{}", param("node"))),
        ("DELETE", "/v1/nodes/{node}/drain") => {
            ("nodes.undrain", format!("node/{}", param("node")))
        }
        ("GET", "/v1/anomalies") => ("anomalies.list", "node".into()),
        ("GET", "/v1/logs/{app}/{service}") => (
            "logs.read",
            format!("service/{}/{}", param("app"), param("service")),
        ),
        ("GET", "/v1/history/{app}/{service}") => (
            "history.read",
            format!("service/{}/{}", param("app"), param("service")),
        ),
        ("PUT", "/v1/blobs/{hash}") => ("blobs.upload", format!("blob/{}", param("hash"))),
        ("HEAD", "/v1/blobs/{hash}") => ("blobs.check", format!("blob/{}", param("hash"))),
        ("GET", "/v1/events") => ("events.list", "node".into()),
        ("GET", "/v1/events/{topic}") => ("events.read", format!("topic/{}", param("topic"))),
        ("GET", "/v1/store/status") => ("store.status", "store".into()),
        ("GET", "/v1/store/keys") => ("store.keys.list", "store".into()),
        ("POST", "/v1/store/keys") => ("store.keys.create", "store".into()),
        ("DELETE", "/v1/store/keys/{id}") => {
            ("store.keys.revoke", format!("store-key/{}", param("id")))
        }
        ("POST", "/v1/store/scrub") => ("store.scrub", "store".into()),
        ("POST", "/v1/store/rotate-key") => ("store.rotate-key", "store".into()),
        ("GET", "/v1/audit") => ("audit.read", "audit".into()),
        ("GET", "/v1/audit/checkpoint") => ("audit.checkpoint", "audit".into()),
        ("GET", "/metrics") => ("metrics.read", "node".into()),
        ("POST", "/v1/admin/init") => ("admin.init", "node".into()),
        ("GET", "/v1/policy") => ("policy.read", "node".into()),
        ("PUT", "/v1/policy") => ("policy.set", "node".into()),
        ("POST", "/v1/policy/test") => ("policy.test", "node".into()),
        ("POST", "/v1/operators") => ("operators.create", "node".into()),
        ("POST", "/v1/login") => ("login", "node".into()),
        ("POST", "/v1/logout") => ("logout", "node".into()),
        ("GET", "/v1/whoami") => ("whoami", "node".into()),
        ("GET", "/v1/tokens") => ("tokens.list", "node".into()),
        ("POST", "/v1/tokens") => ("tokens.create", "node".into()),
        ("DELETE", "/v1/tokens/{id}") => ("tokens.revoke", format!("token/{}", param("id"))),
        // A method a route does not serve, or no route: recorded as what was asked.
        (_, "") => ("unknown", "node".into()),
        (_, _) => ("unsupported-method", "node".into()),
    };
    Some(Action { name, resource })
}

/// Record a decision; the caller refuses the request if this fails.
pub async fn record(
    audit: &Arc<AuditLog>,
    action: &Action,
    actor: String,
    decision: Decision,
    reason: &str,
    address: Option<String>,
) -> Result<u64, AuditError> {
    let event = Event {
        kind: Kind::Action,
        actor,
        action: action.name.to_string(),
        resource: action.resource.clone(),
        decision,
        reason: reason.to_string(),
        address,
        details: serde_json::Map::new(),
    };
    let audit = audit.clone();
    tokio::task::spawn_blocking(move || audit.append(event))
        .await
        .map_err(|e| AuditError::Unavailable(format!("the audit task failed: {e}")))?
}

/// The filters of `GET /v1/audit`.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Query {
    /// Only entries after this number.
    #[serde(default)]
    pub after: u64,
    /// At most this many (the newest); default 100, at most 10,000.
    pub limit: Option<usize>,
    pub actor: Option<String>,
    /// An action, or a prefix ending in `.` (`store.`).
    pub action: Option<String>,
    /// A resource, or a prefix ending in `/` (`app/`).
    pub resource: Option<String>,
    /// `allow`, `deny` or `note`.
    pub decision: Option<String>,
}

fn matches(filter: &Option<String>, value: &str, separator: char) -> bool {
    filter
        .as_deref()
        .is_none_or(|f| f == value || (f.ends_with(separator) && value.starts_with(f)))
}

/// The lowercase name serde gives a unit enum value (`allow`, `action`).
fn name<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn wire(entry: Entry) -> AuditEntry {
    AuditEntry {
        seq: entry.seq,
        unix_ms: entry.time_ms,
        kind: name(&entry.event.kind),
        actor: entry.event.actor,
        action: entry.event.action,
        resource: entry.event.resource,
        decision: name(&entry.event.decision),
        reason: entry.event.reason,
        address: entry.event.address,
        details: entry.event.details,
    }
}

/// `GET /v1/audit`.
pub async fn entries(audit: Arc<AuditLog>, query: Query) -> Result<AuditEntries, AuditError> {
    let limit = query.limit.unwrap_or(100).clamp(1, 10_000);
    tokio::task::spawn_blocking(move || {
        let newest_seq = audit.durable_seq();
        let found = audit.entries(query.after, limit, |e| {
            matches(&query.actor, &e.event.actor, ':')
                && matches(&query.action, &e.event.action, '.')
                && matches(&query.resource, &e.event.resource, '/')
                && query
                    .decision
                    .as_deref()
                    .is_none_or(|d| name(&e.event.decision) == d)
        })?;
        Ok(AuditEntries {
            entries: found.into_iter().map(wire).collect(),
            newest_seq,
        })
    })
    .await
    .map_err(|e| AuditError::Unavailable(format!("the audit task failed: {e}")))?
}

/// `GET /v1/audit/checkpoint`.
pub async fn checkpoint(audit: Arc<AuditLog>) -> Result<Option<AuditCheckpoint>, AuditError> {
    tokio::task::spawn_blocking(move || {
        Ok(audit.latest_checkpoint()?.map(|c| AuditCheckpoint {
            seq: c.seq,
            hash: c.hash,
            time_ms: c.time_ms,
            public_key: c.public_key,
            signature: c.signature,
        }))
    })
    .await
    .map_err(|e| AuditError::Unavailable(format!("the audit task failed: {e}")))?
}

/// Sign a checkpoint every `every` while entries arrive, and once more at shutdown.
pub async fn checkpoints(
    audit: Arc<AuditLog>,
    every: std::time::Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        let stop = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tick.tick() => false,
        };
        let signer = audit.clone();
        if let Ok(Err(error)) = tokio::task::spawn_blocking(move || signer.checkpoint()).await {
            tracing::warn!(%error, "could not sign an audit checkpoint");
        }
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_and_method_names_an_action() {
        let params = vec![
            ("app".to_string(), "traffic".to_string()),
            ("service".to_string(), "signals".to_string()),
            ("topic".to_string(), "loops".to_string()),
            ("id".to_string(), "MARUKEY".to_string()),
            ("hash".to_string(), "abc".to_string()),
            ("node".to_string(), "n2".to_string()),
        ];
        for route in crate::api::ROUTES {
            for method in [
                Method::GET,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::HEAD,
            ] {
                let found = action(&method, Some(route), &params);
                if *route == "/v1/health" && method == Method::GET {
                    assert_eq!(found, None);
                } else {
                    let found = found.expect("recorded");
                    assert!(!found.name.is_empty() && !found.resource.is_empty());
                }
            }
        }
        assert_eq!(
            action(&Method::DELETE, Some("/v1/apps/{app}"), &params),
            Some(Action {
                name: "apps.remove",
                resource: "app/traffic".into()
            })
        );
        assert_eq!(
            action(&Method::GET, None, &[]).map(|a| a.name),
            Some("unknown")
        );
    }

    #[test]
    fn filters_match_whole_values_or_prefixes() {
        assert!(matches(&None, "x", '.'));
        assert!(matches(&Some("store.".into()), "store.keys.create", '.'));
        assert!(!matches(&Some("store".into()), "store.keys.create", '.'));
        assert!(matches(&Some("app/".into()), "app/traffic", '/'));
        assert!(!matches(&Some("app/t".into()), "app/traffic", '/'));
    }
}
