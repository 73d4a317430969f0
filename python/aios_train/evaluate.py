"""Held-out evaluation: MDLM's continuous-time NELBO (diffusion) and next-token NLL (AR baseline).

Both are measured on the same windows and the same predicted tokens: positions 1..L-1, conditioned
on the [BOS] at position 0 (AR conditions on it by construction; for diffusion position 0 is never
masked, which still gives a valid upper bound on -log p(x_1..L-1 | BOS)). The NELBO is estimated with
`n_t` stratified times per window, t_k = eps + (1-eps)(k + u)/n_t, with seeded u and masks, so the
number is stable and reproducible. exp(nats/token) is an upper bound on the diffusion model's perplexity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from tqdm import tqdm

from .schedule import EPS, ar_loss, diffusion_loss


def _device_of(model) -> torch.device:
    """Where the model's weights are (the windows go there; noise is drawn on the CPU generator)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def diffusion_nelbo(model, windows, mask_id: int, n_t: int = 16, seed: int = 0, batch_size: int = 32,
                    progress: bool = True) -> dict:
    x = torch.as_tensor(np.asarray(windows), dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    keep = torch.zeros(x.shape[1], dtype=torch.bool)
    keep[0] = True
    # Expand each window n_t times with its own stratum of t; evaluate in batches.
    n = x.shape[0]
    u = torch.rand(n, n_t, generator=gen)
    t_all = EPS + (1 - EPS) * (torch.arange(n_t)[None, :] + u) / n_t  # [n, n_t]
    rows = torch.arange(n).repeat_interleave(n_t)
    ts = t_all.reshape(-1)
    bar = tqdm(range(0, rows.numel(), batch_size), desc="nelbo", unit="batch", disable=not progress, leave=False)
    for i in bar:
        xb = x[rows[i : i + batch_size]]
        nll, _ = diffusion_loss(model, xb, mask_id, gen, t=ts[i : i + batch_size], keep=keep.expand_as(xb),
                                device=_device_of(model))
        total += nll.double().sum().item()
        count += xb.shape[0] * (xb.shape[1] - 1)
    nats = total / count
    return {"nats_per_token": nats, "ppl": math.exp(nats), "tokens": n * (x.shape[1] - 1), "windows": n, "n_t": n_t}


@torch.no_grad()
def ar_nll(model, windows, batch_size: int = 32, progress: bool = True) -> dict:
    x = torch.as_tensor(np.asarray(windows), dtype=torch.int64)
    total, count = 0.0, 0
    for i in tqdm(range(0, x.shape[0], batch_size), desc="ar-nll", unit="batch", disable=not progress, leave=False):
        nll = ar_loss(model, x[i : i + batch_size].to(_device_of(model)))
        total += nll.double().sum().item()
        count += nll.numel()
    nats = total / count
    return {"nats_per_token": nats, "ppl": math.exp(nats), "tokens": count, "windows": x.shape[0]}


def evaluate_model(model, config, windows, n_t: int = 16, seed: int = 0, batch_size: int = 32, progress: bool = True) -> dict:
    """Dispatch on config.causal: AR perplexity, or the diffusion perplexity bound."""
    if config.causal:
        r = ar_nll(model, windows, batch_size=batch_size, progress=progress)
        r["metric"] = "ar_ppl"
    else:
        r = diffusion_nelbo(model, windows, config.mask_token_id, n_t=n_t, seed=seed, batch_size=batch_size, progress=progress)
        r["metric"] = "diffusion_ppl_bound"
    return r
