"""PyTorch eager reference of the runtime's confidence-family samplers.

Used as the reference for the Rust samplers (greedy decoding must give the same
tokens) and as the "PyTorch eager" side of bench/bench_text.py. Follows
crates/aios-core/src/sampler/mod.rs: LLaDA low-confidence remasking, commits
spread evenly over steps (remainder first), ties broken by position.
"""

from __future__ import annotations

import math

import torch


def commit_schedule(n: int, steps: int) -> list[int]:
    return [n // steps + (1 if i < n % steps else 0) for i in range(steps)]


@torch.no_grad()
def confidence_sample(model, canvas: list[int], steps: int, mask_id: int, strategy: str = "confidence",
                      sigma: float | None = None) -> tuple[list[int], list[float], int]:
    """Greedy (temperature 0) confidence/entropy/margin sampling of one canvas.

    Returns (tokens, confidence at commit, forward passes)."""
    x = torch.tensor([canvas], dtype=torch.long)
    conf = [1.0 if t != mask_id else math.nan for t in canvas]
    n_masked = int((x == mask_id).sum())
    schedule = commit_schedule(n_masked, steps)
    passes = 0
    for s in range(steps):
        masked = (x[0] == mask_id).nonzero().flatten()
        if masked.numel() == 0:
            break
        logits = model(x, None if sigma is None else torch.tensor([sigma]))[0].double()
        passes += 1
        logits[:, mask_id] = -math.inf
        logp = logits.log_softmax(-1)[masked]
        p = logp.exp()
        token = p.argmax(-1)
        prob = p.gather(1, token[:, None])[:, 0]
        if strategy == "confidence":
            score = prob
        elif strategy == "entropy":
            score = (p * logp).nan_to_num().sum(-1)  # = -entropy
        elif strategy == "margin":
            top2 = p.topk(2, dim=-1).values
            score = top2[:, 0] - top2[:, 1]
        else:
            raise ValueError(f"unknown strategy {strategy!r}")
        steps_left = steps - s
        k = max(schedule[s], -(-masked.numel() // steps_left))
        # Highest score first, ties by position (stable sort on descending score).
        order = sorted(range(masked.numel()), key=lambda i: (-float(score[i]), int(masked[i])))[:k]
        for i in order:
            pos = int(masked[i])
            x[0, pos] = token[i]
            conf[pos] = float(prob[i])
    return x[0].tolist(), conf, passes
