"""Log-mel features, PNG-free image helpers and the audio normalisation shared with the Rust runtime.

The runtime (crates/aios-core/src/media/) inverts exactly these features: HTK mel scale, triangular
filters without area normalisation, magnitude (not power) STFT with a periodic Hann window and
centred reflect padding (torch.stft / librosa defaults), natural log with a floor, then an affine
normalisation to roughly unit range for the diffusion model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

LOG_FLOOR = 1e-5
# normalised = (ln(max(mel, LOG_FLOOR)) - AUDIO_LOG_MEAN) / AUDIO_LOG_SCALE; chosen from the espeak-ng
# training clips (mean about -4, spread about 4 nats) so the model sees values of order 1.
AUDIO_LOG_MEAN = -4.0
AUDIO_LOG_SCALE = 4.0


def hz_to_mel(f):
    return 2595.0 * np.log10(1.0 + np.asarray(f, dtype=np.float64) / 700.0)


def mel_to_hz(m):
    return 700.0 * (10.0 ** (np.asarray(m, dtype=np.float64) / 2595.0) - 1.0)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """[n_mels, n_fft/2 + 1] triangular HTK filters from 0 Hz to Nyquist, peak 1 (no area norm)."""
    n_freq = n_fft // 2 + 1
    freqs = np.linspace(0.0, sample_rate / 2.0, n_freq)
    pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), n_mels + 2))
    fb = np.zeros((n_mels, n_freq), dtype=np.float64)
    for m in range(n_mels):
        lo, mid, hi = pts[m], pts[m + 1], pts[m + 2]
        up = (freqs - lo) / (mid - lo)
        down = (hi - freqs) / (hi - mid)
        fb[m] = np.maximum(0.0, np.minimum(up, down))
    return fb.astype(np.float32)


def stft_magnitude(wave: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT| [frames, n_fft/2 + 1], frames = 1 + len // hop (centred, reflect padded, periodic Hann)."""
    w = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))
    spec = torch.stft(w, n_fft, hop_length=hop, window=torch.hann_window(n_fft), center=True, pad_mode="reflect",
                      return_complex=True)
    return spec.abs().T.numpy()


def log_mel(wave: np.ndarray, sample_rate: int, n_fft: int, hop: int, n_mels: int,
            fb: np.ndarray | None = None) -> np.ndarray:
    """Normalised log-mel [frames, n_mels] (f32)."""
    fb = mel_filterbank(sample_rate, n_fft, n_mels) if fb is None else fb
    mel = stft_magnitude(wave, n_fft, hop) @ fb.T
    return ((np.log(np.maximum(mel, LOG_FLOOR)) - AUDIO_LOG_MEAN) / AUDIO_LOG_SCALE).astype(np.float32)


def denormalise_mel(x: np.ndarray) -> np.ndarray:
    return np.exp(np.asarray(x, dtype=np.float64) * AUDIO_LOG_SCALE + AUDIO_LOG_MEAN)


def image_to_unit(img_u8: np.ndarray) -> np.ndarray:
    """uint8 pixels -> [-1, 1] f32."""
    return img_u8.astype(np.float32) / 127.5 - 1.0


def unit_to_image(x: np.ndarray) -> np.ndarray:
    """[-1, 1] -> uint8, rounded half away from zero after clamping (the runtime's rule)."""
    return np.clip(np.floor((np.clip(x, -1, 1) + 1.0) * 127.5 + 0.5), 0, 255).astype(np.uint8)


def samples_for_frames(frames: int, hop: int) -> int:
    """Waveform length whose centred STFT has exactly `frames` frames."""
    return (frames - 1) * hop


def wav_read(path: str) -> tuple[np.ndarray, int]:
    """16-bit PCM mono/stereo WAV -> (float32 mono in [-1, 1], sample rate). Standard library only."""
    import wave
    with wave.open(str(path), "rb") as f:
        sr, n, ch, width = f.getframerate(), f.getnframes(), f.getnchannels(), f.getsampwidth()
        raw = f.readframes(n)
    if width != 2:
        raise ValueError(f"{path}: only 16-bit PCM WAV is supported, got {8 * width}-bit")
    x = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if ch > 1:
        x = x.reshape(-1, ch).mean(axis=1)
    return x, sr
