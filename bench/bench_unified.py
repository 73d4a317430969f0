"""Speed of the unified model's generations: aios_rt (Rust) vs the PyTorch reference on identical weights and
steps, in the same run; then capacity checks of the ~100M-parameter edge configuration with random weights.

    python bench/bench_unified.py [--model models/aios-unified-tiny] [--threads 2] [--runs 5]

Timed (median of --runs after one warm-up):
  * image 28x28 at 20 DDIM steps with guidance 3 (batch 2 per step: conditional + unconditional);
  * audio, 1.1 s of log-mel at 20 DDIM steps (the Rust time includes 48 Griffin-Lim iterations);
  * joint text+image in one loop (20 steps) vs text then image sequentially (20 + 20 steps);
  * edge capacity: 1,024 image positions (a 512x512 image as a 32x32 latent grid, 4 channels, patch 1) for
    20 steps, and 3 s of audio (258 frames) for 20 steps, int8 weights, against the design's targets
    "512x512 image < 30 s" and "speech < 2 s" on 2 cores.
PyTorch runs `aios_train.continuous.sample_reference` (eager, torch.randn noise) and, for text, a confidence
sampler loop of the same steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from aios_train.continuous import sample_reference  # noqa: E402
from aios_train.export import load_model  # noqa: E402
from common import emit, machine, median_ms  # noqa: E402


def caption(eng, text: str, n: int = 12) -> torch.Tensor:
    ids = eng.encode(text)
    return torch.tensor([[1] + ids + [2] + [0] * (n - 2 - len(ids))])


@torch.no_grad()
def torch_text_then_image(model, steps: int, n: int = 12) -> None:
    """Caption by confidence decoding (image absent), then the image from that caption."""
    cfg = model.config
    toks = torch.full((1, n), cfg.mask_token_id)
    toks[0, 0] = cfg.bos_token_id
    per = (n - 1 + steps - 1) // steps
    for _ in range(steps):
        masked = (toks[0] == cfg.mask_token_id).nonzero().flatten()
        if len(masked) == 0:
            break
        logits = model.forward_canvas(toks)["text"][0, masked]
        logits[:, cfg.mask_token_id] = -1e9
        p, tok = logits.softmax(-1).max(-1)
        order = p.argsort(descending=True)[:per]
        toks[0, masked[order]] = tok[order]
    sample_reference(model, toks, "image", steps, runtime_noise=False)


@torch.no_grad()
def torch_joint(model, steps: int, n: int = 12) -> None:
    """Text and image in one loop: each step one forward pass over [text | image]."""
    from aios_train.continuous import ddim_step, timesteps
    cfg = model.config
    toks = torch.full((1, n), cfg.mask_token_id)
    toks[0, 0] = cfg.bos_token_id
    x = torch.randn(1, 1, cfg.image_size, cfg.image_size)
    ts = timesteps(steps)
    per = (n - 1 + steps - 1) // steps
    for i in range(steps):
        out = model.forward_canvas(toks, image=x, t_image=torch.tensor([ts[i]]))
        masked = (toks[0] == cfg.mask_token_id).nonzero().flatten()
        if len(masked):
            logits = out["text"][0, masked]
            logits[:, cfg.mask_token_id] = -1e9
            p, tok = logits.softmax(-1).max(-1)
            order = p.argsort(descending=True)[:per]
            toks[0, masked[order]] = tok[order]
        x = ddim_step(x, out["image"], ts[i], ts[i + 1], 0.0, None, 1.0)


EDGE_IMAGE = dict(vocab_size=4096, hidden_size=768, n_layers=11, n_heads=12, cond_dim=256, max_length=1040,
                  mask_token_id=3, image_size=32, image_channels=4, image_patch=1)
EDGE_AUDIO = dict(vocab_size=4096, hidden_size=768, n_layers=11, n_heads=12, cond_dim=256, max_length=128,
                  mask_token_id=3, audio_mels=64, audio_frames=260, audio_frames_per_token=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-unified-tiny"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-edge", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}")
    res: dict = {}
    eng = aios_rt.Engine(a.model, threads=a.threads)
    model, _ = load_model(Path(a.model) / "model.f32.parquet")
    s = a.steps
    cases = {
        "image": (lambda: eng.diffuse("a sneaker", modality="image", steps=s, sampler="ddim", guidance=3.0, seed=0),
                  lambda: sample_reference(model, caption(eng, "a sneaker"), "image", s, guidance=3.0,
                                           uncond_tokens=torch.full((1, 12), 3), runtime_noise=False)),
        "audio": (lambda: eng.diffuse("seven", modality="audio", steps=s, sampler="ddim", guidance=3.0, seed=0),
                  lambda: sample_reference(model, caption(eng, "seven"), "audio", s, guidance=3.0,
                                           uncond_tokens=torch.full((1, 12), 3), runtime_noise=False)),
        "joint": (lambda: eng.diffuse(modality=["text", "image"], steps=s, seed=0, temperature=0.0),
                  lambda: torch_joint(model, s)),
        "text_then_image": (lambda: (eng.diffuse(modality="text", length=12, steps=s, seed=0, temperature=0.0),
                                     eng.diffuse("a sneaker", modality="image", steps=s, seed=0)),
                            lambda: torch_text_then_image(model, s)),
    }
    for name, (rust, ref) in cases.items():
        r_ms, _ = median_ms(rust, a.runs)
        t_ms, _ = median_ms(ref, a.runs)
        print(f"{name:<16} {s} steps: aios_rt {r_ms:8.1f} ms, PyTorch {t_ms:8.1f} ms, ratio {t_ms / r_ms:4.1f}x")
        res[name] = {"rust_ms": r_ms, "torch_ms": t_ms, "speedup": t_ms / r_ms}
    if not a.skip_edge:
        with tempfile.TemporaryDirectory() as d:
            for name, cfg, kw in [("edge_image_1024", EDGE_IMAGE, dict(modality="image")),
                                  ("edge_audio_3s", EDGE_AUDIO, dict(modality="audio"))]:
                for dtype in ["int8", "f32"]:
                    path = Path(d) / f"{name}.{dtype}.parquet"
                    aios_rt.write_random_model(path, json.dumps(cfg), seed=0, dtype=dtype)
                    e = aios_rt.Engine(path, threads=a.threads)
                    params = e.info["backbone_params"] + e.info["head_params"]
                    canvas = [1, 3, 3, 3]  # a 4-token caption segment: ids only, no tokenizer needed
                    ms, _ = median_ms(lambda: e.forward_canvas(
                        [canvas, canvas],
                        **({"image": np.zeros((2, 4, 32, 32), np.float32), "t_image": [0.5, 0.5]} if "image" in name
                           else {"audio": np.zeros((2, 260, 64), np.float32), "t_audio": [0.5, 0.5]})), 1)
                    total = ms * s
                    print(f"{name} ({dtype}, {params / 1e6:.1f} M params): one guided step {ms:.0f} ms -> "
                          f"{s} steps {total / 1e3:.1f} s")
                    res[f"{name}/{dtype}"] = {"step_ms": ms, "total_s": total / 1e3, "params": params}
                    del e
    emit("unified_speed", res)


if __name__ == "__main__":
    main()
