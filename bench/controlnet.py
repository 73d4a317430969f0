"""How well the shipped ControlNets control, measured through aios_rt (the runtime) against the same requests
without them.

    python bench/controlnet.py [--json models/aios-unified-tiny-controlnets/json.controlnet.parquet]
                               [--edges models/aios-unified-tiny-controlnets/edges.controlnet.parquet] [--n 100]

* json: for `--n` key lists (1-3 keys drawn like the training data, but from a seed the training never used), a
  48-token text canvas is generated (confidence sampler, 48 steps, temperature 0, prompt "" and prompt "{"); valid =
  the text is one JSON object with exactly those keys. With the ControlNet at scale 1 vs the same request with it at
  scale 0 (the base alone); then with the ControlNet and a grammar energy together: ValidJson (whole text, and
  with semi-autoregressive blocks of 8 tokens) and aios_rt.Regex of the schema (`schema_regex`: an object with
  exactly the keys, any order, scalar values).
* edges: for `--n` Fashion-MNIST test images, the Sobel edge map (the training's) is the control and the class
  caption the prompt (20 DDIM steps, guidance 3). Edge agreement: F1 between the generated image's edge map and the
  control, an edge pixel counting as matched within 1 pixel. Class: the held-out judge of bench/unified_quality.py
  (cached in runs/bench-judges) agrees with the caption's class. With vs without the ControlNet.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "python"))

import aios_rt  # noqa: E402
from aios_train.controlnet import edge_map, json_example, json_valid, keys_prompt  # noqa: E402
from common import emit, machine  # noqa: E402

SHIPPED = ROOT / "models" / "aios-unified-tiny-controlnets"
BENCH_SEED = 10_000  # the training drew key lists from seeds (0, step); this one it never used


_SCALAR = r'(?:"(?:[^"\\\x00-\x1f]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)'


def schema_regex(keys: list[str]) -> str:
    """A JSON object with exactly `keys`, in any order, each a scalar value (what the training data holds)."""
    ws = r"[ \t\n\r]*"  # JSON's whitespace (RFC 8259), not Unicode's
    orders = [f"{ws},{ws}".join(f'"{k}"{ws}:{ws}{_SCALAR}' for k in p) for p in itertools.permutations(keys)]
    return ws + r"\{" + ws + "(?:" + "|".join(orders) + ")" + ws + r"\}" + ws


def bench_json(eng: aios_rt.Engine, path: str, n: int) -> dict:
    eng.load_controlnet(path, name="json")
    rng = np.random.default_rng(BENCH_SEED)
    cases = [json_example(rng)[0] for _ in range(n)]
    out = {}
    for prompt in ("", "{"):
        for scale in (1.0, 0.0):
            eng.set_controlnets({"json": scale})
            t0 = time.perf_counter()
            texts = [eng.diffuse(prompt, length=48, steps=48, temperature=0.0, seed=i,
                                 control={"json": keys_prompt(keys)}).text for i, keys in enumerate(cases)]
            valid = [json_valid(t, keys) for t, keys in zip(texts, cases)]
            parsed = sum(_is_json_object(t) for t in texts)
            key = f"prompt={prompt!r} scale={scale:g}"
            out[key] = {"valid_rate": sum(valid) / n, "json_object_rate": parsed / n,
                        "seconds": round(time.perf_counter() - t0, 1), "example": texts[0]}
            print(f"json {key}: valid {sum(valid)}/{n}, any JSON object {parsed}/{n}; e.g. {texts[0]!r} "
                  f"for keys {cases[0]}", flush=True)
    # With a grammar energy on top (several controls at once): "valid JSON so far" (whole canvas, and
    # semi-autoregressive blocks of 8), and a regex of the schema (an object with exactly these keys, any order).
    eng.set_controlnets({"json": 1.0})
    for name, block in (("ValidJson", None), ("ValidJson", 8), ("Regex(schema)", None)):
        texts, met = [], 0
        for i, keys in enumerate(cases):
            grammar = aios_rt.ValidJson() if name == "ValidJson" else aios_rt.Regex(schema_regex(keys))
            g = eng.diffuse("", length=48, steps=48, temperature=0.0, seed=i, control={"json": keys_prompt(keys)},
                            constraints=[grammar], block_length=block)
            texts.append(g.text)
            met += g.constraints[0]["met"]
        valid = sum(json_valid(t, keys) for t, keys in zip(texts, cases))
        key = f"prompt='' scale=1 +{name} block_length={block}"
        out[key] = {"valid_rate": valid / n, "json_object_rate": sum(_is_json_object(t) for t in texts) / n,
                    "whole_json_reported": met / n}
        print(f"json {key}: valid {valid}/{n}, any JSON object {out[key]['json_object_rate'] * n:.0f}/{n}", flush=True)
    eng.unload_controlnet("json")
    return out


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text.strip()), dict)
    except ValueError:
        return False


def _dilate(e: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(e[None, None].float(), 3, stride=1, padding=1)[0, 0] > 0


def edge_f1(gen_u8: np.ndarray, control: torch.Tensor) -> float:
    g = edge_map(torch.from_numpy(gen_u8).float()[None, None] / 127.5 - 1)[0, 0] > 0
    c = control > 0
    if g.sum() == 0 or c.sum() == 0:
        return 0.0
    precision = float((g & _dilate(c)).sum()) / float(g.sum())
    recall = float((c & _dilate(g)).sum()) / float(c.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def bench_edges(eng: aios_rt.Engine, path: str, n: int, data: Path) -> dict:
    from aios_train.mmdata import FASHION_CAPTIONS
    from unified_quality import pixels_unit, predict, train_judge

    imgs = dict(np.load(data / "images.npz"))
    judge, judge_acc = train_judge("image", pixels_unit(imgs["train_x"]), imgs["train_y"],
                                   pixels_unit(imgs["test_x"]), imgs["test_y"], 3, ROOT / "runs" / "bench-judges")
    eng.load_controlnet(path, name="edges")
    idx = np.random.default_rng(BENCH_SEED).choice(len(imgs["test_y"]), n, replace=False)
    out = {"judge_test_accuracy": judge_acc}
    for scale in (1.0, 0.0):
        eng.set_controlnets({"edges": scale})
        gens, f1s = [], []
        t0 = time.perf_counter()
        for j, i in enumerate(idx):
            src = torch.from_numpy(imgs["test_x"][i]).float()[None, None] / 127.5 - 1
            ctrl = edge_map(src)[0, 0]
            pixels = ((ctrl + 1) * 127.5).to(torch.uint8).numpy()
            g = eng.diffuse(FASHION_CAPTIONS[imgs["test_y"][i]], modality="image", steps=20, guidance=3.0, seed=j,
                            control={"edges": pixels})
            gen = np.asarray(g.image, dtype=np.uint8).reshape(28, 28)
            gens.append(gen)
            f1s.append(edge_f1(gen, ctrl))
        pred, _ = predict(judge, pixels_unit(np.stack(gens)))
        acc = float((pred == imgs["test_y"][idx]).mean())
        out[f"scale={scale:g}"] = {"edge_f1": float(np.mean(f1s)), "class_accuracy": acc,
                                    "seconds": round(time.perf_counter() - t0, 1)}
        print(f"edges scale {scale:g}: edge F1 {np.mean(f1s):.3f}, class accuracy {acc:.3f}", flush=True)
    # Reference: the edges of the source image itself (what a perfect copy would score) is F1 1 by construction;
    # the edges of another test image of the same class show what following only the caption gives.
    same = []
    ys = imgs["test_y"]
    for i in idx:
        others = np.flatnonzero(ys == ys[i])
        o = others[(np.searchsorted(others, i) + 1) % len(others)]
        c = edge_map(torch.from_numpy(imgs["test_x"][i]).float()[None, None] / 127.5 - 1)[0, 0]
        same.append(edge_f1(imgs["test_x"][o], c))
    out["same_class_other_image_edge_f1"] = float(np.mean(same))
    print(f"edges: another real image of the same class scores F1 {np.mean(same):.3f}", flush=True)
    eng.unload_controlnet("edges")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "aios-unified-tiny"))
    ap.add_argument("--json", default=str(SHIPPED / "json.controlnet.parquet"))
    ap.add_argument("--edges", default=str(SHIPPED / "edges.controlnet.parquet"))
    ap.add_argument("--data", default=str(ROOT / "data" / "mm"))
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", choices=["json", "edges"], default=None)
    a = ap.parse_args()
    eng = aios_rt.Engine(a.model, threads=a.threads)
    result = {"machine": machine(), "n": a.n}
    if a.only in (None, "json"):
        result["json"] = bench_json(eng, a.json, a.n)
    if a.only in (None, "edges"):
        result["edges"] = bench_edges(eng, a.edges, a.n, Path(a.data))
    emit("controlnet", result)


if __name__ == "__main__":
    main()
