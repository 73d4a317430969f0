import math

import pytest
import torch
import torch.nn.functional as F

import _train_path  # noqa: F401
from aios_train.config import ModelConfig
from aios_train.model import DiT, expected_shapes, randomize_


def cfg(**kw):
    return ModelConfig(**{**dict(vocab_size=50, hidden_size=32, n_layers=2, n_heads=4, cond_dim=16,
                                 max_length=24, mask_token_id=3), **kw})


def test_names_shapes_and_forward():
    c = cfg()
    m = randomize_(DiT(c), seed=1)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected_shapes(c)
    x = torch.randint(0, 50, (3, 24), generator=torch.Generator().manual_seed(0))
    y1, y2 = m(x), m(x)
    assert y1.shape == (3, 24, 50) and y1.dtype == torch.float32
    assert torch.equal(y1, y2)
    assert m(x[:, :10]).shape == (3, 10, 50)
    with pytest.raises(ValueError):
        m(torch.zeros(2, 25, dtype=torch.long))


def test_zero_init_gives_zero_logits():
    m = DiT(cfg())  # MDLM init: output layer is zero
    assert torch.count_nonzero(m(torch.randint(0, 50, (1, 8)))) == 0


def test_time_conditioning():
    x = torch.randint(0, 50, (2, 12))
    m = randomize_(DiT(cfg(time_conditioning=True)), seed=2)
    assert not torch.allclose(m(x, torch.tensor([0.1, 0.1])), m(x, torch.tensor([2.0, 2.0])))
    assert torch.equal(m(x, None), m(x, torch.zeros(2)))
    m2 = DiT(cfg(time_conditioning=False))
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2(x, torch.tensor([0.1, 2.0])), m2(x, torch.zeros(2)))
    assert torch.equal(m2(x, torch.zeros(2)), m(x, torch.zeros(2)))


def test_causal_mask_is_causal():
    m = randomize_(DiT(cfg(causal=True)), seed=3)
    x = torch.randint(4, 50, (1, 16))
    x2 = x.clone()
    x2[0, 10] = (x[0, 10] + 1) % 50
    a, b = m(x), m(x2)
    assert torch.equal(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    # The bidirectional model with the same weights does see the future.
    mb = DiT(cfg(causal=False))
    mb.load_state_dict(m.state_dict())
    assert not torch.allclose(mb(x)[:, :10], mb(x2)[:, :10])


def _mdlm_reference(m: DiT, tokens: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Independent re-statement of MDLM dit.py: qkv as 'b s three h d', flash-attn style rotary on half dims."""
    c = m.config
    D, H = c.hidden_size, c.n_heads
    hd = D // H
    sd = m.state_dict()
    x = sd["vocab_embed.embedding"][tokens]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = sigma[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    h = F.linear(temb, sd["sigma_map.mlp.0.weight"], sd["sigma_map.mlp.0.bias"])
    cvec = F.silu(F.linear(F.silu(h), sd["sigma_map.mlp.2.weight"], sd["sigma_map.mlp.2.bias"]))
    L = tokens.shape[1]
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(L).float()[:, None] * inv[None]  # [L, hd/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    def rot(t):  # flash_attn apply_rotary_emb, interleaved=False
        t1, t2 = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], -1)

    def ln(v, w):
        return F.layer_norm(v, [D], eps=1e-5) * w

    for i in range(c.n_layers):
        p = f"blocks.{i}."
        mod = F.linear(cvec, sd[p + "adaLN_modulation.weight"], sd[p + "adaLN_modulation.bias"])[:, None]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=2)
        hN = ln(x, sd[p + "norm1.weight"]) * (1 + sc1) + sh1
        qkv = (hN @ sd[p + "attn_qkv.weight"].T).view(x.shape[0], L, 3, H, hd)
        q, k, v = rot(qkv[:, :, 0]), rot(qkv[:, :, 1]), qkv[:, :, 2]
        att = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        if c.causal:
            att = att.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
        o = torch.einsum("bhqk,bkhd->bqhd", att.softmax(-1), v).reshape(x.shape[0], L, D)
        x = x + g1 * (o @ sd[p + "attn_out.weight"].T)
        hN = ln(x, sd[p + "norm2.weight"]) * (1 + sc2) + sh2
        mlp = F.linear(F.gelu(F.linear(hN, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]), approximate="tanh"),
                       sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
        x = x + g2 * mlp
    sh, sc = F.linear(cvec, sd["output_layer.adaLN_modulation.weight"], sd["output_layer.adaLN_modulation.bias"])[:, None].chunk(2, 2)
    hN = ln(x, sd["output_layer.norm_final.weight"]) * (1 + sc) + sh
    return F.linear(hN, sd["output_layer.linear.weight"], sd["output_layer.linear.bias"])


@pytest.mark.parametrize("causal", [False, True])
def test_matches_independent_mdlm_statement(causal):
    m = randomize_(DiT(cfg(time_conditioning=not causal, causal=causal)), seed=4)
    x = torch.randint(0, 50, (2, 20))
    sigma = torch.tensor([0.3, 1.7]) if not causal else torch.zeros(2)
    torch.testing.assert_close(m(x, sigma), _mdlm_reference(m, x, sigma), atol=1e-5, rtol=1e-4)
