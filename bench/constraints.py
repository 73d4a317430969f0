"""Word constraints (energy on the logits) measured: how often they hold and what they cost.

Per setting, over prompts x seeds with the shipped text model (ancestral sampler, top-p 0.9): the share of
generations whose constraints all held (`g.constraints`), the share of generations containing a banned word
(counted on the text, whole words, case-sensitive as given), the share containing a required word, and the quality
cost against the unconstrained generations of the same prompts and seeds: known-word rate and distinct-2 (as in
bench/text_quality.py), the model's own per-token NLL estimate of its output (`g.uncertainty_parts["nll"]`), and
milliseconds per generation.

Images (`--unified`): aios_rt.Brightness on the left half of aios-unified-tiny's 28x28 images, per target over the
10 class prompts x seeds at 20 DDIM steps: the share within 0.1 of the target, the mean absolute error, and how much
the right half (outside the energy) moved against the unconstrained image of the same prompt and seed.
aios_rt.ClassEnergy (models/aios-unified-tiny/fashion.classifier.parquet, a linear classifier) on unconditional
images (empty prompt), per weight over the 10 classes x seeds: the held-out CNN judge of bench/unified_quality.py
agrees with the energy's class (10% by chance), the linear classifier itself agrees, and the Frechet distance of the
judge's features against the test set (quality cost; small-sample FD, compare rows).

Regex (`--only regex`): aios_rt.Regex with the escaped prompt followed by "no letter e" ([^eE]*) or "one sentence"
([^.!?]*[.!?]), sampling the whole canvas at once (--steps) and left to right (block_length 1, one token per step):
the share reported met, the share Python's `re.fullmatch` accepts (the text up to the first end token), and the
same quality columns against the unconstrained text of the same decoding.

Sound (`--only loudness`): aios_rt.Loudness on the first half (frames 0-48) of aios-unified-tiny's spoken words, per
target dB over the 10 words x seeds at 20 DDIM steps, guidance 3: the share within 3 dB of the target, the mean
absolute error, and the cost: the held-out audio judge of bench/unified_quality.py recognises the prompted word
on the generated log-mel, against the unconstrained clips of the same words and seeds.

    python bench/constraints.py --seeds 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import aios_rt  # noqa: E402
from common import emit, machine  # noqa: E402
from text_quality import scores, words  # noqa: E402

PROMPTS = ["The old house", "In the morning", "And the king said", "The city of", "She walked"]
BANNED = ["the", "The", "and", "And"]
SETTINGS = {
    "none": [],
    "banned: the/The/and/And": [aios_rt.Banned(BANNED)],
    "required: garden": [aios_rt.Required(["garden"])],
    "required: river": [aios_rt.Required(["river"])],
    "banned + required": [aios_rt.Banned(BANNED), aios_rt.Required(["garden"])],
    "banned, weight 2": [aios_rt.Banned(BANNED, weight=2.0)],
}


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z]){re.escape(word)}(?![A-Za-z])", text) is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-text-tiny"))
    ap.add_argument("--train", default=str(ROOT / "data" / "corpus" / "train.jsonl"), help="vocabulary source")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--length", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--unified", default=str(ROOT / "models" / "aios-unified-tiny"))
    ap.add_argument("--only", choices=["text", "regex", "brightness", "class", "loudness"], default=None)
    a = ap.parse_args()
    if a.only == "class":
        emit("constraints", {"class": class_energy(a)})
        return
    if a.only == "brightness":
        emit("constraints", {"image": image_energies(a)})
        return
    if a.only == "loudness":
        emit("constraints", {"loudness": loudness_energy(a)})
        return
    if not Path(a.train).exists():
        sys.exit(f"{a.train} not found: build the corpus first with `just data`")
    vocab: set[str] = set()
    with open(a.train) as f:
        for line in f:
            vocab.update(words(json.loads(line)["text"]))
    if a.only == "regex":
        emit("constraints", {"regex": regex_energy(a, vocab)})
        return
    eng = aios_rt.Engine(a.model, threads=a.threads)
    print(f"machine: {machine()}; {len(PROMPTS)} prompts x {a.seeds} seeds, {a.length} tokens, {a.steps} ancestral "
          f"steps, top-p 0.9")
    print(f"{'setting':<26} {'all met':>7} {'banned in':>9} {'required in':>11} {'known':>6} {'dist-2':>6} "
          f"{'nll':>6} {'ms':>6}")
    out = {}
    for name, cons in SETTINGS.items():
        texts, met, banned_in, required_in, nll, ms = [], [], [], [], [], []
        for prompt in PROMPTS:
            for seed in range(a.seeds):
                g = eng.diffuse(prompt, length=a.length, steps=a.steps, seed=seed, sampler="ancestral", top_p=0.9,
                                constraints=cons)
                gen = g.text[len(prompt):]
                texts.append(words(gen))
                met.append(all(c["met"] for c in g.constraints))
                banned_in.append(any(has_word(gen, w) for w in BANNED))
                required_in.append(any(has_word(gen, w) for c in cons if isinstance(c, aios_rt.Required)
                                       for w in c.words) if any(isinstance(c, aios_rt.Required) for c in cons)
                                   else None)
                nll.append(g.uncertainty_parts["nll"])
                ms.append(g.timings["total_ms"])
        req = [r for r in required_in if r is not None]
        out[name] = {**scores(texts, vocab), "all_met": sum(met) / len(met),
                     "banned_word_in_text": sum(banned_in) / len(banned_in),
                     "required_word_in_text": (sum(req) / len(req)) if req else None,
                     "nll_per_token": statistics.mean(nll), "ms_median": statistics.median(ms)}
        r = out[name]
        req_s = f"{r['required_word_in_text']:11.2f}" if r["required_word_in_text"] is not None else f"{'-':>11}"
        print(f"{name:<26} {r['all_met']:7.2f} {r['banned_word_in_text']:9.2f} {req_s} {r['known_words']:6.3f} "
              f"{r['distinct_2']:6.3f} {r['nll_per_token']:6.3f} {r['ms_median']:6.1f}")
    if a.only is None:
        out["regex"] = regex_energy(a, vocab)
        out["image"] = image_energies(a)
        out["class"] = class_energy(a)
        out["loudness"] = loudness_energy(a)
    emit("constraints", out)


REGEXES = {"none": None, "no letter e": "[^eE]*", "one sentence": "[^.!?]*[.!?]"}


def regex_energy(a, vocab: set[str]) -> dict:
    """aios_rt.Regex on the text after the prompt (pattern = the escaped prompt + REGEXES[name]), full-canvas
    sampling and left to right (block_length 1): satisfaction and cost against the unconstrained text."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(Path(a.model) / "tokenizer.json"))
    eng = aios_rt.Engine(a.model, threads=a.threads)
    print(f"regex: {len(PROMPTS)} prompts x {a.seeds} seeds, {a.length} tokens, ancestral, top-p 0.9; "
          f"the text is read up to the first [EOS]/[PAD]")
    print(f"{'decoding':<22} {'pattern':<13} {'met':>5} {'re ok':>5} {'known':>6} {'dist-2':>6} {'nll':>6} {'ms':>6}")
    res = {}
    for decoding, bl, steps in (("full canvas, 32 steps", None, a.steps), ("left to right", 1, a.length)):
        for name, tail in REGEXES.items():
            texts, met, ok, nll, ms = [], [], [], [], []
            for prompt in PROMPTS:
                pattern = None if tail is None else re.escape(prompt) + tail
                for seed in range(a.seeds):
                    cons = [] if pattern is None else [aios_rt.Regex(pattern)]
                    g = eng.diffuse(prompt, length=a.length, steps=steps, seed=seed, sampler="ancestral", top_p=0.9,
                                    block_length=bl, constraints=cons)
                    ids = list(g.tokens[1:])
                    end = next((i for i, t in enumerate(ids) if t in (0, 2)), len(ids))
                    text = tok.decode(ids[:end])
                    texts.append(words(text[len(prompt):]))
                    if pattern is not None:
                        met.append(g.constraints[0]["met"])
                        ok.append(re.fullmatch(pattern, text) is not None)
                    nll.append(g.uncertainty_parts["nll"])
                    ms.append(g.timings["total_ms"])
            r = {**scores(texts, vocab), "met": statistics.mean(met) if met else None,
                 "python_re_fullmatch": statistics.mean(ok) if ok else None,
                 "nll_per_token": statistics.mean(nll), "ms_median": statistics.median(ms)}
            res[f"{decoding} / {name}"] = r
            f = lambda v: f"{v:5.2f}" if v is not None else f"{'-':>5}"  # noqa: E731
            print(f"{decoding:<22} {name:<13} {f(r['met'])} {f(r['python_re_fullmatch'])} {r['known_words']:6.3f} "
                  f"{r['distinct_2']:6.3f} {r['nll_per_token']:6.3f} {r['ms_median']:6.1f}", flush=True)
    return res


