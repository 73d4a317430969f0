"""Model configuration shared with the Rust runtime.

The JSON produced by `ModelConfig.to_json()` is stored verbatim in the Parquet metadata key
`aios.config` and parsed by Rust, so the key names below are part of the file format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any


_CONTINUOUS_FIELDS = ("image_size", "image_channels", "image_patch", "audio_mels", "audio_frames",
                      "audio_frames_per_token", "audio_sample_rate", "audio_n_fft", "audio_hop")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    cond_dim: int
    max_length: int
    mask_token_id: int
    time_conditioning: bool = False
    arch: str = "dit"
    mlp_ratio: int = 4
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    # causal=True is the autoregressive baseline: same backbone, causal attention, sigma = 0.
    causal: bool = False
    # Continuous heads (all off by default, so a plain MDLM file keeps its layout). An image head
    # patchifies image_channels x image_size x image_size pixels into (image_size / image_patch)^2
    # positions; an audio head groups audio_frames_per_token log-mel frames of audio_mels bins into one
    # position, up to audio_frames frames. The STFT settings describe how the log-mels were made and how
    # the runtime turns them back into sound (Griffin-Lim).
    image_size: int = 0
    image_channels: int = 1
    image_patch: int = 4
    audio_mels: int = 0
    audio_frames: int = 0
    audio_frames_per_token: int = 4
    audio_sample_rate: int = 22050
    audio_n_fft: int = 1024
    audio_hop: int = 256

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def has_image(self) -> bool:
        return self.image_size > 0

    @property
    def has_audio(self) -> bool:
        return self.audio_mels > 0

    @property
    def multimodal(self) -> bool:
        """Whether the modality embedding and per-position conditioning exist (any continuous head)."""
        return self.has_image or self.has_audio

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.image_patch) ** 2 if self.has_image else 0

    @property
    def image_patch_dim(self) -> int:
        return self.image_channels * self.image_patch ** 2

    @property
    def audio_tokens(self) -> int:
        return self.audio_frames // self.audio_frames_per_token if self.has_audio else 0

    @property
    def audio_token_dim(self) -> int:
        return self.audio_mels * self.audio_frames_per_token

    def heads(self) -> list[str]:
        return ["text"] + (["image"] if self.has_image else []) + (["audio"] if self.has_audio else [])

    def validate(self) -> None:
        if self.arch != "dit":
            raise ValueError(f"ModelConfig: unsupported arch {self.arch!r} (only 'dit')")
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "cond_dim", "max_length", "mlp_ratio"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {v!r}")
        if self.hidden_size % self.n_heads:
            raise ValueError(f"ModelConfig: hidden_size {self.hidden_size} not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head_dim {self.head_dim} must be even for rotary embeddings")
        for name in ("mask_token_id", "pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < self.vocab_size:
                raise ValueError(f"ModelConfig: {name}={v!r} outside vocab [0, {self.vocab_size})")
        for name in ("image_size", "image_channels", "image_patch", "audio_mels", "audio_frames",
                     "audio_frames_per_token", "audio_sample_rate", "audio_n_fft", "audio_hop"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > 1 << 16:
                raise ValueError(f"ModelConfig: {name} must be an int in 0..=65536, got {v!r}")
        if self.has_image:
            if self.image_patch <= 0 or self.image_size % self.image_patch or self.image_channels <= 0:
                raise ValueError(f"ModelConfig: image_size {self.image_size} must be a multiple of image_patch "
                                 f"{self.image_patch} and image_channels positive")
        if self.has_audio:
            if self.audio_frames_per_token <= 0 or self.audio_frames <= 0 or self.audio_frames % self.audio_frames_per_token:
                raise ValueError(f"ModelConfig: audio_frames {self.audio_frames} must be a positive multiple of "
                                 f"audio_frames_per_token {self.audio_frames_per_token}")
            if self.audio_n_fft < 16 or self.audio_hop <= 0 or self.audio_hop > self.audio_n_fft or self.audio_sample_rate < 8000:
                raise ValueError("ModelConfig: audio STFT settings out of range (n_fft >= 16, 0 < hop <= n_fft, "
                                 "sample_rate >= 8000)")
            if self.audio_mels > self.audio_n_fft // 2 + 1:
                raise ValueError(f"ModelConfig: audio_mels {self.audio_mels} > n_fft/2+1 frequency bins")
        if self.multimodal and self.causal:
            raise ValueError("ModelConfig: continuous heads need a diffusion model (causal = false)")
        for name in ("time_conditioning", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig: {name} must be a bool")
        for name in ("rope_base", "norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"ModelConfig: {name} must be a positive number, got {v!r}")
            setattr(self, name, float(v))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.multimodal:
            # A text model's config stays byte-identical to the MDLM-era files.
            for f in _CONTINUOUS_FIELDS:
                d.pop(f)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        if not isinstance(d, dict):
            raise ValueError(f"ModelConfig.from_dict: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown keys {unknown}; known keys are {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ValueError(f"ModelConfig: missing required keys {missing}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str | bytes) -> "ModelConfig":
        try:
            d = json.loads(s)
        except json.JSONDecodeError as e:
            raise ValueError(f"ModelConfig: invalid JSON: {e}") from e
        return cls.from_dict(d)
