"""Byte-level BPE trained with HF `tokenizers` on the training split.

Special ids are fixed by training order: [PAD]=0, [BOS]=1, [EOS]=2, [MASK]=3 (ModelConfig defaults
rely on this). No post-processor: BOS/EOS are added explicitly by the data pipeline, so the Rust
side (tokenizers crate without onig) encodes exactly like Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .data import read_jsonl

SPECIAL_TOKENS = ["[PAD]", "[BOS]", "[EOS]", "[MASK]"]
PAD_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3


def train_tokenizer(train_jsonl: str | Path, out: str | Path, vocab_size: int = 4096, min_frequency: int = 2) -> Tokenizer:
    docs = read_jsonl(train_jsonl)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        # All 256 byte symbols up front: any input is encodable, no [UNK] needed.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )

    def it() -> Iterator[str]:
        for d in docs:
            yield d["text"]

    tok.train_from_iterator(it(), trainer=trainer, length=len(docs))
    check_special_ids(tok)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return tok


def check_special_ids(tok: Tokenizer) -> None:
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got != i:
            raise ValueError(f"tokenizer: special token {t} has id {got}, expected {i}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    tok = Tokenizer.from_file(str(path))
    check_special_ids(tok)
    return tok
