"""Masked-diffusion pretraining (MDLM) and the autoregressive baseline (`ar=True`) on the same windows.

Deterministic given the seed and thread count: data order is a function of (seed, epoch), the noise
comes from one torch.Generator whose state is checkpointed, so a resumed run continues identically.
Checkpoints are safetensors (model, EMA, AdamW moments, RNG state) + a JSON file of counters; no pickle.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .config import ModelConfig
from .model import DiT
from .schedule import ar_loss, diffusion_loss


@dataclass
class TrainArgs:
    out: str                       # run directory: ckpt/, log.jsonl
    train_windows: np.ndarray | None = field(default=None, repr=False)
    valid_windows: np.ndarray | None = field(default=None, repr=False)
    # Per training window, positions that are given (never masked, no loss): memory segments, padding.
    train_keep: np.ndarray | None = field(default=None, repr=False)
    warm_start: str | None = None          # aios .parquet whose weights start a new run (same config)
    vocab_size: int = 4096
    hidden_size: int = 256
    n_layers: int = 4
    n_heads: int = 4
    cond_dim: int = 128
    max_length: int = 128
    mask_token_id: int = 3
    time_conditioning: bool = False
    ar: bool = False
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema: float = 0.999
    seed: int = 0
    threads: int = 1
    eval_every: int = 250
    eval_windows: int = 64
    ckpt_every: int = 250
    # Safety stop (saves a checkpoint) after this many minutes of *this* invocation; a resumed run gets the
    # full limit again. Use fixed steps for fair budgets.
    time_limit_min: float | None = None
    stop_after: int | None = None        # stop (with a checkpoint) after this global step; simulates interruption
    device: str = "cpu"                  # cpu or cuda; under torchrun one process per device (aios_train.distributed)
    progress: bool = True

    def model_config(self) -> ModelConfig:
        return ModelConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size, n_layers=self.n_layers,
                           n_heads=self.n_heads, cond_dim=self.cond_dim, max_length=self.max_length,
                           mask_token_id=self.mask_token_id, time_conditioning=self.time_conditioning, causal=self.ar)

    def hparams(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("train_windows", "valid_windows", "train_keep", "progress", "stop_after", "device")}
        d["betas"] = list(self.betas)
        return d


def lr_at(step: int, a) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr at the last step. `a` is any run config with lr,
    warmup, steps and min_lr_ratio (TrainArgs, LoraTrainArgs, PatchTrainArgs, ...): the one schedule of the package."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    p = min(1.0, (step - a.warmup) / max(1, a.steps - a.warmup))
    return a.lr * (a.min_lr_ratio + (1 - a.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def batch_indices(step: int, n: int, bs: int, seed: int) -> np.ndarray:
    """Window ids of `step`: a fresh seeded permutation per epoch, so the order depends only on (seed, step)."""
    idx = np.empty(bs, dtype=np.int64)
    for j in range(bs):
        k = step * bs + j
        epoch, pos = divmod(k, n)
        # Cache the permutation of the current epoch (cheap for small corpora).
        if getattr(batch_indices, "_key", None) != (seed, epoch, n):
            batch_indices._perm = np.random.default_rng([seed, epoch]).permutation(n)
            batch_indices._key = (seed, epoch, n)
        idx[j] = batch_indices._perm[pos]
    return idx


class EMA:
    """MDLM's ExponentialMovingAverage with num_updates warm-up: decay_n = min(decay, (1+n)/(10+n))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)


def save_checkpoint(ckpt: Path, model, ema: EMA, opt: torch.optim.Optimizer, gen: torch.Generator, counters: dict) -> None:
    ckpt.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"ema/{k}": v.cpu().contiguous() for k, v in ema.shadow.items()})
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, (p for g in opt.param_groups for p in g["params"])):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq", "step"):
            if key in st:
                tensors[f"optim/{name}/{key}"] = (torch.as_tensor(st[key]).reshape(-1).cpu().contiguous() if key == "step"
                                                  else st[key].cpu().contiguous())
    tensors["rng/noise"] = gen.get_state()
    tmp = ckpt / "state.safetensors.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(ckpt / "state.safetensors")
    counters = {**counters, "ema_num_updates": ema.num_updates}
    (ckpt / "state.json.tmp").write_text(json.dumps(counters, indent=2))
    (ckpt / "state.json.tmp").replace(ckpt / "state.json")


