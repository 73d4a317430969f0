"""Helpers shared by the benchmark scripts: timing medians and results output."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path


def median_ms(fn, runs: int = 7, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` in milliseconds over `runs` runs, after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times


def machine() -> str:
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or "unknown cpu"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = "?"
    import os
    return f"{cpu}, {os.cpu_count()} cores, commit {rev}"


def emit(name: str, result: dict) -> None:
    print(f"RESULT {name} " + json.dumps(result, sort_keys=True))


def text_generation_args(doc: str) -> argparse.ArgumentParser:
    """The options shared by the text-generation benchmarks (same model, prompt, canvas and steps)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "models" / "aios-text-tiny"))
    ap.add_argument("--prompt", default="The old house")
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=7)
    return ap


def write_png_gray(path, pixels) -> None:
    """8-bit grey PNG from a 2-D uint8 array (standard library only; sample grids)."""
    import struct
    import zlib

    import numpy as np
    a = np.ascontiguousarray(pixels, dtype=np.uint8)
    h, w = a.shape
    raw = b"".join(b"\x00" + a[y].tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
