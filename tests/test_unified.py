"""The unified model: image/audio heads, per-position conditioning, continuous samplers, media files.

Parity contract as in test_parity.py: the same Parquet file gives the same outputs in aios_train (PyTorch)
and aios_rt (Rust), here for every head and for whole DDIM/DDPM trajectories (the Python reference draws
the runtime's counter-based noise).
"""

import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

import _train_path  # noqa: F401
import aios_rt
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.config import ModelConfig
from aios_train.continuous import alpha_sigma, gaussian, sample_reference
from aios_train.export import load_model, save_model
from aios_train.heads import patchify, unpatchify
from aios_train.media import image_to_unit, log_mel, unit_to_image
from aios_train.model import DiT, randomize_

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4

MM = dict(vocab_size=300, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=48, mask_token_id=3,
          image_size=8, image_patch=4, audio_mels=16, audio_frames=16, audio_frames_per_token=4,
          audio_sample_rate=8000, audio_n_fft=256, audio_hop=64)


def _model(tmp_path, seed=0, **over):
    cfg = ModelConfig(**{**MM, **over})
    model = randomize_(DiT(cfg), seed=seed).eval()
    path = tmp_path / "model.f32.parquet"
    save_model(model, cfg, path)
    train_tiny_tokenizer(tmp_path / "tokenizer.json",
                         ["a sneaker and a bag", "seven eight nine", "the old house"] * 50, vocab_size=300)
    return model, cfg, path


def _inputs(cfg, b=2, lt=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, cfg.vocab_size, (b, lt), generator=g)
    img = torch.randn(b, cfg.image_channels, cfg.image_size, cfg.image_size, generator=g)
    aud = torch.randn(b, cfg.audio_frames, cfg.audio_mels, generator=g)
    return toks, img, aud, torch.tensor([0.3, 0.9])[:b], torch.tensor([0.7, 0.05])[:b]


@pytest.mark.parametrize("parts", ["text+image", "text+audio", "text+image+audio", "image", "audio+image"])
def test_forward_canvas_matches_pytorch(tmp_path, parts):
    model, cfg, path = _model(tmp_path)
    toks, img, aud, ti, ta = _inputs(cfg)
    kw_t = {}
    kw_r = {}
    if "image" in parts:
        kw_t.update(image=img, t_image=ti)
        kw_r.update(image=img.numpy(), t_image=ti.tolist())
    if "audio" in parts:
        kw_t.update(audio=aud, t_audio=ta)
        kw_r.update(audio=aud.numpy(), t_audio=ta.tolist())
    text = toks if "text" in parts else toks[:, :0]
    with torch.no_grad():
        ref = model.forward_canvas(text, **kw_t)
    got = aios_rt.Engine(path, threads=2).forward_canvas(text.tolist(), **kw_r)
    assert sorted(got) == sorted(ref)
    for k in ref:
        err = float(np.abs(got[k] - ref[k].numpy()).max())
        assert err < TOL * max(1.0, float(ref[k].abs().max())), (k, err)


def test_plain_text_path_of_a_multimodal_model_matches(tmp_path):
    model, cfg, path = _model(tmp_path)
    toks = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(toks).numpy()
        via_canvas = model.forward_canvas(toks)["text"].numpy()
    assert np.abs(ref - via_canvas).max() < 1e-5
    got = aios_rt.Engine(path, threads=1).logits(toks.tolist())
    assert np.abs(got - ref).max() < TOL


def test_per_position_conditioning_changes_only_with_t(tmp_path):
    """The image time reaches the image rows (and, through attention, the text)."""
    model, cfg, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=1)
    toks, img, _, _, _ = _inputs(cfg, b=1)
    a = eng.forward_canvas(toks.tolist(), image=img.numpy(), t_image=[0.2])
    b = eng.forward_canvas(toks.tolist(), image=img.numpy(), t_image=[0.8])
    assert np.abs(a["image"] - b["image"]).max() > 1e-3


def test_patchify_layout():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).view(2, 1, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 16)
    assert p[0, 1, :4].tolist() == [4, 5, 6, 7]  # patch (0, 1) starts at column 4
    assert torch.equal(unpatchify(p, 1, 8, 4), x)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
