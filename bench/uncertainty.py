"""Does `g.uncertainty` track error, and does `should_evolve` separate in- from out-of-domain text?

Task: fill a held-out 24-token span between 16 tokens of context and an 8-token suffix (python/aios_train/
uncertainty.py InfillTask), with the runtime's default sampler (confidence, temperature 1) at 24 steps.
- in-domain: held-out windows of the model's corpus (data/corpus/valid.jsonl), after the ones the calibration used;
- out-of-domain: Python standard-library source code and the Debian licence texts in /usr/share/common-licenses,
  neither of which the corpus holds.
Reported: Spearman correlation between the uncertainty and the error, the true span's NLL under the model (pooled,
and within each domain) and the token error rate of the filled span, AUROC of in- vs out-of-domain, the share of in-domain cases that trigger `should_evolve` (false triggers)
and of out-of-domain cases that do, per component as well as for the scalar.

    python bench/uncertainty.py --model models/aios-text-tiny --n 150 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from aios_train.tokenizer import BOS_ID, load_tokenizer  # noqa: E402
from aios_train.uncertainty import COMPONENTS, InfillTask, auroc, run_task, spearman  # noqa: E402
from aios_train.windows import make_windows, windows_from_jsonl  # noqa: E402
from common import emit, machine  # noqa: E402

CODE_MODULES = ["argparse.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "textwrap.py",
                "string.py", "functools.py", "heapq.py", "shutil.py", "tarfile.py"]
LICENCES = ["GPL-3", "Apache-2.0", "LGPL-3", "MPL-2.0", "GFDL-1.3", "Artistic"]


def ood_texts() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / m).read_text() for m in CODE_MODULES if (stdlib / m).exists()]
    lic = Path("/usr/share/common-licenses")
    texts += [(lic / n).read_text(errors="replace") for n in LICENCES if (lic / n).exists()]
    return texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-text-tiny"))
    ap.add_argument("--data", default=str(ROOT / "data" / "corpus" / "valid.jsonl"))
    ap.add_argument("--n", type=int, default=150, help="cases per domain")
    ap.add_argument("--skip", type=int, default=200, help="in-domain windows the calibration used (skipped)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    print(f"machine: {machine()}")
    task = InfillTask()
    tok = load_tokenizer(Path(a.model) / "tokenizer.json")
    ind = windows_from_jsonl(a.data, tok, task.length + 1)[a.skip: a.skip + a.n]
    rng = np.random.default_rng(0)
    ood = make_windows(ood_texts(), tok, task.length + 1)
    ood = ood[rng.choice(len(ood), min(a.n, len(ood)), replace=False)]
    eng = aios_rt.Engine(a.model, threads=a.threads)
    t0 = time.time()
    rin = run_task(eng, ind, task, BOS_ID, "in-domain", with_truth=True)
    rout = run_task(eng, ood, task, BOS_ID, "out-of-domain", with_truth=True)
    secs = time.time() - t0
    rows = rin + rout
    err = np.array([r["truth_nll"] for r in rows])
    terr = np.array([r["token_error"] for r in rows])
    is_ood = np.array([0] * len(rin) + [1] * len(rout))
    res: dict = {"cases": {"in": len(rin), "out": len(rout)}, "seconds": round(secs, 1),
                 "truth_nll": {"in": float(err[is_ood == 0].mean()), "out": float(err[is_ood == 1].mean())},
                 "token_error": {"in": float(terr[is_ood == 0].mean()), "out": float(terr[is_ood == 1].mean())}}
    calibrated = rows[0]["should_evolve"] is not None
    signals = {"uncertainty": np.array([r["uncertainty"] for r in rows])}
    signals.update({c: np.array([r["parts"][c] for r in rows]) for c in COMPONENTS if c in rows[0]["parts"]})
    print(f"{len(rin)} in-domain + {len(rout)} out-of-domain spans in {secs:.0f} s; the truth's NLL "
          f"in {res['truth_nll']['in']:.2f}, out {res['truth_nll']['out']:.2f} nats/token; token error rate "
          f"in {res['token_error']['in']:.3f}, out {res['token_error']['out']:.3f}")
    print("Spearman with the truth's NLL (pooled, in-domain, out-of-domain), with the token error rate (pooled), "
          "and AUROC of out- vs in-domain:")
    print(f"{'signal':<12} {'nll(all)':>9} {'(in)':>7} {'(out)':>7} {'tok.err':>8} {'AUROC':>7}")
    for name, v in signals.items():
        s_all = spearman(v, err)
        s_in, s_out = spearman(v[is_ood == 0], err[is_ood == 0]), spearman(v[is_ood == 1], err[is_ood == 1])
        s_tok = spearman(v, terr)
        au = auroc(v[is_ood == 1], v[is_ood == 0])
        res[name] = {"spearman_truth_nll": s_all, "spearman_in": s_in, "spearman_out": s_out,
                     "spearman_token_error": s_tok, "auroc_ood": au}
        print(f"{name:<12} {s_all:>9.3f} {s_in:>7.3f} {s_out:>7.3f} {s_tok:>8.3f} {au:>7.3f}")
    if calibrated:
        fire = np.array([bool(r["should_evolve"]) for r in rows])
        res["should_evolve"] = {"false_trigger_in": float(fire[is_ood == 0].mean()),
                                "trigger_out": float(fire[is_ood == 1].mean())}
        print(f"should_evolve: fires on {fire[is_ood == 0].mean():.3f} of in-domain (false triggers) and "
              f"{fire[is_ood == 1].mean():.3f} of out-of-domain spans")
    else:
        print("should_evolve: the model has no uncertainty.json (run python -m aios_train calibrate-uncertainty)")
    emit("uncertainty", res)


if __name__ == "__main__":
    main()
