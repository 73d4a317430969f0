"""L3 selective fine-tuning: train only the few modules of the base that matter most for a new context and ship
them as a tensor patch the runtime overlays on the base and removes again.

Which modules: Lee et al., "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts" (ICLR 2023), Auto-RGN:
the relative gradient norm ||dL/dW|| / ||W|| of each candidate module's weight on the new data, averaged over a few
batches of the MDLM loss; the `top_k` highest are unfrozen (weight and bias), everything else stays frozen.
Candidates are the linear modules of the transformer blocks (attn_qkv, attn_out, mlp.0, mlp.2, adaLN_modulation):
the shared backbone, not the embeddings or heads.

The container (contract with the Rust runtime, `crates/aios-core/src/adapter/patch.rs`) is one aios Parquet file,
`aios.kind = "patch"`, f32 tensors under the base's own names and shapes; `aios.config` (JSON) holds
`base_fingerprint`, `base_config` (the base's whole config) and `tensors` (the names), plus training notes.
`aios_rt.Engine.load_patch(path)` runs on it, `unload_patch` goes back to the base, exactly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelConfig
from .export import FormatError, load_model, read_container, write_tensors
from .model import expected_shapes

KIND = "patch"
MODULES = ("attn_qkv", "attn_out", "mlp.0", "mlp.2", "adaLN_modulation")


def candidate_modules(config: ModelConfig) -> list[str]:
    """Every block linear module, e.g. blocks.0.attn_qkv."""
    return [f"blocks.{i}.{m}" for i in range(config.n_layers) for m in MODULES]


def attribute(model, windows: np.ndarray, mask_id: int, *, batches: int = 4, batch_size: int = 16,
              seed: int = 0) -> dict[str, float]:
    """Auto-RGN score per candidate module: ||grad W|| / ||W|| of the MDLM loss on `windows`, mean over batches.

    The model's parameters are left as they were (gradients are cleared)."""
    from .schedule import diffusion_loss
    from .train import batch_indices
    cands = candidate_modules(model.config)
    weights = {m: model.get_submodule(m).weight for m in cands}
    was = model.training
    model.train()
    req = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
    scores = {m: 0.0 for m in cands}
    for b in range(batches):
        x0 = data[batch_indices(b, data.shape[0], batch_size, seed)]
        model.zero_grad(set_to_none=True)
        nll, _ = diffusion_loss(model, x0, mask_id, gen)
        nll.mean().backward()
        for m, w in weights.items():
            scores[m] += float(w.grad.norm() / w.detach().norm().clamp_min(1e-12)) / batches
    model.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        p.requires_grad_(req[n])
    model.train(was)
    return scores


def check_patch(tensors: dict[str, Any], cfg: dict, where: str = "patch") -> ModelConfig:
    """Validate a patch against its config: names, shapes against the base config, finite values."""
    for key in ("base_fingerprint", "base_config", "tensors"):
        if key not in cfg:
            raise FormatError(f"{where}: config has no {key!r}")
    try:
        base = ModelConfig.from_dict(cfg["base_config"]) if isinstance(cfg["base_config"], dict) else None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{where}: bad base_config: {e}") from e
    if base is None:
        raise FormatError(f"{where}: base_config must be an object")
    if not tensors:
        raise FormatError(f"{where}: the patch holds no tensors")
    if sorted(cfg["tensors"]) != sorted(tensors):
        raise FormatError(f"{where}: config lists {sorted(cfg['tensors'])}, the patch holds {sorted(tensors)}")
    shapes = expected_shapes(base)
    for name, t in tensors.items():
        if name not in shapes:
            raise FormatError(f"{where}: {name!r} is not a tensor of the base model")
        arr = np.asarray(t)
        if tuple(arr.shape) != tuple(shapes[name]):
            raise FormatError(f"{where}: {name!r} has shape {tuple(arr.shape)}, the base's is {tuple(shapes[name])}")
        if not np.isfinite(arr).all():
            raise FormatError(f"{where}: {name!r} contains non-finite values (NaN or inf)")
    return base


