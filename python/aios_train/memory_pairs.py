"""Training windows that teach the text model to use memories placed in front of its prompt.

The runtime conditions on memories by putting `[BOS] memory [EOS]` segments before `[BOS] prompt ...` on the canvas
(crates/aios-core/src/engine/mod.rs, `Engine::memory_segment`). The model learns to read them from windows of the
same layout built from the corpus's Wikipedia leads: the memory is an article's first sentence(s), the target the
rest of its lead, and the memory segment also holds distractors (first sentences of other articles) in random
order. With probability `drop` the article's own memory is left out (only distractors remain), so the model also
learns not to copy a memory that does not fit. Memory tokens are given (never masked, no loss); the target is
trained with the usual masked-diffusion loss.
"""

from __future__ import annotations

import re

import numpy as np
from tokenizers import Tokenizer

from .tokenizer import BOS_ID, EOS_ID, PAD_ID

SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_lead(text: str, tok: Tokenizer, memory_tokens: int) -> tuple[list[int], list[int]] | None:
    """(memory ids, target ids) of one lead: as many opening sentences as fit in `memory_tokens`, then the rest."""
    sents = SENT.split(text.strip())
    if len(sents) < 2:
        return None
    ids = [tok.encode(s, add_special_tokens=False).ids for s in sents]
    mem, k = list(ids[0]), 1
    while k < len(sents) - 1 and len(mem) + 1 + len(ids[k]) <= memory_tokens:
        mem += tok.encode(" " + sents[k], add_special_tokens=False).ids
        k += 1
    if len(mem) > memory_tokens:
        return None
    target = tok.encode(" ".join(sents[k:]), add_special_tokens=False).ids
    return (mem, target) if len(target) >= 8 else None


def memory_windows(texts: list[str], tok: Tokenizer, length: int, memory_tokens: int = 40, distractors: int = 1,
                   drop: float = 0.2, copies: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(windows [N, length] int64, keep [N, length] bool): `copies` layouts per lead, each with its own distractors.

    Layout: [BOS] m_1 [EOS] ... [BOS] m_k [EOS] [BOS] target [EOS] [PAD]...; keep = every memory token and the pads
    (the runtime never asks the model about them)."""
    if not 0 <= drop < 1:
        raise ValueError(f"drop must be in [0, 1), got {drop}")
    pairs = [p for p in (split_lead(t, tok, memory_tokens) for t in texts) if p is not None]
    if len(pairs) < distractors + 2:
        raise ValueError(f"only {len(pairs)} usable leads; need at least {distractors + 2}")
    rng = np.random.default_rng(seed)
    rows, keeps = [], []
    for _ in range(copies):
        for i, (mem, target) in enumerate(pairs):
            others = rng.choice([j for j in range(len(pairs)) if j != i], distractors, replace=False)
            segs = [pairs[j][0] for j in others]
            if rng.random() >= drop:
                segs.insert(int(rng.integers(0, len(segs) + 1)), mem)
            prefix: list[int] = []
            for s in segs:
                prefix += [BOS_ID] + s + [EOS_ID]
            body = ([BOS_ID] + target + [EOS_ID])[: length - len(prefix)]
            if len(body) < 8:
                continue
            row = prefix + body + [PAD_ID] * (length - len(prefix) - len(body))
            keep = [True] * len(prefix) + [False] * len(body) + [True] * (length - len(prefix) - len(body))
            keep[len(prefix)] = True  # the prompt's BOS is always given
            rows.append(row)
            keeps.append(keep)
    return np.asarray(rows, dtype=np.int64), np.asarray(keeps, dtype=bool)
