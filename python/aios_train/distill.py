"""Few-step text students by Self-Distillation Through Time (SDTT).

Deschenaux & Gulcehre, "Beyond Autoregression: Fast LLMs via Self-Distillation Through Time", ICLR 2025,
arXiv:2410.21035; reference code github.com/jdeschena/sdtt (`src/sdtt/core/distill/multi_round_sdtt.py`).
Chosen over dParallel / CDLM / Di4C because it needs nothing the masked-diffusion model does not already have:
no extra heads, no block-causal attention, no change to the sampler. The student is the same DiT, sampled by
the runtime's ancestral sampler with fewer steps.

One training step, as in the reference's `loss` / `_teacher_logprobs_on_mask`:
  x0 -> t ~ U[eps, 1] (antithetic) -> z_t (each token masked with probability (1 - eps) t);
  the frozen teacher takes `distill_steps` (k) ancestral steps of size dt from z_t; every position it reveals on
  a step gets as target the teacher's log p(x0) of that step, a position still masked at the end gets the last
  step's; the student predicts log p(x0 | z_t) in ONE pass and is pulled to the targets on the masked positions
  (`kl-bwd`, the reference default: KL(student || target); also kl-fwd, mse, tvd).
Rounds: round r teaches the student to do in one step what the teacher does in k steps of size
dt_r = 1 / (teacher_steps / k^r); after `round_steps` steps the student becomes the teacher (the reference's
`grow_dt_every`, `_student_to_teacher`). From a 64-step teacher with k = 2, rounds 1..4 give 32, 16, 8, 4 steps.

The ancestral step is the runtime's (`crates/aios-core/src/sampler/mod.rs`, MDLM's DDPM update): from time t to
s every masked position is revealed with probability (t - s) / t, its token drawn from p(x0) (SUBS: never
[MASK]). All randomness is drawn for the whole global batch from one seeded generator, so a run under torchrun
(`aios_train.distributed`) follows the one-process run, and a resumed run continues identically.
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
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .export import FINGERPRINT_KEY, load_model, read_fingerprint, save_model
from .schedule import EPS, NEG_INF, sample_t
from .train import EMA, batch_indices, load_checkpoint, lr_at, save_checkpoint

DISTILL_KEY = "aios.distill"   # metadata of a distilled student: method, steps, teacher (read by the runtime)
LOSSES = ("kl-bwd", "kl-fwd", "mse", "tvd")


@dataclass
class DistillArgs:
    teacher: str                     # teacher model: a folder with model.f32.parquet, or the file
    out: str                         # the student's .parquet
    run: str | None = None           # run folder (checkpoints, log, per-round students); default OUT.run
    train_windows: np.ndarray | None = field(default=None, repr=False)
    teacher_steps: int = 64          # the sampling steps the teacher is distilled from
    student_steps: int = 4           # the sampling steps of the final student
    distill_steps: int = 2           # k: teacher steps one student step learns (SDTT's num_distill_steps)
    round_steps: int = 300           # training steps per round (SDTT's grow_dt_every)
    loss: str = "kl-bwd"
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 20
    min_lr_ratio: float = 1.0        # constant after warmup, as the reference's constant_warmup schedule
    grad_clip: float = 1.0
    ema: float = 0.0                 # 0: export the raw student weights (rounds are too short for a slow EMA)
    seed: int = 0
    threads: int = 1
    ckpt_every: int = 50
    time_limit_min: float | None = None
    stop_after: int | None = None
    device: str = "cpu"
    progress: bool = True

    @property
    def rounds(self) -> int:
        k, r, n = self.distill_steps, 0, self.teacher_steps
        while n > self.student_steps and n % k == 0:
            n //= k
            r += 1
        if n != self.student_steps:
            raise ValueError(f"distill: teacher steps {self.teacher_steps} is not student steps {self.student_steps} "
                             f"times a power of distill steps {k}")
        return r

    @property
    def steps(self) -> int:
        return self.rounds * self.round_steps

    def round_of(self, step: int) -> int:
        """The round (1-based) global step `step` (0-based) belongs to."""
        return step // self.round_steps + 1

    def steps_after(self, rnd: int) -> int:
        """Student sampling steps after round `rnd` (teacher_steps at round 0)."""
        return self.teacher_steps // self.distill_steps ** rnd

    def hparams(self) -> dict:
        # What defines the run (a resume must match it), not how this invocation runs it.
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("train_windows", "progress", "stop_after", "device", "run", "out", "threads",
                               "ckpt_every", "time_limit_min")}
        d["rounds"] = self.rounds
        return d


def teacher_path(p: str | Path) -> Path:
    p = Path(p)
    return p / "model.f32.parquet" if p.is_dir() else p


def subs_log_probs(logits: torch.Tensor, xt: torch.Tensor, mask_id: int) -> torch.Tensor:
    """MDLM's SUBS parameterisation: log p(x0 | xt) [..., V] in f32, [MASK] never predicted, revealed tokens
    carried over (all mass on themselves). Out of place, so gradients flow through it."""
    bias = torch.zeros(logits.shape[-1], device=logits.device)
    bias[mask_id] = NEG_INF
    lp = (logits.float() + bias).log_softmax(-1)
    carry = torch.full_like(lp, NEG_INF).scatter(-1, xt[..., None], 0.0)
    return torch.where((xt != mask_id)[..., None], carry, lp)


def categorical(log_p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw from exp(log_p) [N, V] with uniforms u [N]: the randomness is drawn outside, for the whole
    batch, so a shard gives the same tokens as the full batch."""
    cdf = log_p.double().exp().cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    return torch.searchsorted(cdf, u[:, None].double()).clamp_max(log_p.shape[-1] - 1)[:, 0]


