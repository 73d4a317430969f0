"""Generation quality per step count, judged by the autoregressive baseline: the yardstick for few-step (distilled)
text models.

For each model and step count: `--samples` unconditional generations (BOS + `--length` - 1 tokens, ancestral
sampler at temperature 1, seeds 0..n-1, the Rust runtime), then
- generative perplexity: exp(mean next-token NLL) of the generated tokens under models/aios-text-ar-tiny (same
  tokenizer, data and size; its logits from the Rust runtime), up to the first [EOS];
- unigram entropy of the generated tokens, pooled (nats): collapse to a few tokens shows as a drop;
- known words and distinct-2 (as in bench/text_quality.py).
Reference: held-out corpus text cut the same way.

    python bench/gen_ppl.py --samples 32 --steps 4,8,16,64
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import aios_rt  # noqa: E402
from common import emit, machine  # noqa: E402
from text_quality import scores, words  # noqa: E402

BOS, EOS = 1, 2


def cut(tokens: list[int]) -> list[int]:
    """BOS + tokens up to (not including) the first EOS after it."""
    out = [BOS]
    for t in tokens[1:]:
        if t == EOS:
            break
        out.append(t)
    return out


def ar_nll(judge, seqs: list[list[int]]) -> tuple[float, int]:
    """Summed next-token NLL (nats) and token count of `seqs` under the causal judge."""
    total, n = 0.0, 0
    for s in seqs:
        if len(s) < 2:
            continue
        logits = judge.logits([s])[0].astype(np.float64)  # [L, V]: row i predicts token i + 1
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        total -= float(sum(logp[i, s[i + 1]] for i in range(len(s) - 1)))
        n += len(s) - 1
    return total, n


def unigram_entropy(seqs: list[list[int]]) -> float:
    c = Counter(t for s in seqs for t in s[1:])
    n = sum(c.values())
    return -sum(v / n * math.log(v / n) for v in c.values()) if n else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="diffusion model folder(s) (default: aios-text-tiny)")
    ap.add_argument("--judge", default=str(ROOT / "models" / "aios-text-ar-tiny"))
    ap.add_argument("--train", default=str(ROOT / "data" / "corpus" / "train.jsonl"))
    ap.add_argument("--valid", default=str(ROOT / "data" / "corpus" / "valid.jsonl"))
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--steps", default="4,8,16,64")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    for p in (a.train, a.valid):
        if not Path(p).exists():
            sys.exit(f"{p} not found: build the corpus first with `just data`")
    vocab: set[str] = set()
    with open(a.train) as f:
        for line in f:
            vocab.update(words(json.loads(line)["text"]))
    judge = aios_rt.Engine(a.judge, threads=a.threads)
    models = a.model or [str(ROOT / "models" / "aios-text-tiny")]
    steps = [int(s) for s in a.steps.split(",")]
    print(f"machine: {machine()}; judge {a.judge}; {a.samples} samples x {a.length} tokens, ancestral, T 1")
    print(f"{'model':<22} {'steps':>5} {'gen ppl':>8} {'entropy':>7} {'known':>6} {'dist-2':>6} {'ms/sample':>9}")
    out: dict = {}
    for m in models:
        eng = aios_rt.Engine(m, threads=a.threads)
        for st in steps:
            seqs, texts, t0 = [], [], time.time()
            for seed in range(a.samples):
                g = eng.diffuse_tokens([BOS] + [eng.mask_token_id] * (a.length - 1), steps=st, sampler="ancestral",
                                       seed=seed, likelihood_samples=0)
                s = cut(g.tokens)
                seqs.append(s)
                texts.append(words(eng.decode(s[1:])))
            ms = (time.time() - t0) * 1e3 / a.samples
            nll, n = ar_nll(judge, seqs)
            r = {"gen_ppl": math.exp(nll / max(n, 1)), "unigram_entropy": unigram_entropy(seqs), **scores(texts, vocab),
                 "ms_per_sample": ms, "tokens": n}
            out[f"{Path(m).name}@{st}"] = r
            print(f"{Path(m).name:<22} {st:5d} {r['gen_ppl']:8.1f} {r['unigram_entropy']:7.3f} {r['known_words']:6.3f} "
                  f"{r['distinct_2']:6.3f} {ms:9.1f}")
    # Held-out text through the same judge and cut.
    with open(a.valid) as f:
        docs = [json.loads(line)["text"] for line in f]
    held = []
    for d in docs:
        ids = judge.encode(d)[: a.length - 1]
        if len(ids) >= a.length // 2:
            held.append([BOS] + ids)
        if len(held) == a.samples:
            break
    nll, n = ar_nll(judge, held)
    out["held-out text"] = {"gen_ppl": math.exp(nll / max(n, 1)), "unigram_entropy": unigram_entropy(held),
                            **scores([words(judge.decode(s[1:])) for s in held], vocab), "tokens": n}
    r = out["held-out text"]
    print(f"{'held-out text':<22} {'':>5} {r['gen_ppl']:8.1f} {r['unigram_entropy']:7.3f} {r['known_words']:6.3f} "
          f"{r['distinct_2']:6.3f}")
    emit("gen_ppl", out)


if __name__ == "__main__":
    main()
