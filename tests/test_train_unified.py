"""Joint training of the unified model (tiny config, synthetic data files): losses, resume, export."""

import json
from pathlib import Path

import numpy as np
import torch

import _train_path  # noqa: F401
import aios_rt
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.export import save_model
from aios_train.mmdata import DIGIT_WORDS, FASHION_CAPTIONS
from aios_train.unified import UnifiedArgs, load_unified_ema, train_unified


def _data(tmp: Path) -> Path:
    d = tmp / "mm"
    d.mkdir()
    rng = np.random.default_rng(0)
    np.savez(d / "images.npz", train_x=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), train_y=rng.integers(0, 10, 40),
             test_x=rng.integers(0, 256, (10, 8, 8), dtype=np.uint8), test_y=rng.integers(0, 10, 10))
    np.savez(d / "audio.npz", train_x=rng.standard_normal((30, 8, 16)).astype(np.float16), train_y=rng.integers(0, 10, 30),
             train_voice=np.array(["v"] * 30), test_x=rng.standard_normal((5, 8, 16)).astype(np.float16),
             test_y=rng.integers(0, 10, 5), test_voice=np.array(["w"] * 5))
    feats = {"sample_rate": 8000, "n_fft": 256, "hop": 64, "n_mels": 16, "frames": 8}
    (d / "SOURCES.json").write_text(json.dumps({"audio": {"features": feats}}))
    train_tiny_tokenizer(tmp / "tokenizer.json", FASHION_CAPTIONS * 20 + DIGIT_WORDS * 20 + ["the number"] * 20,
                         vocab_size=300)
    return d


def _args(tmp: Path, out: str, steps: int, **kw) -> UnifiedArgs:
    windows = np.random.default_rng(1).integers(4, 300, (16, 128))
    return UnifiedArgs(out=str(tmp / out), data=str(tmp / "mm"), tokenizer=str(tmp / "tokenizer.json"),
                       corpus_windows=windows, steps=steps, image_batch=4, audio_batch=4, text_batch=2, warmup=2,
                       hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, image_size=8, image_patch=4,
                       threads=1, ckpt_every=2, progress=False, **kw)


def test_unified_training_learns_resumes_exactly_and_exports(tmp_path):
    _data(tmp_path)
    full = train_unified(_args(tmp_path, "full", 6))
    assert full["steps"] == 6
    log = [json.loads(l) for l in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert all(np.isfinite([r["img_v"], r["aud_v"], r["img_text"], r["corpus"]]).all() for r in log)
    # Interrupted after 3 steps (time limit 0 stops after the first step, so use two calls), then resumed.
    part = train_unified(_args(tmp_path, "part", 6, time_limit_min=0.0))
    assert part["stopped_early"] and part["steps"] == 1
    resumed = train_unified(_args(tmp_path, "part", 6))
    assert resumed["steps"] == 6
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    model, cfg = load_unified_ema(tmp_path / "full")
    assert cfg.heads() == ["text", "image", "audio"]
    save_model(model, cfg, tmp_path / "m" / "model.f32.parquet")
    (tmp_path / "m" / "tokenizer.json").write_bytes((tmp_path / "tokenizer.json").read_bytes())
    eng = aios_rt.Engine(tmp_path / "m", threads=1)
    g = eng.diffuse("a bag", modality="image", steps=2)
    assert g.image.shape == (8, 8)
    assert eng.info["heads"] == {k: v for k, v in model.parameter_split().items() if k != "backbone"}
    assert eng.info["backbone_params"] == model.parameter_split()["backbone"]


def test_probes_mode_probs_and_audio_time_shift(tmp_path):
    import argparse

    import pytest
    from aios_train.__main__ import probs3

    _data(tmp_path)
    r = train_unified(_args(tmp_path, "probe", 4, probe_every=2, audio_t_shift=4.0, audio_mode_probs=(0.1, 0.8, 0.1)))
    log = [json.loads(l) for l in (tmp_path / "probe" / "log.jsonl").read_text().splitlines()]
    probed = [rec for rec in log if "aud_gap" in rec]
    assert [rec["step"] for rec in probed] == [2, 4] and r["steps"] == 4
    assert all(np.isfinite([rec["img_gap"], rec["aud_gap"]]).all() for rec in probed)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="audio_t_shift"):
            train_unified(_args(tmp_path, "bad", 2, audio_t_shift=bad))
    assert probs3("0.2,0.5,0.3") == (0.2, 0.5, 0.3)
    for bad in ("0.5,0.5", "a,b,c", "0.5,0.6,0.1", "-0.1,0.6,0.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            probs3(bad)
