"""Directional (time) derivatives of a network, for sCM's and MeanFlow's tangents, two ways.

`exact` uses forward-mode AD: dual numbers (torch.autograd.forward_ad), with lean rules for group norm and the
convolutions (`FusedJVP`): the same derivative as torch.func.jvp, at half the cost of PyTorch's own rules on a
CPU SongUNet (benchmarks/jvp_cost.py). `fd` uses a finite difference and works for any network that runs
forward, including kernels and sharded models without forward-mode support. Neither builds a graph: the
derivative is a target (stop-gradient) in every method that uses it (computing it with the primal in one
graph-recording pass measured 1.9x slower: the tangent's ops are recorded too).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

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
        with torch.no_grad(), fwAD.dual_level(), FusedJVP():
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


class FusedJVP(TorchFunctionMode):
    """While active, F.group_norm and the convolutions take lean forward-mode rules (`_GroupNorm`, `_Conv`).

    PyTorch's own rules, on a CPU SongUNet: group_norm's is a decomposition of ~25 elementwise ops (38% of the
    JVP), and a convolution's also convolves the input with the weight's tangent, a zero tensor made dense when
    the weights are not dual (a third convolution per layer). Under autocast the stock functions run (autocast's
    dtype policy applies to them, not to the kernels below).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LEAN and not torch.is_autocast_enabled(args[0].device.type):
            return _LEAN[func](*args, **kwargs)
        return func(*args, **kwargs)


def _primal(t: Tensor | None) -> Tensor | None:
    return None if t is None else fwAD.unpack_dual(t).primal


class _GroupNorm(torch.autograd.Function):
    """F.group_norm with a fused JVP. Per group the normalisation's Jacobian, (I - 11'/n - xhat xhat'/n) / s, is
    symmetric, so its JVP is group norm's own backward kernel applied to the tangent, then times the weight."""

    @staticmethod
    def forward(x, num_groups, weight, bias, eps):
        N, C = x.shape[:2]
        return torch.native_group_norm(x.contiguous(), weight, bias, N, C, x[0, 0].numel(), num_groups, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.num_groups, weight, _, _ = inputs
        _, mean, rstd = output
        ctx.set_materialize_grads(False)  # inputs without a tangent (the weights) get None, not zeros
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)

    @staticmethod
    def jvp(ctx, dx, _, dweight, dbias, __):
        x, weight, mean, rstd = (_primal(t) for t in ctx.saved_tensors)
        x, N, C = x.contiguous(), *x.shape[:2]
        channel = (1, C) + (1,) * (x.ndim - 2)
        dy = None
        if dx is not None:
            dy = torch.ops.aten.native_group_norm_backward(dx.contiguous(), x, mean, rstd, None, N, C,
                                                           x[0, 0].numel(), ctx.num_groups, [True, False, False])[0]
            if weight is not None:
                dy = dy * weight.reshape(channel)
        if dweight is not None:  # d(xhat w) / dw: xhat
            xhat = ((x.reshape(N, ctx.num_groups, -1) - mean[..., None]) * rstd[..., None]).reshape_as(x)
            dy = xhat * dweight.reshape(channel) if dy is None else dy + xhat * dweight.reshape(channel)
        if dbias is not None:
            dy = dbias.reshape(channel).expand_as(x) if dy is None else dy + dbias.reshape(channel)
        return (torch.zeros_like(x) if dy is None else dy), None, None

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("FusedJVP is for forward mode under no_grad (derivatives.jvp); no backward here")


class _Conv(torch.autograd.Function):
    """A convolution (conv1d/2d/3d or transposed; `op`) that is linear in (x, weight, bias) jointly: its tangent
    is op(dx, w) + op(x, dw, db), the second term only when the weight or bias has a tangent."""

    @staticmethod
    def forward(op, x, weight, bias, kwargs):
        return op(x, weight, bias, **kwargs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.op, x, weight, _, ctx.kwargs = inputs
        ctx.set_materialize_grads(False)  # inputs without a tangent (the weights) get None, not zeros
        ctx.save_for_forward(x, weight)

    @staticmethod
    def jvp(ctx, _, dx, dweight, dbias, __):
        x, weight = (_primal(t) for t in ctx.saved_tensors)
        out = None if dx is None else ctx.op(dx, weight, None, **ctx.kwargs)
        if dweight is not None or dbias is not None:
            dw = torch.zeros_like(weight) if dweight is None else dweight
            extra = ctx.op(x, dw, dbias, **ctx.kwargs)
            out = extra if out is None else out + extra
        return out

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("FusedJVP is for forward mode under no_grad (derivatives.jvp); no backward here")


def _conv(op, keys: tuple[str, ...]):
    """op's signature after (input, weight, bias): positional arguments are named by `keys`."""
    def call(input, weight, bias=None, *args, **kwargs):
        return _Conv.apply(op, input, weight, bias, {**dict(zip(keys, args)), **kwargs})
    return call


def _group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
                eps: float = 1e-5) -> Tensor:
    return _GroupNorm.apply(input, num_groups, weight, bias, eps)[0]


_CONV = ("stride", "padding", "dilation", "groups")
_CONV_T = ("stride", "padding", "output_padding", "groups", "dilation")
_LEAN = {F.group_norm: _group_norm,
         **{op: _conv(op, _CONV) for op in (F.conv1d, F.conv2d, F.conv3d)},
         **{op: _conv(op, _CONV_T) for op in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)}}
