"""PyTorch reference of MDLM's DiT backbone (kuleshov-group/mdlm, models/dit.py), in f32.

Parameter names equal MDLM's minus the `backbone.` prefix; the Rust runtime loads by these names,
so do not rename modules. Flash-attention is replaced by plain scaled-dot-product attention
(scale 1/sqrt(head_dim), the same as flash-attn's default). Dropout is omitted (MDLM uses 0.1 in
training but it is an identity at inference, which is what the runtime reproduces).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # Non-interleaved (GPT-NeoX style), matching flash_attn.apply_rotary_emb_qkv_(interleaved=False).
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def rotary_cos_sin(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [L, hd]
    return emb.cos(), emb.sin()


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in f32, then scaled by a learned weight (MDLM)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones([dim]))
        self.dim = dim
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.float(), [self.dim], eps=self.eps)
        return x * self.weight[None, None, :]


class TimestepEmbedder(nn.Module):
    def __init__(self, cond_dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, cond_dim, bias=True),
            nn.SiLU(),
            nn.Linear(cond_dim, cond_dim, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class EmbeddingLayer(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.embedding = nn.Parameter(torch.empty((vocab_size, dim)))
        nn.init.kaiming_uniform_(self.embedding, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding[x]


class DDiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.norm1 = LayerNorm(dim, cfg.norm_eps)
        self.attn_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim, cfg.norm_eps)
        self.mlp = nn.Sequential(
            nn.Linear(dim, cfg.mlp_ratio * dim, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(cfg.mlp_ratio * dim, dim, bias=True),
        )
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 6 * dim, bias=True)
        # Zero init as in MDLM: every block starts as the identity.
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.n_heads
        hd = d // h
        # c is [B, C] (one noise level per sequence) or [B, L, C] (one per position, multimodal canvas).
        c = c[:, None] if c.dim() == 2 else c
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=2)
        x_skip = x
        x = modulate(self.norm1(x), shift_msa, scale_msa)
        qkv = self.attn_qkv(x).view(b, s, 3, h, hd)  # 'b s (three h d) -> b s three h d'
        q, k, v = qkv.unbind(dim=2)  # [b, s, h, hd]
        cs, sn = cos[None, :, None, :], sin[None, :, None, :]
        q = q * cs + rotate_half(q) * sn
        k = k * cs + rotate_half(k) * sn
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, hd]
        att = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=1.0 / math.sqrt(hd))
        att = att.transpose(1, 2).reshape(b, s, d)
        x = x_skip + gate_msa * self.attn_out(att)
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class DDitFinalLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm_final = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.linear = nn.Linear(cfg.hidden_size, cfg.vocab_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.adaLN_modulation = nn.Linear(cfg.cond_dim, 2 * cfg.hidden_size, bias=True)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def hidden(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The normalised, modulated states every output head reads (text: `linear`; image/audio: their proj_out)."""
        c = c[:, None] if c.dim() == 2 else c
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=2)
        return modulate(self.norm_final(x), shift, scale)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.linear(self.hidden(x, c))


