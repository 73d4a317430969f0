"""ControlNet for the DiT: a trainable copy of the first N blocks steers a frozen base through zero-initialised
projections (Zhang, Rao & Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models", ICCV 2023;
for transformers, PixArt-delta's ControlNet-Transformer, arXiv:2401.05252, which copies the first N blocks and
adds each copy's zero-projected output to the output of the base block of the same index).

    h_0 = x + input(control)                      x: the base's embedded canvas, input: zero-init projection
    h_i = copy_i(h_{i-1})        i = 1..N         copy_i: block i of the base, trainable
    x_i = block_i(x_{i-1}) + scale * zero_i(h_i)  zero_i: zero-init Linear(D, D)

At initialisation every zero projection is 0, so the base is unchanged; at scale 0 it is unchanged exactly.

The trainable copy is stored as a low-rank delta on the base's own block weights (as Stability AI's Control-LoRA
stores ControlNets): copy_i = block_i with W + (alpha / r) B A on attn_qkv, attn_out, mlp.0, mlp.2 (B zero at
init, so the copy starts equal to the block), norms and adaLN shared with the base. A full copy of one block of
the tiny models is 15% of their parameters; the design asks a ControlNet to stay under 10% (REQ-8).

Control inputs: `tokens` (a token sequence laid over the text canvas, e.g. a JSON schema's keys; embedded by the
base's frozen token embedding, then `input` [D, D]) or `image` (an image the size of the image head's, e.g. an edge
map in [-1, 1]; patchified like the image head, then `input` [D, patch_dim], on the image rows of the canvas).

Container (contract with `crates/aios-core/src/adapter/controlnet.rs`), `aios.kind = "controlnet"`, all f32:
  `blocks.{i}.{attn_qkv,attn_out,mlp.0,mlp.2}.lora_A` [r, in] / `.lora_B` [out, r] for i < n_blocks,
  `input.weight` / `input.bias`, `zero.{i}.weight` [D, D] / `zero.{i}.bias` [D];
  `aios.config`: {"control", "n_blocks", "rank", "alpha", "base_fingerprint", "base_config"} + training info.
"""

from __future__ import annotations

import copy
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from .config import ModelConfig
from .export import FINGERPRINT_KEY, FormatError, load_model, read_container, read_metadata, write_tensors
from .model import DiT

KIND = "controlnet"
CONTROLS = ("tokens", "image")
BLOCK_MODULES = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")
REQUIRED_KEYS = ("control", "n_blocks", "rank", "alpha", "base_fingerprint", "base_config")
_FP_RE = re.compile(r"^[0-9a-f]{16}$")