def save_patch(path: str | Path, tensors: dict[str, Any], cfg: dict) -> None:
    """Validate and write a patch container (f32), atomically."""
    tensors = {k: (v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float32))
               for k, v in tensors.items()}
    check_patch(tensors, cfg, str(path))
    write_tensors(path, tensors, kind=KIND, config=cfg, dtype="f32")


def read_patch(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and fully validate a patch container; returns (tensors, config dict)."""
    tensors, cfg = read_container(path, KIND, "a tensor patch")
    check_patch(tensors, cfg, str(path))
    return tensors, cfg


def apply_patch(model, path: str | Path, *, check_fingerprint: bool = True):
    """Overwrite `model`'s tensors with the patch's (in place; returns the model)."""
    from .export import model_fingerprint, model_tensors
    tensors, cfg = read_patch(path)
    if cfg["base_config"] != model.config.to_dict():
        raise ValueError(f"{path}: the patch was made for a base with another config")
    if check_fingerprint:
        fp = model_fingerprint(model_tensors(model), model.config.to_dict())
        if fp != cfg["base_fingerprint"]:
            raise ValueError(f"{path}: the patch was made for base {cfg['base_fingerprint']}, this model is {fp}")
    sd = model.state_dict()
    with torch.no_grad():
        for name, arr in tensors.items():
            sd[name].copy_(torch.from_numpy(arr))
    return model


@dataclass
class PatchTrainArgs:
    base: str                     # model folder (model.f32.parquet + tokenizer.json) or .parquet
    data: str                     # .txt / .jsonl file or folder of them
    out: str                      # patch container to write
    valid_data: str | None = None  # held-out documents (then `data` is not split)
    valid_fraction: float = 0.05
    top_k: int = 4                # modules unfrozen
    modules: list[str] | None = None  # train exactly these (skips attribution)
    attribution_batches: int = 4
    steps: int = 200
    batch_size: int = 16
    lr: float = 5e-4
    warmup: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    eval_windows: int = 256
    eval_n_t: int = 16
    eval_seed: int = 0
    time_limit_min: float | None = None
    progress: bool = True


def train_patch(a: PatchTrainArgs) -> dict:
    """Selective fine-tuning with MDLM's loss; writes the patch `a.out`.

    Returns {"tensors", "config", "model" (patched), "scores", "modules", "val_nats_before", "val_nats_after",
    "steps", "train_s", "stopped_early"}."""
    from tqdm import tqdm
    from .evaluate import diffusion_nelbo
    from .lora import _log, base_fingerprint, read_documents, resolve_base, split_documents
    from .schedule import diffusion_loss
    from .tokenizer import load_tokenizer
    from .train import batch_indices, lr_at
    from .windows import make_windows

    if a.steps < 0 or a.batch_size < 1 or a.top_k < 1 or not 0 <= a.valid_fraction < 1:
        raise ValueError("patch: need steps >= 0, batch_size >= 1, top_k >= 1, 0 <= valid_fraction < 1")
    torch.set_num_threads(a.threads)
    model_path, tok_path = resolve_base(a.base)
    model, mcfg = load_model(model_path)
    if mcfg.causal:
        raise ValueError(f"{model_path}: a causal (AR baseline) model; patches here use the diffusion loss")
    fp = base_fingerprint(model_path)
    tok = load_tokenizer(tok_path)
    L = mcfg.max_length
    docs = read_documents(a.data)
    if a.valid_data:
        train_docs, valid_docs = docs, read_documents(a.valid_data)
    else:
        train_docs, valid_docs = split_documents(docs, tok, L, a.valid_fraction)
    tw = make_windows(train_docs, tok, L)
    vw = make_windows(valid_docs, tok, L) if valid_docs else None
    if vw is not None and a.eval_windows:
        vw = vw[: a.eval_windows]
    mask_id = mcfg.mask_token_id
    t_attr = time.time()
    if a.modules:
        unknown = [m for m in a.modules if m not in candidate_modules(mcfg)]
        if unknown:
            raise ValueError(f"patch: unknown modules {unknown}; candidates are blocks.<i>.{{{', '.join(MODULES)}}}")
        scores, chosen = {}, list(a.modules)
    else:
        scores = attribute(model, tw, mask_id, batches=a.attribution_batches, batch_size=a.batch_size, seed=a.seed)
        chosen = sorted(scores, key=lambda m: -scores[m])[: a.top_k]
    attr_s = time.time() - t_attr
    _log(f"base {model_path} (fingerprint {fp}); unfreezing {chosen} "
         f"(relative gradient norms {[round(scores.get(m, 0.0), 4) for m in chosen]})", a.progress)
    for p in model.parameters():
        p.requires_grad_(False)
    params: dict[str, torch.nn.Parameter] = {}
    for m in chosen:
        for n, p in model.get_submodule(m).named_parameters():
            p.requires_grad_(True)
            params[f"{m}.{n}"] = p

    def val() -> float | None:
        if vw is None:
            return None
        model.eval()
        return diffusion_nelbo(model, vw, mask_id, n_t=a.eval_n_t, seed=a.eval_seed, progress=a.progress)["nats_per_token"]

    before = val()
    opt = torch.optim.AdamW(list(params.values()), lr=a.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed)
    data = torch.from_numpy(np.ascontiguousarray(tw, dtype=np.int64))
    model.train()
    losses: list[float] = []
    t0 = time.time()
    stopped_early = False
    bar = tqdm(total=a.steps, desc="patch", unit="step", disable=not a.progress, dynamic_ncols=True)
    for step in range(a.steps):
        x0 = data[batch_indices(step, data.shape[0], a.batch_size, a.seed)]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        nll, _ = diffusion_loss(model, x0, mask_id, gen)
        loss = nll.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), a.grad_clip)
        opt.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if a.time_limit_min is not None and time.time() - t0 > 60 * a.time_limit_min and step + 1 < a.steps:
            _log(f"time limit {a.time_limit_min} min reached at step {step + 1}; stopping", a.progress)
            stopped_early = True
            break
    bar.close()
    train_s = time.time() - t0
    after = val()
    model.eval()
    tensors = {n: p.detach().cpu().float().numpy() for n, p in params.items()}
    cfg = {"base_fingerprint": fp, "base_config": mcfg.to_dict(), "tensors": sorted(tensors),
           "method": "selective fine-tuning, Auto-RGN module choice (Lee et al. 2023)",
           "modules": chosen, "scores": {m: round(s, 6) for m, s in scores.items()},
           "val_nats_before": before, "val_nats_after": after,
           "train": {"data": str(a.data), "docs": len(train_docs), "windows": int(tw.shape[0]), "steps": len(losses),
                     "batch_size": a.batch_size, "lr": a.lr, "seed": a.seed, "threads": a.threads,
                     "tokens": len(losses) * a.batch_size * L, "train_s": round(train_s, 1),
                     "attribution_s": round(attr_s, 1), "stopped_early": stopped_early}}
    save_patch(a.out, tensors, cfg)
    n = sum(v.size for v in tensors.values())
    _log(f"wrote {a.out} ({n:,} parameters of {sum(p.numel() for p in model.parameters()):,}, {len(chosen)} modules); "
         f"validation {before if before is None else round(before, 4)} -> "
         f"{after if after is None else round(after, 4)} nats/token", a.progress)
    return {"tensors": tensors, "config": cfg, "model": model, "scores": scores, "modules": chosen,
            "val_nats_before": before, "val_nats_after": after, "steps": len(losses), "train_s": train_s,
            "stopped_early": stopped_early, "losses": losses}


__all__ = ["KIND", "MODULES", "PatchTrainArgs", "apply_patch", "attribute", "candidate_modules", "check_patch",
           "read_patch", "save_patch", "train_patch"]
