//! The events crate's integration tests: the seeded power-cut simulation of the log.

mod powercut;
