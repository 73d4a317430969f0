"""Token windows exactly as MDLM's `wrap` mode (mdlm/dataloader.py `_group_texts`).

Each document is tokenised without special tokens and followed by [EOS]; all documents are
concatenated; the stream is cut into chunks of L-2 tokens and every chunk becomes [BOS] chunk [EOS].
The remainder shorter than L-2 is dropped, as MDLM does. Diffusion and AR use the same windows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from .data import read_jsonl
from .tokenizer import BOS_ID, EOS_ID


def make_windows(texts: list[str], tok: Tokenizer, length: int, batch: int = 1024) -> np.ndarray:
    if length < 3:
        raise ValueError(f"window length must be >= 3, got {length}")
    stream: list[int] = []
    for i in tqdm(range(0, len(texts), batch), desc="tokenize", unit="batch", leave=False):
        for enc in tok.encode_batch(texts[i : i + batch], add_special_tokens=False):
            stream.extend(enc.ids)
            stream.append(EOS_ID)
    body = length - 2
    n = len(stream) // body
    if n == 0:
        raise ValueError(f"corpus too small: {len(stream)} tokens < one window of {length}")
    arr = np.asarray(stream[: n * body], dtype=np.int64).reshape(n, body)
    out = np.empty((n, length), dtype=np.int64)
    out[:, 0] = BOS_ID
    out[:, 1:-1] = arr
    out[:, -1] = EOS_ID
    return out


def windows_from_jsonl(path: str | Path, tok: Tokenizer, length: int) -> np.ndarray:
    return make_windows([d["text"] for d in read_jsonl(path)], tok, length)
