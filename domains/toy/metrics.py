"""Toy scores: distances between a model's samples and exact samples, and mode weights (collapse shows here)."""
from __future__ import annotations

import torch
from torch import Tensor

from fastgen_sci.metrics import energy_distance, sliced_wasserstein

from .data import GaussianMixture


def mode_weight_error(samples: Tensor, mixture: GaussianMixture) -> float:
    """Total-variation distance between the share of samples nearest each mode and the mode weights."""
    nearest = torch.cdist(samples.double(), mixture.means).argmin(dim=1)
    share = torch.bincount(nearest, minlength=len(mixture.weights)).double() / len(samples)
    return float(0.5 * (share - mixture.weights).abs().sum())


def toy_scores(samples: Tensor, exact: Tensor, mixture: GaussianMixture, seed: int = 0) -> dict[str, float]:
    """Energy distance and sliced W2 to exact samples [M', D], and the mode-weight error, for samples [M, D]."""
    g = torch.Generator().manual_seed(seed)
    return {"energy_distance": float(energy_distance(samples.double(), exact.double())),
            "sliced_wasserstein": float(sliced_wasserstein(samples.double(), exact.double(), generator=g)),
            "mode_weight_tv": mode_weight_error(samples, mixture)}
