"""Bad files and bad arguments: each is a clear aios_rt.AiosError subclass
(FormatError for file problems, ConfigError for configs, InputError for
arguments, AiosIOError for missing paths, TokenizerError for tokenizers),
never a crash, and the engine keeps working after an error."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _tiny_tokenizer import train_tiny_tokenizer

import _train_path  # noqa: F401
import aios_rt
from aios_train.export import checksums_json

MASK = 3
CFG = dict(vocab_size=320, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=48, mask_token_id=MASK)
V, MAXLEN = CFG["vocab_size"], CFG["max_length"]
PROMPT = "The old house"
SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("shape", pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False),
    pa.field("data", pa.large_binary(), nullable=False),
])
TEXTS = ["The old house stood on the hill above the village.", "A quick brown fox jumps over the lazy dog."] * 10


# ---------------------------------------------------------------------------------------------- fixtures


def _tokenizer(path: Path):
    train_tiny_tokenizer(path, TEXTS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("aios_bad_good")
    _tokenizer(d / "tokenizer.json")
    aios_rt.write_random_model(d / "model.f32.parquet", json.dumps(CFG), 0, "f32")
    return d


@pytest.fixture(scope="module")
def good(folder):
    return folder / "model.f32.parquet"


@pytest.fixture(scope="module")
def eng(folder):
    return aios_rt.Engine(folder, threads=2)


@pytest.fixture
def bad_dir(tmp_path, folder):
    """A folder with the good tokenizer, for a crafted model.f32.parquet."""
    shutil.copy(folder / "tokenizer.json", tmp_path / "tokenizer.json")
    return tmp_path


def rows(path):
    t = pq.read_table(path)
    return ({c: t.column(c).to_pylist() for c in ("name", "dtype", "shape", "data")},
            {k.decode(): v.decode() for k, v in t.schema.metadata.items()})


def write(path, cols, meta, schema=SCHEMA, **kw):
    """Write rows with pyarrow exactly like aios_train.export.write_tensors (or as told)."""
    # Edits are deliberate: checksums follow them where the rows allow it.
    try:
        sums = checksums_json(zip(cols["name"], cols["dtype"], cols["shape"], cols["data"]))
    except (TypeError, KeyError):
        sums = None  # null or missing values: the reader must refuse those anyway
    if "aios.checksums" in meta and sums is not None:
        meta = dict(meta, **{"aios.checksums": sums})
    arrays = [pa.array(cols[f.name], f.type) for f in schema]
    table = pa.Table.from_arrays(arrays, schema=schema.with_metadata({k.encode(): v.encode() for k, v in meta.items()}))
    opts = dict(compression="none", use_dictionary=False, write_statistics=False)
    opts.update(kw)
    pq.write_table(table, path, **opts)
    return path


def edited(good, dst, cols_fn=None, meta_fn=None):
    cols, meta = rows(good)
    if cols_fn:
        cols_fn(cols)
    if meta_fn:
        meta_fn(meta)
    return write(dst, cols, meta)


def works(eng):
    g = eng.diffuse(PROMPT, length=16, steps=4, seed=0)
    assert len(g.tokens) == 16 and MASK not in g.tokens and g.text.startswith(PROMPT)


def open_fails(path, exc=aios_rt.FormatError, match=None):
    with pytest.raises(exc, match=match) as ei:
        aios_rt.Engine(path, threads=1)
    assert isinstance(ei.value, aios_rt.AiosError)
    return str(ei.value)


def test_exception_hierarchy():
    for e in (aios_rt.FormatError, aios_rt.ConfigError, aios_rt.InputError, aios_rt.TokenizerError,
              aios_rt.AiosIOError):
        assert issubclass(e, aios_rt.AiosError) and issubclass(e, Exception)
    assert issubclass(aios_rt.InputError, ValueError) and issubclass(aios_rt.AiosIOError, OSError)
    with pytest.raises(ValueError):
        aios_rt.Engine("models/aios-text-tiny", threads=-1)
    with pytest.raises(OSError):
        aios_rt.Engine("/no/such/model")


@pytest.mark.parametrize("call", [
    lambda p: aios_rt.Engine(p),
    lambda p: aios_rt.MemoryStore(p, dim=4),
    lambda p: aios_rt.Embedder(p),
    lambda p: aios_rt.quantize_file(p, "out.parquet", "int8"),
    lambda p: aios_rt.quantize_file("in.parquet", p, "int8"),
    lambda p: aios_rt.read_tensors(p),
    lambda p: aios_rt.write_random_model(p, "{}"),
], ids=["Engine", "MemoryStore", "Embedder", "quantize_in", "quantize_out", "read_tensors", "write_random"])
@pytest.mark.parametrize("path", ["\ud800", "x\ud800y", "a\x00b"])
def test_unencodable_paths_are_input_errors(call, path):
    """A lone surrogate or NUL in a path is an InputError (an Exception), never
    pyo3's PanicException (a BaseException that `except Exception` misses)."""
    try:
        call(path)
    except BaseException as e:  # noqa: B036 - the point is what kind it is
        assert isinstance(e, aios_rt.AiosError), (type(e).__mro__, e)
        assert "panick" not in str(e).lower()
    else:
        pytest.fail("accepted")


