"""Image and audio data for the unified model, built offline and reproducibly (see DATA.md).

`python -m aios_train data-mm --out data/mm` writes
  images.npz  train_x [60000, 28, 28] u8, train_y, test_x [10000, 28, 28] u8, test_y  (Fashion-MNIST)
  audio.npz   train_x [N, frames, mels] f16 normalised log-mel, train_y, train_voice, test_x, test_y, test_voice
  SOURCES.json  packages, versions, licenses, voices held out, counts
Images: Debian `dataset-fashion-mnist` (MIT). Audio: spoken number words synthesised by Debian `espeak-ng`
(GPL-3 program; its output is not covered by the GPL) over accents x voice variants x rates x pitches.
Whole accents are held out for the test set, so the evaluation speakers never occur in training.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .data import DataError, _ensure_installed
from .media import log_mel, mel_filterbank, samples_for_frames, wav_read

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Class names with the article a caption uses ("a sneaker"); index = Fashion-MNIST label.
FASHION_CLASSES = ["t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
FASHION_CAPTIONS = ["a t-shirt", "trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker",
                    "a bag", "an ankle boot"]
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TRAIN_ACCENTS = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp", "en-gb-x-gbcwmd"]
TEST_ACCENTS = ["en-029", "en-us-nyc"]
VARIANTS = ["", "+m1", "+m3", "+m5", "+m7", "+f1", "+f2", "+f3", "+f4", "+klatt"]
TRAIN_RATES, TRAIN_PITCHES = [130, 165, 200], [35, 50, 70]
TEST_RATES, TEST_PITCHES = [145, 185], [40, 60]

# Audio features (stored in the model config; the runtime inverts them).
SAMPLE_RATE, N_FFT, HOP, N_MELS, FRAMES = 22050, 1024, 256, 64, 96
LEAD_SAMPLES = 1024  # silence kept before the word starts


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic:#x})")
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataError(f"{path}: {arr.size} bytes for dims {dims}")
    return arr.reshape(dims)


def fashion_mnist() -> tuple[dict, dict]:
    version = _ensure_installed("dataset-fashion-mnist")
    d = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        d[f"{split}_x"] = read_idx(FASHION_DIR / f"{stem}-images-idx3-ubyte.gz")
        d[f"{split}_y"] = read_idx(FASHION_DIR / f"{stem}-labels-idx1-ubyte.gz").astype(np.int64)
    info = {"package": f"debian dataset-fashion-mnist {version}", "license": "MIT",
            "train": int(len(d["train_y"])), "test": int(len(d["test_y"])), "classes": FASHION_CLASSES}
    return d, info


def fit_clip(wave: np.ndarray, n: int, lead: int = LEAD_SAMPLES, thresh: float = 0.01) -> np.ndarray:
    """Trim leading/trailing near-silence, start the word `lead` samples in, pad or cut to n samples."""
    loud = np.flatnonzero(np.abs(wave) > thresh)
    if loud.size:
        wave = wave[max(0, loud[0] - 64): loud[-1] + 64]
    out = np.zeros(n, dtype=np.float32)
    k = min(len(wave), n - lead)
    out[lead: lead + k] = wave[:k]
    return out


def speak(word: str, voice: str, rate: int, pitch: int) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".wav") as f:
        r = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "-w", f.name, word],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"espeak-ng failed for {voice!r}: {r.stderr.strip()}")
        x, sr = wav_read(f.name)
    if sr != SAMPLE_RATE:
        raise DataError(f"espeak-ng wrote {sr} Hz, expected {SAMPLE_RATE}")
    return x


def speech_set(accents, rates, pitches, desc: str, threads: int = 2):
    jobs = [(w, a + v, r, p) for w in range(len(DIGIT_WORDS)) for a in accents for v in VARIANTS
            for r in rates for p in pitches]
    fb = mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS)
    n = samples_for_frames(FRAMES, HOP)

    def one(job):
        w, voice, r, p = job
        return log_mel(fit_clip(speak(DIGIT_WORDS[w], voice, r, p), n), SAMPLE_RATE, N_FFT, HOP, N_MELS, fb)

    with ThreadPoolExecutor(threads) as ex:
        mels = list(tqdm(ex.map(one, jobs), total=len(jobs), desc=desc, unit="clip"))
    x = np.stack(mels).astype(np.float16)
    assert x.shape[1:] == (FRAMES, N_MELS), x.shape
    return x, np.array([j[0] for j in jobs], dtype=np.int64), np.array([j[1] for j in jobs])


def build(out: str | Path, threads: int = 2) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    imgs, img_info = fashion_mnist()
    np.savez(out / "images.npz", **imgs)
    version = _ensure_installed("espeak-ng")
    tr_x, tr_y, tr_v = speech_set(TRAIN_ACCENTS, TRAIN_RATES, TRAIN_PITCHES, "espeak-ng train", threads)
    te_x, te_y, te_v = speech_set(TEST_ACCENTS, TEST_RATES, TEST_PITCHES, "espeak-ng test", threads)
    np.savez(out / "audio.npz", train_x=tr_x, train_y=tr_y, train_voice=tr_v, test_x=te_x, test_y=te_y, test_voice=te_v)
    summary = {
        "images": img_info,
        "audio": {"package": f"debian espeak-ng {version}", "license": "GPL-3.0+ (program); synthesised speech",
                  "words": DIGIT_WORDS, "train_accents": TRAIN_ACCENTS, "test_accents (held out)": TEST_ACCENTS,
                  "variants": VARIANTS, "train_rates": TRAIN_RATES, "train_pitches": TRAIN_PITCHES,
                  "test_rates": TEST_RATES, "test_pitches": TEST_PITCHES, "train": int(len(tr_y)), "test": int(len(te_y)),
                  "features": {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "frames": FRAMES}},
        "captions": {"image": FASHION_CAPTIONS, "audio": DIGIT_WORDS},
    }
    for f in ("images.npz", "audio.npz"):
        summary.setdefault("sha256", {})[f] = hashlib.sha256((out / f).read_bytes()).hexdigest()
    (out / "SOURCES.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
