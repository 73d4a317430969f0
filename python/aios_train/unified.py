"""Joint training of the unified model: text (MDLM), images and audio (Gaussian, v-prediction) on one backbone.

Every step draws three batches and sums their losses:
  * image batch: canvas [caption (text_length tokens) | image patches];
  * audio batch: canvas [spoken word (text_length tokens) | log-mel frame groups];
  * text batch: corpus windows (max_length tokens), the plain MDLM loss, so the text model does not regress.
Each caption/media pair gets its noise levels independently, in one of three modes per example:
  joint (both noised, independent t's)      -> learns joint generation,
  text -> media (caption clean)              -> learns generation from a prompt; with probability
                                                `cfg_drop` the caption is fully masked instead, which
                                                is the unconditional model of classifier-free guidance,
  media -> text (media clean, t = 0)         -> learns captioning / recognition.
Warm start: the backbone and text head load from a text model's Parquet file (e.g. aios-text-tiny);
the heads and the modality embedding start fresh (zero-initialised where that keeps the text model intact).
Checkpoints, EMA, resume and the time limit are train.py's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import ModelConfig
from .continuous import q_sample, v_target
from .media import image_to_unit
from .model import DiT
from .schedule import EPS, noise, q_xt, subs_masked_nll
from .train import EMA, load_checkpoint, lr_at, save_checkpoint

MODES = ("joint", "to_media", "to_text")


@dataclass
class UnifiedArgs:
    out: str
    data: str = "data/mm"
    corpus_windows: np.ndarray | None = dataclasses.field(default=None, repr=False)
    warm_start: str | None = None          # text model Parquet to initialise backbone + text head from
    tokenizer: str = "models/aios-text-tiny/tokenizer.json"
    text_length: int = 12
    steps: int = 4000
    image_batch: int = 32
    audio_batch: int = 16
    text_batch: int = 8
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup: int = 200
    grad_clip: float = 1.0
    ema: float = 0.999
    cfg_drop: float = 0.1
    mode_probs: tuple[float, float, float] = (0.3, 0.5, 0.2)
    audio_mode_probs: tuple[float, float, float] | None = None   # None: mode_probs
    # Training times of audio, shifted towards noise: t -> s t / (1 + (s - 1) t) (SD3's resolution shift,
    # Esser et al. 2024). A clip has 8x an image's values, so its word is readable from the noisy clip down to
    # t ~ 0.95 and the caption only matters above it; s > 1 spends more training there. 1 = uniform.
    audio_t_shift: float = 1.0
    probe_every: int = 100                 # log how much the right caption lowers the media loss (0 = never)
    media_weight: float = 1.0
    seed: int = 0
    threads: int = 2
    ckpt_every: int = 100
    time_limit_min: float | None = None
    progress: bool = True
    image_size: int = 28
    image_patch: int = 4
    # Architecture when not warm-starting.
    hidden_size: int = 256
    n_layers: int = 4
    n_heads: int = 4
    cond_dim: int = 128

    def hparams(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("corpus_windows", "progress")}
        d["mode_probs"] = list(self.mode_probs)
        d["audio_mode_probs"] = None if self.audio_mode_probs is None else list(self.audio_mode_probs)
        return d


def unified_config(base: ModelConfig | None, a: UnifiedArgs, audio: dict, vocab_size: int = 4096) -> ModelConfig:
    d = base.to_dict() if base is not None else dict(
        vocab_size=vocab_size, hidden_size=a.hidden_size, n_layers=a.n_layers, n_heads=a.n_heads, cond_dim=a.cond_dim,
        max_length=128, mask_token_id=3)
    d.update(image_size=a.image_size, image_channels=1, image_patch=a.image_patch, audio_mels=audio["n_mels"], audio_frames=audio["frames"],
             audio_frames_per_token=4, audio_sample_rate=audio["sample_rate"], audio_n_fft=audio["n_fft"],
             audio_hop=audio["hop"])
    return ModelConfig.from_dict(d)


def caption_tokens(tok, captions: list[str], length: int, cfg: ModelConfig) -> torch.Tensor:
    """[BOS] caption [EOS] [PAD]... of exactly `length` tokens per caption."""
    out = torch.full((len(captions), length), cfg.pad_token_id, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = [cfg.bos_token_id] + tok.encode(c, add_special_tokens=False).ids + [cfg.eos_token_id]
        if len(ids) > length:
            raise ValueError(f"caption {c!r} takes {len(ids)} tokens > text_length {length}")
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def pair_loss(model: DiT, text: torch.Tensor, media: torch.Tensor, kind: str, a: UnifiedArgs,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(text loss, media loss) of one caption/media batch under the three training modes."""
    cfg = model.config
    b = text.shape[0]
    probs = a.audio_mode_probs if kind == "audio" and a.audio_mode_probs is not None else a.mode_probs
    mode = torch.multinomial(torch.tensor(probs), b, replacement=True, generator=gen)
    t_text = (1 - EPS) * torch.rand(b, generator=gen) + EPS
    t_media = torch.rand(b, generator=gen).clamp_min(1e-4)
    if kind == "audio" and a.audio_t_shift != 1.0:
        s = a.audio_t_shift
        t_media = s * t_media / (1 + (s - 1) * t_media)
    t_text = torch.where(mode == 1, torch.zeros(b), t_text)          # text -> media: caption given
    drop = (mode == 1) & (torch.rand(b, generator=gen) < a.cfg_drop)
    t_text = torch.where(drop, torch.ones(b), t_text)                 # ... or fully masked (CFG's unconditional)
    t_media = torch.where(mode == 2, torch.zeros(b), t_media)         # media -> text: media given
    move = torch.where(drop, torch.ones(b), (1 - EPS) * t_text)
    xt = q_xt(text, move, cfg.mask_token_id, gen)
    eps = torch.randn(media.shape, generator=gen)
    noisy = q_sample(media, t_media, eps)
    kw = {"image": noisy, "t_image": t_media} if kind == "image" else {"audio": noisy, "t_audio": t_media}
    out = model.forward_canvas(xt, **kw)
    nll = subs_masked_nll(out["text"], text, xt, cfg.mask_token_id)
    weight = torch.where(t_text > 0, 1.0 / t_text.clamp_min(EPS), torch.zeros(b))
    weight = torch.where(drop, torch.zeros(b), weight)               # a dropped caption is not a text target
    text_loss = (nll * weight[:, None]).mean()
    err = (out[kind] - v_target(media, t_media, eps)) ** 2
    per = err.flatten(1).mean(1)
    media_loss = (per * (t_media > 0)).sum() / (t_media > 0).sum().clamp_min(1)
    return text_loss, media_loss


