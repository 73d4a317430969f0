//! Model definitions (one model per file, candle-transformers style).

pub mod config;
pub mod dit;
pub mod ops;
pub mod random;

pub use config::ModelConfig;
pub use dit::Dit;