def load_checkpoint(ckpt: Path, model, ema: EMA, opt: torch.optim.Optimizer, gen: torch.Generator,
                    device: torch.device | str = "cpu") -> dict:
    counters = json.loads((ckpt / "state.json").read_text())
    t = {k: (v if k == "rng/noise" else v.to(device)) for k, v in load_file(str(ckpt / "state.safetensors")).items()}
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model/")}, strict=True)
    ema.shadow = {k[4:]: v for k, v in t.items() if k.startswith("ema/")}
    ema.num_updates = counters["ema_num_updates"]
    names = [n for n, _ in model.named_parameters()]
    for name, p in zip(names, (p for g in opt.param_groups for p in g["params"])):
        if f"optim/{name}/exp_avg" in t:
            opt.state[p] = {"step": t[f"optim/{name}/step"].reshape(()).cpu().clone(),
                            "exp_avg": t[f"optim/{name}/exp_avg"], "exp_avg_sq": t[f"optim/{name}/exp_avg_sq"]}
    gen.set_state(t["rng/noise"])
    return counters


def load_ema_model(ckpt: str | Path, use_ema: bool = True) -> tuple[DiT, ModelConfig]:
    """Model (EMA weights by default) from a training checkpoint directory."""
    ckpt = Path(ckpt)
    if (ckpt / "ckpt").is_dir():
        ckpt = ckpt / "ckpt"
    if not (ckpt / "state.json").exists():
        raise FileNotFoundError(f"no training checkpoint (state.json) in {ckpt}")
    counters = json.loads((ckpt / "state.json").read_text())
    cfg = ModelConfig.from_dict(counters["config"])
    t = load_file(str(ckpt / "state.safetensors"))
    prefix = "ema/" if use_ema else "model/"
    model = DiT(cfg)
    model.load_state_dict({k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}, strict=True)
    model.eval()
    return model, cfg


@torch.no_grad()
def quick_eval(model, windows: torch.Tensor, a: TrainArgs) -> float:
    """Validation nats/token on a fixed subset with a fixed noise seed (comparable across steps)."""
    from .evaluate import ar_nll, diffusion_nelbo
    was = model.training
    model.eval()
    if a.ar:
        r = ar_nll(model, windows, batch_size=a.batch_size, progress=False)
    else:
        r = diffusion_nelbo(model, windows, a.mask_token_id, n_t=4, seed=1234, batch_size=a.batch_size, progress=False)
    model.train(was)
    return r["nats_per_token"]


def train(a: TrainArgs, resume: bool = True) -> dict:
    """Runs (or resumes) a training run; under torchrun, data-parallel across the processes
    (`aios_train.distributed`: same global batch and noise on every rank, rank 0 logs and checkpoints)."""
    from . import distributed
    return distributed.run(a, _train, resume)


