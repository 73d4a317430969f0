"""LoRA adapters: generation latency with 0, 1 and 4 active adapters (f32 and
int4 base) and adapter load time, aios_rt against PyTorch eager + peft on the
same weights, in the same run.

Adapters are random (rank 8, all four matrices of every block) for the base's
fingerprint, so the script runs on any model. Both sides use the greedy
confidence sampler on the same canvas; with one adapter on the f32 base the
script checks they produce the same tokens.

    python bench/bench_lora.py [--model models/aios-text-tiny] [--length 64] [--steps 16] [--threads 2]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict  # noqa: E402

import aios_rt  # noqa: E402
from aios_train.export import load_model  # noqa: E402
from aios_train.samplers import confidence_sample  # noqa: E402
from common import emit, machine, median_ms, text_generation_args  # noqa: E402

RANK = 8


def peft_model(model, files):
    """One peft model holding every adapter file (adapter names a0, a1, ...)."""
    pm = None
    for i, f in enumerate(files):
        tensors, meta = aios_rt.read_tensors_with_metadata(f)
        c = json.loads(meta["aios.config"])
        lc = LoraConfig(r=c["rank"], lora_alpha=c["alpha"], use_rslora=c["use_rslora"],
                        target_modules=c["target_modules"], bias="none")
        name = f"a{i}"
        if pm is None:
            pm = get_peft_model(model, lc, adapter_name=name)
        else:
            pm.add_adapter(name, lc)
        sd = {f"base_model.model.{k}.weight": torch.from_numpy(v) for k, v in tensors.items()}
        res = set_peft_model_state_dict(pm, sd, adapter_name=name)
        assert not [k for k in res.unexpected_keys if "lora" in k], res.unexpected_keys
    pm.eval()
    return pm


def main() -> None:
    ap = text_generation_args(__doc__)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    f32 = model_dir / "model.f32.parquet"
    tmp = Path(tempfile.mkdtemp(prefix="aios-bench-lora-"))

    eng = aios_rt.Engine(f32, threads=args.threads)
    if eng.fingerprint is None:
        sys.exit(f"{f32} has no aios.fingerprint; re-export it with aios_train")
    cfg = json.loads(eng.config_json)
    modules = [f"blocks.{i}.{m}" for i in range(cfg["n_layers"]) for m in ("attn_qkv", "attn_out", "mlp.0", "mlp.2")]
    files = []
    for i in range(4):
        files.append(tmp / f"a{i}.lora.parquet")
        aios_rt.write_random_lora(files[-1], eng.config_json, eng.fingerprint, modules, rank=RANK, alpha=16.0, seed=i)
    canvas = [1] + eng.encode(args.prompt)
    canvas += [eng.mask_token_id] * (args.length - len(canvas))
    gen = lambda e: e.diffuse_tokens(canvas, steps=args.steps, sampler="confidence", temperature=0.0)  # noqa: E731

    # PyTorch + peft, f32 weights.
    base, mcfg = load_model(f32)
    pm = peft_model(base, files)
    torch_ms = {}
    with torch.inference_mode():
        with pm.disable_adapter():
            torch_ms[0], _ = median_ms(lambda: confidence_sample(pm, canvas, args.steps, mcfg.mask_token_id), args.runs)
        pm.base_model.set_adapter("a0")
        ref_one, _, _ = confidence_sample(pm, canvas, args.steps, mcfg.mask_token_id)
        torch_ms[1], _ = median_ms(lambda: confidence_sample(pm, canvas, args.steps, mcfg.mask_token_id), args.runs)
        pm.base_model.set_adapter(["a0", "a1", "a2", "a3"])
        torch_ms[4], _ = median_ms(lambda: confidence_sample(pm, canvas, args.steps, mcfg.mask_token_id), args.runs)

    def peft_load():
        m, _ = load_model(f32)
        peft_model(m, files[:1])
    torch_load_ms, _ = median_ms(peft_load, args.runs)
    base_load_ms, _ = median_ms(lambda: load_model(f32), args.runs)

    rust_ms, same = {}, None
    for dtype in ["f32", "int4"]:
        e = aios_rt.Engine(model_dir / f"model.{dtype}.parquet", threads=args.threads)
        for i, f in enumerate(files):
            e.load_adapter(f, name=f"a{i}", weight=None)
        for n in (0, 1, 4):
            e.set_adapters({f"a{i}": 1.0 for i in range(n)})
            rust_ms[dtype, n], _ = median_ms(lambda: gen(e), args.runs)
            if dtype == "f32" and n == 1:
                same = gen(e).tokens == ref_one

    def rust_load():
        eng.load_adapter(files[0], name="x")
        eng.unload_adapter("x")
    rust_load_ms, _ = median_ms(rust_load, args.runs * 3)

    print(f"machine: {machine()}")
    print(f"model {model_dir.name}; adapters rank {RANK} on {len(modules)} matrices; length {args.length}, "
          f"steps {args.steps}, batch 1, threads {args.threads}, median of {args.runs}")
    print("| active adapters | PyTorch + peft (f32) | aios_rt f32 | aios_rt int4 | f32 speed-up |")
    print("|---|---|---|---|---|")
    for n in (0, 1, 4):
        print(f"| {n} | {torch_ms[n]:.1f} ms | {rust_ms['f32', n]:.1f} ms | {rust_ms['int4', n]:.1f} ms | "
              f"{torch_ms[n] / rust_ms['f32', n]:.2f}x |")
    for dtype in ["f32", "int4"]:
        per = (rust_ms[dtype, 4] - rust_ms[dtype, 0]) / 4
        print(f"aios_rt {dtype}: overhead per active adapter {per:.1f} ms "
              f"({100 * per / rust_ms[dtype, 0]:.1f}% of the base generation)")
    print(f"adapter load: aios_rt {rust_load_ms:.2f} ms (load + validate + activate, no model reload); "
          f"PyTorch+peft {torch_load_ms - base_load_ms:.1f} ms (wrap + load state, base load of "
          f"{base_load_ms:.1f} ms subtracted)")
    print(f"same tokens as PyTorch+peft (f32, 1 adapter, greedy): {same}")
    emit("lora", {"torch_ms": {str(k): v for k, v in torch_ms.items()},
                  "rust_ms": {f"{d}/{n}": v for (d, n), v in rust_ms.items()},
                  "rust_load_ms": rust_load_ms, "torch_load_ms": torch_load_ms - base_load_ms,
                  "same_tokens": same, "threads": args.threads})


if __name__ == "__main__":
    main()
