"""Calibrating the runtime's uncertainty signal (`g.uncertainty`, `g.should_evolve`) on held-out in-domain text.

The runtime (crates/aios-core/src/sampler/uncertainty.rs) reports five per-generation components: mean entropy and
surprisal at commit, prediction changes before commit, how late the last change came, and the masked-diffusion
likelihood of the output. Standardising each against in-domain text makes them comparable; the scalar is their
weighted mean, and `should_evolve` fires above the `quantile` of the in-domain scalars (so about 1 - quantile of
in-domain generations trigger it by construction). This module measures the components on one task, infilling a
held-out span, and writes `uncertainty.json` beside the model, where the engine reads it at load.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

COMPONENTS = ("entropy", "surprisal", "changes", "lateness", "nll")


@dataclass(frozen=True)
class InfillTask:
    """[BOS] context | span to fill | suffix, cut from token windows."""
    context: int = 16
    span: int = 24
    suffix: int = 8
    steps: int = 24
    seed: int = 0

    @property
    def length(self) -> int:
        return 1 + self.context + self.span + self.suffix

    def canvas(self, window: np.ndarray, mask_id: int, bos_id: int) -> tuple[list[int], list[int]]:
        """(canvas with the span masked, the true span)."""
        body = [int(t) for t in window[1: self.length]]
        if len(body) < self.length - 1:
            raise ValueError(f"window of {len(window)} tokens is shorter than the task's {self.length}")
        truth = body[self.context: self.context + self.span]
        return [bos_id] + body[: self.context] + [mask_id] * self.span + body[self.context + self.span:], truth


def truth_nll(engine, canvas: list[int], truth: list[int], start: int) -> float:
    """Mean -ln p(true token) over the masked span, all of it masked (one forward pass, mask excluded)."""
    logits = engine.logits([canvas])[0, start: start + len(truth)].astype(np.float64)
    logits[:, engine.mask_token_id] = -np.inf
    m = logits.max(1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(1, keepdims=True)))[:, 0]
    return float(np.mean(lse - logits[np.arange(len(truth)), truth]))


def run_task(engine, windows: np.ndarray, task: InfillTask, bos_id: int, desc: str = "infill",
             with_truth: bool = False) -> list[dict]:
    """Fills the span of each window; per window: uncertainty, its parts, verdict, token error rate and (with
    `with_truth`) the true span's NLL under the model."""
    mask = engine.mask_token_id
    out = []
    for i, w in enumerate(tqdm(windows, desc=desc, unit="window", leave=False)):
        canvas, truth = task.canvas(w, mask, bos_id)
        g = engine.diffuse_tokens(canvas, steps=task.steps, seed=task.seed + i)
        span = g.tokens[1 + task.context: 1 + task.context + task.span]
        row = {"uncertainty": g.uncertainty, "parts": g.uncertainty_parts, "should_evolve": g.should_evolve,
               "token_error": float(np.mean([a != b for a, b in zip(span, truth)]))}
        if with_truth:
            row["truth_nll"] = truth_nll(engine, canvas, truth, 1 + task.context)
        out.append(row)
    return out


def fit(rows: list[dict], quantile: float = 0.975, weights: dict[str, float] | None = None) -> dict:
    """Means, spreads and the threshold from in-domain rows measured without a calibration."""
    if not 0.5 <= quantile < 1:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    if len(rows) < 20:
        raise ValueError(f"{len(rows)} generations are too few to calibrate on (need >= 20)")
    weights = dict(weights or {c: 1.0 for c in COMPONENTS})
    comps = {}
    for c in COMPONENTS:
        v = np.array([r["parts"][c] for r in rows if c in r["parts"]], dtype=np.float64)
        if len(v) and weights.get(c, 0) > 0:
            comps[c] = {"mean": float(v.mean()), "std": float(max(v.std(), 1e-6)), "weight": float(weights[c])}
    if not comps:
        raise ValueError("no component with a positive weight was measured")
    wsum = sum(x["weight"] for x in comps.values())
    scalars = [sum(x["weight"] * (r["parts"][c] - x["mean"]) / x["std"] for c, x in comps.items()) / wsum
               for r in rows]
    return {"components": comps, "threshold": float(np.quantile(scalars, quantile)), "quantile": quantile}


def parse_weights(spec: str | None) -> dict[str, float] | None:
    """`entropy=1,surprisal=1,nll=2` -> {component: weight}; components left out get weight 0 (None: all 1)."""
    if not spec:
        return None
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, w = part.partition("=")
        name = name.strip()
        if not sep or name not in COMPONENTS:
            raise ValueError(f"weights term {part!r}: expected COMPONENT=WEIGHT with COMPONENT in {', '.join(COMPONENTS)}")
        try:
            val = float(w)
        except ValueError as e:
            raise ValueError(f"weights term {part!r}: {w!r} is not a number") from e
        if not math.isfinite(val) or val < 0:
            raise ValueError(f"weights term {part!r}: weights must be finite and >= 0")
        out[name] = val
    return out


def calibrate(model: str | Path, windows: np.ndarray, task: InfillTask = InfillTask(), quantile: float = 0.975,
              threads: int | None = None, source: str = "", weights: dict[str, float] | None = None) -> dict:
    """Measures the components on `windows` (held-out, in-domain) and writes `<model>/uncertainty.json`.
    `weights` (component -> weight, missing = 0; default all 1) sets how much each component counts."""
    import aios_rt
    from .tokenizer import BOS_ID

    model = Path(model)
    if not model.is_dir():
        raise ValueError(f"{model}: expected a model folder (uncertainty.json is written beside the weights)")
    target = model / "uncertainty.json"
    stale = target.with_suffix(".json.off")
    # Measure uncalibrated: the components must not depend on an older calibration (they do not, but the
    # engine refuses a broken file, which a re-run should be able to replace).
    if target.exists():
        target.rename(stale)
    try:
        eng = aios_rt.Engine(str(model), threads=threads)
        t0 = time.time()
        rows = run_task(eng, windows, task, BOS_ID, desc="calibrate")
    except BaseException:
        if stale.exists():
            stale.rename(target)
        raise
    cal = fit(rows, quantile, weights)
    cal.update({"task": {"kind": "infill", **task.__dict__}, "windows": int(len(windows)), "data": source,
                "seconds": round(time.time() - t0, 1),
                "note": "written by python -m aios_train calibrate-uncertainty; read by the runtime at load"})
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cal, indent=2) + "\n")
    tmp.replace(target)
    stale.unlink(missing_ok=True)
    return cal


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def auroc(scores_pos, scores_neg) -> float:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U)."""
    r = _ranks(np.concatenate([scores_pos, scores_neg]).astype(float))
    n1, n0 = len(scores_pos), len(scores_neg)
    return float((r[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks
