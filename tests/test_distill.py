"""Few-step students (aios_train.distill, SDTT): the teacher's targets follow the runtime's ancestral step, training
resumes exactly, the student file carries its step count, the runtime reads it (info, warning past it) and runs the
student with PyTorch's outputs; bad settings are refused."""

import json

import numpy as np
import pytest
import torch

import _train_path  # noqa: F401
import aios_rt
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.config import ModelConfig
from aios_train.distill import (DistillArgs, categorical, distill, distill_loss, read_distill_meta, subs_log_probs,
                                teacher_targets)
from aios_train.export import load_model, read_tensors, save_model
from aios_train.model import DiT, randomize_
from aios_train.windows import make_windows

TEXTS = [f"the cat sat on the mat and the dog ran to the park number {i} with a red ball" for i in range(60)]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    tok = train_tiny_tokenizer(d / "tokenizer.json", TEXTS, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, n_layers=2, n_heads=2, cond_dim=16,
                      max_length=24, mask_token_id=3)
    save_model(randomize_(DiT(cfg), seed=0), cfg, d / "model.f32.parquet")
    return d, make_windows(TEXTS, tok, 24)


def test_categorical_and_losses():
    lp = torch.log(torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0]]).clamp_min(1e-30))
    assert categorical(lp, torch.tensor([0.05, 0.99])).tolist() == [0, 0]
    assert categorical(lp, torch.tensor([0.25, 0.5])).tolist() == [1, 0]
    assert categorical(lp, torch.tensor([0.95, 0.5])).tolist() == [2, 0]
    p = torch.log_softmax(torch.randn(4, 7), -1)
    for kind in ("kl-bwd", "kl-fwd", "mse", "tvd"):
        assert float(distill_loss(p, p, kind).abs().max()) < 1e-6
        assert float(distill_loss(p, torch.log_softmax(torch.randn(4, 7), -1), kind).min()) > 0
    with pytest.raises(ValueError, match="unknown loss"):
        distill_loss(p, p, "l1")


def test_teacher_targets_follow_the_ancestral_step(teacher):
    d, _ = teacher
    model, cfg = load_model(d / "model.f32.parquet")
    m = cfg.mask_token_id
    xt = torch.full((2, 10), m)
    xt[:, 0] = 1
    t = torch.tensor([1.0, 0.5])
    k, dt = 2, 0.25
    u_rev = torch.rand(k, 2, 10, generator=torch.Generator().manual_seed(0))
    u_tok = torch.rand(k, 2, 10, generator=torch.Generator().manual_seed(1))
    tg = teacher_targets(model, xt, t, dt, k, m, u_rev, u_tok)
    # Re-run the two steps by hand: positions revealed in step 1 get step 1's log p, the rest step 2's.
    with torch.no_grad():
        lp1 = subs_log_probs(model(xt), xt, m)
        go1 = (xt == m) & (u_rev[0] < (dt / t)[:, None])
        x1 = xt.clone()
        x1[go1] = categorical(lp1[go1], u_tok[0][go1])
        lp2 = subs_log_probs(model(x1), x1, m)
    assert torch.allclose(tg[go1], lp1[go1])
    rest = (xt == m) & ~go1
    assert torch.allclose(tg[rest], lp2[rest])
    assert go1[1].sum() > go1[0].sum()  # reveal probability dt / t is larger at t = 0.5
    assert float(tg[xt != m].abs().sum()) == 0.0  # given positions have no target


def _args(d, windows, tmp_path, **kw):
    return DistillArgs(teacher=str(d), out=str(tmp_path / "student.parquet"), run=str(tmp_path / "run"),
                       train_windows=windows, teacher_steps=8, student_steps=2, round_steps=3, batch_size=4,
                       lr=1e-3, warmup=1, ckpt_every=2, progress=False, **kw)


def test_resume_is_exact_and_the_student_is_tagged(teacher, tmp_path):
    d, windows = teacher
    full = distill(_args(d, windows, tmp_path / "a"))
    assert full["done"] and full["rounds"] == 2 and full["steps"] == 6
    cut = distill(_args(d, windows, tmp_path / "b", stop_after=4))  # inside round 2: resumes its teacher
    assert cut["stopped_early"] and not (tmp_path / "b" / "student.parquet").exists()
    distill(_args(d, windows, tmp_path / "b", time_limit_min=60.0, threads=2))  # how it runs may change
    a, b = (read_tensors(tmp_path / x / "student.parquet")[0] for x in ("a", "b"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    meta = read_distill_meta(tmp_path / "a" / "student.parquet")
    assert meta["method"] == "sdtt" and meta["student_steps"] == 2 and meta["teacher_steps"] == 8
    assert read_distill_meta(tmp_path / "a" / "run" / "round1-4steps.parquet")["student_steps"] == 4
    assert read_distill_meta(d / "model.f32.parquet") is None
    with pytest.raises(ValueError, match="other settings"):
        distill(_args(d, windows, tmp_path / "a", loss="tvd"))


def test_runtime_runs_the_student_like_pytorch_and_warns_past_its_steps(teacher, tmp_path):
    d, windows = teacher
    distill(_args(d, windows, tmp_path))
    student = tmp_path / "student.parquet"
    (tmp_path / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    eng = aios_rt.Engine(str(student), threads=1)
    assert eng.info["student_steps"] == 2
    assert aios_rt.Engine(str(d), threads=1).info["student_steps"] is None
    model, _ = load_model(student)
    toks = [[1, 5, 6, 3, 3, 3, 9, 3]]
    with torch.no_grad():
        want = model(torch.tensor(toks)).numpy()
    assert np.abs(eng.logits(toks) - want).max() < 1e-4
    ok = eng.diffuse("the cat", length=16, steps=2, sampler="ancestral", seed=0)
    assert not ok.warnings
    more = eng.diffuse("the cat", length=16, steps=8, sampler="ancestral", seed=0)
    assert any("distilled for 2 sampling steps" in w for w in more.warnings)


@pytest.mark.parametrize("kw,msg", [(dict(teacher_steps=8, student_steps=3), "power of"),
                                    (dict(teacher_steps=4, student_steps=4), "fewer than"),
                                    (dict(distill_steps=1), "distill_steps"),
                                    (dict(loss="l2"), "unknown loss")])
def test_bad_settings_are_refused(teacher, tmp_path, kw, msg):
    d, windows = teacher
    a = _args(d, windows, tmp_path)
    for k, v in kw.items():
        setattr(a, k, v)
    with pytest.raises(ValueError, match=msg):
        distill(a)


def test_autoregressive_teacher_is_refused(teacher, tmp_path):
    d, windows = teacher
    cfg = ModelConfig(vocab_size=300, hidden_size=32, n_layers=1, n_heads=2, cond_dim=16, max_length=24,
                      mask_token_id=3, causal=True)
    save_model(randomize_(DiT(cfg), seed=0), cfg, tmp_path / "ar.parquet")
    a = _args(tmp_path / "ar.parquet", windows, tmp_path)
    with pytest.raises(ValueError, match="autoregressive"):
        distill(a)
