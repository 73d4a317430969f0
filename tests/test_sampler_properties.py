"""Property tests of the samplers through the Python API: for random canvases
(random given tokens at random positions, the rest masked) and random sampler
settings, the invariants of DESIGN section 3 hold or the call is refused with
InputError for exactly the settings that cannot work."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _train_path  # noqa: F401
import aios_rt

MASK = 3
CFG = dict(vocab_size=64, hidden_size=64, n_layers=2, n_heads=4, cond_dim=32, max_length=32, mask_token_id=MASK)
V, MAXLEN = CFG["vocab_size"], CFG["max_length"]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def eng(tmp_path_factory):
    d = tmp_path_factory.mktemp("aios_props")
    aios_rt.write_random_model(d / "model.f32.parquet", json.dumps(CFG), 7, "f32")
    return aios_rt.Engine(d / "model.f32.parquet", threads=2)


@pytest.fixture(scope="module")
def eng_time(tmp_path_factory):
    """A time-conditioned model: its logits depend on t, so nothing may be cached."""
    d = tmp_path_factory.mktemp("aios_props_t")
    aios_rt.write_random_model(d / "m.parquet", json.dumps({**CFG, "time_conditioning": True}), 8, "f32")
    return aios_rt.Engine(d / "m.parquet", threads=2)


@st.composite
def canvases(draw, max_len=MAXLEN):
    L = draw(st.integers(1, max_len))
    order = draw(st.permutations(range(L)))
    n_given = draw(st.integers(0, L))
    canvas = [MASK] * L
    for p in order[:n_given]:
        canvas[p] = draw(st.integers(0, V - 1).filter(lambda t: t != MASK))
    return canvas


@st.composite
def sampler_kwargs(draw, L):
    return dict(
        sampler=draw(st.sampled_from(aios_rt.SAMPLERS)),
        steps=draw(st.integers(1, 2 * L + 2) | st.integers(1, 4)),
        block_length=draw(st.none() | st.integers(1, L + 3) | st.integers(1, 3)),
        guidance=draw(st.just(0.0) | st.floats(0.0, 5.0)),
        temperature=draw(st.sampled_from([0.0, 1.0]) | st.floats(0.0, 3.0)),
        top_p=draw(st.sampled_from([1.0, 0.9]) | st.floats(1e-6, 1.0)),
        threshold=draw(st.floats(0.05, 1.0)),
        seed=draw(st.integers(0, 2**64 - 1)),
    )


@st.composite
def cases(draw):
    canvas = draw(canvases())
    return canvas, draw(sampler_kwargs(len(canvas)))


def block_plan(canvas, block_length, steps):
    """(masked count, steps allotted) per block that has masks, as the sampler
    splits them: blocks of block_length (or one block), steps spread evenly
    with the remainder going to the first blocks."""
    L = len(canvas)
    b = min(block_length or L, L)
    masked = [sum(t == MASK for t in canvas[s:s + b]) for s in range(0, L, b)]
    masked = [m for m in masked if m]
    n = len(masked)
    alloc = [steps // n + (i < steps % n) for i in range(n)] if n else []
    return masked, alloc


def check(canvas, kw, g):
    L = len(canvas)
    masked, alloc = block_plan(canvas, kw["block_length"], kw["steps"])
    assert len(g.tokens) == len(g.confidence) == len(g.entropy) == len(g.given) == L
    assert all(isinstance(t, int) and 0 <= t < V for t in g.tokens)
    assert MASK not in g.tokens
    for t_in, t_out, gv, c, e in zip(canvas, g.tokens, g.given, g.confidence, g.entropy):
        assert gv == (t_in != MASK)
        if gv:
            assert t_out == t_in and c == 1.0 and e == 0.0
        else:
            assert 0.0 < c <= 1.0
            assert e >= 0.0
    assert g.steps_run <= kw["steps"]
    assert g.forward_passes <= g.steps_run
    assert g.steps_run >= len(masked)  # every block with masks takes at least one step
    if kw["sampler"] != "ancestral":
        # Every non-ancestral step commits at least one token: no step repeats a canvas.
        assert g.forward_passes == g.steps_run
    if kw["sampler"] in ("confidence", "entropy", "margin"):
        # LLaDA schedule: a block runs all its steps unless it has fewer masks than steps.
        assert g.steps_run == sum(min(m, a) for m, a in zip(masked, alloc))
    else:
        assert g.steps_run <= sum(alloc)


@SETTINGS
@given(case=cases())
def test_sampler_invariants(eng, case):
    canvas, kw = case
    masked, _ = block_plan(canvas, kw["block_length"], kw["steps"])
    if kw["steps"] < len(masked):
        # More blocks with masks than steps: refused, and only with InputError.
        with pytest.raises(aios_rt.InputError):
            eng.diffuse_tokens(canvas, **kw)
        return
    g = eng.diffuse_tokens(canvas, **kw)
    check(canvas, kw, g)
    again = eng.diffuse_tokens(canvas, **kw)
    assert again.tokens == g.tokens
    assert again.confidence == g.confidence and again.entropy == g.entropy
    assert (again.steps_run, again.forward_passes) == (g.steps_run, g.forward_passes)


@SETTINGS
@given(case=cases())
def test_time_conditioned_model_never_reuses_logits(eng_time, case):
    canvas, kw = case
    masked, _ = block_plan(canvas, kw["block_length"], kw["steps"])
    if kw["steps"] < len(masked):
        with pytest.raises(aios_rt.InputError):
            eng_time.diffuse_tokens(canvas, **kw)
        return
    g = eng_time.diffuse_tokens(canvas, **kw)
    check(canvas, kw, g)
    assert g.forward_passes == g.steps_run


@SETTINGS
@given(canvas=canvases(), sampler=st.sampled_from(aios_rt.SAMPLERS), seed=st.integers(0, 2**32),
       steps=st.integers(1, 40))
def test_greedy_is_seed_independent_for_deterministic_samplers(eng, canvas, sampler, seed, steps):
    """At temperature 0 the token picks are argmaxes; the confidence/entropy/
    margin/threshold samplers then do not depend on the seed at all."""
    if sampler == "ancestral":
        sampler = "confidence"
    a = eng.diffuse_tokens(canvas, steps=steps, sampler=sampler, seed=seed, temperature=0.0)
    b = eng.diffuse_tokens(canvas, steps=steps, sampler=sampler, seed=seed + 1, temperature=0.0)
    assert a.tokens == b.tokens and a.confidence == b.confidence


@SETTINGS
@given(canvas=canvases(), kw=st.data())
def test_errors_leave_the_engine_usable(eng, canvas, kw):
    """Invalid numeric settings raise InputError; the engine keeps working."""
    bad = kw.draw(st.sampled_from([
        dict(steps=0), dict(temperature=float("nan")), dict(temperature=-0.5), dict(guidance=-1.0),
        dict(guidance=float("inf")), dict(block_length=0), dict(threshold=0.0), dict(threshold=1.5),
        dict(sampler="greedy"), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
    ]))
    with pytest.raises(aios_rt.InputError):
        eng.diffuse_tokens(canvas, **bad)
    g = eng.diffuse_tokens(canvas, steps=len(canvas))
    assert MASK not in g.tokens


@pytest.mark.parametrize("sampler", aios_rt.SAMPLERS)
def test_steps_must_cover_the_blocks_with_masks(eng, sampler):
    canvas = [MASK] * 16  # block_length 4 -> 4 blocks with masks
    with pytest.raises(aios_rt.InputError, match="blocks"):
        eng.diffuse_tokens(canvas, steps=3, block_length=4, sampler=sampler)
    g = eng.diffuse_tokens(canvas, steps=4, block_length=4, sampler=sampler)
    assert g.steps_run == 4 and MASK not in g.tokens
    # A block that is fully given needs no step.
    canvas2 = [5, 6, 7, 8] + [MASK] * 12
    g2 = eng.diffuse_tokens(canvas2, steps=3, block_length=4, sampler=sampler)
    assert g2.tokens[:4] == [5, 6, 7, 8] and g2.steps_run == 3 and MASK not in g2.tokens


@SETTINGS
@given(canvas=canvases(), seed=st.integers(0, 2**32), block_length=st.none() | st.integers(1, 8))
def test_threshold_below_every_probability_commits_a_block_per_step(eng, canvas, seed, block_length):
    masked, _ = block_plan(canvas, block_length, MAXLEN)
    g = eng.diffuse_tokens(canvas, steps=MAXLEN, sampler="threshold", threshold=1e-12, seed=seed,
                           block_length=block_length)
    assert MASK not in g.tokens
    assert g.steps_run == g.forward_passes == len(masked)


@SETTINGS
@given(L=st.integers(1, MAXLEN), kw=st.data())
def test_guidance_is_a_no_op_without_given_tokens(eng, L, kw):
    """The unconditional canvas is the canvas with given tokens masked: with
    nothing given, guided and unguided logits coincide."""
    k = kw.draw(sampler_kwargs(L))
    if k["steps"] < len(block_plan([MASK] * L, k["block_length"], k["steps"])[0]):
        return
    k0 = {**k, "guidance": 0.0}
    k1 = {**k, "guidance": kw.draw(st.floats(0.1, 5.0))}
    a, b = eng.diffuse_tokens([MASK] * L, **k0), eng.diffuse_tokens([MASK] * L, **k1)
    assert a.tokens == b.tokens and a.confidence == b.confidence


@pytest.mark.parametrize("sampler", aios_rt.SAMPLERS)
def test_one_step_fills_everything_at_once(eng, sampler):
    g = eng.diffuse_tokens([1] + [MASK] * (MAXLEN - 1), steps=1, sampler=sampler, seed=3)
    assert MASK not in g.tokens and g.steps_run == 1 and g.forward_passes == 1


def shipped_first_step_logits():
    """The shipped model (f32), which positions "The old house" gives on a
    64-token canvas, and the float64 logits of that canvas's first step with
    the mask token at -inf."""
    import numpy as np
    from pathlib import Path

    e = aios_rt.Engine(Path(__file__).resolve().parents[1] / "models" / "aios-text-tiny", dtype="f32", threads=2)
    first = e.diffuse("The old house", length=64, steps=1, sampler="ancestral", seed=0)
    given = np.array(first.given)
    canvas = np.where(given, np.array(first.tokens), MASK).tolist()
    lg = e.logits([canvas])[0].astype(np.float64)
    lg[:, MASK] = -np.inf
    return e, given, lg


def test_sampled_tokens_follow_the_models_distribution():
    """At temperature 1 a one-step ancestral generation reveals every masked
    position with a token drawn from the model's softmax, so the mean committed
    confidence over many seeds must match E[p(token)] = sum_i p_i^2, computed
    here from the logits in NumPy (catches a biased sampler, e.g. one that
    favours the top token or draws the mask)."""
    import numpy as np

    e, given, lg = shipped_first_step_logits()
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (p**2).sum(1)[~given].mean()
    means = []
    for seed in range(40):
        g = e.diffuse("The old house", length=64, steps=1, sampler="ancestral", seed=seed)
        assert MASK not in g.tokens
        means.append(np.array(g.confidence)[~given].mean())
    assert abs(np.mean(means) - expected) < 0.1 * expected, (np.mean(means), expected)


def test_nucleus_sampling_keeps_to_the_nucleus():
    """With top_p a one-step ancestral generation draws every position from
    the smallest set of most probable tokens holding top_p of the tempered
    mass, computed here in NumPy from the same logits; a tiny nucleus is the
    greedy choice."""
    import numpy as np

    e, given, lg = shipped_first_step_logits()
    for temperature, top_p in [(1.0, 0.5), (0.7, 0.9)]:
        z = lg / temperature
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        order = np.argsort(-p, axis=1, kind="stable")
        sorted_p = np.take_along_axis(p, order, 1)
        # Size of each nucleus: tokens until the running mass reaches top_p
        # (one more for f32 rounding at the boundary).
        size = (np.cumsum(sorted_p, 1) < top_p).sum(1) + 2
        drawn_sizes = []
        for seed in range(10):
            g = e.diffuse("The old house", length=64, steps=1, sampler="ancestral", seed=seed,
                          temperature=temperature, top_p=top_p)
            for pos in np.flatnonzero(~given):
                rank = int(np.flatnonzero(order[pos] == g.tokens[pos])[0])
                assert rank < size[pos], (temperature, top_p, pos, rank, size[pos])
                drawn_sizes.append(rank)
        assert max(drawn_sizes) > 0  # it still samples, not just the argmax
    greedy = e.diffuse("The old house", length=64, steps=16, sampler="confidence", temperature=0.0)
    tiny = e.diffuse("The old house", length=64, steps=16, sampler="confidence", seed=7, top_p=1e-9)
    assert tiny.tokens == greedy.tokens
