//! The WebAssembly runtime: one wasmtime engine for the node, the compiled-artifact cache,
//! component instances and the host interfaces they see.
//!
//! Invariant: a guest can never take more than its limits. Every instance has a memory cap
//! (a `ResourceLimiter` on its store, under the pooling allocator's hard slot size), every
//! call has a deadline (epoch interruption for guest code, a timer for host waits), and
//! outbound HTTP is denied unless the service's manifest names the origin.
//!
//! This crate knows nothing about apps, revisions, routing or scaling: it turns a component
//! and an [`InstanceSpec`] into instances that serve one request at a time.

mod artifact;
mod engine;
mod instance;
pub mod keyvalue;
mod logs;
mod outbound;
mod process;
pub mod sandbox;

pub use artifact::{ArtifactCache, ArtifactError, ComponentHash};
pub use engine::{LoadedComponent, Runtime, RuntimeConfig};
pub use instance::{GuestBody, Instance, InstanceSpec, ServeError};
pub use logs::{LogLine, LogStream, ServiceLog};
pub use nix::sys::signal::Signal;
pub use outbound::{Origin, OriginParseError};
pub use process::{
    Isolation, LivenessProbe, Probe, ProcessError, ProcessInstance, ProcessSpec, limits_in_force,
    reap_leftovers,
};
