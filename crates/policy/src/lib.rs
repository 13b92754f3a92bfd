//! Identities, authorisation and the audit log: the decisions, without the node's I/O
//! (persistent formats run on [`disk::Disk`], so the power-cut simulation covers them).
//!
//! Built so far: [`audit`], the tamper-evident audit log; [`identity`], operators with
//! passwords and TOTP, and scoped, expiring tokens; [`authz`], Cedar decisions on control
//! actions; [`data`], data access by classification, purpose and region.

pub mod audit;
pub mod authz;
pub mod data;
pub mod identity;

/// `N` bytes from the operating system's random source (through ring, the crate's one
/// cryptography provider).
pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], String> {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0; N];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(bytes)
}
