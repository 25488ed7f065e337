"""Random streams that do not depend on how work is split.

`StepRNG` draws the noise of one training step for the whole global batch and hands each process its
slice, so 1 process and N processes see the same noise. `MemberRNG` gives each ensemble member its own
stream, so member k is the same sample whatever batch it was generated in.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy SeedSequence hashing: keys far apart stay independent)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32).view(np.uint64)[0]
               >> np.uint64(1))


class StepRNG:
    """Noise of one training step: drawn for the global batch, sliced to this process's rows."""

    def __init__(self, *keys: int, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu"):
        self.generator = torch.Generator().manual_seed(derive_seed(*keys))
        self.rank, self.world_size, self.device = rank, world_size, torch.device(device)

    def _draw(self, fn, n_local: int, shape: Sequence[int], dtype) -> Tensor:
        full = fn((n_local * self.world_size, *shape), generator=self.generator, dtype=dtype)
        return full[self.rank * n_local:(self.rank + 1) * n_local].to(self.device)

    def randn(self, n: int, *shape: int, dtype=torch.float32) -> Tensor:
        return self._draw(torch.randn, n, shape, dtype)

    def seed(self) -> int:
        """A fresh seed for this process's own stream (e.g. dropout masks), distinct per rank."""
        return derive_seed(int(torch.randint(2**62, (1,), generator=self.generator)), self.rank)

    def rand(self, n: int, *shape: int, dtype=torch.float32) -> Tensor:
        return self._draw(torch.rand, n, shape, dtype)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[0], *x.shape[1:], dtype=x.dtype).to(x.device)

    def rand_like(self, x: Tensor) -> Tensor:
        return self.rand(x.shape[0], *x.shape[1:], dtype=x.dtype).to(x.device)


class MemberRNG:
    """One independent stream per ensemble member, keyed by (seed, case, member)."""

    def __init__(self, seed: int, cases: Sequence[int], members: Sequence[int], device: torch.device | str = "cpu"):
        if len(cases) != len(members):
            raise ValueError(f"MemberRNG: got {len(cases)} case ids for {len(members)} member ids")
        self.generators = [torch.Generator().manual_seed(derive_seed(seed, c, m)) for c, m in zip(cases, members)]
        self.device = torch.device(device)

    def randn(self, *shape: int, dtype=torch.float32) -> Tensor:
        """[B, *shape], row b from member b's stream."""
        rows = [torch.randn(shape, generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(*x.shape[1:], dtype=x.dtype).to(x.device)
