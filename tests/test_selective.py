"""L3 selective fine-tuning, Python side and parity: gradient attribution picks the modules, only they change and
only they are written; the patch file gives the same logits in aios_rt (Engine.load_patch) as in PyTorch
(apply_patch), over an f32 base; bad patch files are refused on both sides; the CLI writes a usable patch."""

import json

import numpy as np
import pytest
import torch

import _train_path  # noqa: F401
import aios_rt
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.__main__ import main
from aios_train.config import ModelConfig
from aios_train.export import FormatError, load_model, model_tensors, save_model, write_tensors
from aios_train.model import DiT, randomize_
from aios_train.selective import (PatchTrainArgs, apply_patch, attribute, candidate_modules, read_patch, save_patch,
                                  train_patch)


def _text(seed=0, n=40):
    rng = np.random.default_rng(seed)
    subj = ["Alice", "Bob", "the cat", "a farmer", "the king"]
    verb = ["sees", "likes", "feeds", "follows"]
    obj = ["the dog", "a bird", "the river", "bread"]
    return ["  ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(8)) for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("base")
    paras = _text()
    tok = train_tiny_tokenizer(d / "tokenizer.json", paras, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, n_layers=2, n_heads=2, cond_dim=16,
                      max_length=32, mask_token_id=3, time_conditioning=True)
    save_model(randomize_(DiT(cfg), seed=0), cfg, d / "model.f32.parquet")
    (d / "notes.txt").write_text("\n\n".join(paras))
    return d


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "notes.patch.parquet"
    r = train_patch(PatchTrainArgs(base=str(base), data=str(base / "notes.txt"), out=str(out), top_k=3, steps=40,
                                   lr=3e-3, valid_fraction=0.2, eval_n_t=4, progress=False))
    return out, r


def test_attribution_picks_the_modules_and_only_they_change(base, trained):
    out, r = trained
    model, cfg = load_model(base / "model.f32.parquet")
    assert set(r["scores"]) == set(candidate_modules(cfg)) and all(s > 0 for s in r["scores"].values())
    assert r["modules"] == sorted(r["scores"], key=lambda m: -r["scores"][m])[:3]
    before = model_tensors(model)
    after = model_tensors(r["model"])
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    tensors, pcfg = read_patch(out)
    assert changed == set(tensors) == set(pcfg["tensors"])
    assert {n.rsplit(".", 1)[0] for n in tensors} == set(r["modules"])
    assert r["val_nats_after"] < r["val_nats_before"]  # it learned the context
    # attribute() leaves the model as it was.
    attribute(model, np.zeros((4, cfg.max_length), dtype=np.int64) + 5, cfg.mask_token_id, batches=1, batch_size=2)
    assert all(np.array_equal(v, model_tensors(model)[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_runtime_patch_matches_pytorch(base, trained):
    out, r = trained
    model, cfg = load_model(base / "model.f32.parquet")
    patched = apply_patch(load_model(base / "model.f32.parquet")[0], out)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, cfg.max_length)).tolist()
    sigma = 0.6
    with torch.inference_mode():
        t = torch.tensor(tokens)
        want = patched(t, torch.full((2,), sigma)).numpy()
        plain = model(t, torch.full((2,), sigma)).numpy()
    eng = aios_rt.Engine(base, threads=1)
    assert np.abs(eng.logits(tokens, sigma=sigma) - plain).max() < 1e-4
    assert eng.load_patch(out) == "notes" and eng.active_patch == "notes" and eng.loaded_patches == ["notes"]
    got = eng.logits(tokens, sigma=sigma)
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(got - plain).max() > 1e-3  # the patch matters
    g = eng.diffuse("Alice sees", length=24, steps=4)
    assert g.patch == "notes"
    eng.set_patch(None)
    assert np.abs(eng.logits(tokens, sigma=sigma) - plain).max() < 1e-4
    eng.set_patch("notes")
    eng.unload_patch("notes")
    assert eng.active_patch is None and eng.diffuse("Alice sees", length=24, steps=4).patch is None
    assert np.array_equal(eng.logits(tokens, sigma=sigma), aios_rt.Engine(base, threads=1).logits(tokens, sigma=sigma))


def test_bad_patches_are_refused_on_both_sides(base, trained, tmp_path):
    out, r = trained
    tensors, cfg = read_patch(out)
    name = sorted(tensors)[0]
    eng = aios_rt.Engine(base, threads=1)
    bad = {
        "nan": ({**tensors, name: np.full_like(tensors[name], np.nan)}, cfg, "non-finite"),
        "shape": ({**tensors, name: tensors[name].T.copy() if tensors[name].ndim == 2 else tensors[name][:-1]}, cfg,
                  "shape"),
        "unknown": ({**tensors, "blocks.9.attn_qkv.weight": tensors[name]},
                    {**cfg, "tensors": cfg["tensors"] + ["blocks.9.attn_qkv.weight"]}, "not a tensor of"),
        "fingerprint": (tensors, {**cfg, "base_fingerprint": "0123456789abcdef"}, "0123456789abcdef"),
    }
    for label, (t, c, msg) in bad.items():
        p = tmp_path / f"{label}.patch.parquet"
        if label in ("nan", "shape", "unknown"):
            with pytest.raises(FormatError, match=msg):
                save_patch(p, t, c)
            write_tensors(p, t, kind="patch", config=c)  # bypass the check: the runtime must refuse it too
            with pytest.raises(FormatError, match=msg):
                read_patch(p)
        else:
            save_patch(p, t, c)
            with pytest.raises(ValueError, match=msg):
                apply_patch(load_model(base / "model.f32.parquet")[0], p)
        with pytest.raises(Exception) as e:
            eng.load_patch(p)
        assert isinstance(e.value, (aios_rt.FormatError, aios_rt.ConfigError)), e.value
    with pytest.raises(aios_rt.FormatError, match="not a tensor patch"):
        eng.load_patch(base / "model.f32.parquet")
    assert eng.loaded_patches == [] and eng.active_patch is None
    with pytest.raises(ValueError, match="unknown modules"):
        train_patch(PatchTrainArgs(base=str(base), data=str(base / "notes.txt"), out=str(tmp_path / "x.parquet"),
                                   modules=["blocks.0.nope"], steps=1, progress=False))


def test_cli_patch_then_aios_run(base, tmp_path, capsys):
    out = tmp_path / "cli.patch.parquet"
    assert main(["patch", "--base", str(base), "--data", str(base / "notes.txt"), "--out", str(out),
                 "--modules", "blocks.1.mlp.2", "--steps", "5", "--eval-n-t", "2", "--valid-fraction", "0.2"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rec["modules"] == ["blocks.1.mlp.2"]
    assert sorted(read_patch(out)[0]) == ["blocks.1.mlp.2.bias", "blocks.1.mlp.2.weight"]
    eng = aios_rt.Engine(base, threads=1)
    eng.load_patch(out, name="cli")
    assert eng.diffuse("Bob likes", length=24, steps=4).patch == "cli"
