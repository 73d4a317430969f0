"""The standalone CLI `aios-run` (generate / info / quantize): help texts,
stdout/stderr split, quantisation round trip and the documented exit codes
(0 ok, 2 usage, 3 invalid input, 4 format/config, 5 I/O, 6 tokenizer, 1 other)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from _tiny_tokenizer import train_tiny_tokenizer

import _train_path  # noqa: F401
import aios_rt

ROOT = Path(__file__).resolve().parents[1]
BIN = ROOT / "target" / "release" / "aios-run"
pytestmark = pytest.mark.skipif(not BIN.is_file(), reason="build it: cargo build --release -p aios-run")

MASK = 3
# hidden_size 256 so that int4 (Q4_K, 256-wide blocks) really quantises the matrices.
CFG = dict(vocab_size=320, hidden_size=256, n_layers=1, n_heads=4, cond_dim=32, max_length=40, mask_token_id=MASK,
           mlp_ratio=2)
TEXTS = [
    "The old house stood on the hill above the village.",
    "A quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small cat who lived in the old mill.",
] * 10
PROMPT = "The old house"


def run(*args, timeout=120):
    argv = [os.fsencode(BIN)] + [a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]
    return subprocess.run(argv, capture_output=True, timeout=timeout)


def out(p):
    return p.stdout.decode("utf-8", "replace")


def err(p):
    return p.stderr.decode("utf-8", "replace")


def assert_clean_failure(p, code):
    assert p.returncode == code, (p.returncode, err(p))
    e = err(p)
    assert e.strip(), "an error must say what went wrong"
    assert "panicked" not in e and "RUST_BACKTRACE" not in e, e
    assert p.stdout == b""


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("aios_cli")
    train_tiny_tokenizer(d / "tokenizer.json", TEXTS)
    aios_rt.write_random_model(d / "model.f32.parquet", json.dumps(CFG), 0, "f32")
    return d


def test_top_level_help_and_version():
    p = run("--help")
    assert p.returncode == 0
    for sub in ("generate", "info", "quantize"):
        assert sub in out(p)
    v = run("--version")
    assert v.returncode == 0 and aios_rt.__version__ in out(v)
    assert_clean_failure(run(), 2)  # no subcommand: usage error
    assert_clean_failure(run("frobnicate"), 2)


@pytest.mark.parametrize("sub,options", [
    ("generate", ["--model", "--suffix", "--length", "--steps", "--sampler", "--seed", "--temperature", "--top-p",
                  "--block-length", "--guidance", "--threshold", "--threads", "--dtype", "--matmul", "--quiet",
                  "[PROMPT]", "--modality", "--out", "ancestral", "threshold"]),
    ("info", ["<MODEL>", "--dtype"]),
    ("quantize", ["<INPUT>", "<OUTPUT>", "--dtype", "int4", "int8", "int2"]),
])
def test_subcommand_help_mentions_options(sub, options):
    p = run(sub, "--help")
    assert p.returncode == 0, err(p)
    text = out(p)
    for o in options:
        assert o in text, f"{sub} --help does not mention {o}"


def test_generate_text_on_stdout_summary_on_stderr(folder):
    args = ["generate", "-m", folder, PROMPT, "--length", 24, "--steps", 6, "--seed", 3]
    p = run(*args)
    assert p.returncode == 0, err(p)
    text = out(p)
    assert text.endswith("\n") and text.startswith(PROMPT)
    summary = err(p)
    assert summary.strip(), "progress/summary expected on stderr"
    m = re.search(r"(\d+) tokens, (\d+) steps, (\d+) forward passes", summary)
    assert m, summary
    n_prompt = 1 + len(aios_rt.Engine(folder).encode(PROMPT))
    assert int(m.group(1)) == 24 - n_prompt and int(m.group(2)) == 6 and int(m.group(3)) == 6
    # Same settings through the Python API: same text.
    g = aios_rt.Engine(folder, threads=1).diffuse(PROMPT, length=24, steps=6, seed=3)
    assert text == g.text + "\n"
    # --quiet: same stdout, nothing on stderr.
    q = run(*args, "--quiet")
    assert q.returncode == 0 and q.stdout == p.stdout and q.stderr == b""
    q2 = run(*args, "-q", "--threads", 1)
    assert q2.returncode == 0 and q2.stdout == p.stdout


@pytest.mark.parametrize("sampler", aios_rt.SAMPLERS)
def test_generate_every_sampler_and_options(folder, sampler):
    p = run("generate", "-m", folder / "model.f32.parquet", "The [MASK] house", "--suffix", " the village.",
            "--length", 30, "--steps", 8, "--sampler", sampler, "--block-length", 8, "--guidance", 0.5,
            "--temperature", 0.7, "--threshold", 0.5, "-q")
    assert p.returncode == 0, err(p)
    assert out(p).startswith("The ")


def test_info_prints_config_dtypes_and_split(folder):
    p = run("info", folder)
    assert p.returncode == 0, err(p)
    text = out(p)
    m = re.search(r"^config: (\{.*\})$", text, re.M)
    assert m, text
    cfg = json.loads(m.group(1))
    for k, v in CFG.items():
        assert cfg[k] == v
    assert re.search(r"^file: .*model\.f32\.parquet \(\d+\.\d+ MB\)$", text, re.M)
    d = re.search(r"^dtype f32: (\d+) tensors, (\d+) parameters$", text, re.M)
    assert d and int(d.group(1)) == 5 + 10 * CFG["n_layers"] + 5
    s = re.search(r"^parameters: (\d+) total, backbone (\d+) \(([\d.]+)%\), text head (\d+) \(([\d.]+)%\)$",
                  text, re.M)
    assert s, text
    total, backbone, heads = int(s.group(1)), int(s.group(2)), int(s.group(4))
    pb, ph = float(s.group(3)), float(s.group(5))
    assert total == backbone + heads == int(d.group(2))
    assert abs(pb + ph - 100.0) < 0.2
    info = aios_rt.Engine(folder).info
    assert (backbone, heads) == (info["backbone_params"], info["head_params"])


def test_quantize_int4_then_info_and_generate(folder, tmp_path):
    q = tmp_path / "q"
    q.mkdir()
    shutil.copy(folder / "tokenizer.json", q / "tokenizer.json")
    p = run("quantize", folder / "model.f32.parquet", q / "model.int4.parquet", "--dtype", "int4")
    assert p.returncode == 0, err(p)
    assert "q4_k" in out(p) and "MB" in out(p)
    size_in, size_out = (folder / "model.f32.parquet").stat().st_size, (q / "model.int4.parquet").stat().st_size
    assert size_out < size_in / 3, (size_in, size_out)
    i = run("info", q / "model.int4.parquet")
    assert i.returncode == 0, err(i)
    assert re.search(r"^dtype q4_k: \d+ tensors, \d+ parameters$", out(i), re.M), out(i)
    assert re.search(r"^dtype f32: ", out(i), re.M)  # norms and biases stay f32
    i2 = run("info", q, "--dtype", "int4")
    assert i2.returncode == 0 and "q4_k" in out(i2)
    g = run("generate", "-m", q, "--dtype", "int4", PROMPT, "--length", 20, "--steps", 4, "-q")
    assert g.returncode == 0, err(g)
    assert out(g).startswith(PROMPT)
    # Only the int4 file is there: asking for int8 is an I/O error, proving --dtype picks the file.
    assert_clean_failure(run("generate", "-m", q, "--dtype", "int8", PROMPT, "--length", 20), 5)
    # The int4 file gives the same result through Python.
    e = aios_rt.Engine(q, dtype="int4")
    assert "q4_k" in e.info["dtypes"]
    assert out(g) == e.diffuse(PROMPT, length=20, steps=4).text + "\n"


def test_quantize_errors(folder, tmp_path):
    src = folder / "model.f32.parquet"
    assert_clean_failure(run("quantize", src, tmp_path / "x.parquet", "--dtype", "int3"), 3)
    assert_clean_failure(run("quantize", tmp_path / "missing.parquet", tmp_path / "x.parquet", "--dtype", "int8"), 5)
    assert_clean_failure(run("quantize", src, src, "--dtype", "int8"), 3)
    assert_clean_failure(run("quantize", src, tmp_path / "x.parquet"), 2)  # --dtype is required
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_clean_failure(run("quantize", garbage, tmp_path / "x.parquet", "--dtype", "int8"), 4)
    assert not (tmp_path / "x.parquet").exists()


def test_a_decoder_panic_prints_no_panic_text():
    """A file that makes the parquet decoder panic (tests/fixtures, found by
    `just fuzz`) is exit 4 with one error line, no panic text or backtrace."""
    bad = Path(__file__).resolve().parent / "fixtures" / "parquet-decoder-panic.parquet"
    argv = [os.fsencode(BIN), b"info", os.fsencode(bad)]
    p = subprocess.run(argv, capture_output=True, timeout=60, env={**os.environ, "RUST_BACKTRACE": "1"})
    assert_clean_failure(p, 4)
    assert "decoder rejected" in err(p) and len(err(p).strip().splitlines()) == 1, err(p)


def test_quantize_refuses_its_own_input_by_identity(folder, tmp_path):
    """A symlink, hard link or `..` path to the input is the input: refused,
    and the original is unchanged."""
    src = tmp_path / "model.f32.parquet"
    shutil.copy(folder / "model.f32.parquet", src)
    original = src.read_bytes()
    (tmp_path / "link.parquet").symlink_to(src)
    os.link(src, tmp_path / "hard.parquet")
    (tmp_path / "sub").mkdir()
    for out_path in (tmp_path / "link.parquet", tmp_path / "hard.parquet", tmp_path / "sub" / ".." / src.name):
        p = run("quantize", src, out_path, "--dtype", "int8")
        assert_clean_failure(p, 3)
        assert "input file itself" in err(p)
    assert src.read_bytes() == original


def test_quantize_reports_a_full_disk_as_an_io_error(folder, tmp_path):
    """Writing fails midway (here: a file-size limit, EFBIG, standing in for
    ENOSPC): exit 5, an I/O error, and no partial output left behind."""
    import resource
    import signal

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    argv = [os.fsencode(BIN), b"quantize", os.fsencode(folder / "model.f32.parquet"),
            os.fsencode(tmp_path / "x.parquet"), b"--dtype", b"int8"]
    p = subprocess.run(argv, capture_output=True, timeout=120, preexec_fn=limit)
    assert_clean_failure(p, 5)
    assert "I/O error" in err(p)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def bad_files(folder, tmp_path_factory):
    d = tmp_path_factory.mktemp("aios_cli_bad")
    data = (folder / "model.f32.parquet").read_bytes()
    (d / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (d / "garbage.parquet").write_bytes(np.random.default_rng(1).bytes(10_000))
    no_tok = d / "no_tokenizer"
    no_tok.mkdir()
    (no_tok / "model.f32.parquet").write_bytes(data)
    return d


@pytest.mark.parametrize("extra,code", [
    (["--sampler", "greedy"], 3),
    (["--length", 0], 3),
    (["--length", CFG["max_length"] + 1], 3),
    (["--steps", 0], 3),
    (["--steps", 1, "--block-length", 4, "--length", 30], 3),
    (["--temperature", "nan"], 3),
    (["--top-p", 0], 3),
    (["--guidance", "nan"], 3),
    (["--threshold", 0], 3),
    (["--block-length", 0], 3),
    (["--threads", 0], 3),
    (["--dtype", "int3"], 3),
    (["--matmul", "fastest"], 3),
    (["--length", "ten"], 2),
    (["--bogus"], 2),
])
def test_generate_invalid_arguments(folder, extra, code):
    length = [] if "--length" in extra else ["--length", 20]
    assert_clean_failure(run("generate", "-m", folder, PROMPT, *length, *extra), code)


def test_generate_prompt_longer_than_length(folder):
    assert_clean_failure(run("generate", "-m", folder, " ".join(TEXTS[:3]), "--length", 10), 3)
    # prompt + BOS exactly filling the canvas leaves nothing to generate
    n = 1 + len(aios_rt.Engine(folder).encode(PROMPT))
    assert_clean_failure(run("generate", "-m", folder, PROMPT, "--length", n), 3)
    assert run("generate", "-m", folder, PROMPT, "--length", n + 1, "-q").returncode == 0


def test_model_file_errors(folder, bad_files, tmp_path):
    assert_clean_failure(run("generate", "-m", tmp_path / "nope", PROMPT), 5)
    assert_clean_failure(run("info", tmp_path / "nope"), 5)
    assert_clean_failure(run("generate", "-m", bad_files / "truncated.parquet", PROMPT, "--length", 20), 4)
    assert_clean_failure(run("generate", "-m", bad_files / "garbage.parquet", PROMPT, "--length", 20), 4)
    assert_clean_failure(run("info", bad_files / "truncated.parquet"), 4)
    assert_clean_failure(run("info", folder, "--dtype", "int2"), 5)  # no model.int2.parquet there
    assert_clean_failure(run("info", folder, "--dtype", "int3"), 3)
    # No tokenizer beside the weights: a tokenizer error (6); info still works.
    assert_clean_failure(run("generate", "-m", bad_files / "no_tokenizer", PROMPT, "--length", 20), 6)
    assert run("info", bad_files / "no_tokenizer").returncode == 0


@pytest.mark.parametrize("argv", [
    [b"generate", b"-m", b"MODEL", b"\xff\xfe"],
    [b"generate", b"-m", b"MODEL", b"ok", b"--suffix", b"\xff\xfe"],
    [b"generate", b"-m", b"MODEL", b"ok", b"--sampler", b"\xc3\x28"],
    [b"generate", b"-m", b"/nonexistent/\xff\xfe", b"ok"],
    [b"info", b"/nonexistent/\xff\xfe"],
    [b"quantize", b"/nonexistent/\xff", b"/nonexistent/\xfe", b"--dtype", b"int4"],
    [b"\xff\xfe"],
])
def test_invalid_utf8_arguments_fail_cleanly(folder, argv):
    argv = [os.fsencode(folder) if a == b"MODEL" else a for a in argv]
    p = run(*argv)
    assert p.returncode not in (0, 101) and p.returncode > 0, (p.returncode, p.stderr)
    assert b"panicked" not in p.stderr and p.stderr.strip()


def test_non_utf8_model_path_that_exists(folder, tmp_path):
    d = os.path.join(os.fsencode(tmp_path), b"m\xff\xfe")
    os.mkdir(d)
    for f in ("model.f32.parquet", "tokenizer.json"):
        shutil.copy(folder / f, os.path.join(d, os.fsencode(f)))
    assert run("info", d).returncode == 0
    g = run("generate", "-m", d, PROMPT, "--length", 16, "--steps", 2, "-q")
    assert g.returncode == 0, g.stderr
    assert out(g).startswith(PROMPT)


def test_failed_quantize_leaves_no_temp_file(folder, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert_clean_failure(run("quantize", folder / "model.f32.parquet", out_dir, "--dtype", "int8"), 5)
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "out")
    assert leftovers == [], leftovers
