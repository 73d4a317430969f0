//! The unified diffusion transformer, candle-transformers style: the shared
//! backbone (`backbone.rs`: MDLM's DiT blocks, timestep embedding, final
//! adaLN, per-position conditioning) and one file per head (`text.rs`,
//! `image.rs`, `audio.rs`; `heads.rs` is the projection the continuous heads
//! share).

pub mod audio;
pub mod backbone;
pub mod config;
pub mod heads;
pub mod image;
pub mod random;
pub mod text;

pub use backbone::{CanvasInput, CanvasOutput, Dit};
pub use config::{Modality, ModelConfig};
