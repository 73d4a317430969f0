"""Evolution level L1 measured: the loop meets structured records (JSON objects of a schema the model never saw),
trains a token ControlNet on them, validates and stores it, and the engine reuses it.

Context: `--records` book records `{"title", "author", "year", "pages"}` with 2-4 of those keys (seeded), 20% held out
by the loop for validation. Reported: the L1 outcome and time, the held-out valid-record rate (a JSON object with
exactly the prompt's keys after the prompt) with and without the ControlNet, then on fresh records (another seed)
the valid rate of generations through the engine's own skill activation vs `skills=False`, and how often the skill
activates for key-list prompts vs unrelated prompts (the corpus's held-out text).

    python bench/evolution_records.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from aios_train.controlnet import json_valid, keys_prompt  # noqa: E402
from aios_train.evolution import EvolveConfig, Evolver  # noqa: E402
from common import emit, machine  # noqa: E402

TITLES = ["Emma", "Persuasion", "Hamlet", "Ulysses", "Dracula", "Walden", "Beowulf", "Candide", "Ivanhoe", "Middlemarch"]
AUTHORS = ["Austen", "Shakespeare", "Joyce", "Stoker", "Thoreau", "Voltaire", "Scott", "Eliot", "Dickens", "Twain"]


def records(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        keys = [k for k in ("title", "author", "year", "pages") if rng.random() < 0.7] or ["title", "year"]
        if len(keys) == 1:
            keys.append("year" if keys[0] != "year" else "title")
        val = {"title": str(rng.choice(TITLES)), "author": str(rng.choice(AUTHORS)),
               "year": int(rng.integers(1600, 2000)), "pages": int(rng.integers(50, 900))}
        out.append(json.dumps({k: val[k] for k in keys}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-text-tiny"))
    ap.add_argument("--general", default=str(ROOT / "data" / "corpus" / "valid.jsonl"))
    ap.add_argument("--records", type=int, default=40)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--fresh", type=int, default=30)
    ap.add_argument("--unrelated", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="a token ControlNet of the base to start L1 from")
    ap.add_argument("--rank", type=int, default=16)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mem = aios_rt.MemoryStore(Path(tmp) / "memory")
        eng = aios_rt.Engine(a.model, threads=a.threads, memory=mem)
        cfg = EvolveConfig(levels=("L1",), controlnet_steps=a.steps, controlnet_minutes=a.minutes, threads=a.threads,
                           controlnet_rank=a.rank, controlnet_init=a.init, force=True)
        ev = Evolver(engine=eng, memory=mem, skills=Path(tmp) / "skills", general_data=a.general, config=cfg)
        t0 = time.time()
        rep = ev.step("title, year", records(a.records, 0))
        l1 = next(lv for lv in rep.levels if lv.level == "L1")
        print(f"L1 {l1.outcome} in {time.time() - t0:.1f} s: {l1.reason}; metrics {l1.metrics}", flush=True)
        result = {"machine": machine(), "l1": {"outcome": l1.outcome, "reason": l1.reason, **l1.metrics}}
        if rep.kept == "L1":
            fresh = records(a.fresh, 1)
            rates = {}
            for use in (True, False):
                ok = active = 0
                for i, rec in enumerate(fresh):
                    keys = list(json.loads(rec))
                    p = keys_prompt(keys)
                    g = eng.diffuse(p, length=48, steps=48, temperature=0.0, seed=i, skills=use)
                    ok += json_valid(g.text[len(p):], keys)
                    active += bool(g.skills)
                rates[use] = (ok / len(fresh), active / len(fresh))
            unrelated = [json.loads(line)["text"] for line in open(a.general)][: a.unrelated]
            wrong = sum(bool(eng.skills_for(" ".join(t.split()[:6]))["controlnets"]) for t in unrelated)
            result["reuse"] = {"valid_with_skills": rates[True][0], "valid_without_skills": rates[False][0],
                               "activated_for_key_prompts": rates[True][1],
                               "activated_for_unrelated": wrong / len(unrelated)}
            print(f"fresh records: valid {rates[True][0]:.2f} with the engine's skills vs {rates[False][0]:.2f} "
                  f"without; the skill activates for {rates[True][1]:.0%} of key-list prompts and "
                  f"{wrong}/{len(unrelated)} unrelated prompts", flush=True)
        ev.close()
    emit("evolution_records", result)


if __name__ == "__main__":
    main()
