//! The control crate's integration tests: the node's own files under simulated power cuts.

mod powercut;
