//! Who may do which control action: the caller (from the bearer token) and the decision.
//!
//! Roles grant actions (docs/policy.md): `admin` everything; `deployer` deploys and reads
//! apps, services, logs and events; `viewer` reads them; `auditor` reads the audit log;
//! `metrics` scrapes `/metrics`. Every authenticated caller may ask `whoami` and log out.
//! Anything else is denied.
//!
//! The node's bootstrap token (the `token` file) is an admin until the first operator
//! exists (`maru admin init`); from then on it is refused for everything.

use policy::identity::Principal;

/// Who is asking.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A valid token's owner.
    Known(Principal),
    /// The bootstrap token after `maru admin init`.
    RetiredBootstrap,
    /// No token, or one nobody has (or expired, or revoked).
    Unknown,
}

impl Caller {
    pub fn principal(&self) -> Option<&Principal> {
        match self {
            Caller::Known(principal) => Some(principal),
            _ => None,
        }
    }
}

/// Actions that need no token (their handlers check and record what they need).
pub fn public(action: &str) -> bool {
    action == "login"
}

fn role_grants(role: &str, action: &str) -> bool {
    let reads = [
        "apps.list",
        "services.list",
        "anomalies.list",
        "logs.read",
        "history.read",
        "events.list",
        "events.read",
        "store.status",
        "metrics.read",
    ];
    match role {
        "admin" => true,
        "deployer" => {
            reads.contains(&action)
                || action.starts_with("apps.")
                || action.starts_with("blobs.")
                || action == "tokens.create"
        }
        "viewer" => reads.contains(&action),
        "auditor" => action.starts_with("audit.") || action == "apps.list",
        "metrics" => action == "metrics.read",
        _ => false,
    }
}

/// The decision: allowed, or the HTTP status and reason of the refusal.
pub fn decide(caller: &Caller, action: &str) -> Result<String, (u16, String)> {
    match caller {
        Caller::Unknown => Err((401, "no valid bearer token".into())),
        Caller::RetiredBootstrap => Err((
            403,
            "the node's bootstrap token stopped working when the first operator was created; log in with `maru login`".into(),
        )),
        Caller::Known(principal) => {
            if matches!(action, "whoami" | "logout") {
                return Ok(format!("{} is authenticated", principal.subject));
            }
            match principal.roles.iter().find(|role| role_grants(role, action)) {
                Some(role) => Ok(format!("role {role}")),
                None => Err((
                    403,
                    format!(
                        "{} (roles: {}) may not {action}",
                        principal.subject,
                        principal.roles.join(", ")
                    ),
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(roles: &[&str]) -> Caller {
        Caller::Known(Principal {
            subject: "operator:ana".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            token_id: None,
            expires_ms: None,
        })
    }

    #[test]
    fn roles_grant_their_actions_and_nothing_else() {
        assert!(decide(&caller(&["admin"]), "store.keys.create").is_ok());
        assert!(decide(&caller(&["deployer"]), "apps.deploy").is_ok());
        assert_eq!(
            decide(&caller(&["deployer"]), "store.keys.create").map_err(|e| e.0),
            Err(403)
        );
        assert_eq!(
            decide(&caller(&["viewer"]), "apps.deploy").map_err(|e| e.0),
            Err(403)
        );
        assert!(decide(&caller(&["viewer"]), "apps.list").is_ok());
        assert_eq!(
            decide(&caller(&["metrics"]), "apps.list").map_err(|e| e.0),
            Err(403)
        );
        assert!(decide(&caller(&["auditor"]), "audit.read").is_ok());
        assert_eq!(
            decide(&caller(&["deployer"]), "audit.read").map_err(|e| e.0),
            Err(403)
        );
        assert!(decide(&caller(&["metrics"]), "whoami").is_ok());
        assert_eq!(decide(&caller(&[]), "unknown").map_err(|e| e.0), Err(403));
        assert_eq!(
            decide(&Caller::Unknown, "apps.list").map_err(|e| e.0),
            Err(401)
        );
        assert_eq!(
            decide(&Caller::RetiredBootstrap, "apps.list").map_err(|e| e.0),
            Err(403)
        );
    }
}