def loudness_energy(a) -> dict:
    import numpy as np
    from aios_train.mmdata import DIGIT_WORDS
    from unified_quality import predict, train_judge

    aud = dict(np.load(ROOT / "data" / "mm" / "audio.npz"))
    judge, acc = train_judge("audio", aud["train_x"].astype(np.float32), aud["train_y"],
                             aud["test_x"].astype(np.float32), aud["test_y"], 3, ROOT / "runs" / "bench-judges")
    eng = aios_rt.Engine(a.unified, threads=a.threads)
    span = (0, 48)
    db = lambda m: float((np.mean(m) * 4 - 4) * 20 / np.log(10))  # noqa: E731
    print(f"loudness: 10 words x {a.seeds} seeds, frames {span}, 20 DDIM steps, guidance 3; audio judge "
          f"{acc:.3f} on held-out accents")
    print(f"{'target dB':>9} {'within 3 dB':>11} {'abs err dB':>10} {'judge recognises':>16} {'span dB (plain)':>15}")
    res = {"judge_accuracy": acc}
    for target in (None, -80.0, -60.0, -40.0):
        hits, errs, plain_db = [], [], []
        for w, word in enumerate(DIGIT_WORDS):
            for seed in range(a.seeds):
                cons = [] if target is None else [aios_rt.Loudness(span, target)]
                g = eng.diffuse(word, modality="audio", steps=20, guidance=3.0, seed=seed, constraints=cons)
                hits.append(int(predict(judge, g.log_mel[None])[0][0] == w))
                d = db(g.log_mel[span[0]:span[1]])
                plain_db.append(d)
                if target is not None:
                    errs.append(abs(d - target))
        key = "none" if target is None else f"{target:g} dB"
        res[key] = {"recognised": float(np.mean(hits)), "span_db_mean": float(np.mean(plain_db)),
                    **({} if target is None else {"within_3db": float(np.mean([e <= 3 for e in errs])),
                                                  "abs_err_db": float(np.mean(errs))})}
        r = res[key]
        print(f"{key:>9} {r.get('within_3db', float('nan')):11.2f} {r.get('abs_err_db', float('nan')):10.2f} "
              f"{r['recognised']:16.2f} {r['span_db_mean']:15.1f}", flush=True)
    return res


