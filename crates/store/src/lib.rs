//! Storage: an erasure-coded, checksummed, encrypted object store over a node's volumes.
//!
//! The deciding parts are pure and tested exhaustively: [`layout`] (the erasure profile a
//! number of volumes gets, where an object's shards go, how an object is cut into stripes
//! and blocks). The rest works through `disk::Env`, so the power-cut simulation runs it.

pub mod codec;
pub mod crypto;
pub mod engine;
pub mod keys;
pub mod layout;
pub mod records;
pub mod s3;
pub mod shard;

pub use engine::{ObjectInfo, ObjectReader, ObjectWriter, Store, StoreConfig, StoreError};
pub use records::ObjectMeta;
