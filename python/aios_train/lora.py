"""LoRA adapters for the DiT: training with peft, the aios adapter container, PEFT-folder import.

The container (contract with the Rust runtime) is one aios Parquet file, `aios.kind = "lora"`, all f32:

* tensors, for each target module M: `M.lora_A` [r, in_features] and `M.lora_B` [out_features, r];
* M is one of `blocks.{i}.attn_qkv`, `blocks.{i}.attn_out`, `blocks.{i}.mlp.0`, `blocks.{i}.mlp.2`,
  `output_layer.linear` (never adaLN or sigma_map);
* `aios.config`: {"rank", "alpha", "use_rslora", "target_modules" (sorted full names), "base_fingerprint",
  "dropout", "base_config"} plus optional extra keys (validation numbers, training info);
* effective layer: y = W x + b + scale * B (A x), scale = alpha / rank (alpha / sqrt(rank) with rsLoRA).

Training uses peft's own LoRA layers on the plain `nn.Module` DiT. peft matches `target_modules` by
name suffix, so the short name `mlp.0` would also hit `sigma_map.mlp.0` (the timestep MLP): targets are
therefore always resolved here to full module names, within the allowed set, before peft sees them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .config import ModelConfig
from .data import _chunk_paragraphs
from .export import (FormatError, FINGERPRINT_KEY, load_model, model_fingerprint, model_tensors, read_container, read_metadata,
                     read_tensors, write_tensors)
from .model import DiT, expected_shapes

KIND = "lora"
DEFAULT_TARGETS = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")
BLOCK_TARGETS = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")
REQUIRED_KEYS = ("rank", "alpha", "use_rslora", "target_modules", "base_fingerprint", "dropout", "base_config")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
_MODULE_RE = re.compile(r"^(?:blocks\.(\d+)\.(?:attn_qkv|attn_out|mlp\.0|mlp\.2)|output_layer\.linear)$")
# peft state-dict keys: saved files have `<prefix><M>.lora_A.weight`, the live model `<M>.lora_A.<adapter>.weight`.
_PEFT_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<m>.+?)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


# ---------------------------------------------------------------- modules and config

def allowed_modules(config: ModelConfig | dict) -> dict[str, tuple[int, int]]:
    """Every module a LoRA may target in a model of `config`, with (out_features, in_features), sorted."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    shapes = expected_shapes(cfg)
    names = [f"blocks.{i}.{t}" for i in range(cfg.n_layers) for t in BLOCK_TARGETS] + ["output_layer.linear"]
    return {m: tuple(shapes[m + ".weight"]) for m in sorted(names)}


def resolve_targets(specs: str | Iterable[str], config: ModelConfig | dict) -> list[str]:
    """Full module names for `specs` (comma-separated string or list): each spec is a full name or a suffix
    as peft matches it (`M == spec or M.endswith("." + spec)`), but only among the allowed modules."""
    if isinstance(specs, str):
        specs = specs.split(",")
    specs = [s.strip() for s in specs if s and s.strip()]
    if not specs:
        raise ValueError("no LoRA target modules given")
    allowed = allowed_modules(config)
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    out: set[str] = set()
    for spec in specs:
        hits = [m for m in allowed if m == spec or m.endswith("." + spec)]
        if not hits:
            existing = [n for n in expected_shapes(cfg) if n.rsplit(".", 1)[0] == spec or n.rsplit(".", 1)[0].endswith("." + spec)]
            if existing:
                raise ValueError(f"LoRA target {spec!r} is not supported (only attn_qkv, attn_out, mlp.0, mlp.2 of each "
                                 f"block and output_layer.linear; never adaLN_modulation, sigma_map or embeddings)")
            raise ValueError(f"LoRA target {spec!r} matches no module of this model (n_layers={cfg.n_layers}); "
                             f"allowed: {', '.join(BLOCK_TARGETS)} (short), blocks.{{i}}.<name>, output_layer.linear")
        out.update(hits)
    return sorted(out)


