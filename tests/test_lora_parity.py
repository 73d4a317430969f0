"""Parity of LoRA between the runtime and peft: the same adapter file gives
the same logits in aios_rt (unmerged, and fused) as in PyTorch + peft, over
random configs; a PEFT folder imported gives the same logits as the file
exported from the same adapter; quantised bases stay close."""

import json

import numpy as np
import pytest
import torch

from _train_path import ROOT
import aios_rt
from aios_train.export import load_model
from aios_train.lora import apply_lora, import_peft

peft = pytest.importorskip("peft")

CONFIGS = [
    dict(vocab_size=96, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=24, mask_token_id=3),
    dict(vocab_size=80, hidden_size=128, n_layers=1, n_heads=2, cond_dim=16, max_length=20, mask_token_id=3,
         time_conditioning=True, mlp_ratio=2),
]


def modules(cfg, which):
    names = [f"blocks.{i}.{m}" for i in range(cfg["n_layers"]) for m in ("attn_qkv", "attn_out", "mlp.0", "mlp.2")]
    return names + ["output_layer.linear"] if which == "all" else names[::2]


def torch_logits(model, tokens, sigma):
    with torch.inference_mode():
        t = torch.tensor(tokens)
        s = torch.full((len(tokens),), sigma) if model_is_tc(model) else None
        return model(t, s).float().numpy()


def model_is_tc(model):
    base = getattr(model, "base_model", None)
    inner = base.model if base is not None else model
    return inner.config.time_conditioning


@pytest.mark.parametrize("ci", range(len(CONFIGS)))
@pytest.mark.parametrize("rslora", [False, True])
def test_runtime_matches_peft(tmp_path, ci, rslora):
    cfg = CONFIGS[ci]
    path = tmp_path / "model.f32.parquet"
    aios_rt.write_random_model(path, json.dumps(cfg), seed=ci)
    eng = aios_rt.Engine(path, threads=2)
    lora = tmp_path / "a.lora.parquet"
    aios_rt.write_random_lora(lora, eng.config_json, eng.fingerprint, modules(cfg, "all" if ci == 0 else "some"),
                              rank=4 if ci == 0 else 8, alpha=16.0, use_rslora=rslora, seed=7)
    base, _ = load_model(path)
    rng = np.random.default_rng(ci)
    tokens = rng.integers(0, cfg["vocab_size"], size=(2, cfg["max_length"])).tolist()
    sigma = 0.7
    for weight in (1.0, 0.35):
        pm = apply_lora(base, lora, weight=weight, check_fingerprint=False)
        want = torch_logits(pm, tokens, sigma)
        eng.load_adapter(lora, name="a", weight=weight)
        got = eng.logits(tokens, sigma=sigma)
        assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
        assert np.abs(got - torch_logits(base, tokens, sigma)).max() > 1e-2  # the adapter matters
        eng.fuse()
        fused = eng.logits(tokens, sigma=sigma)
        assert np.abs(fused - want).max() < 1e-4
        eng.unfuse()
        eng.unload_adapter("a")


def test_two_adapters_sum_like_peft_multi_adapter(tmp_path):
    cfg = CONFIGS[0]
    path = tmp_path / "model.f32.parquet"
    aios_rt.write_random_model(path, json.dumps(cfg), seed=3)
    eng = aios_rt.Engine(path)
    for i, (rank, rs) in enumerate([(4, False), (8, True)]):
        aios_rt.write_random_lora(tmp_path / f"a{i}.lora.parquet", eng.config_json, eng.fingerprint,
                                  modules(cfg, "all" if i == 0 else "some"), rank=rank, alpha=8.0, use_rslora=rs,
                                  seed=i)
    base, _ = load_model(path)
    tokens = [list(range(1, 25))]
    # peft: each adapter with its B scaled by its weight, both active (their updates add up).
    pm = apply_lora(base, tmp_path / "a0.lora.parquet", weight=0.8, check_fingerprint=False)
    pm2 = apply_lora(base, tmp_path / "a1.lora.parquet", weight=0.3, check_fingerprint=False)
    d1 = torch_logits(pm, tokens, 0.0) - torch_logits(base, tokens, 0.0)
    eng.load_adapter(tmp_path / "a0.lora.parquet", name="x", weight=None)
    eng.load_adapter(tmp_path / "a1.lora.parquet", name="y", weight=None)
    eng.set_adapters({"x": 0.8})
    assert np.abs(eng.logits(tokens) - torch_logits(pm, tokens, 0.0)).max() < 1e-4
    eng.set_adapters({"y": 0.3})
    assert np.abs(eng.logits(tokens) - torch_logits(pm2, tokens, 0.0)).max() < 1e-4
    eng.set_adapters({"x": 0.8, "y": 0.3})
    both = eng.logits(tokens)
    # Not linear in logits end to end, but both must move the output and differ from either alone.
    assert np.abs(both - torch_logits(pm, tokens, 0.0)).max() > 1e-3 and np.abs(d1).max() > 1e-2


