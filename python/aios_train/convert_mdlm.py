"""Convert an MDLM checkpoint (kuleshov-group/mdlm, DiT backbone) into an aios Parquet model.

Input: a state dict with MDLM's keys (`backbone.vocab_embed.embedding`, `backbone.blocks.{i}...`,
`backbone.output_layer...`) from a `.safetensors` file or a torch file loaded with weights_only=True
(a Lightning `.ckpt` holds it under "state_dict"; its EMA shadow weights can be used with use_ema=True),
and MDLM's config (JSON or YAML: model.hidden_size, model.cond_dim, model.length, model.n_blocks,
model.n_heads, time_conditioning). Everything that the shapes determine is inferred and cross-checked.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .export import check_model_tensors, write_tensors
from .model import expected_shapes

PREFIX = "backbone."
# Non-parameter entries MDLM checkpoints may carry; they are checked or ignored, never silently wrong.
ROTARY_BUFFER = "backbone.rotary_emb.inv_freq"
IGNORED_PREFIXES = ("noise.",)


class ConversionError(ValueError):
    pass


def load_state_dict(path: str | Path, use_ema: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        if use_ema:
            raise ConversionError("use_ema needs a Lightning .ckpt (safetensors files hold one set of weights)")
        return load_file(str(path))
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as e:
        raise ConversionError(
            f"{path}: torch.load(weights_only=True) failed ({e}). The file holds non-tensor Python objects "
            "(e.g. an OmegaConf config in a Lightning .ckpt); extract its state_dict to .safetensors first.") from e
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict, got {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if use_ema:
        ema = obj.get("ema")
        if not isinstance(ema, dict) or "shadow_params" not in ema:
            raise ConversionError(f"{path}: use_ema requested but the checkpoint has no ema.shadow_params")
        sd = _apply_ema(sd, ema["shadow_params"])
    return sd


def _apply_ema(sd: dict[str, torch.Tensor], shadow: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """MDLM's EMA stores a list in backbone.parameters() order (= state-dict order minus buffers)."""
    names = [k for k in sd if k.startswith(PREFIX) and k != ROTARY_BUFFER]
    if len(shadow) < len(names):
        raise ConversionError(f"EMA has {len(shadow)} tensors, backbone has {len(names)} parameters")
    out = dict(sd)
    for k, v in zip(names, shadow):
        if tuple(v.shape) != tuple(sd[k].shape):
            raise ConversionError(f"EMA tensor for {k} has shape {tuple(v.shape)}, expected {tuple(sd[k].shape)}")
        out[k] = v
    return out


def load_mdlm_config(path_or_dict: str | Path | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path = Path(path_or_dict)
    if not path.exists():
        raise FileNotFoundError(f"MDLM config not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        return yaml.safe_load(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e}); use a .yaml suffix for YAML configs") from e


def _get(cfg: dict, dotted: str, default: Any = KeyError) -> Any:
    cur: Any = cfg
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            if default is KeyError:
                raise ConversionError(f"MDLM config lacks {dotted!r}")
            return default
        cur = cur[part]
    return cur


def convert_state_dict(sd: dict[str, Any], mdlm_cfg: dict, *, mask_token_id: int, vocab_size: int | None = None,
                       pad_token_id: int = 0, bos_token_id: int = 1, eos_token_id: int = 2
                       ) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """MDLM state dict + config -> (our tensors, ModelConfig). Raises ConversionError listing every problem."""
    emb = sd.get(PREFIX + "vocab_embed.embedding")
    if emb is None:
        raise ConversionError(f"state dict has no {PREFIX}vocab_embed.embedding; keys start with "
                              f"{sorted({k.split('.')[0] for k in sd})}")
    V, D = tuple(emb.shape)
    n_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"backbone\.blocks\.(\d+)\.", k))})
    cond = tuple(sd[PREFIX + "sigma_map.mlp.0.weight"].shape)[0] if PREFIX + "sigma_map.mlp.0.weight" in sd else None
    checks = {  # config value vs what the tensors say
        "model.hidden_size": D, "model.n_blocks": n_blocks, "model.cond_dim": cond,
    }
    errs = [f"{k}={_get(mdlm_cfg, k)} but the weights say {v}" for k, v in checks.items()
            if v is not None and _get(mdlm_cfg, k) != v]
    if vocab_size is not None and vocab_size != V:
        errs.append(f"vocab_size={vocab_size} but the embedding has {V} rows")
    model_type = _get(mdlm_cfg, "model.type", "ddit")
    if model_type not in ("ddit", "dit"):
        errs.append(f"model.type={model_type!r}: only MDLM's DiT backbone is supported")
    if errs:
        raise ConversionError("MDLM config does not match the checkpoint: " + "; ".join(errs))
    tc = _get(mdlm_cfg, "time_conditioning", None)
    if tc is None:
        tc = _get(mdlm_cfg, "model.time_conditioning", False)
    cfg = ModelConfig(vocab_size=V, hidden_size=D, n_layers=n_blocks, n_heads=int(_get(mdlm_cfg, "model.n_heads")),
                      cond_dim=int(cond if cond is not None else _get(mdlm_cfg, "model.cond_dim")),
                      max_length=int(_get(mdlm_cfg, "model.length")), time_conditioning=bool(tc),
                      mask_token_id=mask_token_id, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
                      eos_token_id=eos_token_id)

    out: dict[str, np.ndarray] = {}
    unknown = []
    for k, v in sd.items():
        if k == ROTARY_BUFFER:
            want = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2).float() / cfg.head_dim))
            if tuple(v.shape) != tuple(want.shape) or not torch.allclose(v.float(), want, rtol=1e-5):
                raise ConversionError(f"{k} does not match rotary base {cfg.rope_base} and head_dim {cfg.head_dim}")
            continue
        if k.startswith(IGNORED_PREFIXES):
            continue
        if not k.startswith(PREFIX):
            unknown.append(k)
            continue
        out[k[len(PREFIX):]] = v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32)
    want = expected_shapes(cfg)
    unknown += [PREFIX + k for k in out if k not in want]
    if unknown:
        raise ConversionError(f"unknown keys in the MDLM state dict: {sorted(unknown)}")
    try:
        check_model_tensors(out, cfg, "MDLM checkpoint")
    except ValueError as e:
        raise ConversionError(str(e).replace("tensors [", "tensors (without 'backbone.') [")) from e
    return out, cfg


def convert_mdlm(checkpoint: str | Path, mdlm_config: str | Path | dict, out: str | Path, *, mask_token_id: int,
                 vocab_size: int | None = None, use_ema: bool = False, **ids: int) -> ModelConfig:
    sd = load_state_dict(checkpoint, use_ema=use_ema)
    tensors, cfg = convert_state_dict(sd, load_mdlm_config(mdlm_config), mask_token_id=mask_token_id,
                                      vocab_size=vocab_size, **ids)
    write_tensors(out, tensors, kind="model", config=cfg.to_dict(),
                  extra_metadata={"aios.source": f"mdlm:{Path(checkpoint).name}{' (ema)' if use_ema else ''}"})
    return cfg
