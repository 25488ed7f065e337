"""Directional (time) derivatives of a network, for sCM's and MeanFlow's tangents, two ways.

`exact` uses forward-mode AD: dual numbers (torch.autograd.forward_ad), the same derivative as
torch.func.jvp at ~80% of its cost on a CPU SongUNet (benchmarks/jvp_cost.py). `fd` uses a finite
difference and works for any network that runs forward, including kernels and sharded models without
forward-mode support. Neither builds a graph: the derivative is a target (stop-gradient) in every method
that uses it (computing it with the primal in one graph-recording pass measured 1.9x slower: the tangent's
ops are recorded too).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

MODES = ("exact", "fd")


def jvp(fn: Callable[..., Tensor], primals: Sequence[Tensor], tangents: Sequence[Tensor], *, mode: str = "exact",
        h: Tensor | float = 1e-3, ahead: Tensor | None = None, behind: Tensor | None = None) -> Tensor:
    """d/de fn(*(p + e v)) at e = 0, without gradient.

    Args:
        primals, tangents: fn's arguments and the direction, each with a leading batch dim B.
        mode: 'exact' (forward-mode AD) or 'fd' (finite difference).
        h: the finite-difference step, a float or one per sample [B].
        ahead, behind: per-sample 0/1 [B] choosing the stencil, J ~ (fn(p + a h v) - fn(p - b h v)) / ((a + b) h):
            both 1 (default) is the central difference, (1, 0) forward and (0, 1) backward, for samples
            whose central stencil would leave the domain (MeanFlow's t near 0 or 1).
    """
    if mode not in MODES:
        raise ValueError(f"derivative mode '{mode}' unknown; choose one of {list(MODES)}")
    primals, tangents = tuple(primals), tuple(tangents)
    if len(primals) != len(tangents):
        raise ValueError(f"jvp: {len(primals)} primals but {len(tangents)} tangents")
    if mode == "exact":
        with torch.no_grad(), fwAD.dual_level():
            out = fn(*(fwAD.make_dual(p, v.to(p.dtype)) for p, v in zip(primals, tangents)))
            tangent = fwAD.unpack_dual(out).tangent
            return torch.zeros_like(out) if tangent is None else tangent
    B = primals[0].shape[0]
    ref = primals[0]
    h = torch.as_tensor(h, dtype=torch.float64, device=ref.device).expand(B)
    a = (torch.ones(B, device=ref.device) if ahead is None else ahead).double()
    b = (torch.ones(B, device=ref.device) if behind is None else behind).double()
    if bool(((a + b) == 0).any()):
        raise ValueError("jvp: a sample has neither a step ahead nor behind")

    def shifted(k: Tensor) -> tuple[Tensor, ...]:  # p + k h v, per sample
        return tuple(p + _bcast(k * h, p).to(p.dtype) * v for p, v in zip(primals, tangents))

    with torch.no_grad():
        up, down = fn(*shifted(a)), fn(*shifted(-b))
        return (up - down) / _bcast((a + b) * h, up).to(up.dtype)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ..., 1] against `like`."""
    return v.reshape(-1, *([1] * (like.ndim - 1)))
