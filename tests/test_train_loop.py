import json

import numpy as np
import torch

import _train_path  # noqa: F401
from aios_train.evaluate import ar_nll, diffusion_nelbo
from aios_train.export import load_model, save_model
from aios_train.train import TrainArgs, lr_at, load_ema_model, train


def _windows(n=256, L=16, V=32, seed=0):
    # A learnable language: counting up from a random start (any visible token determines the rest).
    rng = np.random.default_rng(seed)
    start = rng.integers(4, V, n)[:, None]
    step = 1
    w = 4 + (start + step * np.arange(L)[None]) % (V - 4)
    w[:, 0] = 1
    return w


def _args(tmp, **kw):
    base = dict(out=str(tmp), train_windows=_windows(), valid_windows=_windows(32, seed=1), vocab_size=32,
                hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_length=16, steps=60, batch_size=16,
                lr=3e-3, warmup=5, eval_every=30, eval_windows=16, ckpt_every=10, progress=False)
    return TrainArgs(**{**base, **kw})


def test_diffusion_and_ar_training_reduce_loss(tmp_path):
    for ar in (False, True):
        r = train(_args(tmp_path / f"ar{ar}", ar=ar, steps=150))
        first, last = np.mean(r["losses"][:5]), np.mean(r["losses"][-10:])
        assert last < 0.7 * first, (ar, first, last)
        assert r["tokens"] == 150 * 16 * 16


def test_resume_continues_identically(tmp_path):
    full = train(_args(tmp_path / "full", steps=20))
    assert train(_args(tmp_path / "half", steps=20, stop_after=10))["stopped_early"]
    resumed = train(_args(tmp_path / "half", steps=20))
    assert full["losses"][10:] == resumed["losses"]
    for (k, a), b in zip(full["model"].state_dict().items(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b), k
    for k in full["ema"].shadow:
        assert torch.equal(full["ema"].shadow[k], resumed["ema"].shadow[k]), k


def test_time_limit_counts_this_invocation_only(tmp_path):
    # elapsed_s is cumulative over resumes; the time limit must not be, or a resumed long run stops at once.
    assert train(_args(tmp_path / "d", steps=8, stop_after=4))["stopped_early"]
    state = tmp_path / "d" / "ckpt" / "state.json"
    s = json.loads(state.read_text())
    s["elapsed_s"] = 1e6
    state.write_text(json.dumps(s))
    r = train(_args(tmp_path / "d", steps=8, time_limit_min=60))
    assert not r["stopped_early"] and r["steps"] == 8
    assert r["elapsed_s"] > 1e6  # the log keeps the cumulative clock
    r = train(_args(tmp_path / "e", steps=8, time_limit_min=0))
    assert r["stopped_early"] and r["steps"] == 1


def test_export_and_eval(tmp_path):
    train(_args(tmp_path / "d", steps=10))
    m, cfg = load_ema_model(tmp_path / "d")
    save_model(m, cfg, tmp_path / "d.parquet")
    m2, cfg2 = load_model(tmp_path / "d.parquet")
    w = _windows(8, seed=3)
    a = diffusion_nelbo(m2, w, cfg2.mask_token_id, n_t=4, seed=0, progress=False)
    b = diffusion_nelbo(m2, w, cfg2.mask_token_id, n_t=4, seed=0, progress=False)
    assert a == b and a["tokens"] == 8 * 15 and np.isfinite(a["nats_per_token"])
    train(_args(tmp_path / "a", steps=10, ar=True))
    ma, ca = load_ema_model(tmp_path / "a")
    assert ca.causal and np.isfinite(ar_nll(ma, w, progress=False)["nats_per_token"])


def test_lr_schedule():
    a = TrainArgs(out="x", steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1)
    assert abs(lr_at(0, a) - 0.1) < 1e-9 and abs(lr_at(9, a) - 1.0) < 1e-9
    assert abs(lr_at(99, a) - 0.1) < 0.01 and lr_at(50, a) < lr_at(20, a)
