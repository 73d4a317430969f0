"""Rust runtime vs PyTorch eager on the same model file, prompt, length and steps.

Both sides run the same algorithm (greedy confidence sampler, batch 1, the
same canvas) on the same Parquet weights; the script checks that they produce
the same tokens, then reports median latencies and the ratio.

    python bench/bench_text.py [--model models/aios-text-tiny] [--length 64] [--steps 16] [--threads 2]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import aios_rt  # noqa: E402
from aios_train.export import load_model  # noqa: E402
from aios_train.samplers import confidence_sample  # noqa: E402
from common import emit, machine, median_ms, text_generation_args  # noqa: E402


def main() -> None:
    ap = text_generation_args(__doc__)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    f32 = model_dir / "model.f32.parquet"

    eng = aios_rt.Engine(f32, threads=args.threads)
    canvas = [1] + eng.encode(args.prompt)
    canvas += [eng.mask_token_id] * (args.length - len(canvas))
    model, cfg = load_model(f32)

    ref_tokens, _, _ = confidence_sample(model, canvas, args.steps, cfg.mask_token_id)
    got = eng.diffuse_tokens(canvas, steps=args.steps, sampler="confidence", temperature=0.0)
    same = got.tokens == ref_tokens

    torch_ms, torch_all = median_ms(lambda: confidence_sample(model, canvas, args.steps, cfg.mask_token_id), args.runs)
    rust = {}
    for dtype in ["f32", "int8", "int4", "int2"]:
        path = model_dir / f"model.{dtype}.parquet"
        if not path.exists():
            continue
        e = aios_rt.Engine(path, threads=args.threads)
        ms, _ = median_ms(lambda: e.diffuse_tokens(canvas, steps=args.steps, sampler="confidence", temperature=0.0), args.runs)
        rust[dtype] = ms
    print(f"machine: {machine()}, AIOS_CPU={os.environ.get('AIOS_CPU', 'native')}")
    print(f"model {model_dir.name}, length {args.length}, steps {args.steps}, batch 1, threads {args.threads}, "
          f"median of {args.runs}")
    print(f"PyTorch eager (f32):      {torch_ms:8.1f} ms   (runs: {', '.join(f'{t:.0f}' for t in torch_all)})")
    for dtype, ms in rust.items():
        print(f"aios_rt ({dtype:>4}):          {ms:8.1f} ms   {torch_ms / ms:5.2f}x faster than PyTorch eager")
    print(f"same tokens as PyTorch (f32, greedy): {same}")
    emit("text", {"torch_ms": torch_ms, "rust_ms": rust, "length": args.length, "steps": args.steps,
                  "threads": args.threads, "same_tokens": same})


if __name__ == "__main__":
    main()
