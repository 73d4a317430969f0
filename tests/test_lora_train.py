"""LoRA adapters, Python side: fingerprint, the adapter container, peft training, PEFT-folder import."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import _train_path  # noqa: F401
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.__main__ import main
from aios_train.config import ModelConfig
from aios_train.export import (FormatError, load_model, model_fingerprint, model_tensors, read_fingerprint,
                               read_metadata, read_tensors, save_model, write_tensors)
from aios_train.lora import (LoraTrainArgs, apply_lora, base_fingerprint, check_lora, import_peft, lora_scale,
                             read_documents, read_lora, resolve_targets, save_lora, split_documents, train_lora)
from aios_train.model import DiT, randomize_
from aios_train.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TARGETS = "attn_qkv,mlp.0,output_layer.linear"
FULL_TARGETS = ["blocks.0.attn_qkv", "blocks.0.mlp.0", "blocks.1.attn_qkv", "blocks.1.mlp.0", "output_layer.linear"]


def _text(seed=0, n=60):
    rng = np.random.default_rng(seed)
    subj = ["Alice", "Bob", "the cat", "a farmer", "the king"]
    verb = ["sees", "likes", "feeds", "follows"]
    obj = ["the dog", "a bird", "the river", "bread"]
    return ["  ".join(f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}." for _ in range(8)) for _ in range(n)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random DiT saved as a model folder (model.f32.parquet + tokenizer.json) plus notes.txt."""
    d = tmp_path_factory.mktemp("base")
    paras = _text()
    tok = train_tiny_tokenizer(d / "tokenizer.json", paras, vocab_size=300)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, n_layers=2, n_heads=2, cond_dim=16,
                      max_length=32, mask_token_id=3)
    save_model(randomize_(DiT(cfg), seed=0), cfg, d / "model.f32.parquet")
    (d / "notes.txt").write_text("\n\n".join(paras))
    return d


@pytest.fixture(scope="module")
def trained(base, tmp_path_factory):
    d = tmp_path_factory.mktemp("trained")
    a = LoraTrainArgs(base=str(base), data=str(base / "notes.txt"), out=str(d / "notes.lora.parquet"), rank=4, alpha=8,
                      target_modules=TARGETS, steps=60, lr=3e-3, seed=0, eval_n_t=4, save_peft=str(d / "peft"),
                      progress=False)
    r = train_lora(a)
    r["dir"] = d
    return r


def _x(cfg, seed=0, b=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, cfg.vocab_size, (b, cfg.max_length), generator=g)
    x[:, 0] = 1
    x[torch.rand(x.shape, generator=g) < 0.4] = cfg.mask_token_id
    return x


# ---------------------------------------------------------------- fingerprint

def test_fingerprint_layout_stability_and_sensitivity(tmp_path):
    cfg = {"b": 1, "a": [1.5, "x"]}
    t = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "a.b": np.array([0.5, -2.0], dtype=np.float32)}
    # Independent re-implementation of the documented byte layout (the Rust side computes the same).
    h = hashlib.sha256(b'{"a": [1.5, "x"], "b": 1}')
    for name, shape, vals in (("a.b", (2,), [0.5, -2.0]), ("w", (2, 3), list(range(6)))):
        h.update(name.encode() + b"\0" + np.array(shape, "<i8").tobytes() + np.array(vals, "<f4").tobytes())
    fp = model_fingerprint(t, cfg)
    assert fp == h.hexdigest()[:16] and len(fp) == 16
    assert model_fingerprint(dict(reversed(list(t.items()))), {"a": [1.5, "x"], "b": 1}) == fp  # order-free
    assert model_fingerprint({k: torch.from_numpy(v) for k, v in t.items()}, cfg) == fp
    assert model_fingerprint({k: v.astype(np.float64) for k, v in t.items()}, cfg) == fp  # hashed as f32
    t2 = {k: v.copy() for k, v in t.items()}
    t2["w"][1, 2] = np.nextafter(np.float32(5), np.float32(6))
    assert model_fingerprint(t2, cfg) != fp
    assert model_fingerprint(t, {**cfg, "b": 2}) != fp
    assert model_fingerprint({"w": t["w"].reshape(3, 2), "a.b": t["a.b"]}, cfg) != fp  # shape is hashed


