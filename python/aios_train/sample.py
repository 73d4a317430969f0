"""Simple reference samplers for model cards and sanity checks (the runtime's samplers live in Rust).

Diffusion: MDLM's ancestral `ddpm` update on the log-linear schedule, position 0 fixed to [BOS], a final
argmax for tokens still masked ("noise removal"). AR: plain temperature-1 sampling.
"""

from __future__ import annotations

import torch

from .schedule import EPS, NEG_INF, noise
from .tokenizer import BOS_ID, EOS_ID


def _gumbel_argmax(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # MDLM _sample_categorical: argmax(p / Exp(1)) is a sample from p.
    e = -torch.log(torch.rand(probs.shape, generator=gen, dtype=torch.float64) + 1e-10)
    return (probs.double() / e).argmax(dim=-1)


@torch.no_grad()
def diffusion_sample(model, cfg, n: int, length: int, steps: int, seed: int = 0, prefix: list[int] | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mask = cfg.mask_token_id
    fixed = [BOS_ID] + list(prefix or [])
    x = torch.full((n, length), mask, dtype=torch.int64)
    x[:, : len(fixed)] = torch.tensor(fixed)
    ts = torch.linspace(1, EPS, steps + 1)
    for i in range(steps):
        t, s = ts[i].expand(n), ts[i + 1].expand(n)
        sig_t, _ = noise(t)
        sig_s, _ = noise(s)
        mc_t, mc_s = 1 - torch.exp(-sig_t), 1 - torch.exp(-sig_s)
        logits = model(x, sig_t).double()
        logits[..., mask] += NEG_INF
        p_x0 = logits.softmax(-1)
        q = p_x0 * (mc_t - mc_s)[:, None, None]
        q[..., mask] = mc_s[:, None]
        new = _gumbel_argmax(q, gen)
        x = torch.where(x == mask, new, x)
    still = x == mask
    if still.any():
        logits = model(x, torch.zeros(n))
        logits[..., mask] += NEG_INF
        x = torch.where(still, logits.argmax(-1), x)
    return x


@torch.no_grad()
def ar_sample(model, cfg, n: int, length: int, seed: int = 0, prefix: list[int] | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([[BOS_ID] + list(prefix or [])] * n, dtype=torch.int64)
    while x.shape[1] < length:
        logits = model(x)[:, -1].double()
        logits[:, cfg.mask_token_id] = float("-inf")
        nxt = _gumbel_argmax(logits.softmax(-1), gen)
        x = torch.cat([x, nxt[:, None]], dim=1)
    return x


def decode(tok, ids: list[int]) -> str:
    """Text up to the first [EOS] after the start (one document)."""
    ids = ids[1:] if ids and ids[0] == BOS_ID else ids
    if EOS_ID in ids:
        ids = ids[: ids.index(EOS_ID)]
    return tok.decode(ids, skip_special_tokens=True)


def sample_texts(model, cfg, tok, n: int = 4, length: int = 128, steps: int = 128, seed: int = 0, prompt: str | None = None) -> list[dict]:
    prefix = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    length = min(length, cfg.max_length)
    if cfg.causal:
        x = ar_sample(model, cfg, n, length, seed, prefix)
    else:
        x = diffusion_sample(model, cfg, n, length, steps, seed, prefix)
    return [{"seed": seed, "i": i, "text": decode(tok, row.tolist())} for i, row in enumerate(x)]
