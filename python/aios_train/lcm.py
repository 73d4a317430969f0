"""Few-step image and audio generation by consistency distillation into a LoRA (LCM-LoRA).

Luo et al., "Latent Consistency Models", arXiv:2310.04378, and "LCM-LoRA", arXiv:2311.05556; reference code
huggingface/diffusers `examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py`. Our continuous heads
diffuse pixels / log-mels directly (no VAE), so "latent" is the data itself.

The student is the base plus a LoRA; its consistency function is its own x0 estimate, f(x, t) = alpha_t x -
sigma_t v(x, t). With v-prediction that meets the boundary condition f(x, 0) = x exactly (alpha_0 = 1, sigma_0 =
0), so no c_skip / c_out is needed. The frozen base is the teacher; its ODE steps are DDIM with classifier-free
guidance `v_u + (1 + w)(v_c - v_u)` (w = `guidance`, built into the student, which samples without guidance). Two
targets for f(x_t, t), on x_t = alpha_t x0 + sigma_t eps from the data (caption c, 10% of captions masked):

* `lcd` (the reference, LCM's skipping-step bootstrap): t = n / N for n in 1..N (N = `teacher_steps`, 50); the
  teacher takes ONE step t -> t - 1/N to x_prev, and the target is sg f(x_prev, t - 1/N) from the same LoRA'd
  network (the reference: "we do not use a separate target network for LCM-LoRA").
* `ode` (the default): the limit of the skipping step that reaches t = 0 at once. x_t starts at a time of the
  sampler's own grid (1, 1 - 1/S, ..., 1/S for S = `student_steps`); the teacher solves its ODE to t = 0 in
  N / S DDIM steps per grid interval (N = 4 S by default), and every grid time it passes, its start included,
  gives a pair (state, that same clean sample): all of them lie on one trajectory, so they share the consistency
  target (Song et al. 2023's consistency function of the PF-ODE; direct distillation as Luhman & Luhman 2021).
  Why the default: `lcd` propagates the boundary condition one grid interval per round of learning, which at the
  batch sizes and steps two CPU cores allow did not converge; measured in bench/RESULTS.md (a 650-step `lcd` run
  made 4-step images worse than the 4-step teacher, the `ode` run below better). Each `ode` step costs the teacher
  about 2 N / S forward passes per example, against 2 for `lcd`.
Distance: the reference's pseudo-Huber, elementwise `sqrt((a - b)^2 + c^2) - c` (c = 0.001), or `l2` (default).

The multistep sampler (LCM's Algorithm 1; `aios_rt` sampler "lcm", crates/aios-core/src/sampler/continuous.rs):
on the grid t_i = 1 - i / steps, x0 = f(x, t_i) (clipped for images), then x = alpha_s x0 + sigma_s z with fresh
noise z at s = t_{i+1}; the last step returns x0.

The LoRA targets the backbone's attention and MLP matrices (`aios_train.lora`'s container, `aios.kind = lora`),
so the runtime hot-loads it on the base like any adapter; `aios.config["distill"]` records the method, target,
modality, student steps and guidance. Every checkpoint also writes the student so far to RUN/latest.lora.parquet.
All randomness is drawn for the global batch from one seeded generator, so a run under torchrun
(`aios_train.distributed`) follows the one-process run and a resumed run continues identically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .continuous import alpha_sigma

MODALITIES = ("image", "audio")
LOSSES = ("huber", "l2")
TARGETS = ("ode", "lcd")
HUBER_C = 0.001      # the reference's huber_c


@dataclass
class LcmArgs:
    teacher: str                     # base model: a folder with model.f32.parquet (+ tokenizer.json), or the file
    out: str                         # the LCM-LoRA container (.parquet)
    data: str = "data/mm"            # images.npz / audio.npz from `python -m aios_train data-mm`
    modality: str = "image"
    run: str | None = None           # run folder (checkpoint, log); default OUT.run
    tokenizer: str | None = None
    media_x: np.ndarray | None = field(default=None, repr=False)   # instead of `data`: clean values (images uint8
    media_y: np.ndarray | None = field(default=None, repr=False)   # [n, H, W] or log-mels [n, frames, mels]), labels
    text_length: int = 12            # caption segment: [BOS] caption [EOS] [PAD]... (the base's training layout)
    target: str = "ode"              # ode: the teacher's ODE solved to t = 0; lcd: LCM's one-step bootstrap
    teacher_steps: int | None = None  # N, the teacher's DDIM grid (default: ode 4 x student_steps, lcd 50)
    student_steps: int = 4           # the sampler's steps (ode trains at exactly its times; recorded in the file)
    guidance: float = 3.0            # w of the teacher's classifier-free guidance (the runtime's default for media)
    uncond_prob: float = 0.1         # caption masked (unconditional generation keeps working)
    loss: str = "l2"
    rank: int = 32
    alpha: float = 32.0
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 50
    min_lr_ratio: float = 1.0        # constant after warmup, as the reference's default
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 1
    ckpt_every: int = 50
    time_limit_min: float | None = None
    stop_after: int | None = None
    device: str = "cpu"
    init: str | None = None          # warm start: an LCM-LoRA of this teacher with the same rank, alpha and targets
    progress: bool = True

    def __post_init__(self) -> None:
        if self.teacher_steps is None:
            self.teacher_steps = 4 * self.student_steps if self.target == "ode" else 50

    def hparams(self) -> dict:
        keep = ("modality", "text_length", "target", "teacher_steps", "student_steps", "guidance", "uncond_prob", "loss", "rank", "alpha",
                "steps", "batch_size", "lr", "warmup", "min_lr_ratio", "grad_clip", "seed", "init")
        return {k: getattr(self, k) for k in keep}


def consistency_x0(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f(x, t) = alpha_t x - sigma_t v per sample (t [B]): the x0 estimate, f(x, 0) = x exactly."""
    a, s = alpha_sigma(t)
    shape = (-1,) + (1,) * (x.dim() - 1)
    return a.float().view(shape) * x - s.float().view(shape) * v


