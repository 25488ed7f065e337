"""Model space of the CorrDiff pack: outputs normalised per variable (stats.json), minus the regression mean.

    r = (y - mean) / std - mu          encode: physical output y -> residual r the diffusion model samples
    y = (r + mu) * std + mean          decode

The residual model's sigma_data (CorrDiff: 0.5) refers to r; on the default data r has a standard
deviation of about 0.24 (t2m) and 0.47 (u10, v10).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .data import DownscalingData


@dataclass(frozen=True)
class ResidualCodec:
    """Per-variable normalisation of the outputs, channel c with mean[c] and std[c]."""

    mean: Tensor  # [C]
    std: Tensor  # [C]

    @classmethod
    def of(cls, data: DownscalingData) -> "ResidualCodec":
        mean, std = data.mean_std("output")
        return cls(torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32))

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (-1, 1, 1)  # channels precede (y, x)
        return self.mean.to(like).reshape(shape), self.std.to(like).reshape(shape)

    def normalize(self, y: Tensor) -> Tensor:
        """Physical [..., C, H, W] -> normalised."""
        mean, std = self._stats(y)
        return (y - mean) / std

    def denormalize(self, y_norm: Tensor) -> Tensor:
        """Normalised [..., C, H, W] -> physical."""
        mean, std = self._stats(y_norm)
        return y_norm * std + mean

    def encode(self, y: Tensor, mu: Tensor) -> Tensor:
        """Physical output -> residual r = y_norm - mu."""
        return self.normalize(y) - mu

    def decode(self, r: Tensor, mu: Tensor) -> Tensor:
        """Residual r (with mu broadcast against it) -> physical output."""
        return self.denormalize(r + mu)
