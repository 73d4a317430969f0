"""Gaussian diffusion of the continuous heads (image pixels, audio log-mels).

Schedule: the cosine schedule of Nichol & Dhariwal (2021) in continuous time t in [0, 1],
    alpha_bar(t) = cos(((t + s) / (1 + s)) * pi / 2)^2 / cos((s / (1 + s)) * pi / 2)^2,  s = 0.008,
    x_t = alpha_t x_0 + sigma_t eps,  alpha_t = sqrt(alpha_bar), sigma_t = sqrt(1 - alpha_bar).
Objective: v-prediction (Salimans & Ho 2022), v = alpha_t eps - sigma_t x_0, loss = mean (v_hat - v)^2.
Why v and not eps: at t -> 1 (pure noise, alpha_t ~ 0) an eps-model's x_0 = (x_t - sigma eps_hat) / alpha
divides by ~0, which ruins the first steps of a 10-20 step sampler; v keeps both ends well posed
(x_0 = alpha x_t - sigma v, eps = sigma x_t + alpha v) and is what few-step samplers and distillation use.

Samplers (the Rust runtime, crates/aios-core/src/sampler/continuous.rs, implements the same ones;
this module is their reference): DDIM with eta (Song et al. 2021; eta = 0 deterministic) and DDPM
ancestral sampling (Ho et al. 2020; equal to DDIM with eta = 1), LCM's multistep sampler for consistency-distilled
students (Luo et al. 2023; `aios_train.lcm`), on the grid t_i = 1 - i / steps,
classifier-free guidance `v_u + (1 + w)(v_c - v_u)` (the text sampler's convention, w = 0 = conditional).
Noise comes from the runtime's counter-based generator (`gaussian`), so both sides draw the same numbers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

COSINE_S = 0.008


def alpha_sigma(t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.as_tensor(t, dtype=torch.float64)
    f = torch.cos((t.clamp(0, 1) + COSINE_S) / (1 + COSINE_S) * math.pi / 2) ** 2
    f0 = math.cos(COSINE_S / (1 + COSINE_S) * math.pi / 2) ** 2
    ab = (f / f0).clamp(0.0, 1.0)
    return ab.sqrt(), (1 - ab).sqrt()


def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return a.float().view(shape) * x0 + s.float().view(shape) * eps


def v_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(t)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return a.float().view(shape) * eps - s.float().view(shape) * x0


# ---- the runtime's counter-based random numbers (crates/aios-core/src/sampler/rng.rs) ----
_M64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _stream_key(seed: int, step: int, position: int) -> int:
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ ((step * 0xA24BAED4963EE407) & _M64)) ^ position)


def _uniform(key: int, counter: int) -> float:
    bits = _splitmix64(key ^ ((counter * 0xD6E8FEB86659FD93) & _M64)) >> 11
    return (bits + 0.5) * (1.0 / (1 << 53))


# Streams of the continuous sampler live above the text sampler's (which use positions < 2^41).
NOISE_STREAM = 1 << 42


def gaussian(seed: int, step: int, n: int, offset: int = 0) -> np.ndarray:
    """n standard normals (f32) for one sampler step: element i uses stream (seed, step, 2^42 + offset + i),
    Box-Muller in f64 on its first two uniforms. Slow (pure Python); for tests and references."""
    out = np.empty(n, dtype=np.float32)
    for i in range(n):
        key = _stream_key(seed, step, NOISE_STREAM + offset + i)
        u1, u2 = _uniform(key, 1), _uniform(key, 2)
        out[i] = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
    return out


def timesteps(steps: int) -> list[float]:
    return [1.0 - i / steps for i in range(steps + 1)]


def _estimate(x: torch.Tensor, v: torch.Tensor, t: float, s: float, clip: float | None):
    """((alpha_t, sigma_t), (alpha_s, sigma_s), the x_0 estimate alpha_t x - sigma_t v, clipped): every step's start."""
    (a_t, s_t), (a_s, s_s) = (tuple(float(u) for u in alpha_sigma(t)), tuple(float(u) for u in alpha_sigma(s)))
    x0 = a_t * x - s_t * v
    return (a_t, s_t), (a_s, s_s), (x0.clamp(-clip, clip) if clip is not None else x0)


def ddim_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float, eta: float, z: torch.Tensor | None,
              clip: float | None) -> torch.Tensor:
    """x_t -> x_s given the model's v at t. eta = 0: deterministic DDIM; eta = 1: DDPM's posterior."""
    (a_t, s_t), (a_s, s_s), x0 = _estimate(x, v, t, s, clip)
    eps = (x - a_t * x0) / s_t if s_t > 0 else s_t * x + a_t * v
    if s <= 0:
        return x0
    ab_t, ab_s = a_t * a_t, a_s * a_s
    sig = eta * math.sqrt(max(0.0, (1 - ab_s) / (1 - ab_t))) * math.sqrt(max(0.0, 1 - ab_t / ab_s)) if ab_t < 1 else 0.0
    dir_coef = math.sqrt(max(0.0, 1 - ab_s - sig * sig))
    out = a_s * x0 + dir_coef * eps
    if sig > 0:
        out = out + sig * z
    return out


