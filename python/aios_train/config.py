"""Model configuration shared with the Rust runtime.

The JSON produced by `ModelConfig.to_json()` is stored verbatim in the Parquet metadata key
`aios.config` and parsed by Rust, so the key names below are part of the file format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields
from typing import Any


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

    def __post_init__(self) -> None:
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

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
        for name in ("time_conditioning", "causal"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig: {name} must be a bool")
        for name in ("rope_base", "norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise ValueError(f"ModelConfig: {name} must be a positive number, got {v!r}")
            setattr(self, name, float(v))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

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