def lora_scale(cfg: dict) -> float:
    r = cfg["rank"]
    return float(cfg["alpha"]) / (math.sqrt(r) if cfg["use_rslora"] else r)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(float(v))


def check_lora(tensors: dict[str, Any], cfg: Any, where: str = "lora") -> ModelConfig:
    """Validate an adapter (tensors + config) against the contract; returns the base ModelConfig."""
    if not isinstance(cfg, dict):
        raise FormatError(f"{where}: aios.config must be a JSON object, got {type(cfg).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise FormatError(f"{where}: aios.config is missing keys {missing} (required: {list(REQUIRED_KEYS)})")
    r = cfg["rank"]
    if not _is_int(r) or r < 1:
        raise FormatError(f"{where}: rank must be a positive int, got {r!r}")
    if not _is_num(cfg["alpha"]) or float(cfg["alpha"]) <= 0:
        raise FormatError(f"{where}: alpha must be a finite positive number, got {cfg['alpha']!r}")
    if not isinstance(cfg["use_rslora"], bool):
        raise FormatError(f"{where}: use_rslora must be a bool, got {cfg['use_rslora']!r}")
    if not _is_num(cfg["dropout"]) or not 0 <= float(cfg["dropout"]) < 1:
        raise FormatError(f"{where}: dropout must be a number in [0, 1), got {cfg['dropout']!r}")
    fp = cfg["base_fingerprint"]
    if not isinstance(fp, str) or not _FINGERPRINT_RE.match(fp):
        raise FormatError(f"{where}: base_fingerprint must be 16 lowercase hex chars, got {fp!r}")
    try:
        base = ModelConfig.from_dict(cfg["base_config"])
    except (ValueError, TypeError) as e:
        raise FormatError(f"{where}: bad base_config: {e}") from e
    tm = cfg["target_modules"]
    if not isinstance(tm, list) or not tm or not all(isinstance(m, str) for m in tm):
        raise FormatError(f"{where}: target_modules must be a non-empty list of module names, got {tm!r}")
    if tm != sorted(set(tm)):
        raise FormatError(f"{where}: target_modules must be sorted and unique, got {tm}")
    allowed = allowed_modules(base)
    bad = [m for m in tm if m not in allowed]
    if bad:
        why = []
        for m in bad:
            mm = _MODULE_RE.match(m)
            if mm and mm.group(1) is not None:
                why.append(f"{m} (the base model has {base.n_layers} blocks)")
            else:
                why.append(f"{m} (not a supported LoRA target)")
        raise FormatError(f"{where}: unknown target modules: {'; '.join(why)}. Allowed: blocks.{{i}}.attn_qkv, "
                          "blocks.{i}.attn_out, blocks.{i}.mlp.0, blocks.{i}.mlp.2, output_layer.linear")
    want = {f"{m}.lora_{ab}" for m in tm for ab in "AB"}
    miss = sorted(want - set(tensors))
    extra = sorted(set(tensors) - want)
    errs = []
    if miss:
        errs.append(f"missing tensors {miss}")
    if extra:
        errs.append(f"unexpected tensors {extra} (every tensor must be <M>.lora_A or <M>.lora_B of a module in target_modules)")
    if errs:
        raise FormatError(f"{where}: " + "; ".join(errs))
    for m in tm:
        out_f, in_f = allowed[m]
        a, b = tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]
        for name, t, shape in ((f"{m}.lora_A", a, (r, in_f)), (f"{m}.lora_B", b, (out_f, r))):
            sh = tuple(t.shape)
            if sh != shape:
                if len(sh) == 2 and ((name.endswith("A") and sh[1] == in_f) or (name.endswith("B") and sh[0] == out_f)):
                    raise FormatError(f"{where}: {name} has rank {sh[0] if name.endswith('A') else sh[1]}, "
                                      f"but rank is {r} (shape {sh}, expected {shape})")
                raise FormatError(f"{where}: {name} has shape {sh}, expected {shape} "
                                  f"(module {m} is [{out_f} x {in_f}] in the base model)")
            arr = t.detach().cpu().float().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
            if not np.issubdtype(arr.dtype, np.floating):
                raise FormatError(f"{where}: {name} has dtype {arr.dtype}, expected float")
            if not np.isfinite(arr).all():
                raise FormatError(f"{where}: {name} contains non-finite values (NaN or inf)")
    return base


