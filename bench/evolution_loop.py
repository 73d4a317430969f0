"""The self-evolution loop on a domain the text model saw little of, measured.

Domain: the paragraphs of Python's LICENSE.txt (licence text; the corpus holds none). Two thirds of them are the
context the loop adapts on; the other third gives later in-domain prompts. Unrelated prompts come from the
corpus's held-out text. Reported: the time and outcome of each level, the held-out context and general losses
before/after (from the kept level's validation), the mean uncertainty of later in-domain generations with and
without the skill, and the share of in-domain / unrelated prompts for which the engine activates the stored skill.
`--levels L2` measures the LoRA level, `--levels L3` the tensor-patch level (selective fine-tuning).

    python bench/evolution_loop.py --threads 2 --levels L2
    python bench/evolution_loop.py --threads 2 --levels L3
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from aios_train.evolution import EvolveConfig, Evolver  # noqa: E402
from common import emit, machine  # noqa: E402


def prompt_of(text: str, words: int = 5) -> str:
    return " ".join(text.split()[:words])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-text-tiny"))
    ap.add_argument("--general", default=str(ROOT / "data" / "corpus" / "valid.jsonl"))
    ap.add_argument("--lora-steps", type=int, default=100)
    ap.add_argument("--lora-lr", type=float, default=5e-4)
    ap.add_argument("--patch-steps", type=int, default=100)
    ap.add_argument("--patch-lr", type=float, default=5e-4)
    ap.add_argument("--patch-top-k", type=int, default=4)
    ap.add_argument("--levels", default="L0,L2,L3", help="levels the loop may use, cheapest first")
    ap.add_argument("--general-bound", type=float, default=0.2)
    ap.add_argument("--unrelated", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    lic = (Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt").read_text()
    paras = [p.strip() for p in lic.split("\n\n") if len(p.strip()) > 200]
    ctx, later = paras[: 2 * len(paras) // 3], paras[2 * len(paras) // 3:]
    unrelated = [json.loads(l)["text"] for l in Path(a.general).read_text().splitlines()][: a.unrelated]
    tmp = Path(tempfile.mkdtemp(prefix="aios-evolve-"))
    try:
        mem = aios_rt.MemoryStore(tmp / "memory")
        eng = aios_rt.Engine(a.model, threads=a.threads, memory=mem)
        cfg = EvolveConfig(lora_steps=a.lora_steps, lora_lr=a.lora_lr, patch_steps=a.patch_steps,
                           patch_lr=a.patch_lr, patch_top_k=a.patch_top_k, levels=tuple(a.levels.split(",")),
                           general_bound=a.general_bound, threads=a.threads, force=True)
        ev = Evolver(engine=eng, memory=mem, skills=tmp / "skills", general_data=a.general, config=cfg)
        rep = ev.step(prompt_of(ctx[0]), ctx)
        res: dict = {"context_paragraphs": len(ctx), "later_prompts": len(later), "unrelated_prompts": len(unrelated),
                     "levels": [{"level": lv.level, "outcome": lv.outcome, "seconds": round(lv.seconds, 1),
                                 **lv.metrics} for lv in rep.levels], "kept": rep.kept}
        for lv in rep.levels:
            print(f"{lv.level}: {lv.outcome} in {lv.seconds:.1f} s - {lv.reason}")
        fires_in = [bool(eng.skills_for(prompt_of(p))["skills"]) for p in later]
        fires_out = [bool(eng.skills_for(prompt_of(p))["skills"]) for p in unrelated]
        u_with, u_without = [], []
        for i, p in enumerate(later):
            u_with.append(eng.diffuse(prompt_of(p), length=64, steps=32, seed=i).uncertainty)
            u_without.append(eng.diffuse(prompt_of(p), length=64, steps=32, seed=i, skills=False).uncertainty)
        res.update(activate_in_domain=float(np.mean(fires_in)), activate_unrelated=float(np.mean(fires_out)),
                   uncertainty_later_without=float(np.mean(u_without)), uncertainty_later_with=float(np.mean(u_with)))
        print(f"skill activates for {np.mean(fires_in):.2f} of {len(later)} later in-domain prompts and "
              f"{np.mean(fires_out):.2f} of {len(unrelated)} unrelated ones; mean uncertainty of later in-domain "
              f"generations {np.mean(u_without):.3f} without, {np.mean(u_with):.3f} with the skill")
        ev.close()
        emit("evolution_loop_" + (rep.kept or "none"), res)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