def test_image_sampler_trajectory_matches_pytorch(tmp_path, sampler, eta):
    model, cfg, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=2)
    g = eng.diffuse("a bag", modality="image", steps=4, sampler=sampler, eta=eta, seed=7, text_length=8)
    toks = torch.tensor([[1] + eng.encode("a bag") + [2] + [0] * (8 - 2 - len(eng.encode("a bag")))])
    ref = sample_reference(model, toks, "image", 4, sampler=sampler, eta=eta, seed=7)
    ref_px = unit_to_image(ref[0].numpy())
    assert g.image.shape == (cfg.image_size, cfg.image_size) and g.image.dtype == np.uint8
    # Pixels are rounded: allow one level where float rounding lands on the other side.
    assert np.abs(g.image.astype(int) - ref_px[0].astype(int)).max() <= 1


def test_audio_sampler_trajectory_matches_pytorch_with_guidance(tmp_path):
    model, cfg, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=2)
    g = eng.diffuse("seven", modality="audio", steps=3, sampler="ddpm", guidance=2.0, seed=3, text_length=6)
    ids = eng.encode("seven")
    toks = torch.tensor([[1] + ids + [2] + [0] * (6 - 2 - len(ids))])
    ref = sample_reference(model, toks, "audio", 3, sampler="ddpm", guidance=2.0,
                           uncond_tokens=torch.full_like(toks, 3), seed=3)
    assert g.log_mel.shape == (cfg.audio_frames, cfg.audio_mels)
    assert np.abs(g.log_mel - ref[0].numpy()).max() < 1e-3
    assert g.sample_rate == 8000 and g.audio.dtype == np.float32
    assert len(g.audio) == (cfg.audio_frames - 1) * cfg.audio_hop


def test_runtime_noise_matches_reference_port():
    # Python's port of the counter-based generator (used above) reproduces its own statistics.
    z = gaussian(1, 2, 4000)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    a, s = alpha_sigma(0.5)
    assert abs(float(a) ** 2 + float(s) ** 2 - 1) < 1e-12


def test_inpainting_keeps_known_pixels_and_is_deterministic(tmp_path):
    _, cfg, path = _model(tmp_path)
    img = (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3)
    known = np.zeros((8, 8), dtype=bool)
    known[:, :4] = True
    runs = []
    for threads in (1, 2):
        eng = aios_rt.Engine(path, threads=threads)
        g = eng.diffuse("a bag", modality="image", image=img, image_mask=known, steps=5, sampler="ddpm", seed=1)
        assert np.array_equal(g.image[known], img[known])
        runs.append(g.image)
    assert np.array_equal(runs[0], runs[1])


def test_guidance_zero_equals_unguided_and_seed_matters(tmp_path):
    _, _, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=2)
    a = eng.diffuse("a bag", modality="image", steps=4, seed=0)
    b = eng.diffuse("a bag", modality="image", steps=4, seed=0, guidance=0.0)
    c = eng.diffuse("a bag", modality="image", steps=4, seed=1)
    d = eng.diffuse("a bag", modality="image", steps=4, seed=0, guidance=3.0)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.image, d.image)


def test_joint_text_and_image_share_forward_passes(tmp_path):
    _, _, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=2)
    g = eng.diffuse(modality=["text", "image"], steps=6, seed=0, text_length=10)
    assert g.modalities == ["text", "image"]
    assert g.image.shape == (8, 8) and isinstance(g.text, str)
    assert g.forward_passes == 6  # one pass per step serves both segments
    assert 3 not in g.tokens  # no mask left


def test_captioning_uses_the_image(tmp_path):
    _, _, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=1)
    img = np.zeros((8, 8), dtype=np.uint8)
    a = eng.diffuse(modality="text", image=img, steps=8, seed=0, text_length=10, temperature=0.0)
    b = eng.diffuse(modality="text", image=np.full((8, 8), 255, np.uint8), steps=8, seed=0, text_length=10,
                    temperature=0.0)
    assert a.modalities == ["text"] and a.image is None
    # Random weights pick the same argmax tokens, but the given image must reach the text's probabilities.
    assert a.confidence != b.confidence


