"""Parity contract: the same Parquet file gives the same logits in the PyTorch
reference (aios_train) and the Rust runtime (aios_rt)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import _train_path  # noqa: F401
import aios_rt
from aios_train.config import ModelConfig
from aios_train.convert_mdlm import convert_mdlm
from aios_train.export import load_model, save_model
from aios_train.model import DiT, randomize_

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "aios-text-tiny"
TOL = 1e-4

CONFIGS = [
    dict(vocab_size=97, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=40, mask_token_id=96),
    dict(vocab_size=50, hidden_size=96, n_layers=3, n_heads=6, cond_dim=48, max_length=33, mask_token_id=3,
         time_conditioning=True),
    dict(vocab_size=128, hidden_size=256, n_layers=1, n_heads=8, cond_dim=64, max_length=24, mask_token_id=5,
         time_conditioning=True, mlp_ratio=2, rope_base=500.0),
    dict(vocab_size=40, hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_length=16, mask_token_id=39,
         causal=True),
]


def _rust_vs_torch(path, model, cfg, seed, length=None, sigma=0.7, matmul="auto"):
    g = torch.Generator().manual_seed(seed)
    length = length or cfg.max_length
    x = torch.randint(0, cfg.vocab_size, (2, length), generator=g)
    with torch.no_grad():
        ref = model(x, torch.full((2,), sigma)).numpy()
    eng = aios_rt.Engine(path, threads=2, matmul=matmul)
    got = eng.logits(x.tolist(), sigma=sigma)
    assert got.shape == ref.shape
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_random_configs_match(tmp_path, i):
    cfg = ModelConfig(**CONFIGS[i])
    model = randomize_(DiT(cfg), seed=i, std=0.1).eval()
    path = tmp_path / "m.parquet"
    save_model(model, cfg, path)
    for length in (cfg.max_length, 7):
        err, scale = _rust_vs_torch(path, model, cfg, seed=i, length=length)
        assert scale > 1.0, "logits too small for the comparison to mean anything"
        assert err < TOL, f"config {i} length {length}: max abs diff {err:.2e} (logits up to {scale:.1f})"


@pytest.mark.parametrize("dtype", ["int8", "int4", "int2"])
def test_quantised_files_match_dequantised_reference(tmp_path, dtype):
    """A quantised file, dequantised by aios_rt.read_tensors into the PyTorch
    reference, gives the same logits as the Rust runtime running it."""
    cfg = ModelConfig(vocab_size=64, hidden_size=256, n_layers=2, n_heads=4, cond_dim=64, max_length=32,
                      mask_token_id=3)
    model = randomize_(DiT(cfg), seed=1, std=0.05).eval()
    save_model(model, cfg, tmp_path / "m.parquet")
    report = aios_rt.quantize_file(tmp_path / "m.parquet", tmp_path / "q.parquet", dtype)
    assert report["out_bytes"] < report["in_bytes"]
    qmodel, _ = load_model(tmp_path / "q.parquet")
    err, _ = _rust_vs_torch(tmp_path / "q.parquet", qmodel, cfg, seed=3, matmul="dequantize")
    assert err < TOL, f"{dtype}: {err:.2e}"
    # candle's quantised kernel also quantises the activations (to Q8_K), so
    # it tracks the reference closely but not to f32 rounding.
    err_q, scale = _rust_vs_torch(tmp_path / "q.parquet", qmodel, cfg, seed=3, matmul="quantized")
    assert err_q < 0.05 * scale, f"{dtype} quantized matmul: {err_q:.2e} of {scale:.1f}"
    # Our int8 kernel quantises the activations per 32 values (per 256 for
    # Q2_K) and computes the exact product of the dequantised weights with
    # them, so it tracks the reference at least as closely as candle's.
    err_i, _ = _rust_vs_torch(tmp_path / "q.parquet", qmodel, cfg, seed=3, matmul="int8")
    assert err_i < 0.04 * scale and err_i <= err_q, f"{dtype} int8 kernel: {err_i:.2e} (candle {err_q:.2e})"


def test_mdlm_checkpoint_converted_runs_in_rust(tmp_path):
    """A random state dict in MDLM's exact key layout -> our Parquet -> Rust
    logits equal the original module's."""
    from safetensors.torch import save_file

    cfg = ModelConfig(vocab_size=60, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=20,
                      mask_token_id=59, time_conditioning=True)
    model = randomize_(DiT(cfg), seed=5, std=0.1).eval()
    sd = {"backbone." + k: v.clone() for k, v in model.state_dict().items()}
    hd = cfg.head_dim
    sd["backbone.rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    save_file(sd, str(tmp_path / "mdlm.safetensors"))
    mdlm_cfg = {"model": {"type": "ddit", "hidden_size": 64, "cond_dim": 32, "length": 20, "n_blocks": 2,
                          "n_heads": 4}, "time_conditioning": True}
    (tmp_path / "config.json").write_text(json.dumps(mdlm_cfg))
    convert_mdlm(tmp_path / "mdlm.safetensors", tmp_path / "config.json", tmp_path / "out.parquet", mask_token_id=59)
    err, _ = _rust_vs_torch(tmp_path / "out.parquet", model, cfg, seed=2, sigma=1.3)
    assert err < TOL, err


@pytest.mark.skipif(not (SHIPPED / "model.f32.parquet").exists(), reason="shipped model not built yet")
def test_shipped_model_matches():
    model, cfg = load_model(SHIPPED / "model.f32.parquet")
    err, scale = _rust_vs_torch(SHIPPED / "model.f32.parquet", model, cfg, seed=0)
    assert err < TOL, f"shipped model: {err:.2e} (logits up to {scale:.1f})"


AR_BASELINE = ROOT / "models" / "aios-text-ar-tiny" / "model.f32.parquet"


@pytest.mark.skipif(not AR_BASELINE.exists(), reason="AR baseline not shipped")
def test_shipped_ar_baseline_matches():
    """The causal judge of bench/gen_ppl.py: the runtime's logits are PyTorch's."""
    model, cfg = load_model(AR_BASELINE)
    assert cfg.causal
    err, scale = _rust_vs_torch(AR_BASELINE, model, cfg, seed=0)
    assert err < TOL, f"AR baseline: {err:.2e} (logits up to {scale:.1f})"


@pytest.mark.parametrize("strategy", ["confidence", "entropy", "margin"])
def test_greedy_samplers_match_pytorch_reference(tmp_path, strategy):
    """At temperature 0 no randomness is involved, so the Rust sampler and the
    PyTorch reference must commit the same tokens in the same order."""
    from aios_train.samplers import confidence_sample

    cfg = ModelConfig(vocab_size=61, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=32,
                      mask_token_id=60)
    model = randomize_(DiT(cfg), seed=11, std=0.1).eval()
    save_model(model, cfg, tmp_path / "m.parquet")
    canvas = [1, 7, 9] + [60] * 25 + [4, 60, 60, 2]
    ref_tokens, ref_conf, passes = confidence_sample(model, canvas, steps=8, mask_id=60, strategy=strategy)
    g = aios_rt.Engine(tmp_path / "m.parquet").diffuse_tokens(canvas, steps=8, sampler=strategy, temperature=0.0)
    assert g.tokens == ref_tokens
    assert g.forward_passes == passes == 8
    assert np.allclose(g.confidence, ref_conf, atol=1e-5)
