"""Quality of the unified model (models/aios-unified-tiny), measured through aios_rt.

    python bench/unified_quality.py [--model models/aios-unified-tiny] [--per-class 50] [--threads 2]

Held-out judges, trained here in PyTorch and cached in runs/bench-judges/ (regenerable):
  * an image CNN on the Fashion-MNIST training set (its test accuracy is printed; it must be >= 90%);
  * an audio CNN on log-mels of the espeak-ng training voices, tested on the held-out accents.
Measured:
  * image: the judge's agreement with the prompted class at 20 steps (DDIM, guidance --guidance), and the
    Frechet distance in the judge's 128-d feature space between generated images and the test set at
    10/20/50 steps (same number of images per setting; small-sample FD is biased upward, compare rows);
  * audio: the judge recognises the prompted word, on the generated log-mel and on the log-mel of the
    Griffin-Lim waveform (the whole chain to sound);
  * captioning: text generated for real test images names the class; transcription: text generated for
    held-out-voice speech names the word;
  * joint text+image: the generated caption agrees with the judge's reading of the generated image;
  * writes samples/grid.png (one row per class) and a few WAVs into the model folder.
Needs `python -m aios_train data-mm --out data/mm` (the judges' data).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from aios_train.media import log_mel  # noqa: E402
from aios_train.mmdata import DIGIT_WORDS, FASHION_CAPTIONS, FASHION_CLASSES, N_FFT, HOP, N_MELS, SAMPLE_RATE  # noqa: E402
from common import emit, machine, write_png_gray  # noqa: E402


class Judge(nn.Module):
    """Small CNN; `features` is the 128-d penultimate layer used for the Frechet distance."""

    def __init__(self, h: int, w: int, n: int = 10):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (h // 4) * (w // 4), 128)
        self.out = nn.Linear(128, n)
        self.drop = nn.Dropout(0.3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        x = F.max_pool2d(F.relu(self.c3(x)), 2)
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(self.features(x)))


def train_judge(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray, yt: np.ndarray, epochs: int,
                cache: Path) -> tuple[Judge, float]:
    h, w = x.shape[1:]
    model = Judge(h, w)
    path = cache / f"{name}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        xs, ys = torch.from_numpy(x).float()[:, None], torch.from_numpy(y)
        for ep in range(epochs):
            model.train()
            perm = torch.randperm(len(ys))
            for i in range(0, len(ys), 128):
                idx = perm[i:i + 128]
                loss = F.cross_entropy(model(xs[idx]), ys[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            print(f"  {name} epoch {ep + 1}/{epochs}: test accuracy {accuracy(model, xt, yt):.4f}", flush=True)
        cache.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    model.eval()
    return model, accuracy(model, xt, yt)


@torch.no_grad()
def predict(model: Judge, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xs = torch.from_numpy(np.asarray(x, dtype=np.float32))[:, None]
    feats = torch.cat([model.features(xs[i:i + 512]) for i in range(0, len(xs), 512)])
    return model.out(feats).argmax(1).numpy(), feats.numpy().astype(np.float64)


def accuracy(model: Judge, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    return float((predict(model, x)[0] == y).mean())


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(Sa + Sb - 2 (Sa Sb)^1/2), the square root through the eigenvalues of Sa Sb."""
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eig = np.linalg.eigvals(sa @ sb)
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(eig.real, 0, None)).sum())


def caption_class(text: str, names: list[str]) -> int | None:
    """Which class name the caption holds: longest name first, matched as a whole word (so 't-shirt' is not 'shirt')."""
    t = text.lower()
    for i in sorted(range(len(names)), key=lambda i: -len(names[i])):
        if re.search(r"(?<![\w-])" + re.escape(names[i]) + r"(?![\w-])", t):
            return i
    return None


