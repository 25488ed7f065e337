"""Class conditioning for the toy pack: labels become a one-hot tensor under the key 'class'."""
from __future__ import annotations

import torch
from torch import Tensor


def class_cond(labels: Tensor, classes: int) -> dict[str, Tensor]:
    """{'class': one-hot [B, classes]} from integer labels [B]."""
    return {"class": torch.nn.functional.one_hot(labels.long(), classes).float()}


def labels_of(cond: dict[str, Tensor] | None) -> Tensor | None:
    """Integer labels [B] back from a condition, or None when unconditional."""
    return None if not cond else cond["class"].argmax(dim=1)
