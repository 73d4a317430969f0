"""aios_train command line: data, tokenizer, train, export, eval, convert-mdlm, sample, lora, patch, distill,
import-peft and more.

Run `python -m aios_train <command> --help` for the options of each command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_TARGETS = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")  # = aios_train.lora.DEFAULT_TARGETS (no torch import here)


def cmd_data(a) -> None:
    from .data import build_corpus
    summary = build_corpus(a.out, seed=a.seed, valid_fraction=a.valid_fraction, sources=a.sources)
    print(json.dumps(summary, indent=2))


def cmd_data_mm(a) -> None:
    from .mmdata import build
    s = build(a.out, threads=a.threads)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk in ("package", "train", "test")} if isinstance(v, dict) else v
                      for k, v in s.items() if k in ("images", "audio")}, indent=2))


def probs3(s: str) -> tuple[float, float, float]:
    """'0.3,0.5,0.2' -> three probabilities that sum to 1."""
    import argparse
    try:
        p = tuple(float(v) for v in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected three comma-separated numbers") from None
    if len(p) != 3 or min(p) < 0 or abs(sum(p) - 1) > 1e-6:
        raise argparse.ArgumentTypeError(f"{s!r}: expected three non-negative numbers that sum to 1")
    return p


def cmd_train_unified(a) -> None:
    import torch
    from .tokenizer import load_tokenizer
    from .unified import UnifiedArgs, train_unified
    from .windows import windows_from_jsonl

    torch.set_num_threads(a.threads)
    windows = None
    if a.corpus and a.text_batch > 0:
        windows = windows_from_jsonl(a.corpus, load_tokenizer(a.tokenizer), 128)
        print(f"corpus windows {windows.shape}", file=sys.stderr)
    args = UnifiedArgs(out=a.out, data=a.data, corpus_windows=windows, warm_start=a.warm_start, tokenizer=a.tokenizer,
                       steps=a.steps, image_batch=a.image_batch, audio_batch=a.audio_batch, text_batch=a.text_batch,
                       lr=a.lr, warmup=a.warmup, seed=a.seed, threads=a.threads, ckpt_every=a.ckpt_every,
                       time_limit_min=a.time_limit_min, mode_probs=a.mode_probs, audio_mode_probs=a.audio_mode_probs,
                       probe_every=a.probe_every, audio_t_shift=a.audio_t_shift)
    r = train_unified(args)
    print(json.dumps({k: r[k] for k in ("steps", "stopped_early")}))


def cmd_calibrate_uncertainty(a) -> None:
    from .tokenizer import load_tokenizer
    from .uncertainty import InfillTask, calibrate, parse_weights
    from .windows import windows_from_jsonl

    task = InfillTask(steps=a.steps)
    tok = load_tokenizer(Path(a.model) / "tokenizer.json")
    windows = windows_from_jsonl(a.data, tok, task.length + 1)
    if len(windows) < a.windows:
        raise SystemExit(f"{a.data}: {len(windows)} windows of {task.length + 1} tokens, fewer than --windows {a.windows}")
    cal = calibrate(a.model, windows[: a.windows], task, a.quantile, a.threads,
                    source=f"{a.data}, first {a.windows} windows", weights=parse_weights(a.weights))
    print(json.dumps(cal, indent=2))


def cmd_train_memory(a) -> None:
    import numpy as np
    import torch
    from .data import read_jsonl
    from .export import load_model
    from .memory_pairs import memory_windows
    from .tokenizer import load_tokenizer
    from .train import TrainArgs, train
    from .windows import windows_from_jsonl

    torch.set_num_threads(a.threads)
    _, cfg = load_model(a.warm_start)
    tok = load_tokenizer(a.tokenizer)
    leads = [d["text"] for d in read_jsonl(a.train) if d.get("source") == "wikipedia"]
    mw, mk = memory_windows(leads, tok, cfg.max_length, a.memory_tokens, a.distractors, a.drop, a.copies, a.seed)
    cw = windows_from_jsonl(a.train, tok, cfg.max_length)
    n_corpus = int(round(len(mw) * (1 - a.memory_share) / a.memory_share)) if a.memory_share < 1 else 0
    cw = cw[np.random.default_rng(a.seed).choice(len(cw), min(n_corpus, len(cw)), replace=False)]
    windows = np.concatenate([mw, cw])
    keep = np.concatenate([mk, np.zeros(cw.shape, dtype=bool)])
    print(f"{len(mw)} memory windows from {len(leads)} leads + {len(cw)} corpus windows", file=sys.stderr)
    vw = windows_from_jsonl(a.valid, tok, cfg.max_length) if a.valid else None
    args = TrainArgs(out=a.out, train_windows=windows, train_keep=keep, valid_windows=vw, warm_start=a.warm_start,
                     vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                     cond_dim=cfg.cond_dim, max_length=cfg.max_length, mask_token_id=cfg.mask_token_id,
                     time_conditioning=cfg.time_conditioning, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                     warmup=a.warmup, seed=a.seed, threads=a.threads, eval_every=a.eval_every,
                     ckpt_every=a.ckpt_every, time_limit_min=a.time_limit_min)
    r = train(args)
    print(json.dumps({k: r[k] for k in ("steps", "tokens", "stopped_early")}))


def cmd_evolve(a) -> None:
    import aios_rt
    from .evolution import EvolveConfig, Evolver
    from .lora import read_documents

    texts = read_documents(a.data)
    if not texts:
        raise SystemExit(f"{a.data}: no documents")
    prompt = a.prompt or " ".join(texts[0].split()[:4])
    mem = aios_rt.MemoryStore(a.memory)
    eng = aios_rt.Engine(a.model, threads=a.threads, memory=mem)
    cfg = EvolveConfig(lora_steps=a.lora_steps, lora_minutes=a.lora_minutes, lora_lr=a.lora_lr,
                       patch_steps=a.patch_steps, patch_minutes=a.patch_minutes, patch_top_k=a.patch_top_k,
                       levels=tuple(a.levels.split(",")), improve_margin=a.improve_margin,
                       general_bound=a.general_bound, threads=a.threads or 1, force=a.force)
    ev = Evolver(engine=eng, memory=mem, skills=a.skills, general_data=a.general, config=cfg)
    rep = ev.step(prompt, texts)
    for lv in rep.levels:
        print(f"{lv.level}: {lv.outcome} ({lv.seconds:.1f} s) - {lv.reason}", file=sys.stderr)
    if rep.kept:
        g = ev.generate(prompt, length=64, steps=32, seed=0)
        print(f"after: skills {g.skills}, adapters {g.adapters}, patch {g.patch}, uncertainty {g.uncertainty:.3f}, "
              f"should_evolve {g.should_evolve}", file=sys.stderr)
    print(json.dumps(rep.to_dict(), indent=2, default=float))
    ev.close()


def cmd_tokenizer(a) -> None:
    from .tokenizer import train_tokenizer
    tok = train_tokenizer(a.train, a.out, vocab_size=a.vocab_size, min_frequency=a.min_frequency)
    print(f"wrote {a.out} (vocab {tok.get_vocab_size()})")


def cmd_train(a) -> None:
    import torch
    from .tokenizer import MASK_ID, load_tokenizer
    from .train import TrainArgs, train
    from .windows import windows_from_jsonl

    torch.set_num_threads(a.threads)
    tok = load_tokenizer(a.tokenizer)
    tw = windows_from_jsonl(a.train, tok, a.max_length)
    vw = windows_from_jsonl(a.valid, tok, a.max_length) if a.valid else None
    print(f"train windows {tw.shape}, valid windows {None if vw is None else vw.shape}", file=sys.stderr)
    args = TrainArgs(out=a.out, train_windows=tw, valid_windows=vw, vocab_size=tok.get_vocab_size(),
                     hidden_size=a.hidden_size, n_layers=a.n_layers, n_heads=a.n_heads, cond_dim=a.cond_dim,
                     max_length=a.max_length, mask_token_id=MASK_ID, time_conditioning=a.time_conditioning,
                     ar=a.ar, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
                     min_lr_ratio=a.min_lr_ratio, grad_clip=a.grad_clip, ema=a.ema, seed=a.seed, threads=a.threads,
                     eval_every=a.eval_every, eval_windows=a.eval_windows, ckpt_every=a.ckpt_every,
                     time_limit_min=a.time_limit_min, stop_after=a.stop_after, device=a.device)
    r = train(args, resume=not a.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:  # one summary from a torchrun job
        print(json.dumps({k: r[k] for k in ("steps", "tokens", "elapsed_s", "stopped_early")}))


def cmd_export(a) -> None:
    from .export import save_model
    from .train import load_ema_model
    model, cfg = load_ema_model(a.checkpoint, use_ema=not a.no_ema)
    save_model(model, cfg, a.out, dtype=a.dtype)
    print(f"wrote {a.out} ({'raw' if a.no_ema else 'EMA'} weights, {a.dtype}, {model.num_parameters():,} params)")


def cmd_eval(a) -> None:
    from .eval_file import evaluate_file
    import torch
    torch.set_num_threads(a.threads)
    r = evaluate_file(a.model, a.data, a.tokenizer, n_t=a.n_t, seed=a.seed, batch_size=a.batch_size, max_windows=a.max_windows,
                      lora=a.lora, lora_weight=a.lora_weight, source=a.source)
    print(json.dumps(r, indent=2))


def cmd_convert(a) -> None:
    from .convert_mdlm import convert_mdlm
    cfg = convert_mdlm(a.checkpoint, a.config, a.out, mask_token_id=a.mask_token_id, use_ema=a.ema,
                       vocab_size=a.vocab_size, pad_token_id=a.pad_token_id, bos_token_id=a.bos_token_id,
                       eos_token_id=a.eos_token_id)
    print(f"wrote {a.out}: {cfg.to_json()}")


def cmd_sample(a) -> None:
    import torch
    from .export import load_model
    from .sample import sample_texts
    from .tokenizer import load_tokenizer
    torch.set_num_threads(a.threads)
    model, cfg = load_model(a.model)
    tok = load_tokenizer(a.tokenizer)
    for t in sample_texts(model, cfg, tok, n=a.n, length=a.length, steps=a.steps, seed=a.seed, prompt=a.prompt):
        print(json.dumps(t, ensure_ascii=False))


def cmd_lora(a) -> None:
    from .lora import LoraTrainArgs, train_lora
    r = train_lora(LoraTrainArgs(
        base=a.base, data=a.data, out=a.out, rank=a.rank, alpha=a.alpha, target_modules=a.target_modules,
        use_rslora=a.rslora, dropout=a.dropout, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup,
        min_lr_ratio=a.min_lr_ratio, weight_decay=a.weight_decay, grad_clip=a.grad_clip, seed=a.seed,
        threads=a.threads, valid_fraction=a.valid_fraction, valid_data=a.valid_data, source=a.source,
        tokenizer=a.tokenizer, eval_windows=a.eval_windows, eval_n_t=a.eval_n_t, save_peft=a.save_peft,
        time_limit_min=a.time_limit_min, device=a.device))
    if int(os.environ.get("RANK", "0")) != 0:  # one summary from a torchrun job
        return
    print(json.dumps({"out": a.out, "steps": r["steps"], "train_s": round(r["train_s"], 1),
                      "val_nats_before": r["val_nats_before"], "val_nats_after": r["val_nats_after"],
                      "target_modules": r["config"]["target_modules"]}))


def cmd_patch(a) -> None:
    from .selective import PatchTrainArgs, train_patch
    r = train_patch(PatchTrainArgs(
        base=a.base, data=a.data, out=a.out, valid_data=a.valid_data, valid_fraction=a.valid_fraction,
        top_k=a.top_k, modules=a.modules.split(",") if a.modules else None, steps=a.steps, batch_size=a.batch_size,
        lr=a.lr, warmup=a.warmup, seed=a.seed, threads=a.threads, eval_n_t=a.eval_n_t,
        time_limit_min=a.time_limit_min))
    print(json.dumps({"out": a.out, "modules": r["modules"], "steps": r["steps"], "train_s": round(r["train_s"], 1),
                      "val_nats_before": r["val_nats_before"], "val_nats_after": r["val_nats_after"]}))


def cmd_distill(a) -> None:
    import torch
    from .distill import DistillArgs, distill, teacher_path
    from .tokenizer import load_tokenizer
    from .windows import windows_from_jsonl

    if a.modality != "text":
        return cmd_distill_lcm(a)
    if a.init:
        raise SystemExit("distill: --init is for image/audio students (an LCM-LoRA); a text student resumes from its run folder")
    torch.set_num_threads(a.threads)
    tpath = teacher_path(a.teacher)
    tok = load_tokenizer(a.tokenizer or str(tpath.parent / "tokenizer.json"))
    from .export import read_metadata
    max_length = json.loads(read_metadata(tpath)["aios.config"])["max_length"]
    tw = windows_from_jsonl(a.train, tok, max_length)
    r = distill(DistillArgs(
        teacher=a.teacher, out=a.out, run=a.run_dir, train_windows=tw, teacher_steps=a.teacher_steps or 64,
        student_steps=a.student_steps, distill_steps=a.distill_steps, round_steps=a.round_steps,
        loss=a.loss or "kl-bwd", batch_size=a.batch_size, lr=a.lr, warmup=20 if a.warmup is None else a.warmup, grad_clip=a.grad_clip, ema=a.ema, seed=a.seed,
        threads=a.threads, ckpt_every=a.ckpt_every, time_limit_min=a.time_limit_min, stop_after=a.stop_after,
        device=a.device), resume=not a.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": a.out if r["done"] else None, "steps": r["steps"], "rounds": r["rounds"],
                          "tokens": r["tokens"], "elapsed_s": round(r["elapsed_s"], 1),
                          "stopped_early": r["stopped_early"]}))


def cmd_distill_lcm(a) -> None:
    from .lcm import LcmArgs, distill_lcm
    r = distill_lcm(LcmArgs(
        teacher=a.teacher, out=a.out, data=a.data, modality=a.modality, run=a.run_dir, tokenizer=a.tokenizer,
        text_length=a.text_length, teacher_steps=a.teacher_steps, student_steps=a.student_steps, guidance=a.guidance,
        loss=a.loss or "l2", rank=a.rank, alpha=float(a.rank if a.alpha is None else a.alpha), steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup=50 if a.warmup is None else a.warmup, grad_clip=a.grad_clip,
        seed=a.seed, threads=a.threads, ckpt_every=a.ckpt_every, time_limit_min=a.time_limit_min,
        stop_after=a.stop_after, device=a.device, init=a.init), resume=not a.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": a.out if r["done"] else None, "steps": r["steps"], "examples": r["examples"],
                          "elapsed_s": round(r["elapsed_s"], 1), "stopped_early": r["stopped_early"]}))


def cmd_controlnet(a) -> None:
    from .controlnet import ControlNetArgs, train_controlnet
    r = train_controlnet(ControlNetArgs(
        base=a.base, control=a.control, out=a.out, run=a.run_dir, data=a.data, n_blocks=a.n_blocks, rank=a.rank,
        alpha=a.alpha, steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup=a.warmup, seed=a.seed,
        threads=a.threads, text_length=a.text_length, ckpt_every=a.ckpt_every, time_limit_min=a.time_limit_min,
        device=a.device, init=a.init), resume=not a.no_resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"out": a.out if r["done"] else None, "steps": r["steps"], "params": r["params"],
                          "base_params": r["base_params"], "stopped_early": r["stopped_early"]}))


def cmd_classifier(a) -> None:
    from .classifier import train_classifier
    cfg = train_classifier(a.data, a.out, epochs=a.epochs, seed=a.seed, threads=a.threads)
    print(json.dumps({"out": a.out, "test_accuracy": cfg["test_accuracy"], "train_s": cfg["train_s"]}))


def cmd_import_peft(a) -> None:
    from .lora import import_peft
    tensors, cfg = import_peft(a.folder, a.base, a.out)
    print(f"wrote {a.out}: rank {cfg['rank']}, alpha {cfg['alpha']}, rslora {cfg['use_rslora']}, "
          f"{len(cfg['target_modules'])} modules, base {cfg['base_fingerprint']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aios_train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("data", help="fetch the offline sources and build data/corpus/{train,valid}.jsonl")
    s.add_argument("--out", default="data", help="output folder (raw/ cache and corpus/)")
    s.add_argument("--seed", type=int, default=0, help="seed of the document-level split")
    s.add_argument("--valid-fraction", type=float, default=0.02)
    s.add_argument("--sources", nargs="*", help="subset of: wikipedia austen bible-kjv fortunes")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("data-mm", help="Fashion-MNIST images and espeak-ng spoken number words -> data/mm/*.npz")
    s.add_argument("--out", default="data/mm")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(fn=cmd_data_mm)

    s = sub.add_parser("train-unified", help="joint text + image + audio training of the unified model (resumable)")
    s.add_argument("--out", required=True)
    s.add_argument("--data", default="data/mm")
    s.add_argument("--corpus", default="data/corpus/train.jsonl", help="text windows mixed in ('' = none)")
    s.add_argument("--warm-start", default="models/aios-text-tiny/model.f32.parquet")
    s.add_argument("--tokenizer", default="models/aios-text-tiny/tokenizer.json")
    s.add_argument("--steps", type=int, default=4000)
    s.add_argument("--image-batch", type=int, default=32)
    s.add_argument("--audio-batch", type=int, default=16)
    s.add_argument("--mode-probs", type=probs3, default=(0.3, 0.5, 0.2),
                   help="per caption/media pair: P(joint), P(caption -> media), P(media -> caption)")
    s.add_argument("--audio-mode-probs", type=probs3, default=None, help="the same for speech (default: --mode-probs)")
    s.add_argument("--probe-every", type=int, default=100, help="log the caption gap every N steps (0 = never)")
    s.add_argument("--audio-t-shift", type=float, default=1.0,
                   help="shift audio training times towards noise, t -> s t / (1 + (s - 1) t) (1 = uniform)")
    s.add_argument("--text-batch", type=int, default=8)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--warmup", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--ckpt-every", type=int, default=100)
    s.add_argument("--time-limit-min", type=float, default=None)
    s.set_defaults(fn=cmd_train_unified)

    s = sub.add_parser("calibrate-uncertainty",
                       help="fit the runtime's uncertainty scale and should_evolve threshold -> <model>/uncertainty.json")
    s.add_argument("--model", required=True, help="model folder")
    s.add_argument("--data", default="data/corpus/valid.jsonl", help="held-out in-domain text (jsonl)")
    s.add_argument("--windows", type=int, default=200, help="infilling cases (the first N windows)")
    s.add_argument("--steps", type=int, default=24)
    s.add_argument("--quantile", type=float, default=0.975, help="share of in-domain generations below the threshold")
    s.add_argument("--weights", default=None, help="component weights, e.g. entropy=1,surprisal=1,nll=1 (components "
                                                   "left out count 0; default: all 1)")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(fn=cmd_calibrate_uncertainty)

    s = sub.add_parser("train-memory", help="teach a text model to use memories in front of its prompt (warm start)")
    s.add_argument("--warm-start", required=True, help="the text model's .parquet (its config is kept)")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", default="data/tokenizer.json")
    s.add_argument("--train", default="data/corpus/train.jsonl")
    s.add_argument("--valid", default="data/corpus/valid.jsonl")
    s.add_argument("--memory-share", type=float, default=0.5, help="share of windows with memories (rest: corpus)")
    s.add_argument("--memory-tokens", type=int, default=40, help="tokens of an article's opening kept as its memory")
    s.add_argument("--distractors", type=int, default=1, help="other articles' memories in each window")
    s.add_argument("--drop", type=float, default=0.2, help="probability that the article's own memory is left out")
    s.add_argument("--copies", type=int, default=2, help="layouts (distractor draws) per lead")
    s.add_argument("--steps", type=int, default=2000)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=3e-4)
    s.add_argument("--warmup", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--eval-every", type=int, default=250)
    s.add_argument("--ckpt-every", type=int, default=100)
    s.add_argument("--time-limit-min", type=float, default=None)
    s.set_defaults(fn=cmd_train_memory)

    s = sub.add_parser("evolve", help="one pass of the self-evolution loop: uncertain? -> L0 memories -> L2 LoRA -> "
                                      "L3 tensor patch -> validate -> store a skill")
    s.add_argument("--model", required=True, help="model folder")
    s.add_argument("--memory", required=True, help="memory store folder (created if missing)")
    s.add_argument("--skills", required=True, help="skills folder: adapters + skill cards (created if missing)")
    s.add_argument("--data", required=True, help="the new domain: .txt / .jsonl file or folder of them")
    s.add_argument("--prompt", default=None, help="the prompt that was uncertain (default: the data's first words)")
    s.add_argument("--general", default="data/corpus/valid.jsonl", help="general held-out text for the bound")
    s.add_argument("--lora-steps", type=int, default=200)
    s.add_argument("--lora-minutes", type=float, default=5.0)
    s.add_argument("--lora-lr", type=float, default=2e-3)
    s.add_argument("--patch-steps", type=int, default=200)
    s.add_argument("--patch-minutes", type=float, default=5.0)
    s.add_argument("--patch-top-k", type=int, default=4, help="L3: block modules unfrozen")
    s.add_argument("--levels", default="L0,L1,L2,L3", help="levels to try, cheapest first (L1 only for JSON records)")
    s.add_argument("--improve-margin", type=float, default=0.05, help="nats/token the context must improve by")
    s.add_argument("--general-bound", type=float, default=0.02, help="nats/token general text may degrade by")
    s.add_argument("--force", action="store_true", help="adapt even when the engine is confident")
    s.add_argument("--threads", type=int, default=None)
    s.set_defaults(fn=cmd_evolve)

    s = sub.add_parser("tokenizer", help="train the byte-level BPE ([PAD]=0 [BOS]=1 [EOS]=2 [MASK]=3)")
    s.add_argument("--train", default="data/corpus/train.jsonl")
    s.add_argument("--out", default="data/tokenizer.json")
    s.add_argument("--vocab-size", type=int, default=4096)
    s.add_argument("--min-frequency", type=int, default=2)
    s.set_defaults(fn=cmd_tokenizer)

    s = sub.add_parser("train", help="MDLM masked-diffusion pretraining (or --ar for the causal baseline)")
    s.add_argument("--train", default="data/corpus/train.jsonl")
    s.add_argument("--valid", default="data/corpus/valid.jsonl", help="'' to disable periodic validation")
    s.add_argument("--tokenizer", default="data/tokenizer.json")
    s.add_argument("--out", required=True, help="run folder (checkpoints in OUT/ckpt, log in OUT/log.jsonl)")
    s.add_argument("--ar", action="store_true", help="autoregressive baseline: causal attention, next-token loss")
    s.add_argument("--hidden-size", type=int, default=256)
    s.add_argument("--n-layers", type=int, default=4)
    s.add_argument("--n-heads", type=int, default=4)
    s.add_argument("--cond-dim", type=int, default=128)
    s.add_argument("--max-length", type=int, default=128)
    s.add_argument("--time-conditioning", action="store_true")
    s.add_argument("--steps", type=int, default=1000)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--warmup", type=int, default=100)
    s.add_argument("--min-lr-ratio", type=float, default=0.1)
    s.add_argument("--grad-clip", type=float, default=1.0)
    s.add_argument("--ema", type=float, default=0.999)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    s.add_argument("--eval-every", type=int, default=250)
    s.add_argument("--eval-windows", type=int, default=64)
    s.add_argument("--ckpt-every", type=int, default=100)
    s.add_argument("--time-limit-min", type=float, default=None,
                   help="safety stop with a checkpoint after this many minutes of this invocation")
    s.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    s.add_argument("--stop-after", type=int, default=None,
                   help="checkpoint and stop after this global step (an interruption; resume with the same command)")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="under torchrun: one process per device, gloo on cpu, NCCL on cuda; --batch-size is global")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("export", help="training checkpoint -> aios Parquet (EMA weights by default)")
    s.add_argument("checkpoint", help="run folder or its ckpt/ folder")
    s.add_argument("--out", required=True)
    s.add_argument("--dtype", default="f32", choices=["f32", "f16", "bf16"])
    s.add_argument("--no-ema", action="store_true", help="export the raw (non-EMA) weights")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("eval", help="diffusion perplexity bound (NELBO) or AR perplexity on held-out data")
    s.add_argument("model", help="aios .parquet model")
    s.add_argument("--data", default="data/corpus/valid.jsonl")
    s.add_argument("--tokenizer", default="data/tokenizer.json")
    s.add_argument("--n-t", type=int, default=16, help="stratified t samples per window (diffusion)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--max-windows", type=int, default=None)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--lora", default=None, help="evaluate the model with this LoRA adapter (.lora.parquet) applied")
    s.add_argument("--lora-weight", type=float, default=1.0)
    s.add_argument("--source", default=None, help="only documents whose 'source' field equals this")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("convert-mdlm", help="MDLM checkpoint (.safetensors / .pt / .ckpt) -> aios Parquet")
    s.add_argument("checkpoint")
    s.add_argument("--config", required=True, help="MDLM config (JSON or YAML) with model.hidden_size etc.")
    s.add_argument("--mask-token-id", type=int, required=True)
    s.add_argument("--vocab-size", type=int, default=None, help="checked against the embedding shape")
    s.add_argument("--pad-token-id", type=int, default=0)
    s.add_argument("--bos-token-id", type=int, default=1, help="MDLM-OWT (GPT-2): 50256")
    s.add_argument("--eos-token-id", type=int, default=2, help="MDLM-OWT (GPT-2): 50256")
    s.add_argument("--ema", action="store_true", help="use the EMA shadow weights of a Lightning .ckpt")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("sample", help="a few generations with a simple Python sampler (reference only)")
    s.add_argument("model")
    s.add_argument("--tokenizer", default="data/tokenizer.json")
    s.add_argument("--n", type=int, default=4)
    s.add_argument("--length", type=int, default=128)
    s.add_argument("--steps", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prompt", default=None)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=cmd_sample)

    s = sub.add_parser("lora", help="train a LoRA adapter (peft) on a frozen base -> aios adapter container",
                       description="Train a LoRA adapter with MDLM's loss on a frozen base model and write the aios "
                                   "adapter container (aios.kind = lora). Validation nats/token before and after are "
                                   "printed and stored in the adapter's config.")
    s.add_argument("--base", required=True, help="model folder (model.f32.parquet + tokenizer.json) or a .parquet "
                                                 "(tokenizer.json beside it)")
    s.add_argument("--data", required=True, help=".txt file, .jsonl file ({\"text\": ...}) or a folder of them")
    s.add_argument("--out", required=True, help="adapter file to write, e.g. notes.lora.parquet")
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--target-modules", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated: short names (attn_qkv, attn_out, mlp.0, mlp.2, output_layer.linear; matched "
                        "by suffix among the allowed modules) or full names (blocks.0.attn_qkv)")
    s.add_argument("--rslora", action="store_true", help="rank-stabilised scale alpha/sqrt(rank)")
    s.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=2e-3)
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--min-lr-ratio", type=float, default=0.1)
    s.add_argument("--weight-decay", type=float, default=0.0)
    s.add_argument("--grad-clip", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--valid-fraction", type=float, default=0.05,
                   help="held-out share of --data (deterministic document split), unless --valid-data is given")
    s.add_argument("--valid-data", default=None, help="explicit validation data (then --data is not split)")
    s.add_argument("--source", default=None, help="only .jsonl records whose 'source' equals this (e.g. bible-kjv)")
    s.add_argument("--tokenizer", default=None, help="default: the base's tokenizer.json")
    s.add_argument("--eval-windows", type=int, default=256, help="validation windows (0 = all)")
    s.add_argument("--eval-n-t", type=int, default=16, help="stratified t per validation window")
    s.add_argument("--save-peft", default=None, metavar="DIR", help="also save the peft adapter folder (save_pretrained)")
    s.add_argument("--time-limit-min", type=float, default=None, help="stop training early after this many minutes")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="under torchrun: one process per device, gloo on cpu, NCCL on cuda; --batch-size is global")
    s.set_defaults(fn=cmd_lora)

    s = sub.add_parser("patch", help="selective fine-tuning: train the modules gradient attribution picks -> tensor "
                                     "patch (aios.kind = patch)",
                       description="Pick the block modules with the largest relative gradient norm on --data "
                                   "(Auto-RGN), train only those with MDLM's loss, and write just their tensors as a "
                                   "patch the runtime overlays on the base (Engine.load_patch, aios-run --patch).")
    s.add_argument("--base", required=True, help="model folder (model.f32.parquet + tokenizer.json) or a .parquet")
    s.add_argument("--data", required=True, help=".txt file, .jsonl file or a folder of them")
    s.add_argument("--out", required=True, help="patch file to write, e.g. notes.patch.parquet")
    s.add_argument("--top-k", type=int, default=4, help="modules to unfreeze")
    s.add_argument("--modules", default=None, help="comma-separated modules to train instead (blocks.0.mlp.2,...)")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--valid-fraction", type=float, default=0.05)
    s.add_argument("--valid-data", default=None)
    s.add_argument("--eval-n-t", type=int, default=16)
    s.add_argument("--time-limit-min", type=float, default=None)
    s.set_defaults(fn=cmd_patch)

    s = sub.add_parser("distill", help="few-step students: SDTT for text, LCM-LoRA for image/audio",
                       description="Distil a many-step teacher into a few-step student. --modality text: "
                                   "Self-Distillation Through Time (SDTT, arXiv:2410.21035): in rounds, the student "
                                   "learns to do in one ancestral step what the teacher does in --distill-steps, then "
                                   "becomes the teacher; writes a full model (aios.kind = model) with aios.distill "
                                   "metadata, per-round students in the run folder. --modality image|audio: "
                                   "consistency distillation into a LoRA (LCM-LoRA, arXiv:2311.05556) with the "
                                   "teacher's --guidance built in; writes an adapter (aios.kind = lora) that the "
                                   "runtime samples with sampler \"lcm\" in --student-steps steps. Resumable: rerun "
                                   "the same command.")
    s.add_argument("--teacher", required=True, help="teacher model folder (model.f32.parquet + tokenizer.json) or file")
    s.add_argument("--modality", choices=["text", "image", "audio"], default="text")
    s.add_argument("--out", required=True, help="student .parquet to write (text: a model; image/audio: a LoRA)")
    s.add_argument("--run-dir", default=None, help="run folder (checkpoints, log.jsonl, per-round students); default OUT.run")
    s.add_argument("--train", default="data/corpus/train.jsonl", help="text: training windows (.jsonl)")
    s.add_argument("--data", default="data/mm", help="image/audio: the data-mm folder")
    s.add_argument("--tokenizer", default=None, help="default: the teacher's tokenizer.json")
    s.add_argument("--teacher-steps", type=int, default=None,
                   help="text: the teacher's sampling steps (64); image/audio: its DDIM grid (ode: 4 x student "
                        "steps, lcd: 50)")
    s.add_argument("--target", choices=["ode", "lcd"], default="ode",
                   help="image/audio: the teacher's ODE solved to t = 0 (ode) or LCM's one-step bootstrap (lcd)")
    s.add_argument("--min-lr-ratio", type=float, default=1.0,
                   help="image/audio: cosine decay to this fraction of --lr (1 = constant after warmup)")
    s.add_argument("--student-steps", type=int, default=4)
    s.add_argument("--init", default=None,
                   help="image/audio: start from this LCM-LoRA of the same teacher, rank and alpha (to train on past "
                        "a finished run with a new schedule)")
    s.add_argument("--distill-steps", type=int, default=2, help="text: teacher steps one student step learns per round")
    s.add_argument("--round-steps", type=int, default=300, help="text: training steps per round")
    s.add_argument("--steps", type=int, default=3000, help="image/audio: training steps")
    s.add_argument("--guidance", type=float, default=3.0, help="image/audio: the teacher's classifier-free guidance")
    s.add_argument("--rank", type=int, default=32, help="image/audio: LoRA rank")
    s.add_argument("--text-length", type=int, default=12, help="image/audio: caption tokens on the canvas")
    s.add_argument("--alpha", type=float, default=None, help="image/audio: LoRA alpha (default: the rank)")
    s.add_argument("--loss", choices=["kl-bwd", "kl-fwd", "mse", "tvd", "l2", "huber"], default=None,
                   help="text: kl-bwd (default), kl-fwd, mse, tvd; image/audio: l2 (default) or huber")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--warmup", type=int, default=None, help="warmup steps (text 20, image/audio 50)")
    s.add_argument("--grad-clip", type=float, default=1.0)
    s.add_argument("--ema", type=float, default=0.0, help="text: EMA decay of the exported weights (0: raw weights)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--ckpt-every", type=int, default=50)
    s.add_argument("--time-limit-min", type=float, default=None)
    s.add_argument("--stop-after", type=int, default=None, help="checkpoint and stop after this global step")
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="under torchrun: one process per device, gloo on cpu, NCCL on cuda; --batch-size is global")
    s.set_defaults(fn=cmd_distill)

    s = sub.add_parser("controlnet", help="train a ControlNet on a frozen base -> aios.kind = controlnet",
                       description="Train a ControlNet (a low-rank trainable copy of the first --n-blocks blocks, "
                                   "zero-initialised projections into the base's residual stream) on a frozen base. "
                                   "--control edges: Fashion-MNIST edge maps -> images (needs data-mm); --control "
                                   "json: a list of keys -> a JSON object with exactly those keys. Resumable.")
    s.add_argument("--base", required=True, help="base model folder or .parquet")
    s.add_argument("--control", required=True, choices=["edges", "json"])
    s.add_argument("--out", required=True, help="ControlNet file to write, e.g. edges.controlnet.parquet")
    s.add_argument("--run-dir", default=None, help="run folder (checkpoint, log.jsonl); default OUT.run")
    s.add_argument("--data", default="data/mm", help="edges: the data-mm folder")
    s.add_argument("--n-blocks", type=int, default=2)
    s.add_argument("--rank", type=int, default=16)
    s.add_argument("--alpha", type=float, default=16.0)
    s.add_argument("--steps", type=int, default=600)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--text-length", type=int, default=48, help="json: canvas length")
    s.add_argument("--init", default=None, help="start from this ControlNet of the same base (blocks, rank) instead of zeros")
    s.add_argument("--ckpt-every", type=int, default=50)
    s.add_argument("--time-limit-min", type=float, default=None)
    s.add_argument("--no-resume", action="store_true")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="under torchrun: one process per device, gloo on cpu, NCCL on cuda; --batch-size is global")
    s.set_defaults(fn=cmd_controlnet)

    s = sub.add_parser("classifier", help="linear Fashion-MNIST classifier for the image class energy",
                       description="Fit a linear softmax classifier on data-mm's Fashion-MNIST images and write it "
                                   "(aios.kind = classifier) for aios_rt.ClassEnergy / aios-run --classifier.")
    s.add_argument("--data", default="data/mm")
    s.add_argument("--out", required=True)
    s.add_argument("--epochs", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.set_defaults(fn=cmd_classifier)

    s = sub.add_parser("import-peft", help="PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) -> aios adapter",
                       description="Convert a PEFT LoRA adapter folder trained on an aios DiT into the aios adapter "
                                   "container, validated against the base model.")
    s.add_argument("folder", help="PEFT adapter folder")
    s.add_argument("--base", required=True, help="base model folder or .parquet (its fingerprint is recorded)")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_import_peft)

    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