def _train(a: TrainArgs, resume: bool, dist) -> dict:
    from . import distributed
    out = Path(a.out)
    ckpt = out / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    cfg = a.model_config()
    if a.train_windows is None:
        raise ValueError("train: no training windows")
    data = torch.from_numpy(np.ascontiguousarray(a.train_windows, dtype=np.int64))
    if data.shape[1] != a.max_length or int(data.max()) >= a.vocab_size:
        raise ValueError(f"train: windows {tuple(data.shape)} / max id {int(data.max())} do not fit the config")
    keep_all = None
    if a.train_keep is not None:
        if a.train_keep.shape != tuple(data.shape) or a.train_keep.dtype != np.bool_:
            raise ValueError(f"train: keep mask {a.train_keep.shape} {a.train_keep.dtype} does not match the windows "
                             f"{tuple(data.shape)} (bool)")
        keep_all = torch.from_numpy(np.ascontiguousarray(a.train_keep))
    if a.batch_size % dist.world:
        raise ValueError(f"train: batch size {a.batch_size} does not split over {dist.world} processes")
    valid = None
    if a.valid_windows is not None and a.eval_every > 0 and dist.main:
        valid = torch.from_numpy(np.ascontiguousarray(a.valid_windows[: a.eval_windows], dtype=np.int64))

    model = DiT(cfg)
    if a.warm_start:
        from .export import load_model
        base, base_cfg = load_model(a.warm_start)
        if base_cfg.to_dict() != cfg.to_dict():
            raise ValueError(f"train: {a.warm_start} has config {base_cfg.to_dict()}, this run {cfg.to_dict()}")
        model.load_state_dict(base.state_dict())
    model.to(dist.device)
    model.train()
    runner = dist.wrap(model)  # forward/backward; gradients averaged over ranks
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=a.betas, eps=1e-8, weight_decay=a.weight_decay)
    ema = EMA(model, a.ema)
    gen = torch.Generator().manual_seed(a.seed)
    counters = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume and (ckpt / "state.json").exists():
        prev = json.loads((ckpt / "state.json").read_text())
        if prev.get("config") != cfg.to_dict():
            raise ValueError(f"train: checkpoint in {ckpt} has a different model config; use a new --out")
        counters = load_checkpoint(ckpt, model, ema, opt, gen, dist.device)
        if dist.main:
            tqdm.write(f"resumed from {ckpt} at step {counters['step']}")

    log = open(out / "log.jsonl", "a") if dist.main else None
    start_step = counters["step"]
    t0 = time.time() - counters["elapsed_s"]  # elapsed_s in logs and checkpoints is cumulative over resumes
    invocation_start = time.time()
    bar = tqdm(total=a.steps, initial=start_step, desc="train-ar" if a.ar else "train-mdlm", unit="step",
               disable=not (a.progress and dist.main), dynamic_ncols=True)
    shard = dist.shard(a.batch_size) if dist.world > 1 else None
    losses: list[float] = []
    stopped_early = False

    def checkpoint() -> None:
        counters.update(elapsed_s=time.time() - t0, config=cfg.to_dict(), hparams=a.hparams())
        if dist.main:
            save_checkpoint(ckpt, model, ema, opt, gen, counters)
        dist.barrier()  # nobody runs ahead of a checkpoint it might resume from

    for step in range(start_step, a.steps):
        idx = batch_indices(step, data.shape[0], a.batch_size, a.seed)
        x0 = data[idx]
        keep = None if keep_all is None else keep_all[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        if a.ar:
            loss = ar_loss(runner, (x0 if shard is None else x0[shard]).to(dist.device)).mean()
        else:
            nll, _ = diffusion_loss(runner, x0, a.mask_token_id, gen, keep=keep, shard=shard, device=dist.device)
            loss = nll.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        ema.update(model)
        counters["step"] = step + 1
        counters["tokens"] += x0.numel()
        loss_value = dist.mean(loss.item())  # the global batch's loss
        losses.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr_at(step, a):.1e}")
        rec = {"step": step + 1, "loss": loss_value, "grad_norm": float(gnorm), "lr": lr_at(step, a),
               "tokens": counters["tokens"], "elapsed_s": round(time.time() - t0, 2)}
        last = step + 1 == a.steps
        if valid is not None and ((step + 1) % a.eval_every == 0 or last):
            rec["val_nats_per_token"] = quick_eval(model, valid, a)
            tqdm.write(f"step {step + 1}: train loss {np.mean(losses[-a.eval_every:]):.4f} "
                       f"val nats/token {rec['val_nats_per_token']:.4f} (ppl {math.exp(rec['val_nats_per_token']):.1f})")
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if distributed.end_of_step(step, a, dist, invocation_start, checkpoint):
            stopped_early = True
            break
    bar.close()
    if log is not None:
        log.close()
    if start_step >= a.steps:
        checkpoint()
    return {"steps": counters["step"], "tokens": counters["tokens"], "elapsed_s": time.time() - t0,
            "losses": losses, "stopped_early": stopped_early, "model": model, "ema": ema}
