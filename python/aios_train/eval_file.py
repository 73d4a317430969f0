"""Held-out evaluation of a model file (optionally with a LoRA adapter) on a jsonl corpus: the files around the
metrics of `aios_train.evaluate`, which stays a leaf module (the training loops and the LoRA trainer import it;
it imports none of them)."""

from __future__ import annotations

from pathlib import Path

from .data import read_jsonl
from .evaluate import evaluate_model
from .export import load_model
from .lora import apply_lora
from .tokenizer import load_tokenizer
from .windows import make_windows


def evaluate_file(model_path: str | Path, data_jsonl: str | Path, tokenizer_path: str | Path, *, n_t: int = 16,
                  seed: int = 0, batch_size: int = 32, max_windows: int | None = None, progress: bool = True,
                  lora: str | Path | None = None, lora_weight: float = 1.0, source: str | None = None) -> dict:
    model, config = load_model(model_path)
    if lora is not None:
        model = apply_lora(model, lora, weight=lora_weight, inplace=True)
    tok = load_tokenizer(tokenizer_path)
    if tok.get_vocab_size() != config.vocab_size:
        raise ValueError(f"tokenizer vocab {tok.get_vocab_size()} != model vocab {config.vocab_size}")
    texts = [d["text"] for d in read_jsonl(data_jsonl) if source is None or d.get("source") == source]
    if not texts:
        raise ValueError(f"{data_jsonl}: no documents" + (f" with source {source!r}" if source else ""))
    windows = make_windows(texts, tok, config.max_length)
    if max_windows:
        windows = windows[:max_windows]
    r = evaluate_model(model, config, windows, n_t=n_t, seed=seed, batch_size=batch_size, progress=progress)
    r["model"] = str(model_path)
    if lora is not None:
        r["lora"], r["lora_weight"] = str(lora), lora_weight
    if source is not None:
        r["source"] = source
    return r
