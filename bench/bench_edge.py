"""The "edge" configuration: ~100M parameters, random weights stored as INT2
(file <= 35 MB) and INT4, timed for 4 steps x 64 tokens through aios_rt with
each matmul strategy.

    python bench/bench_edge.py [--threads 2] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import aios_rt  # noqa: E402
from common import emit, machine, median_ms  # noqa: E402

# 11 blocks of d=768 plus a 4096-token vocabulary: 97M parameters. cond_dim 256
# keeps the adaLN matrices on the 256-wide k-quant blocks.
EDGE = dict(vocab_size=4096, hidden_size=768, n_layers=11, n_heads=12, cond_dim=256, max_length=128,
            mask_token_id=3, time_conditioning=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        print(f"machine: {machine()}")
        for dtype in ["int2", "int4"]:
            path = Path(d) / f"edge.{dtype}.parquet"
            aios_rt.write_random_model(path, json.dumps(EDGE), seed=0, dtype=dtype)
            size_mb = os.path.getsize(path) / 1e6
            for matmul in ["auto", "int8", "dequantize", "quantized"]:
                eng = aios_rt.Engine(path, threads=args.threads, matmul=matmul)
                params = eng.info["backbone_params"] + eng.info["head_params"]
                canvas = [1] + [EDGE["mask_token_id"]] * (args.length - 1)
                ms, runs = median_ms(lambda: eng.diffuse_tokens(canvas, steps=args.steps, temperature=0.0), args.runs)
                print(f"{dtype} ({size_mb:.1f} MB, {params / 1e6:.1f} M params), matmul={matmul:<10}: "
                      f"{args.steps} steps x {args.length} tokens in {ms:7.1f} ms (median of {args.runs})")
                out[f"{dtype}/{matmul}"] = {"ms": ms, "file_mb": size_mb, "params": params}
                del eng
    emit("edge", out)


if __name__ == "__main__":
    main()
