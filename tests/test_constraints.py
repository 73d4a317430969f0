"""Word constraints (energies on the logits): a banned word never appears in what is generated, a required word
appears, several combine, the outcome is reported, and bad constraints are clear errors. On a tiny random model,
where nothing but the energies steers the text; numbers on the shipped model are in bench/RESULTS.md."""

import json
import subprocess
from pathlib import Path

import pytest

import _train_path  # noqa: F401
import aios_rt
from _tiny_tokenizer import train_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"the cat sat on the mat and the dog ran to the park number {i} with a red ball" for i in range(60)]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("constraints")
    tok = train_tiny_tokenizer(d / "tokenizer.json", TEXTS, vocab_size=320)
    cfg = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=48,
               mask_token_id=3)
    aios_rt.write_random_model(d / "model.f32.parquet", json.dumps(cfg), 1, "f32")
    return d, tok


def tokens_of(tok, word):
    return tok.encode(" " + word).ids


def test_banned_and_required_words(model):
    d, tok = model
    eng = aios_rt.Engine(d, threads=1)
    cat, dog = tokens_of(tok, "cat"), tokens_of(tok, "dog")
    assert len(cat) == 1 and len(dog) == 1  # one token each in this vocabulary
    seen_cat = required_hits = 0
    for seed in range(8):
        plain = eng.diffuse("the", length=40, steps=20, seed=seed, sampler="ancestral")
        seen_cat += cat[0] in plain.tokens[2:]
        g = eng.diffuse("the", length=40, steps=20, seed=seed, sampler="ancestral",
                        constraints=[aios_rt.Banned(["cat"], weight=50.0), aios_rt.Required(["dog"], weight=50.0)])
        assert cat[0] not in g.tokens[2:]
        assert [(c["kind"], c["words"], c["met"]) for c in g.constraints] == [("banned", ["cat"], True),
                                                                               ("required", ["dog"], True)]
        required_hits += dog[0] in g.tokens
        again = eng.diffuse("the", length=40, steps=20, seed=seed, sampler="ancestral",
                            constraints=[aios_rt.Banned(["cat"], weight=50.0), aios_rt.Required(["dog"], weight=50.0)])
        assert again.tokens == g.tokens  # deterministic
    assert required_hits == 8
    # Weight 0 is no constraint at all.
    g0 = eng.diffuse("the", length=40, steps=20, seed=0, sampler="ancestral",
                     constraints=[aios_rt.Banned(["cat"], weight=0.0)])
    assert g0.tokens == eng.diffuse("the", length=40, steps=20, seed=0, sampler="ancestral").tokens


def test_a_banned_word_in_the_prompt_is_not_a_violation(model):
    d, tok = model
    eng = aios_rt.Engine(d, threads=1)
    g = eng.diffuse("the cat", length=24, steps=8, constraints=[aios_rt.Banned(["cat"])])
    assert g.constraints[0]["met"] is True


def test_bad_constraints_are_clear_errors(model):
    d, tok = model
    eng = aios_rt.Engine(d, threads=1)
    for cons, msg in [([aios_rt.Banned(["cat"]), aios_rt.Required(["cat"])], "unsatisfiable"),
                      ([aios_rt.Banned(["cat"], weight=float("nan"))], "finite"),
                      ([aios_rt.Required(["dog"], weight=float("inf"))], "finite"),
                      ([aios_rt.Banned(["cat"], weight=-1.0)], ">= 0"),
                      ([aios_rt.Banned([])], "non-empty"),
                      ([aios_rt.Required(["  "])], "non-empty"),
                      (["cat"], "unknown constraint"),
                      ("cat", "list")]:
        with pytest.raises(aios_rt.InputError, match=msg):
            eng.diffuse("the", length=24, steps=4, constraints=cons)
    assert repr(aios_rt.Banned(["x"])) == "Banned(['x'], weight=8.0)"