def test_save_model_stores_fingerprint(tmp_path):
    cfg = ModelConfig(vocab_size=40, hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_length=12, mask_token_id=3)
    m = randomize_(DiT(cfg), seed=3)
    want = model_fingerprint(model_tensors(m), cfg.to_dict())
    save_model(m, cfg, tmp_path / "m.parquet")
    save_model(m, cfg, tmp_path / "m16.parquet", dtype="bf16")
    assert read_fingerprint(tmp_path / "m.parquet") == want == read_fingerprint(tmp_path / "m16.parquet")
    assert base_fingerprint(tmp_path / "m.parquet") == want
    # Reloaded from f32, the weights hash the same; one changed weight does not.
    m2, _ = load_model(tmp_path / "m.parquet")
    assert model_fingerprint(model_tensors(m2), cfg.to_dict()) == want
    with torch.no_grad():
        m2.blocks[1].mlp[2].bias[0] += 1e-3
    save_model(m2, cfg, tmp_path / "m2.parquet")
    assert read_fingerprint(tmp_path / "m2.parquet") != want
    # Old files without the key: None, and base_fingerprint computes the value save_model would store.
    write_tensors(tmp_path / "old.parquet", model_tensors(m), kind="model", config=cfg.to_dict())
    assert read_fingerprint(tmp_path / "old.parquet") is None
    assert base_fingerprint(tmp_path / "old.parquet") == want
    write_tensors(tmp_path / "old16.parquet", model_tensors(m), kind="model", config=cfg.to_dict(), dtype="f16")
    with pytest.raises(FormatError, match="no aios.fingerprint"):
        base_fingerprint(tmp_path / "old16.parquet")
    with pytest.raises(FormatError, match="does not match"):
        save_model(m, cfg, tmp_path / "x.parquet", extra_metadata={"aios.fingerprint": "0" * 16})


# ---------------------------------------------------------------- targets and data

def test_resolve_targets(base):
    _, cfg = load_model(base / "model.f32.parquet")
    # peft alone would match `mlp.0` to sigma_map.mlp.0 too; we never target the timestep MLP.
    assert resolve_targets("mlp.0", cfg) == ["blocks.0.mlp.0", "blocks.1.mlp.0"]
    assert resolve_targets(["attn_qkv", "blocks.1.mlp.2", "output_layer.linear"], cfg) == [
        "blocks.0.attn_qkv", "blocks.1.attn_qkv", "blocks.1.mlp.2", "output_layer.linear"]
    assert len(resolve_targets("attn_qkv,attn_out,mlp.0,mlp.2", cfg)) == 8
    for bad, msg in (("adaLN_modulation", "not supported"), ("sigma_map.mlp.0", "not supported"),
                     ("blocks.5.attn_qkv", "matches no module"), ("vocab_embed", "not supported"), ("", "no LoRA target")):
        with pytest.raises(ValueError, match=msg):
            resolve_targets(bad, cfg)


def test_documents_and_split(base, tmp_path):
    (tmp_path / "a.txt").write_text((base / "notes.txt").read_text())
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"source": s, "text": t}) for s, t in
                                                (("x", "only x"), ("y", "only y"))) + "\n")
    docs = read_documents(tmp_path)
    assert docs[-2:] == ["only x", "only y"] and all(len(d) >= 1000 for d in docs[:-3])
    assert read_documents(tmp_path / "b.jsonl", source="y") == ["only y"]
    with pytest.raises(ValueError, match="no documents"):
        read_documents(tmp_path / "b.jsonl", source="z")
    tok = load_tokenizer(base / "tokenizer.json")
    tr, va = split_documents(docs, tok, 32, 0.05)
    assert (tr, va) == split_documents(docs, tok, 32, 0.05) and va and tr
    assert sorted(tr + va) == sorted(docs)
    with pytest.raises(ValueError, match="too small"):
        split_documents(["tiny"], tok, 32, 0.05)


# ---------------------------------------------------------------- training

def test_train_lora_writes_valid_container(base, trained):
    tensors, cfg = read_lora(trained["dir"] / "notes.lora.parquet")
    assert read_metadata(trained["dir"] / "notes.lora.parquet")["aios.kind"] == "lora"
    assert cfg["target_modules"] == FULL_TARGETS
    assert sorted(tensors) == sorted(f"{m}.lora_{ab}" for m in FULL_TARGETS for ab in "AB")
    assert tensors["blocks.0.mlp.0.lora_A"].shape == (4, 32) and tensors["blocks.0.mlp.0.lora_B"].shape == (128, 4)
    assert tensors["output_layer.linear.lora_B"].shape == (300, 4)
    assert cfg["rank"] == 4 and cfg["alpha"] == 8.0 and cfg["use_rslora"] is False and cfg["dropout"] == 0.0
    assert cfg["base_fingerprint"] == read_fingerprint(base / "model.f32.parquet")
    assert cfg["base_config"] == json.loads(read_metadata(base / "model.f32.parquet")["aios.config"])
    for k, v in tensors.items():
        assert np.array_equal(v, trained["tensors"][k]), k
        if k.endswith("lora_B"):
            assert np.abs(v).max() > 0, k  # trained away from peft's zero init
    # Enough seeded steps on a repetitive text: held-out NELBO drops a lot.
    b, a = cfg["val_nats_before"], cfg["val_nats_after"]
    assert b == trained["val_nats_before"] and a == trained["val_nats_after"]
    assert a < b - 1.0, (b, a)
    assert cfg["train"]["steps"] == 60 and math.isfinite(cfg["train"]["loss_last"])