def class_energy(a) -> dict:
    import numpy as np
    from aios_train.classifier import load_classifier
    from aios_train.mmdata import FASHION_CLASSES
    from unified_quality import frechet, pixels_unit, predict, train_judge
    import torch

    data = ROOT / "data" / "mm"
    imgs = dict(np.load(data / "images.npz"))
    judge, judge_acc = train_judge("image", pixels_unit(imgs["train_x"]), imgs["train_y"],
                                   pixels_unit(imgs["test_x"]), imgs["test_y"], 3, ROOT / "runs" / "bench-judges")
    _, test_feats = predict(judge, pixels_unit(imgs["test_x"][:2000]))
    path = Path(a.unified) / "fashion.classifier.parquet"
    lin, lcfg = load_classifier(path)
    eng = aios_rt.Engine(a.unified, threads=a.threads)
    print(f"class energy: 10 classes x {a.seeds} seeds, unconditional, 20 DDIM steps; judge test accuracy "
          f"{judge_acc:.3f}, linear classifier {lcfg['test_accuracy']:.3f}")
    print(f"{'weight':>6} {'judge agrees':>12} {'linear agrees':>13} {'FD':>8} {'ms':>6}")
    res = {"judge_test_accuracy": judge_acc, "linear_test_accuracy": lcfg["test_accuracy"]}
    for w in (0.0, 0.3, 1.0, 3.0):
        gens, want, ms = [], [], []
        for k, name in enumerate(FASHION_CLASSES):
            for seed in range(a.seeds):
                g = eng.diffuse("", modality="image", steps=20, seed=seed,
                                constraints=[aios_rt.ClassEnergy(path, name, weight=w)] if w else [])
                gens.append(np.asarray(g.image, dtype=np.uint8).reshape(28, 28))
                want.append(k)
                ms.append(g.timings["total_ms"])
        x = pixels_unit(np.stack(gens))
        pred, feats = predict(judge, x)
        with torch.no_grad():
            lin_pred = lin(torch.from_numpy(x).reshape(len(x), -1) * 2 - 1).argmax(1).numpy()
        r = {"judge_agrees": float((pred == np.array(want)).mean()),
             "linear_agrees": float((lin_pred == np.array(want)).mean()),
             "frechet": frechet(feats, test_feats), "ms_median": statistics.median(ms)}
        res[f"{w:g}"] = r
        print(f"{w:6.1f} {r['judge_agrees']:12.3f} {r['linear_agrees']:13.3f} {r['frechet']:8.1f} {r['ms_median']:6.1f}")
    return res