def _read_png_gray(path):
    """A minimal independent PNG reader (8-bit grey, non-interlaced; all five row filters)."""
    import struct
    import zlib
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert (depth, color, interlace) == (8, 0, 0)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    out = np.zeros((h, w), dtype=np.int32)
    for y in range(h):
        f, row = raw[y * (w + 1)], np.frombuffer(raw, np.uint8, w, y * (w + 1) + 1).astype(np.int32)
        prev = out[y - 1] if y else np.zeros(w, np.int32)
        for x in range(w):
            a = out[y, x - 1] if x else 0
            b, c = prev[x], (prev[x - 1] if x else 0)
            pred = [0, a, b, (a + b) // 2, a + b - c][f]
            if f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
            out[y, x] = (row[x] + pred) % 256
    return out.astype(np.uint8)


def test_png_and_wav_round_trip(tmp_path):
    _, cfg, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=1)
    g = eng.diffuse(modality=["image", "audio"], steps=2, seed=0)
    g.save(tmp_path / "x.png")
    g.save(tmp_path / "x.wav")
    assert np.array_equal(_read_png_gray(tmp_path / "x.png"), g.image)
    with wave.open(str(tmp_path / "x.wav")) as w:
        assert w.getframerate() == 8000 and w.getsampwidth() == 2 and w.getnchannels() == 1
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32767
    assert np.abs(pcm - np.clip(g.audio, -1, 1)).max() <= 1.0 / 32767 + 1e-6


def test_rust_log_mel_matches_python(tmp_path):
    """Given audio is featurised in Rust; it must equal aios_train.media.log_mel (the training features)."""
    model, cfg, path = _model(tmp_path)
    n = (cfg.audio_frames - 1) * cfg.audio_hop
    t = np.arange(n) / cfg.audio_sample_rate
    wave_ = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 1250 * t)).astype(np.float32)
    ref = log_mel(wave_, cfg.audio_sample_rate, cfg.audio_n_fft, cfg.audio_hop, cfg.audio_mels)
    eng = aios_rt.Engine(path, threads=1)
    # Inpaint with every frame known: the output log-mel is exactly the given features.
    g = eng.diffuse(modality="audio", audio=wave_, audio_mask=np.ones(cfg.audio_frames, bool), steps=2)
    # Compare linear mel energies: near the log floor (leakage ~1e-5 of the peak) both f32 FFTs only
    # agree to their rounding, which the log magnifies.
    lin = lambda x: np.exp(4.0 * x.astype(np.float64) - 4.0)  # noqa: E731 (AUDIO_LOG_SCALE, AUDIO_LOG_MEAN)
    assert np.abs(lin(g.log_mel) - lin(ref)).max() < 1e-5 * lin(ref).max()
    loud = ref > -1.0
    assert loud.sum() > 20 and np.abs(g.log_mel - ref)[loud].max() < 1e-4


def test_text_model_still_refuses_media_with_the_heads_it_has():
    eng = aios_rt.Engine(ROOT / "models" / "aios-text-tiny")
    with pytest.raises(aios_rt.ConfigError, match=r"no image head \(it has: text\)"):
        eng.diffuse("a sneaker", modality="image")


