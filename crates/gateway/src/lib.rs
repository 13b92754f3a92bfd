//! HTTP ingress: accepts connections, applies limits, routes each request to a service and
//! maps every failure to a small JSON error carrying the request id.
//!
//! Invariant: the gateway owns no business state. It is handed a [`RouteTable`] of running
//! [`Service`]s by the control plane and swaps it whole; it never reads or writes apps,
//! revisions or manifests.

mod ingest;
mod metrics;
pub mod peers;
mod routes;
mod server;
mod service;
pub mod tls;
mod trigger;

pub use metrics::{Gauges, MetricsSnapshot, ServiceMetrics, render_families};
pub use routes::{RouteKey, RouteTable};
pub use server::{ConnectionLimits, Gateway, GatewayConfig, serve_connections};
pub use service::{
    AnomalyRecord, Backend, Body, BoxError, Locality, Service, ServiceConfig, ServiceError,
};
pub use trigger::{Admitted, DeliveryGuard, TriggerConfig, rfc3339, run_trigger};