class LowRankLinear(nn.Module):
    """A frozen copy of `base` plus a trainable (alpha / r) B A (B zero: equal to `base` at init)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.register_buffer("weight", base.weight.detach().clone())
        self.register_buffer("bias", None if base.bias is None else base.bias.detach().clone())
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's LoRA init
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def _linears(block) -> dict[str, nn.Module]:
    return {"attn_qkv": block.attn_qkv, "attn_out": block.attn_out, "mlp.0": block.mlp[0], "mlp.2": block.mlp[2]}


def _set_linear(block, name: str, module: nn.Module) -> None:
    if name.startswith("mlp."):
        block.mlp[int(name[4:])] = module
    else:
        setattr(block, name, module)


class ControlNet(nn.Module):
    """The trainable part; the base is held outside the module tree (frozen, never saved)."""

    def __init__(self, base: DiT, control: str, n_blocks: int = 2, rank: int = 16, alpha: float = 16.0):
        super().__init__()
        cfg = base.config
        if control not in CONTROLS:
            raise ValueError(f"controlnet: control must be one of {CONTROLS}, got {control!r}")
        if not 1 <= n_blocks <= cfg.n_layers:
            raise ValueError(f"controlnet: n_blocks must be in 1..={cfg.n_layers}, got {n_blocks}")
        if rank < 1:
            raise ValueError(f"controlnet: rank must be >= 1, got {rank}")
        if control == "image" and not cfg.has_image:
            raise ValueError("controlnet: an image control needs a base with an image head")
        self.base = [base]
        self.control, self.n_blocks, self.rank, self.alpha = control, n_blocks, rank, float(alpha)
        d = cfg.hidden_size
        self.copies = nn.ModuleList()
        for i in range(n_blocks):
            blk = copy.deepcopy(base.blocks[i])
            blk.requires_grad_(False)
            for name, lin in _linears(blk).items():
                _set_linear(blk, name, LowRankLinear(lin, rank, alpha))
            self.copies.append(blk)
        self.input = nn.Linear(d if control == "tokens" else cfg.image_patch_dim, d)
        self.zero = nn.ModuleList(nn.Linear(d, d) for _ in range(n_blocks))
        for lin in (self.input, *self.zero):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    @property
    def config(self) -> ModelConfig:
        return self.base[0].config

    def embed(self, control: torch.Tensor, sizes: tuple[int, int, int], batch: int) -> torch.Tensor:
        """The control's input rows [B, L, D] for a canvas of segment sizes (text, image, audio)."""
        from .heads import patchify
        cfg = self.config
        lt, li, la = sizes
        base = self.base[0]
        parts = []
        if self.control == "tokens":
            if control.shape != (batch, lt):
                raise ValueError(f"controlnet: token control must be [B, {lt}] (the text canvas), "
                                 f"got {tuple(control.shape)}")
            parts.append(self.input(base.vocab_embed(control)))
            if li + la:
                parts.append(torch.zeros(batch, li + la, cfg.hidden_size, device=control.device))
        else:
            c, s = cfg.image_channels, cfg.image_size
            if control.shape != (batch, c, s, s):
                raise ValueError(f"controlnet: image control must be [B, {c}, {s}, {s}], got {tuple(control.shape)}")
            if not torch.isfinite(control).all():
                raise ValueError("controlnet: the control image contains NaN or infinity")
            if li == 0:
                raise ValueError("controlnet: an image control needs an image on the canvas")
            rows = self.input(patchify(control.float(), cfg.image_patch))
            z = lambda n: torch.zeros(batch, n, cfg.hidden_size, device=control.device)  # noqa: E731
            parts = [p for p in (z(lt) if lt else None, rows, z(la) if la else None) if p is not None]
        return torch.cat(parts, dim=1)

    def bind(self, control: torch.Tensor, scale: float = 1.0):
        """The hook `DiT.forward(..., control=)` / `forward_canvas(..., control=)` takes."""
        def hook(x, cos, sin, c, sizes):
            h = x + self.embed(control, sizes, x.shape[0])
            out = []
            for blk, z in zip(self.copies, self.zero):
                h = blk(h, cos, sin, c)
                out.append(scale * z(h))
            return out
        return hook

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def tensors(self) -> dict[str, np.ndarray]:
        out = {}
        for i, blk in enumerate(self.copies):
            for name, lin in _linears(blk).items():
                out[f"blocks.{i}.{name}.lora_A"] = lin.lora_A.detach().cpu().float().numpy()
                out[f"blocks.{i}.{name}.lora_B"] = lin.lora_B.detach().cpu().float().numpy()
        out["input.weight"] = self.input.weight.detach().cpu().float().numpy()
        out["input.bias"] = self.input.bias.detach().cpu().float().numpy()
        for i, z in enumerate(self.zero):
            out[f"zero.{i}.weight"] = z.weight.detach().cpu().float().numpy()
            out[f"zero.{i}.bias"] = z.bias.detach().cpu().float().numpy()
        return out


def base_path(p: str | Path) -> Path:
    p = Path(p)
    return p / "model.f32.parquet" if p.is_dir() else p


def save_controlnet(net: ControlNet, path: str | Path, base_fingerprint: str, info: dict | None = None) -> dict:
    tensors = net.tensors()
    for k, v in tensors.items():
        if not np.isfinite(v).all():
            raise FormatError(f"controlnet: tensor {k} has NaN or infinity; not writing {path}")
    cfg = {"control": net.control, "n_blocks": net.n_blocks, "rank": net.rank, "alpha": net.alpha,
           "base_fingerprint": base_fingerprint, "base_config": net.config.to_dict(), **(info or {})}
    write_tensors(path, tensors, kind=KIND, config=cfg)
    return cfg