def test_peft_folder_import_matches_export(tmp_path):
    cfg = CONFIGS[0]
    path = tmp_path / "model.f32.parquet"
    aios_rt.write_random_model(path, json.dumps(cfg), seed=5)
    base, _ = load_model(path)
    # A regex: the bare suffix "mlp.2" would also match sigma_map.mlp.2, which is no LoRA target.
    lc = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r"blocks\.\d+\.(attn_qkv|mlp\.2)", init_lora_weights=False)
    torch.manual_seed(0)
    pm = peft.get_peft_model(base, lc)
    folder = tmp_path / "peft"
    pm.save_pretrained(folder)
    out = tmp_path / "imported.lora.parquet"
    import_peft(folder, path, out)
    eng = aios_rt.Engine(path)
    eng.load_adapter(out, name="p")
    tokens = [list(range(2, 26))]
    want = torch_logits(pm.eval(), tokens, 0.0)
    assert np.abs(eng.logits(tokens) - want).max() < 1e-4


def test_quantized_base_with_adapter_stays_close(tmp_path):
    cfg = dict(CONFIGS[0], hidden_size=256, n_heads=4)
    f32 = tmp_path / "model.f32.parquet"
    aios_rt.write_random_model(f32, json.dumps(cfg), seed=9)
    aios_rt.write_random_model(tmp_path / "model.int8.parquet", json.dumps(cfg), seed=9, dtype="int8")
    e32 = aios_rt.Engine(f32)
    lora = tmp_path / "a.lora.parquet"
    aios_rt.write_random_lora(lora, e32.config_json, e32.fingerprint, modules(cfg, "all"), seed=1)
    e8 = aios_rt.Engine(tmp_path / "model.int8.parquet")
    assert e8.fingerprint == e32.fingerprint
    tokens = [list(range(1, 25))]
    for e in (e32, e8):
        e.load_adapter(lora)
    d = np.abs(e8.logits(tokens) - e32.logits(tokens))
    assert d.mean() < 0.05, d.mean()


SHIPPED = ROOT / "models" / "aios-text-tiny"  # the same name as in test_parity.py and test_engine.py
ADAPTER = ROOT / "models" / "aios-text-tiny-bible-lora" / "adapter.lora.parquet"


@pytest.mark.skipif(not ADAPTER.exists(), reason="shipped adapter not built yet")
def test_shipped_adapter_fits_shipped_base():
    # Retraining the base changes its fingerprint; this catches a release that forgot to retrain the adapter.
    base, _ = load_model(SHIPPED / "model.f32.parquet")  # apply_lora checks config and fingerprint
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, base.config.vocab_size, size=(1, base.config.max_length))
    tokens[:, ::3] = base.config.mask_token_id
    tokens[:, 0] = 1
    tokens = tokens.tolist()
    want = torch_logits(apply_lora(base, ADAPTER, weight=1.0), tokens, 0.0)
    err = {}
    for dtype in ("f32", "int4"):
        eng = aios_rt.Engine(SHIPPED, dtype=dtype, threads=2)
        eng.load_adapter(ADAPTER, name="bible")
        err[dtype] = np.abs(eng.logits(tokens) - want)
    assert err["f32"].max() < 1e-4, err["f32"].max()
    assert err["int4"].mean() < 0.5, err["int4"].mean()  # the int4 base: close on average
    assert np.abs(want - torch_logits(base, tokens, 0.0)).max() > 1.0  # the adapter matters
