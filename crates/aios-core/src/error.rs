//! The one error type of the runtime. Every fallible public function returns
//! [`Result`]; the Python bindings map each variant to one exception class and
//! the CLI maps each to one exit code, in one place each.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A weight/adapter file is unreadable, corrupt, truncated or inconsistent.
    #[error("format error in {path}: {msg}")]
    Format { path: String, msg: String },

    /// The model configuration is invalid or does not match the tensors.
    #[error("config error: {0}")]
    Config(String),

    /// A caller passed an invalid argument (length, steps, sampler, prompt...).
    #[error("invalid input: {0}")]
    Input(String),

    /// Tokenizer could not be loaded or failed to encode/decode.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The model produced NaN/inf (broken or overflowing weights).
    #[error("numeric error: {0}")]
    Numeric(String),

    /// Operating-system I/O error, with the path involved.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// An error from the tensor backend (candle). Seeing one of these usually
    /// means a bug in aios, since inputs are validated before they reach it.
    #[error("backend error: {0}")]
    Backend(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn format(path: impl std::fmt::Display, msg: impl Into<String>) -> Self {
        Error::Format { path: path.to_string(), msg: msg.into() }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}

/// Shorthand for `Err(Error::Input(format!(...)))`.
#[macro_export]
macro_rules! input_err {
    ($($arg:tt)*) => { Err($crate::Error::Input(format!($($arg)*))) };
}
