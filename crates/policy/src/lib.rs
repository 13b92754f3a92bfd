//! Identities, authorisation and the audit log: the decisions, without the node's I/O
//! (persistent formats run on [`disk::Disk`], so the power-cut simulation covers them).
//!
//! Built so far: [`audit`], the tamper-evident audit log; [`identity`], operators with
//! passwords and TOTP, and scoped, expiring tokens.

pub mod audit;
pub mod authz;
pub mod identity;
