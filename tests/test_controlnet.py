"""ControlNets: PyTorch (aios_train.controlnet) and the runtime (Engine.load_controlnet) give the same outputs
from the same file, for a token control (logits) and an image control (the image head's v); scale 0 and a fresh
(zero-initialised) ControlNet give the base exactly; bad files and inputs are refused with the engine unchanged;
swapping ControlNets while generations run keeps each generation's snapshot; training writes a usable file."""

import json
import threading

import numpy as np
import pytest
import torch

import _train_path  # noqa: F401
import aios_rt
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.config import ModelConfig
from aios_train.controlnet import (ControlNet, ControlNetArgs, control_tokens, edge_map, json_example, json_valid,
                                   load_controlnet, save_controlnet, train_controlnet)
from aios_train.export import FormatError, read_fingerprint, save_model, write_tensors
from aios_train.model import DiT, randomize_

TOL = 1e-4
MM = dict(vocab_size=300, hidden_size=64, n_layers=3, n_heads=4, cond_dim=32, max_length=48, mask_token_id=3,
          image_size=8, image_patch=4)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("cnbase")
    cfg = ModelConfig(**MM)
    model = randomize_(DiT(cfg), seed=0).eval()
    save_model(model, cfg, d / "model.f32.parquet")
    train_tiny_tokenizer(d / "tokenizer.json", ["name, age, city", "a sneaker and a bag", '{"name": "Anna"}'] * 50,
                         vocab_size=300)
    return d, model, cfg


