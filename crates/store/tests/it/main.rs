//! The store's integration tests: the engine on the simulated disk.

mod engine;
mod powercut;