def test_engine_threads_must_be_a_count(folder):
    for bad in (-1, 1.5, "2", 2**70):
        with pytest.raises(aios_rt.InputError, match="threads"):
            aios_rt.Engine(folder, threads=bad)
    assert len({aios_rt.FormatError, aios_rt.ConfigError, aios_rt.InputError, aios_rt.TokenizerError,
                aios_rt.AiosIOError}) == 5


# ---------------------------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("cut", [0, 4, 11, 12, 100, 0.25, 0.5, 0.75, 0.99, -1, -4, -8, -9, -100])
def test_truncated_parquet(good, tmp_path, eng, cut):
    data = good.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    p = tmp_path / "model.f32.parquet"
    p.write_bytes(data[:n])
    msg = open_fails(p)
    assert str(p) in msg
    with pytest.raises(aios_rt.FormatError):
        aios_rt.read_tensors(p)
    works(eng)


def test_chunk_cut_from_the_middle(good, tmp_path):
    data = good.read_bytes()
    p = tmp_path / "m.parquet"
    p.write_bytes(data[: len(data) // 3] + data[len(data) // 2:])
    open_fails(p)


@pytest.mark.parametrize("kind", ["random", "par1", "par1_huge_footer", "zeros", "text"])
def test_garbage_bytes(tmp_path, kind):
    rng = np.random.default_rng(0)
    blob = {
        "random": rng.bytes(5000),
        "par1": b"PAR1" + rng.bytes(5000) + b"PAR1",
        "par1_huge_footer": b"PAR1" + rng.bytes(100) + (2**31 - 1).to_bytes(4, "little") + b"PAR1",
        "zeros": bytes(4096),
        "text": b"this is not a parquet file\n" * 50,
    }[kind]
    p = tmp_path / "m.parquet"
    p.write_bytes(blob)
    open_fails(p)


def test_random_byte_flips_never_crash(good, tmp_path):
    """Corrupting a few bytes anywhere gives a clean error or a model that still runs."""
    data = good.read_bytes()
    rng = np.random.default_rng(1234)
    outcomes = {"ok": 0, "error": 0}
    p = tmp_path / "m.parquet"
    for i in range(60):
        b = bytearray(data)
        region = (0, len(b)) if i % 2 else (max(0, len(b) - 3000), len(b))  # footer-heavy half the time
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(*region))] = int(rng.integers(0, 256))
        p.write_bytes(bytes(b))
        try:
            e = aios_rt.Engine(p, threads=1)
            g = e.diffuse_tokens([1, MASK, MASK, MASK], steps=2)
            assert len(g.tokens) == 4
            outcomes["ok"] += 1
        except aios_rt.AiosError:
            outcomes["error"] += 1
    assert outcomes["error"] > 0


FIXTURES = Path(__file__).resolve().parent / "fixtures"


