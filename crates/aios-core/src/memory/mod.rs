//! The personal memory store ("ArrowStorage" in the design): a user's
//! memories (text + JSON metadata + embedding) kept durably on the device and
//! searched exactly, in milliseconds.
//!
//! - [`embedder`]: all-MiniLM-L6-v2 sentence embeddings (tokenizer + pooling);
//! - [`bert`]: its BERT encoder on plain f32 buffers;
//! - [`segment`]: one immutable Arrow IPC file of rows;
//! - [`manifest`]: the versioned, checksummed list of live segments;
//! - [`search`]: SIMD brute-force top-k over f32 or int8 vectors;
//! - [`store`]: [`MemoryStore`], which ties them together crash-safely.

pub mod bert;
pub mod durable;
pub mod embedder;
pub mod manifest;
pub mod search;
pub mod segment;
pub mod store;

#[cfg(test)]
mod tests;

pub use embedder::Embedder;
pub use search::{Filter, Precision};
pub use store::{Hit, MemoryStore, NewMemory, StoreOptions, StoreStats};
