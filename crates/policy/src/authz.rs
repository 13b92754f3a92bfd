//! Decisions by Cedar policy: who may do which control action on what.
//!
//! The schema ([`SCHEMA`]) names the principals (operators, machine tokens, the bootstrap
//! token; each `in` its roles), every control action (in groups: `read`, `deploy`,
//! `audit`, `manage`), and the resource an action is on (`Maru::Resource::"app/traffic"`,
//! with its `kind` and `name`). The node ships [`DEFAULT_POLICIES`]; an operator replaces
//! them with `maru policy set`, which validates the new set strictly against the schema and
//! refuses it otherwise.
//!
//! Deny by default: nothing is allowed unless a `permit` applies and no `forbid` does. A
//! policy that fails while it is evaluated makes the decision a denial, whatever the other
//! policies say, and the error is reported (in Cedar an erroring `forbid` is skipped, which
//! would otherwise turn an error into an allow).

use std::collections::{HashMap, HashSet};
use std::str::FromStr as _;
use std::sync::RwLock;

use cedar_policy::{
    Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicySet, Request,
    RestrictedExpression, Schema, ValidationMode, Validator,
};

use crate::data::{Actor, DataAction, Dataset, NodeLabels};
use crate::identity::Principal;

/// What a decision is on: a control resource (`KIND/NAME`) or a dataset.
enum Target<'a> {
    Resource(&'a str),
    Dataset(&'a Dataset, &'a NodeLabels),
}

/// The Cedar schema of control actions.
pub const SCHEMA: &str = include_str!("authz/maru.cedarschema");

/// The policies a node starts with.
pub const DEFAULT_POLICIES: &str = include_str!("authz/default.cedar");

#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("the policies do not validate against Maru's schema:\n{0}")]
    Invalid(String),
    #[error("the schema does not parse: {0}")]
    Schema(String),
}

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The policies that decided (their `@id`, or Cedar's `policyN`).
    pub policies: Vec<String>,
    /// Evaluation errors: any makes the decision a denial.
    pub errors: Vec<String>,
}

impl Decision {
    /// A one-line reason for logs and the audit log.
    pub fn reason(&self) -> String {
        if !self.errors.is_empty() {
            return format!("denied: a policy failed: {}", self.errors.join("; "));
        }
        match (self.allowed, self.policies.is_empty()) {
            (true, _) => format!("permitted by {}", self.policies.join(", ")),
            (false, true) => "no policy permits it".to_string(),
            (false, false) => format!("forbidden by {}", self.policies.join(", ")),
        }
    }
}

/// The node's policies and the schema they are checked against.
pub struct Policies {
    schema: Schema,
    active: RwLock<(PolicySet, String)>,
}

fn entity_uid(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(
        EntityTypeName::from_str(kind).expect("Maru's entity type names parse"),
        EntityId::new(id),
    )
}

impl Policies {
    /// Policies from `text`, which must validate.
    pub fn new(text: &str) -> Result<Policies, AuthzError> {
        let (schema, _) =
            Schema::from_cedarschema_str(SCHEMA).map_err(|e| AuthzError::Schema(e.to_string()))?;
        let set = validate(&schema, text)?;
        Ok(Policies {
            schema,
            active: RwLock::new((set, text.to_string())),
        })
    }

    /// Check `text` strictly against the schema, without changing anything.
    pub fn check(&self, text: &str) -> Result<(), AuthzError> {
        validate(&self.schema, text).map(drop)
    }

    /// Replace the policies (already made durable by the caller) with `text`.
    pub fn replace(&self, text: &str) -> Result<(), AuthzError> {
        let set = validate(&self.schema, text)?;
        *self.active.write().unwrap_or_else(|p| p.into_inner()) = (set, text.to_string());
        Ok(())
    }

