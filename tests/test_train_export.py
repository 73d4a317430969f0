import json
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import _train_path  # noqa: F401
from aios_train.config import ModelConfig
from aios_train.export import (SCHEMA, FormatError, checksums_json, load_model, model_tensors, read_metadata, read_tensors, save_model,
                               write_tensors)
from aios_train.model import DiT, randomize_

CFG = ModelConfig(vocab_size=40, hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_length=12, mask_token_id=3)


def _raw_table(path, rows, meta=None):
    meta = meta or {"aios.format_version": "1", "aios.kind": "model"}  # version 1: no checksums needed
    names, dtypes, shapes, datas = zip(*rows)
    t = pa.Table.from_arrays([pa.array(list(names)), pa.array(list(dtypes)), pa.array(list(shapes), SCHEMA.field("shape").type),
                              pa.array(list(datas), pa.large_binary())],
                             schema=SCHEMA.with_metadata({k.encode(): v.encode() for k, v in meta.items()}))
    pq.write_table(t, path, compression="none", use_dictionary=False, write_statistics=False, write_batch_size=1)


def test_write_read_round_trip_exact(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"b": rng.standard_normal((3, 5)).astype(np.float32), "a": rng.standard_normal(7).astype(np.float32),
               "s": np.array(2.5, dtype=np.float32), "e": np.zeros((0, 4), np.float32)}
    p = tmp_path / "t.parquet"
    write_tensors(p, tensors, kind="lora", config={"x": 1}, extra_metadata={"aios.base": "abc"})
    got, meta = read_tensors(p)
    assert list(got) == sorted(tensors)  # deterministic order
    for k in tensors:
        assert got[k].dtype == np.float32 and got[k].shape == tensors[k].shape
        assert np.array_equal(got[k], tensors[k])
    checksums = json.loads(meta.pop("aios.checksums"))
    assert meta == {"aios.format_version": "2", "aios.kind": "lora", "aios.config": '{"x": 1}', "aios.base": "abc"}
    # Per-tensor dtype, shape and CRC32, what both readers verify at load.
    assert checksums == {k: {"dtype": "f32", "shape": list(v.shape),
                             "crc32": f"{zlib.crc32(np.ascontiguousarray(v, '<f4').tobytes()):08x}"}
                         for k, v in tensors.items()}
    # The physical layout the Rust reader relies on.
    f = pq.ParquetFile(p)
    assert f.schema_arrow.field("data").type == pa.large_binary()
    assert all(not f.schema_arrow.field(n).nullable for n in ("name", "dtype", "shape", "data"))
    assert f.metadata.row_group(0).column(3).compression == "UNCOMPRESSED"
    raw = pq.read_table(p).column("data").to_pylist()[sorted(tensors).index("b")]
    assert raw == tensors["b"].astype("<f4").tobytes()


def test_half_dtypes(tmp_path):
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    for dt, tol in (("f16", 1e-3), ("bf16", 1e-2)):
        write_tensors(tmp_path / f"{dt}.parquet", {"w": x, "norm": x[0]}, kind="model", config=None, dtype=dt)
        got, _ = read_tensors(tmp_path / f"{dt}.parquet")
        np.testing.assert_allclose(got["w"], x, rtol=tol, atol=tol)
        assert np.array_equal(got["norm"], x[0])  # 1-D tensors stay f32
        assert pq.read_table(tmp_path / f"{dt}.parquet").column("dtype").to_pylist() == ["f32", dt]


def test_save_load_model_identical_logits(tmp_path):
    m = randomize_(DiT(CFG), seed=5)
    p = tmp_path / "m.parquet"
    save_model(m, CFG, p)
    m2, c2 = load_model(p)
    assert c2 == CFG
    x = torch.randint(0, 40, (2, 12))
    assert torch.equal(m(x), m2(x))
    assert ModelConfig.from_json(read_metadata(p)["aios.config"]) == CFG


def test_truncated_file(tmp_path):
    p = tmp_path / "m.parquet"
    save_model(randomize_(DiT(CFG)), CFG, p)
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])
    with pytest.raises(FormatError, match="not a readable Parquet"):
        read_tensors(p)
    with pytest.raises(FileNotFoundError):
        read_tensors(tmp_path / "nope.parquet")


