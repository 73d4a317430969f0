//! PNG and WAV files. Writes go to a temporary file beside the target and are
//! renamed into place, so a failed write (full disk, no permission) leaves no
//! half file behind and is an `Error::Io` naming the path.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

fn tmp_beside(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_beside(path);
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Writes 8-bit pixels `[channels, height, width]` (1 = grey, 3 = RGB) as PNG.
pub fn write_png(path: &Path, pixels: &[u8], channels: usize, height: usize, width: usize) -> Result<()> {
    if pixels.len() != channels * height * width || !(channels == 1 || channels == 3) {
        return crate::input_err!(
            "write_png: {} pixels for {channels} x {height} x {width} (channels must be 1 or 3)",
            pixels.len()
        );
    }
    // Planar [C, H, W] -> interleaved rows.
    let plane = height * width;
    let interleaved: Vec<u8> = (0..plane).flat_map(|i| (0..channels).map(move |c| pixels[c * plane + i])).collect();
    let color = if channels == 1 { image::ExtendedColorType::L8 } else { image::ExtendedColorType::Rgb8 };
    let mut buf = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut buf),
        &interleaved,
        width as u32,
        height as u32,
        color,
    )
    .map_err(|e| Error::Input(format!("write_png: {e}")))?;
    write_atomically(path, &buf)
}

/// Reads a PNG as 8-bit grey `(pixels, height, width)` (colour is converted
/// to luma). Corrupt files are a format error.
pub fn read_png_gray(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let img = crate::guard::catch_silent(|| image::load_from_memory_with_format(&bytes, image::ImageFormat::Png))
        .ok_or_else(|| Error::format(path.display(), "the PNG decoder failed"))?
        .map_err(|e| Error::format(path.display(), format!("not a readable PNG: {e}")))?;
    let g = img.to_luma8();
    let (w, h) = (g.width() as usize, g.height() as usize);
    Ok((g.into_raw(), h, w))
}

/// Writes mono samples in [-1, 1] (clipped) as 16-bit PCM WAV.
pub fn write_wav(path: &Path, samples: &[f32], sample_rate: u32) -> Result<()> {
    if samples.iter().any(|s| !s.is_finite()) {
        return Err(Error::Numeric("write_wav: the waveform contains NaN or infinity".into()));
    }
    let spec =
        hound::WavSpec { channels: 1, sample_rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut cursor = std::io::Cursor::new(Vec::new());
    {
        let mut w = hound::WavWriter::new(&mut cursor, spec).map_err(|e| Error::Input(format!("write_wav: {e}")))?;
        for &s in samples {
            w.write_sample((s.clamp(-1.0, 1.0) * 32767.0).round() as i16)
                .map_err(|e| Error::Input(format!("write_wav: {e}")))?;
        }
        w.finalize().map_err(|e| Error::Input(format!("write_wav: {e}")))?;
    }
    write_atomically(path, &cursor.into_inner())
}

/// Writes UTF-8 text (with a final newline), atomically like the others.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomically(path, format!("{text}\n").as_bytes())
}
