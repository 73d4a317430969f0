"""The aios Parquet container: one row per tensor (DESIGN.md section 4).

Schema: name: string, dtype: string, shape: list<int64>, data: large_binary (all non-nullable).
File metadata: aios.format_version = "2", aios.kind, aios.config (ModelConfig JSON), aios.checksums, plus extras.
Version 1 files (written before checksums) are still read, unverified.
Data is little-endian, C order. Python writes f32/f16/bf16; GGML block dtypes (q8_0, q4_k, q2_k) are
produced by the Rust side and read here through `aios_rt.read_tensors` (dequantised to f32).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
# One FormatError for the runtime and the trainer (a ValueError subclass).
from aios_rt._errors import FormatError

from .config import ModelConfig
from .model import DiT, expected_shapes

FORMAT_VERSION = "2"  # written; "2" requires aios.checksums
READABLE_VERSIONS = ("1", "2")
FLOAT_DTYPES = {"f32": 4, "f16": 2, "bf16": 2}
QUANT_DTYPES = {"q8_0", "q4_k", "q2_k"}
SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("dtype", pa.string(), nullable=False),
    pa.field("shape", pa.list_(pa.field("item", pa.int64(), nullable=False)), nullable=False),
    pa.field("data", pa.large_binary(), nullable=False),
])
MAX_TENSOR_BYTES = 2**31 - 1  # one Parquet BYTE_ARRAY value
FINGERPRINT_KEY = "aios.fingerprint"
# Every tensor's dtype, shape and CRC32 (zlib's, as crc32fast in the runtime)
# of its data bytes: JSON {name: {"dtype", "shape", "crc32": 8 hex digits}}.
# Both readers verify it.
CHECKSUMS_KEY = "aios.checksums"


def _checksum(dtype: str, shape, data: bytes) -> dict:
    return {"dtype": dtype, "shape": [int(s) for s in shape], "crc32": f"{zlib.crc32(data) & 0xFFFFFFFF:08x}"}


def checksums_json(tensors) -> str:
    """The `aios.checksums` value for (name, dtype, shape, data bytes) tuples."""
    return json.dumps({n: _checksum(dt, sh, d) for n, dt, sh, d in tensors}, sort_keys=True)


def verify_checksums(path, meta: dict, names, dtypes, shapes, datas) -> None:
    """Raises FormatError naming the first tensor whose dtype, shape or data
    does not match `aios.checksums` (required from format version 2)."""
    text = meta.get(CHECKSUMS_KEY)
    if text is None:
        if meta.get("aios.format_version") != "1":
            raise FormatError(f"{path}: format version {meta.get('aios.format_version')} requires {CHECKSUMS_KEY}, "
                              "which is missing (damaged metadata)")
        return
    try:
        sums = json.loads(text)
    except ValueError as e:
        raise FormatError(f"{path}: {CHECKSUMS_KEY} is not valid JSON: {e}") from e
    if not isinstance(sums, dict) or len(sums) != len(names):
        raise FormatError(f"{path}: {CHECKSUMS_KEY} does not list every tensor once")
    for n, dt, sh, d in zip(names, dtypes, shapes, datas):
        if sums.get(n) != _checksum(dt, sh, d):
            raise FormatError(f"{path}: tensor {n!r} is damaged: its dtype, shape or data does not match its checksum")




def _encode(arr: np.ndarray, dtype: str) -> bytes:
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "f32":
        return a.astype("<f4").tobytes()
    if dtype == "f16":
        return a.astype("<f2").tobytes()
    if dtype == "bf16":
        # Round-to-nearest-even on the top 16 bits of the f32 pattern (what torch does).
        return torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2").tobytes()
    raise FormatError(f"cannot write dtype {dtype!r} from Python (supported: {sorted(FLOAT_DTYPES)})")


def _decode(buf: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "f32":
        a = np.frombuffer(buf, dtype="<f4")
    elif dtype == "f16":
        a = np.frombuffer(buf, dtype="<f2").astype(np.float32)
    elif dtype == "bf16":
        a = (np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    else:
        raise FormatError(f"unknown dtype {dtype!r}")
    return a.astype(np.float32, copy=True).reshape(shape)


def write_tensors(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    *,
    kind: str,
    config: dict | None,
    extra_metadata: dict[str, str] | None = None,
    dtype: str = "f32",
    keep_f32: tuple[str, ...] = (),
) -> None:
    """Write `tensors` (sorted by name) as an aios Parquet file.

    `dtype` applies to every tensor except 1-D ones and names containing any of `keep_f32`
    (norms and biases stay f32, as the runtime expects).
    """
    if dtype not in FLOAT_DTYPES:
        raise FormatError(f"dtype {dtype!r} not writable from Python; choose one of {sorted(FLOAT_DTYPES)}")
    names, dtypes, shapes, datas = [], [], [], []
    for name in sorted(tensors):
        arr = tensors[name]
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().float().numpy()
        arr = np.asarray(arr)
        if not np.issubdtype(arr.dtype, np.floating):
            raise FormatError(f"tensor {name!r}: expected a floating array, got {arr.dtype}")
        dt = "f32" if arr.ndim <= 1 or any(k in name for k in keep_f32) else dtype
        buf = _encode(arr, dt)
        if len(buf) > MAX_TENSOR_BYTES:
            raise FormatError(f"tensor {name!r} is {len(buf)} bytes; the limit is 2 GiB")
        names.append(name)
        dtypes.append(dt)
        shapes.append([int(s) for s in arr.shape])
        datas.append(buf)
    meta = {"aios.format_version": FORMAT_VERSION, "aios.kind": kind,
            CHECKSUMS_KEY: checksums_json(zip(names, dtypes, shapes, datas))}
    if config is not None:
        meta["aios.config"] = json.dumps(config, sort_keys=True)
    for k, v in (extra_metadata or {}).items():
        if k in meta:
            raise FormatError(f"extra_metadata may not override {k!r}")
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    table = pa.Table.from_arrays(
        [pa.array(names, pa.string()), pa.array(dtypes, pa.string()),
         pa.array(shapes, SCHEMA.field("shape").type), pa.array(datas, pa.large_binary())],
        schema=SCHEMA.with_metadata({k.encode(): v.encode() for k, v in meta.items()}),
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="none", use_dictionary=False, write_statistics=False, write_batch_size=1)
    tmp.replace(path)  # atomic: a crash never leaves a half-written model under the final name


def read_metadata(path: str | Path) -> dict[str, str]:
    try:
        md = pq.read_schema(str(path)).metadata or {}
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{path}: not a readable Parquet file: {e}") from e
    return {k.decode(): v.decode() for k, v in md.items()}


def read_tensors(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read every tensor as f32 numpy plus the file metadata (str -> str). Validates the container."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        table = pq.read_table(str(path))
    except (pa.ArrowInvalid, OSError) as e:
        raise FormatError(f"{path}: not a readable Parquet file: {e}") from e
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("aios.format_version") not in READABLE_VERSIONS:
        raise FormatError(f"{path}: aios.format_version is {meta.get('aios.format_version')!r}, "
                          f"this build reads {', '.join(READABLE_VERSIONS)}")
    missing_cols = [c for c in ("name", "dtype", "shape", "data") if c not in table.column_names]
    if missing_cols:
        raise FormatError(f"{path}: missing columns {missing_cols}")
    names = table.column("name").to_pylist()
    dtypes = table.column("dtype").to_pylist()
    shapes = table.column("shape").to_pylist()
    datas = table.column("data").to_pylist()
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise FormatError(f"{path}: duplicate tensor names {dups}")
    if any(d in QUANT_DTYPES for d in dtypes):
        return _read_quantized(path), meta
    out = {}
    for name, dt, shape, buf in zip(names, dtypes, shapes, datas):
        if name is None or dt is None or shape is None or buf is None:
            raise FormatError(f"{path}: null value in row {name!r}")
        if dt not in FLOAT_DTYPES:
            raise FormatError(f"{path}: tensor {name!r} has unknown dtype {dt!r} (known: {sorted(FLOAT_DTYPES | dict.fromkeys(QUANT_DTYPES))})")
        if any(s < 0 for s in shape):
            raise FormatError(f"{path}: tensor {name!r} has negative shape {shape}")
        want = int(np.prod(shape, dtype=np.int64)) * FLOAT_DTYPES[dt]
        if len(buf) != want:
            raise FormatError(f"{path}: tensor {name!r} ({dt}, shape {shape}) needs {want} bytes, has {len(buf)}")
        out[name] = _decode(buf, dt, tuple(shape))
    verify_checksums(path, meta, names, dtypes, shapes, datas)
    return out, meta


def read_container(path: str | Path, kind: str, what: str) -> tuple[dict[str, np.ndarray], dict]:
    """Tensors and the parsed `aios.config` of an adapter-like container whose `aios.kind` must be `kind`
    (`what` names it in the error: "a LoRA adapter", "a tensor patch")."""
    tensors, meta = read_tensors(path)
    if meta.get("aios.kind") != kind:
        raise FormatError(f"{path}: aios.kind is {meta.get('aios.kind')!r}, expected {kind!r} (not {what})")
    if "aios.config" not in meta:
        raise FormatError(f"{path}: no aios.config metadata")
    try:
        cfg = json.loads(meta["aios.config"])
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: aios.config is not valid JSON: {e}") from e
    return tensors, cfg


def _read_quantized(path: Path) -> dict[str, np.ndarray]:
    try:
        import aios_rt  # the Rust runtime owns the GGML block formats
    except ImportError as e:
        raise FormatError(f"{path}: contains quantised tensors (q8_0/q4_k/q2_k); reading them needs the native "
                          f"module aios_rt (build it with maturin), which is not importable: {e}") from e
    if not hasattr(aios_rt, "read_tensors"):  # e.g. only the pure-Python stub folder is on sys.path
        raise FormatError(f"{path}: contains quantised tensors; aios_rt is importable but has no read_tensors "
                          "(the native extension is not built)")
    tensors = aios_rt.read_tensors(str(path))
    return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}


def model_tensors(model: DiT) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}


def model_fingerprint(tensors: dict[str, np.ndarray], config: dict) -> str:
    """Identity of a model's weights: 16 hex chars of a sha256 (adapters record their base's).

    Hashed, in order: `json.dumps(config, sort_keys=True)` (utf-8); then for every tensor name in sorted
    order: the name (utf-8), b"\\0", the shape as little-endian int64s, the values as little-endian f32
    (C order). Always over f32 values, so the f16/bf16/int8/int4/int2 files of one model carry the
    fingerprint of their f32 source.
    """
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8"))
    for name in sorted(tensors):
        arr = tensors[name]
        if isinstance(arr, torch.Tensor):
            arr = arr.detach().cpu().float().numpy()
        a = np.ascontiguousarray(arr, dtype="<f4")
        h.update(name.encode("utf-8"))
        h.update(b"\0")
        h.update(np.asarray(a.shape, dtype="<i8").tobytes())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def read_fingerprint(path: str | Path) -> str | None:
    """The `aios.fingerprint` metadata value of an aios file, or None when the file has none."""
    return read_metadata(path).get(FINGERPRINT_KEY)


def save_model(model: DiT, config: ModelConfig, path: str | Path, dtype: str = "f32",
               extra_metadata: dict[str, str] | None = None) -> None:
    tensors = model_tensors(model)
    check_model_tensors(tensors, config, str(path))
    fp = model_fingerprint(tensors, config.to_dict())  # from the f32 values, whatever `dtype` is written
    extra = dict(extra_metadata or {})
    if extra.get(FINGERPRINT_KEY, fp) != fp:
        raise FormatError(f"save_model: extra_metadata[{FINGERPRINT_KEY!r}] = {extra[FINGERPRINT_KEY]!r} does not match "
                          f"the weights being saved ({fp})")
    extra[FINGERPRINT_KEY] = fp
    write_tensors(path, tensors, kind="model", config=config.to_dict(), extra_metadata=extra, dtype=dtype)


def check_model_tensors(tensors: dict[str, Any], config: ModelConfig, where: str = "model") -> None:
    want = expected_shapes(config)
    missing = [k for k in want if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in want)
    bad = [f"{k}: {tuple(tensors[k].shape)} != {want[k]}" for k in want if k in tensors and tuple(tensors[k].shape) != want[k]]
    errs = []
    if missing:
        errs.append(f"missing tensors {missing}")
    if unexpected:
        errs.append(f"unexpected tensors {unexpected}")
    if bad:
        errs.append("wrong shapes: " + "; ".join(bad))
    if errs:
        raise FormatError(f"{where}: " + "; ".join(errs))


def load_model(path: str | Path) -> tuple[DiT, ModelConfig]:
    tensors, meta = read_tensors(path)
    if meta.get("aios.kind") != "model":
        raise FormatError(f"{path}: aios.kind is {meta.get('aios.kind')!r}, expected 'model'")
    if "aios.config" not in meta:
        raise FormatError(f"{path}: no aios.config metadata")
    try:
        config = ModelConfig.from_json(meta["aios.config"])
    except ValueError as e:
        raise FormatError(f"{path}: bad aios.config: {e}") from e
    check_model_tensors(tensors, config, str(path))
    model = DiT(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    model.eval()
    return model, config