def test_a_decoder_panic_is_a_format_error_with_no_panic_text(tmp_path):
    """tests/fixtures/parquet-decoder-panic.parquet is a LoRA file damaged so
    that the parquet crate's PlainDecoder panics (slice index out of range; found
    by `just fuzz`). It must be a FormatError, and nothing may be printed: before
    the fix, the panic hook printed "thread ... panicked at" and a backtrace."""
    bad = FIXTURES / "parquet-decoder-panic.parquet"
    script = f"""
import aios_rt
try:
    aios_rt.read_tensors({str(bad)!r})
except aios_rt.FormatError as e:
    print(e)
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "RUST_BACKTRACE": "1"})
    assert p.returncode == 0 and "decoder rejected" in p.stdout, (p.stdout, p.stderr)
    assert p.stderr == "", p.stderr[-2000:]


def test_parquet_that_is_not_ours(tmp_path, good):
    p = tmp_path / "other.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), p)
    open_fails(p, match="columns")
    # Our columns, but no aios metadata at all.
    cols, _ = rows(good)
    msg = open_fails(write(tmp_path / "nometa.parquet", cols, {}))
    assert "aios.format_version" in msg
    # Our columns in a different order, or with an extra column.
    cols, meta = rows(good)
    t = pq.read_table(good)
    pq.write_table(t.select(["dtype", "name", "shape", "data"]), tmp_path / "reordered.parquet", compression="none")
    open_fails(tmp_path / "reordered.parquet", match="columns")
    pq.write_table(t.append_column("extra", pa.array([0] * t.num_rows)), tmp_path / "extra.parquet",
                   compression="none")
    open_fails(tmp_path / "extra.parquet", match="columns")


@pytest.mark.parametrize("compression", ["snappy", "zstd", "gzip"])
def test_compressed_copy_is_a_format_error(good, tmp_path, compression):
    """The container is uncompressed by definition; a re-saved compressed copy is refused cleanly."""
    pq.write_table(pq.read_table(good), tmp_path / "c.parquet", compression=compression)
    open_fails(tmp_path / "c.parquet")


def test_dictionary_encoded_and_multi_row_group_files_still_load(good, tmp_path):
    t = pq.read_table(good)
    pq.write_table(t, tmp_path / "dict.parquet", compression="none", use_dictionary=True)
    pq.write_table(t, tmp_path / "rg.parquet", compression="none", row_group_size=3, data_page_version="2.0")
    for p in (tmp_path / "dict.parquet", tmp_path / "rg.parquet"):
        e = aios_rt.Engine(p, threads=1)
        assert np.array_equal(e.logits([[1, 5, 6]]), aios_rt.Engine(good, threads=1).logits([[1, 5, 6]]))


def _idx(cols, name):
    return cols["name"].index(name)


def _set(cols, name, **kw):
    i = _idx(cols, name)
    for k, v in kw.items():
        cols[k][i] = v


BAD_ROWS = {
    "unknown_dtype": (lambda c: _set(c, "vocab_embed.embedding", dtype="f64"), "unknown dtype"),
    "alias_dtype_in_file": (lambda c: _set(c, "blocks.0.attn_out.weight", dtype="int8"), "unknown dtype"),
    "empty_dtype": (lambda c: _set(c, "blocks.0.norm1.weight", dtype=""), "unknown dtype"),
    "short_data": (lambda c: _set(c, "vocab_embed.embedding", data=c["data"][0][:-4]), "bytes"),
    "long_data": (lambda c: _set(c, "blocks.1.mlp.0.bias", data=c["data"][_idx(c, "blocks.1.mlp.0.bias")] + b"\0" * 4),
                  "bytes"),
    "shape_vs_bytes": (lambda c: _set(c, "blocks.0.norm1.weight", shape=[65]), "bytes"),
    "negative_dim": (lambda c: _set(c, "blocks.0.norm1.weight", shape=[-64]), "dimension"),
    "overflowing_shape": (lambda c: _set(c, "vocab_embed.embedding", shape=[2**62, 2**62]), "overflow"),
    "quant_bad_block": (lambda c: _set(c, "blocks.0.attn_out.weight", dtype="q4_k"), "block"),
    "duplicate_name": (lambda c: [c[k].append(c[k][_idx(c, "blocks.0.norm2.weight")]) for k in c], "duplicate"),
    "missing_tensor": (lambda c: [c[k].pop(_idx(c, "output_layer.linear.bias")) for k in list(c)[::-1]],
                       "output_layer.linear.bias"),
    "wrong_shape_for_config": (lambda c: _set(c, "blocks.0.mlp.0.weight", shape=[64, 256]), "blocks.0.mlp.0.weight"),
    "extra_dim": (lambda c: _set(c, "vocab_embed.embedding", shape=[320, 64, 1]), "shape"),
    "no_rows": (lambda c: [c[k].clear() for k in c], "missing tensor"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows(good, bad_dir, eng, case):
    mutate, match = BAD_ROWS[case]
    p = edited(good, bad_dir / "model.f32.parquet", cols_fn=mutate)
    msg = open_fails(bad_dir, match=match)
    assert "model.f32.parquet" in msg
    works(eng)


def test_missing_tensor_list_is_not_the_first_tensor(good, tmp_path):
    def drop(c):
        i = _idx(c, "blocks.1.attn_qkv.weight")
        for k in c:
            c[k].pop(i)
    open_fails(edited(good, tmp_path / "m.parquet", cols_fn=drop), match="blocks.1.attn_qkv.weight")


def test_null_values(good, tmp_path):
    nullable = pa.schema([pa.field("name", pa.string()), pa.field("dtype", pa.string()),
                          pa.field("shape", pa.list_(pa.int64())), pa.field("data", pa.large_binary())])
    for col, value in [("data", None), ("shape", None), ("name", None), ("dtype", None), ("shape", [None, 64])]:
        cols, meta = rows(good)
        cols[col][1] = value
        open_fails(write(tmp_path / f"null_{col}.parquet", cols, meta, schema=nullable))


META_CASES = {
    "future_version": (lambda m: m.update({"aios.format_version": "99"}), aios_rt.FormatError, "version"),
    "version_zero": (lambda m: m.update({"aios.format_version": "0"}), aios_rt.FormatError, "version"),
    "version_text": (lambda m: m.update({"aios.format_version": "one"}), aios_rt.FormatError, "format_version"),
    "no_version": (lambda m: m.pop("aios.format_version"), aios_rt.FormatError, "format_version"),
    "no_kind": (lambda m: m.pop("aios.kind"), aios_rt.FormatError, "aios.kind"),
    "adapter_kind": (lambda m: m.update({"aios.kind": "adapter"}), aios_rt.FormatError, "adapter"),
    "no_config": (lambda m: m.pop("aios.config"), aios_rt.FormatError, "aios.config"),
    "config_not_json": (lambda m: m.update({"aios.config": "{not json"}), aios_rt.ConfigError, "JSON"),
    "config_unknown_key": (lambda m: m.update({"aios.config": json.dumps({**CFG, "surprise": 1})}),
                           aios_rt.ConfigError, "surprise"),
    "config_heads": (lambda m: m.update({"aios.config": json.dumps({**CFG, "n_heads": 5})}),
                     aios_rt.ConfigError, "heads"),
    "config_odd_head_dim": (lambda m: m.update({"aios.config": json.dumps({**CFG, "n_heads": 64})}),
                            aios_rt.ConfigError, "heads"),
    "config_missing_key": (lambda m: m.update({"aios.config": json.dumps({k: v for k, v in CFG.items()
                                                                          if k != "hidden_size"})}),
                           aios_rt.ConfigError, "hidden_size"),
    "config_mask_outside_vocab": (lambda m: m.update({"aios.config": json.dumps({**CFG, "mask_token_id": V})}),
                                  aios_rt.ConfigError, "mask_token_id"),
    "config_zero_layers": (lambda m: m.update({"aios.config": json.dumps({**CFG, "n_layers": 0})}),
                           aios_rt.ConfigError, "n_layers"),
    "config_absurd_vocab": (lambda m: m.update({"aios.config": json.dumps({**CFG, "vocab_size": 10**12})}),
                            aios_rt.ConfigError, "vocab_size"),
    "config_negative": (lambda m: m.update({"aios.config": json.dumps({**CFG, "max_length": -1})}),
                        aios_rt.ConfigError, None),
    "config_arch": (lambda m: m.update({"aios.config": json.dumps({**CFG, "arch": "gpt"})}), aios_rt.ConfigError,
                    "arch"),
    "config_vocab_vs_tensors": (lambda m: m.update({"aios.config": json.dumps({**CFG, "vocab_size": 300})}),
                                aios_rt.FormatError, "vocab_embed.embedding"),
}


@pytest.mark.parametrize("case", list(META_CASES))
def test_bad_metadata_and_config(good, bad_dir, eng, case):
    mutate, exc, match = META_CASES[case]
    edited(good, bad_dir / "model.f32.parquet", meta_fn=mutate)
    open_fails(bad_dir, exc=exc, match=match)
    works(eng)


def test_write_random_model_rejects_bad_configs(tmp_path):
    for cfg, exc in [({**CFG, "n_heads": 5}, aios_rt.ConfigError), ({**CFG, "x": 1}, aios_rt.ConfigError)]:
        with pytest.raises(exc):
            aios_rt.write_random_model(tmp_path / "r.parquet", json.dumps(cfg), 0, "f32")
    with pytest.raises(aios_rt.InputError):
        aios_rt.write_random_model(tmp_path / "r.parquet", json.dumps(CFG), 0, "int3")
    with pytest.raises(aios_rt.AiosIOError):
        aios_rt.write_random_model(tmp_path / "no" / "such" / "dir" / "r.parquet", json.dumps(CFG), 0, "f32")
    assert not (tmp_path / "r.parquet").exists()


def test_causal_baseline_cannot_diffuse(good, tmp_path):
    causal = json.dumps({**CFG, "causal": True})
    p = edited(good, tmp_path / "m.parquet", meta_fn=lambda m: m.update({"aios.config": causal}))
    e = aios_rt.Engine(p, threads=1)
    with pytest.raises(aios_rt.ConfigError, match="causal"):
        e.diffuse_tokens([1, MASK, MASK])
    assert e.logits([[1, 2, 3]]).shape == (1, 3, V)


def test_unexpected_tensors_are_rejected(tmp_path):
    cfg3 = {**CFG, "n_layers": 3}
    aios_rt.write_random_model(tmp_path / "l3.parquet", json.dumps(cfg3), 0, "f32")
    p = edited(tmp_path / "l3.parquet", tmp_path / "l3_as_2.parquet",
               meta_fn=lambda m: m.update({"aios.config": json.dumps(CFG)}))
    with pytest.raises(aios_rt.FormatError, match="blocks.2"):
        aios_rt.Engine(p, threads=1)


# ---------------------------------------------------------------------------------------------- NaN weights


@pytest.fixture(scope="module")
def nan_folder(good, folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("aios_nan")
    shutil.copy(folder / "tokenizer.json", d / "tokenizer.json")

    def poison(c):
        i = _idx(c, "blocks.0.attn_qkv.weight")
        a = np.frombuffer(c["data"][i], "<f4").copy()
        a[5] = np.nan
        c["data"][i] = a.tobytes()
    edited(good, d / "model.f32.parquet", cols_fn=poison)
    return d


@pytest.fixture(scope="module")
def overflow_folder(good, folder, tmp_path_factory):
    """Finite weights (so the file loads) large enough that the forward pass
    overflows: the NaN/inf reaches the logits and the samplers."""
    d = tmp_path_factory.mktemp("aios_overflow")
    shutil.copy(folder / "tokenizer.json", d / "tokenizer.json")

    def poison(c):
        i = _idx(c, "blocks.0.attn_qkv.weight")
        a = np.frombuffer(c["data"][i], "<f4").copy()
        a[:] = 3e38
        c["data"][i] = a.tobytes()
    edited(good, d / "model.f32.parquet", cols_fn=poison)
    return d


@pytest.mark.parametrize("sampler", aios_rt.SAMPLERS)
def test_non_finite_logits_give_a_clear_error_not_garbage(overflow_folder, sampler):
    e = aios_rt.Engine(overflow_folder, threads=1)  # finite weights: loading must succeed
    with pytest.raises(aios_rt.NumericError, match="non-finite"):
        e.diffuse(PROMPT, length=16, steps=4, sampler=sampler)
    with pytest.raises(aios_rt.NumericError, match="non-finite"):
        e.diffuse_tokens([1] + [MASK] * 7, steps=3, sampler=sampler, guidance=1.0)


def test_nan_weights_are_a_format_error(nan_folder):
    with pytest.raises(aios_rt.FormatError, match="blocks.0.attn_qkv.weight"):
        aios_rt.Engine(nan_folder, threads=1)
    # quantising the file refuses the NaN values as a file problem
    with pytest.raises(aios_rt.FormatError, match="not finite"):
        aios_rt.quantize_file(nan_folder / "model.f32.parquet", nan_folder / "q.parquet", "int8")


# ---------------------------------------------------------------------------------------------- paths, tokenizer


def test_missing_paths_are_io_errors(tmp_path, folder):
    for p in (tmp_path / "nope", tmp_path / "nope.parquet", ""):
        open_fails(p, exc=aios_rt.AiosIOError)
    empty = tmp_path / "empty"
    empty.mkdir()
    open_fails(empty, exc=aios_rt.AiosIOError, match="model.f32.parquet")
    with pytest.raises(aios_rt.AiosIOError):
        aios_rt.Engine(folder, dtype="int2")
    with pytest.raises(aios_rt.AiosIOError):
        aios_rt.read_tensors(tmp_path / "nope.parquet")
    with pytest.raises(aios_rt.AiosIOError):
        aios_rt.quantize_file(tmp_path / "nope.parquet", tmp_path / "q.parquet", "int8")


def test_a_json_file_given_as_the_model(folder):
    open_fails(folder / "tokenizer.json")


def test_tokenizer_problems(good, tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    shutil.copy(good, d / "model.f32.parquet")
    (d / "tokenizer.json").write_text("{not json")
    open_fails(d, exc=aios_rt.TokenizerError)
    (d / "tokenizer.json").unlink()
    e = aios_rt.Engine(d, threads=1)  # token-level use needs no tokenizer
    with pytest.raises(aios_rt.TokenizerError):
        e.diffuse(PROMPT, length=16)
    with pytest.raises(aios_rt.TokenizerError):
        e.encode("hi")
    assert len(e.diffuse_tokens([1, MASK, MASK], steps=2).tokens) == 3
    # A tokenizer with more tokens than the model's vocabulary.
    small = tmp_path / "small"
    small.mkdir()
    aios_rt.write_random_model(small / "model.f32.parquet", json.dumps({**CFG, "vocab_size": 200}), 0, "f32")
    _tokenizer(small / "tokenizer.json")
    open_fails(small, exc=aios_rt.ConfigError, match="tokenizer")


# ---------------------------------------------------------------------------------------------- bad arguments

LONG_PROMPT = " ".join(TEXTS[:4])

DIFFUSE_CASES = {
    "unknown_sampler": dict(sampler="greedy"),
    "empty_sampler": dict(sampler=""),
    "length_0": dict(length=0),
    "length_above_max": dict(length=MAXLEN + 1),
    "steps_0": dict(steps=0),
    "steps_absurd": dict(steps=10**6),
    "prompt_longer_than_length": dict(prompt=LONG_PROMPT, length=16),
    "prompt_exactly_fills": dict(prompt="", length=1),
    "suffix_fills_the_rest": dict(suffix=LONG_PROMPT, length=20),
    "nan_temperature": dict(temperature=float("nan")),
    "inf_temperature": dict(temperature=float("inf")),
    "negative_temperature": dict(temperature=-1.0),
    "nan_guidance": dict(guidance=float("nan")),
    "negative_guidance": dict(guidance=-0.5),
    "inf_guidance": dict(guidance=float("inf")),
    "threshold_0": dict(threshold=0.0),
    "threshold_above_1": dict(threshold=1.01),
    "nan_threshold": dict(threshold=float("nan")),
    "block_length_0": dict(block_length=0),
    "too_few_steps_for_blocks": dict(length=32, block_length=2, steps=3),
    "unknown_modality": dict(modality="video"),
}


@pytest.mark.parametrize("modality", ["image", "audio", ["text", "image"]])
def test_missing_head_is_a_config_error_naming_the_heads(eng, modality):
    with pytest.raises(aios_rt.ConfigError, match=r"no (image|audio) head \(it has: text\)"):
        eng.diffuse(PROMPT, modality=modality, steps=4)
    works(eng)


@pytest.mark.parametrize("case", list(DIFFUSE_CASES))
def test_diffuse_argument_errors(eng, case):
    kw = dict(prompt=PROMPT, length=24, steps=4)
    kw.update(DIFFUSE_CASES[case])
    with pytest.raises(aios_rt.InputError):
        eng.diffuse(**kw)
    works(eng)


@pytest.mark.parametrize("kw", [dict(length=-1), dict(steps=-3), dict(seed=-1), dict(block_length=-2)])
def test_negative_integers_raise_a_python_error(eng, kw):
    # PyO3 rejects negative values for unsigned parameters before aios sees them
    # (OverflowError, not an AiosError); either way nothing crashes.
    with pytest.raises((OverflowError, aios_rt.AiosError)):
        eng.diffuse(PROMPT, **{"length": 24, "steps": 4, **kw})
    works(eng)


def test_diffuse_tokens_argument_errors(eng):
    bad = [
        ([1, V, MASK], {}),  # id == vocab
        ([1, MASK, 10**6], {}),
        ([], {}),
        ([MASK] * (MAXLEN + 1), {}),
        ([1, MASK, MASK], dict(steps=0)),
        ([1, MASK, MASK], dict(sampler="nope")),
        ([1, MASK, MASK], dict(temperature=float("nan"))),
        ([1, MASK, MASK], dict(guidance=-1.0)),
        ([1, MASK, MASK], dict(block_length=0)),
        ([MASK] * 8, dict(block_length=1, steps=7)),
    ]
    for tokens, kw in bad:
        with pytest.raises(aios_rt.InputError):
            eng.diffuse_tokens(tokens, **kw)
        works(eng)
    with pytest.raises(aios_rt.InputError):
        eng.diffuse_tokens([1, -1, MASK])
    works(eng)


def test_logits_argument_errors(eng):
    for batch, kw in [
        ([[1, V]], {}),
        ([[1, 2, 3], [1, 2, 2**31]], {}),
        ([[1, 2], [1, 2, 3]], {}),  # mixed lengths
        ([], {}),
        ([[]], {}),
        ([[1] * (MAXLEN + 1)], {}),
        ([[1, 2]], dict(sigma=float("nan"))),
        ([[1, 2]], dict(sigma=float("inf"))),
    ]:
        with pytest.raises(aios_rt.InputError):
            eng.logits(batch, **kw)
        works(eng)
    assert eng.logits([[1, 2, 3], [4, 5, 6]]).shape == (2, 3, V)


def test_engine_option_errors(folder, eng):
    for kw in (dict(threads=0), dict(threads=10**6), dict(dtype="int3"), dict(dtype=""), dict(matmul="fastest")):
        with pytest.raises(aios_rt.InputError):
            aios_rt.Engine(folder, **kw)
    works(eng)


def test_quantize_and_dequantize_errors():
    with pytest.raises(aios_rt.InputError):
        aios_rt.dequantize(b"\0" * 10, [1, 256], "int4")  # needs 144 bytes
    with pytest.raises(aios_rt.InputError):
        aios_rt.dequantize(b"\0" * 35, [1, 32], "int8")  # needs 34
    with pytest.raises(aios_rt.InputError):
        aios_rt.dequantize(b"\0" * 10, [4], "f32")
    with pytest.raises(aios_rt.InputError):
        aios_rt.dequantize(b"", [], "int8")
    with pytest.raises(aios_rt.InputError):
        aios_rt.dequantize(b"\0" * 16, [4], "f64")
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 32), np.float32)
        x[1, 7] = bad
        with pytest.raises(aios_rt.InputError, match="finite"):
            aios_rt.quantize(x, "int8")
    with pytest.raises(aios_rt.InputError):
        aios_rt.quantize(np.zeros((1, 100), np.float32), "int4")  # not a multiple of 256
    with pytest.raises(aios_rt.InputError):
        aios_rt.quantize(np.zeros((1, 32), np.float32), "int3")
    # the good path still round-trips
    x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
    y = aios_rt.dequantize(aios_rt.quantize(x, "int8"), x.shape, "int8")
    assert np.abs(x - y).max() < 0.01


def test_quantize_file_errors(good, tmp_path):
    with pytest.raises(aios_rt.InputError):
        aios_rt.quantize_file(good, good, "int8")
    with pytest.raises(aios_rt.InputError):
        aios_rt.quantize_file(good, tmp_path / "q.parquet", "int3")
    garbage = tmp_path / "g.parquet"
    garbage.write_bytes(b"PAR1" + bytes(100) + b"PAR1")
    with pytest.raises(aios_rt.FormatError):
        aios_rt.quantize_file(garbage, tmp_path / "q.parquet", "int8")
    assert not (tmp_path / "q.parquet").exists()
