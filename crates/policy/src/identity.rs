//! Operators and tokens: who is asking.
//!
//! - **Operators** have an argon2id password and a TOTP second factor (RFC 6238, SHA-1,
//!   6 digits, 30 s, one step of skew), both mandatory. Each code step is accepted once
//!   (the last accepted step is stored). Wrong passwords and codes count against the
//!   account and against the client's address: after 5 failures in a row, each further
//!   attempt waits 30 s doubling up to 15 min (a correct login resets the account). An
//!   unknown name costs the same argon2 work as a known one.
//! - **Tokens** are random 256-bit bearer tokens (`maru_` + base64url); only their BLAKE3
//!   hash is stored, with the subject, roles, expiry and a revoked flag. Login tokens last
//!   12 h by default; machine tokens (CI deploys, Prometheus) carry the roles they were
//!   minted with, never more than their creator's, and expire too. Revocation is a commit:
//!   the next request with the token is refused.
//!
//! Everything is kept in `identity.redb` (through `disk::database`, so power-cut safe);
//! the per-address failure counts are in memory, bounded.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use base64::Engine as _;
use disk::Env;
use redb::{
    ReadableDatabase as _, ReadableTable as _, ReadableTableMetadata as _, TableDefinition,
};
use serde::{Deserialize, Serialize};

const OPERATORS: TableDefinition<&str, &[u8]> = TableDefinition::new("operators");
const TOKENS: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("tokens");

/// Roles the node knows. `admin` may do everything; the others are named in the default
/// policies (docs/policy.md).
pub const ROLES: &[&str] = &[
    "admin", "deployer", "viewer", "auditor", "metrics", "ingest",
];

/// Failures in a row before attempts must wait.
const FAILURES_FREE: u32 = 5;
const BACKOFF_FIRST_MS: u64 = 30_000;
const BACKOFF_MAX_MS: u64 = 15 * 60_000;
/// Addresses whose failures are remembered.
const ADDRESSES_MAX: usize = 10_000;
/// Login tokens' lifetime unless asked otherwise, and the longest any token may have.
pub const LOGIN_TTL_MS: u64 = 12 * 3_600_000;
pub const TOKEN_TTL_MAX_MS: u64 = 366 * 24 * 3_600_000;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Wrong name, password or code: one answer for all, so it tells nothing.
    #[error("the name, password or code is wrong")]
    BadCredentials,
    #[error("too many failed attempts; try again in {} s", retry_after_ms.div_ceil(1000))]
    Throttled { retry_after_ms: u64 },
    #[error("an operator already exists: `maru admin init` runs once; log in with `maru login`")]
    AlreadyInitialised,
    #[error("{0}")]
    BadRequest(String),
    #[error("a token cannot have roles its creator lacks: {0}")]
    MoreRightsThanCreator(String),
    #[error("no such token: {0}")]
    NoSuchToken(String),
    #[error("the identity database: {0}")]
    Storage(String),
}