def test_only_lora_params_changed(base, trained):
    ref = model_tensors(load_model(base / "model.f32.parquet")[0])
    inner = trained["peft_model"].base_model.model
    seen = 0
    for name, p in inner.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace(".base_layer.", ".")
        assert np.array_equal(p.detach().numpy(), ref[key]), name
        assert not p.requires_grad, name
        seen += 1
    assert seen == len(ref)
    assert not any(hasattr(inner.get_submodule(m), "lora_A") for m in ("sigma_map.mlp.0", "blocks.0.attn_out"))


def test_apply_lora_matches_trained_peft_model(base, trained):
    model, cfg = load_model(base / "model.f32.parquet")
    x = _x(cfg)
    pm = trained["peft_model"].eval()
    with torch.no_grad():
        want = pm(x)
        got = apply_lora(model, trained["dir"] / "notes.lora.parquet")(x)
        got2 = apply_lora(model, read_lora(trained["dir"] / "notes.lora.parquet"))(x)
        plain = model(x)  # apply_lora copies: the base is untouched
        zero = apply_lora(model, trained["dir"] / "notes.lora.parquet", weight=0.0)(x)
    assert (got - want).abs().max().item() <= 1e-6
    assert torch.equal(got, got2)
    assert (plain - want).abs().max().item() > 1e-2
    assert (zero - plain).abs().max().item() <= 1e-6
    assert "lora_A" not in str([n for n, _ in model.named_modules()])
    # Another base (different weights) is refused unless asked.
    other = randomize_(DiT(cfg), seed=9)
    with pytest.raises(ValueError, match="base_fingerprint"):
        apply_lora(other, trained["dir"] / "notes.lora.parquet")
    apply_lora(other, trained["dir"] / "notes.lora.parquet", check_fingerprint=False)


@pytest.mark.parametrize("rslora", [False, True])
def test_effective_layer_formula(base, rslora):
    """y = W x + b + scale * B (A x), scale = alpha/r or alpha/sqrt(r): what the runtime implements."""
    model, cfg = load_model(base / "model.f32.parquet")
    rng = np.random.default_rng(1)
    mods = {"blocks.1.mlp.2": (32, 128), "output_layer.linear": (300, 32)}
    r, alpha = 4, 6.0
    tensors = {}
    for m, (o, i) in mods.items():
        tensors[f"{m}.lora_A"] = rng.standard_normal((r, i)).astype(np.float32)
        tensors[f"{m}.lora_B"] = rng.standard_normal((o, r)).astype(np.float32)
    lcfg = {"rank": r, "alpha": alpha, "use_rslora": rslora, "target_modules": sorted(mods), "dropout": 0.1,
            "base_fingerprint": read_fingerprint(base / "model.f32.parquet"), "base_config": cfg.to_dict()}
    scale = alpha / (math.sqrt(r) if rslora else r)
    assert lora_scale(lcfg) == scale
    save_lora(base.parent / f"f{rslora}.lora.parquet", tensors, lcfg)
    pm = apply_lora(model, base.parent / f"f{rslora}.lora.parquet", weight=0.5)
    x = torch.randn(2, 5, 128)
    layer = pm.base_model.model.get_submodule("blocks.1.mlp.2")
    W, b = model.blocks[1].mlp[2].weight, model.blocks[1].mlp[2].bias
    A, B = (torch.from_numpy(tensors[f"blocks.1.mlp.2.lora_{k}"]) for k in "AB")
    with torch.no_grad():
        want = x @ W.T + b + 0.5 * scale * (x @ A.T) @ B.T
        assert (layer(x) - want).abs().max().item() < 1e-4


# ---------------------------------------------------------------- PEFT folder import