def test_cli_ban_and_require(model):
    d, tok = model
    r = subprocess.run([str(ROOT / "target" / "release" / "aios-run"), "generate", "--model", str(d), "--length",
                        "32", "--steps", "8", "--ban", "cat", "--require", "dog", "--constraint-weight", "50", "the"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'constraint banned ["cat"]: met' in r.stderr and 'constraint required ["dog"]: met' in r.stderr
    r = subprocess.run([str(ROOT / "target" / "release" / "aios-run"), "generate", "--model", str(d), "--ban", "cat",
                        "--require", "cat", "the"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unsatisfiable" in r.stderr and "panicked" not in r.stderr


UNIFIED = ROOT / "models" / "aios-unified-tiny"


def test_brightness_energy_steers_an_image_region():
    eng = aios_rt.Engine(UNIFIED, threads=2)
    left = (0, 0, 14, 28)
    for seed in range(2):
        plain = eng.diffuse("a sneaker", modality="image", steps=12, seed=seed).image.astype(float) / 255
        for target in (0.05, 0.9):
            g = eng.diffuse("a sneaker", modality="image", steps=12, seed=seed,
                            constraints=[aios_rt.Brightness(left, target)])
            img = g.image.astype(float) / 255
            assert abs(img[:, :14].mean() - target) < 0.1, (seed, target, img[:, :14].mean())
        assert abs(plain[:, :14].mean() - 0.9) > 0.3
        same = eng.diffuse("a sneaker", modality="image", steps=12, seed=seed,
                           constraints=[aios_rt.Brightness(left, 0.9, weight=0.0)])
        assert (same.image == eng.diffuse("a sneaker", modality="image", steps=12, seed=seed).image).all()
    for b, msg in [(aios_rt.Brightness((0, 0, 29, 28), 0.5), "x0 < x1 <= 28"),
                   (aios_rt.Brightness((5, 0, 5, 28), 0.5), "x0 < x1"),
                   (aios_rt.Brightness(left, 1.5), r"\[0, 1\]"),
                   (aios_rt.Brightness(left, 0.5, weight=float("nan")), "finite")]:
        with pytest.raises(aios_rt.InputError, match=msg):
            eng.diffuse("a sneaker", modality="image", steps=2, constraints=[b])
    with pytest.raises(aios_rt.InputError, match="generated images"):
        eng.diffuse("a sneaker", steps=2, constraints=[aios_rt.Brightness(left, 0.5)])
    with pytest.raises(aios_rt.InputError, match="text-only"):
        eng.diffuse("a sneaker", modality="image", steps=2, constraints=[aios_rt.Banned(["x"])])


def test_cli_brightness(tmp_path):
    bin_ = str(ROOT / "target" / "release" / "aios-run")
    out = tmp_path / "x.png"
    r = subprocess.run([bin_, "generate", "--model", str(UNIFIED), "--modality", "image", "--steps", "8",
                        "--brightness", "0,0,14,28:0.9", "--out", str(out), "a sneaker"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.is_file(), r.stderr
    r = subprocess.run([bin_, "generate", "--model", str(UNIFIED), "--modality", "image", "--brightness", "0,0,14:0.9",
                        "--out", str(out), "a sneaker"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--brightness" in r.stderr and "panicked" not in r.stderr


CLASSIFIER = UNIFIED / "fashion.classifier.parquet"


def test_class_energy_moves_images_to_the_class(tmp_path):
    import numpy as np
    from aios_train.classifier import load_classifier
    import torch

    eng = aios_rt.Engine(UNIFIED, threads=2)
    lin, cfg = load_classifier(CLASSIFIER)
    hits = {0.0: 0, 1.0: 0}
    for w in hits:
        for k, name in ((7, "sneaker"), (1, "trousers")):
            for seed in range(3):
                cons = [aios_rt.ClassEnergy(CLASSIFIER, name if seed else k, weight=w)] if w else []
                img = eng.diffuse("", modality="image", steps=12, seed=seed, constraints=cons).image
                x = torch.from_numpy(np.asarray(img, dtype=np.float32).reshape(1, -1)) / 127.5 - 1
                hits[w] += int(lin(x).argmax()) == k
    assert hits[1.0] == 6 and hits[0.0] < 6, hits
    for c, msg in [(aios_rt.ClassEnergy(CLASSIFIER, "spaceship"), "not one of"),
                   (aios_rt.ClassEnergy(CLASSIFIER, 10), "not one of"),
                   (aios_rt.ClassEnergy(CLASSIFIER, "bag", weight=float("inf")), "finite"),
                   (aios_rt.ClassEnergy(UNIFIED / "model.f32.parquet", "bag"), "not an image classifier"),
                   (aios_rt.ClassEnergy(tmp_path / "missing.parquet", "bag"), "missing.parquet")]:
        with pytest.raises((aios_rt.InputError, aios_rt.FormatError, OSError), match=msg):
            eng.diffuse("", modality="image", steps=2, constraints=[c])
    with pytest.raises(aios_rt.InputError, match="generated images"):
        eng.diffuse("x", steps=2, constraints=[aios_rt.ClassEnergy(CLASSIFIER, "bag")])


def test_valid_json_keeps_the_text_a_json_prefix(model):
    d, tok = model
    eng = aios_rt.Engine(d, threads=1)
    for seed in range(3):
        g = eng.diffuse('{"a": ', length=24, steps=23, seed=seed, block_length=1, sampler="ancestral",
                        constraints=[aios_rt.ValidJson()])
        text = g.text
        assert g.constraints[0]["kind"] == "valid_json"
        # Left to right (block_length 1), every committed token kept the text a JSON prefix.
        from json import JSONDecodeError, loads
        try:
            loads(text)
            whole = True
        except JSONDecodeError as e:
            whole = False
            assert e.msg.startswith(("Expecting", "Unterminated")), (text, e.msg)  # ran out, never broke
        assert g.constraints[0]["met"] == whole
        plain = eng.diffuse('{"a": ', length=24, steps=23, seed=seed, block_length=1, sampler="ancestral")
        assert plain.text != text
    with pytest.raises(aios_rt.InputError, match="finite"):
        eng.diffuse("{", length=12, steps=2, constraints=[aios_rt.ValidJson(weight=float("nan"))])
    r = subprocess.run([str(ROOT / "target" / "release" / "aios-run"), "generate", "--model", str(d), "--valid-json",
                        "--block-length", "1", "--length", "16", "--steps", "15", "{"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "constraint valid_json" in r.stderr, r.stderr
    assert ("NOT met" in r.stderr) != _whole_json(r.stdout), (r.stdout, r.stderr)


def _whole_json(text):
    from json import JSONDecodeError, loads
    try:
        loads(text)
        return True
    except JSONDecodeError:
        return False


def _db(log_mel):
    import numpy as np
    return (np.asarray(log_mel, dtype=np.float64).mean() * 4 - 4) * 20 / np.log(10)


def test_loudness_energy_steers_a_span_of_sound(tmp_path):
    eng = aios_rt.Engine(UNIFIED, threads=2)
    span = (0, 48)  # the first half of the 96 log-mel frames
    for seed in range(2):
        plain = eng.diffuse("seven", modality="audio", steps=12, seed=seed)
        for target in (-70.0, -25.0):
            g = eng.diffuse("seven", modality="audio", steps=12, seed=seed,
                            constraints=[aios_rt.Loudness(span, target)])
            assert abs(_db(g.log_mel[:48]) - target) < 3, (seed, target, _db(g.log_mel[:48]))
        assert min(abs(_db(plain.log_mel[:48]) - t) for t in (-70.0, -25.0)) > 8
        same = eng.diffuse("seven", modality="audio", steps=12, seed=seed,
                           constraints=[aios_rt.Loudness(span, -70.0, weight=0.0)])
        assert (same.log_mel == plain.log_mel).all()
    for e, msg in [(aios_rt.Loudness((0, 97), -40), "f1 <= 96"), (aios_rt.Loudness((5, 5), -40), "f0 < f1"),
                   (aios_rt.Loudness(span, 50.0), r"\[-100, 20\]"),
                   (aios_rt.Loudness(span, -40, weight=float("inf")), "finite")]:
        with pytest.raises(aios_rt.InputError, match=msg):
            eng.diffuse("seven", modality="audio", steps=2, constraints=[e])
    with pytest.raises(aios_rt.InputError, match="generated sound"):
        eng.diffuse("seven", steps=2, constraints=[aios_rt.Loudness(span, -40)])
    with pytest.raises(aios_rt.InputError, match="audio among the outputs"):
        eng.diffuse("a bag", modality="image", steps=2, constraints=[aios_rt.Loudness(span, -40)])
    bin_ = str(ROOT / "target" / "release" / "aios-run")
    out = tmp_path / "x.wav"
    r = subprocess.run([bin_, "generate", "--model", str(UNIFIED), "--modality", "audio", "--steps", "6",
                        "--loudness", "0,48:-70", "--out", str(out), "seven"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and out.is_file(), r.stderr
    r = subprocess.run([bin_, "generate", "--model", str(UNIFIED), "--modality", "audio", "--loudness", "0:-70",
                        "--out", str(out), "seven"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--loudness" in r.stderr and "panicked" not in r.stderr


REGEX = r"the( (cat|dog|mat|park))+"


def _regex_prefix(text):
    """Whether `text` is a prefix of a whole match of REGEX (Python's `re` has no partial match)."""
    if not "the".startswith(text[:3]) or (len(text) > 3 and text[3] != " "):
        return False
    words = text[4:].split(" ") if len(text) > 3 else []
    full = {"cat", "dog", "mat", "park"}
    return all(w in full for w in words[:-1]) and (not words or any(f.startswith(words[-1]) for f in full))


def _until_stop(tok, tokens):
    """The text of `tokens` after [BOS] up to the first [EOS]/[PAD] (what the grammar energies read)."""
    ids = list(tokens[1:])
    ends = [i for i, t in enumerate(ids) if t in (0, 2)]
    return tok.decode(ids[:ends[0]] if ends else ids)


def test_regex_keeps_the_text_a_prefix_of_a_match(model):
    import re
    d, tok = model
    eng = aios_rt.Engine(d, threads=1)
    wholes = 0
    for seed in range(4):
        g = eng.diffuse("the", length=16, steps=15, seed=seed, block_length=1, sampler="ancestral",
                        constraints=[aios_rt.Regex(REGEX)])
        assert g.constraints[0] == {"kind": "regex", "words": [REGEX], "met": g.constraints[0]["met"]}
        # Left to right (block_length 1), every committed token kept the text a prefix of a match.
        text = _until_stop(tok, g.tokens)
        assert _regex_prefix(text), (text, g.text)
        assert g.constraints[0]["met"] == bool(re.fullmatch(REGEX, text)), text
        wholes += g.constraints[0]["met"]
        plain = eng.diffuse("the", length=16, steps=15, seed=seed, block_length=1, sampler="ancestral")
        assert not _regex_prefix(_until_stop(tok, plain.tokens)), plain.text  # the random model alone does not write it
    assert wholes >= 1, "no generation ended on a whole match"
    # Any decoding: a grammar makes each step commit from the left, so the whole canvas at once holds too.
    for seed in range(3):
        g = eng.diffuse("the", length=16, steps=6, seed=seed, sampler="confidence", constraints=[aios_rt.Regex(REGEX)])
        text = _until_stop(tok, g.tokens)
        assert _regex_prefix(text) and g.constraints[0]["met"] == bool(re.fullmatch(REGEX, text)), text
        # After the end, only end tokens: the text is clean.
        if g.constraints[0]["met"]:
            assert g.text == text, g.text
    # Bad patterns fail where they are written, with the reason.
    for bad, why in [("(", "cannot be used"), (r"\w{1000}", "cannot be used"), (r"[^\x00-\x{10FFFF}]", "nothing")]:
        with pytest.raises(ValueError, match=why):
            aios_rt.Regex(bad)
    with pytest.raises(aios_rt.InputError, match="finite"):
        eng.diffuse("the", length=12, steps=2, constraints=[aios_rt.Regex("a", weight=float("inf"))])
    assert repr(aios_rt.Regex("a+", weight=2.0)) == "Regex('a+', weight=2.0)"
    assert aios_rt.Regex("a+").pattern == "a+"
    bin_ = str(ROOT / "target" / "release" / "aios-run")
    r = subprocess.run([bin_, "generate", "--model", str(d), "--regex", REGEX, "--block-length", "1", "--length", "16",
                        "--steps", "15", "the"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "constraint regex" in r.stderr, r.stderr
    assert _regex_prefix(r.stdout.strip()), r.stdout
    r = subprocess.run([bin_, "generate", "--model", str(d), "--regex", "(", "the"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "cannot be used" in r.stderr and "panicked" not in r.stderr, r.stderr