def expected_tensors(cfg: ModelConfig, control: str, n_blocks: int, rank: int) -> dict[str, tuple[int, ...]]:
    d, f = cfg.hidden_size, cfg.mlp_ratio * cfg.hidden_size
    shapes = {"attn_qkv": (3 * d, d), "attn_out": (d, d), "mlp.0": (f, d), "mlp.2": (d, f)}
    out: dict[str, tuple[int, ...]] = {}
    for i in range(n_blocks):
        for m, (o, n) in shapes.items():
            out[f"blocks.{i}.{m}.lora_A"] = (rank, n)
            out[f"blocks.{i}.{m}.lora_B"] = (o, rank)
        out[f"zero.{i}.weight"] = (d, d)
        out[f"zero.{i}.bias"] = (d,)
    out["input.weight"] = (d, d if control == "tokens" else cfg.image_patch_dim)
    out["input.bias"] = (d,)
    return out


def load_controlnet(path: str | Path, base: DiT, base_fingerprint: str | None = None) -> tuple[ControlNet, dict]:
    """Reads and validates a ControlNet file against `base` (config and fingerprint)."""
    tensors, cfg = read_container(path, KIND, "a ControlNet")
    missing = [k for k in REQUIRED_KEYS if k not in cfg]
    if missing:
        raise FormatError(f"{path}: aios.config is missing {missing}")
    if cfg["control"] not in CONTROLS:
        raise FormatError(f"{path}: unknown control {cfg['control']!r} (known: {', '.join(CONTROLS)})")
    if not isinstance(cfg["base_fingerprint"], str) or not _FP_RE.match(cfg["base_fingerprint"]):
        raise FormatError(f"{path}: base_fingerprint must be 16 lowercase hex chars")
    if cfg["base_config"] != base.config.to_dict():
        raise FormatError(f"{path}: made for a base with another config")
    if base_fingerprint is not None and cfg["base_fingerprint"] != base_fingerprint:
        raise FormatError(f"{path}: made for base {cfg['base_fingerprint']}, not {base_fingerprint}")
    n, r = cfg["n_blocks"], cfg["rank"]
    if not (isinstance(n, int) and 1 <= n <= base.config.n_layers and isinstance(r, int) and r >= 1):
        raise FormatError(f"{path}: bad n_blocks {n!r} / rank {r!r}")
    want = expected_tensors(base.config, cfg["control"], n, r)
    if set(tensors) != set(want) or any(tuple(tensors[k].shape) != s for k, s in want.items()):
        raise FormatError(f"{path}: tensors do not match a {cfg['control']} ControlNet of {n} blocks, rank {r}")
    net = ControlNet(base, cfg["control"], n, r, cfg["alpha"])
    with torch.no_grad():
        for i, blk in enumerate(net.copies):
            for name, lin in _linears(blk).items():
                lin.lora_A.copy_(torch.from_numpy(tensors[f"blocks.{i}.{name}.lora_A"]))
                lin.lora_B.copy_(torch.from_numpy(tensors[f"blocks.{i}.{name}.lora_B"]))
        net.input.weight.copy_(torch.from_numpy(tensors["input.weight"]))
        net.input.bias.copy_(torch.from_numpy(tensors["input.bias"]))
        for i, z in enumerate(net.zero):
            z.weight.copy_(torch.from_numpy(tensors[f"zero.{i}.weight"]))
            z.bias.copy_(torch.from_numpy(tensors[f"zero.{i}.bias"]))
    return net.eval(), cfg


# ---------------------------------------------------------------- the two shipped controls' data

def edge_map(img: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """Sobel edges of images [B, 1, H, W] in [-1, 1]: 1 where the gradient magnitude (on [0, 1] pixels) is above
    `threshold`, -1 elsewhere (the image convention of the runtime)."""
    x = (img.float() + 1) / 2
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])[None, None]
    gx = F.conv2d(x, kx, padding=1)
    gy = F.conv2d(x, kx.transpose(2, 3), padding=1)
    return torch.where((gx ** 2 + gy ** 2).sqrt() > threshold, 1.0, -1.0)


