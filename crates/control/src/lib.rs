//! The control plane: manifests, desired state, the reconcile step and the control API.
//!
//! Invariants: state survives restart and every change to it is atomic (see [`state`]);
//! nothing reaches the running services except through [`Node::reconcile`], which derives
//! them from the stored state alone; every API call is authenticated.

pub mod api;
pub mod audit_api;
pub mod authz;
pub mod data;
pub mod files;
pub mod identity_api;
pub mod kv;
pub mod listener;
pub mod manifest;
pub mod node;
pub mod placement;
pub mod state;
pub mod store_api;
pub mod token;

pub use node::{ControlError, Node};