def ddim_step_batch(x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                    clip: float | None) -> torch.Tensor:
    """Deterministic DDIM x_t -> x_s per sample, with `aios_train.continuous.ddim_step`'s clipping of x0."""
    a_t, s_t = (u.float().view((-1,) + (1,) * (x.dim() - 1)) for u in alpha_sigma(t))
    a_s, s_s = (u.float().view((-1,) + (1,) * (x.dim() - 1)) for u in alpha_sigma(s))
    x0 = a_t * x - s_t * v
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    eps = (x - a_t * x0) / s_t.clamp_min(1e-12)
    return a_s * x0 + s_s * eps


def lcm_distance(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample mean distance between two batches of x0 estimates (the reference's pseudo-Huber or L2)."""
    d = (a - b).float()
    e = torch.sqrt(d * d + HUBER_C ** 2) - HUBER_C if kind == "huber" else d * d
    return e.flatten(1).mean(1)


def _noised(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    a_t, s_t = (u.float().view((-1,) + (1,) * (x0.dim() - 1)) for u in alpha_sigma(t))
    return a_t * x0 + s_t * eps


def _canvas(model, tokens: torch.Tensor, x: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    kw = {"image": x, "t_image": t} if kind == "image" else {"audio": x, "t_audio": t}
    return model.forward_canvas(tokens, text_logits=False, **kw)[kind]


@torch.no_grad()
def teacher_step(teacher, tokens: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                 s: torch.Tensor, guidance: float, kind: str) -> torch.Tensor:
    """The teacher's guided DDIM step t -> s (one batched pass over conditional and unconditional canvases)."""
    b = x.shape[0]
    out = _canvas(teacher, torch.cat([tokens, uncond]), torch.cat([x, x]), torch.cat([t, t]), kind)
    v_c, v_u = out[:b], out[b:]
    v = v_u + (1 + guidance) * (v_c - v_u)
    return ddim_step_batch(x, v, t, s, 1.0 if kind == "image" else None)


@torch.no_grad()
def teacher_solve(teacher, tokens: torch.Tensor, uncond: torch.Tensor, x: torch.Tensor, t_start: float, n_grid: int,
                  keep: list[float], guidance: float, kind: str) -> tuple[torch.Tensor, dict[float, torch.Tensor]]:
    """The teacher's guided DDIM from `t_start` (a point of the grid k / n_grid) to t = 0: (its clean sample, the
    states it passes at the times in `keep`). Every kept state lies on the same ODE trajectory, so its consistency
    target is the same clean sample."""
    b = x.shape[0]
    states = {}
    for k in range(round(t_start * n_grid), 0, -1):
        t = k / n_grid
        if any(abs(t - u) < 1e-9 for u in keep):
            states[t] = x
        x = teacher_step(teacher, tokens, uncond, x, torch.full((b,), t), torch.full((b,), (k - 1) / n_grid),
                         guidance, kind)
    return x, states


def sample_lcm(model, tokens: torch.Tensor, kind: str, steps: int, seed: int = 0, runtime_noise: bool = True,
               known: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The runtime's "lcm" sampler in PyTorch for one canvas (the reference of the parity tests); see
    `aios_train.continuous.sample_reference`, which this shares its noise, grid and inpainting with."""
    from .continuous import sample_reference
    return sample_reference(model, tokens, kind, steps, sampler="lcm", seed=seed, runtime_noise=runtime_noise,
                            known=known, mask=mask)


def _media(a: LcmArgs, cfg, tok):
    """(clean values [n, ...] f32, caption tokens per example [n, Lt], the unconditional caption [1, Lt])."""
    from .media import image_to_unit
    from .mmdata import DIGIT_WORDS, FASHION_CAPTIONS
    from .unified import caption_tokens, load_mm
    if a.media_x is None:
        imgs, aud, _ = load_mm(a.data)
        raw_x, raw_y = (imgs if a.modality == "image" else aud)["train_x"], (imgs if a.modality == "image" else aud)["train_y"]
    else:
        raw_x, raw_y = a.media_x, a.media_y
    length = a.text_length
    if a.modality == "image":
        if not cfg.has_image:
            raise ValueError("lcm: the model has no image head")
        x = torch.from_numpy(image_to_unit(np.asarray(raw_x, dtype=np.uint8)))[:, None]
        names = [FASHION_CAPTIONS, [c.split(" ", 1)[-1] if c.startswith(("a ", "an ")) else c for c in FASHION_CAPTIONS]]
        want = (cfg.image_channels, cfg.image_size, cfg.image_size)
    else:
        if not cfg.has_audio:
            raise ValueError("lcm: the model has no audio head")
        x = torch.from_numpy(np.asarray(raw_x, dtype=np.float32))
        names = [DIGIT_WORDS, [f"the number {w}" for w in DIGIT_WORDS]]
        want = (cfg.audio_frames, cfg.audio_mels)
    y = torch.from_numpy(np.asarray(raw_y)).long()
    if len(y) != len(x) or len(y) == 0 or int(y.min()) < 0 or int(y.max()) > 9:
        raise ValueError(f"lcm: need one label in 0..9 per example ({len(x)} examples, {len(y)} labels)")
    if not torch.isfinite(x).all():
        raise ValueError("lcm: the training values contain NaN or inf")
    if tuple(x.shape[1:]) != want:
        raise ValueError(f"lcm: {a.data} has {a.modality} of shape {tuple(x.shape[1:])}; the model expects {want}")
    caps = torch.stack([caption_tokens(tok, n, length, cfg) for n in names])      # [2, 10, Lt]
    # Two phrasings, alternating by example, as in the base model's training.
    tokens = caps[torch.arange(len(y)) % 2, y]
    uncond = torch.full((1, length), cfg.mask_token_id, dtype=torch.long)
    return x, tokens, uncond


def distill_lcm(a: LcmArgs, resume: bool = True) -> dict:
    """Runs (or resumes) LCM-LoRA distillation; under torchrun, data-parallel. Writes the adapter `a.out`."""
    from . import distributed
    return distributed.run(a, _distill_lcm, resume)


def _checkpoint(path: Path, lora: dict, opt, gen: torch.Generator, counters: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "state.pt.tmp"
    torch.save({"lora": {k: v.detach().cpu() for k, v in lora.items()}, "opt": opt.state_dict(),
                "gen": gen.get_state(), "counters": counters}, tmp)
    tmp.replace(path / "state.pt")


def _warm_start(path: str, cfg: dict, names: list[str], params: list[torch.Tensor]) -> None:
    """Copies an earlier student's LoRA into the fresh peft parameters, so a run can go on past the step count and
    schedule it was made with (resume only continues the same schedule)."""
    from .lora import lora_tensors_from_peft, read_lora
    tensors, icfg = read_lora(path)
    for k in ("base_fingerprint", "rank", "alpha", "target_modules"):
        if icfg.get(k) != cfg[k]:
            raise ValueError(f"lcm: --init {path} has {k} {icfg.get(k)!r}; this run has {cfg[k]!r}")
    with torch.no_grad():
        for n, p in zip(names, params):
            (key,) = lora_tensors_from_peft({n: p}).keys()
            p.copy_(torch.from_numpy(tensors[key]))


def _distill_lcm(a: LcmArgs, resume: bool, dist) -> dict:
    from tqdm import tqdm

    from . import distributed
    from .export import load_model
    from .lora import _wrap, base_fingerprint, lora_tensors_from_peft, resolve_base, resolve_targets, save_lora
    from .tokenizer import load_tokenizer
    from .train import batch_indices, lr_at

    if a.modality not in MODALITIES:
        raise ValueError(f"lcm: unknown modality {a.modality!r}; choose one of {', '.join(MODALITIES)}")
    if a.target not in TARGETS:
        raise ValueError(f"lcm: unknown target {a.target!r}; choose one of {', '.join(TARGETS)}")
    if a.target == "ode" and a.teacher_steps % a.student_steps:
        raise ValueError(f"lcm: teacher steps {a.teacher_steps} must be a multiple of student steps {a.student_steps} "
                         "(the ode target passes through every time of the student's grid)")
    if a.loss not in LOSSES:
        raise ValueError(f"lcm: unknown loss {a.loss!r}; choose one of {', '.join(LOSSES)}")
    for name in ("teacher_steps", "student_steps", "batch_size", "rank", "steps"):
        if getattr(a, name) < 1:
            raise ValueError(f"lcm: {name} must be >= 1, got {getattr(a, name)}")
    if not (math.isfinite(a.guidance) and a.guidance >= 0):
        raise ValueError(f"lcm: guidance must be a finite number >= 0, got {a.guidance}")
    if not 0 <= a.uncond_prob < 1:
        raise ValueError(f"lcm: uncond_prob must be in [0, 1), got {a.uncond_prob}")
    if a.student_steps >= a.teacher_steps:
        raise ValueError(f"lcm: student steps {a.student_steps} must be fewer than the teacher's {a.teacher_steps}")
    if a.batch_size % dist.world:
        raise ValueError(f"lcm: batch size {a.batch_size} does not split over {dist.world} processes")
    model_path, tok_path = resolve_base(a.teacher, a.tokenizer)
    teacher, mcfg = load_model(model_path)
    if not mcfg.multimodal:
        raise ValueError(f"lcm: {model_path} has no image/audio heads (a text-only model); distil text with "
                         "`distill --modality text`")
    tok = load_tokenizer(tok_path)
    x_all, tok_all, uncond1 = _media(a, mcfg, tok)
    fp = base_fingerprint(model_path)
    run = Path(a.run or (str(a.out) + ".run"))
    run.mkdir(parents=True, exist_ok=True)
    ckpt = run / "ckpt"

    student, _ = load_model(model_path)
    targets = resolve_targets(("attn_qkv", "attn_out", "mlp.0", "mlp.2"), mcfg)
    cfg = {"rank": int(a.rank), "alpha": float(a.alpha), "use_rslora": False, "target_modules": targets,
           "base_fingerprint": fp, "dropout": 0.0, "base_config": mcfg.to_dict()}
    torch.manual_seed(a.seed)
    pm = _wrap(student, cfg)
    teacher.to(dist.device).eval().requires_grad_(False)
    pm.to(dist.device).train()
    params = [p for p in pm.parameters() if p.requires_grad]
    names = [n for n, p in pm.named_parameters() if p.requires_grad]
    if a.init:
        _warm_start(a.init, cfg, names, params)
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(a.seed)
    counters = {"step": 0, "examples": 0, "elapsed_s": 0.0}
    hp = {**a.hparams(), "teacher_fingerprint": fp}
    if resume and (ckpt / "state.pt").exists():
        st = torch.load(ckpt / "state.pt", weights_only=False)
        if st["counters"].get("hparams") != hp:
            raise ValueError(f"lcm: the checkpoint in {ckpt} was made with other settings or another teacher; "
                             "use a new --run-dir (or --no-resume)")
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(st["lora"][n].to(dist.device))
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        counters = st["counters"]
        if dist.main:
            tqdm.write(f"resumed from {ckpt} at step {counters['step']}")

    log = open(run / "log.jsonl", "a") if dist.main else None
    start = counters["step"]
    t0 = time.time() - counters["elapsed_s"]
    invocation_start = time.time()
    shard = dist.shard(a.batch_size) if dist.world > 1 else slice(None)
    kind, n_grid = a.modality, a.teacher_steps
    bar = tqdm(total=a.steps, initial=start, desc=f"lcm {kind} {n_grid}->{a.student_steps} steps", unit="step",
               disable=not (a.progress and dist.main), dynamic_ncols=True)
    losses: list[float] = []
    stopped_early = False

    def student_file(path: Path) -> None:
        cfg["distill"] = {
            "method": "lcm-lora", "paper": "arXiv:2310.04378, arXiv:2311.05556", "modality": kind,
            "student_steps": a.student_steps, "teacher_steps": n_grid, "guidance": a.guidance, "sampler": "lcm",
            "loss": a.loss, "train_steps": counters["step"], "batch_size": a.batch_size, "lr": a.lr,
            "examples": counters["examples"], "pairs": counters.get("pairs", 0), "target": a.target,
            "elapsed_s": round(time.time() - t0, 1), "teacher": str(a.teacher),
            **({"init": str(a.init)} if a.init else {})}  # train_steps/examples count from the warm start
        save_lora(path, lora_tensors_from_peft(pm.state_dict(), "default"), cfg)

    def checkpoint() -> None:
        counters.update(elapsed_s=time.time() - t0, hparams=hp)
        if dist.main:
            _checkpoint(ckpt, dict(zip(names, params)), opt, gen, counters)
            student_file(run / "latest.lora.parquet")  # the student so far, to evaluate while it trains
        dist.barrier()

    for step in range(start, a.steps):
        idx = torch.from_numpy(batch_indices(step, x_all.shape[0], a.batch_size, a.seed))
        x0, tokens = x_all[idx], tok_all[idx]
        b = x0.shape[0]
        drop = torch.rand(b, generator=gen) < a.uncond_prob
        tokens = torch.where(drop[:, None], uncond1.expand(b, -1), tokens)
        dev = dist.device
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        if a.target == "lcd":
            n = torch.randint(1, n_grid + 1, (b,), generator=gen)
            t, s = n.double() / n_grid, (n - 1).double() / n_grid
            eps = torch.randn(x0.shape, generator=gen)
            xt = _noised(x0, t, eps)
            xs_, ts_, ss_, ks_ = xt[shard].to(dev), t[shard].to(dev), s[shard].to(dev), tokens[shard].to(dev)
            un = uncond1.expand(ks_.shape[0], -1).to(dev)
            x_prev = teacher_step(teacher, ks_, un, xs_, ts_.float(), ss_.float(), a.guidance, kind)
            with torch.no_grad():
                target = consistency_x0(_canvas(pm, ks_, x_prev, ss_.float(), kind), x_prev, ss_)
            pred = consistency_x0(_canvas(pm, ks_, xs_, ts_.float(), kind), xs_, ts_)
            per, pairs = lcm_distance(pred, target, a.loss), b
        else:
            # Each example starts at a time of the student's grid; the teacher solves its ODE to t = 0, and every
            # grid time it passes (its start included) becomes a pair (state, that clean sample).
            times = [1 - i / a.student_steps for i in range(a.student_steps)]
            first = torch.randint(0, a.student_steps, (b,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            xt = _noised(x0, torch.tensor([times[i] for i in first.tolist()], dtype=torch.float64), eps)
            pairs = int((a.student_steps - first).sum())
            fs_, xs_, ks_ = first[shard], xt[shard].to(dev), tokens[shard].to(dev)
            inputs, ts, targets, toks = [], [], [], []
            for i in sorted(set(fs_.tolist())):
                sel = (fs_ == i).nonzero().flatten().to(dev)
                un = uncond1.expand(len(sel), -1).to(dev)
                x_end, states = teacher_solve(teacher, ks_[sel], un, xs_[sel], times[i], n_grid, times[i:],
                                              a.guidance, kind)
                for tk, st in states.items():
                    inputs.append(st)
                    ts.append(torch.full((len(sel),), tk, dtype=torch.float64, device=dev))
                    targets.append(x_end)
                    toks.append(ks_[sel])
            xin, tin = torch.cat(inputs), torch.cat(ts)
            pred = consistency_x0(_canvas(pm, torch.cat(toks), xin, tin.float(), kind), xin, tin)
            per = lcm_distance(pred, torch.cat(targets), a.loss)
        # This shard's sum over the global batch's count, times the world size: the ranks' gradient mean is then
        # the one-process gradient of the mean over the whole batch.
        loss = per.sum() * dist.world / pairs
        opt.zero_grad(set_to_none=True)
        loss.backward()
        dist.average_gradients(params)  # the canvas forward is not the module's forward, which DDP wraps
        gnorm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        counters["step"] = step + 1
        counters["examples"] += b
        counters["pairs"] = counters.get("pairs", 0) + pairs
        loss_value = dist.mean(loss.item())
        losses.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if log is not None:
            log.write(json.dumps({"step": step + 1, "loss": loss_value, "grad_norm": float(gnorm),
                                  "lr": lr_at(step, a), "examples": counters["examples"], "pairs": pairs,
                                  "elapsed_s": round(time.time() - t0, 2)}) + "\n")
            log.flush()
        if distributed.end_of_step(step, a, dist, invocation_start, checkpoint):
            stopped_early = True
            break
    bar.close()
    if log is not None:
        log.close()
    done = counters["step"] >= a.steps
    if done and dist.main:
        student_file(Path(a.out))
    dist.barrier()
    tensors = lora_tensors_from_peft(pm.state_dict(), "default")
    return {"steps": counters["step"], "examples": counters["examples"], "elapsed_s": time.time() - t0,
            "losses": losses, "stopped_early": stopped_early, "done": done, "tensors": tensors, "config": cfg,
            "peft_model": pm}


def read_lcm_meta(path: str | Path) -> dict | None:
    """The `distill` entry of an adapter's config (None for an adapter that is not a distilled student)."""
    from .lora import read_lora
    return read_lora(path)[1].get("distill")


__all__ = ["LcmArgs", "distill_lcm", "consistency_x0", "ddim_step_batch", "lcm_distance", "teacher_step",
           "teacher_solve", "sample_lcm", "read_lcm_meta", "MODALITIES", "LOSSES", "TARGETS"]

