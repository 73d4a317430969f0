"""Memory training: the window layout the runtime's memory segment uses, given (kept) positions that are never
masked, and warm-starting a run from a shipped model."""

import numpy as np
import pytest
import torch

import _train_path  # noqa: F401
from _tiny_tokenizer import train_tiny_tokenizer
from aios_train.export import save_model
from aios_train.memory_pairs import memory_windows, split_lead
from aios_train.model import DiT
from aios_train.schedule import diffusion_loss
from aios_train.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID
from aios_train.train import TrainArgs, train

LEADS = [f"The town of Alder{i} lies on the river. It was founded in {1800 + i}. The mill of Alder{i} still "
         f"grinds corn every week and the market opens at dawn." for i in range(30)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json", LEADS * 3, vocab_size=300)


def test_memory_windows_layout(tok):
    mem, target = split_lead(LEADS[3], tok, memory_tokens=40)
    assert mem and target
    w, keep = memory_windows(LEADS, tok, length=96, memory_tokens=40, distractors=1, drop=0.2, copies=4, seed=0)
    assert w.shape == keep.shape and w.shape[1] == 96 and w.dtype == np.int64 and keep.dtype == bool
    mem_of = {tuple(t[:8]): m for m, t in (split_lead(lead, tok, 40) for lead in LEADS)}
    own = 0
    for row, k in zip(w, keep):
        # [BOS] m [EOS] ... [BOS] target [EOS] [PAD]...: every memory token and pad is kept, the target is not.
        bos = np.flatnonzero(row == BOS_ID)
        start = bos[-1]
        assert k[: start + 1].all() and not k[start + 1: start + 4].any()
        assert (row[k & (np.arange(96) > start)] == PAD_ID).all()
        assert len(bos) in (2, 3) and row[start - 1] == EOS_ID
        segs = [row[b + 1: np.flatnonzero(row[b:] == EOS_ID)[0] + b] for b in bos[:-1]]
        own += any(s.tolist() == mem_of[tuple(row[start + 1: start + 9].tolist())] for s in segs)
    assert 0.65 < own / len(w) < 0.95  # the own memory is dropped with probability 0.2
    assert MASK_ID not in w
    with pytest.raises(ValueError, match="drop"):
        memory_windows(LEADS, tok, 96, drop=1.0)


def test_kept_positions_are_never_masked():
    cfg = dict(vocab_size=32, hidden_size=32, n_layers=1, n_heads=2, cond_dim=16, max_length=12)
    from aios_train.config import ModelConfig
    model = DiT(ModelConfig(**cfg, mask_token_id=MASK_ID))
    x0 = torch.randint(4, 32, (8, 12))
    keep = torch.zeros(8, 12, dtype=torch.bool)
    keep[:, :5] = True
    gen = torch.Generator().manual_seed(0)
    nll, _ = diffusion_loss(model, x0, MASK_ID, gen, t=torch.full((8,), 0.999), keep=keep)
    assert (nll[:, :5] == 0).all() and (nll[:, 5:] > 0).all()


def test_warm_start_and_keep_in_train(tmp_path):
    from aios_train.config import ModelConfig
    kw = dict(vocab_size=32, hidden_size=32, n_layers=2, n_heads=2, cond_dim=16, max_length=16)
    base = DiT(ModelConfig(**kw, mask_token_id=MASK_ID))
    save_model(base, base.config, tmp_path / "base.parquet")
    rng = np.random.default_rng(0)
    windows = rng.integers(4, 32, (64, 16))
    keep = np.zeros(windows.shape, dtype=bool)
    keep[:, :6] = True
    args = dict(out=str(tmp_path / "run"), train_windows=windows, train_keep=keep, warm_start=str(tmp_path / "base.parquet"),
                steps=3, batch_size=8, lr=0.0, warmup=1, eval_every=0, ckpt_every=10, progress=False, **kw)
    r = train(TrainArgs(**args))
    for k, v in base.state_dict().items():
        assert torch.equal(r["model"].state_dict()[k], v), k  # lr 0: the warm start, unchanged
    with pytest.raises(ValueError, match="keep mask"):
        train(TrainArgs(**{**args, "out": str(tmp_path / "bad"), "train_keep": keep[:, :8]}))
    with pytest.raises(ValueError, match="config"):
        train(TrainArgs(**{**args, "out": str(tmp_path / "bad2"), "hidden_size": 64, "n_heads": 2}))
