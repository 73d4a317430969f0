"""Input/output heads of the continuous modalities (image patches, audio log-mel frame groups).

Each head maps its modality into the backbone width on the way in (a Linear plus a learned position
embedding, which for images carries the 2D position of each patch) and back out on the way out (a Linear
on the final layer's adaLN-modulated states, shared with the text head). The output is the
v-prediction of the continuous diffusion (see `continuous.py`). Parameter names are part of the
file format: the Rust runtime (`crates/aios-core/src/model/image.rs`, `audio.rs`) loads them by name.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig

MODALITY_TEXT, MODALITY_IMAGE, MODALITY_AUDIO = 0, 1, 2
# Continuous time t in [0, 1] enters the 256-dim sinusoidal timestep embedding as 1000 t (DiT/DDPM's
# integer timesteps), where the text path feeds MDLM's sigma (0 without time conditioning).
CONTINUOUS_TIME_SCALE = 1000.0


class ModalityEmbedding(nn.Module):
    """One learned vector per modality added to every input position (zero init: a warm-started text
    model is unchanged at step 0)."""

    def __init__(self, dim: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(3, dim))

    def forward(self, modality: int) -> torch.Tensor:
        return self.embedding[modality]


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p]; patches row-major, values ordered (channel, row, column)."""
    b, c, h, w = img.shape
    x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, c: int, size: int, p: int) -> torch.Tensor:
    b = x.shape[0]
    g = size // p
    return x.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, size, size)


class ImageHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, pd = cfg.hidden_size, cfg.image_patch_dim
        self.proj_in = nn.Linear(pd, d)
        self.pos_embed = nn.Parameter(torch.randn(cfg.image_tokens, d) * 0.02)
        self.proj_out = nn.Linear(d, pd)
        # Zero init as DiT's final layer: the untrained head predicts v = 0.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def check(self, img: torch.Tensor) -> None:
        c, s = self.cfg.image_channels, self.cfg.image_size
        if img.dim() != 4 or tuple(img.shape[1:]) != (c, s, s):
            raise ValueError(f"image must be [B, {c}, {s}, {s}], got {tuple(img.shape)}")

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        self.check(img)
        return self.proj_in(patchify(img.float(), self.cfg.image_patch)) + self.pos_embed

    def out(self, h: torch.Tensor) -> torch.Tensor:
        return unpatchify(self.proj_out(h), self.cfg.image_channels, self.cfg.image_size, self.cfg.image_patch)


class AudioHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, pd = cfg.hidden_size, cfg.audio_token_dim
        self.proj_in = nn.Linear(pd, d)
        self.pos_embed = nn.Parameter(torch.randn(cfg.audio_tokens, d) * 0.02)
        self.proj_out = nn.Linear(d, pd)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def embed(self, mel: torch.Tensor) -> torch.Tensor:
        f, m = self.cfg.audio_frames, self.cfg.audio_mels
        if mel.dim() != 3 or tuple(mel.shape[1:]) != (f, m):
            raise ValueError(f"audio must be [B, {f}, {m}] (frames, mels), got {tuple(mel.shape)}")
        b = mel.shape[0]
        return self.proj_in(mel.float().reshape(b, self.cfg.audio_tokens, self.cfg.audio_token_dim)) + self.pos_embed

    def out(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj_out(h).reshape(h.shape[0], self.cfg.audio_frames, self.cfg.audio_mels)
