//! Who may do which control action: the caller (from the bearer token), and the decision
//! by the node's Cedar policies (`policy::authz`; docs/policy.md).
//!
//! The node's bootstrap token (the `token` file) is an admin until the first operator
//! exists (`maru admin init`); from then on it is refused for everything. The policies
//! live in `DATA/policies.cedar` (written whole and synced; absent means the defaults).

use std::path::{Path, PathBuf};

use policy::authz::{AuthzError, DEFAULT_POLICIES, Policies};
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

/// The decision: allowed with its reason, or the HTTP status and reason of the refusal.
pub fn decide(
    policies: &Policies,
    caller: &Caller,
    action: &str,
    resource: &str,
) -> Result<String, (u16, String)> {
    match caller {
        Caller::Unknown => Err((401, "no valid bearer token".into())),
        Caller::RetiredBootstrap => Err((
            403,
            "the node's bootstrap token stopped working when the first operator was created; log in with `maru login`".into(),
        )),
        Caller::Known(principal) => {
            let decision = policies.decide(principal, action, resource);
            if !decision.errors.is_empty() {
                tracing::error!(
                    subject = %principal.subject,
                    action,
                    resource,
                    errors = ?decision.errors,
                    "ALERT: a Cedar policy failed while deciding; the request is denied (fix the policies with `maru policy set`)"
                );
            }
            if decision.allowed {
                Ok(decision.reason())
            } else {
                Err((403, format!("{} may not {action} on {resource}: {}", principal.subject, decision.reason())))
            }
        }
    }
}

/// The policies file in the data directory.
pub fn policies_path(data: &Path) -> PathBuf {
    data.join("policies.cedar")
}

/// The node's policies: the file's, or the defaults if there is none. A file that does not
/// validate stops the node from starting (it would otherwise run on different rules than
/// the operator set).
pub fn load(env: &disk::Env, data: &Path) -> Result<Policies, String> {
    let path = policies_path(data);
    if !env.disk.exists(&path) {
        return Policies::new(DEFAULT_POLICIES).map_err(|e| e.to_string());
    }
    let bytes = env
        .disk
        .read(&path)
        .map_err(|e| format!("read {}: {e}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
    Policies::new(&text).map_err(|e| {
        format!(
            "{}: {e}
  hint: fix the file, or remove it to start with the default policies",
            path.display()
        )
    })
}

/// Validate `text`, make it durable as the node's policies, then make it active.
pub fn set(env: &disk::Env, data: &Path, policies: &Policies, text: &str) -> Result<(), String> {
    policies.check(text).map_err(|e| match e {
        AuthzError::Invalid(message) => message,
        other => other.to_string(),
    })?;
    disk::write_atomically(env.disk.as_ref(), &policies_path(data), text.as_bytes())
        .map_err(|e| e.to_string())?;
    policies.replace(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::identity::Principal;

    fn caller(roles: &[&str]) -> Caller {
        Caller::Known(Principal {
            subject: "operator:ana".into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            token_id: None,
            expires_ms: None,
        })
    }

    #[test]
    fn callers_are_decided_by_the_policies() {
        let policies = Policies::new(DEFAULT_POLICIES).expect("valid");
        let status =
            |c: &Caller, action: &str| decide(&policies, c, action, "node").map_err(|e| e.0);
        assert!(status(&caller(&["admin"]), "store.keys.create").is_ok());
        assert!(status(&caller(&["deployer"]), "apps.deploy").is_ok());
        assert_eq!(
            status(&caller(&["deployer"]), "store.keys.create"),
            Err(403)
        );
        assert_eq!(status(&caller(&["viewer"]), "apps.deploy"), Err(403));
        assert_eq!(status(&caller(&[]), "apps.list"), Err(403));
        assert_eq!(status(&Caller::Unknown, "apps.list"), Err(401));
        assert_eq!(status(&Caller::RetiredBootstrap, "apps.list"), Err(403));
    }

    #[test]
    fn policies_are_kept_and_bad_ones_refused() {
        let dir = tempfile::tempdir().expect("dir");
        let env = disk::Env::os();
        let policies = load(&env, dir.path()).expect("defaults");
        let only_admins =
            "@id(\"admins\") permit(principal in Maru::Role::\"admin\", action, resource);";
        set(&env, dir.path(), &policies, only_admins).expect("valid");
        assert!(
            set(
                &env,
                dir.path(),
                &policies,
                "permit(principal, action, resource"
            )
            .is_err()
        );
        let reloaded = load(&env, dir.path()).expect("reload");
        assert_eq!(reloaded.text(), only_admins);
        std::fs::write(policies_path(dir.path()), "nonsense").expect("write");
        let refused = load(&env, dir.path()).err().expect("refused");
        assert!(refused.contains("remove it"), "{refused}");
    }
}