    /// The active policies' text.
    pub fn text(&self) -> String {
        self.active
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// May `principal` do `action` on `resource` (`KIND/NAME`, or `node`)?
    pub fn decide(&self, principal: &Principal, action: &str, resource: &str) -> Decision {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        self.decide_with(
            &active.0,
            &Actor::Caller(principal),
            action,
            &Target::Resource(resource),
        )
    }

    /// May `actor` do the data action `action` on `dataset`, on a node with `node`'s
    /// region and organisation?
    pub fn decide_data(
        &self,
        actor: &Actor<'_>,
        action: DataAction,
        dataset: &Dataset,
        node: &NodeLabels,
    ) -> Decision {
        let active = self.active.read().unwrap_or_else(|p| p.into_inner());
        self.decide_with(
            &active.0,
            actor,
            action.name(),
            &Target::Dataset(dataset, node),
        )
    }

    fn decide_with(
        &self,
        set: &PolicySet,
        actor: &Actor<'_>,
        action: &str,
        target: &Target<'_>,
    ) -> Decision {
        let denied = |error: String| Decision {
            allowed: false,
            policies: Vec::new(),
            errors: vec![error],
        };
        let string = |v: &str| RestrictedExpression::new_string(v.to_string());
        let strings =
            |values: &[String]| RestrictedExpression::new_set(values.iter().map(|v| string(v)));
        let mut entities = Vec::new();
        let principal = match actor {
            Actor::Caller(principal) => {
                let (kind, name) = principal
                    .subject
                    .split_once(':')
                    .unwrap_or(("bootstrap", principal.subject.as_str()));
                let principal_type = match kind {
                    "operator" => "Maru::Operator",
                    "machine" => "Maru::Machine",
                    _ => "Maru::Bootstrap",
                };
                let roles: HashSet<EntityUid> = principal
                    .roles
                    .iter()
                    .map(|role| entity_uid("Maru::Role", role))
                    .collect();
                entities.extend(
                    roles
                        .iter()
                        .map(|uid| Entity::new_no_attrs(uid.clone(), HashSet::new())),
                );
                let uid = entity_uid(principal_type, name);
                let entity = match principal_type {
                    "Maru::Bootstrap" => Ok(Entity::new_no_attrs(uid.clone(), roles)),
                    _ => Entity::new(
                        uid.clone(),
                        HashMap::from([("name".to_string(), string(name))]),
                        roles,
                    ),
                };
                (uid, entity)
            }
            Actor::Service(service) => {
                let uid = entity_uid(
                    "Maru::Service",
                    &format!("{}/{}", service.app, service.service),
                );
                let entity = Entity::new(
                    uid.clone(),
                    HashMap::from([
                        ("app".to_string(), string(&service.app)),
                        ("name".to_string(), string(&service.service)),
                        ("organisation".to_string(), string(&service.organisation)),
                        ("purposes".to_string(), strings(&service.purposes)),
                        ("region".to_string(), string(&service.region)),
                    ]),
                    HashSet::new(),
                );
                (uid, entity)
            }
        };
        let (resource, context) = match target {
            Target::Resource(resource) => {
                let (kind, name) = resource.split_once('/').unwrap_or((resource, ""));
                let uid = entity_uid("Maru::Resource", resource);
                let entity = Entity::new(
                    uid.clone(),
                    HashMap::from([
                        ("kind".to_string(), string(kind)),
                        ("name".to_string(), string(name)),
                    ]),
                    HashSet::new(),
                );
                ((uid, entity), Context::empty())
            }
            Target::Dataset(dataset, node) => {
                let uid = entity_uid("Maru::Dataset", &dataset.resource());
                let labels = &dataset.labels;
                let entity = Entity::new(
                    uid.clone(),
                    HashMap::from([
                        ("kind".to_string(), string(dataset.kind.as_str())),
                        ("name".to_string(), string(&dataset.name)),
                        ("organisation".to_string(), string(&labels.organisation)),
                        (
                            "classification".to_string(),
                            string(labels.classification.as_str()),
                        ),
                        ("region".to_string(), string(&labels.region)),
                        (
                            "allowed_purposes".to_string(),
                            strings(&labels.allowed_purposes),
                        ),
                    ]),
                    HashSet::new(),
                );
                let context = Context::from_pairs([
                    ("region".to_string(), string(&node.region)),
                    ("organisation".to_string(), string(&node.organisation)),
                ]);
                match context {
                    Ok(context) => ((uid, entity), context),
                    Err(e) => return denied(format!("context: {e}")),
                }
            }
        };
        let (principal_uid, resource_uid) = match (principal, resource) {
            ((p_uid, Ok(p)), (r_uid, Ok(r))) => {
                entities.push(p);
                entities.push(r);
                (p_uid, r_uid)
            }
            ((_, Err(e)), _) | (_, (_, Err(e))) => return denied(e.to_string()),
        };
        let entities = match Entities::from_entities(entities, Some(&self.schema)) {
            Ok(entities) => entities,
            Err(e) => return denied(format!("entities: {e}")),
        };
        let action_uid = entity_uid("Maru::Action", action);
        let request = match Request::new(
            principal_uid,
            action_uid,
            resource_uid,
            context,
            Some(&self.schema),
        ) {
            Ok(request) => request,
            // An action the schema does not know (or not on this kind of resource): nothing
            // may do it.
            Err(e) => return denied(format!("request: {e}")),
        };
        let response = Authorizer::new().is_authorized(&request, set, &entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        let policies: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| {
                set.policy(id)
                    .and_then(|p| p.annotation("id").map(str::to_string))
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        Decision {
            allowed: errors.is_empty() && response.decision() == cedar_policy::Decision::Allow,
            policies,
            errors,
        }
    }

    /// [`Policies::decide_data`] under `text` instead of the active policies.
    pub fn decide_data_under(
        &self,
        text: Option<&str>,
        actor: &Actor<'_>,
        action: DataAction,
        dataset: &Dataset,
        node: &NodeLabels,
    ) -> Result<Decision, AuthzError> {
        match text {
            Some(text) => {
                let set = validate(&self.schema, text)?;
                Ok(self.decide_with(&set, actor, action.name(), &Target::Dataset(dataset, node)))
            }
            None => Ok(self.decide_data(actor, action, dataset, node)),
        }
    }

    /// Decide under `text` instead of the active policies (`maru policy test`).
    pub fn decide_under(
        &self,
        text: Option<&str>,
        principal: &Principal,
        action: &str,
        resource: &str,
    ) -> Result<Decision, AuthzError> {
        match text {
            Some(text) => {
                let set = validate(&self.schema, text)?;
                Ok(self.decide_with(
                    &set,
                    &Actor::Caller(principal),
                    action,
                    &Target::Resource(resource),
                ))
            }
            None => Ok(self.decide(principal, action, resource)),
        }
    }
}

fn validate(schema: &Schema, text: &str) -> Result<PolicySet, AuthzError> {
    let set = PolicySet::from_str(text)
        .map_err(|e| AuthzError::Invalid(format!("- {}", e.to_string().trim())))?;
    let result = Validator::new(schema.clone()).validate(&set, ValidationMode::Strict);
    if !result.validation_passed() {
        let errors: Vec<String> = result
            .validation_errors()
            .map(|e| format!("- {e}"))
            .collect();
        return Err(AuthzError::Invalid(errors.join("\n")));
    }
    Ok(set)
}

/// A principal with these roles and no token, for tests.
#[cfg(test)]
pub(crate) fn who(subject: &str, roles: &[&str]) -> Principal {
    Principal {
        subject: subject.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
        token_id: None,
        expires_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policies_grant_roles_their_actions_and_deny_the_rest() {
        let policies = Policies::new(DEFAULT_POLICIES).expect("the defaults validate");
        let admin = who("operator:ana", &["admin"]);
        let deployer = who("machine:ci", &["deployer"]);
        let viewer = who("operator:bob", &["viewer"]);
        let metrics = who("machine:prometheus", &["metrics"]);
        let auditor = who("operator:eve", &["auditor"]);
        let bootstrap = who("bootstrap", &["admin"]);
        for (principal, action, resource, allowed) in [
            (&admin, "store.keys.create", "store", true),
            (&bootstrap, "apps.deploy", "node", true),
            (&deployer, "apps.deploy", "node", true),
            (&deployer, "apps.remove", "app/traffic", true),
            (&deployer, "store.keys.create", "store", false),
            (&deployer, "audit.read", "audit", false),
            (&deployer, "policy.set", "node", false),
            (&viewer, "apps.list", "node", true),
            (&viewer, "apps.deploy", "node", false),
            (&metrics, "metrics.read", "node", true),
            (&metrics, "apps.list", "node", false),
            (&auditor, "audit.read", "audit", true),
            (&auditor, "whoami", "node", true),
            (&metrics, "logout", "node", true),
            (&admin, "no.such.action", "node", false),
        ] {
            let decision = policies.decide(principal, action, resource);
            assert_eq!(
                decision.allowed, allowed,
                "{} {action} {resource}: {decision:?}",
                principal.subject
            );
        }
        let decision = policies.decide(&admin, "apps.deploy", "node");
        assert_eq!(decision.policies, ["admins"]);
    }

    #[test]
    fn policies_that_fail_validation_are_refused() {
        let policies = Policies::new(DEFAULT_POLICIES).expect("valid");
        for bad in [
            "permit(principal, action, resource",
            "permit(principal, action == Maru::Action::\"apps.deploi\", resource);",
            "permit(principal, action, resource) when { resource.owner == \"x\" };",
            "permit(principal is Maru::Operator, action, resource) when { principal.age > 3 };",
        ] {
            assert!(policies.check(bad).is_err(), "{bad}");
            assert!(policies.replace(bad).is_err(), "{bad}");
        }
        assert!(
            policies.text().contains("admins"),
            "a refused set changes nothing"
        );
    }

    #[test]
    fn a_policy_that_errors_denies_even_when_a_permit_applies() {
        // Valid against the schema, but the forbid overflows when evaluated: Cedar skips an
        // erroring forbid, so without the guard the admin permit would allow.
        let text = r#"
            @id("admins") permit(principal in Maru::Role::"admin", action, resource);
            @id("guard") forbid(principal, action, resource)
                when { 9223372036854775807 + 1 > 0 };
        "#;
        let policies = Policies::new(DEFAULT_POLICIES).expect("valid");
        let decision = policies
            .decide_under(
                Some(text),
                &who("operator:ana", &["admin"]),
                "apps.list",
                "node",
            )
            .expect("the set validates");
        assert!(!decision.allowed, "{decision:?}");
        assert!(!decision.errors.is_empty());
        assert!(
            decision.reason().contains("a policy failed"),
            "{}",
            decision.reason()
        );
    }
}
