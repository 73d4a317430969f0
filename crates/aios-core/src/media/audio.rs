//! Log-mel spectrograms back to sound, the inverse of
//! `aios_train.media.log_mel`: undo the normalisation and the log, recover a
//! linear magnitude spectrogram from the mel filterbank (non-negative least
//! squares by multiplicative updates, as in librosa's `mel_to_stft`), then
//! Griffin-Lim phase recovery with momentum ("fast Griffin-Lim", Perraudin,
//! Balazs & Sondergaard 2013; librosa's default momentum 0.99) on the same
//! STFT: periodic Hann window, centred reflect padding, magnitude spectra.

use std::sync::Arc;

use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

use crate::error::{Error, Result};

/// `aios_train.media`: normalised = (ln(max(mel, 1e-5)) - MEAN) / SCALE.
pub const AUDIO_LOG_MEAN: f32 = -4.0;
pub const AUDIO_LOG_SCALE: f32 = 4.0;

/// `[n_mels, n_fft / 2 + 1]` triangular HTK filters from 0 Hz to Nyquist,
/// peak 1 (no area normalisation); `aios_train.media.mel_filterbank`.
pub fn mel_filterbank(sample_rate: usize, n_fft: usize, n_mels: usize) -> Vec<f32> {
    let n_freq = n_fft / 2 + 1;
    let hz_to_mel = |f: f64| 2595.0 * (1.0 + f / 700.0).log10();
    let mel_to_hz = |m: f64| 700.0 * (10f64.powf(m / 2595.0) - 1.0);
    let nyq = sample_rate as f64 / 2.0;
    let (lo, hi) = (hz_to_mel(0.0), hz_to_mel(nyq));
    let pts: Vec<f64> = (0..n_mels + 2).map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (n_mels + 1) as f64)).collect();
    let mut fb = vec![0f32; n_mels * n_freq];
    for m in 0..n_mels {
        for k in 0..n_freq {
            let f = nyq * k as f64 / (n_freq - 1) as f64;
            let up = (f - pts[m]) / (pts[m + 1] - pts[m]);
            let down = (pts[m + 2] - f) / (pts[m + 2] - pts[m + 1]);
            fb[m * n_freq + k] = up.min(down).max(0.0) as f32;
        }
    }
    fb
}

/// The STFT settings of a model's audio head and the tools to invert them.
pub struct MelSpec {
    pub sample_rate: usize,
    pub n_fft: usize,
    pub hop: usize,
    pub n_mels: usize,
    fb: Vec<f32>,
    window: Vec<f32>,
    fft: Arc<dyn Fft<f32>>,
    ifft: Arc<dyn Fft<f32>>,
}

