"""A linear softmax classifier on images, the runtime's classifier energy (`aios_rt.ClassEnergy`, `aios-run
--classifier`): `E = -log p(class | x0)` on the sampler's image estimate, whose gradient `sum_k p_k W_k - W_class` is
exact and cheap. Linear on purpose: the energy's gradient must exist in closed form in the runtime, and on x0
estimates (blurry early on) a small linear model degrades gracefully.

Container (`aios.kind = "classifier"`): `weight` [K, C*H*W], `bias` [K], f32, over pixels in [-1, 1] (the runtime's
image units); `aios.config` {"classes", "image_size", "image_channels", "test_accuracy", ...}.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .export import read_container, write_tensors

KIND = "classifier"


def train_classifier(data: str | Path, out: str | Path, epochs: int = 5, seed: int = 0, threads: int = 1) -> dict:
    """Fits the classifier on data-mm's Fashion-MNIST training images, reports test accuracy, writes `out`."""
    from .mmdata import FASHION_CLASSES
    from .unified import load_mm

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    imgs, _, _ = load_mm(data)
    x = torch.from_numpy(imgs["train_x"]).float().flatten(1) / 127.5 - 1
    y = torch.from_numpy(imgs["train_y"]).long()
    xt = torch.from_numpy(imgs["test_x"]).float().flatten(1) / 127.5 - 1
    yt = torch.from_numpy(imgs["test_y"]).long()
    lin = torch.nn.Linear(x.shape[1], len(FASHION_CLASSES))
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 128):
            idx = perm[i:i + 128]
            loss = F.cross_entropy(lin(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = float((lin(xt).argmax(1) == yt).float().mean())
    cfg = {"classes": list(FASHION_CLASSES), "image_size": 28, "image_channels": 1, "test_accuracy": round(acc, 4),
           "epochs": epochs, "train_s": round(time.time() - t0, 1), "data": "Fashion-MNIST (data-mm)"}
    write_tensors(out, {"weight": lin.weight.detach(), "bias": lin.bias.detach()}, kind=KIND, config=cfg)
    return cfg


def load_classifier(path: str | Path) -> tuple[torch.nn.Linear, dict]:
    tensors, cfg = read_container(path, KIND, "an image classifier")
    w = torch.from_numpy(tensors["weight"])
    lin = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.from_numpy(tensors["bias"]))
    return lin, cfg


__all__ = ["train_classifier", "load_classifier", "KIND"]