JSON_KEYS = ("name", "age", "city", "color", "id", "email", "price", "title", "year", "country", "size", "score")
_NAMES = ("Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Lena", "Max")
_WORDS = ("red", "blue", "green", "Paris", "London", "Rome", "small", "large", "book", "lamp", "river", "garden")


def json_value(key: str, rng: np.random.Generator):
    if key in ("age", "id", "year", "score", "price", "size"):
        hi = {"age": 90, "id": 9999, "year": 2030, "score": 100, "price": 500, "size": 50}[key]
        return int(rng.integers(1, hi))
    if key == "name":
        return str(rng.choice(_NAMES))
    if key == "email":
        return f"{str(rng.choice(_NAMES)).lower()}@mail.com"
    return str(rng.choice(_WORDS))


def json_example(rng: np.random.Generator, n_keys: tuple[int, int] = (1, 3)) -> tuple[list[str], str]:
    """(keys, a JSON object with exactly those keys in that order) drawn from `rng`."""
    k = int(rng.integers(n_keys[0], n_keys[1] + 1))
    keys = [str(x) for x in rng.choice(JSON_KEYS, size=k, replace=False)]
    return keys, json.dumps({key: json_value(key, rng) for key in keys})


def keys_prompt(keys: list[str]) -> str:
    """The token control of a JSON schema: its keys, comma-separated (what `control={"json": ...}` takes)."""
    return ", ".join(keys)


def json_valid(text: str, keys: list[str]) -> bool:
    """Whether `text` is one JSON object with exactly `keys` (any order)."""
    try:
        v = json.loads(text.strip())
    except ValueError:
        return False
    return isinstance(v, dict) and sorted(v) == sorted(keys)


def control_tokens(tok, text: str, length: int, cfg: ModelConfig) -> list[int]:
    """A token control laid over a `length`-token canvas: the text's tokens, then [PAD] (the runtime's rule)."""
    ids = tok.encode(text, add_special_tokens=False).ids
    if len(ids) > length:
        raise ValueError(f"control text takes {len(ids)} tokens > canvas length {length}")
    return ids + [cfg.pad_token_id] * (length - len(ids))


# ---------------------------------------------------------------- training

@dataclass
class ControlNetArgs:
    base: str
    control: str                      # "edges" (image edge maps), "json" (JSON keys -> JSON object) or "records"
                                      # (`records`: the prompt is the keys, the continuation the record)
    out: str
    run: str | None = None
    data: str = "data/mm"             # edges: the data-mm folder
    n_blocks: int = 2
    rank: int = 16
    alpha: float = 16.0
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    text_length: int = 48             # json: canvas length ([BOS] object [EOS] [PAD]...)
    cfg_drop: float = 0.1             # edges: caption dropped (classifier-free guidance's unconditional)
    ckpt_every: int = 50
    time_limit_min: float | None = None
    device: str = "cpu"
    progress: bool = True
    extra: dict = field(default_factory=dict)
    records: list[str] | None = field(default=None, repr=False)   # records: JSON object texts to learn
    time_limit_exports: bool = False  # records: a run stopped by its time limit still writes its ControlNet
    init: str | None = None           # start from this ControlNet file (same base, blocks, rank) instead of zeros


def record_keys(text: str) -> list[str] | None:
    """The keys of a JSON object text, None if it is not one."""
    try:
        v = json.loads(text)
    except ValueError:
        return None
    return list(v) if isinstance(v, dict) and v else None


def record_canvas(tok, cfg: ModelConfig, record: str, length: int) -> tuple[list[int], list[int]]:
    """The `records` layout: canvas [BOS] keys " " record [EOS] [PAD]..., control = the keys (= the prompt)."""
    keys = keys_prompt(record_keys(record) or [])
    ids = [cfg.bos_token_id] + tok.encode(keys + " " + json.dumps(json.loads(record)), add_special_tokens=False).ids
    ids = (ids + [cfg.eos_token_id])[:length]
    return ids + [cfg.pad_token_id] * (length - len(ids)), control_tokens(tok, keys, length, cfg)


def _records_batch(tok, cfg: ModelConfig, rng: np.random.Generator, b: int, length: int, records: list[str]):
    pairs = [record_canvas(tok, cfg, records[int(i)], length) for i in rng.integers(0, len(records), b)]
    return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])


