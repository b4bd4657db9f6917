"""Linear probe: the body stays frozen; only a new head is fitted on its pre-logits.

Features are computed once (test-time pre-processing, no augmentation), then a multinomial
logistic regression is fitted to them with full-batch L-BFGS, a few seconds even on a CPU.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(model, data, device: torch.device, *, batch: int = 64, workers: int = 0,
                     bf16: bool = False, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-logits [N, D] float32 on CPU, labels [N]) for every item of `data`, in order."""
    from tqdm.auto import tqdm

    model.eval()
    loader = DataLoader(data, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    feats, labels = [], []
    for images, y in tqdm(loader, desc="features", unit="batch", disable=not progress):
        with autocast:
            feats.append(model.forward_features(images.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def fit_logistic_regression(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                            l2: float = 1e-4, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [K, D] and bias [K] minimising mean cross-entropy + l2 * |W|^2 (full-batch L-BFGS)."""
    x = features.double()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std  # standardise for a well-conditioned problem; folded back below
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ weight.T + bias, labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        w = weight / std  # logits = ((x - mean) / std) W^T + b = x (W/std)^T + (b - mean (W/std)^T)
        b = bias - mean @ w.T
    return w.float(), b.float()