BAD = [
    (dict(modality="video"), aios_rt.InputError, "unknown modality"),
    (dict(modality="image", steps=0), aios_rt.InputError, "steps"),
    (dict(modality="image", image=np.zeros((7, 8), np.uint8), image_mask=np.ones((7, 8), bool)), aios_rt.InputError, "pixels"),
    (dict(modality="text", image=np.full((8, 8), np.nan, np.float32)), aios_rt.InputError, "NaN"),
    (dict(modality="text", image=np.zeros((8, 8), np.complex64)), aios_rt.InputError, "dtype"),
    (dict(modality="image", image=np.zeros((8, 8), np.uint8), image_mask=np.ones((4, 4), bool)), aios_rt.InputError, "image_mask"),
    (dict(modality="text", audio=np.zeros(100_000, np.float32)), aios_rt.InputError, "audio must have"),
    (dict(modality="image", sampler="euler"), aios_rt.InputError, "unknown sampler"),
    (dict(modality="image", eta=2.0), aios_rt.InputError, "eta"),
    (dict(modality="image", image_mask=np.ones((8, 8), bool)), aios_rt.InputError, "needs an image"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[b[2] for b in BAD])
def test_bad_media_input(tmp_path, kw, exc, msg):
    _, _, path = _model(tmp_path)
    eng = aios_rt.Engine(path, threads=1)
    with pytest.raises(exc, match=msg):
        eng.diffuse("a bag", **kw)


def test_unwritable_output_is_an_io_error(tmp_path):
    _, _, path = _model(tmp_path)
    g = aios_rt.Engine(path, threads=1).diffuse(modality="image", steps=1)
    with pytest.raises(aios_rt.AiosIOError):
        g.save(tmp_path / "no" / "such" / "dir" / "x.png")
    with pytest.raises(aios_rt.InputError, match="no audio"):
        g.save(tmp_path / "x.wav")
    assert isinstance(aios_rt.AiosIOError("x"), OSError)


# ---- aios-run ----
BIN = ROOT / "target" / "release" / "aios-run"


def _cli(*args):
    import subprocess
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_cli_generates_png_wav_and_pairs(tmp_path):
    _, cfg, path = _model(tmp_path)
    folder = path.parent
    p = _cli("generate", "--model", folder, "--modality", "image", "a bag", "--steps", "3", "--out", tmp_path / "bag.png",
             "--sampler", "ddim", "--guidance", "2")
    assert p.returncode == 0, p.stderr
    assert _read_png_gray(tmp_path / "bag.png").shape == (8, 8)
    p = _cli("generate", "--model", folder, "--modality", "audio", "seven", "--out", tmp_path / "seven.wav", "--steps", "2")
    assert p.returncode == 0, p.stderr
    with wave.open(str(tmp_path / "seven.wav")) as w:
        assert w.getframerate() == cfg.audio_sample_rate
    p = _cli("generate", "--model", folder, "--modality", "text,image", "--out", tmp_path / "pair", "--steps", "4",
             "--text-length", "8")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "pair.png").exists() and (tmp_path / "pair.txt").read_text().strip() == p.stdout.strip()
    # Captioning a PNG, and inpainting with a mask PNG, round trip through files.
    p = _cli("generate", "--model", folder, "--modality", "text", "--image", tmp_path / "bag.png", "--steps", "3",
             "--text-length", "6")
    assert p.returncode == 0, p.stderr
    p = _cli("generate", "--model", folder, "--modality", "image", "--image", tmp_path / "bag.png", "--image-mask",
             tmp_path / "bag.png", "--out", tmp_path / "inpainted.png", "--steps", "3")
    assert p.returncode == 0, p.stderr
    src, mask, got = (_read_png_gray(tmp_path / f) for f in ("bag.png", "bag.png", "inpainted.png"))
    assert np.array_equal(got[mask >= 128], src[mask >= 128])
    p = _cli("info", folder)
    assert re.search(r"backbone \d+ \([\d.]+%\), text head \d+ \([\d.]+%\), image head \d+ \([\d.]+%\), audio head "
                     r"\d+ \([\d.]+%\)", p.stdout), p.stdout


@pytest.mark.parametrize("args,code,msg", [
    (["--modality", "video"], 2, "invalid value"),
    (["--modality", "image"], 3, "need --out"),
    (["--modality", "image", "--out", "/nonexistent-dir/x.png"], 5, "I/O error"),
    (["--modality", "image", "--out", "x.png", "--steps", "0"], 3, "steps"),
    (["--modality", "text", "--image", "missing.png"], 5, "I/O error"),
    (["--modality", "text", "--image", "garbage.png"], 4, "PNG"),
    (["--modality", "image", "--out", "x.png", "--sampler", "euler"], 3, "unknown sampler"),
])
def test_cli_bad_media_input(tmp_path, args, code, msg):
    _, _, path = _model(tmp_path)
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    args = [a if not a.endswith(".png") or a.startswith("/") else str(tmp_path / a) for a in args]
    p = _cli("generate", "--model", path.parent, "a bag", *args)
    assert p.returncode == code, (p.returncode, p.stderr)
    assert msg in p.stderr and "panicked" not in p.stderr


def test_cli_text_model_names_its_heads():
    p = _cli("generate", "--model", ROOT / "models" / "aios-text-tiny", "--modality", "image", "a sneaker", "--out", "/tmp/x.png")
    assert p.returncode == 4 and "no image head (it has: text)" in p.stderr
