"""MDLM's log-linear noise schedule, antithetic time sampling and SUBS loss, shared by train and eval."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-3          # LogLinearNoise eps and sampling_eps in MDLM
NEG_INF = -1000000.0  # MDLM's self.neg_infinity


def sample_t(n: int, gen: torch.Generator, antithetic: bool = True) -> torch.Tensor:
    """MDLM `_sample_t`: t in [eps, 1], antithetic = one stratum per batch element."""
    u = torch.rand(n, generator=gen)
    if antithetic:
        u = (u / n + torch.arange(n) / n) % 1
    return (1 - EPS) * u + EPS


def noise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LogLinearNoise: sigma(t) = -log(1 - (1-eps) t), dsigma/dt = (1-eps) / (1 - (1-eps) t)."""
    sigma = -torch.log1p(-(1 - EPS) * t)
    dsigma = (1 - EPS) / (1 - (1 - EPS) * t)
    return sigma, dsigma


def q_xt(x0: torch.Tensor, move_chance: torch.Tensor, mask_id: int, gen: torch.Generator,
         keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mask every token independently with probability move_chance[b]; `keep` positions are never masked."""
    move = torch.rand(x0.shape, generator=gen) < move_chance[:, None]
    if keep is not None:
        move &= ~keep
    return torch.where(move, torch.full_like(x0, mask_id), x0)


def subs_masked_nll(logits: torch.Tensor, x0: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Per-token -log p_theta(x0 | xt) under SUBS: [B, L], zero at unmasked positions (carry-over).

    Only masked positions are evaluated: under SUBS an unmasked position puts all its mass on xt,
    so its log-probability is exactly 0 and computing the softmax there would be wasted work.
    """
    masked = xt == mask_id
    nll = torch.zeros(x0.shape, dtype=torch.float32, device=x0.device)
    if masked.any():
        lg = logits[masked].float()
        lg[:, mask_id] += NEG_INF  # the model never predicts [MASK]
        nll[masked] = F.cross_entropy(lg, x0[masked], reduction="none")
    return nll


def diffusion_loss(model, x0: torch.Tensor, mask_id: int, gen: torch.Generator, t: torch.Tensor | None = None,
                   keep: torch.Tensor | None = None, shard: slice | None = None,
                   device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MDLM continuous-time NELBO terms: returns (weighted nll [B, L], t [B]). Loss = mean over tokens.

    With `shard`, the noise is drawn for the whole batch `x0` (so the generator advances as in a one-process run)
    and only the rows of `shard` go through the model (data-parallel training); `device` is where they run."""
    if t is None:
        t = sample_t(x0.shape[0], gen)
    sigma, dsigma = noise(t)
    move_chance = 1 - torch.exp(-sigma)  # = (1-eps) t
    xt = q_xt(x0, move_chance, mask_id, gen, keep)
    if shard is not None:
        x0, xt, sigma, dsigma, t = x0[shard], xt[shard], sigma[shard], dsigma[shard], t[shard]
    if device is not None:
        x0, xt, sigma, dsigma = x0.to(device), xt.to(device), sigma.to(device), dsigma.to(device)
    logits = model(xt, sigma)
    nll = subs_masked_nll(logits, x0, xt, mask_id)
    weight = (dsigma / torch.expm1(sigma))[:, None]  # = 1/t for the log-linear schedule
    return nll * weight, t


def ar_loss(model, x: torch.Tensor) -> torch.Tensor:
    """Next-token NLL [B, L-1] of the causal baseline on the same windows."""
    logits = model(x[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="none").view(x.shape[0], -1)