def _json_batch(tok, cfg: ModelConfig, rng: np.random.Generator, b: int, length: int):
    xs, cs = [], []
    for _ in range(b):
        keys, text = json_example(rng)
        ids = [cfg.bos_token_id] + tok.encode(text, add_special_tokens=False).ids + [cfg.eos_token_id]
        if len(ids) > length:
            ids = ids[:length]
        xs.append(ids + [cfg.pad_token_id] * (length - len(ids)))
        cs.append(control_tokens(tok, keys_prompt(keys), length, cfg))
    return torch.tensor(xs), torch.tensor(cs)


def train_controlnet(a: ControlNetArgs, resume: bool = True) -> dict:
    """Trains a ControlNet on a frozen base; under torchrun, data-parallel (`aios_train.distributed`)."""
    from . import distributed
    return distributed.run(a, _train, resume)


def _train(a: ControlNetArgs, resume: bool, dist) -> dict:
    from . import distributed
    from .continuous import q_sample, v_target
    from .schedule import EPS, q_xt, sample_t, subs_masked_nll
    from .tokenizer import load_tokenizer
    from .train import EMA, load_checkpoint, lr_at, save_checkpoint
    from .unified import caption_tokens, load_mm

    if a.control not in ("edges", "json", "records"):
        raise ValueError(f"controlnet: --control must be edges, json or records, got {a.control!r}")
    if a.control == "records" and (not a.records or any(record_keys(r) is None for r in a.records)):
        raise ValueError("controlnet: records must be a non-empty list of JSON object texts")
    if a.batch_size % dist.world:
        raise ValueError(f"controlnet: batch size {a.batch_size} does not split over {dist.world} processes")
    bpath = base_path(a.base)
    base, cfg = load_model(bpath)
    base.requires_grad_(False).eval().to(dist.device)
    fp = read_metadata(bpath).get(FINGERPRINT_KEY)
    if fp is None:
        raise ValueError(f"controlnet: {bpath} has no aios.fingerprint")
    tok = load_tokenizer(str(bpath.parent / "tokenizer.json"))
    net = ControlNet(base, "image" if a.control == "edges" else "tokens", a.n_blocks, a.rank, a.alpha).to(dist.device)
    if a.init:
        start, icfg = load_controlnet(a.init, base, fp)
        if (icfg["control"], icfg["n_blocks"], icfg["rank"]) != (net.control, net.n_blocks, net.rank):
            raise ValueError(f"controlnet: --init {a.init} is a {icfg['control']} ControlNet of {icfg['n_blocks']} "
                             f"blocks, rank {icfg['rank']}; this run is {net.control}, {net.n_blocks}, {net.rank}")
        net.load_state_dict(start.state_dict())
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    ema = EMA(net, 0.0)
    gen = torch.Generator().manual_seed(a.seed)
    run = Path(a.run or (str(a.out) + ".run"))
    ckpt = run / "ckpt"
    run.mkdir(parents=True, exist_ok=True)
    hp = {k: getattr(a, k) for k in ("base", "control", "n_blocks", "rank", "alpha", "steps", "batch_size", "lr",
                                     "seed", "text_length", "cfg_drop", "init")}
    counters = {"step": 0, "examples": 0, "elapsed_s": 0.0}
    if resume and (ckpt / "state.json").exists():
        if json.loads((ckpt / "state.json").read_text()).get("hparams") != hp:
            raise ValueError(f"controlnet: the checkpoint in {ckpt} has other settings; use a new --run")
        counters = load_checkpoint(ckpt, net, ema, opt, gen, dist.device)
    if a.control == "edges":
        imgs, _, _ = load_mm(a.data)
        from .mmdata import FASHION_CAPTIONS
        x_all = torch.from_numpy(imgs["train_x"]).float() / 127.5 - 1 if imgs["train_x"].dtype == np.uint8 \
            else torch.from_numpy(imgs["train_x"]).float()
        if x_all.dim() == 3:
            x_all = x_all[:, None]
        y_all = torch.from_numpy(imgs["train_y"]).long()
        caps = caption_tokens(tok, FASHION_CAPTIONS, 12, cfg)  # the runtime's default text_length
    log = open(run / "log.jsonl", "a") if dist.main else None
    t0 = time.time() - counters["elapsed_s"]
    start_inv = time.time()
    shard = dist.shard(a.batch_size) if dist.world > 1 else slice(None)
    bar = tqdm(total=a.steps, initial=counters["step"], desc=f"controlnet {a.control}", unit="step",
               disable=not (a.progress and dist.main), dynamic_ncols=True)
    losses: list[float] = []
    net.train()

    def checkpoint() -> None:
        counters.update(elapsed_s=time.time() - t0, hparams=hp)
        if dist.main:
            save_checkpoint(ckpt, net, ema, opt, gen, counters)
        dist.barrier()

    stopped = False
    for step in range(counters["step"], a.steps):
        b = a.batch_size
        if a.control in ("json", "records"):
            rng = np.random.default_rng([a.seed, step])
            x0, ctrl = (_json_batch(tok, cfg, rng, b, a.text_length) if a.control == "json"
                        else _records_batch(tok, cfg, rng, b, a.text_length, a.records))
            t = sample_t(b, gen)
            xt = q_xt(x0, (1 - EPS) * t, cfg.mask_token_id, gen)
            x0, xt, ctrl, t = x0[shard], xt[shard], ctrl[shard], t[shard]
            logits = base(xt.to(dist.device), control=net.bind(ctrl.to(dist.device)))
            nll = subs_masked_nll(logits, x0.to(dist.device), xt.to(dist.device), cfg.mask_token_id)
            # This shard's mean; averaging the gradients over equal shards gives the global batch's mean.
            loss = (nll / t.to(dist.device)[:, None]).sum() / x0.numel()
        else:
            idx = torch.from_numpy(np.random.default_rng([a.seed, step]).integers(0, x_all.shape[0], b))
            img, y = x_all[idx], y_all[idx]
            ctrl = edge_map(img)
            text = caps[y].clone()
            drop = torch.rand(b, generator=gen) < a.cfg_drop
            text[drop] = cfg.mask_token_id
            t_img = torch.rand(b, generator=gen).clamp_min(1e-4)
            eps = torch.randn(img.shape, generator=gen)
            noisy = q_sample(img, t_img, eps)
            img, text, ctrl, t_img, eps, noisy = (v[shard].to(dist.device) for v in (img, text, ctrl, t_img, eps, noisy))
            hook = net.bind(ctrl)
            out = base.forward_canvas(text, image=noisy, t_image=t_img, text_logits=False, control=hook)
            loss = ((out["image"] - v_target(img, t_img, eps)) ** 2).mean()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(params)  # the base runs the trainable copy through a hook, not DDP's forward
        gnorm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        counters["step"] = step + 1
        counters["examples"] += b
        lv = dist.mean(loss.item())
        losses.append(lv)
        bar.update(1)
        bar.set_postfix(loss=f"{lv:.4f}")
        if log is not None:
            log.write(json.dumps({"step": step + 1, "loss": lv, "grad_norm": float(gnorm), "lr": lr_at(step, a),
                                  "elapsed_s": round(time.time() - t0, 2)}) + "\n")
            log.flush()
        if distributed.end_of_step(step, a, dist, start_inv, checkpoint):
            stopped = True
            break
    bar.close()
    if log is not None:
        log.close()
    done = counters["step"] >= a.steps or (stopped and a.time_limit_exports)
    info = {"train_steps": counters["step"], "examples": counters["examples"],
            "elapsed_s": round(time.time() - t0, 1), "task": a.control, **a.extra}
    if done and dist.main:
        save_controlnet(net, a.out, fp, info)
    dist.barrier()
    return {"steps": counters["step"], "losses": losses, "done": done, "stopped_early": stopped, "net": net,
            "params": net.num_parameters(), "base_params": sum(p.numel() for p in base.parameters())}


__all__ = ["ControlNet", "ControlNetArgs", "train_controlnet", "save_controlnet", "load_controlnet", "edge_map",
           "json_example", "json_valid", "keys_prompt", "control_tokens", "KIND", "CONTROLS"]