def pixels_unit(img_u8: np.ndarray) -> np.ndarray:
    return img_u8.astype(np.float32) / 255.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-unified-tiny"))
    ap.add_argument("--data", default=str(ROOT / "data" / "mm"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--captions", type=int, default=300)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--fd-steps", default="10,20,50")
    ap.add_argument("--samples", action="store_true", help="write samples/grid.png and WAVs into the model folder")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}")
    imgs = dict(np.load(Path(a.data) / "images.npz"))
    aud = dict(np.load(Path(a.data) / "audio.npz"))
    cache = ROOT / "runs" / "bench-judges"
    t0 = time.time()
    ij, iacc = train_judge("image", pixels_unit(imgs["train_x"]), imgs["train_y"], pixels_unit(imgs["test_x"]),
                           imgs["test_y"], 3, cache)
    aj, aacc = train_judge("audio", aud["train_x"].astype(np.float32), aud["train_y"], aud["test_x"].astype(np.float32),
                           aud["test_y"], 3, cache)
    print(f"judges: image test accuracy {iacc:.4f}, audio held-out-voice accuracy {aacc:.4f} ({time.time() - t0:.0f} s)")
    res: dict = {"judge_image_acc": iacc, "judge_audio_acc": aacc}
    eng = aios_rt.Engine(a.model, threads=a.threads, dtype=a.dtype)
    _, test_feats = predict(ij, pixels_unit(imgs["test_x"]))

    # Image: class agreement at 20 steps, FD at several step counts.
    for steps in [int(s) for s in a.fd_steps.split(",")]:
        t1 = time.time()
        gen, labels = [], []
        for c in range(10):
            for k in range(a.per_class):
                g = eng.diffuse(FASHION_CAPTIONS[c], modality="image", steps=steps, sampler="ddim",
                                guidance=a.guidance, seed=1000 * c + k)
                gen.append(g.image)
                labels.append(c)
        gen = np.stack(gen)
        pred, feats = predict(ij, pixels_unit(gen))
        agree = float((pred == np.array(labels)).mean())
        fd = frechet(feats, test_feats)
        dt = (time.time() - t1) / len(gen)
        print(f"image {steps:>2} steps: judge agrees with the prompt {agree:.3f}, FD {fd:.1f} "
              f"({len(gen)} images, {dt * 1e3:.0f} ms each)", flush=True)
        res[f"image_{steps}"] = {"agreement": agree, "fd": fd, "n": len(gen), "ms_per_image": dt * 1e3}
        if steps == 20 and a.samples:
            rows = [np.concatenate(list(gen[c * a.per_class: c * a.per_class + 8]), axis=1) for c in range(10)]
            out = Path(a.model) / "samples"
            out.mkdir(exist_ok=True)
            write_png_gray(out / "grid.png", np.kron(np.concatenate(rows, axis=0), np.ones((2, 2), np.uint8)))

    # Audio: the judge recognises the prompted word.
    hits_mel, hits_wav, n = 0, 0, 0
    for w, word in enumerate(DIGIT_WORDS):
        for k in range(max(4, a.per_class // 5)):
            g = eng.diffuse(word, modality="audio", steps=20, sampler="ddim", guidance=a.guidance, seed=k)
            pm, _ = predict(aj, g.log_mel[None])
            pw, _ = predict(aj, log_mel(g.audio, SAMPLE_RATE, N_FFT, HOP, N_MELS)[None])
            hits_mel += int(pm[0] == w)
            hits_wav += int(pw[0] == w)
            n += 1
            if a.samples and k == 0 and word in ("zero", "three", "seven"):
                g.save(Path(a.model) / "samples" / f"{word}.wav")
    res["audio"] = {"recognised_log_mel": hits_mel / n, "recognised_waveform": hits_wav / n, "n": n}
    print(f"audio: judge recognises the word on the generated log-mel {hits_mel / n:.3f}, "
          f"after Griffin-Lim {hits_wav / n:.3f} ({n} clips)", flush=True)

    # Captioning real test images and transcribing held-out voices.
    rng = np.random.default_rng(0)
    idx = rng.choice(len(imgs["test_y"]), a.captions, replace=False)
    ok = 0
    for i in idx:
        g = eng.diffuse(modality="text", image=imgs["test_x"][i], steps=10, seed=int(i), temperature=0.0)
        ok += int(caption_class(g.text, FASHION_CLASSES) == imgs["test_y"][i])
    res["captioning"] = ok / len(idx)
    print(f"captioning: {ok / len(idx):.3f} of {len(idx)} test images named correctly", flush=True)
    from aios_train.media import AUDIO_LOG_MEAN, AUDIO_LOG_SCALE  # noqa: F401  (features are given as waveforms)
    aidx = rng.choice(len(aud["test_y"]), min(a.captions, len(aud["test_y"])), replace=False)
    ok = 0
    for i in aidx:
        # The runtime featurises given audio itself; rebuild a waveform from the stored clip's log-mel is lossy,
        # so synthesise the held-out clip's word again with its voice instead.
        wave_ = _held_out_wave(str(aud["test_voice"][i]), int(aud["test_y"][i]), i)
        g = eng.diffuse(modality="text", audio=wave_, steps=10, seed=int(i), temperature=0.0)
        ok += int(caption_class(g.text, DIGIT_WORDS) == aud["test_y"][i])
    res["transcription"] = ok / len(aidx)
    print(f"transcription: {ok / len(aidx):.3f} of {len(aidx)} held-out-voice clips named correctly", flush=True)

    # Joint text+image: does the caption agree with the image?
    ok, named = 0, 0
    for k in range(a.captions):
        g = eng.diffuse(modality=["text", "image"], steps=20, seed=k, temperature=0.0)
        c = caption_class(g.text, FASHION_CLASSES)
        named += c is not None
        ok += int(c is not None and predict(ij, pixels_unit(g.image[None]))[0][0] == c)
    res["joint"] = {"agreement": ok / a.captions, "named_a_class": named / a.captions}
    print(f"joint text+image: caption agrees with the judge on the image {ok / a.captions:.3f} "
          f"(a class named in {named / a.captions:.3f})", flush=True)
    emit("unified_quality", res)


_RATES, _PITCHES = [145, 185], [40, 60]


def _held_out_wave(voice: str, word: int, i: int) -> np.ndarray:
    from aios_train.media import samples_for_frames
    from aios_train.mmdata import FRAMES, fit_clip, speak
    return fit_clip(speak(DIGIT_WORDS[word], voice, _RATES[i % 2], _PITCHES[(i // 2) % 2]), samples_for_frames(FRAMES, HOP))


if __name__ == "__main__":
    main()