fn storage(error: impl std::fmt::Display) -> IdentityError {
    IdentityError::Storage(error.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OperatorRecord {
    password: String,
    totp_secret: Vec<u8>,
    roles: Vec<String>,
    created_ms: u64,
    /// The last TOTP step accepted (a step is accepted once).
    last_step: u64,
    failures: u32,
    locked_until_ms: u64,
}

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// A public name for the token (not the secret): `tok_` and 12 hex digits of its hash.
    pub id: String,
    /// `operator:NAME` or `machine:NAME`.
    pub subject: String,
    pub roles: Vec<String>,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub revoked: bool,
    #[serde(default)]
    pub description: String,
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub subject: String,
    pub roles: Vec<String>,
    /// The token's id (`None` for the node's bootstrap token).
    pub token_id: Option<String>,
    pub expires_ms: Option<u64>,
}

impl Principal {
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// What enrolment gives the new operator, once.
#[derive(Debug, Clone)]
pub struct Enrolment {
    /// `otpauth://totp/Maru:NAME?secret=…&issuer=Maru`, for an authenticator app.
    pub otpauth_url: String,
    pub secret_base32: String,
}

/// A token just made: the secret, shown once, and what it grants.
#[derive(Debug, Clone)]
pub struct Issued {
    pub token: String,
    pub record: TokenRecord,
}

pub struct Identities {
    db: redb::Database,
    env: Env,
    /// Failures in a row per client address, and when the last one was.
    addresses: Mutex<HashMap<String, (u32, u64)>>,
    /// What an unknown name is checked against, so it costs what a known one does.
    /// Made at the first unknown name rather than at every start.
    decoy: std::sync::OnceLock<String>,
    /// Set once an operator is seen: operators are never removed, so from then on every
    /// request with the bootstrap token is answered without reading the database.
    initialised: std::sync::atomic::AtomicBool,
}

fn token_hash(token: &str) -> [u8; 32] {
    blake3::derive_key("maru token v1", token.as_bytes())
}

fn token_id(hash: &[u8; 32]) -> String {
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("tok_{hex}")
}

fn backoff_ms(failures: u32) -> u64 {
    if failures < FAILURES_FREE {
        return 0;
    }
    let doublings = (failures - FAILURES_FREE).min(10);
    (BACKOFF_FIRST_MS << doublings).min(BACKOFF_MAX_MS)
}

fn totp(secret: &[u8], name: &str) -> Result<totp_rs::Totp, IdentityError> {
    totp_rs::Builder::new()
        .with_secret(secret.to_vec())
        .with_account_name(name)
        .with_issuer(Some("Maru"))
        .build()
        .map_err(|e| IdentityError::BadRequest(format!("TOTP: {e}")))
}

fn random<const N: usize>() -> Result<[u8; N], IdentityError> {
    crate::random_bytes().map_err(storage)
}

fn hash_password(password: &str) -> Result<String, IdentityError> {
    argon2::Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| storage(format!("argon2: {e}")))
}

fn password_matches(phc: &str, password: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|parsed| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Operator names: what a person or a team is called, safe in logs and URLs.
pub fn check_name(name: &str) -> Result<(), IdentityError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadRequest(format!(
            "{name:?} is not a name: use 1-64 lowercase letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn check_password(password: &str) -> Result<(), IdentityError> {
    if password.chars().count() < 12 || password.len() > 1024 {
        return Err(IdentityError::BadRequest(
            "a password has 12 to 1024 characters (a passphrase of several words is best)".into(),
        ));
    }
    Ok(())
}

fn check_roles(roles: &[String]) -> Result<(), IdentityError> {
    match roles.iter().find(|r| !ROLES.contains(&r.as_str())) {
        Some(role) => Err(IdentityError::BadRequest(format!(
            "no role {role:?}; roles are {}",
            ROLES.join(", ")
        ))),
        None if roles.is_empty() => Err(IdentityError::BadRequest("give at least one role".into())),
        None => Ok(()),
    }
}

impl Identities {
    /// Open (or create) `identity.redb` in `dir`.
    pub fn open(env: Env, dir: &Path) -> Result<Identities, IdentityError> {
        let db =
            disk::database::open(env.disk.as_ref(), &dir.join("identity.redb")).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(OPERATORS).map_err(storage)?;
        txn.open_table(TOKENS).map_err(storage)?;
        txn.commit().map_err(storage)?;
        Ok(Identities {
            db,
            env,
            addresses: Mutex::new(HashMap::new()),
            decoy: std::sync::OnceLock::new(),
            initialised: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        self.env.clock.now_ms()
    }

    /// Whether an operator exists (then the bootstrap token no longer works).
    pub fn initialised(&self) -> Result<bool, IdentityError> {
        use std::sync::atomic::Ordering;
        if self.initialised.load(Ordering::Acquire) {
            return Ok(true);
        }
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(OPERATORS).map_err(storage)?;
        let found = table.len().map_err(storage)? > 0;
        if found {
            self.initialised.store(true, Ordering::Release);
        }
        Ok(found)
    }

    /// Create an operator with `roles`: the first one (`maru admin init`) only while there
    /// is none, later ones by an admin.
    pub fn create_operator(
        &self,
        name: &str,
        password: &str,
        roles: &[String],
        first: bool,
    ) -> Result<Enrolment, IdentityError> {
        check_name(name)?;
        check_password(password)?;
        check_roles(roles)?;
        let secret: [u8; 20] = random()?;
        let record = OperatorRecord {
            password: hash_password(password)?,
            totp_secret: secret.to_vec(),
            roles: roles.to_vec(),
            created_ms: self.now(),
            last_step: 0,
            failures: 0,
            locked_until_ms: 0,
        };
        let totp = totp(&secret, name)?;
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(OPERATORS).map_err(storage)?;
            if first && table.len().map_err(storage)? > 0 {
                return Err(IdentityError::AlreadyInitialised);
            }
            if table.get(name).map_err(storage)?.is_some() {
                return Err(IdentityError::BadRequest(format!(
                    "an operator named {name} exists"
                )));
            }
            let bytes = serde_json::to_vec(&record).expect("records serialise");
            table.insert(name, bytes.as_slice()).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(Enrolment {
            otpauth_url: totp
                .to_url()
                .map_err(|e| IdentityError::BadRequest(format!("TOTP: {e}")))?,
            secret_base32: totp.secret().to_base32(),
        })
    }

    /// The address's wait, if it must wait.
    fn address_wait(&self, address: &str, now: u64) -> Option<u64> {
        let addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        let (failures, at) = addresses.get(address).copied()?;
        let until = at + backoff_ms(failures);
        (until > now && backoff_ms(failures) > 0).then(|| until - now)
    }

    fn address_failed(&self, address: &str, now: u64) {
        let mut addresses = self.addresses.lock().unwrap_or_else(|p| p.into_inner());
        if addresses.len() >= ADDRESSES_MAX && !addresses.contains_key(address) {
            // Forget addresses whose last failure is older than the longest wait.
            addresses.retain(|_, (_, at)| now.saturating_sub(*at) < BACKOFF_MAX_MS);
            if addresses.len() >= ADDRESSES_MAX {
                addresses.clear();
            }
        }
        let entry = addresses.entry(address.to_string()).or_insert((0, now));
        *entry = (entry.0 + 1, now);
    }

    /// Check a name, password and TOTP code; a login token for `ttl_ms` (at most 12 h) if
    /// all three are right.
    pub fn login(
        &self,
        name: &str,
        password: &str,
        code: &str,
        address: &str,
        ttl_ms: Option<u64>,
    ) -> Result<Issued, IdentityError> {
        let now = self.now();
        if let Some(wait) = self.address_wait(address, now) {
            return Err(IdentityError::Throttled {
                retry_after_ms: wait,
            });
        }
        let txn = self.db.begin_write().map_err(storage)?;
        let outcome = {
            let mut table = txn.open_table(OPERATORS).map_err(storage)?;
            let record: Option<OperatorRecord> = table
                .get(name)
                .map_err(storage)?
                .and_then(|v| serde_json::from_slice(v.value()).ok());
            match record {
                None => {
                    // The same work as for a real operator, then the same answer.
                    let decoy = self.decoy.get_or_init(|| {
                        hash_password("a password nobody has, for names nobody has")
                            .unwrap_or_default()
                    });
                    let _ = password_matches(decoy, password);
                    Err(IdentityError::BadCredentials)
                }
                Some(mut record) => {
                    let outcome = if record.locked_until_ms > now {
                        Err(IdentityError::Throttled {
                            retry_after_ms: record.locked_until_ms - now,
                        })
                    } else if !password_matches(&record.password, password) {
                        Err(IdentityError::BadCredentials)
                    } else {
                        let step = totp(&record.totp_secret, name)?.check(code.trim(), now / 1000);
                        match step {
                            Some(step) if step > record.last_step => {
                                record.last_step = step;
                                Ok(record.roles.clone())
                            }
                            // A replayed code, or a wrong one.
                            _ => Err(IdentityError::BadCredentials),
                        }
                    };
                    match &outcome {
                        Ok(_) => {
                            record.failures = 0;
                            record.locked_until_ms = 0;
                        }
                        Err(IdentityError::BadCredentials) => {
                            record.failures += 1;
                            record.locked_until_ms = now + backoff_ms(record.failures);
                        }
                        Err(_) => {}
                    }
                    let bytes = serde_json::to_vec(&record).expect("records serialise");
                    table.insert(name, bytes.as_slice()).map_err(storage)?;
                    outcome
                }
            }
        };
        txn.commit().map_err(storage)?;
        match outcome {
            Ok(roles) => {
                let ttl = ttl_ms.unwrap_or(LOGIN_TTL_MS).min(LOGIN_TTL_MS);
                self.issue(&format!("operator:{name}"), roles, ttl, "login")
            }
            Err(error) => {
                if matches!(error, IdentityError::BadCredentials) {
                    self.address_failed(address, now);
                }
                Err(error)
            }
        }
    }

    fn issue(
        &self,
        subject: &str,
        roles: Vec<String>,
        ttl_ms: u64,
        description: &str,
    ) -> Result<Issued, IdentityError> {
        let secret: [u8; 32] = random()?;
        let token = format!(
            "maru_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret)
        );
        let hash = token_hash(&token);
        let now = self.now();
        let record = TokenRecord {
            id: token_id(&hash),
            subject: subject.to_string(),
            roles,
            created_ms: now,
            expires_ms: now + ttl_ms,
            revoked: false,
            description: description.to_string(),
        };
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut table = txn.open_table(TOKENS).map_err(storage)?;
            let bytes = serde_json::to_vec(&record).expect("records serialise");
            table.insert(&hash, bytes.as_slice()).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(Issued { token, record })
    }

    /// A machine token for `name` with `roles` (each one the creator has, or the creator is
    /// an admin), expiring after `ttl_ms`.
    pub fn create_machine_token(
        &self,
        creator: &Principal,
        name: &str,
        roles: &[String],
        ttl_ms: u64,
        description: &str,
    ) -> Result<Issued, IdentityError> {
        check_name(name)?;
        check_roles(roles)?;
        if ttl_ms == 0 || ttl_ms > TOKEN_TTL_MAX_MS {
            return Err(IdentityError::BadRequest(
                "a token lives between 1 s and 366 days".into(),
            ));
        }
        if !creator.has_role("admin") {
            let extra: Vec<&str> = roles
                .iter()
                .filter(|r| !creator.has_role(r))
                .map(String::as_str)
                .collect();
            if !extra.is_empty() {
                return Err(IdentityError::MoreRightsThanCreator(extra.join(", ")));
            }
        }
        // A token never outlives the one that made it.
        let ttl_ms = match creator.expires_ms {
            Some(expires) => ttl_ms.min(expires.saturating_sub(self.now())),
            None => ttl_ms,
        };
        self.issue(
            &format!("machine:{name}"),
            roles.to_vec(),
            ttl_ms,
            description,
        )
    }

    /// Who a bearer token belongs to, if it is known, unexpired and not revoked.
    pub fn authenticate(&self, token: &str) -> Result<Option<Principal>, IdentityError> {
        if !token.starts_with("maru_") {
            return Ok(None);
        }
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(TOKENS).map_err(storage)?;
        let Some(value) = table.get(&token_hash(token)).map_err(storage)? else {
            return Ok(None);
        };
        let record: TokenRecord = serde_json::from_slice(value.value()).map_err(storage)?;
        if record.revoked || record.expires_ms <= self.now() {
            return Ok(None);
        }
        Ok(Some(Principal {
            subject: record.subject,
            roles: record.roles,
            token_id: Some(record.id),
            expires_ms: Some(record.expires_ms),
        }))
    }

    /// Every token, newest first (never their secrets).
    pub fn tokens(&self) -> Result<Vec<TokenRecord>, IdentityError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(TOKENS).map_err(storage)?;
        let mut out: Vec<TokenRecord> = table
            .iter()
            .map_err(storage)?
            .filter_map(|entry| entry.ok())
            .filter_map(|(_, v)| serde_json::from_slice(v.value()).ok())
            .collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.created_ms));
        Ok(out)
    }

    /// Revoke the token with this id; the next request with it is refused.
    pub fn revoke(&self, id: &str) -> Result<TokenRecord, IdentityError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let revoked = {
            let mut table = txn.open_table(TOKENS).map_err(storage)?;
            let found = table
                .iter()
                .map_err(storage)?
                .filter_map(|entry| entry.ok())
                .find_map(|(k, v)| {
                    let record: TokenRecord = serde_json::from_slice(v.value()).ok()?;
                    (record.id == id).then(|| (*k.value(), record))
                });
            let Some((hash, mut record)) = found else {
                return Err(IdentityError::NoSuchToken(id.to_string()));
            };
            record.revoked = true;
            let bytes = serde_json::to_vec(&record).expect("records serialise");
            table.insert(&hash, bytes.as_slice()).map_err(storage)?;
            record
        };
        txn.commit().map_err(storage)?;
        Ok(revoked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap() {
        assert_eq!(backoff_ms(4), 0);
        assert_eq!(backoff_ms(5), 30_000);
        assert_eq!(backoff_ms(6), 60_000);
        assert_eq!(backoff_ms(40), BACKOFF_MAX_MS);
    }

    #[test]
    fn names_and_roles_are_checked() {
        assert!(check_name("ana").is_ok());
        assert!(check_name("Ana").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("").is_err());
        assert!(check_roles(&["admin".into()]).is_ok());
        assert!(check_roles(&["root".into()]).is_err());
        assert!(check_roles(&[]).is_err());
    }
}
