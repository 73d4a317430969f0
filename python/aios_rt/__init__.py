"""aios_rt: the aios runtime (Rust, candle) for small diffusion models.

>>> import aios_rt
>>> eng = aios_rt.Engine("models/aios-text-tiny")
>>> g = eng.diffuse("The old house", length=64, steps=16, sampler="confidence", seed=0)
>>> g.text, g.confidence, g.steps_run, g.timings
>>> uni = aios_rt.Engine("models/aios-unified-tiny")
>>> img = uni.diffuse("a sneaker", modality="image", steps=20, guidance=3.0).image   # numpy uint8 [28, 28]
>>> uni.diffuse("seven", modality="audio", steps=20).save("seven.wav")
>>> mem = aios_rt.MemoryStore("~/.aios/memory")
>>> mem.add("Our trip to Kyoto was in April 2025.", meta={"tag": "travel"})
>>> mem.search("when did we visit Japan?", k=5)
"""

from __future__ import annotations

import operator
from typing import Dict, Tuple

import numpy as np

from . import _native
from ._errors import AiosError, AiosIOError, ConfigError, FormatError, InputError, NumericError, TokenizerError
from ._native import (
    SAMPLERS,
    Banned,
    Brightness,
    Loudness,
    ClassEnergy,
    Generation,
    Regex,
    Required,
    UsedMemory,
    ValidJson,
    __version__,
    dequantize as _dequantize,
    quantize as _quantize,
    quantize_file,
    write_random_lora,
    write_random_model,
)
from .memory import Embedder, Hit, MemoryStore, default_embedder_path

__all__ = [
    "Engine",
    "Generation",
    "UsedMemory",
    "Banned",
    "Brightness",
    "Loudness",
    "ClassEnergy",
    "Required",
    "ValidJson",
    "Regex",
    "MemoryStore",
    "Hit",
    "Embedder",
    "default_embedder_path",
    "AiosError",
    "AiosIOError",
    "ConfigError",
    "FormatError",
    "InputError",
    "NumericError",
    "TokenizerError",
    "SAMPLERS",
    "quantize",
    "dequantize",
    "quantize_file",
    "read_tensors",
    "write_random_model",
    "write_random_lora",
    "__version__",
]


class Engine(_native.Engine):
    """A loaded model (folder with weights + tokenizer.json, or a .parquet file).

    ``threads`` bounds the worker threads of this engine (default: all cores);
    ``dtype`` picks ``model.<dtype>.parquet`` in a folder (f32, int8, int4, int2).
    """

    def logits(self, batch, sigma: float | None = None, control: dict | None = None) -> np.ndarray:
        """Raw logits ``[n, L, V]`` (float32) for equal-length token sequences; ``control`` ({name: text})
        feeds the active token ControlNets."""
        if len(batch) and isinstance(batch[0], (int, np.integer)):
            batch = [batch]
        # operator.index semantics: 1.5 is an error, not silently 1.
        batch = [[operator.index(t) if not isinstance(t, float) else t for t in seq] for seq in batch]
        raw, shape = self.logits_raw(batch, sigma, control)
        return np.frombuffer(raw, dtype="<f4").reshape(shape)


def quantize(values: np.ndarray, dtype: str) -> bytes:
    """Quantise an f32 array (last dim a multiple of the block size) to GGML block bytes."""
    a = np.ascontiguousarray(values, dtype="<f4")
    return _quantize(a.tobytes(), list(a.shape), dtype)


def dequantize(data: bytes, shape, dtype: str) -> np.ndarray:
    """Decode ``dtype`` bytes of ``shape`` to a float32 array."""
    raw = _dequantize(bytes(data), list(shape), dtype)
    return np.frombuffer(raw, dtype="<f4").reshape(shape).copy()


def read_tensors(path) -> Dict[str, np.ndarray]:
    """Every tensor of a weight file as float32 (quantised ones dequantised)."""
    tensors, _ = read_tensors_with_metadata(path)
    return tensors


def read_tensors_with_metadata(path) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    raw, meta = _native.read_tensors_raw(str(path))
    out = {
        name: np.frombuffer(data, dtype="<f4").reshape(shape).copy()
        for name, (_dtype, shape, data) in raw.items()
    }
    return out, meta
