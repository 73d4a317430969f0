"""Few-step image/audio generation with a consistency-distilled LoRA (LCM-LoRA, `aios_train.lcm`) against its
teacher, measured through aios_rt (the runtime) with the held-out judges of bench/unified_quality.py.

    python bench/lcm.py --student models/aios-unified-tiny-lcm/image.lcm.lora.parquet [--modality image]
                        [--per-class 30] [--teacher-steps 4,8,50] [--student-steps 1,2,4,8] [--threads 1]
                        (an empty list, e.g. --teacher-steps "", skips those rows)

For every setting the same prompts (each class caption, `--per-class` seeds each) are generated:
  * teacher: the base model, DDIM (eta 0) with classifier-free guidance `--guidance` (the student has the
    teacher's guidance built in), at each of `--teacher-steps`;
  * student: the base with the LoRA loaded, sampler "lcm", no guidance, at each of `--student-steps`.
Measured: the judge agrees with the prompted class; Frechet distance in the judge's 128-d features to the held-out
set (images: the Fashion-MNIST test set; audio: the held-out accents' log-mels), same number of samples per setting
(small-sample FD is biased upward: compare rows, not other tables); milliseconds per sample (one thread unless
--threads). The "4 steps >= 90% of the 50-step teacher" direction reads: agreement(student, 4) >= 0.9 x
agreement(teacher, 50), and FD(student, 4) <= FD(teacher, 50) / 0.9.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from aios_train.mmdata import DIGIT_WORDS, FASHION_CAPTIONS  # noqa: E402
from common import emit, machine  # noqa: E402
from unified_quality import frechet, pixels_unit, predict, train_judge  # noqa: E402


def run(eng: aios_rt.Engine, judge, ref_feats: np.ndarray, prompts: list[str], modality: str, per_class: int,
        steps: int, sampler: str, guidance: float) -> dict:
    outs, labels = [], []
    t0 = time.perf_counter()
    for c, prompt in enumerate(prompts):
        for k in range(per_class):
            g = eng.diffuse(prompt, modality=modality, steps=steps, sampler=sampler, guidance=guidance,
                            seed=1000 * c + k)
            outs.append(pixels_unit(g.image) if modality == "image" else g.log_mel)
            labels.append(c)
    ms = (time.perf_counter() - t0) * 1e3 / len(outs)
    pred, feats = predict(judge, np.stack(outs))
    return {"agreement": float((pred == np.array(labels)).mean()), "fd": frechet(feats, ref_feats),
            "n": len(outs), "ms_per_sample": round(ms, 2), "example": g}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-unified-tiny"))
    ap.add_argument("--student", required=True, help="the LCM-LoRA (.parquet)")
    ap.add_argument("--modality", choices=["image", "audio"], default="image")
    ap.add_argument("--data", default=str(ROOT / "data" / "mm"))
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--teacher-steps", default="4,8,50")
    ap.add_argument("--student-steps", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", default=None, help="write a grid of the 4-step student's images (PNG) here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"machine: {machine()}")
    cache = ROOT / "runs" / "bench-judges"
    if a.modality == "image":
        d = dict(np.load(Path(a.data) / "images.npz"))
        judge, acc = train_judge("image", pixels_unit(d["train_x"]), d["train_y"], pixels_unit(d["test_x"]),
                                 d["test_y"], 3, cache)
        ref = pixels_unit(d["test_x"])
        prompts = FASHION_CAPTIONS
    else:
        d = dict(np.load(Path(a.data) / "audio.npz"))
        judge, acc = train_judge("audio", d["train_x"].astype(np.float32), d["train_y"], d["test_x"].astype(np.float32),
                                 d["test_y"], 3, cache)
        ref = d["test_x"].astype(np.float32)
        prompts = DIGIT_WORDS
    print(f"judge ({a.modality}): held-out accuracy {acc:.4f}")
    _, ref_feats = predict(judge, ref)
    res: dict = {"machine": machine(), "judge_acc": acc, "modality": a.modality, "per_class": a.per_class,
                 "guidance": a.guidance, "threads": a.threads}
    eng = aios_rt.Engine(a.model, threads=a.threads)
    for steps in [int(s) for s in a.teacher_steps.split(",") if s]:
        r = run(eng, judge, ref_feats, prompts, a.modality, a.per_class, steps, "ddim", a.guidance)
        r.pop("example")
        res[f"teacher_{steps}"] = r
        print(f"teacher DDIM {steps:>2} steps, guidance {a.guidance:g}: agreement {r['agreement']:.3f}, "
              f"FD {r['fd']:.1f}, {r['ms_per_sample']:.1f} ms", flush=True)
    eng.load_adapter(a.student, name="lcm")
    for steps in [int(s) for s in a.student_steps.split(",") if s]:
        r = run(eng, judge, ref_feats, prompts, a.modality, a.per_class, steps, "lcm", 0.0)
        g = r.pop("example")
        if g.warnings:
            print(f"  warnings: {g.warnings}")
        res[f"student_{steps}"] = r
        print(f"student LCM {steps:>2} steps: agreement {r['agreement']:.3f}, FD {r['fd']:.1f}, "
              f"{r['ms_per_sample']:.1f} ms", flush=True)
    t50, s4 = res.get("teacher_50"), res.get("student_4")
    if t50 and s4:
        res["student4_vs_teacher50"] = {"agreement_ratio": s4["agreement"] / max(t50["agreement"], 1e-9),
                                        "fd_ratio": t50["fd"] / max(s4["fd"], 1e-9),
                                        "speedup": t50["ms_per_sample"] / s4["ms_per_sample"]}
        q = res["student4_vs_teacher50"]
        print(f"4-step student vs 50-step teacher: agreement {100 * q['agreement_ratio']:.0f}%, "
              f"FD quality (teacher FD / student FD) {100 * q['fd_ratio']:.0f}%, {q['speedup']:.1f}x faster")
    if a.samples and a.modality == "image":
        from common import write_png_gray
        rows = [np.concatenate([eng.diffuse(FASHION_CAPTIONS[c], modality="image", steps=4, sampler="lcm",
                                            seed=1000 * c + k).image for k in range(8)], axis=1) for c in range(10)]
        write_png_gray(a.samples, np.kron(np.concatenate(rows, axis=0), np.ones((2, 2), np.uint8)))
        print(f"wrote {a.samples}")
    emit("lcm", res)


if __name__ == "__main__":
    main()