@torch.no_grad()
def caption_gap(model: DiT, caps: torch.Tensor, x: torch.Tensor, y: torch.Tensor, kind: str, t: float = 0.8) -> float:
    """v-MSE with another class's caption minus v-MSE with the right one, at one noise level.

    The total loss cannot show whether the denoiser reads its prompt (the unconditional part dominates it); this
    gap can: it is ~0 for a denoiser that ignores the caption. Probe where the noisy input alone does not give the
    class away: images at t = 0.8, audio at t = 0.95 (the shipped model: image 0.081; audio 0.0002 at 0.8,
    0.0013 at 0.95, 0.062 at 0.99)."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    eps = torch.randn(x.shape, generator=gen)
    tt = torch.full((x.shape[0],), t)
    noisy, target = q_sample(x, tt, eps), v_target(x, tt, eps)
    kw = {"image": noisy, "t_image": tt} if kind == "image" else {"audio": noisy, "t_audio": tt}
    mse = [((model.forward_canvas(caps[labels], **kw)[kind] - target) ** 2).mean().item() for labels in (y, (y + 1) % 10)]
    model.train(was)
    return mse[1] - mse[0]


def load_mm(data: str | Path) -> tuple[dict, dict, dict]:
    data = Path(data)
    if not (data / "images.npz").exists() or not (data / "audio.npz").exists():
        raise FileNotFoundError(f"{data}: no images.npz/audio.npz; run `python -m aios_train data-mm --out {data}`")
    imgs = dict(np.load(data / "images.npz"))
    aud = dict(np.load(data / "audio.npz"))
    info = json.loads((data / "SOURCES.json").read_text())
    return imgs, aud, info


def train_unified(a: UnifiedArgs, resume: bool = True) -> dict:
    from .export import load_model
    from .mmdata import DIGIT_WORDS, FASHION_CAPTIONS
    from .tokenizer import load_tokenizer
    if not (math.isfinite(a.audio_t_shift) and a.audio_t_shift > 0):
        raise ValueError(f"audio_t_shift must be a finite number > 0, got {a.audio_t_shift}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    out, ckpt = Path(a.out), Path(a.out) / "ckpt"
    out.mkdir(parents=True, exist_ok=True)
    imgs, aud, info = load_mm(a.data)
    tok = load_tokenizer(a.tokenizer)
    base_model, base_cfg = load_model(a.warm_start) if a.warm_start else (None, None)
    cfg = unified_config(base_cfg, a, info["audio"]["features"], vocab_size=tok.get_vocab_size())
    model = DiT(cfg)
    if base_model is not None:
        missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
        assert not unexpected, unexpected
        assert all(k.split(".")[0] in ("modality_embed", "image_head", "audio_head") for k in missing), missing
    model.train()
    img_x = torch.from_numpy(image_to_unit(imgs["train_x"]))[:, None]
    img_y = torch.from_numpy(imgs["train_y"])
    aud_x = torch.from_numpy(aud["train_x"].astype(np.float32))
    aud_y = torch.from_numpy(aud["train_y"])
    # Two phrasings per class, so the model does not tie a class to one exact token string.
    img_caps = [caption_tokens(tok, FASHION_CAPTIONS, a.text_length, cfg),
                caption_tokens(tok, [c.split(" ", 1)[-1] if c.startswith(("a ", "an ")) else c for c in FASHION_CAPTIONS],
                               a.text_length, cfg)]
    aud_caps = [caption_tokens(tok, DIGIT_WORDS, a.text_length, cfg),
                caption_tokens(tok, [f"the number {w}" for w in DIGIT_WORDS], a.text_length, cfg)]
    probe_img = (torch.from_numpy(image_to_unit(imgs["test_x"][:64]))[:, None], torch.from_numpy(imgs["test_y"][:64]))
    probe_aud = (torch.from_numpy(aud["test_x"][::12][:64].astype(np.float32)), torch.from_numpy(aud["test_y"][::12][:64]))
    corpus = None if a.corpus_windows is None else torch.from_numpy(np.ascontiguousarray(a.corpus_windows, dtype=np.int64))

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ema = EMA(model, a.ema)
    gen = torch.Generator().manual_seed(a.seed)
    counters = {"step": 0, "images": 0, "clips": 0, "tokens": 0, "elapsed_s": 0.0}
    if resume and (ckpt / "state.json").exists():
        prev = json.loads((ckpt / "state.json").read_text())
        if prev.get("config") != cfg.to_dict():
            raise ValueError(f"train-unified: checkpoint in {ckpt} has a different model config; use a new --out")
        counters = load_checkpoint(ckpt, model, ema, opt, gen)
        tqdm.write(f"resumed from {ckpt} at step {counters['step']}")
    log = open(out / "log.jsonl", "a")
    t0 = time.time() - counters["elapsed_s"]
    inv0 = time.time()
    bar = tqdm(total=a.steps, initial=counters["step"], desc="train-unified", unit="step", disable=not a.progress,
               dynamic_ncols=True)

    def checkpoint() -> None:
        counters.update(elapsed_s=time.time() - t0, config=cfg.to_dict(), hparams=a.hparams())
        save_checkpoint(ckpt, model, ema, opt, gen, counters)

    stopped = False
    for step in range(counters["step"], a.steps):
        # The batch composition is a function of (seed, step), so a resumed run draws the same data.
        rng = np.random.default_rng([a.seed, step])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, a)
        ii = torch.from_numpy(rng.integers(0, len(img_y), a.image_batch))
        ai = torch.from_numpy(rng.integers(0, len(aud_y), a.audio_batch))
        cap = img_caps[int(rng.integers(0, 2))]
        acap = aud_caps[int(rng.integers(0, 2))]
        lt_i, lm_i = pair_loss(model, cap[img_y[ii]], img_x[ii], "image", a, gen)
        lt_a, lm_a = pair_loss(model, acap[aud_y[ai]], aud_x[ai], "audio", a, gen)
        loss = lt_i + lt_a + a.media_weight * (lm_i + lm_a)
        rec = {"step": step + 1, "img_text": lt_i.item(), "img_v": lm_i.item(), "aud_text": lt_a.item(), "aud_v": lm_a.item()}
        if corpus is not None and a.text_batch > 0:
            from .schedule import diffusion_loss
            x0 = corpus[torch.from_numpy(rng.integers(0, len(corpus), a.text_batch))]
            nll, _ = diffusion_loss(model, x0, cfg.mask_token_id, gen)
            lt = nll.mean()
            loss = loss + lt
            rec["corpus"] = lt.item()
            counters["tokens"] += x0.numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.grad_clip)
        opt.step()
        ema.update(model)
        counters["step"] = step + 1
        counters["images"] += a.image_batch
        counters["clips"] += a.audio_batch
        rec.update(loss=loss.item(), grad_norm=float(gnorm), lr=lr_at(step, a), elapsed_s=round(time.time() - t0, 1))
        if a.probe_every and (step + 1) % a.probe_every == 0:
            rec["img_gap"] = caption_gap(model, img_caps[0], *probe_img, "image")
            rec["aud_gap"] = caption_gap(model, aud_caps[0], *probe_aud, "audio", t=0.95)
            tqdm.write(f"step {step + 1}: caption gap (wrong - right v-MSE) image {rec['img_gap']:.4f} (t=0.8) "
                       f"audio {rec['aud_gap']:.4f} (t=0.95)")
        log.write(json.dumps(rec) + "\n")
        log.flush()
        bar.update(1)
        bar.set_postfix(img_v=f"{lm_i.item():.3f}", aud_v=f"{lm_a.item():.3f}", txt=f"{rec.get('corpus', 0):.2f}")
        last = step + 1 == a.steps
        if a.time_limit_min is not None and time.time() - inv0 > 60 * a.time_limit_min and not last:
            tqdm.write(f"time limit {a.time_limit_min} min reached at step {step + 1}; checkpointing and stopping")
            checkpoint()
            stopped = True
            break
        if (step + 1) % a.ckpt_every == 0 or last:
            checkpoint()
    bar.close()
    log.close()
    return {"steps": counters["step"], "stopped_early": stopped, "model": model, "ema": ema, "config": cfg}


def load_unified_ema(run: str | Path) -> tuple[DiT, ModelConfig]:
    from safetensors.torch import load_file
    ckpt = Path(run) / "ckpt"
    counters = json.loads((ckpt / "state.json").read_text())
    cfg = ModelConfig.from_dict(counters["config"])
    t = load_file(str(ckpt / "state.safetensors"))
    model = DiT(cfg)
    model.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("ema/")}, strict=True)
    model.eval()
    return model, cfg