def _random_net(model, control, seed=1, n_blocks=2):
    net = ControlNet(model, control, n_blocks=n_blocks, rank=4, alpha=8.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def _save(net, d, name, base_dir):
    path = d / f"{name}.controlnet.parquet"
    save_controlnet(net, path, read_fingerprint(base_dir / "model.f32.parquet"))
    return path


def test_token_control_logits_match_pytorch(base, tmp_path):
    d, model, cfg = base
    net = _random_net(model, "tokens")
    path = _save(net, tmp_path, "keys", d)
    eng = aios_rt.Engine(str(d), threads=2)
    toks = torch.randint(4, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    toks[:, 5:12] = cfg.mask_token_id
    text = "name, age"
    from aios_train.tokenizer import load_tokenizer
    ctrl = torch.tensor([control_tokens(load_tokenizer(str(d / "tokenizer.json")), text, 20, cfg)] * 2)
    plain = eng.logits(toks.tolist())
    eng.load_controlnet(path, name="keys", scale=0.7)
    got = eng.logits(toks.tolist(), control={"keys": text})
    with torch.no_grad():
        want = model(toks, control=net.bind(ctrl, 0.7)).numpy()
        base_logits = model(toks).numpy()
    assert np.abs(got - want).max() < TOL
    assert np.abs(got - plain).max() > 1e-2, "the ControlNet must change the logits"
    # Scale 0 (or no input for it) is the base exactly.
    eng.set_controlnets({"keys": 0.0})
    assert np.array_equal(eng.logits(toks.tolist()), plain)
    eng.set_controlnets({"keys": 0.7})
    assert np.array_equal(eng.logits(toks.tolist()), plain), "an active net without an input is not applied"
    assert np.abs(plain - base_logits).max() < TOL
    # Reloading the file in PyTorch gives the same module.
    net2, cfg2 = load_controlnet(path, model)
    with torch.no_grad():
        assert torch.equal(model(toks, control=net2.bind(ctrl, 0.7)), model(toks, control=net.bind(ctrl, 0.7)))
    assert cfg2["control"] == "tokens" and cfg2["n_blocks"] == 2


def test_image_control_matches_pytorch_and_scale_zero_is_the_base(base, tmp_path):
    d, model, cfg = base
    net = _random_net(model, "image", seed=2, n_blocks=3)
    path = _save(net, tmp_path, "edges", d)
    eng = aios_rt.Engine(str(d), threads=2)
    g = torch.Generator().manual_seed(5)
    toks = torch.randint(4, cfg.vocab_size, (2, 6), generator=g)
    img = torch.randn(2, 1, 8, 8, generator=g)
    t = [0.3, 0.8]
    edges = (torch.rand(8, 8, generator=g) > 0.5).float()       # [0, 1] pixels
    plain = eng.forward_canvas(toks.tolist(), image=img.numpy(), t_image=t)
    eng.load_controlnet(path, name="edges")
    eng.set_controlnets({"edges": 0.9})
    got = eng.forward_canvas(toks.tolist(), image=img.numpy(), t_image=t, control={"edges": edges.numpy()})
    ctrl = (edges * 2 - 1)[None, None].expand(2, 1, 8, 8)
    with torch.no_grad():
        want = model.forward_canvas(toks, image=img, t_image=torch.tensor(t), control=net.bind(ctrl, 0.9))
    for k in ("text", "image"):
        assert np.abs(got[k] - want[k].numpy()).max() < TOL, k
    assert np.abs(got["image"] - plain["image"]).max() > 1e-3
    eng.set_controlnets({"edges": 0.0})
    again = eng.forward_canvas(toks.tolist(), image=img.numpy(), t_image=t, control={"edges": edges.numpy()})
    assert np.array_equal(again["image"], plain["image"]) and np.array_equal(again["text"], plain["text"])
    assert eng.controlnets == {"active": {"edges": 0.0}, "loaded": {"edges": "image"}}
    eng.unload_controlnet("edges")
    assert eng.controlnets == {"active": {}, "loaded": {}}


def test_fresh_controlnet_is_the_base_and_parameters_stay_small(base, tmp_path):
    d, model, cfg = base
    net = ControlNet(model, "tokens", n_blocks=1, rank=2)
    toks = torch.randint(4, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(toks, control=net.bind(toks)), model(toks))
    real = DiT(ModelConfig(vocab_size=4096, hidden_size=256, n_layers=4, n_heads=4, cond_dim=128, max_length=128, mask_token_id=3,
                           image_size=28, image_patch=4))
    big = ControlNet(real, "image", n_blocks=2, rank=16)
    assert big.num_parameters() < 0.1 * sum(p.numel() for p in real.parameters())  # REQ-8


def test_generation_with_a_control_is_deterministic_and_snapshots_survive_swaps(base, tmp_path):
    d, model, cfg = base
    path = _save(_random_net(model, "tokens", seed=7), tmp_path, "keys", d)
    eng = aios_rt.Engine(str(d), threads=1)
    eng.load_controlnet(path, name="keys", scale=2.0)
    kw = dict(length=24, steps=8, seed=3, sampler="ancestral")
    with_ctrl = eng.diffuse("name", control={"keys": "name, age"}, **kw)
    assert eng.diffuse("name", control={"keys": "name, age"}, **kw).tokens == with_ctrl.tokens
    eng.set_controlnets({"keys": 0.0})
    without = eng.diffuse("name", **kw)
    assert without.tokens != with_ctrl.tokens
    # Swapping the scale while generations run (another thread flips it 0 <-> 2 throughout): each generation runs
    # with the set it started with, so its tokens are those of one of the two settings, never a mix.
    eng.set_controlnets({"keys": 2.0})
    long_kw = dict(kw, steps=24)
    with_long = eng.diffuse("name", control={"keys": "name, age"}, **long_kw).tokens
    eng.set_controlnets({"keys": 0.0})
    without_long = eng.diffuse("name", control={"keys": "name, age"}, **long_kw).tokens
    assert with_long != without_long
    stop = threading.Event()
    results, errors = [], []

    def flip():
        while not stop.is_set():
            for s in (2.0, 0.0):
                eng.set_controlnets({"keys": s})

    def gen():
        try:
            for _ in range(4):
                results.append(eng.diffuse("name", control={"keys": "name, age"}, **long_kw).tokens)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    flipper = threading.Thread(target=flip)
    workers = [threading.Thread(target=gen) for _ in range(2)]
    flipper.start()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    flipper.join()
    assert not errors and len(results) == 8
    assert all(r in (with_long, without_long) for r in results)


def test_bad_controlnets_and_inputs_are_refused(base, tmp_path):
    d, model, cfg = base
    net = _random_net(model, "tokens")
    good = _save(net, tmp_path, "good", d)
    eng = aios_rt.Engine(str(d), threads=1)
    before = eng.logits([[5, 6, 7, 3, 3]])
    # Another base's fingerprint, another config, a LoRA file, truncated, missing tensor, bad kind.
    other = tmp_path / "other.controlnet.parquet"
    save_controlnet(net, other, "0123456789abcdef")
    with pytest.raises(ValueError, match="trained on base model"):
        eng.load_controlnet(other)
    tensors = net.tensors()
    ccfg = {"control": "tokens", "n_blocks": 2, "rank": 4, "alpha": 8.0,
            "base_fingerprint": read_fingerprint(d / "model.f32.parquet"), "base_config": cfg.to_dict()}
    bad_cases = {
        "shape": ({**tensors, "zero.0.weight": np.zeros((64, 32), np.float32)}, ccfg),
        "missing": ({k: v for k, v in tensors.items() if k != "input.bias"}, ccfg),
        "kind": (tensors, {**ccfg, "control": "audio"}),
        "blocks": (tensors, {**ccfg, "n_blocks": 9}),
        "config": (tensors, {**ccfg, "base_config": {**cfg.to_dict(), "n_layers": 2}}),
    }
    for name, (t, c) in bad_cases.items():
        p = tmp_path / f"{name}.controlnet.parquet"
        write_tensors(p, t, kind="controlnet", config=c)
        with pytest.raises((ValueError, OSError)):
            eng.load_controlnet(p)
        with pytest.raises((FormatError, ValueError)):
            load_controlnet(p, model, read_fingerprint(d / "model.f32.parquet"))
    trunc = tmp_path / "trunc.controlnet.parquet"
    trunc.write_bytes(good.read_bytes()[:1000])
    with pytest.raises((ValueError, OSError)):
        eng.load_controlnet(trunc)
    with pytest.raises(ValueError, match="not finite"):
        eng.load_controlnet(good, scale=float("nan"))
    assert eng.controlnets == {"active": {}, "loaded": {}}
    eng.load_controlnet(good, name="k", scale=1.0)
    with pytest.raises(ValueError, match="already loaded"):
        eng.load_controlnet(good, name="k")
    with pytest.raises(ValueError, match="not finite"):
        eng.set_controlnets({"k": float("inf")})
    with pytest.raises(ValueError, match="no ControlNet named"):
        eng.set_controlnets({"nope": 1.0})
    with pytest.raises(ValueError, match="no active ControlNet"):
        eng.diffuse("x", length=12, steps=2, control={"nope": "a"})
    with pytest.raises(ValueError, match="give it text"):
        eng.diffuse("x", length=12, steps=2, control={"k": np.zeros((8, 8), np.uint8)})
    with pytest.raises(ValueError, match="do not fit"):
        eng.diffuse("x", length=4, steps=2, control={"k": "name, age, city, name, age, city"})
    assert np.array_equal(eng.logits([[5, 6, 7, 3, 3]]), before)
    # Image controls: wrong size, NaN, on a text generation.
    img_net = _save(_random_net(model, "image"), tmp_path, "img", d)
    eng.load_controlnet(img_net, name="edges", scale=1.0)
    for bad, msg in [(np.zeros((4, 4), np.uint8), "pixels, expected"),
                     (np.full((8, 8), np.nan, np.float32), "NaN"),
                     (np.zeros((2, 8, 8, 1), np.uint8), "must be")]:
        with pytest.raises(ValueError, match=msg):
            eng.diffuse("a bag", modality="image", steps=2, control={"edges": bad})
    with pytest.raises(ValueError, match="image control"):
        eng.diffuse("x", length=12, steps=2, control={"edges": np.zeros((8, 8), np.uint8)})
    with pytest.raises(ValueError, match="give it an image"):
        eng.diffuse("a bag", modality="image", steps=2, control={"edges": "text"})
    # The PyTorch side refuses a NaN control image and a wrong-shaped token control.
    net_img, _ = load_controlnet(img_net, model)
    with pytest.raises(ValueError, match="NaN"):
        model.forward_canvas(torch.zeros(1, 4, dtype=torch.long), image=torch.zeros(1, 1, 8, 8),
                             t_image=torch.tensor([0.5]), control=net_img.bind(torch.full((1, 1, 8, 8), float("nan"))))
    with pytest.raises(ValueError, match="token control"):
        model(torch.zeros(1, 6, dtype=torch.long), control=net.bind(torch.zeros(1, 5, dtype=torch.long)))


def test_json_and_edge_helpers():
    rng = np.random.default_rng(0)
    for _ in range(50):
        keys, text = json_example(rng)
        assert json_valid(text, keys) and not json_valid(text[:-1], keys)
    assert not json_valid('{"a": 1}', ["a", "b"]) and not json_valid("[1]", [])
    img = torch.full((1, 1, 8, 8), -1.0)
    img[..., 2:6, 2:6] = 1.0
    e = edge_map(img)
    assert set(e.unique().tolist()) == {-1.0, 1.0} and e[0, 0, 0, 0] == -1 and e[0, 0, 2, 2] == 1


def test_training_writes_a_loadable_controlnet_and_resumes(base, tmp_path):
    d, model, cfg = base
    out = tmp_path / "json.controlnet.parquet"
    args = dict(base=str(d), control="json", out=str(out), run=str(tmp_path / "run"), n_blocks=1, rank=2, steps=6,
                batch_size=4, text_length=40, ckpt_every=3, progress=False)
    r = train_controlnet(ControlNetArgs(**args, time_limit_min=0.0))  # stops after one step with a checkpoint
    assert r["stopped_early"] and not out.exists()
    r = train_controlnet(ControlNetArgs(**args))
    assert r["done"] and r["steps"] == 6 and out.exists()
    one = train_controlnet(ControlNetArgs(**{**args, "out": str(tmp_path / "b.parquet"), "run": str(tmp_path / "r2")}))
    a_t, b_t = (load_controlnet(p, model)[0].tensors() for p in (out, tmp_path / "b.parquet"))
    assert all(np.array_equal(a_t[k], b_t[k]) for k in a_t), "a resumed run continues identically"
    eng = aios_rt.Engine(str(d), threads=1)
    eng.load_controlnet(out, scale=1.0)
    assert json.loads(__import__("aios_train.export", fromlist=["read_metadata"]).read_metadata(out)["aios.config"])[
        "train_steps"] == 6
    assert one["params"] < 0.2 * sum(p.numel() for p in model.parameters())


def test_cli_control(base, tmp_path):
    import subprocess
    from pathlib import Path

    d, model, cfg = base
    bin_ = str(Path(__file__).resolve().parents[1] / "target" / "release" / "aios-run")
    keys = _save(_random_net(model, "tokens"), tmp_path, "keys", d)
    edges = _save(_random_net(model, "image"), tmp_path, "edges", d)
    png = tmp_path / "edges.png"
    g = aios_rt.Engine(str(d), threads=1).diffuse("a bag", modality="image", steps=2)
    g.save(str(png))
    run = lambda *a: subprocess.run([bin_, "generate", "--model", str(d), "--threads", "1", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    plain = run("--length", "20", "--steps", "4", "--quiet", "name")
    r = run("--length", "20", "--steps", "4", "--quiet", "--control", f"{keys}:2", "--control-input", "name, age", "name")
    assert r.returncode == 0 and plain.returncode == 0, r.stderr
    assert r.stdout != plain.stdout
    out = tmp_path / "x.png"
    r = run("--modality", "image", "--steps", "2", "--control", str(edges), "--control-input", str(png), "--out", str(out),
            "a bag")
    assert r.returncode == 0 and out.is_file(), r.stderr
    for args, msg in [(("--control", str(keys), "name"), "--control-input"),
                      (("--control", str(edges), "--control-input", str(tmp_path / "nope.png"), "--modality", "image",
                        "--out", str(out), "x"), "nope.png"),
                      (("--control", str(tmp_path / "missing.parquet"), "--control-input", "a", "x"), "missing")]:
        r = run(*args)
        assert r.returncode != 0 and msg in r.stderr and "panicked" not in r.stderr, r.stderr


def test_training_can_start_from_a_controlnet(base, tmp_path):
    d, model, cfg = base
    first = tmp_path / "a.controlnet.parquet"
    args = dict(base=str(d), control="json", n_blocks=1, rank=2, batch_size=4, text_length=40, progress=False)
    train_controlnet(ControlNetArgs(**args, out=str(first), run=str(tmp_path / "r1"), steps=3))
    zero_lr = train_controlnet(ControlNetArgs(**args, out=str(tmp_path / "b.parquet"), run=str(tmp_path / "r2"),
                                              steps=1, lr=0.0, init=str(first)))
    a_t, b_t = (load_controlnet(p, model)[0].tensors() for p in (first, tmp_path / "b.parquet"))
    assert zero_lr["done"] and all(np.array_equal(a_t[k], b_t[k]) for k in a_t)  # lr 0: the start, unchanged
    img = _save(_random_net(model, "image", n_blocks=1), tmp_path, "img", d)
    with pytest.raises(ValueError, match="--init"):
        train_controlnet(ControlNetArgs(**args, out=str(tmp_path / "c.parquet"), run=str(tmp_path / "r3"), steps=1,
                                        init=str(img)))