class DiT(nn.Module):
    """MDLM DiT. forward returns RAW logits [B, L, V]; SUBS masking is applied by losses/samplers.

    With continuous heads (cfg.image_size / cfg.audio_mels > 0) the same backbone also runs a multimodal
    canvas, see `forward_canvas`.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        # Registration order matters: it equals MDLM's, so parameters() order matches MDLM EMA lists.
        self.vocab_embed = EmbeddingLayer(cfg.hidden_size, cfg.vocab_size)
        self.sigma_map = TimestepEmbedder(cfg.cond_dim)
        self.blocks = nn.ModuleList([DDiTBlock(cfg) for _ in range(cfg.n_layers)])
        self.output_layer = DDitFinalLayer(cfg)
        # Multimodal parts come after, so a text model's parameter order (and file) is unchanged.
        if cfg.multimodal:
            from .heads import AudioHead, ImageHead, ModalityEmbedding
            self.modality_embed = ModalityEmbedding(cfg.hidden_size)
            self.image_head = ImageHead(cfg) if cfg.has_image else None
            self.audio_head = AudioHead(cfg) if cfg.has_audio else None

    def forward(self, tokens: torch.Tensor, sigma: torch.Tensor | None = None, control=None) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"DiT.forward: tokens must be [B, L], got shape {tuple(tokens.shape)}")
        b, s = tokens.shape
        if s > self.config.max_length:
            raise ValueError(f"DiT.forward: length {s} > max_length {self.config.max_length}")
        # MDLM _process_sigma: without time conditioning (and for the AR baseline) sigma is 0.
        if sigma is None or not self.config.time_conditioning or self.config.causal:
            sigma = torch.zeros(b, device=tokens.device)
        elif sigma.dim() > 1:
            sigma = sigma.squeeze(-1)
        x = self.vocab_embed(tokens)
        if self.config.multimodal:
            from .heads import MODALITY_TEXT
            x = x + self.modality_embed(MODALITY_TEXT)
        c = F.silu(self.sigma_map(sigma))
        cos, sin = rotary_cos_sin(s, self.config.head_dim, self.config.rope_base, tokens.device)
        x = self._blocks(x, cos, sin, c, control, (s, 0, 0))
        return self.output_layer(x, c)

    def _blocks(self, x, cos, sin, c, control, sizes) -> torch.Tensor:
        """The blocks; `control` (an `aios_train.controlnet` callable: (x, cos, sin, c, sizes) -> residuals) adds
        residual i to the output of block i, as ControlNet adds its zero-projected copies' outputs."""
        residuals = control(x, cos, sin, c, sizes) if control is not None else []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, c)
            if i < len(residuals):
                x = x + residuals[i]
        return x

    def forward_canvas(self, tokens: torch.Tensor | None, image: torch.Tensor | None = None,
                       audio: torch.Tensor | None = None, t_image: torch.Tensor | None = None,
                       t_audio: torch.Tensor | None = None, sigma: torch.Tensor | None = None,
                       text_logits: bool = True, control=None) -> dict[str, torch.Tensor]:
        """One forward pass over a canvas [text tokens | image patches | audio frame groups].

        tokens [B, Lt] (Lt may be 0 or None), image [B, C, H, W] (noisy, in [-1, 1] units), audio
        [B, frames, mels] (noisy, normalised log-mel), t_image / t_audio [B] continuous times in [0, 1].
        Each segment gets its own adaLN conditioning (per-position time embedding): text uses sigma as in
        MDLM (0 without time conditioning), image and audio use their own t. Returns a dict with "text"
        (raw logits [B, Lt, V]), "image" (v-prediction [B, C, H, W]) and "audio" (v [B, frames, mels]).
        """
        from .heads import CONTINUOUS_TIME_SCALE, MODALITY_AUDIO, MODALITY_IMAGE, MODALITY_TEXT
        cfg = self.config
        if not cfg.multimodal:
            raise ValueError("forward_canvas: this model has no continuous heads (a text-only model)")
        parts, conds, sizes = [], [], []
        b = next(t.shape[0] for t in (tokens, image, audio) if t is not None)
        dev = self.vocab_embed.embedding.device
        if tokens is not None and tokens.shape[1] > 0:
            if sigma is None or not cfg.time_conditioning:
                sigma = torch.zeros(b, device=dev)
            parts.append(self.vocab_embed(tokens) + self.modality_embed(MODALITY_TEXT))
            conds.append(F.silu(self.sigma_map(sigma)))
            sizes.append(tokens.shape[1])
        else:
            sizes.append(0)
        for x, t, head, mod in ((image, t_image, self.image_head, MODALITY_IMAGE),
                                (audio, t_audio, self.audio_head, MODALITY_AUDIO)):
            if x is None:
                sizes.append(0)
                continue
            if head is None:
                raise ValueError(f"forward_canvas: this model has no {('image', 'audio')[mod - 1]} head "
                                 f"(it has: {', '.join(cfg.heads())})")
            if t is None or t.shape != (b,):
                raise ValueError("forward_canvas: each continuous input needs its time t of shape [B]")
            h = head.embed(x) + self.modality_embed(mod)
            parts.append(h)
            conds.append(F.silu(self.sigma_map(t * CONTINUOUS_TIME_SCALE)))
            sizes.append(h.shape[1])
        x = torch.cat(parts, dim=1)
        s = x.shape[1]
        if s > cfg.max_length:
            raise ValueError(f"forward_canvas: canvas length {s} > max_length {cfg.max_length}")
        c = torch.cat([cv[:, None].expand(b, n, cv.shape[-1]) for cv, n in zip(conds, (n for n in sizes if n))], dim=1)
        cos, sin = rotary_cos_sin(s, cfg.head_dim, cfg.rope_base, dev)
        x = self._blocks(x, cos, sin, c, control, tuple(sizes))
        h = self.output_layer.hidden(x, c)
        out: dict[str, torch.Tensor] = {}
        lt, li, la = sizes
        if lt and text_logits:
            out["text"] = self.output_layer.linear(h[:, :lt])
        if li:
            out["image"] = self.image_head.out(h[:, lt:lt + li])
        if la:
            out["audio"] = self.audio_head.out(h[:, lt + li:])
        return out

    def parameter_split(self) -> dict[str, int]:
        """Parameters per part: backbone (blocks, time MLP, final norm/adaLN, modality embedding) and each head."""
        split = {"backbone": 0, "text": 0, "image": 0, "audio": 0}
        for name, p in self.named_parameters():
            if name.startswith("vocab_embed.") or name.startswith("output_layer.linear."):
                split["text"] += p.numel()
            elif name.startswith("image_head."):
                split["image"] += p.numel()
            elif name.startswith("audio_head."):
                split["audio"] += p.numel()
            else:
                split["backbone"] += p.numel()
        return split

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.vocab_embed.embedding.numel()
        return n


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the runtime needs for `cfg`, with its shape, in module (= MDLM) order."""
    D, C, V, H = cfg.hidden_size, cfg.cond_dim, cfg.vocab_size, cfg.mlp_ratio * cfg.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "vocab_embed.embedding": (V, D),
        "sigma_map.mlp.0.weight": (C, 256),
        "sigma_map.mlp.0.bias": (C,),
        "sigma_map.mlp.2.weight": (C, C),
        "sigma_map.mlp.2.bias": (C,),
    }
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "norm1.weight": (D,),
            p + "attn_qkv.weight": (3 * D, D),
            p + "attn_out.weight": (D, D),
            p + "norm2.weight": (D,),
            p + "mlp.0.weight": (H, D),
            p + "mlp.0.bias": (H,),
            p + "mlp.2.weight": (D, H),
            p + "mlp.2.bias": (D,),
            p + "adaLN_modulation.weight": (6 * D, C),
            p + "adaLN_modulation.bias": (6 * D,),
        })
    shapes.update({
        "output_layer.norm_final.weight": (D,),
        "output_layer.linear.weight": (V, D),
        "output_layer.linear.bias": (V,),
        "output_layer.adaLN_modulation.weight": (2 * D, C),
        "output_layer.adaLN_modulation.bias": (2 * D,),
    })
    if cfg.multimodal:
        shapes["modality_embed.embedding"] = (3, D)
    if cfg.has_image:
        P, N = cfg.image_patch_dim, cfg.image_tokens
        shapes.update({
            "image_head.proj_in.weight": (D, P), "image_head.proj_in.bias": (D,), "image_head.pos_embed": (N, D),
            "image_head.proj_out.weight": (P, D), "image_head.proj_out.bias": (P,),
        })
    if cfg.has_audio:
        P, N = cfg.audio_token_dim, cfg.audio_tokens
        shapes.update({
            "audio_head.proj_in.weight": (D, P), "audio_head.proj_in.bias": (D,), "audio_head.pos_embed": (N, D),
            "audio_head.proj_out.weight": (P, D), "audio_head.proj_out.bias": (P,),
        })
    return shapes


def randomize_(model: DiT, seed: int = 0, std: float = 0.02) -> DiT:
    """Fill every parameter with non-zero random values (tests/parity: zero-init hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name.endswith("norm_final.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * 5 * torch.randn(p.shape, generator=g) if "adaLN" in name else torch.randn(p.shape, generator=g) * std)
    return model