@torch.no_grad()
def teacher_targets(teacher, xt: torch.Tensor, t: torch.Tensor, dt: float, k: int, mask_id: int,
                    u_reveal: torch.Tensor, u_token: torch.Tensor) -> torch.Tensor:
    """Targets log p [B, L, V] from `k` ancestral teacher steps of size `dt` starting at times `t` [B].

    u_reveal / u_token [k, B, L]: the uniforms of each step's reveal decision and token draw."""
    targets = torch.zeros((*xt.shape, teacher.config.vocab_size), device=xt.device)
    revealed = torch.zeros(xt.shape, dtype=torch.bool, device=xt.device)
    x = xt
    log_p = None
    for i in range(k):
        t_now = (t - i * dt).clamp_min(0.0)
        s = (t - (i + 1) * dt).clamp_min(0.0)
        log_p = subs_log_probs(teacher(x), x, mask_id)
        p_reveal = torch.where(t_now > 0, (t_now - s) / t_now.clamp_min(1e-12), torch.ones_like(t_now))
        masked = x == mask_id
        go = masked & (u_reveal[i] < p_reveal[:, None])
        if go.any():
            x = x.clone()
            x[go] = categorical(log_p[go], u_token[i][go])
            targets[go] = log_p[go]
            revealed |= go
    still = (x == mask_id) & ~revealed
    targets[still] = log_p[still]
    return targets


