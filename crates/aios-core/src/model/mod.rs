//! Model definitions (one model per file, candle-transformers style).

pub mod audio;
pub mod config;
pub mod dit;
pub mod heads;
pub mod image;
pub mod ops;
pub mod random;

pub use config::{Modality, ModelConfig};
pub use dit::{CanvasInput, CanvasOutput, Dit};