def image_energies(a) -> dict:
    import numpy as np
    from aios_train.mmdata import FASHION_CAPTIONS
    eng = aios_rt.Engine(a.unified, threads=a.threads)
    prompts = [c[0] if isinstance(c, (list, tuple)) else c for c in FASHION_CAPTIONS][:10]
    left = (0, 0, 14, 28)
    print(f"images: {len(prompts)} prompts x {a.seeds} seeds, 20 DDIM steps, Brightness on the left half")
    print(f"{'target':>6} {'within 0.1':>10} {'mean |err|':>10} {'right half moved':>16} {'ms':>6}")
    plain = {}
    res = {}
    for target in (None, 0.05, 0.5, 0.9):
        errs, moved, ms = [], [], []
        for p in prompts:
            for seed in range(a.seeds):
                cons = [] if target is None else [aios_rt.Brightness(left, target)]
                g = eng.diffuse(p, modality="image", steps=20, seed=seed, constraints=cons)
                img = g.image.astype(float) / 255
                ms.append(g.timings["total_ms"])
                if target is None:
                    plain[(p, seed)] = img
                    errs.append(img[:, :14].mean())
                    continue
                errs.append(abs(img[:, :14].mean() - target))
                moved.append(np.abs(img[:, 14:] - plain[(p, seed)][:, 14:]).mean())
        key = "none" if target is None else f"{target}"
        if target is None:
            res[key] = {"left_mean": float(np.mean(errs)), "ms_median": statistics.median(ms)}
            print(f"{'none':>6} {'-':>10} {'left mean ' + format(np.mean(errs), '.3f'):>10} {'-':>16} "
                  f"{statistics.median(ms):6.1f}")
            continue
        res[key] = {"within_0.1": float(np.mean(np.array(errs) < 0.1)), "mean_abs_err": float(np.mean(errs)),
                    "right_half_moved": float(np.mean(moved)), "ms_median": statistics.median(ms)}
        r = res[key]
        print(f"{target:6.2f} {r['within_0.1']:10.2f} {r['mean_abs_err']:10.3f} {r['right_half_moved']:16.3f} "
              f"{r['ms_median']:6.1f}")
    return res


if __name__ == "__main__":
    main()
