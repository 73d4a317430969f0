"""How English are the shipped model's generations? Per sampler setting, over many seeds:

- known words: share of generated words (runs of letters, case-folded) that occur anywhere in the training
  corpus. Non-words ("skervary", "compiging") are what an undertrained byte-level BPE model gets wrong first;
- distinct-2: unique word bigrams / bigrams, pooled over all seeds. Low values mean repetition, the failure of
  greedy confidence decoding ("of the LORD of the LORD ...").

Held-out text cut to the same number of words gives the ceiling for both.

    python bench/text_quality.py [--model models/aios-text-tiny] [--seeds 20] [--prompt "The old house"]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import aios_rt  # noqa: E402
from common import emit, machine  # noqa: E402

WORD = re.compile(r"[A-Za-z]+")
SETTINGS = {
    "ancestral": dict(sampler="ancestral"),
    "ancestral top_p 0.9": dict(sampler="ancestral", top_p=0.9),
    "ancestral top_p 0.8": dict(sampler="ancestral", top_p=0.8),
    "ancestral T 0.8": dict(sampler="ancestral", temperature=0.8),
    "entropy top_p 0.8": dict(sampler="entropy", top_p=0.8),
    "confidence T 0.8": dict(sampler="confidence", temperature=0.8),
}


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def scores(texts: list[list[str]], vocab: set[str]) -> dict:
    n = sum(len(t) for t in texts)
    bigrams = [(a, b) for t in texts for a, b in zip(t, t[1:])]
    return {"known_words": sum(w in vocab for t in texts for w in t) / max(n, 1),
            "distinct_2": len(set(bigrams)) / max(len(bigrams), 1), "words": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-text-tiny"))
    ap.add_argument("--train", default=str(ROOT / "data" / "corpus" / "train.jsonl"), help="vocabulary source")
    ap.add_argument("--valid", default=str(ROOT / "data" / "corpus" / "valid.jsonl"), help="ceiling source")
    ap.add_argument("--prompt", default="The old house")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    for path in (args.train, args.valid):
        if not Path(path).exists():
            sys.exit(f"{path} not found: build the corpus first with `just data`")
    vocab: set[str] = set()
    with open(args.train) as f:
        for line in f:
            vocab.update(words(json.loads(line)["text"]))
    eng = aios_rt.Engine(args.model, threads=args.threads)
    print(f"machine: {machine()}; {len(vocab):,} distinct training words; {args.seeds} seeds, "
          f"{args.length} tokens x {args.steps} steps, prompt {args.prompt!r}")
    print(f"{'setting':<22} {'known words':>11} {'distinct-2':>10} {'words':>6}")
    out = {}
    for name, kw in SETTINGS.items():
        texts = []
        for seed in range(args.seeds):
            g = eng.diffuse(args.prompt, length=args.length, steps=args.steps, seed=seed, **kw)
            texts.append(words(g.text[len(args.prompt):]))
        out[name] = scores(texts, vocab)
        print(f"{name:<22} {out[name]['known_words']:11.3f} {out[name]['distinct_2']:10.3f} {out[name]['words']:6d}")
    # Ceiling: held-out documents cut to the mean generated length in words (distinct-2 depends on size).
    per = max(1, round(sum(v["words"] for v in out.values()) / len(out) / args.seeds))
    with open(args.valid) as f:
        docs = (words(json.loads(line)["text"]) for line in f)
        held = [d[:per] for d in docs if len(d) >= per][: args.seeds]  # as many texts as generations
    out["held-out text"] = scores(held, vocab)
    h = out["held-out text"]
    print(f"{'held-out text':<22} {h['known_words']:11.3f} {h['distinct_2']:10.3f} {h['words']:6d}")
    emit("text_quality", out)


if __name__ == "__main__":
    main()