def test_unknown_dtype_shape_mismatch_duplicates(tmp_path):
    good = ("w", "f32", [2, 2], np.ones(4, "<f4").tobytes())
    _raw_table(tmp_path / "u.parquet", [good, ("x", "f64", [1], b"\0" * 8)])
    with pytest.raises(FormatError, match="unknown dtype 'f64'"):
        read_tensors(tmp_path / "u.parquet")
    _raw_table(tmp_path / "s.parquet", [("w", "f32", [2, 3], np.ones(4, "<f4").tobytes())])
    with pytest.raises(FormatError, match="needs 24 bytes, has 16"):
        read_tensors(tmp_path / "s.parquet")
    _raw_table(tmp_path / "d.parquet", [good, good])
    with pytest.raises(FormatError, match=r"duplicate tensor names \['w'\]"):
        read_tensors(tmp_path / "d.parquet")
    _raw_table(tmp_path / "v.parquet", [good], meta={"aios.format_version": "9", "aios.kind": "model"})
    with pytest.raises(FormatError, match="format_version"):
        read_tensors(tmp_path / "v.parquet")


def test_missing_and_misshapen_tensors(tmp_path):
    t = model_tensors(randomize_(DiT(CFG)))
    del t["blocks.1.attn_out.weight"]
    t["output_layer.linear.bias"] = np.zeros(41, np.float32)
    write_tensors(tmp_path / "m.parquet", t, kind="model", config=CFG.to_dict())
    with pytest.raises(FormatError, match=r"missing tensors \['blocks.1.attn_out.weight'\].*output_layer.linear.bias: \(41,\) != \(40,\)"):
        load_model(tmp_path / "m.parquet")
    write_tensors(tmp_path / "k.parquet", model_tensors(DiT(CFG)), kind="lora", config=CFG.to_dict())
    with pytest.raises(FormatError, match="aios.kind"):
        load_model(tmp_path / "k.parquet")


def test_quantized_needs_aios_rt(tmp_path):
    _raw_table(tmp_path / "q.parquet", [("w", "q8_0", [32], b"\0" * 34)])
    try:
        import aios_rt
        native = hasattr(aios_rt, "read_tensors")
    except ImportError:
        native = False
    if native:
        pytest.skip("aios_rt is built; quantised reading is tested on the Rust side")
    with pytest.raises(FormatError, match="aios_rt"):
        read_tensors(tmp_path / "q.parquet")


def test_quantized_file_through_aios_rt(tmp_path):
    """When the native runtime is built, q8_0/q4_k files load via aios_rt.read_tensors (dequantised)."""
    aios_rt = pytest.importorskip("aios_rt")
    if not hasattr(aios_rt, "quantize_file"):
        pytest.skip("aios_rt native extension not built")
    cfg = ModelConfig(vocab_size=40, hidden_size=256, n_layers=1, n_heads=4, cond_dim=32, max_length=12, mask_token_id=3)
    m = randomize_(DiT(cfg), seed=7)
    save_model(m, cfg, tmp_path / "m.parquet")
    x = torch.randint(0, 40, (2, 12))
    for dt in ("q8_0", "q4_k"):
        aios_rt.quantize_file(str(tmp_path / "m.parquet"), str(tmp_path / f"{dt}.parquet"), dt)
        assert dt in pq.read_table(tmp_path / f"{dt}.parquet").column("dtype").to_pylist()
        mq, cq = load_model(tmp_path / f"{dt}.parquet")
        assert cq == cfg
        ref = m(x)
        err = (mq(x) - ref).abs().max() / ref.abs().max()
        assert err < (0.05 if dt == "q8_0" else 0.2), (dt, float(err))


def test_checksums_are_verified_by_both_readers(tmp_path):
    """Version 2 files must carry aios.checksums (dtype, shape, CRC32 per
    tensor); version 1 files, written before checksums existed, still load."""
    import aios_rt

    a = np.arange(6, dtype="<f4")
    good_sum = checksums_json([("a", "f32", [2, 3], a.tobytes())])
    cases = {
        "v1_no_checksums": ({"aios.format_version": "1"}, None),
        "v2_good": ({"aios.format_version": "2", "aios.checksums": good_sum}, None),
        "v2_missing": ({"aios.format_version": "2"}, "requires aios.checksums"),
        "v2_wrong_shape": ({"aios.format_version": "2",
                            "aios.checksums": checksums_json([("a", "f32", [3, 2], a.tobytes())])}, "damaged"),
        "v2_wrong_data": ({"aios.format_version": "2",
                           "aios.checksums": checksums_json([("a", "f32", [2, 3], a[::-1].tobytes())])}, "damaged"),
    }
    for case, (meta, err) in cases.items():
        p = tmp_path / f"{case}.parquet"
        _raw_table(p, [("a", "f32", [2, 3], a.tobytes())], meta=dict(meta, **{"aios.kind": "model"}))
        for reader in (read_tensors, aios_rt.read_tensors):
            if err is None:
                got = reader(p)
                got = got[0] if isinstance(got, tuple) else got
                assert np.array_equal(got["a"], a.reshape(2, 3)), (case, reader)
            else:
                with pytest.raises(FormatError, match=err):
                    reader(p)