def test_import_peft_folder_equals_direct_export(base, trained, tmp_path):
    out = tmp_path / "imported.lora.parquet"
    assert main(["import-peft", str(trained["dir"] / "peft"), "--base", str(base), "--out", str(out)]) == 0
    t_imp, c_imp = read_lora(out)
    t_dir, c_dir = read_lora(trained["dir"] / "notes.lora.parquet")
    assert sorted(t_imp) == sorted(t_dir)
    for k in t_dir:
        assert np.array_equal(t_imp[k], t_dir[k]), k
    for k in ("rank", "alpha", "use_rslora", "target_modules", "base_fingerprint", "dropout", "base_config"):
        assert c_imp[k] == c_dir[k], k
    model, cfg = load_model(base / "model.f32.parquet")
    x = _x(cfg, seed=1)
    with torch.no_grad():
        a = apply_lora(model, out)(x)
        b = trained["peft_model"].eval()(x)
    assert (a - b).abs().max().item() <= 1e-6
    # A base given as the .parquet file works the same.
    assert import_peft(trained["dir"] / "peft", base / "model.f32.parquet")[1]["target_modules"] == FULL_TARGETS


def _peft_copy(trained, tmp_path, name, cfg_edit=None, st_edit=None):
    d = tmp_path / name
    shutil.copytree(trained["dir"] / "peft", d)
    if cfg_edit:
        ac = json.loads((d / "adapter_config.json").read_text())
        cfg_edit(ac)
        (d / "adapter_config.json").write_text(json.dumps(ac))
    if st_edit:
        t = load_file(str(d / "adapter_model.safetensors"))
        st_edit(t)
        save_file(t, str(d / "adapter_model.safetensors"))
    return d


K = "base_model.model.blocks.0.attn_qkv.lora_{}.weight"


def _rename(t, old, new):
    t[new] = t.pop(old)


@pytest.mark.parametrize("name,cfg_edit,st_edit,msg", [
    ("unknown_block", None, lambda t: [_rename(t, K.format(ab), K.replace("blocks.0", "blocks.7").format(ab)) for ab in "AB"],
     "has 2 blocks"),
    ("adaln", lambda c: c.update(target_modules=None),
     lambda t: [_rename(t, K.format(ab), K.replace("attn_qkv", "adaLN_modulation").format(ab)) for ab in "AB"],
     "not a supported LoRA target"),
    ("not_targeted", lambda c: c.update(target_modules=["mlp.0"]), None, "target_modules"),
    ("rank", lambda c: c.update(r=8), None, "rank 4, but rank is 8"),
    ("shape", None, lambda t: t.update({K.format("A"): np.zeros((4, 31), np.float32)}), r"shape \(4, 31\), expected \(4, 32\)"),
    ("nan", None, lambda t: t[K.format("B")].__setitem__((0, 0), np.nan), "non-finite"),
    ("dora", lambda c: c.update(use_dora=True), None, "DoRA"),
    ("dora_key", None, lambda t: t.update({"base_model.model.blocks.0.attn_qkv.lora_magnitude_vector": np.ones(96, np.float32)}),
     "DoRA"),
    ("missing_b", None, lambda t: t.pop(K.format("B")), "has lora_A but no lora_B"),
    ("bias", lambda c: c.update(bias="all"), None, "bias='all'"),
    ("rank_pattern", lambda c: c.update(rank_pattern={"mlp.0": 2}), None, "rank_pattern"),
    ("fan_in_fan_out", lambda c: c.update(fan_in_fan_out=True), None, "fan_in_fan_out"),
    ("modules_to_save", lambda c: c.update(modules_to_save=["adaLN_modulation"]), None, "modules_to_save"),
    ("base_layer", None, lambda t: t.update({"base_model.model.blocks.0.attn_qkv.base_layer.weight": np.ones((96, 32), np.float32)}),
     "unsupported tensors"),
    ("not_lora", lambda c: c.update(peft_type="IA3"), None, "only LORA"),
    ("pissa", lambda c: c.update(init_lora_weights="pissa_niter_4"), None, "changes the base weights"),
])
def test_import_peft_refuses_bad_folders(base, trained, tmp_path, name, cfg_edit, st_edit, msg):
    d = _peft_copy(trained, tmp_path, name, cfg_edit, st_edit)
    with pytest.raises(FormatError, match=msg):
        import_peft(d, base, tmp_path / "x.lora.parquet")
    assert not (tmp_path / "x.lora.parquet").exists()


def test_import_peft_missing_files(base, trained, tmp_path):
    d = _peft_copy(trained, tmp_path, "nost")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        import_peft(d, base)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(tmp_path, base)
    d = _peft_copy(trained, tmp_path, "trunc")
    (d / "adapter_model.safetensors").write_bytes((d / "adapter_model.safetensors").read_bytes()[:100])
    with pytest.raises(FormatError, match="safetensors"):
        import_peft(d, base)
    assert main(["import-peft", str(tmp_path / "nost"), "--base", str(base), "--out", str(tmp_path / "o.parquet")]) == 2


