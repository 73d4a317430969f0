"""Embedding latency of one query by its length (the embed half of "conditioning latency").

    .venv/bin/python bench/conditioning_by_length.py [--threads 2] [--runs 41]

Prints the token count and median latency of `Embedder.embed([query])` for questions from 7 to 35 tokens.
"""
import argparse
import os
import statistics
import time

import aios_rt

QUERIES = [
    "when did we visit Japan?",
    "What did the doctor say about my knee after the appointment last spring?",
    "The 14th Dalai Lama is the current Dalai Lama, the highest spiritual leader and head of Tibetan Buddhism.",
    "Remind me what we decided about the budget for the kitchen renovation, the contractor's quote, "
    "and when the work is supposed to start next year.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=41)
    args = ap.parse_args()
    emb = aios_rt.Embedder(threads=args.threads)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(aios_rt.default_embedder_path(), "tokenizer.json"))
    tok.no_padding()
    print(f"threads {args.threads}, median of {args.runs}")
    print("| tokens | query | embed one query |\n|---:|---|---:|")
    for q in QUERIES:
        for _ in range(5):
            emb.embed([q])
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            emb.embed([q])
            ts.append((time.perf_counter() - t) * 1e3)
        n = len(tok.encode(q).ids)
        print(f"| {n} | {q[:40]}... | {statistics.median(ts):.2f} ms |")


if __name__ == "__main__":
    main()
