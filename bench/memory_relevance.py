"""Does a memory steer generation towards itself?

For each held-out Wikipedia lead of the corpus's validation split: the memory is its first sentence(s) (up to
`--memory-tokens` tokens), the prompt the first four words of the next sentence. The runtime generates a
continuation with the memory on the canvas (`memories=[...]`), with memory guidance on top
(`compose={"full": 1 + w, "no_memory": -w}`), and without the memory. Measured on the continuation only
(the prompt removed):
- relevance: MiniLM cosine to its own memory above the cosine to each of 9 distractor memories (the memories of
  9 other articles); the share of articles where that holds (chance: 10%);
- fact recall: the share of the memory's names and numbers (capitalised words not opening a sentence, digit
  strings) that the continuation reproduces;
- latency: embed + top-k search on a 10k-memory store is in bench_memory.py; the extra forward cost of the
  memory segment is the longer canvas (reported here as ms per generation).

    python bench/memory_relevance.py --articles 100 --threads 2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from common import emit, machine  # noqa: E402

SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def facts(text: str) -> set[str]:
    """Names and numbers: capitalised words not opening a sentence, and digit strings."""
    out = set(re.findall(r"\d[\d,.]*\d|\d", text))
    for sent in SENT.split(text):
        words = re.findall(r"[A-Za-z][\w'-]*", sent)
        out.update(w for w in words[1:] if w[0].isupper() and len(w) > 1)
    return out


def cases(path: Path, n: int, eng, memory_tokens: int) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        d = json.loads(line)
        if d.get("source") != "wikipedia":
            continue
        sents = SENT.split(d["text"].strip())
        if len(sents) < 3:
            continue
        mem, k = sents[0], 1
        while k < len(sents) - 1 and len(eng.encode(mem + " " + sents[k])) <= memory_tokens:
            mem, k = mem + " " + sents[k], k + 1
        if len(eng.encode(mem)) > memory_tokens:
            continue
        words = sents[k].split()
        if len(words) < 6 or not facts(mem):
            continue
        out.append({"memory": mem, "prompt": " ".join(words[:4])})
        if len(out) == n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-text-tiny"))
    ap.add_argument("--data", default=str(ROOT / "data" / "corpus" / "valid.jsonl"))
    ap.add_argument("--articles", type=int, default=100)
    ap.add_argument("--memory-tokens", type=int, default=56)
    ap.add_argument("--length", type=int, default=64, help="prompt + continuation tokens (memories come on top)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--guidance", default="1,3", help="memory guidance weights w to try")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    eng = aios_rt.Engine(a.model, threads=a.threads)
    emb = aios_rt.Embedder(threads=a.threads)
    cs = cases(Path(a.data), a.articles, eng, a.memory_tokens)
    if len(cs) < 10:
        raise SystemExit(f"only {len(cs)} usable articles in {a.data}")
    mem_vecs = emb.embed([c["memory"] for c in cs])
    rng = np.random.default_rng(0)
    distractors = [rng.choice([j for j in range(len(cs)) if j != i], 9, replace=False) for i in range(len(cs))]
    settings = {"no memory": {}, "memory": {"memories": None}}
    for w in [float(x) for x in a.guidance.split(",") if x]:
        settings[f"memory + guidance {w:g}"] = {"memories": None, "compose": {"full": 1 + w, "no_memory": -w}}
    res: dict = {"articles": len(cs)}
    print(f"{len(cs)} held-out articles; memory up to {a.memory_tokens} tokens, {a.length}-token prompt + "
          f"continuation, {a.steps} steps (ancestral, top-p 0.8)")
    print(f"{'setting':<24} {'relevance':>9} {'fact recall':>11} {'ms/gen':>7}")
    for name, kw in settings.items():
        conts, ms = [], []
        for i, c in enumerate(cs):
            args = dict(kw)
            if "memories" in args:
                args["memories"] = [c["memory"]]
            t0 = time.perf_counter()
            g = eng.diffuse(c["prompt"], length=a.length, steps=a.steps, sampler="ancestral", top_p=0.8, seed=i,
                            **args)
            ms.append((time.perf_counter() - t0) * 1e3)
            conts.append(g.text[len(c["prompt"]):].strip() or ".")
        gen = emb.embed(conts)
        hits, recall = 0, []
        for i in range(len(cs)):
            others = distractors[i]
            own = float(gen[i] @ mem_vecs[i])
            hits += int(all(own > float(gen[i] @ mem_vecs[j]) for j in others))
            f = facts(cs[i]["memory"])
            recall.append(len([x for x in f if x in conts[i]]) / len(f))
        res[name] = {"relevance": hits / len(cs), "fact_recall": float(np.mean(recall)),
                     "ms_per_generation": float(np.median(ms))}
        print(f"{name:<24} {hits / len(cs):>9.3f} {np.mean(recall):>11.3f} {np.median(ms):>7.1f}", flush=True)
    emit("memory_relevance", res)


if __name__ == "__main__":
    main()