# ---------------------------------------------------------------- container validation

def test_container_refuses_bad_files(base, trained, tmp_path):
    good = trained["dir"] / "notes.lora.parquet"
    tensors, cfg = read_lora(good)
    with pytest.raises(FormatError, match="expected 'lora'"):
        read_lora(base / "model.f32.parquet")
    data = good.read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="not a readable Parquet file"):
        read_lora(tmp_path / "trunc.parquet")

    def bad(t_edit=None, c_edit=None, msg=""):
        t = {k: v.copy() for k, v in tensors.items()}
        c = json.loads(json.dumps(cfg))
        if t_edit:
            t_edit(t)
        if c_edit:
            c_edit(c)
        write_tensors(tmp_path / "bad.parquet", t, kind="lora", config=c)  # raw writer: no validation
        with pytest.raises(FormatError, match=msg):
            read_lora(tmp_path / "bad.parquet")
        with pytest.raises(FormatError, match=msg):
            save_lora(tmp_path / "bad2.parquet", t, c)

    a = "blocks.0.attn_qkv.lora_A"
    bad(t_edit=lambda t: t.pop("blocks.0.attn_qkv.lora_B"), msg="missing tensors")
    bad(t_edit=lambda t: t.update({"blocks.0.norm1.weight": np.ones(32, np.float32)}), msg="unexpected tensors")
    bad(t_edit=lambda t: t.update({a: t[a][:3]}), msg="has rank 3, but rank is 4")
    bad(t_edit=lambda t: t.update({a: np.zeros((4, 33), np.float32)}), msg="expected \\(4, 32\\)")
    bad(t_edit=lambda t: t[a].__setitem__((1, 1), np.inf), msg="non-finite")
    bad(c_edit=lambda c: c["target_modules"].append("sigma_map.mlp.0"), msg="not a supported LoRA target")
    bad(c_edit=lambda c: c.update(target_modules=c["target_modules"][::-1]), msg="sorted")
    bad(c_edit=lambda c: c.pop("base_fingerprint"), msg="missing keys")
    bad(c_edit=lambda c: c.update(rank=0), msg="rank must be")
    bad(c_edit=lambda c: c.update(use_rslora="yes"), msg="use_rslora")
    bad(c_edit=lambda c: c.update(base_fingerprint="xyz"), msg="16 lowercase hex")
    bad(c_edit=lambda c: c["base_config"].update(n_layers=1), msg="has 1 blocks")
    with pytest.raises(FormatError, match="JSON object"):
        check_lora(tensors, ["not", "a", "dict"])


# ---------------------------------------------------------------- CLI

def test_cli_help():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python")}
    for cmd, words in (("lora", ["--rank", "--alpha", "--target-modules", "--rslora", "--save-peft", "--eval-windows"]),
                       ("import-peft", ["--base", "--out", "folder"])):
        r = subprocess.run([sys.executable, "-m", "aios_train", cmd, "--help"], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr
        assert all(w in r.stdout for w in words), r.stdout


def test_cli_lora_and_eval(base, tmp_path, capsys):
    out = tmp_path / "cli.lora.parquet"
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps({"source": "n", "text": t}) + "\n" for t in _text(seed=5, n=10)))
    rc = main(["lora", "--base", str(base / "model.f32.parquet"), "--data", str(base / "notes.txt"), "--out", str(out),
               "--rank", "2", "--alpha", "4", "--rslora", "--dropout", "0.1", "--steps", "4", "--batch-size", "4",
               "--valid-data", str(valid), "--eval-windows", "2", "--eval-n-t", "2", "--threads", "1"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tensors, cfg = read_lora(out)
    assert cfg["use_rslora"] and cfg["dropout"] == 0.1 and cfg["rank"] == 2 and len(cfg["target_modules"]) == 8
    assert cfg["val_nats_before"] == res["val_nats_before"] and cfg["val"]["windows"] == 2
    assert main(["eval", str(base / "model.f32.parquet"), "--data", str(valid), "--tokenizer", str(base / "tokenizer.json"),
                 "--lora", str(out), "--n-t", "2", "--max-windows", "2", "--source", "n"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["lora"] == str(out) and math.isfinite(r["nats_per_token"])
    assert main(["lora", "--base", str(base), "--data", str(base / "notes.txt"), "--out", str(out),
                 "--target-modules", "adaLN_modulation"]) == 2
    assert "not supported" in capsys.readouterr().err
