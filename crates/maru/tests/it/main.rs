//! End-to-end tests: each starts the real `maru` binary on loopback ports chosen by the OS,
//! in a temporary data directory, and talks to it with the CLI, an HTTP client and raw
//! sockets.

mod audit;
mod cluster;
mod data;
mod events;
mod harness;
mod identity;
mod keyvalue;
mod lifecycle;
mod limits;
mod processes;
mod sim;
mod store;
mod tls;
