"""Per-dtype report for a model folder: file size, logit error against f32 (Rust
runtime, held-out windows) and validation perplexity (bound) per dtype.

    python bench/quant_report.py [--model models/aios-text-tiny] [--data data/corpus/valid.jsonl]

Perplexity of a quantised file is computed by the PyTorch reference on the
weights as the runtime dequantises them (aios_rt.read_tensors), which the
parity tests show equals the runtime's own logits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import aios_rt  # noqa: E402
from aios_train.eval_file import evaluate_file  # noqa: E402
from aios_train.tokenizer import load_tokenizer  # noqa: E402
from aios_train.windows import windows_from_jsonl  # noqa: E402
from common import emit, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-text-tiny"))
    ap.add_argument("--data", default=str(ROOT / "data" / "corpus" / "valid.jsonl"))
    ap.add_argument("--windows", type=int, default=64, help="held-out windows for the perplexity")
    ap.add_argument("--n-t", type=int, default=16, help="t samples per window for the diffusion bound")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    tok_path = model_dir / "tokenizer.json"
    f32 = aios_rt.Engine(model_dir / "model.f32.parquet", threads=args.threads)
    max_len = json.loads(f32.config_json)["max_length"]
    windows = windows_from_jsonl(args.data, load_tokenizer(tok_path), max_len)[:8]
    ref = f32.logits([list(map(int, w)) for w in windows])
    print(f"machine: {machine()}")
    print(f"{'dtype':>5} {'file MB':>8} {'max |dlogit|':>13} {'mean |dlogit|':>14} {'ppl (bound)':>12}")
    out = {}
    for dtype in ["f32", "int8", "int4", "int2"]:
        path = model_dir / f"model.{dtype}.parquet"
        if not path.exists():
            continue
        eng = aios_rt.Engine(path, threads=args.threads)
        got = eng.logits([list(map(int, w)) for w in windows])
        d = np.abs(got - ref)
        ev = evaluate_file(path, args.data, tok_path, n_t=args.n_t, max_windows=args.windows, progress=False)
        mb = os.path.getsize(path) / 1e6
        print(f"{dtype:>5} {mb:8.2f} {d.max():13.4f} {d.mean():14.5f} {ev['ppl']:12.2f}")
        out[dtype] = {"file_mb": mb, "max_abs_logit_err": float(d.max()), "mean_abs_logit_err": float(d.mean()),
                      "ppl": ev["ppl"]}
    emit("quant", out)


if __name__ == "__main__":
    main()
