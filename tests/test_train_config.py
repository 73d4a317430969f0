import json

import pytest

import _train_path  # noqa: F401
from aios_train.config import ModelConfig

BASE = dict(vocab_size=64, hidden_size=32, n_layers=2, n_heads=4, cond_dim=16, max_length=16, mask_token_id=3)


def test_round_trip_and_exact_keys():
    c = ModelConfig(**BASE, time_conditioning=True)
    d = c.to_dict()
    assert set(d) == {"arch", "vocab_size", "hidden_size", "n_layers", "n_heads", "cond_dim", "max_length",
                      "time_conditioning", "mlp_ratio", "rope_base", "norm_eps", "mask_token_id", "pad_token_id",
                      "bos_token_id", "eos_token_id", "causal"}
    assert d["arch"] == "dit" and d["mlp_ratio"] == 4 and d["rope_base"] == 10000.0 and d["norm_eps"] == 1e-5
    assert d["pad_token_id"] == 0 and d["bos_token_id"] == 1 and d["eos_token_id"] == 2 and d["causal"] is False
    assert ModelConfig.from_dict(d) == c
    assert ModelConfig.from_json(c.to_json()) == c
    assert json.loads(c.to_json()) == d


def test_unknown_and_missing_keys():
    d = ModelConfig(**BASE).to_dict()
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\]"):
        ModelConfig.from_dict({**d, "bogus": 1})
    del d["hidden_size"]
    with pytest.raises(ValueError, match="missing required keys"):
        ModelConfig.from_dict(d)
    with pytest.raises(ValueError, match="invalid JSON"):
        ModelConfig.from_json("{not json")


@pytest.mark.parametrize("bad", [
    {"hidden_size": 30}, {"n_heads": 0}, {"mask_token_id": 64}, {"arch": "gpt"}, {"causal": 1},
    {"hidden_size": 36, "n_heads": 12},  # odd head_dim
])
def test_invalid_values(bad):
    with pytest.raises(ValueError):
        ModelConfig(**{**BASE, **bad})