def ddpm_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float, z: torch.Tensor | None,
              clip: float | None) -> torch.Tensor:
    """Ancestral step from the Gaussian posterior q(x_s | x_t, x_0) with x_0 from v (Ho et al. eq. 6-7)."""
    (a_t, s_t), (a_s, s_s), x0 = _estimate(x, v, t, s, clip)
    if s <= 0:
        return x0
    ab_t, ab_s = a_t * a_t, a_s * a_s
    a_ts2 = ab_t / ab_s                       # alpha_{t|s}^2
    beta = 1 - a_ts2
    mean = (a_s * beta / (1 - ab_t)) * x0 + (math.sqrt(a_ts2) * (1 - ab_s) / (1 - ab_t)) * x
    var = beta * (1 - ab_s) / (1 - ab_t)
    return mean + math.sqrt(max(var, 0.0)) * z


def lcm_step(x: torch.Tensor, v: torch.Tensor, t: float, s: float, z: torch.Tensor | None,
             clip: float | None) -> torch.Tensor:
    """LCM's multistep sampler (Luo et al. 2023, Algorithm 1; `aios_train.lcm`): the consistency function's x_0
    (the model's x_0 estimate), then noised afresh to s: x_s = alpha_s x_0 + sigma_s z."""
    (a_t, s_t), (a_s, s_s), x0 = _estimate(x, v, t, s, clip)
    if s <= 0:
        return x0
    return a_s * x0 + s_s * z


IMAGE_STREAM, AUDIO_STREAM = 0, 1 << 32
KNOWN_OFFSET = 1 << 29


@torch.no_grad()
def sample_reference(model, tokens: torch.Tensor, kind: str, steps: int, sampler: str = "ddim", eta: float = 0.0,
                     guidance: float = 0.0, uncond_tokens: torch.Tensor | None = None, seed: int = 0,
                     known: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     runtime_noise: bool = True) -> torch.Tensor:
    """The runtime's continuous sampler in PyTorch, for one canvas [text tokens (given) | image or audio].

    tokens [1, Lt]; returns the final x ([1, C, H, W] or [1, frames, mels]). With `runtime_noise` the noise
    is the runtime's (`gaussian`, slow, pure Python), so outputs match `aios_rt` to float rounding; without
    it, torch.randn (for timing). Inpainting: `known` values where `mask` is true, re-noised every step.
    """
    cfg = model.config
    shape = (1, cfg.image_channels, cfg.image_size, cfg.image_size) if kind == "image" else (1, cfg.audio_frames, cfg.audio_mels)
    n = int(np.prod(shape))
    offset = IMAGE_STREAM if kind == "image" else AUDIO_STREAM
    clip = 1.0 if kind == "image" else None

    def noise(step: int, off: int) -> torch.Tensor:
        if runtime_noise:
            return torch.from_numpy(gaussian(seed, step, n, off)).view(shape)
        return torch.randn(shape)

    def renoise(x: torch.Tensor, t: float, step: int) -> torch.Tensor:
        if known is None:
            return x
        if t <= 0:
            return torch.where(mask, known, x)
        a, s = (float(u) for u in alpha_sigma(t))
        z = noise(step, offset + KNOWN_OFFSET)
        return torch.where(mask, (a * known.float() + s * z).float(), x)

    x = renoise(noise(0, offset), 1.0, 0)
    ts = timesteps(steps)
    guided = guidance > 0 and uncond_tokens is not None
    toks = torch.cat([tokens, uncond_tokens]) if guided else tokens
    for i in range(steps):
        t, s = ts[i], ts[i + 1]
        b = toks.shape[0]
        tt = torch.full((b,), t, dtype=torch.float32)
        xin = x.expand(b, *shape[1:])
        out = model.forward_canvas(toks, **({"image": xin, "t_image": tt} if kind == "image" else {"audio": xin, "t_audio": tt}),
                                   text_logits=False)[kind]
        v = out[1:2] + (1 + guidance) * (out[0:1] - out[1:2]) if guided else out[0:1]
        stochastic = s > 0 and (sampler in ("ddpm", "lcm") or eta > 0)
        z = noise(i + 1, offset) if stochastic else None
        if sampler == "lcm":
            x = lcm_step(x, v, t, s, z, clip)
        elif sampler == "ddpm":
            x = ddpm_step(x, v, t, s, z, clip)
        else:
            x = ddim_step(x, v, t, s, eta, z, clip)
        x = renoise(x, s, i + 1)
    return x
