//! What the continuous heads produce and consume outside the model: images
//! as PNG, log-mels turned back into sound (Griffin-Lim) and WAV files.

pub mod audio;
pub mod files;

pub use audio::{mel_filterbank, MelSpec};
pub use files::{read_png_gray, write_png, write_wav};

/// `[-1, 1]` model units -> 8-bit pixels: clamp, then round half up.
pub fn unit_to_u8(x: f32) -> u8 {
    ((x.clamp(-1.0, 1.0) + 1.0) * 127.5 + 0.5).floor().clamp(0.0, 255.0) as u8
}

/// 8-bit pixels -> `[-1, 1]` model units.
pub fn u8_to_unit(p: u8) -> f32 {
    p as f32 / 127.5 - 1.0
}
