import json

import pytest
import torch
from safetensors.torch import save_file

import _train_path  # noqa: F401
from aios_train.config import ModelConfig
from aios_train.convert_mdlm import ConversionError, convert_mdlm, convert_state_dict
from aios_train.export import load_model, read_metadata
from aios_train.model import DiT, randomize_

CFG = ModelConfig(vocab_size=48, hidden_size=32, n_layers=2, n_heads=4, cond_dim=16, max_length=16,
                  mask_token_id=47, time_conditioning=True)
MDLM_CFG = {"model": {"type": "ddit", "hidden_size": 32, "cond_dim": 16, "length": 16, "n_blocks": 2, "n_heads": 4,
                      "scale_by_sigma": True, "dropout": 0.1}, "time_conditioning": True, "parameterization": "subs"}


class NotATensor:
    """Stands in for the OmegaConf objects a real Lightning .ckpt pickles."""


class MDLMWrapper(torch.nn.Module):
    """MDLM's Diffusion module layout: the DiT under `backbone`, plus the rotary inv_freq buffer."""

    def __init__(self, dit):
        super().__init__()
        self.backbone = dit
        hd = CFG.head_dim
        self.backbone.register_buffer("_unused", torch.zeros(0), persistent=False)
        self.rot = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))

    def state_dict_mdlm(self):
        sd = {k: v.clone() for k, v in self.state_dict().items()}
        sd["backbone.rotary_emb.inv_freq"] = self.rot
        return sd


def _mdlm_sd(seed=0):
    w = MDLMWrapper(randomize_(DiT(CFG), seed=seed))
    return w, w.state_dict_mdlm()


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_convert_gives_identical_logits(tmp_path, fmt):
    w, sd = _mdlm_sd()
    assert all(k.startswith("backbone.") for k in sd)
    if fmt == "safetensors":
        ck = tmp_path / "model.safetensors"
        save_file(sd, str(ck))
    else:
        ck = tmp_path / "last.ckpt"
        torch.save({"state_dict": sd, "global_step": 3}, ck)
    (tmp_path / "cfg.json").write_text(json.dumps(MDLM_CFG))
    cfg = convert_mdlm(ck, tmp_path / "cfg.json", tmp_path / "out.parquet", mask_token_id=47)
    assert cfg == CFG
    m, c = load_model(tmp_path / "out.parquet")
    x = torch.randint(0, 48, (2, 16))
    sigma = torch.tensor([0.5, 3.0])
    assert torch.equal(m(x, sigma), w.backbone(x, sigma))
    assert read_metadata(tmp_path / "out.parquet")["aios.source"].startswith("mdlm:")


def test_convert_ema_from_ckpt(tmp_path):
    w, sd = _mdlm_sd()
    w2, _ = _mdlm_sd(seed=9)
    shadow = [p.detach().clone() for p in w2.backbone.parameters()]
    torch.save({"state_dict": sd, "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow}}, tmp_path / "e.ckpt")
    convert_mdlm(tmp_path / "e.ckpt", MDLM_CFG, tmp_path / "e.parquet", mask_token_id=47, use_ema=True)
    m, _ = load_model(tmp_path / "e.parquet")
    x = torch.randint(0, 48, (1, 16))
    assert torch.equal(m(x, torch.ones(1)), w2.backbone(x, torch.ones(1)))


def test_convert_errors(tmp_path):
    _, sd = _mdlm_sd()
    bad = dict(sd)
    del bad["backbone.blocks.1.mlp.2.bias"]
    with pytest.raises(ConversionError, match="missing tensors.*blocks.1.mlp.2.bias"):
        convert_state_dict(bad, MDLM_CFG, mask_token_id=47)
    with pytest.raises(ConversionError, match=r"unknown keys.*(backbone.extra.weight|optimizer_thing)"):
        convert_state_dict({**sd, "backbone.extra.weight": torch.zeros(1), "optimizer_thing": torch.zeros(1)}, MDLM_CFG, mask_token_id=47)
    with pytest.raises(ConversionError, match="model.hidden_size=64 but the weights say 32"):
        convert_state_dict(sd, {**MDLM_CFG, "model": {**MDLM_CFG["model"], "hidden_size": 64}}, mask_token_id=47)
    with pytest.raises(ConversionError, match="vocab_size=50000"):
        convert_state_dict(sd, MDLM_CFG, mask_token_id=47, vocab_size=50000)
    with pytest.raises(ConversionError, match="lacks 'model.length'"):
        convert_state_dict(sd, {"model": {k: v for k, v in MDLM_CFG["model"].items() if k != "length"}}, mask_token_id=47)
    with pytest.raises(ValueError, match="mask_token_id"):
        convert_state_dict(sd, MDLM_CFG, mask_token_id=48)
    torch.save({"state_dict": sd, "hp": NotATensor()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ConversionError, match="weights_only"):
        convert_mdlm(tmp_path / "pickled.ckpt", MDLM_CFG, tmp_path / "o.parquet", mask_token_id=47)