impl MelSpec {
    pub fn new(sample_rate: usize, n_fft: usize, hop: usize, n_mels: usize) -> Result<Self> {
        if n_fft < 16 || hop == 0 || hop > n_fft || n_mels == 0 || n_mels > n_fft / 2 + 1 {
            return Err(Error::Config(format!("bad STFT settings: n_fft {n_fft}, hop {hop}, mels {n_mels}")));
        }
        let window = (0..n_fft)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n_fft as f64).cos()) as f32)
            .collect();
        let mut planner = FftPlanner::new();
        Ok(MelSpec {
            sample_rate,
            n_fft,
            hop,
            n_mels,
            fb: mel_filterbank(sample_rate, n_fft, n_mels),
            window,
            fft: planner.plan_fft_forward(n_fft),
            ifft: planner.plan_fft_inverse(n_fft),
        })
    }

    fn n_freq(&self) -> usize {
        self.n_fft / 2 + 1
    }

    /// Waveform length whose centred STFT has `frames` frames.
    pub fn samples_for(&self, frames: usize) -> usize {
        (frames - 1) * self.hop
    }

    /// Complex STFT `[frames, n_freq]` of `wave` (centred, reflect padded).
    pub fn stft(&self, wave: &[f32]) -> Vec<Complex32> {
        let (n, half) = (self.n_fft, self.n_fft / 2);
        let len = wave.len();
        // Reflect padding as numpy's "reflect" (edge not repeated); short signals bounce.
        let at = |i: isize| -> f32 {
            if len == 1 {
                return wave[0];
            }
            let period = 2 * (len as isize - 1);
            let mut j = i.rem_euclid(period);
            if j >= len as isize {
                j = period - j;
            }
            wave[j as usize]
        };
        let frames = 1 + len / self.hop;
        let nf = self.n_freq();
        let mut out = Vec::with_capacity(frames * nf);
        let mut buf = vec![Complex32::new(0.0, 0.0); n];
        for f in 0..frames {
            let start = (f * self.hop) as isize - half as isize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = Complex32::new(at(start + i as isize) * self.window[i], 0.0);
            }
            self.fft.process(&mut buf);
            out.extend_from_slice(&buf[..nf]);
        }
        out
    }

    /// Inverse STFT (overlap-add, window-square normalised), `len` samples.
    pub fn istft(&self, spec: &[Complex32], len: usize) -> Vec<f32> {
        let (n, half, nf) = (self.n_fft, self.n_fft / 2, self.n_freq());
        let frames = spec.len() / nf;
        let total = n + self.hop * (frames - 1);
        let mut acc = vec![0f32; total];
        let mut wsum = vec![0f32; total];
        let mut buf = vec![Complex32::new(0.0, 0.0); n];
        for f in 0..frames {
            let s = &spec[f * nf..(f + 1) * nf];
            buf[..nf].copy_from_slice(s);
            for k in nf..n {
                buf[k] = s[n - k].conj();
            }
            self.ifft.process(&mut buf);
            for i in 0..n {
                let w = self.window[i];
                acc[f * self.hop + i] += buf[i].re / n as f32 * w;
                wsum[f * self.hop + i] += w * w;
            }
        }
        (0..len)
            .map(|i| {
                let j = i + half;
                if j < total && wsum[j] > 1e-8 {
                    acc[j] / wsum[j]
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// Linear magnitudes `[frames, n_freq]` whose mel projection best matches
    /// `mel` (`[frames, n_mels]`, linear), by multiplicative NNLS updates.
    pub fn mel_to_linear(&self, mel: &[f32], iters: usize) -> Vec<f32> {
        let (nm, nf) = (self.n_mels, self.n_freq());
        let frames = mel.len() / nm;
        // Each filter is non-zero on one contiguous band.
        let bands: Vec<(usize, usize)> = (0..nm)
            .map(|m| {
                let row = &self.fb[m * nf..(m + 1) * nf];
                let lo = row.iter().position(|&v| v > 0.0).unwrap_or(0);
                let hi = row.iter().rposition(|&v| v > 0.0).map_or(0, |p| p + 1);
                (lo, hi.max(lo))
            })
            .collect();
        let mut out = vec![0f32; frames * nf];
        let mut fbt_m = vec![0f32; nf];
        let mut proj = vec![0f32; nm];
        for f in 0..frames {
            let m_row = &mel[f * nm..(f + 1) * nm];
            fbt_m.iter_mut().for_each(|v| *v = 0.0);
            for (m, &(lo, hi)) in bands.iter().enumerate() {
                for (v, &w) in fbt_m[lo..hi].iter_mut().zip(&self.fb[m * nf + lo..m * nf + hi]) {
                    *v += w * m_row[m];
                }
            }
            let s = &mut out[f * nf..(f + 1) * nf];
            s.copy_from_slice(&fbt_m);
            for _ in 0..iters {
                for (m, &(lo, hi)) in bands.iter().enumerate() {
                    proj[m] = (lo..hi).map(|k| self.fb[m * nf + k] * s[k]).sum();
                }
                let mut denom = vec![1e-10f32; nf];
                for (m, &(lo, hi)) in bands.iter().enumerate() {
                    for (k, d) in denom.iter_mut().enumerate().take(hi).skip(lo) {
                        *d += self.fb[m * nf + k] * proj[m];
                    }
                }
                for k in 0..nf {
                    s[k] *= fbt_m[k] / denom[k];
                }
            }
        }
        out
    }

    /// Normalised log-mel `[frames, n_mels]` -> waveform of
    /// `samples_for(frames)` samples: `iters` Griffin-Lim iterations from a
    /// fixed (zero) phase, so the result is deterministic.
    pub fn to_waveform(&self, log_mel: &[f32], iters: usize) -> Result<Vec<f32>> {
        let nm = self.n_mels;
        if log_mel.is_empty() || !log_mel.len().is_multiple_of(nm) {
            return crate::input_err!("log-mel has {} values, not a multiple of {nm} mels", log_mel.len());
        }
        if log_mel.iter().any(|v| !v.is_finite()) {
            return Err(Error::Numeric("the log-mel spectrogram contains NaN or infinity".into()));
        }
        let frames = log_mel.len() / nm;
        if frames < 2 {
            return crate::input_err!("need at least 2 frames, got {frames}");
        }
        let mel: Vec<f32> = log_mel.iter().map(|&v| (v * AUDIO_LOG_SCALE + AUDIO_LOG_MEAN).min(30.0).exp()).collect();
        let mag = self.mel_to_linear(&mel, 32);
        let len = self.samples_for(frames);
        let nf = self.n_freq();
        let mut spec: Vec<Complex32> = mag.iter().map(|&m| Complex32::new(m, 0.0)).collect();
        let mut prev = vec![Complex32::new(0.0, 0.0); spec.len()];
        let momentum = 0.99f32;
        let mut wave = self.istft(&spec, len);
        for _ in 0..iters {
            let rebuilt = self.stft(&wave);
            debug_assert_eq!(rebuilt.len(), frames * nf);
            for i in 0..spec.len() {
                let accel = rebuilt[i] + (rebuilt[i] - prev[i]) * (momentum / (1.0 + momentum));
                prev[i] = rebuilt[i];
                let norm = accel.norm();
                let phase = if norm > 1e-16 { accel / norm } else { Complex32::new(1.0, 0.0) };
                spec[i] = phase * mag[i];
            }
            wave = self.istft(&spec, len);
        }
        Ok(wave)
    }

    /// Normalised log-mel of `wave` (`aios_train.media.log_mel`); tests and round trips.
    pub fn log_mel(&self, wave: &[f32]) -> Vec<f32> {
        let nf = self.n_freq();
        let spec = self.stft(wave);
        let frames = spec.len() / nf;
        let mut out = Vec::with_capacity(frames * self.n_mels);
        for f in 0..frames {
            for m in 0..self.n_mels {
                let e: f32 = (0..nf).map(|k| self.fb[m * nf + k] * spec[f * nf + k].norm()).sum();
                out.push((e.max(1e-5).ln() - AUDIO_LOG_MEAN) / AUDIO_LOG_SCALE);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stft_istft_round_trip() {
        let spec = MelSpec::new(22_050, 1024, 256, 64).unwrap();
        let n = spec.samples_for(40);
        let wave: Vec<f32> = (0..n).map(|i| (i as f32 * 0.05).sin() * 0.5 + (i as f32 * 0.31).cos() * 0.2).collect();
        let back = spec.istft(&spec.stft(&wave), n);
        let err = wave.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err < 1e-4, "{err}");
    }

    #[test]
    fn griffin_lim_reproduces_the_mel_of_a_tone() {
        let spec = MelSpec::new(22_050, 1024, 256, 64).unwrap();
        let n = spec.samples_for(48);
        let wave: Vec<f32> =
            (0..n).map(|i| 0.4 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 22_050.0).sin()).collect();
        let target = spec.log_mel(&wave);
        let rebuilt = spec.to_waveform(&target, 32).unwrap();
        let got = spec.log_mel(&rebuilt);
        // Compare where there is energy (above the floor).
        let (mut err, mut n) = (0f32, 0);
        for (a, b) in target.iter().zip(&got) {
            if *a > -1.0 {
                err += (a - b).abs();
                n += 1;
            }
        }
        assert!(n > 0 && err / (n as f32) < 0.1, "mean log-mel error {}", err / n as f32);
    }
}
