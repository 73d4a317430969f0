"""Consistency-distilled image/audio students (LCM-LoRA, aios_train.lcm) and the runtime's "lcm" sampler: the
runtime samples a distilled LoRA like the PyTorch reference (same file, same noise); it warns when a student is
used outside what it learned; bad student metadata is refused; training writes a loadable adapter, resumes
exactly, and its pieces do what LCM says (boundary condition, the teacher's guided DDIM step)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import _train_path  # noqa: F401
import aios_rt
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.config import ModelConfig
from aios_train.continuous import alpha_sigma, ddim_step, sample_reference
from aios_train.export import read_fingerprint, read_metadata, save_model, write_tensors
from aios_train.lcm import (LcmArgs, consistency_x0, ddim_step_batch, distill_lcm, lcm_distance, read_lcm_meta,
                            teacher_solve, teacher_step)
from aios_train.lora import apply_lora, read_lora, resolve_targets, save_lora
from aios_train.media import unit_to_image
from aios_train.model import DiT, randomize_

ROOT = Path(__file__).resolve().parents[1]
MM = dict(vocab_size=300, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=48, mask_token_id=3,
          image_size=8, image_patch=4, audio_mels=16, audio_frames=16, audio_frames_per_token=4,
          audio_sample_rate=8000, audio_n_fft=256, audio_hop=64)
CAPTIONS = ["a t-shirt", "trousers", "a pullover", "a dress", "a coat", "a sandal", "a shirt", "a sneaker", "a bag",
            "an ankle boot", "zero one two three four five six seven eight nine the number"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("lcmbase")
    cfg = ModelConfig(**MM)
    model = randomize_(DiT(cfg), seed=0).eval()
    save_model(model, cfg, d / "model.f32.parquet")
    train_tiny_tokenizer(d / "tokenizer.json", CAPTIONS * 40, vocab_size=300)
    return d, model, cfg


def _student(d, model, cfg, path, distill=None, seed=1):
    """A random (trained-looking) LoRA on every block matrix, with `distill` metadata."""
    targets = resolve_targets(("attn_qkv", "attn_out", "mlp.0", "mlp.2"), cfg)
    shapes = {n: m.weight.shape for n, m in model.named_modules() if n in targets}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for m in targets:
        out_f, in_f = shapes[m]
        tensors[f"{m}.lora_A"] = torch.randn((4, in_f), generator=g) * 0.2
        tensors[f"{m}.lora_B"] = torch.randn((out_f, 4), generator=g) * 0.2
    cfg_l = {"rank": 4, "alpha": 4.0, "use_rslora": False, "target_modules": targets,
             "base_fingerprint": read_fingerprint(d / "model.f32.parquet"), "dropout": 0.0,
             "base_config": cfg.to_dict()}
    if distill is not None:
        cfg_l["distill"] = distill
    save_lora(path, tensors, cfg_l)
    return path


IMAGE_STUDENT = {"method": "lcm-lora", "modality": "image", "student_steps": 4, "guidance": 3.0}


def _tokens(eng, text, length):
    ids = eng.encode(text)
    return torch.tensor([[1] + ids + [2] + [0] * (length - 2 - len(ids))])


def test_lcm_sampler_with_a_student_matches_pytorch(base, tmp_path):
    d, model, cfg = base
    path = _student(d, model, cfg, tmp_path / "s.lora.parquet", IMAGE_STUDENT)
    eng = aios_rt.Engine(str(d), threads=2)
    plain = eng.diffuse("a bag", modality="image", steps=4, sampler="lcm", seed=7, text_length=8).image
    eng.load_adapter(str(path), name="lcm")
    g = eng.diffuse("a bag", modality="image", steps=4, sampler="lcm", seed=7, text_length=8)
    student = apply_lora(model, str(path))
    ref = sample_reference(student, _tokens(eng, "a bag", 8), "image", 4, sampler="lcm", seed=7)
    assert np.abs(g.image.astype(int) - unit_to_image(ref[0].numpy())[0].astype(int)).max() <= 1
    assert np.abs(g.image.astype(int) - plain.astype(int)).max() > 5, "the adapter must change the image"
    assert g.warnings == []
    # The student's forward pass (the canvas, image v) is the PyTorch one.
    x = np.random.default_rng(0).uniform(-1, 1, (1, 1, 8, 8)).astype(np.float32)
    toks = _tokens(eng, "a bag", 8)
    out = eng.forward_canvas(toks.tolist(), image=x, t_image=[0.6])
    with torch.no_grad():
        want = student.forward_canvas(toks, image=torch.from_numpy(x), t_image=torch.tensor([0.6]))["image"]
    assert np.abs(out["image"] - want.numpy()).max() < 1e-4
    # Audio with the same file: log-mels to float tolerance, and deterministic over thread counts.
    a = eng.diffuse("seven", modality="audio", steps=3, sampler="lcm", seed=3, text_length=6)
    ref_a = sample_reference(student, _tokens(eng, "seven", 6), "audio", 3, sampler="lcm", seed=3)
    assert np.abs(a.log_mel - ref_a[0].numpy()).max() < 1e-3
    one = aios_rt.Engine(str(d), threads=1)
    one.load_adapter(str(path), name="lcm")
    assert np.array_equal(one.diffuse("seven", modality="audio", steps=3, sampler="lcm", seed=3, text_length=6).log_mel,
                          a.log_mel)


def test_lcm_sampler_differs_from_ddim_and_ends_on_the_estimate(base):
    d, model, cfg = base
    eng = aios_rt.Engine(str(d), threads=1)
    a = eng.diffuse("a bag", modality="image", steps=3, sampler="lcm", seed=2).image
    b = eng.diffuse("a bag", modality="image", steps=3, sampler="ddim", seed=2).image
    assert not np.array_equal(a, b)
    # One step: both return the x0 estimate at t = 1 from the same start, so they agree exactly.
    a1 = eng.diffuse("a bag", modality="image", steps=1, sampler="lcm", seed=2).image
    b1 = eng.diffuse("a bag", modality="image", steps=1, sampler="ddim", seed=2).image
    assert np.array_equal(a1, b1)


def test_student_used_outside_its_training_warns(base, tmp_path):
    d, model, cfg = base
    eng = aios_rt.Engine(str(d), threads=1)
    eng.load_adapter(str(_student(d, model, cfg, tmp_path / "s.lora.parquet", IMAGE_STUDENT)), name="fast")
    ok = eng.diffuse("a bag", modality="image", steps=4, sampler="lcm", seed=1)
    assert ok.warnings == []
    w = eng.diffuse("a bag", modality="image", steps=4, sampler="ddim", seed=1).warnings
    assert len(w) == 1 and '"lcm"' in w[0] and '"fast"' in w[0]
    w = eng.diffuse("a bag", modality="image", steps=8, sampler="lcm", seed=1).warnings
    assert len(w) == 1 and "distilled for 4 steps" in w[0]
    w = eng.diffuse("a bag", modality="image", steps=4, sampler="lcm", guidance=2.0, seed=1).warnings
    assert len(w) == 1 and "guidance" in w[0]
    # An image student says nothing about audio; at weight 0 it is not active.
    assert eng.diffuse("seven", modality="audio", steps=8, sampler="ddim", seed=1).warnings == []
    eng.set_adapters({"fast": 0.0})
    assert eng.diffuse("a bag", modality="image", steps=20, sampler="ddim", seed=1).warnings == []


@pytest.mark.parametrize("distill, match", [
    ({"modality": "text", "student_steps": 4}, "image or audio"),
    ({"modality": "image", "student_steps": 0}, "student_steps"),
    ({"modality": "image", "student_steps": 4, "guidance": -1.0}, "guidance"),
    ({"modality": "image"}, "student_steps"),
])
def test_bad_student_metadata_is_refused(base, tmp_path, distill, match):
    d, model, cfg = base
    good = _student(d, model, cfg, tmp_path / "good.parquet", IMAGE_STUDENT)
    tensors, cfg_l = read_lora(good)
    bad = tmp_path / "bad.parquet"
    write_tensors(bad, tensors, kind="lora", config={**cfg_l, "distill": distill}, dtype="f32")
    eng = aios_rt.Engine(str(d), threads=1)
    before = eng.diffuse("a bag", modality="image", steps=2, sampler="lcm", seed=1).image
    with pytest.raises(ValueError, match=match):
        eng.load_adapter(str(bad), name="bad")
    assert eng.loaded_adapters == []
    assert np.array_equal(eng.diffuse("a bag", modality="image", steps=2, sampler="lcm", seed=1).image, before)


def test_consistency_pieces():
    # f(x, 0) = x exactly (the boundary condition), whatever v is.
    x, v = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    assert torch.equal(consistency_x0(v, x, torch.zeros(3, dtype=torch.float64)), x)
    # The batched DDIM step equals the reference sampler's step, per sample.
    t, s = torch.tensor([0.9, 0.5, 0.04]), torch.tensor([0.88, 0.48, 0.0])
    got = ddim_step_batch(x, v, t, s, 1.0)
    for i in range(3):
        want = ddim_step(x[i:i + 1], v[i:i + 1], float(t[i]), float(s[i]), 0.0, None, 1.0)
        assert torch.allclose(got[i:i + 1], want, atol=1e-5)
    assert lcm_distance(x, x, "huber").tolist() == [0.0] * 3
    assert lcm_distance(x, x + 1, "l2").tolist() == pytest.approx([1.0] * 3)


def test_teacher_step_applies_guidance(base):
    d, model, cfg = base
    toks = torch.randint(4, 300, (2, 8), generator=torch.Generator().manual_seed(0))
    unc = torch.full_like(toks, cfg.mask_token_id)
    x = torch.randn(2, 1, 8, 8)
    t, s = torch.tensor([0.7, 0.3]), torch.tensor([0.68, 0.28])
    with torch.no_grad():
        vc = model.forward_canvas(toks, image=x, t_image=t, text_logits=False)["image"]
        vu = model.forward_canvas(unc, image=x, t_image=t, text_logits=False)["image"]
    want = ddim_step_batch(x, vu + 3.0 * (vc - vu), t, s, 1.0)
    assert torch.allclose(teacher_step(model, toks, unc, x, t, s, 2.0, "image"), want, atol=1e-5)
    assert torch.allclose(teacher_step(model, toks, toks, x, t, s, 2.0, "image"), ddim_step_batch(x, vc, t, s, 1.0),
                          atol=1e-5)


def test_teacher_solve_passes_the_student_grid(base):
    d, model, cfg = base
    toks = torch.randint(4, 300, (2, 8), generator=torch.Generator().manual_seed(1))
    unc = torch.full_like(toks, cfg.mask_token_id)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    end, states = teacher_solve(model, toks, unc, x, 1.0, 8, [1.0, 0.5], 2.0, "image")
    assert sorted(states) == [0.5, 1.0] and torch.equal(states[1.0], x)
    y, seen = x, {}
    for k in range(8, 0, -1):
        seen[k / 8] = y
        y = teacher_step(model, toks, unc, y, torch.full((2,), k / 8), torch.full((2,), (k - 1) / 8), 2.0, "image")
    assert torch.equal(end, y) and torch.equal(states[0.5], seen[0.5])
    assert end.abs().max() <= 1.0  # the last step returns the clipped x0
    # Started half-way, it takes half the steps and ends on the same rule.
    end2, st2 = teacher_solve(model, toks, unc, seen[0.5], 0.5, 8, [1.0, 0.5], 2.0, "image")
    assert sorted(st2) == [0.5] and torch.allclose(end2, end, atol=1e-6)


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 8, 8), dtype=np.uint8), rng.integers(0, 10, n)


def test_training_writes_a_student_and_resumes_exactly(base, tmp_path):
    d, model, cfg = base
    x, y = _data()
    args = dict(teacher=str(d), media_x=x, media_y=y, text_length=16, teacher_steps=8, student_steps=2, rank=4,
                alpha=4.0, steps=4, batch_size=6, lr=1e-3, warmup=1, ckpt_every=2, progress=False)
    out = tmp_path / "a.lora.parquet"
    r = distill_lcm(LcmArgs(**args, out=str(out), run=str(tmp_path / "r1"), stop_after=2))
    assert r["stopped_early"] and not out.exists()
    r = distill_lcm(LcmArgs(**args, out=str(out), run=str(tmp_path / "r1")))
    assert r["done"] and r["steps"] == 4 and out.exists()
    assert read_lcm_meta(tmp_path / "r1" / "latest.lora.parquet")["train_steps"] == 4  # the student so far
    straight = tmp_path / "b.lora.parquet"
    distill_lcm(LcmArgs(**args, out=str(straight), run=str(tmp_path / "r2")))
    ta, tb = read_lora(out)[0], read_lora(straight)[0]
    assert all(np.array_equal(ta[k], tb[k]) for k in ta), "a resumed run continues identically"
    assert max(float(np.abs(v).max()) for k, v in ta.items() if k.endswith("lora_B")) > 0, "it trained"
    meta = read_lcm_meta(out)
    assert meta["modality"] == "image" and meta["student_steps"] == 2 and meta["guidance"] == 3.0
    assert meta["train_steps"] == 4 and meta["examples"] == 24
    eng = aios_rt.Engine(str(d), threads=1)
    eng.load_adapter(str(out), name="lcm")
    assert eng.diffuse("a bag", modality="image", steps=2, sampler="lcm", seed=0).warnings == []
    with pytest.raises(ValueError, match="other settings"):
        distill_lcm(LcmArgs(**{**args, "lr": 5e-4}, out=str(out), run=str(tmp_path / "r1")))


def test_warm_start_from_an_earlier_student(base, tmp_path):
    """--init continues from a finished student under a new schedule: at lr 0 the student is returned unchanged;
    with training it moves from there; a student of another rank or alpha is refused."""
    d, model, cfg = base
    x, y = _data()
    first = _student(d, model, cfg, tmp_path / "first.lora.parquet", IMAGE_STUDENT)
    args = dict(teacher=str(d), media_x=x, media_y=y, text_length=16, teacher_steps=8, student_steps=2, rank=4,
                alpha=4.0, steps=2, batch_size=6, warmup=1, progress=False, init=str(first))
    same = tmp_path / "same.lora.parquet"
    assert distill_lcm(LcmArgs(**args, lr=0.0, out=str(same)))["done"]
    t0, t1 = read_lora(first)[0], read_lora(same)[0]
    assert sorted(t0) == sorted(t1) and all(np.array_equal(t0[k], t1[k]) for k in t0)
    assert read_lcm_meta(same)["init"] == str(first)  # provenance: the steps count from the warm start
    moved = tmp_path / "moved.lora.parquet"
    distill_lcm(LcmArgs(**args, lr=1e-3, out=str(moved)))
    t2 = read_lora(moved)[0]
    assert all(np.abs(t2[k] - t0[k]).max() < 0.1 for k in t0) and any(not np.array_equal(t2[k], t0[k]) for k in t0)
    with pytest.raises(ValueError, match="rank"):
        distill_lcm(LcmArgs(**{**args, "rank": 2, "alpha": 2.0}, out=str(tmp_path / "x.parquet")))
    with pytest.raises(ValueError, match="alpha"):
        distill_lcm(LcmArgs(**{**args, "alpha": 8.0}, out=str(tmp_path / "y.parquet")))


def test_lcd_target_trains(base, tmp_path):
    d, model, cfg = base
    x, y = _data()
    out = tmp_path / "lcd.lora.parquet"
    r = distill_lcm(LcmArgs(teacher=str(d), out=str(out), media_x=x, media_y=y, target="lcd", text_length=16,
                            student_steps=2, rank=2, steps=2, batch_size=4, lr=1e-3, warmup=1, progress=False))
    meta = read_lcm_meta(out)
    assert r["done"] and meta["target"] == "lcd" and meta["teacher_steps"] == 50 and meta["pairs"] == 8


def test_audio_training_and_bad_settings(base, tmp_path):
    d, model, cfg = base
    rng = np.random.default_rng(1)
    mels, y = rng.normal(size=(12, 16, 16)).astype(np.float32), rng.integers(0, 10, 12)
    out = tmp_path / "audio.lora.parquet"
    r = distill_lcm(LcmArgs(teacher=str(d), out=str(out), media_x=mels, media_y=y, modality="audio", text_length=16,
                            teacher_steps=8, student_steps=2, rank=2, steps=2, batch_size=4, progress=False))
    assert r["done"] and read_lcm_meta(out)["modality"] == "audio"
    common = dict(teacher=str(d), out=str(tmp_path / "x.parquet"), media_x=_data()[0], media_y=_data()[1],
                  text_length=16, steps=1, batch_size=2, progress=False)
    for over, match in [({"modality": "video"}, "unknown modality"), ({"loss": "kl-bwd"}, "unknown loss"),
                        ({"guidance": float("nan")}, "guidance"), ({"student_steps": 8, "teacher_steps": 8}, "fewer"),
                        ({"student_steps": 4, "teacher_steps": 10}, "multiple"), ({"target": "cd"}, "unknown target"),
                        ({"media_y": np.full(24, 12)}, "label"), ({"media_x": mels, "media_y": y}, "shape")]:
        with pytest.raises(ValueError, match=match):
            distill_lcm(LcmArgs(**{**common, **over}))
    text_only = tmp_path / "text"
    text_only.mkdir()
    tcfg = ModelConfig(**{k: v for k, v in MM.items() if not k.startswith(("image", "audio"))})
    save_model(randomize_(DiT(tcfg), seed=0), tcfg, text_only / "model.f32.parquet")
    (text_only / "tokenizer.json").write_bytes((d / "tokenizer.json").read_bytes())
    with pytest.raises(ValueError, match="text-only"):
        distill_lcm(LcmArgs(**{**common, "teacher": str(text_only)}))


def test_cli_distill_image_and_generate(base, tmp_path):
    d, model, cfg = base
    x, y = _data()
    data = tmp_path / "mm"
    data.mkdir()
    np.savez(data / "images.npz", train_x=x, train_y=y)
    np.savez(data / "audio.npz", train_x=np.zeros((2, 16, 16), np.float32), train_y=np.zeros(2, np.int64))
    (data / "SOURCES.json").write_text("{}")
    out = tmp_path / "lcm.lora.parquet"
    env = {"PYTHONPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "aios_train", "distill", "--teacher", str(d), "--modality", "image",
                        "--data", str(data), "--out", str(out), "--student-steps", "2",
                        "--steps", "2", "--batch-size", "4", "--rank", "2", "--text-length", "16"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["out"] == str(out)
    # without --teacher-steps the ode target's grid is 4 x the student's steps
    assert json.loads(read_metadata(out)["aios.config"])["distill"]["teacher_steps"] == 8
    more = tmp_path / "more.lora.parquet"
    r = subprocess.run([sys.executable, "-m", "aios_train", "distill", "--teacher", str(d), "--modality", "image",
                        "--data", str(data), "--out", str(more), "--student-steps", "2", "--init", str(out),
                        "--steps", "1", "--batch-size", "4", "--rank", "2", "--text-length", "16"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and more.exists(), r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "aios_train", "distill", "--teacher", str(d), "--init", str(out),
                        "--out", str(tmp_path / "t.parquet")], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and "--init is for image/audio" in r.stderr
    bin_ = ROOT / "target" / "release" / "aios-run"
    png = tmp_path / "x.png"
    g = subprocess.run([str(bin_), "generate", "--model", str(d), "--threads", "1", "--modality", "image", "--adapter",
                        str(out), "--sampler", "lcm", "--steps", "2", "--out", str(png), "a bag"],
                       capture_output=True, text=True, timeout=120)
    assert g.returncode == 0 and png.exists(), g.stderr
    assert "warning" not in g.stderr
    g = subprocess.run([str(bin_), "generate", "--model", str(d), "--threads", "1", "--modality", "image", "--adapter",
                        str(out), "--sampler", "ddim", "--steps", "2", "--out", str(png), "a bag"],
                       capture_output=True, text=True, timeout=120)
    assert g.returncode == 0 and 'sampler "lcm"' in g.stderr
    assert alpha_sigma(0.0)[1] == 0  # the boundary the sampler's last step relies on


def test_energies_steer_the_lcm_sampler(base):
    d, model, cfg = base
    eng = aios_rt.Engine(str(d), threads=1)
    left = (0, 0, 4, 8)
    means = {}
    for target in (0.1, 0.9):
        imgs = [eng.diffuse("a bag", modality="image", steps=4, sampler="lcm", seed=s,
                            constraints=[aios_rt.Brightness(left, target, weight=1.0)]).image for s in range(4)]
        means[target] = float(np.mean([im[:, :4] for im in imgs])) / 255
    assert means[0.1] < 0.3 and means[0.9] > 0.7, means