# ---------------------------------------------------------------- container

def save_lora(path: str | Path, tensors: dict[str, Any], cfg: dict) -> None:
    """Validate and write an adapter container (f32)."""
    tensors = {k: (v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32))
               for k, v in tensors.items()}
    check_lora(tensors, cfg, str(path))
    write_tensors(path, tensors, kind=KIND, config=cfg, dtype="f32")


def read_lora(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """Read and fully validate an adapter container; returns (tensors, config dict)."""
    tensors, cfg = read_container(path, KIND, "a LoRA adapter")
    check_lora(tensors, cfg, str(path))
    return tensors, cfg


def lora_tensors_from_peft(state: dict[str, Any], adapter_name: str | None = None) -> dict[str, np.ndarray]:
    """peft state dict (saved `base_model.model.M.lora_A.weight` or live `...lora_A.default.weight`) ->
    container tensors {M.lora_A, M.lora_B}. Non-LoRA keys (the frozen base weights) are ignored; unsupported
    adapter tensors (DoRA magnitudes, LoRA biases, embedding LoRA) raise."""
    out: dict[str, np.ndarray] = {}
    seen_adapters: set[str] = set()
    for key, v in state.items():
        if "lora_" not in key:  # frozen base weights of a live peft model
            continue
        mk = _PEFT_KEY_RE.match(key)
        if not mk or "lora_magnitude_vector" in key:
            raise FormatError(f"unsupported adapter tensor {key!r} (only lora_A/lora_B weights; no DoRA magnitudes, "
                              "LoRA biases or embedding LoRA)")
        ad = mk.group("adapter")
        if ad is not None:
            if adapter_name is not None and ad != adapter_name:
                continue
            seen_adapters.add(ad)
        name = f"{mk.group('m')}.lora_{mk.group('ab')}"
        if name in out:
            raise FormatError(f"duplicate adapter tensor for {name!r} ({key!r})")
        out[name] = v.detach().cpu().float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float32)
    if len(seen_adapters) > 1:
        raise FormatError(f"state dict holds several adapters {sorted(seen_adapters)}; pick one with adapter_name")
    return out


# ---------------------------------------------------------------- peft glue

def peft_lora_config(cfg: dict):
    import peft
    return peft.LoraConfig(r=int(cfg["rank"]), lora_alpha=float(cfg["alpha"]), target_modules=list(cfg["target_modules"]),
                           lora_dropout=float(cfg["dropout"]), use_rslora=bool(cfg["use_rslora"]), bias="none")


