//! Adapters applied on top of a loaded base model without reloading it.
//!
//! - [`lora`]: LoRA files (`aios.kind = lora`) and the active, weighted set
//!   applied unmerged (`W x + s B(A x)`), so they work over quantised bases.

pub mod lora;

pub use lora::{write_random_lora, ActiveLora, LoraAdapter};
