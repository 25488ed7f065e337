"""Gaussian mixtures in n dimensions: exact samples, optional class labels, a fixed training set."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .conditioning import class_cond


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k w_k N(mu_k, s_k^2 I); component k belongs to class labels[k]."""

    means: Tensor  # [K, D]
    stds: Tensor  # [K]
    weights: Tensor  # [K], sums to 1
    labels: Tensor  # [K], long

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def sigma_data(self) -> float:
        """Per-coordinate standard deviation of the mixture, pooled over coordinates."""
        mean = self.weights @ self.means  # [D]
        second = self.weights @ (self.means**2 + self.stds[:, None] ** 2)  # [D]
        return float((second - mean**2).mean().sqrt())

    def restricted(self, label: int | None) -> "GaussianMixture":
        """The mixture of one class's components (renormalised); the whole mixture for None."""
        if label is None:
            return self
        keep = self.labels == label
        return GaussianMixture(self.means[keep], self.stds[keep], self.weights[keep] / self.weights[keep].sum(),
                               self.labels[keep])

    def sample(self, n: int, generator: torch.Generator, label: int | None = None) -> tuple[Tensor, Tensor]:
        """n exact samples [n, D] and their component indices [n] (indices within the restricted mixture)."""
        mix = self.restricted(label)
        comp = torch.multinomial(mix.weights, n, replacement=True, generator=generator)
        x = mix.means[comp] + mix.stds[comp, None] * torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return x, comp


def make_mixture(*, dim: int = 2, modes: int = 8, radius: float = 2.0, mode_std: float = 0.15,
                 classes: int = 0, seed: int = 0) -> GaussianMixture:
    """Modes on a circle (dim 2) or at random on a sphere (dim > 2), unequal weights w_k ∝ 1 + k/K."""
    if dim < 1 or modes < 1:
        raise ValueError(f"toy mixture needs dim >= 1 and modes >= 1, got dim={dim}, modes={modes}")
    if dim == 2:
        angle = 2 * math.pi * torch.arange(modes, dtype=torch.float64) / modes
        means = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    else:
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(modes, dim, generator=g, dtype=torch.float64)
        means = radius * u / u.norm(dim=1, keepdim=True)
    weights = 1 + torch.arange(modes, dtype=torch.float64) / modes
    labels = torch.arange(modes) % classes if classes > 0 else torch.zeros(modes, dtype=torch.long)
    return GaussianMixture(means, torch.full((modes,), mode_std, dtype=torch.float64), weights / weights.sum(), labels)


class MixtureDataset(Dataset):
    """A fixed set of n exact samples with their class conditions (batched reads via __getitems__)."""

    def __init__(self, mixture: GaussianMixture, n: int, *, classes: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        comp = torch.multinomial(mixture.weights, n, replacement=True, generator=g)
        x = mixture.means[comp] + mixture.stds[comp, None] * torch.randn(n, mixture.dim, generator=g, dtype=torch.float64)
        self.x, self.label, self.classes = x.float(), mixture.labels[comp], classes

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, idx: list[int]) -> dict:
        item = {"x": self.x[idx]}
        if self.classes:
            item["cond"] = class_cond(self.label[idx], self.classes)
        return item

    def __getitem__(self, i: int) -> dict:
        item = {"x": self.x[i]}
        if self.classes:
            item["cond"] = {k: v[0] for k, v in class_cond(self.label[i:i + 1], self.classes).items()}
        return item
