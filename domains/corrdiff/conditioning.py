"""The CorrDiff condition img_lr: normalised coarse inputs upsampled to the output grid, then normalised
invariants (elevation, land fraction), as PhysicsNeMo's HRRR-mini loader stacks them."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .data import DownscalingData


def img_lr(data: DownscalingData, idx: np.ndarray) -> Tensor:
    """[B, C_in + C_inv, H, W] float32 for times idx."""
    return torch.from_numpy(np.ascontiguousarray(data.condition(idx)))


def condition_channels(data: DownscalingData) -> int:
    """C_in + C_inv: what a teacher's condition input must match."""
    return len(data.input_vars) + len(data.invariant_vars)
