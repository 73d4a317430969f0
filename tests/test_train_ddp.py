"""Data-parallel training under torchrun: 2 processes with gloo on CPU give the weights of a 1-process run with
the same global batch (float tolerance), checkpoint once (rank 0), and resume exactly after an interruption."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

import _train_path  # noqa: F401
from _tiny_tokenizer import train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
TEXTS = [f"the cat sat on the mat and the dog ran to the park number {i} with a red ball" for i in range(80)]

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun (part of PyTorch) is not installed")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    train_tiny_tokenizer(d / "tokenizer.json", TEXTS, vocab_size=300)
    (d / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    return d


def run(corpus, out, procs, *extra):
    args = ["-m", "aios_train", "train", "--train", str(corpus / "train.jsonl"), "--valid", "", "--tokenizer",
            str(corpus / "tokenizer.json"), "--out", str(out), "--hidden-size", "32", "--n-layers", "2", "--n-heads",
            "2", "--cond-dim", "16", "--max-length", "16", "--steps", "6", "--batch-size", "8", "--warmup", "2",
            "--ckpt-every", "100", "--eval-every", "0", "--threads", "1", *extra]
    cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", str(procs), *args] if procs > 1 else [sys.executable, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def weights(out):
    t = load_file(str(out / "ckpt" / "state.safetensors"))
    return {k: v for k, v in t.items() if k.startswith(("model/", "ema/"))}


def test_two_processes_match_one(corpus, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    run(corpus, one, 1)
    r = run(corpus, two, 2)
    assert r.stdout.count('"steps": 6') == 1  # rank 0 alone reports
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    worst = max(float(abs(a[k] - b[k]).max()) for k in a)
    assert worst < 1e-5, worst
    logs = (two / "log.jsonl").read_text().splitlines()
    assert len(logs) == 6  # rank 0 alone logs
    one_losses = [json.loads(x)["loss"] for x in (one / "log.jsonl").read_text().splitlines()]
    assert [json.loads(x)["loss"] for x in logs] == pytest.approx(one_losses, rel=1e-4)
    # Resume: stop after 3 steps, run the same command again: the same weights as the uninterrupted run.
    cut = tmp_path / "cut"
    run(corpus, cut, 2, "--stop-after", "3")
    run(corpus, cut, 2)
    c = weights(cut)
    assert max(float(abs(b[k] - c[k]).max()) for k in b) < 1e-6


def test_batch_must_split_over_processes(corpus, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "aios_train", "train", "--train",
                        str(corpus / "train.jsonl"), "--valid", "", "--tokenizer", str(corpus / "tokenizer.json"),
                        "--out", str(tmp_path / "x"), "--hidden-size", "32", "--n-layers", "1", "--n-heads", "2",
                        "--cond-dim", "16", "--max-length", "16", "--steps", "2", "--batch-size", "7"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert r.returncode != 0 and "does not split over 2 processes" in r.stderr


def test_lora_two_processes_match_one(corpus, tmp_path):
    from aios_train.config import ModelConfig
    from aios_train.export import save_model
    from aios_train.lora import read_lora
    from aios_train.model import DiT, randomize_
    from tokenizers import Tokenizer

    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(corpus / "tokenizer.json", base / "tokenizer.json")
    vocab = Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size()
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_length=16,
                      mask_token_id=3)
    save_model(randomize_(DiT(cfg), seed=0), cfg, base / "model.f32.parquet")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"lora{procs}.lora.parquet"
        args = ["-m", "aios_train", "lora", "--base", str(base), "--data", str(corpus / "train.jsonl"), "--out",
                str(out), "--rank", "4", "--steps", "5", "--batch-size", "8", "--warmup", "2", "--eval-n-t", "2",
                "--valid-fraction", "0.1"]
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args] if procs > 1 else [sys.executable, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-4000:]
        assert r.stdout.count('"out"') == 1  # rank 0 alone reports
        outs[procs] = read_lora(out)[0]
    a, b = outs[1], outs[2]
    assert a.keys() == b.keys()
    assert max(float(abs(a[k] - b[k]).max()) for k in a) < 1e-5
    assert max(float(abs(a[k]).max()) for k in a if k.endswith("lora_B")) > 0  # it trained


def _tiny_base(corpus, tmp_path, **extra):
    from aios_train.config import ModelConfig
    from aios_train.export import save_model
    from aios_train.model import DiT, randomize_
    from tokenizers import Tokenizer

    base = tmp_path / "base"
    base.mkdir(exist_ok=True)
    shutil.copy(corpus / "tokenizer.json", base / "tokenizer.json")
    vocab = Tokenizer.from_file(str(base / "tokenizer.json")).get_vocab_size()
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_length=48,
                      mask_token_id=3, **extra)
    save_model(randomize_(DiT(cfg), seed=0), cfg, base / "model.f32.parquet")
    return base


def _run_both(tmp_path, make_args):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}
    outs = {}
    for procs in (1, 2):
        out = tmp_path / f"out{procs}.parquet"
        args = make_args(out, tmp_path / f"run{procs}")
        cmd = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", *args] if procs > 1 else [sys.executable, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-4000:]
        assert r.stdout.count('"out"') == 1  # rank 0 alone reports
        outs[procs] = out
    return outs


def test_distill_two_processes_match_one(corpus, tmp_path):
    from aios_train.export import read_tensors

    base = _tiny_base(corpus, tmp_path)
    outs = _run_both(tmp_path, lambda out, run: [
        "-m", "aios_train", "distill", "--teacher", str(base), "--train", str(corpus / "train.jsonl"), "--out",
        str(out), "--run-dir", str(run), "--teacher-steps", "8", "--student-steps", "2", "--round-steps", "2",
        "--batch-size", "8", "--warmup", "1", "--lr", "1e-3"])
    a, b = (read_tensors(outs[p])[0] for p in (1, 2))
    assert max(float(abs(a[k] - b[k]).max()) for k in a) < 1e-5
    start = read_tensors(base / "model.f32.parquet")[0]
    assert max(float(abs(a[k] - start[k]).max()) for k in a) > 1e-4  # it trained


def test_controlnet_two_processes_match_one(corpus, tmp_path):
    from aios_train.export import read_tensors

    base = _tiny_base(corpus, tmp_path)
    outs = _run_both(tmp_path, lambda out, run: [
        "-m", "aios_train", "controlnet", "--base", str(base), "--control", "json", "--out", str(out), "--run-dir",
        str(run), "--n-blocks", "1", "--rank", "2", "--steps", "4", "--batch-size", "8", "--warmup", "1",
        "--text-length", "48"])
    a, b = (read_tensors(outs[p])[0] for p in (1, 2))
    assert max(float(abs(a[k] - b[k]).max()) for k in a) < 1e-5
    assert max(float(abs(a[k]).max()) for k in a if k.startswith("zero.")) > 0  # it trained


def test_lcm_two_processes_match_one(corpus, tmp_path):
    import numpy as np

    from aios_train.lora import read_lora

    base = _tiny_base(corpus, tmp_path, image_size=8, image_patch=4)
    data = tmp_path / "mm"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data / "images.npz", train_x=rng.integers(0, 256, (32, 8, 8), dtype=np.uint8),
             train_y=rng.integers(0, 10, 32))
    np.savez(data / "audio.npz", train_x=np.zeros((2, 1, 1), np.float32), train_y=np.zeros(2, np.int64))
    (data / "SOURCES.json").write_text("{}")
    outs = _run_both(tmp_path, lambda out, run: [
        "-m", "aios_train", "distill", "--teacher", str(base), "--modality", "image", "--data", str(data), "--out",
        str(out), "--run-dir", str(run), "--teacher-steps", "8", "--student-steps", "2", "--steps", "3",
        "--batch-size", "8", "--warmup", "1", "--lr", "1e-3", "--rank", "2", "--text-length", "24"])
    a, b = (read_lora(outs[p])[0] for p in (1, 2))
    assert max(float(abs(a[k] - b[k]).max()) for k in a) < 1e-5
    assert max(float(abs(a[k]).max()) for k in a if k.endswith("lora_B")) > 0  # it trained