def distill_loss(student_lp: torch.Tensor, target_lp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-position divergence [N] between the student's and the target's log p [N, V] (the reference's losses)."""
    if kind == "kl-bwd":     # KL(student || target): F.kl_div(target, preds, log_target=True) in the reference
        return (student_lp.exp() * (student_lp - target_lp)).sum(-1)
    if kind == "kl-fwd":     # KL(target || student)
        return (target_lp.exp() * (target_lp - student_lp)).sum(-1)
    if kind == "mse":
        return ((student_lp - target_lp) ** 2).mean(-1)
    if kind == "tvd":
        return (student_lp.exp() - target_lp.exp()).abs().sum(-1) / 2
    raise ValueError(f"distill: unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def _save_teacher(path: Path, teacher) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in teacher.state_dict().items()}, str(tmp))
    tmp.replace(path)


def distill(a: DistillArgs, resume: bool = True) -> dict:
    """Runs (or resumes) SDTT; under torchrun, data-parallel (`aios_train.distributed`). Returns a summary."""
    from . import distributed
    return distributed.run(a, _distill, resume)


def _distill(a: DistillArgs, resume: bool, dist) -> dict:
    from . import distributed
    if a.loss not in LOSSES:
        raise ValueError(f"distill: unknown loss {a.loss!r}; choose one of {', '.join(LOSSES)}")
    for name in ("teacher_steps", "student_steps", "round_steps", "batch_size"):
        if getattr(a, name) < 1:
            raise ValueError(f"distill: {name} must be >= 1, got {getattr(a, name)}")
    if a.distill_steps < 2:
        raise ValueError(f"distill: distill_steps must be >= 2, got {a.distill_steps}")
    rounds = a.rounds
    if rounds == 0:
        raise ValueError(f"distill: student steps {a.student_steps} must be fewer than teacher steps {a.teacher_steps}")
    if a.batch_size % dist.world:
        raise ValueError(f"distill: batch size {a.batch_size} does not split over {dist.world} processes")
    tpath = teacher_path(a.teacher)
    teacher, cfg = load_model(tpath)
    if cfg.causal:
        raise ValueError(f"distill: {tpath} is an autoregressive model; SDTT distils masked diffusion models")
    if cfg.time_conditioning:
        # The runtime's ancestral sampler feeds a time-conditioned model its block time; not wired here yet.
        raise ValueError(f"distill: {tpath} is time-conditioned; only models without time conditioning are supported")
    if a.train_windows is None:
        raise ValueError("distill: no training windows")
    data = torch.from_numpy(np.ascontiguousarray(a.train_windows, dtype=np.int64))
    if data.ndim != 2 or data.shape[1] > cfg.max_length or int(data.max()) >= cfg.vocab_size:
        raise ValueError(f"distill: windows {tuple(data.shape)} / max id {int(data.max())} do not fit the teacher "
                         f"(max_length {cfg.max_length}, vocab {cfg.vocab_size})")
    mask_id = cfg.mask_token_id
    run = Path(a.run or (str(a.out) + ".run"))
    ckpt = run / "ckpt"
    run.mkdir(parents=True, exist_ok=True)
    teacher_fp = read_fingerprint(tpath)

    student, _ = load_model(tpath)
    teacher.to(dist.device).eval().requires_grad_(False)
    student.to(dist.device).train()
    runner = dist.wrap(student)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = EMA(student, a.ema)
    gen = torch.Generator().manual_seed(a.seed)
    counters = {"step": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume and (ckpt / "state.json").exists():
        prev = json.loads((ckpt / "state.json").read_text())
        if prev.get("hparams", {}).get("teacher_fingerprint") not in (None, teacher_fp) or \
                {k: v for k, v in prev.get("hparams", {}).items() if k != "teacher_fingerprint"} != a.hparams():
            raise ValueError(f"distill: the checkpoint in {ckpt} was made with other settings or another teacher; "
                             f"use a new --run folder (or --no-resume)")
        counters = load_checkpoint(ckpt, student, ema, opt, gen, dist.device)
        rnd = a.round_of(counters["step"]) if counters["step"] < a.steps else rounds
        if rnd > 1:
            teacher.load_state_dict({k: v.to(dist.device) for k, v in
                                     load_file(str(ckpt / f"teacher-round{rnd}.safetensors")).items()})
        if dist.main:
            tqdm.write(f"resumed from {ckpt} at step {counters['step']} (round {rnd}/{rounds})")

    log = open(run / "log.jsonl", "a") if dist.main else None
    start = counters["step"]
    t0 = time.time() - counters["elapsed_s"]
    invocation_start = time.time()
    shard = dist.shard(a.batch_size) if dist.world > 1 else slice(None)
    bar = tqdm(total=a.steps, initial=start, desc=f"distill {a.teacher_steps}->{a.student_steps} steps", unit="step",
               disable=not (a.progress and dist.main), dynamic_ncols=True)
    losses: list[float] = []
    stopped_early = False
    hp = {**a.hparams(), "teacher_fingerprint": teacher_fp}

    def checkpoint() -> None:
        counters.update(elapsed_s=time.time() - t0, config=cfg.to_dict(), hparams=hp)
        if dist.main:
            save_checkpoint(ckpt, student, ema, opt, gen, counters)
        dist.barrier()

    def export(path: Path, rnd: int) -> None:
        weights = student.state_dict() if a.ema == 0 else ema.shadow
        from .model import DiT
        m = DiT(cfg)
        m.load_state_dict({k: v.detach().cpu() for k, v in weights.items()})
        meta = {"method": "sdtt", "paper": "arXiv:2410.21035", "modality": "text", "loss": a.loss,
                "teacher": str(a.teacher), "teacher_fingerprint": teacher_fp, "teacher_steps": a.teacher_steps,
                "student_steps": a.steps_after(rnd), "distill_steps": a.distill_steps, "rounds": rnd,
                "round_steps": a.round_steps, "batch_size": a.batch_size, "lr": a.lr,
                "train_steps": counters["step"], "tokens": counters["tokens"],
                "elapsed_s": round(time.time() - t0, 1)}
        save_model(m, cfg, path, extra_metadata={DISTILL_KEY: json.dumps(meta, sort_keys=True)})

    for step in range(start, a.steps):
        rnd = a.round_of(step)
        if step > 0 and step % a.round_steps == 0:
            # Round boundary: the student becomes the teacher (saved first, so a resume in this round finds it).
            teacher.load_state_dict(student.state_dict())
            if dist.main:
                ckpt.mkdir(parents=True, exist_ok=True)
                _save_teacher(ckpt / f"teacher-round{rnd}.safetensors", teacher)
            dist.barrier()
        dt = 1.0 / a.steps_after(rnd - 1)
        idx = batch_indices(step, data.shape[0], a.batch_size, a.seed)
        x0 = data[idx]
        b, n = x0.shape
        t = sample_t(b, gen)
        xt = torch.where(torch.rand(x0.shape, generator=gen) < ((1 - EPS) * t)[:, None],
                         torch.full_like(x0, mask_id), x0)
        u_reveal = torch.rand((a.distill_steps, b, n), generator=gen)
        u_token = torch.rand((a.distill_steps, b, n), generator=gen)
        xs, ts = xt[shard].to(dist.device), t[shard].to(dist.device)
        target = teacher_targets(teacher, xs, ts, dt, a.distill_steps, mask_id,
                                 u_reveal[:, shard].to(dist.device), u_token[:, shard].to(dist.device))
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        masked = xs == mask_id
        # Only masked positions are scored (a revealed one carries over under SUBS and has no loss).
        student_lp = subs_log_probs(runner(xs)[masked], xs[masked], mask_id)
        per = distill_loss(student_lp, target[masked], a.loss)
        # Sum over this shard's masked positions / the global batch's: DDP's gradient mean then equals the
        # one-process gradient of the mean over all masked positions.
        total = max(1, int((xt == mask_id).sum()))
        loss = per.sum() * dist.world / total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(student.parameters(), a.grad_clip)
        opt.step()
        ema.update(student)
        counters["step"] = step + 1
        counters["tokens"] += x0.numel()
        loss_value = dist.mean(loss.item())
        losses.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", round=f"{rnd}/{rounds}", steps=a.steps_after(rnd))
        if log is not None:
            log.write(json.dumps({"step": step + 1, "round": rnd, "student_steps": a.steps_after(rnd),
                                  "loss": loss_value, "grad_norm": float(gnorm), "lr": lr_at(step, a),
                                  "tokens": counters["tokens"], "elapsed_s": round(time.time() - t0, 2)}) + "\n")
            log.flush()
        if (step + 1) % a.round_steps == 0 and dist.main:
            export(run / f"round{rnd}-{a.steps_after(rnd)}steps.parquet", rnd)
            tqdm.write(f"round {rnd}/{rounds} done at step {step + 1}: a {a.steps_after(rnd)}-step student, "
                       f"mean loss {np.mean(losses[-a.round_steps:]):.4f}")
        if distributed.end_of_step(step, a, dist, invocation_start, checkpoint):
            stopped_early = True
            break
    bar.close()
    if log is not None:
        log.close()
    done = counters["step"] >= a.steps
    if done and dist.main:
        export(Path(a.out), rounds)
    dist.barrier()
    return {"steps": counters["step"], "tokens": counters["tokens"], "elapsed_s": time.time() - t0,
            "losses": losses, "stopped_early": stopped_early, "done": done, "rounds": rounds,
            "student": student}


def read_distill_meta(path: str | Path) -> dict | None:
    """The `aios.distill` metadata of a model file (None for a model that is not a distilled student)."""
    from .export import read_metadata
    v = read_metadata(path).get(DISTILL_KEY)
    return None if v is None else json.loads(v)


__all__ = ["DistillArgs", "distill", "teacher_targets", "distill_loss", "subs_log_probs", "categorical",
           "read_distill_meta", "DISTILL_KEY", "LOSSES", "FINGERPRINT_KEY"]
