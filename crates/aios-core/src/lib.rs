//! aios-core: the runtime for small unified diffusion models.
//!
//! - [`format`]: the Parquet weight container (read, validate, write);
//! - [`quant`]: GGML INT8/INT4/INT2 blocks and the linear layer over them;
//! - [`model`]: the MDLM DiT backbone and text head;
//! - [`sampler`]: masked-diffusion samplers;
//! - [`engine`]: load a model folder and generate.
//!
//! No Python here: bindings live in `aios-py`, the CLI in `aios-run`.

pub mod adapter;
pub mod engine;
pub mod error;
pub mod format;
pub mod guard;
pub mod kernels;
pub mod media;
pub mod memory;
pub mod model;
pub mod quant;
pub mod sampler;
pub mod threads;

pub use engine::{ControlInput, Engine, EngineOptions, Generation, MemorySource, TextRequest, UsedMemory};

pub use error::{Error, Result};