def _wrap(model: DiT, cfg: dict):
    """peft model with cfg's targets (peft's own LoRA layers); checks peft injected exactly those."""
    import peft
    with torch.random.fork_rng(devices=[]):  # peft's A init must not disturb the caller's RNG stream
        pm = peft.get_peft_model(model, peft_lora_config(cfg))
    inner = pm.base_model.model
    got = sorted(n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
    if got != list(cfg["target_modules"]):
        raise RuntimeError(f"peft wrapped {got}, expected {cfg['target_modules']}")
    for m in got:
        s = inner.get_submodule(m).scaling["default"]
        if abs(s - lora_scale(cfg)) > 1e-9 * max(1.0, abs(s)):
            raise RuntimeError(f"peft scaling {s} for {m} != contract scale {lora_scale(cfg)}")
    return pm


def apply_lora(model: DiT, src, weight: float = 1.0, *, inplace: bool = False, check_fingerprint: bool = True):
    """peft model = `model` + the adapter `src` (a container path, or (tensors, cfg)), B scaled by `weight`.

    The base model is copied unless `inplace`. With `check_fingerprint`, the base weights must be the ones
    the adapter was trained on (config and `base_fingerprint`)."""
    if isinstance(src, (str, Path)):
        tensors, cfg = read_lora(src)
        where = str(src)
    else:
        tensors, cfg = src
        where = "lora"
        check_lora(tensors, cfg, where)
    mcfg = model.config.to_dict()
    if mcfg != cfg["base_config"]:
        diff = sorted(k for k in set(mcfg) | set(cfg["base_config"]) if mcfg.get(k) != cfg["base_config"].get(k))
        raise ValueError(f"{where}: adapter was made for another model config (differs in {diff})")
    if check_fingerprint:
        fp = model_fingerprint(model_tensors(model), mcfg)
        if fp != cfg["base_fingerprint"]:
            raise ValueError(f"{where}: adapter base_fingerprint {cfg['base_fingerprint']} != this model's {fp} "
                             "(different base weights; pass check_fingerprint=False to apply anyway)")
    if not inplace:
        model = copy.deepcopy(model)
    pm = _wrap(model, cfg)
    inner = pm.base_model.model
    with torch.no_grad():
        for m in cfg["target_modules"]:
            mod = inner.get_submodule(m)
            mod.lora_A["default"].weight.copy_(torch.as_tensor(np.asarray(tensors[f"{m}.lora_A"]), dtype=torch.float32))
            mod.lora_B["default"].weight.copy_(torch.as_tensor(np.asarray(tensors[f"{m}.lora_B"]), dtype=torch.float32) * weight)
    pm.eval()
    return pm


# ---------------------------------------------------------------- base model and data

def resolve_base(base: str | Path, tokenizer: str | Path | None = None) -> tuple[Path, Path]:
    """(model file, tokenizer file) for a model folder (model.f32.parquet + tokenizer.json) or a .parquet."""
    base = Path(base)
    if base.is_dir():
        model = base / "model.f32.parquet"
        if not model.exists():
            raise FileNotFoundError(f"{base}: no model.f32.parquet in the model folder")
        tok = base / "tokenizer.json"
    elif base.exists():
        model, tok = base, base.with_name("tokenizer.json")
    else:
        raise FileNotFoundError(f"base model not found: {base}")
    if tokenizer is not None:
        tok = Path(tokenizer)
    return model, tok


def base_fingerprint(path: str | Path) -> str:
    """The base file's `aios.fingerprint`; for older f32 files without it, computed from the weights
    (the value `save_model` would store)."""
    meta = read_metadata(path)
    fp = meta.get(FINGERPRINT_KEY)
    if fp is not None:
        return fp
    import pyarrow.parquet as pq
    dtypes = set(pq.read_table(str(path), columns=["dtype"]).column("dtype").to_pylist())
    if dtypes != {"f32"}:
        raise FormatError(f"{path}: no {FINGERPRINT_KEY} metadata and not an all-f32 file (dtypes {sorted(dtypes)}); "
                          "the fingerprint must come from the f32 source: re-export it or use the f32 file")
    tensors, meta = read_tensors(path)
    return model_fingerprint(tensors, json.loads(meta["aios.config"]))


def _split_long(par: str, chunk_chars: int) -> list[str]:
    if len(par) <= 2 * chunk_chars:
        return [par]
    out, cur, n = [], [], 0
    for line in par.split("\n"):
        cur.append(line)
        n += len(line) + 1
        if n >= chunk_chars:
            out.append("\n".join(cur))
            cur, n = [], 0
    if cur:
        out.append("\n".join(cur))
    return out


def text_chunks(text: str, chunk_chars: int = 1000) -> list[str]:
    """A .txt file as documents: paragraphs (blank-line separated) grouped to >= chunk_chars; over-long
    paragraphs are cut at line ends."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paras = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
    pieces = [s for p in paras if p.strip() for s in _split_long(p, chunk_chars)]
    return _chunk_paragraphs(pieces, chunk_chars, sep="\n\n")


def read_documents(path: str | Path, source: str | None = None) -> list[str]:
    """Documents of a .txt file (chunked), a .jsonl file ({"text": ...} per line; `source` filters on the
    "source" field) or a folder of them (sorted, recursive)."""
    from .data import read_jsonl
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data not found: {path}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path}: no .txt or .jsonl files")
    docs: list[str] = []
    for f in files:
        if f.suffix == ".jsonl":
            docs.extend(d["text"] for d in read_jsonl(f) if source is None or d.get("source") == source)
        elif f.suffix == ".txt":
            docs.extend(text_chunks(f.read_text(encoding="utf-8")))
        else:
            raise ValueError(f"{f}: expected a .txt or .jsonl file")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path}: no documents" + (f" with source {source!r}" if source else ""))
    return docs


def split_documents(docs: list[str], tok, length: int, valid_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic document-level split: documents in sha256(text) order go to valid until it holds
    `valid_fraction` of the tokens and at least one full window; the rest (in original order) train."""
    if valid_fraction <= 0:
        return docs, []
    ntok = [len(e.ids) + 1 for e in tok.encode_batch(docs, add_special_tokens=False)]
    total, body = sum(ntok), length - 2
    need = max(valid_fraction * total, body)
    order = sorted(range(len(docs)), key=lambda i: (hashlib.sha256(b"aios-lora-split\0" + docs[i].encode()).digest(), i))
    valid, got = set(), 0
    for i in order:
        if got >= need:
            break
        valid.add(i)
        got += ntok[i]
    if total - got < body or len(valid) == len(docs):
        raise ValueError(f"data too small: {total} tokens cannot give one training and one validation window of "
                         f"{length} (use more text, a smaller --valid-fraction, or --valid-data)")
    return [d for i, d in enumerate(docs) if i not in valid], [docs[i] for i in sorted(valid)]


# ---------------------------------------------------------------- training

@dataclass
class LoraTrainArgs:
    base: str                     # model folder (model.f32.parquet + tokenizer.json) or .parquet
    data: str                     # .txt / .jsonl file or folder of them
    out: str                      # adapter container to write
    rank: int = 8
    alpha: float = 16.0
    target_modules: Any = DEFAULT_TARGETS
    use_rslora: bool = False
    dropout: float = 0.0
    steps: int = 300
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    valid_fraction: float = 0.05
    valid_data: str | None = None   # explicit validation documents (then --data is not split)
    source: str | None = None       # keep only .jsonl records with this "source"
    tokenizer: str | None = None    # default: tokenizer.json of the base
    eval_windows: int = 256         # validation windows used (0 = all)
    eval_n_t: int = 16
    eval_seed: int = 0
    save_peft: str | None = None
    time_limit_min: float | None = None
    device: str = "cpu"             # cpu or cuda; under torchrun one process per device (aios_train.distributed)
    progress: bool = True


def _log(msg: str, progress: bool) -> None:
    from tqdm import tqdm
    if progress:
        tqdm.write(msg, file=sys.stderr)


def train_lora(a: LoraTrainArgs) -> dict:
    """Train a LoRA adapter on a frozen base with MDLM's loss; writes the container `a.out`. Under torchrun,
    data-parallel (`aios_train.distributed`): every rank draws the same global batch and noise, works on its shard,
    and rank 0 alone evaluates, logs and writes.

    Returns {"tensors", "config", "peft_model", "losses", "elapsed_s", "steps", ...}."""
    from . import distributed
    dist = distributed.setup(a.device)
    try:
        return _train_lora(a, dist)
    finally:
        dist.close()


def _train_lora(a: LoraTrainArgs, dist) -> dict:
    from tqdm import tqdm
    from .evaluate import diffusion_nelbo
    from .schedule import diffusion_loss
    from .tokenizer import load_tokenizer
    from .train import batch_indices, lr_at
    from .windows import make_windows

    if a.rank < 1 or a.steps < 0 or a.batch_size < 1 or not 0 <= a.dropout < 1 or not 0 <= a.valid_fraction < 1:
        raise ValueError("lora: need rank >= 1, steps >= 0, batch_size >= 1, 0 <= dropout < 1, 0 <= valid_fraction < 1")
    if a.batch_size % dist.world:
        raise ValueError(f"lora: batch size {a.batch_size} does not split over {dist.world} processes")
    progress = a.progress and dist.main
    torch.set_num_threads(a.threads)
    model_path, tok_path = resolve_base(a.base, a.tokenizer)
    model, mcfg = load_model(model_path)
    if mcfg.causal:
        raise ValueError(f"{model_path}: a causal (AR baseline) model; LoRA training here uses the diffusion loss")
    fp = base_fingerprint(model_path)
    tok = load_tokenizer(tok_path)
    if tok.get_vocab_size() != mcfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has vocab {tok.get_vocab_size()}, model {mcfg.vocab_size}")
    L = mcfg.max_length
    docs = read_documents(a.data, a.source)
    if a.valid_data:
        train_docs, valid_docs = docs, read_documents(a.valid_data, a.source)
    else:
        train_docs, valid_docs = split_documents(docs, tok, L, a.valid_fraction)
    tw = make_windows(train_docs, tok, L)
    vw = make_windows(valid_docs, tok, L) if valid_docs else None
    if vw is not None and a.eval_windows:
        vw = vw[: a.eval_windows]
    _log(f"base {model_path} (fingerprint {fp}); train: {len(train_docs)} docs, {tw.shape[0]} windows; "
         f"valid: {len(valid_docs)} docs, {0 if vw is None else vw.shape[0]} windows", progress)

    targets = resolve_targets(a.target_modules, mcfg)
    cfg: dict[str, Any] = {"rank": int(a.rank), "alpha": float(a.alpha), "use_rslora": bool(a.use_rslora),
                           "target_modules": targets, "base_fingerprint": fp, "dropout": float(a.dropout),
                           "base_config": mcfg.to_dict()}
    torch.manual_seed(a.seed)  # LoRA A init and dropout masks
    pm = _wrap(model, cfg)
    pm.to(dist.device)
    runner = dist.wrap(pm)  # forward/backward; gradients averaged over ranks
    params = [p for p in pm.parameters() if p.requires_grad]
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    if not params or not all(".lora_A." in n or ".lora_B." in n for n in names):
        raise RuntimeError(f"unexpected trainable parameters: {names[:5]}")
    mask_id = mcfg.mask_token_id

    def val() -> float | None:
        if vw is None or not dist.main:
            return None
        was = pm.training
        pm.eval()
        r = diffusion_nelbo(pm, vw, mask_id, n_t=a.eval_n_t, seed=a.eval_seed, batch_size=32, progress=progress)
        pm.train(was)
        return r["nats_per_token"]

    before = val()
    if before is not None:
        _log(f"validation before: {before:.4f} nats/token (ppl bound {math.exp(before):.1f})", progress)

    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=a.weight_decay)
    gen = torch.Generator().manual_seed(a.seed)
    data = torch.from_numpy(np.ascontiguousarray(tw, dtype=np.int64))
    pm.train()
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(total=a.steps, desc="lora", unit="step", disable=not progress, dynamic_ncols=True)
    stopped_early = False
    shard = dist.shard(a.batch_size) if dist.world > 1 else None
    for step in range(a.steps):
        x0 = data[batch_indices(step, data.shape[0], a.batch_size, a.seed)]
        lr = lr_at(step, a)
        for g in opt.param_groups:
            g["lr"] = lr
        nll, _ = diffusion_loss(runner, x0, mask_id, gen, shard=shard, device=dist.device)
        loss = nll.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        losses.append(dist.mean(loss.item()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{lr:.1e}")
        if (step + 1) % 100 == 0:
            _log(f"step {step + 1}: mean train loss (last 100) {np.mean(losses[-100:]):.4f}", progress)
        out_of_time = a.time_limit_min is not None and time.time() - t0 > 60 * a.time_limit_min
        if a.time_limit_min is not None and dist.any(out_of_time) and step + 1 < a.steps:
            _log(f"time limit {a.time_limit_min} min reached at step {step + 1}; stopping", progress)
            stopped_early = True
            break
    bar.close()
    train_s = time.time() - t0
    pm.eval()
    after = val()
    if after is not None:
        _log(f"validation after:  {after:.4f} nats/token (ppl bound {math.exp(after):.1f})", progress)

    tensors = lora_tensors_from_peft(pm.state_dict(), "default")
    cfg.update({
        "val_nats_before": before, "val_nats_after": after,
        "val": {"windows": 0 if vw is None else int(vw.shape[0]), "n_t": a.eval_n_t, "seed": a.eval_seed,
                "docs": len(valid_docs), "data": a.valid_data or f"{a.valid_fraction} of data"},
        "train": {"data": str(a.data), "source": a.source, "docs": len(train_docs), "windows": int(tw.shape[0]),
                  "steps": len(losses), "batch_size": a.batch_size, "lr": a.lr, "warmup": a.warmup,
                  "min_lr_ratio": a.min_lr_ratio, "weight_decay": a.weight_decay, "grad_clip": a.grad_clip,
                  "seed": a.seed, "threads": a.threads, "tokens": len(losses) * a.batch_size * L,
                  "train_s": round(train_s, 1), "loss_first": float(np.mean(losses[:20])) if losses else None,
                  "loss_last": float(np.mean(losses[-20:])) if losses else None, "stopped_early": stopped_early},
    })
    if dist.main:
        save_lora(a.out, tensors, cfg)
        if a.save_peft:
            pm.save_pretrained(a.save_peft)
    dist.barrier()
    _log(f"wrote {a.out} ({sum(v.size for v in tensors.values()):,} LoRA parameters, {len(targets)} modules)", progress)
    return {"tensors": tensors, "config": cfg, "peft_model": pm, "losses": losses, "elapsed_s": time.time() - t0,
            "train_s": train_s, "steps": len(losses), "stopped_early": stopped_early,
            "val_nats_before": before, "val_nats_after": after}


# ---------------------------------------------------------------- PEFT folder import

# adapter_config.json fields that change the math in ways the runtime does not implement.
_UNSUPPORTED = {
    "use_dora": "DoRA (use_dora: true)",
    "fan_in_fan_out": "fan_in_fan_out: true (transposed Conv1D weights)",
    "lora_bias": "LoRA biases (lora_bias: true)",
    "use_qalora": "QALoRA",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "layer_replication": "layer_replication",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "megatron_config": "megatron_config",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
}
# init_lora_weights values that only initialise A and B; the others (pissa*, olora, corda, loftq, lora_ga, ...)
# also rewrite the base weights, so the saved A/B are only valid on that modified base.
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}


def _peft_matches(target_modules, module: str) -> bool:
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            return True
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def import_peft(folder: str | Path, base: str | Path, out: str | Path | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) for the DiT `base` -> container.
    Validates against the base model; writes `out` if given; returns (tensors, cfg)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    cfg_path, st_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    if not st_path.exists():
        extra = " (adapter_model.bin is a pickle and is not read; re-save with safe_serialization=True)" \
            if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors{extra}")
    try:
        ac = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{cfg_path}: invalid JSON: {e}") from e
    where = str(folder)
    if not isinstance(ac, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object")
    if ac.get("peft_type", "LORA") != "LORA":
        raise FormatError(f"{where}: peft_type {ac.get('peft_type')!r} is not supported (only LORA)")
    if ac.get("bias", "none") != "none":
        raise FormatError(f"{where}: bias={ac.get('bias')!r} is not supported (only bias='none': base biases stay frozen)")
    for k, what in _UNSUPPORTED.items():
        v = ac.get(k)
        if v not in (None, False, [], {}, ""):
            raise FormatError(f"{where}: {what} is not supported by the aios LoRA container")
    init = ac.get("init_lora_weights", True)
    if isinstance(init, str):
        init = init.lower()
    if not isinstance(init, (bool, str)) or init not in _PLAIN_INITS:
        raise FormatError(f"{where}: init_lora_weights={ac.get('init_lora_weights')!r} changes the base weights as well "
                          "(the adapter is only valid on that modified base); convert it to a plain LoRA first "
                          "(peft save_pretrained(..., path_initial_model_for_weight_conversion=...))")
    r, alpha = ac.get("r"), ac.get("lora_alpha")
    if not _is_int(r) or r < 1:
        raise FormatError(f"{where}: r must be a positive int, got {r!r}")
    if not _is_num(alpha) or alpha <= 0:
        raise FormatError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    for k, ref in (("rank_pattern", r), ("alpha_pattern", alpha)):
        pat = ac.get(k) or {}
        if any(v != ref for v in pat.values()):
            raise FormatError(f"{where}: {k} {pat} gives modules different ranks/alphas; the container has one rank and alpha")
    use_rslora = ac.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        raise FormatError(f"{where}: use_rslora must be a bool, got {use_rslora!r}")
    dropout = ac.get("lora_dropout", 0.0) or 0.0

    model_path, _ = resolve_base(base)
    meta = read_metadata(model_path)
    if meta.get("aios.kind") != "model" or "aios.config" not in meta:
        raise FormatError(f"{model_path}: not an aios model file (aios.kind {meta.get('aios.kind')!r})")
    mcfg = ModelConfig.from_json(meta["aios.config"])
    fp = base_fingerprint(model_path)

    try:
        raw = load_file(str(st_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{st_path}: not a readable safetensors file: {e}") from e
    bad_keys = [k for k in raw if not _PEFT_KEY_RE.match(k) or "lora_magnitude_vector" in k]
    if bad_keys:
        hint = " (DoRA magnitude vectors)" if any("lora_magnitude_vector" in k for k in bad_keys) else ""
        raise FormatError(f"{where}: unsupported tensors {sorted(bad_keys)[:6]}{hint}; only "
                          "base_model.model.<module>.lora_A.weight / .lora_B.weight")
    tensors = lora_tensors_from_peft(raw)
    tensors = {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if not modules:
        raise FormatError(f"{where}: adapter_model.safetensors holds no LoRA tensors")
    for m in modules:
        for ab in "AB":
            if f"{m}.lora_{ab}" not in tensors:
                other = "B" if ab == "A" else "A"
                raise FormatError(f"{where}: {m} has lora_{other} but no lora_{ab}")
    cfg = {"rank": int(r), "alpha": float(alpha), "use_rslora": use_rslora, "target_modules": modules,
           "base_fingerprint": fp, "dropout": float(dropout), "base_config": mcfg.to_dict(),
           "source": {"peft_folder": str(folder), "peft_version": ac.get("peft_version")}}
    check_lora(tensors, cfg, where)
    unmatched = [m for m in modules if not _peft_matches(ac.get("target_modules"), m)]
    if unmatched:
        raise FormatError(f"{where}: tensors for {unmatched} but adapter_config target_modules is {ac.get('target_modules')!r}")
    if out is not None:
        save_lora(out, tensors, cfg)
    return tensors, cfg
